"""Layers shared by every Inception family: conv + BatchNorm + ReLU, towers, pools.

Precision, normalisation, initialisation and the operations that run them (`Ops`,
see `ops`) are decided once per network in `Common` and handed to the blocks, so
that a block reads like the figure it implements: towers of `conv(features, kernel)`
and pools (`Common.towers`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from inception_flax.models import ops as plain
from inception_flax.models.ops import PLAIN, Ops
from inception_flax.models.pooling import AvgPool, MaxPool, Padding

Dtype = Any
Layer = Callable[..., jax.Array]  # called as layer(x, train)

# He-style init with a truncated normal (the TF references use truncated normal /
# variance scaling initialisers).
conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
dense_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class _Kernel(nn.Module):
    """A convolution kernel `[kh, kw, in, out]`, its input width known at the first call.

    It sits where `nn.Conv` would (`<layer>/conv/kernel`, the same initialisation), so
    that `ConvBN` can hand its kernel to a merged convolution (`merged_pointwise`).
    """

    kernel_size: tuple[int, int]
    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> jax.Array:
        return self.param("kernel", conv_init, (*self.kernel_size, in_features, self.features),
                          self.param_dtype)


class BatchNorm(nn.Module):
    """`nn.BatchNorm` over the last axis with an optional ReLU after it (`relu=True`),
    training through `ops.batch_norm`.

    The same variables (`scale`, `bias`; `mean`, `var` in `batch_stats`), initial values
    and results as `nn.BatchNorm` then `nn.relu`. `remat`: in training, keep only the
    input and the batch statistics for the backward pass (see `Ops`).
    """

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = nn.initializers.zeros
    scale_init: Callable = nn.initializers.ones
    axis_name: str | None = None
    remat: bool = False
    ops: Ops = PLAIN

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 relu: bool = False) -> jax.Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                                features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                               features)
        scale = (self.param("scale", self.scale_init, features, self.param_dtype)
                 if self.use_scale else None)
        bias = (self.param("bias", self.bias_init, features, self.param_dtype)
                if self.use_bias else None)
        if use_running_average:
            return plain.normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon,
                                   self.dtype, relu)
        if self.is_initializing():  # as Flax: this device's statistics, no update
            return plain.batch_norm(x, scale, bias, epsilon=self.epsilon, relu=relu,
                                    dtype=self.dtype)[0]
        out, mean, var = self.ops.batch_norm(
            x, scale, bias, epsilon=self.epsilon, axis_name=self.axis_name, relu=relu,
            dtype=self.dtype, remat=self.remat)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return out


@dataclasses.dataclass(frozen=True)
class Common:
    """The knobs every family shares, declared here once; `conv`, `dense`, `depth` and the
    pools derive from them. `InceptionNet` has a field for each (same defaults)."""

    depth_multiplier: float = 1.0
    min_depth: int = 16
    bn_momentum: float = 0.9997
    bn_epsilon: float = 1e-3
    bn_scale: bool = True
    axis_name: str | None = None
    bn_remat: bool = False
    merge_pointwise: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    ops: Ops = PLAIN

    def depth(self, d: int) -> int:
        """TF-slim's width rule: scale by the depth multiplier, never below min_depth."""
        if self.depth_multiplier == 1.0:
            return d
        return max(int(d * self.depth_multiplier), self.min_depth)

    @property
    def conv(self) -> Callable[..., ConvBN]:
        """`conv(features, kernel_size, strides=1, padding="SAME", activation=True, name=)`."""
        return functools.partial(ConvBN, common=self)

    def towers(self, x: jax.Array, train: bool, *towers: Sequence[Layer]) -> list[jax.Array]:
        """The outputs of the branches of a block that all read `x`, each branch (tower) a
        sequence of layers applied in order, as the papers' figures draw them.

        A layer is anything called as `layer(x, train)`: a `conv(...)`, a pool from
        `max_pool` / `avg_pool`, a `fork(...)`. With `merge_pointwise`, the towers that
        open with a 1x1 stride-1 convolution run those first layers as one convolution
        with their kernels side by side, split back into each layer's BatchNorm: the
        same result, and each layer keeps its own parameters (see `merged_pointwise`).
        """
        firsts = merged_pointwise(self, x, train, [t[0] for t in towers if t])
        outs = []
        for tower in towers:
            merged = bool(tower) and id(tower[0]) in firsts
            y = firsts[id(tower[0])] if merged else x
            for layer in tower[1:] if merged else tower:
                y = layer(y, train)
            outs.append(y)
        return outs

    def max_pool(self, k: int, s: int, padding: Padding = "VALID") -> Layer:
        """A k x k max pool at stride s ("VALID", "SAME" or explicit pairs), as a layer."""
        return MaxPool(self.ops, k, s, padding)

    def max_pool_ceil(self, k: int, s: int, pad: int = 0) -> Layer:
        """A max pool with ceil-mode output size (GoogLeNet / BN-Inception), as a layer."""
        return MaxPool(self.ops, k, s, ceil_pad=pad)

    def avg_pool(self, k: int, s: int = 1, padding: Padding = "SAME",
                 count_include_pad: bool = False) -> Layer:
        """A k x k average pool at stride s, as a layer; `count_include_pad=False` is TF's
        "SAME" (padding does not count in the divisor)."""
        return AvgPool(self.ops, k, s, padding, count_include_pad)

    @property
    def dense(self) -> Callable[..., nn.Dense]:
        return functools.partial(
            nn.Dense, kernel_init=dense_init, dtype=self.dtype, param_dtype=self.param_dtype)

    @property
    def bias_conv(self) -> Callable[..., nn.Conv]:
        """Convolution with bias and no BN (Inception-ResNet residual projections)."""
        return functools.partial(
            nn.Conv, use_bias=True, kernel_init=conv_init, dtype=self.dtype,
            param_dtype=self.param_dtype, conv_general_dilated=self.ops.conv_general_dilated)


