"""Pooling as layers: the windows of the Inception blocks, run by `Ops`' pools.

`Common.max_pool`, `max_pool_ceil` and `avg_pool` (see `layers`) build these; a
block puts them in a tower beside its convolutions. Padding is worked out here
(TF's "SAME" / "VALID", Caffe's ceil mode) and handed to the ops as explicit pairs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from inception_flax.models.ops import Ops, explicit_padding

Padding = str | Sequence[tuple[int, int]]


def ceil_pool_padding(size: int, k: int, s: int, pad: int) -> tuple[int, int]:
    """Padding that reproduces PyTorch/Caffe `ceil_mode=True` pooling."""
    out = math.ceil((size + 2 * pad - k) / s) + 1
    if (out - 1) * s >= size + pad:  # the last window must start inside the input
        out -= 1
    extra = max((out - 1) * s + k - (size + 2 * pad), 0)
    return pad, pad + extra


@dataclasses.dataclass(frozen=True)
class MaxPool:
    """k x k max pool at stride s ("VALID", "SAME" or explicit padding); `ceil_pad`
    (not None): ceil-mode output size with that padding (GoogLeNet / BN-Inception)."""

    ops: Ops
    k: int
    s: int
    padding: Padding = "VALID"
    ceil_pad: int | None = None

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        if self.ceil_pad is None:
            pads = explicit_padding(x.shape, (self.k, self.k), (self.s, self.s), self.padding)
        else:
            pads = tuple(ceil_pool_padding(x.shape[i], self.k, self.s, self.ceil_pad)
                         for i in (1, 2))
        return self.ops.max_pool(x, self.k, self.s, pads)


@dataclasses.dataclass(frozen=True)
class AvgPool:
    """k x k average pool at stride s; `count_include_pad=False` is TF's "SAME"."""

    ops: Ops
    k: int
    s: int = 1
    padding: Padding = "SAME"
    count_include_pad: bool = False

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        pads = explicit_padding(x.shape, (self.k, self.k), (self.s, self.s), self.padding)
        return self.ops.avg_pool(x, self.k, self.s, pads, self.count_include_pad)


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
    """PyTorch's adaptive average pooling to `out` x `out` (windows may overlap)."""
    def bounds(size: int) -> list[tuple[int, int]]:
        return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]

    rows = [jnp.mean(x[:, a:b], axis=1, keepdims=True) for a, b in bounds(x.shape[1])]
    x = jnp.concatenate(rows, axis=1)
    cols = [jnp.mean(x[:, :, a:b], axis=2, keepdims=True) for a, b in bounds(x.shape[2])]
    return jnp.concatenate(cols, axis=2)
