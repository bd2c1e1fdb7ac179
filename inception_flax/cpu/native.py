"""The native CPU kernels: C++ sources built once into one library, loaded, called.

`native/onednn_conv.cc` wraps oneDNN's forward, input-gradient and kernel-gradient
convolutions (float32, NHWC activations, HWIO kernels) as XLA FFI handlers;
`native/batch_norm.cc` holds the training BatchNorm's (`cpu.batch_norm`) and
`native/max_pool.cc` the max pool's (`cpu.max_pool`). `load` compiles them into one
library with the C++ compiler (`CXX`, else `g++`) against the oneDNN wheels pinned in
requirements.txt (`onednn-cpu-gomp`, `onednn-devel-cpu-gomp`) and jaxlib's FFI
headers, keeps it under `$INCEPTION_FLAX_CACHE` (default `~/.cache/inception_flax`,
keyed by the sources, the compiler and the library paths), logs that it builds and
where, and registers the handlers with XLA. It runs when it is asked to (by
`cpu.native_ops()`, or `python -m inception_flax.cpu build` ahead of time), never
while a network is traced. `call` is the one way the wrappers reach a handler.

Why oneDNN: XLA:CPU runs convolutions with Eigen's kernels, PyTorch's CPU convolutions
are oneDNN's. Timed one by one on the 2-core machine of docs/performance.md (each
distinct convolution of Inception v3 at batch 16, forward and backward), Eigen's are
slower on most Inception layers, the gradients above all: the stem's 16x147x147x32 ->
64 backward pass took 204 against 132 ms through oneDNN, and all of v3's convolutions
3.85 against 3.19 s per train step.
"""

from __future__ import annotations

import ctypes
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
from absl import logging

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
    """The native kernels cannot be built or loaded here (the message says why)."""


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


def library_path() -> tuple[Path, bool]:
    """The library for these sources in the cache, and whether it is there already."""
    probe = build_command(Path("OUT"))
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + INCLUDES)
                         + "\0".join(probe).encode()).hexdigest()[:16]
    target = cache_dir() / f"native-{key}.so"
    return target, target.exists()


def build(target: Path) -> None:
    """Compile the sources into `target` (raises `Unavailable` with the compiler's first
    error line)."""
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


_state: dict[str, Any] = {}


def load() -> Path:
    """Build (when the cache has no library for these sources; logged), load and
    register the handlers, once per process: the library's path. Raises `Unavailable`
    with the reason, the same one on every later call."""
    if "error" in _state:
        raise Unavailable(_state["error"])
    if "path" in _state:
        return _state["path"]
    try:
        path, cached = library_path()
        if not cached:
            logging.info("building the native CPU kernels (%s) into %s",
                         ", ".join(s.name for s in SOURCES), path)
            build(path)
        lib = ctypes.CDLL(str(path))
        for symbol in TARGETS:
            jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except Unavailable as e:
        _state["error"] = str(e)
        raise
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        _state["error"] = f"loading the native CPU kernels failed: {e}"
        raise Unavailable(_state["error"]) from None
    logging.info("native CPU kernels loaded from %s", path)
    _state.update(lib=lib, path=path)
    return path


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


# Elementwise maps (BatchNorm, max pool) smaller than this run on one thread. XLA:CPU
# runs independent operations (the branches of a block) at the same time, and two teams
# of threads started at once oversubscribe the cores. In-process A/B of the train step
# (ad hoc, this 2-core machine), teams for every map / from 2^18 elements / from 2^20 /
# never: the quickstart's Inception-ResNet v2 (quarter width, 75 px, batch 32) took 191 /
# 178 / 169 / 172 ms, Inception v3 at 299 px, batch 16, 3,721 / 3,700 / 3,664 / 3,714 ms.
TEAM_ELEMENTS = 1 << 20


def team_threads(size: int) -> int:
    """OpenMP threads for an elementwise kernel over `size` elements."""
    return threads() if size >= TEAM_ELEMENTS else 1


def call(target: str, like: jax.Array, results, *args, **attrs):
    """Call the handler `target` on `args`: one result per (shape, dtype) of `results`,
    each varying over the manual (shard_map) axes `like` varies over; integer attributes
    go as int64, as the handlers declare them."""
    if "path" not in _state:
        raise RuntimeError(f"{target}: the native CPU kernels are not loaded; load them "
                           f"before tracing (inception_flax.cpu.native_ops())")
    types = [jax.typeof(like).update(shape=tuple(shape), dtype=dtype, weak_type=False)
             for shape, dtype in results]
    attrs = {k: np.int64(v) if isinstance(v, int) and not isinstance(v, bool) else v
             for k, v in attrs.items()}
    return jax.ffi.ffi_call(target, types)(*args, **attrs)
