"""inception_flax: the Inception family of image classifiers in JAX / Flax."""

import os

# XLA:CPU hands convolutions to YNNPACK by default; on the x86 CPUs we measured, its
# kernels are 2-8x slower than XLA's Eigen convolutions for the wide, shallow maps of
# the Inception stems (16x149x149x32, 3x3 to 32: 401 ms against 62 ms), and slower for
# most other layers. Matrix products stay with YNNPACK. Setting the flag yourself in
# XLA_FLAGS (any value) keeps yours. It acts when JAX creates its CPU backend, so it
# must be in place before the first computation: importing this package does that.
_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
if _YNN_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --{_YNN_FLAG}=-individual_convolution").strip()