class ConvBN(nn.Module):
    """Bias-free convolution, BatchNorm and (optionally) ReLU, set up by `common`.

    Parameters live in `conv/kernel`, `bn/scale`, `bn/bias`; running statistics in
    the `batch_stats` collection under `bn/mean` and `bn/var`. `kernel` and
    `normalize` are the two halves of `__call__`, for `merged_pointwise`.

    `common.bn_remat`: in training, keep only the convolution's output and the batch
    statistics for the backward pass, and recompute the normalisation and ReLU there
    (elementwise work) instead of storing their float32 intermediates and the ReLU mask.
    """

    features: int
    kernel_size: int | Sequence[int] = 1
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    activation: bool = True
    common: Common = Common()

    def setup(self) -> None:
        c = self.common
        self.conv = _Kernel(pair(self.kernel_size), self.features, c.param_dtype)
        # The axis is read only when batch statistics are computed (training).
        self.bn = BatchNorm(momentum=c.bn_momentum, epsilon=c.bn_epsilon, use_scale=c.bn_scale,
                            axis_name=c.axis_name, remat=c.bn_remat, dtype=c.dtype,
                            param_dtype=c.param_dtype, ops=c.ops)

    @property
    def pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded convolution: a matrix product over the channels."""
        unpadded = (self.padding in ("SAME", "VALID")
                    or all(tuple(p) == (0, 0) for p in self.padding))
        return pair(self.kernel_size) == (1, 1) and pair(self.strides) == (1, 1) and unpadded

    def kernel(self, in_features: int) -> jax.Array:
        """The kernel, in the compute dtype."""
        return jnp.asarray(self.conv(in_features), self.common.dtype)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = jnp.asarray(x, self.common.dtype)
        strides = pair(self.strides)
        padding = plain.explicit_padding(x.shape, pair(self.kernel_size), strides, self.padding)
        y = self.common.ops.conv(x, self.kernel(x.shape[-1]), strides, padding)
        return self.normalize(y, train)

    def normalize(self, y: jax.Array, train: bool) -> jax.Array:
        """BatchNorm and activation of this layer's convolution output `y`."""
        return self.bn(y, use_running_average=not train, relu=self.activation)


def fork(*layers: Layer) -> Layer:
    """Layers that each read the same input, their outputs concatenated (the parallel
    1x3 / 3x1 outputs of the expanded filter banks, Rethinking Fig. 7)."""
    def layer(x: jax.Array, train: bool) -> jax.Array:
        return concat([f(x, train) for f in layers])
    return layer


def concat(branches: Sequence[jax.Array]) -> jax.Array:
    return jnp.concatenate(branches, axis=-1)


def merged_pointwise(common: Common, x: jax.Array, train: bool, layers: Sequence[Layer]
                     ) -> dict[int, jax.Array]:
    """`{id(layer): layer(x, train)}` for the 1x1 stride-1 `ConvBN`s among `layers`, run
    as one convolution when there are two or more and `common.merge_pointwise` (else {}).

    One wide matrix product instead of several narrow ones, and in the backward pass one
    input gradient instead of a sum of several, and one kernel gradient instead of
    several. XLA:CPU runs a kernel gradient (a product contracting over the `N*H*W` rows)
    markedly slower than a forward product of the same size.
    """
    merge = [c for c in layers if isinstance(c, ConvBN) and c.pointwise]
    if not common.merge_pointwise or len(merge) < 2:
        return {}
    x = jnp.asarray(x, common.dtype)
    kernels = [c.kernel(x.shape[-1]) for c in merge]
    y = common.ops.conv(x, jnp.concatenate(kernels, axis=-1), (1, 1), ((0, 0), (0, 0)))
    parts = jnp.split(y, np.cumsum([k.shape[-1] for k in kernels])[:-1].tolist(), axis=-1)
    return {id(c): c.normalize(part, train) for c, part in zip(merge, parts)}
