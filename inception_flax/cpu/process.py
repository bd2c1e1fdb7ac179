"""Process settings for fast CPU training, made by one explicit call: `prepare()`.

Call `prepare()` first thing in a command-line entry point (train.py, eval.py,
benchmark.py; sweep.py runs train.py), before JAX is imported. Importing this package
changes nothing; `prepare` makes two changes, each of which acts only at a process's
start:

1. Huge-page malloc (`reexec`). XLA:CPU takes each step's temporaries (gigabytes for
   a 299 px batch) from `malloc`. glibc serves blocks that large with a fresh `mmap`
   and returns them with `munmap` when the step ends, so the next step faults every
   4 KiB page in again: about half a million page faults per Inception v3 step at
   batch 16, a second of kernel time spread over the two cores of the machine we
   measured (docs/performance.md). glibc 2.35 and later can ask for transparent huge
   pages on those blocks (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`), which takes the
   faults to a few thousand. The dynamic loader reads that variable only when a
   process starts, so the command re-executes itself once with it set.
   `INCEPTION_FLAX_HUGEPAGES=0` turns this off; a `glibc.malloc.hugetlb` setting of
   your own in GLIBC_TUNABLES is kept as it is. In a notebook or your own script,
   export the variable before starting Python.

2. Convolutions out of YNNPACK (`configure_xla_flags`). XLA:CPU hands convolutions to
   YNNPACK by default; on the x86 CPU we measured, its kernels took 2.2x as long as
   XLA's Eigen convolutions summed over Inception v3's, and 9x on the wide, shallow
   maps of the stem (16x149x149x32, 3x3 to 32: 321 ms against 36 ms forward).
   Matrix products, reductions and elementwise work stay with YNNPACK. The flag goes
   into XLA_FLAGS, which XLA reads when JAX creates its CPU backend, so it must be set
   before the first computation; a value of your own in XLA_FLAGS (any) is kept. The
   flag is experimental and XLA refuses to start on a flag it does not know, so it is
   only added for the jaxlib releases it was checked with. Tests call
   `configure_xla_flags()` alone (no re-execution).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping, MutableMapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "INCEPTION_FLAX_HUGEPAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_VALUE = "-individual_convolution"
CHECKED_JAXLIB = ("0.10.2",)


def prepare() -> None:
    """Both settings of the module docstring: re-execute with huge-page malloc when it
    helps (the new process comes back here and goes on), then the XLA flag."""
    reexec()
    configure_xla_flags()


def _jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def configure_xla_flags(environ: MutableMapping[str, str] = os.environ,
                        jaxlib_version: str | None = None) -> None:
    """Add the flag that keeps convolutions out of YNNPACK to XLA_FLAGS, unless XLA_FLAGS
    names it already or jaxlib is not a release it was checked with."""
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    flags = environ.get("XLA_FLAGS", "")
    if YNN_FLAG not in flags and version in CHECKED_JAXLIB:
        environ["XLA_FLAGS"] = f"{flags} --{YNN_FLAG}={YNN_VALUE}".strip()


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, or None (another C library, or not Linux)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, TypeError, ValueError):
        return None


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _setting(environ: Mapping[str, str]) -> str | None:
    """The value GLIBC_TUNABLES gives the tunable, or None when it does not name it."""
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name == TUNABLE:
            return value
    return None


def active(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started with huge-page malloc turned on."""
    return _setting(environ) not in (None, "0")


def environment(environ: Mapping[str, str] = os.environ,
                libc: tuple[int, int] | None = None, mode: str | None = None
                ) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to gain.

    None when the user opted out, already set the tunable, or when glibc (older
    than 2.35: no such tunable) or the kernel (huge pages "never") cannot use it.
    """
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if _setting(environ) is not None:  # the user's own choice, whatever it is
        return None
    libc = glibc_version() if libc is None else libc
    mode = thp_mode() if mode is None else mode
    if libc is None or libc < (2, 35) or mode not in ("always", "madvise"):
        return None
    env = dict(environ)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    env["GLIBC_TUNABLES"] = ":".join(tunables + [f"{TUNABLE}=1"])
    return env


def reexec() -> None:
    """Re-execute this command with huge-page malloc, when `environment` says so.

    Called by `prepare`, before JAX is imported; the new process starts over with the
    same interpreter, options and arguments.
    """
    env = environment()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError as e:  # carry on without: slower, not wrong
        print(f"warning: could not re-execute with {TUNABLE}=1 ({e}); continuing without "
              f"huge pages", file=sys.stderr)
