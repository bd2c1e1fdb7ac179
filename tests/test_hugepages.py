"""Huge-page malloc for the command-line entry points (inception_flax/hugepages.py)."""

import os
import subprocess
import sys
import textwrap

from inception_flax import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORTED = dict(libc=(2, 36), mode="madvise")


def test_environment_adds_the_tunable_and_keeps_others():
    env = hugepages.environment({"PATH": "/bin"}, **SUPPORTED)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = hugepages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **SUPPORTED)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_environment_declines_when_nothing_to_gain_or_told_not_to():
    assert hugepages.environment({"INCEPTION_FLAX_HUGEPAGES": "0"}, **SUPPORTED) is None
    assert hugepages.environment({"INCEPTION_FLAX_HUGEPAGES": "off"}, **SUPPORTED) is None
    # The user's own value wins, whatever it is.
    assert hugepages.environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **SUPPORTED) is None
    assert hugepages.environment({}, libc=(2, 31), mode="madvise") is None  # no such tunable
    assert hugepages.environment({}, libc=(2, 36), mode="never") is None
    assert hugepages.environment({"INCEPTION_FLAX_HUGEPAGES": "1"}, **SUPPORTED) is not None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(path)) == "madvise"
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def test_reexec_starts_the_command_again_once_with_the_same_arguments(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        print("start", sys.argv[1:], flush=True)
        from inception_flax import hugepages
        hugepages.reexec()
        print("tunables", os.environ.get("GLIBC_TUNABLES", "-"), flush=True)
    """))
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "INCEPTION_FLAX_HUGEPAGES")}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-u", str(script), "a", "--b=c"], env=env,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    starts = [line for line in out.splitlines() if line.startswith("start")]
    tunables = out.splitlines()[-1]
    if hugepages.environment(env) is None:  # this machine cannot use it: run as is
        assert starts == ["start ['a', '--b=c']"] and tunables == "tunables -"
    else:
        assert starts == ["start ['a', '--b=c']"] * 2
        assert tunables == "tunables glibc.malloc.hugetlb=1"
    env["INCEPTION_FLAX_HUGEPAGES"] = "0"
    out = subprocess.run([sys.executable, "-u", str(script)], env=env,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.splitlines() == ["start []", "tunables -"]
