"""Which operations a network runs here: the config field `kernels`, chosen once.

- "auto" (the default): on a CPU backend the native kernels where they build, else
  the XLA:CPU forms with one warning; on a GPU or TPU the plain operations;
- "native": the native CPU kernels (`inception_flax.cpu.native_ops()`), an error
  when they cannot be built here;
- "xla_cpu": the XLA:CPU forms (`inception_flax.cpu.xla_ops()`);
- "plain": plain `lax` / Flax (`inception_flax.models.ops.PLAIN`).

Every choice computes the same network; they differ in speed. `check` validates a
choice (config checks); `resolve` turns it into the `Ops` handed to
`models.create_model(name, ops=...)`, where the trainer, evaluator and benchmark
build their model: before the first compile, so that a native build (logged, cached)
happens then and never while tracing.
"""

from __future__ import annotations

import jax
from absl import logging

from inception_flax import cpu
from inception_flax.cpu import native
from inception_flax.models.ops import PLAIN, Ops

CHOICES = ("auto", "native", "xla_cpu", "plain")


def _native_ops(choice: str) -> Ops:
    """`cpu.native_ops()`, its failure one line with the way out."""
    try:
        return cpu.native_ops()
    except native.Unavailable as e:
        raise ValueError(f"kernels={choice}: {e} (or set kernels=xla_cpu)") from None


def check(choice: str) -> None:
    """Raise ValueError (one line) for a choice that is not one of `CHOICES`, or for
    "native" when the native kernels cannot be built here (this builds them)."""
    if choice not in CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "native":
        _native_ops(choice)


def resolve(choice: str) -> Ops:
    """The `Ops` for `choice` on this machine (see the module docstring); ValueError as
    `check`."""
    check(choice)
    if choice == "plain" or (choice == "auto" and jax.default_backend() != "cpu"):
        return PLAIN
    if choice == "xla_cpu":
        return cpu.xla_ops()
    if choice == "native":
        return _native_ops(choice)
    try:
        return cpu.native_ops()
    except native.Unavailable as e:
        logging.warning("the native CPU kernels are unavailable (%s); using the XLA:CPU "
                        "forms of convolution and pooling and Flax's BatchNorm, which train "
                        "slower", e)
        return cpu.xla_ops()
