"""Convolutions through oneDNN on the CPU, as XLA FFI calls.

XLA:CPU runs convolutions with Eigen's kernels; PyTorch's CPU convolutions are
oneDNN's. Timed one by one on the 2-core machine of README's CPU table (ad hoc,
each distinct convolution of Inception v3 at batch 16, forward and backward),
Eigen's are slower on most Inception layers, the gradients above all: the stem's
16x147x147x32 -> 64 backward pass took 204 against 132 ms through oneDNN, and all
of v3's convolutions 3.85 against 3.19 s per train step.

`native/onednn_conv.cc` wraps oneDNN's forward, input-gradient and
kernel-gradient convolutions (float32, NHWC activations, HWIO kernels) as XLA
FFI handlers; `native/batch_norm.cc` holds the training BatchNorm's handlers
(`inception_flax.batch_norm`) and `native/max_pool.cc` the max pool's
(`inception_flax.max_pool`). This module compiles them into one library on
first use with the C++ compiler (`CXX`, else `g++`) against the oneDNN wheels
pinned in requirements.txt (`onednn-cpu-gomp`, `onednn-devel-cpu-gomp`) and
jaxlib's FFI headers, keeps it under `$INCEPTION_FLAX_CACHE` (default
`~/.cache/inception_flax`, keyed by the sources, the compiler and the library
paths), and registers the handlers with XLA. `conv` is the convolution with both
gradients through them.

`layers.conv_nhwc`, `layers.BatchNorm` and `layers.max_pool` use them on the
CPU when they can be built (`INCEPTION_FLAX_KERNELS=auto`, the default) or
always (`=onednn`, an error when they cannot); `=cpu` keeps XLA's own
convolutions and pools and Flax's BatchNorm.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

NATIVE = Path(__file__).parent / "native"
SOURCES = tuple(NATIVE / name for name in ("onednn_conv.cc", "batch_norm.cc", "max_pool.cc"))
INCLUDES = (NATIVE / "parallel.h",)  # part of the cache key, not compiled on their own
CACHE_ENV = "INCEPTION_FLAX_CACHE"
CONV = "inception_flax_conv_{}"
BATCH_NORM = "inception_flax_bn_{}"
MAX_POOL = "inception_flax_max_pool{}"
TARGETS = (*(CONV.format(k) for k in ("forward", "input_grad", "kernel_grad")),
           *(BATCH_NORM.format(k) for k in ("stats", "apply", "grad_stats", "input_grad")),
           *(MAX_POOL.format(k) for k in ("", "_grad")))
LIBRARY = ("onednn-cpu-gomp", "/libdnnl.so.3")
HEADERS = ("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
# -ffp-contract=off: batch_norm.cc computes the same expression in several loops and
# needs the same rounding in each.
FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-std=c++17", "-shared", "-fPIC")


class Unavailable(RuntimeError):
    """oneDNN convolutions cannot be built or loaded here (the message says why)."""


def _installed_file(dist: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise Unavailable(f"the {dist} package is not installed: "
                          f"pip install -r requirements.txt") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(f.locate()).resolve()
            if path.exists():
                return path
    raise Unavailable(f"{dist} is installed without {suffix}: "
                      f"pip install --force-reinstall -r requirements.txt")


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "inception_flax")
    return Path(base)


def build_command(output: Path) -> list[str]:
    """The compiler command that builds the handlers into `output`."""
    import jaxlib

    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise Unavailable(f"no C++ compiler {cxx!r} on PATH: install g++, or name one in CXX")
    library = _installed_file(*LIBRARY)
    headers = _installed_file(*HEADERS).parents[2]  # .../include
    ffi_headers = Path(jaxlib.__file__).parent / "include"
    if not (ffi_headers / "xla" / "ffi" / "api" / "ffi.h").exists():
        raise Unavailable(f"jaxlib {jaxlib.__version__} ships no XLA FFI headers in {ffi_headers}")
    return [cxx, *FLAGS, f"-I{headers}", f"-I{ffi_headers}", *map(str, SOURCES), "-o", str(output),
            str(library), f"-Wl,-rpath,{library.parent}", "-lgomp"]


def library_path() -> Path:
    """The built library, building it first when the cache has none for these sources."""
    probe = build_command(Path("OUT"))
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + INCLUDES)
                         + "\0".join(probe).encode()).hexdigest()[:16]
    target = cache_dir() / f"native-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes building at once each finish whole.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(build_command(Path(tmp)), capture_output=True, text=True,
                              timeout=600, check=False)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if "error" in ln]
            raise Unavailable(f"building {', '.join(s.name for s in SOURCES)} failed: "
                              f"{(lines or [f'exit status {proc.returncode}'])[0].strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_state: dict[str, Any] = {}


def load() -> None:
    """Build (once), load and register the handlers; raises `Unavailable` with the reason."""
    if "error" in _state:
        raise Unavailable(_state["error"])
    if "lib" in _state:
        return
    try:
        lib = ctypes.CDLL(str(library_path()))
        for symbol in TARGETS:
            jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except Unavailable as e:
        _state["error"] = str(e)
        raise
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        _state["error"] = f"loading the native CPU kernels failed: {e}"
        raise Unavailable(_state["error"]) from None
    _state["lib"] = lib


def available() -> bool:
    try:
        load()
    except Unavailable:
        return False
    return True


def unavailable_reason() -> str | None:
    return None if available() else _state["error"]


def threads() -> int:
    """OpenMP threads per call: the process's CPUs (or OMP_NUM_THREADS), shared among the
    local devices, whose computations XLA:CPU runs at the same time.

    XLA:CPU may also run two independent convolutions of one device (two branches of a
    block) at once, each with these threads. Letting only one run at a time was slower:
    Inception v3 train step 4,139 against 3,871 ms, inference 1,101 against 1,040 ms
    (in-process alternating A/B, medians of 6, this 2-core machine)."""
    try:
        cpus = int(os.environ["OMP_NUM_THREADS"])
    except (KeyError, ValueError):
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:
            cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, jax.local_device_count()))


def _call(target: str, like: jax.Array, shape: tuple[int, ...], *args, strides, padding):
    (pt, pb), (pl, pr) = padding
    attrs = {"sh": strides[0], "sw": strides[1], "pt": pt, "pb": pb, "pl": pl, "pr": pr,
             "threads": threads()}
    attrs = {k: np.int64(v) for k, v in attrs.items()}
    # The result varies over the same manual (shard_map) axes as `like`.
    out = jax.typeof(like).update(shape=shape, weak_type=False)
    return jax.ffi.ffi_call(CONV.format(target), out)(*args, **attrs)


def varying_like(x: jax.Array, like: jax.Array) -> jax.Array:
    """`x` made to vary over the manual (shard_map) axes `like` varies over (a replicated
    parameter beside per-device activations), as JAX does for its own operations, so that
    a custom VJP gives its gradient the parameter's type (the cast's transpose sums over
    the devices)."""
    extra = tuple(jax.typeof(like).manual_axis_type.varying
                  - jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, extra, to="varying") if extra else x


def output_shape(x_shape, w_shape, strides, padding) -> tuple[int, int, int, int]:
    spatial = [(x_shape[1 + i] + sum(padding[i]) - w_shape[i]) // strides[i] + 1 for i in (0, 1)]
    return (x_shape[0], *spatial, w_shape[3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
         padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """`lax.conv_general_dilated(x, w, strides, padding)` for float32 NHWC / HWIO,
    undilated, ungrouped, with non-negative padding, through oneDNN."""
    load()
    return _call("forward", x, output_shape(x.shape, w.shape, strides, padding), x, w,
                 strides=strides, padding=padding)


def _conv_fwd(x, w, strides, padding):
    return conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, res, g):
    x, w = res
    dx = _call("input_grad", x, x.shape, g, w, strides=strides, padding=padding)
    dw = _call("kernel_grad", w, w.shape, x, g, strides=strides, padding=padding)
    return dx, dw


conv.defvjp(_conv_fwd, _conv_bwd)


def supports(x: jax.Array, w: jax.Array, padding) -> bool:
    """Whether `conv` takes these operands (float32, non-negative padding)."""
    return (x.dtype == np.float32 and w.dtype == np.float32 and x.ndim == 4 and w.ndim == 4
            and all(lo >= 0 and hi >= 0 for lo, hi in padding))
