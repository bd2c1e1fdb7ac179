"""The process settings of the command-line entry points (inception_flax/cpu/process.py):
huge-page malloc and the XLA flag that keeps convolutions out of YNNPACK."""

import os
import subprocess
import sys
import textwrap

from inception_flax.cpu import process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORTED = dict(libc=(2, 36), mode="madvise")


def test_environment_adds_the_tunable_and_keeps_others():
    env = process.environment({"PATH": "/bin"}, **SUPPORTED)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = process.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **SUPPORTED)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_environment_declines_when_nothing_to_gain_or_told_not_to():
    assert process.environment({"INCEPTION_FLAX_HUGEPAGES": "0"}, **SUPPORTED) is None
    assert process.environment({"INCEPTION_FLAX_HUGEPAGES": "off"}, **SUPPORTED) is None
    # The user's own value wins, whatever it is.
    assert process.environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **SUPPORTED) is None
    assert process.environment({}, libc=(2, 31), mode="madvise") is None  # no such tunable
    assert process.environment({}, libc=(2, 36), mode="never") is None
    assert process.environment({"INCEPTION_FLAX_HUGEPAGES": "1"}, **SUPPORTED) is not None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert process.thp_mode(str(path)) == "madvise"
    assert process.thp_mode(str(tmp_path / "missing")) is None


def test_prepare_starts_the_command_again_once_with_the_same_arguments(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        print("start", sys.argv[1:], flush=True)
        from inception_flax.cpu import process
        process.prepare()
        assert "jax" not in sys.modules  # prepare() itself runs without JAX
        print("tunables", os.environ.get("GLIBC_TUNABLES", "-"), flush=True)
    """))
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "INCEPTION_FLAX_HUGEPAGES")}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-u", str(script), "a", "--b=c"], env=env,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    starts = [line for line in out.splitlines() if line.startswith("start")]
    tunables = out.splitlines()[-1]
    if process.environment(env) is None:  # this machine cannot use it: run as is
        assert starts == ["start ['a', '--b=c']"] and tunables == "tunables -"
    else:
        assert starts == ["start ['a', '--b=c']"] * 2
        assert tunables == "tunables glibc.malloc.hugetlb=1"
    env["INCEPTION_FLAX_HUGEPAGES"] = "0"
    out = subprocess.run([sys.executable, "-u", str(script)], env=env,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.splitlines() == ["start []", "tunables -"]


def test_configure_xla_flags_adds_the_flag_once_and_keeps_the_users():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    process.configure_xla_flags(env, jaxlib_version="0.10.2")
    assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
    process.configure_xla_flags(env, jaxlib_version="0.10.2")  # already there: unchanged
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1
    users = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=all"}
    process.configure_xla_flags(users, jaxlib_version="0.10.2")
    assert users == {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=all"}
    unchecked = {}  # XLA refuses flags it does not know: only for checked releases
    process.configure_xla_flags(unchecked, jaxlib_version="0.9.0")
    assert unchecked == {}
