"""The operations a network's layers run, as one swappable set: `Ops`.

Four operations have faster forms on some machines: convolution, training
BatchNorm (+ ReLU), max pool and average pool. The layers reach them only through
`Common.ops`, an `Ops`, the way `nn.Conv` takes a `conv_general_dilated`. `PLAIN`,
the default, is plain `lax` / Flax: what GPUs and TPUs run, and the reference every
other form must equal. Another set (e.g. `inception_flax.cpu.native_ops()`) is
chosen once, outside the models, and handed to `create_model(name, ops=...)`.

The contracts, all on NHWC activations:

- `conv(x, w, strides, padding) -> y`: `w` HWIO, `strides` (sh, sw), `padding`
  explicit ((top, bottom), (left, right)); undilated, ungrouped;
- `batch_norm(x, scale, bias, *, epsilon, axis_name, relu, dtype, remat)
  -> (out, mean, var)`: training BatchNorm over every axis but the last, with Flax's
  maths (`nn.BatchNorm`: float32 statistics, `var = E[x^2] - E[x]^2`, averaged over
  `axis_name`'s devices when given), then a ReLU when `relu`; `scale` / `bias` may be
  None (not learnt); `remat`: keep only `x` and the statistics for the backward pass;
- `max_pool(x, k, s, padding) -> y`: k x k window, stride s, explicit padding that
  never wins;
- `avg_pool(x, k, s, padding, count_include_pad) -> y`: explicit padding, which
  counts in the divisor only with `count_include_pad`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes
from jax import lax

Pads = tuple[tuple[int, int], tuple[int, int]]
NHWC = ("NHWC", "HWIO", "NHWC")


def conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Pads) -> jax.Array:
    """`lax.conv_general_dilated` on NHWC / HWIO operands."""
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def explicit_padding(x_shape, window, strides, padding) -> Pads:
    """A window's padding over NHWC `x_shape` ("SAME", "VALID" or pairs) as explicit
    ((top, bottom), (left, right)) pairs."""
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(tuple(x_shape[1:3]), tuple(window), tuple(strides), padding)
    (top, bottom), (left, right) = padding
    return (int(top), int(bottom)), (int(left), int(right))


def max_pool(x: jax.Array, k: int, s: int, padding: Pads) -> jax.Array:
    """Flax's max pool (its gradient: `select_and_scatter`)."""
    return nn.max_pool(x, (k, k), (s, s), padding=padding)


def avg_pool(x: jax.Array, k: int, s: int, padding: Pads, count_include_pad: bool) -> jax.Array:
    """Flax's average pool."""
    return nn.avg_pool(x, (k, k), (s, s), padding=padding, count_include_pad=count_include_pad)


def batch_stats(x: jax.Array, dtype: Any = None, axis_name: str | None = None):
    """(mean, var) over every axis but the last, as `nn.BatchNorm` computes them: in at
    least float32, the variance as `E[x^2] - E[x]^2` clipped at 0, both averaged over
    the devices of `axis_name` in one collective."""
    x = x.astype(jnp.promote_types(jnp.result_type(x) if dtype is None else dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    squares = lax.square(x)  # before the means, as Flax: the gradients add up in its order
    mean, mean2 = x.mean(axes), squares.mean(axes)
    if axis_name is not None:
        both = lax.pmean(jnp.stack((mean, mean2)), axis_name)
        mean, mean2 = both[0], both[1]
    return mean, jnp.maximum(0.0, mean2 - lax.square(mean))


def normalize(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array | None,
              bias: jax.Array | None, epsilon: float, dtype: Any = None,
              relu: bool = False) -> jax.Array:
    """`nn.BatchNorm`'s output for these statistics (then a ReLU when `relu`), computed
    as Flax does, shapes included, so that values and gradients agree bit for bit."""
    axes = tuple(range(x.ndim - 1))
    features = (1,) * len(axes) + x.shape[-1:]
    y = x - jnp.expand_dims(mean, axes)
    mul = lax.rsqrt(jnp.expand_dims(var, axes) + epsilon)
    if scale is not None:
        mul = mul * scale.reshape(features)
    y = y * mul
    if bias is not None:
        y = y + bias.reshape(features)
    y = jnp.asarray(y, dtypes.canonicalize_dtype(
        x, *(v for v in (scale, bias) if v is not None), dtype=dtype))
    return nn.relu(y) if relu else y


def _keep_statistics(prim, *args, **params) -> bool:
    """`remat`'s policy: keep the batch statistics (sums, and their cross-device sums),
    recompute the elementwise normalisation and ReLU."""
    del args, params
    return prim.name == "reduce_sum" or prim.name.startswith("psum")


def batch_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, *,
               epsilon: float, axis_name: str | None = None, relu: bool = False,
               dtype: Any = None, remat: bool = False):
    """Training BatchNorm (+ ReLU) with Flax's maths: `(out, batch mean, batch var)`."""
    def train(x, scale, bias):
        mean, var = batch_stats(x, dtype, axis_name)
        return normalize(x, mean, var, scale, bias, epsilon, dtype, relu), mean, var
    if remat:
        train = jax.checkpoint(train, policy=_keep_statistics)
    return train(x, scale, bias)


@dataclasses.dataclass(frozen=True)
class Ops:
    """The operations with faster forms (contracts in the module docstring); every
    field defaults to the plain `lax` / Flax form."""

    conv: Callable[..., jax.Array] = conv
    batch_norm: Callable[..., tuple[jax.Array, jax.Array, jax.Array]] = batch_norm
    max_pool: Callable[..., jax.Array] = max_pool
    avg_pool: Callable[..., jax.Array] = avg_pool
    name: str = "plain"  # which set: "plain", or the backend's (e.g. "native")

    def conv_general_dilated(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                             batch_group_count=1, precision=None, preferred_element_type=None):
        """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`: the 2-D
        NHWC / HWIO, undilated, ungrouped convolutions through `conv`, the rest through lax."""
        simple = (
            lhs.ndim == 4 and len(window_strides) == 2
            and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
            and feature_group_count == 1 and batch_group_count == 1
            and precision is None and preferred_element_type is None
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))
        if not simple:
            return lax.conv_general_dilated(
                lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                dimension_numbers, feature_group_count, batch_group_count, precision,
                preferred_element_type)
        strides = tuple(int(s) for s in window_strides)
        return self.conv(lhs, rhs, strides, explicit_padding(lhs.shape, rhs.shape[:2], strides,
                                                         padding))


PLAIN = Ops()
