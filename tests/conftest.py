"""Test-wide JAX settings, fixed before JAX is imported.

- 2 fake CPU devices, so data-parallel code runs on a real mesh;
- a light XLA backend optimisation level: the suite compiles many small programs
  whose run time is negligible next to their compile time;
- one persistent compilation cache for the session, shared with subprocesses, and
  one cache for the native CPU kernels built from source;
- the entry points' XLA flag (`inception_flax.cpu.process.configure_xla_flags`),
  without their huge-page re-execution.
"""

import os
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=2"
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

from inception_flax.cpu import process  # noqa: E402 (loads no JAX)

process.configure_xla_flags()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="inception_flax_jit_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TFDS_DATA_DIR", tempfile.mkdtemp(prefix="inception_flax_tfds_"))
# The native CPU kernels (inception_flax/cpu/native.py) are built once per session, here.
os.environ.setdefault("INCEPTION_FLAX_CACHE", tempfile.mkdtemp(prefix="inception_flax_native_"))


def pytest_configure(config):
    """Prepare the embedded digits dataset once, before any xdist worker starts."""
    del config
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        from inception_flax.data import pipeline

        pipeline.prepare_dataset("inception_digits", os.environ["TFDS_DATA_DIR"])
