"""inception_flax: the Inception family of image classifiers in JAX / Flax."""

import importlib.metadata
import os

# XLA:CPU hands convolutions to YNNPACK by default; on the x86 CPU we measured, its
# kernels took 2.2x as long as XLA's Eigen convolutions summed over Inception v3's, and
# 9x on the wide, shallow maps of the stem (16x149x149x32, 3x3 to 32: 321 ms against
# 36 ms forward; `benchmark.py --conv-layers`, see README). Matrix products,
# reductions and elementwise work stay with YNNPACK. Setting the flag yourself in
# XLA_FLAGS (any value) keeps yours. It acts when JAX creates its CPU backend, so it
# must be in place before the first computation: importing this package does that.
# The flag is experimental and XLA refuses to start on a flag it does not know, so it
# is only added for the jaxlib releases it was checked with.
_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
_CHECKED_JAXLIB = ("0.10.2",)


def _jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


if _YNN_FLAG not in os.environ.get("XLA_FLAGS", "") and _jaxlib_version() in _CHECKED_JAXLIB:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --{_YNN_FLAG}=-individual_convolution").strip()
