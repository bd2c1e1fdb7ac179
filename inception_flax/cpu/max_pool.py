"""Max pooling with its gradient on the CPU through native kernels.

`cpu.forms.max_pool` writes a max pool's gradient as one strided slice and one
interior-padded add per window tap. XLA:CPU fuses those into loops that evaluate
every tap at every input position: in an Inception v3 train step (batch 16, 299 px,
this 2-core machine, ad hoc profile) the stem's two pools took 136 ms backward and
Mixed_7a's 17x17x768 pool nine passes of about 10 ms each. `native_max_pool` runs
the handlers of `native/max_pool.cc` (built and loaded with the others, see
`cpu.native`) instead:

- forward: each output's maximum and the window tap it came from (one byte per
  output), one read of the input;
- backward: each output's gradient added at that tap, one pass over the gradient and
  one write of the input gradient.

Ties go to the first maximum in row-major window order, as in `cpu.forms.max_pool` and
`select_and_scatter`, so both give the same values and gradients. `max_pool` fills
`Ops.max_pool` in `cpu.native_ops()`, handing what the kernels do not take to the
XLA:CPU form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from inception_flax.cpu import forms, native
from inception_flax.models.ops import Pads


def supports(x: jax.Array, k: int, pads: Pads) -> bool:
    """Whether `native_max_pool` takes these operands: float32 NHWC, non-negative padding
    smaller than the window (every window holds at least one input)."""
    return (x.dtype == np.float32 and x.ndim == 4 and 0 < k <= 16
            and all(0 <= p < k for side in pads for p in side))


def _call(name: str, like: jax.Array, results, *args, k: int, s: int, pads: Pads, size: int):
    # `size`: the input's, which sets the team of threads.
    return native.call(native.MAX_POOL.format(name), like, results, *args, k=k, s=s,
                       pt=pads[0][0], pl=pads[1][0], threads=native.team_threads(size))


def output_shape(shape, k: int, s: int, pads: Pads) -> tuple[int, int, int, int]:
    n, h, w, c = shape
    return (n, (h + sum(pads[0]) - k) // s + 1, (w + sum(pads[1]) - k) // s + 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def native_max_pool(x: jax.Array, k: int, s: int, pads: Pads) -> jax.Array:
    """k x k max pool at stride s of float32 NHWC `x`, padded by `pads` ((top, bottom),
    (left, right)) with values that never win."""
    return _max_pool_fwd(x, k, s, pads)[0]


def _max_pool_fwd(x, k, s, pads):
    shape = output_shape(x.shape, k, s, pads)
    y, which = _call("", x, [(shape, jnp.float32), (shape, jnp.uint8)], x, k=k, s=s, pads=pads,
                     size=x.size)
    return y, (which, x.shape)


def _max_pool_bwd(k, s, pads, res, g):
    which, shape = res
    (dx,) = _call("_grad", g, [(shape, jnp.float32)], g, which, k=k, s=s, pads=pads,
                  size=int(np.prod(shape)))
    return (dx,)


native_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, k: int, s: int, padding: Pads) -> jax.Array:
    """`Ops.max_pool`: through the native kernels where `supports`, else the XLA:CPU form."""
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if supports(x, k, pads):
        return native_max_pool(x, k, s, pads)
    return forms.max_pool(x, k, s, pads)
