"""The native CPU kernels (inception_flax/cpu): built at an explicit moment, chosen
once by `kernels`, and correct when XLA runs them at once."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from inception_flax import cpu, kernels
from inception_flax.cpu import native
from inception_flax.models.ops import PLAIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AXIS = "batch"


def test_the_same_convolution_on_two_devices_at_once(monkeypatch):
    """The two CPU devices of the test session run one convolution (one oneDNN primitive)
    at the same time, with two OpenMP threads each. With oneDNN's shared scratchpad,
    half of the kernel gradient came out wrong here, and whole train steps hung."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(2 * jax.local_device_count()))
    assert jax.local_device_count() >= 2 and native.threads() == 2
    conv = kernels.resolve("native").conv
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    x = jax.random.normal(jax.random.key(0), (2 * jax.device_count(), 35, 35, 64))
    w = jax.random.normal(jax.random.key(1), (3, 3, 64, 96))

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (1, 1), ((1, 1), (1, 1)))))

    @jax.jit
    def grads(x, w):  # each device: its examples' forward, input and kernel gradients
        return jax.shard_map(jax.grad(loss(conv), (0, 1)), mesh=mesh,
                             in_specs=(P(AXIS), P()), out_specs=(P(AXIS), P()))(x, w)
    ref_dx, ref_dw = jax.grad(loss(PLAIN.conv), (0, 1))(x, w)
    x = jax.device_put(x, NamedSharding(mesh, P(AXIS)))
    for _ in range(10):
        dx, dw = grads(x, w)
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-2)  # |dw| ~ 100


def test_a_bad_kernel_choice_is_one_line_naming_the_choices():
    for call in (kernels.check, kernels.resolve):
        with pytest.raises(ValueError) as err:
            call("onednn")
        assert str(err.value) == ("kernels must be one of auto, native, xla_cpu, plain, "
                                  "got 'onednn'")


def test_auto_is_plain_off_the_cpu_and_native_on_it(monkeypatch):
    native_ops = kernels.resolve("native")
    assert kernels.resolve("auto") == native_ops != cpu.xla_ops() != PLAIN
    assert kernels.resolve("plain") is PLAIN
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert kernels.resolve("auto") is PLAIN


def test_build_command_builds_and_says_where(tmp_path):
    """`python -m inception_flax.cpu build` into an empty cache: a log line that it
    builds and where, the library's path, exit status 0; then loaded from the cache."""
    env = {**os.environ, "PYTHONPATH": ROOT, "INCEPTION_FLAX_CACHE": str(tmp_path)}
    run = [sys.executable, "-m", "inception_flax.cpu", "build"]
    proc = subprocess.run(run, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = proc.stdout.strip()
    assert os.path.dirname(path) == str(tmp_path) and os.path.exists(path)
    assert f"building the native CPU kernels (onednn_conv.cc, batch_norm.cc, max_pool.cc) into " \
           f"{path}" in proc.stderr
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == path
    assert "building" not in again.stderr and f"loaded from {path}" in again.stderr


UNBUILDABLE = textwrap.dedent("""
    import logging, sys
    import jax, jax.numpy as jnp
    from inception_flax import cpu, kernels

    try:
        kernels.check("native")
    except ValueError as e:
        print("check:", e)
    try:
        kernels.resolve("native")
    except ValueError as e:
        print("resolve:", e)
    ops = kernels.resolve("auto")
    print("auto is xla_cpu:", ops == cpu.xla_ops())
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2))
    print("conv:", float(ops.conv(x, w, (1, 1), ((1, 1), (1, 1))).sum()))
""")


def test_native_kernels_that_cannot_be_built_are_one_line_or_a_fallback(tmp_path):
    """No compiler: an explicit "native" names the reason and the way out, in one line;
    "auto" warns once and runs the XLA:CPU forms; the build command says why, exit 1."""
    env = {**os.environ, "PYTHONPATH": ROOT, "INCEPTION_FLAX_CACHE": str(tmp_path),
           "CXX": "no-such-compiler"}
    proc = subprocess.run([sys.executable, "-c", UNBUILDABLE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reason = "no C++ compiler 'no-such-compiler' on PATH: install g++, or name one in CXX"
    assert proc.stdout.splitlines() == [
        f"check: kernels=native: {reason} (or set kernels=xla_cpu)",
        f"resolve: kernels=native: {reason} (or set kernels=xla_cpu)",
        "auto is xla_cpu: True",
        "conv: 676.0"]  # 2 x 2 channels x 13^2 taps on the 5x5 image: it runs
    warnings = [line for line in proc.stderr.splitlines() if "unavailable" in line]
    assert len(warnings) == 1 and f"native CPU kernels are unavailable ({reason})" in warnings[0]
    build = subprocess.run([sys.executable, "-m", "inception_flax.cpu", "build"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 1 and build.stdout == ""
    assert build.stderr.strip().splitlines()[-1] == f"error: {reason}"
    assert not list(tmp_path.iterdir())  # nothing half-built left behind
