"""The CPU backend: faster forms of the operations in `inception_flax.models.ops`.

On a CPU, XLA runs the plain operations well below what the machine can do. Two sets
of `Ops` fix that, each with the same values and gradients as the plain one:

- `xla_ops()`: the XLA:CPU forms (`forms`): convolutions whose gradients are
  canonical convolutions (stride 1) or stride-1 phases (strided), max pools without
  `select_and_scatter`, separable average pools; Flax's BatchNorm.
- `native_ops()`: float32 convolutions through oneDNN (`conv`), training BatchNorm +
  ReLU (`batch_norm`) and max pools (`max_pool`) through C++ kernels (`native/`, built
  and cached by `native`), anything those do not take through the XLA:CPU forms.

`inception_flax.kernels.resolve` chooses between them (config `kernels`). `process`
holds the process settings (huge-page malloc, XLA_FLAGS) an entry point makes with
`process.prepare()`. `python -m inception_flax.cpu build` builds the native kernels
ahead of time. Measurements: docs/performance.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inception_flax.models.ops import Ops

# The imports are inside the functions so that `inception_flax.cpu.process` loads
# without JAX: entry points call `process.prepare()` before JAX is imported.


def xla_ops() -> Ops:
    """The XLA:CPU forms of convolution and pooling, Flax's BatchNorm."""
    from inception_flax.cpu import forms
    from inception_flax.models import ops

    return ops.Ops(conv=forms.conv, batch_norm=ops.batch_norm, max_pool=forms.max_pool,
                   avg_pool=forms.avg_pool, name="xla_cpu")


def native_ops() -> Ops:
    """The native kernels where they take the operands (float32), else `xla_ops()`'
    forms. Builds the kernels first when the cache has none (logged); raises
    `native.Unavailable` with the reason when they cannot be built or loaded."""
    from inception_flax.cpu import batch_norm, conv, forms, max_pool, native
    from inception_flax.models import ops

    native.load()
    return ops.Ops(conv=conv.conv, batch_norm=batch_norm.batch_norm, max_pool=max_pool.max_pool,
                   avg_pool=forms.avg_pool, name="native")
