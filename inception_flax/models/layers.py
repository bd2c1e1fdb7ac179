"""Layers shared by every Inception family: conv + BatchNorm + ReLU, pooling, heads.

Precision, normalisation and initialisation are decided once per network (see
`Common`) and handed to the blocks as `functools.partial`s, so a block reads like
the figure it implements: a list of `conv(features, kernel)` calls.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
import os
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from inception_flax import batch_norm, onednn
from inception_flax import max_pool as max_pool_lib

Dtype = Any
ModuleDef = Any
Padding = str | Sequence[tuple[int, int]]

# He-style init with a truncated normal (the TF references use truncated normal /
# variance scaling initialisers).
conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
dense_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


# ----------------------------------------------------------------------------
# Which forms of convolution and pooling
# ----------------------------------------------------------------------------
#
# The custom gradients and pools below are written for XLA:CPU's kernels. GPUs and
# TPUs have fast convolutions for every dimension order and fast window reductions,
# and XLA lays them out itself: there the plain `lax` / Flax operations are used.

KERNELS_ENV = "INCEPTION_FLAX_KERNELS"
KERNELS = ("auto", "onednn", "cpu", "xla")


_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernels", default=None)


@contextlib.contextmanager
def kernels(choice: str):
    """Trace with `choice` instead of `INCEPTION_FLAX_KERNELS` (this thread, this block)."""
    if choice not in KERNELS:
        raise ValueError(f"{choice!r} is not a kernel choice: one of {', '.join(KERNELS)}")
    token = _forced.set(choice)
    try:
        yield
    finally:
        _forced.reset(token)


def kernel_choice() -> str:
    """`INCEPTION_FLAX_KERNELS` (or `kernels`' choice), checked: "auto" (the default),
    "onednn", "cpu" or "xla". "onednn" is also checked to be buildable here (see
    `inception_flax.onednn`).
    """
    choice = _forced.get() or os.environ.get(KERNELS_ENV, "auto") or "auto"
    if choice not in KERNELS:
        raise ValueError(f"{KERNELS_ENV}={choice!r} is not a kernel choice: set it to one of "
                         f"{', '.join(KERNELS)} (or unset it)")
    if choice == "onednn":
        reason = onednn.unavailable_reason()
        if reason is not None:
            raise ValueError(f"{KERNELS_ENV}=onednn: {reason} (or set {KERNELS_ENV}=cpu)")
    return choice


def cpu_kernels() -> bool:
    """Whether convolutions and pools take this module's CPU forms.

    "auto" uses them when JAX's default backend is the CPU; "onednn" / "cpu" or "xla"
    force one side. It is read when a network is traced.
    """
    choice = kernel_choice()
    if choice == "auto":
        return jax.default_backend() == "cpu"
    return choice != "xla"


def native_kernels() -> bool:
    """Whether float32 convolutions go to oneDNN (`inception_flax.onednn`), training
    BatchNorms and max pools to the native kernels of `inception_flax.batch_norm` and
    `inception_flax.max_pool`: with "onednn", and with "auto" on the CPU where they can
    be built (else XLA's, with one warning)."""
    choice = kernel_choice()
    if choice == "auto" and jax.default_backend() == "cpu":
        if not onednn.available():
            _warn_once(f"the native CPU kernels are unavailable ({onednn.unavailable_reason()}); "
                       f"using XLA's convolutions and pools and Flax's BatchNorm, which "
                       f"train slower")
            return False
        return True
    return choice == "onednn"


@functools.cache
def _warn_once(message: str) -> None:
    logging.warning(message)


# ----------------------------------------------------------------------------
# Convolution with a backward pass XLA:CPU runs fast inside loops
# ----------------------------------------------------------------------------
#
# XLA:CPU runs a convolution with its fast (Eigen / library) kernels only when
# the dimension numbers are canonical (NHWC input, HWIO kernel, NHWC output).
# Its canonicalisation pass rewrites the others with transposes, but it visits
# the entry computation only: a non-canonical convolution inside a while loop
# (the body of `nn.scan`) falls back to a naive loop nest that is orders of
# magnitude slower. JAX writes both gradients of a convolution as non-canonical
# convolutions (the weight gradient contracts over the batch; the input
# gradient reads the kernel as HWOI), so under a rolled scan the backward pass
# crawled. `conv_nhwc` computes the same gradients with canonical convolutions
# and explicit transposes (or with matrix products for 1x1 kernels).

NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_s1(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], ...], precision
             ) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC,
                                        precision=precision)


def _conv_s1_fwd(x, w, padding, precision):
    return _conv_s1(x, w, padding, precision), (x, w)


def _is_pointwise(w: jax.Array, padding) -> bool:
    return w.shape[:2] == (1, 1) and all(p == (0, 0) for p in padding)


def _conv_s1_bwd(padding, precision, res, g):
    x, w = res
    if _is_pointwise(w, padding):  # 1x1: two matrix products
        dx = jnp.einsum("nhwo,io->nhwi", g, w[0, 0], precision=precision)
        # [N*H*W, I]^T [N*H*W, O]: a plain 2-D product is 2-4x faster on CPU than the
        # same contraction written over three axes.
        dw = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                                 (((0,), (0,)), ((), ())), precision=precision)[None, None]
        return dx, dw.astype(w.dtype)
    # Input gradient: the flipped kernel, inputs and outputs swapped, full padding.
    w_t = jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)
    pad_t = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(w.shape[:2], padding))
    dx = jax.lax.conv_general_dilated(g, w_t, (1, 1), pad_t, dimension_numbers=NHWC,
                                      precision=precision)
    # Kernel gradient: input channels act as the batch, the batch as the features,
    # the output gradient as the kernel: [I, H, W, N] * [Ho, Wo, N, O] -> [I, kh, kw, O].
    dw = jax.lax.conv_general_dilated(
        jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)), (1, 1), padding,
        dimension_numbers=NHWC, precision=precision)
    return dx, jnp.transpose(dw, (1, 2, 0, 3)).astype(w.dtype)


_conv_s1.defvjp(_conv_s1_fwd, _conv_s1_bwd)


# JAX's input gradient of a strided convolution convolves the output gradient spread
# out with zeros (lhs dilation), and XLA:CPU multiplies those zeros too. Row i = s*m + r
# of the padded input sees only the kernel taps r, r + s, r + 2s, ... (phase r), so
# each phase (r, q) is a stride-1 convolution of the output gradient with that
# sub-kernel, and the phases interleave into the input gradient. For 16x35x35x288 ->
# 384, 3x3, stride 2 (Inception v3's Mixed_6a): 60 against 85 ms; for 16x147x147x64 ->
# 96 (Inception v4's Mixed_3a): 73 against 144 ms.


def _strided_input_grad(g: jax.Array, w: jax.Array, x_shape: tuple[int, ...],
                        strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
                        precision) -> jax.Array:
    n, _, _, c = x_shape
    size = [x_shape[1 + i] + sum(padding[i]) for i in (0, 1)]  # padded input
    rows_per_phase = [-(-size[i] // strides[i]) for i in (0, 1)]
    phases = []
    for r in range(strides[0]):
        row = []
        for q in range(strides[1]):
            sub = w[r::strides[0], q::strides[1]]
            # Positions r, r + s, ... of the padded input that exist; the rest stay zero.
            m = (-(-(size[0] - r) // strides[0]), -(-(size[1] - q) // strides[1]))
            if sub.shape[0] == 0 or sub.shape[1] == 0:
                d = jnp.zeros((n, *m, c), g.dtype)
            else:
                d = jax.lax.conv_general_dilated(
                    g, jnp.swapaxes(jnp.flip(sub, (0, 1)), 2, 3), (1, 1),
                    ((sub.shape[0] - 1, m[0] - g.shape[1]), (sub.shape[1] - 1, m[1] - g.shape[2])),
                    dimension_numbers=NHWC, precision=precision)
            row.append(jnp.pad(d, ((0, 0), (0, rows_per_phase[0] - m[0]),
                                   (0, rows_per_phase[1] - m[1]), (0, 0))))
        phases.append(jnp.stack(row, 3))  # [n, m0, m1, s1, c]
    full = jnp.stack(phases, 2).reshape(n, rows_per_phase[0] * strides[0],
                                        rows_per_phase[1] * strides[1], c)
    (top, _), (left, _) = padding
    return full[:, top:top + x_shape[1], left:left + x_shape[2]]


def _conv_strided_plain(x, w, strides, padding, precision):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC,
                                        precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_strided(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                  padding: tuple[tuple[int, int], ...], precision) -> jax.Array:
    return _conv_strided_plain(x, w, strides, padding, precision)


def _conv_strided_fwd(x, w, strides, padding, precision):
    return _conv_strided(x, w, strides, padding, precision), (x, w)


def _conv_strided_bwd(strides, padding, precision, res, g):
    x, w = res
    dx = _strided_input_grad(g, w, x.shape, strides, padding, precision)
    # The kernel gradient is JAX's own (a window-dilated convolution).
    dw, = jax.vjp(lambda w: _conv_strided_plain(x, w, strides, padding, precision), w)[1](g)
    return dx.astype(x.dtype), dw


_conv_strided.defvjp(_conv_strided_fwd, _conv_strided_bwd)


def conv_nhwc(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, batch_group_count=1,
              precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated` for `nn.Conv`, with canonical gradients (see above).

    With `cpu_kernels()`, undilated, ungrouped 2-D NHWC / HWIO convolutions run
    through oneDNN when `native_kernels()` (float32), else take a custom
    gradient: stride 1 the canonical one, larger strides the input gradient by
    phases; anything else, and everything off the CPU, goes to
    `lax.conv_general_dilated` unchanged.
    """
    args = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                batch_group_count=batch_group_count, precision=precision,
                preferred_element_type=preferred_element_type)
    simple = (
        cpu_kernels() and lhs.ndim == 4 and len(window_strides) == 2
        and all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
        and feature_group_count == 1 and batch_group_count == 1
        and preferred_element_type is None
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))
    if not simple:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **args)
    strides = tuple(int(v) for v in window_strides)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    # Under shard_map the kernel is replicated and the images vary per device.
    rhs = onednn.varying_like(rhs, lhs)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if onednn.supports(lhs, rhs, padding) and native_kernels():
        return onednn.conv(lhs, rhs, strides, padding)
    if strides == (1, 1):
        return _conv_s1(lhs, rhs, padding, precision)
    return _conv_strided(lhs, rhs, strides, padding, precision)


class _Kernel(nn.Module):
    """A convolution kernel `[kh, kw, in, out]`, its input width known at the first call.

    It sits where `nn.Conv` would (`<layer>/conv/kernel`, the same initialisation), so
    that `ConvBN` can hand its kernel to a merged convolution (`Common.branches`).
    """

    kernel_size: tuple[int, int]
    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> jax.Array:
        return self.param("kernel", conv_init, (*self.kernel_size, in_features, self.features),
                          self.param_dtype)


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` with an optional ReLU after it (`relu=True`): the same variables
    (`scale`, `bias`; `mean`, `var` in `batch_stats`) and the same results.

    In training, float32 inputs with the channels last go through the native kernels of
    `inception_flax.batch_norm` when `native_kernels()`, the ReLU fused in; anything
    else is `nn.BatchNorm`'s computation, then `nn.relu`.
    """

    def native(self, x: jax.Array, use_running_average: bool) -> bool:
        return (not use_running_average and not self.is_initializing()
                and self.axis in (-1, x.ndim - 1) and self.axis_index_groups is None
                and batch_norm.supports(x) and jnp.dtype(self.dtype or x.dtype) == x.dtype
                and native_kernels())

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None,
                 relu: bool = False):
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        if mask is not None or not self.native(x, use_running_average):
            y = super().__call__(x, use_running_average, mask=mask)
            return nn.relu(y) if relu else y
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                                features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                               features)
        scale = (self.param("scale", self.scale_init, features, self.param_dtype)
                 if self.use_scale else jnp.ones(features, jnp.float32))
        bias = (self.param("bias", self.bias_init, features, self.param_dtype)
                if self.use_bias else jnp.zeros(features, jnp.float32))
        scale, bias = (onednn.varying_like(jnp.asarray(v, jnp.float32), x)
                       for v in (scale, bias))
        out, mean, var = batch_norm.train(x, scale, bias, self.epsilon, relu, self.axis_name)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return out


class ConvBN(nn.Module):
    """Bias-free convolution, BatchNorm and (optionally) ReLU.

    Parameters live in `conv/kernel`, `bn/scale`, `bn/bias`; running statistics in
    the `batch_stats` collection under `bn/mean` and `bn/var`. `kernel` and
    `normalize` are the two halves of `__call__`, for `Common.branches`.

    `bn_remat`: in training, keep only the convolution's output and the batch
    statistics for the backward pass, and recompute the normalisation and ReLU there
    (elementwise work) instead of storing their float32 intermediates and the ReLU mask.
    The native CPU BatchNorm (`BatchNorm.native`) keeps only those already: there it
    changes nothing.
    """

    features: int
    kernel_size: int | Sequence[int] = 1
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    activation: bool = True
    bn_momentum: float = 0.9997
    bn_epsilon: float = 1e-3
    bn_scale: bool = True
    axis_name: str | None = None
    bn_remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.conv = _Kernel(pair(self.kernel_size), self.features, self.param_dtype)
        # The axis is read only when batch statistics are computed (training).
        self.bn = BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                            use_scale=self.bn_scale, axis_name=self.axis_name,
                            dtype=self.dtype, param_dtype=self.param_dtype)

    @property
    def pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded convolution: a matrix product over the channels."""
        unpadded = (self.padding in ("SAME", "VALID")
                    or all(tuple(p) == (0, 0) for p in self.padding))
        return pair(self.kernel_size) == (1, 1) and pair(self.strides) == (1, 1) and unpadded

    def kernel(self, in_features: int) -> jax.Array:
        """The kernel, in the compute dtype."""
        return jnp.asarray(self.conv(in_features), self.dtype)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        y = conv_nhwc(x, self.kernel(x.shape[-1]), pair(self.strides), self.padding,
                      dimension_numbers=NHWC)
        return self.normalize(y, train)

    def normalize(self, y: jax.Array, train: bool) -> jax.Array:
        """BatchNorm and activation of this layer's convolution output `y`."""
        activation = self.activation

        def bn_act(bn, y):
            return bn(y, use_running_average=not train, relu=activation)
        # The native BatchNorm keeps only `y` and per-channel vectors already.
        if train and self.bn_remat and not self.bn.native(y, False):
            return nn.remat(bn_act, policy=_keep_statistics)(self.bn, y)
        return bn_act(self.bn, y)


def _keep_statistics(prim, *args, **params) -> bool:
    """`bn_remat`'s policy: keep the batch statistics (sums, and their cross-device
    sums), recompute the elementwise normalisation and ReLU from the convolution's output."""
    del args, params
    return prim.name == "reduce_sum" or prim.name.startswith("psum")


@dataclasses.dataclass(frozen=True)
class Common:
    """The knobs every family shares; `conv`, `dense` and `depth` derive from them."""

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

    def depth(self, d: int) -> int:
        """TF-slim's width rule: scale by the depth multiplier, never below min_depth."""
        if self.depth_multiplier == 1.0:
            return d
        return max(int(d * self.depth_multiplier), self.min_depth)

    @property
    def conv(self) -> Callable[..., ConvBN]:
        return functools.partial(
            ConvBN,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            bn_scale=self.bn_scale,
            axis_name=self.axis_name,
            bn_remat=self.bn_remat,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

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
            y = firsts[id(tower[0])] if tower and id(tower[0]) in firsts else x
            for layer in tower[1:] if tower and id(tower[0]) in firsts else tower:
                y = layer(y, train)
            outs.append(y)
        return outs

    def branches(self, x: jax.Array, train: bool, *convs: ConvBN) -> list[jax.Array]:
        """Deprecated: the first layers of `towers` (kept until every family uses them)."""
        merged = merged_pointwise(self, x, train, convs)
        return [merged[id(c)] if id(c) in merged else c(x, train) for c in convs]

    def max_pool(self, k: int, s: int, padding: Padding = "VALID") -> Layer:
        """A k x k max pool at stride s, as a layer."""
        return Pool(functools.partial(max_pool, k=k, s=s, padding=padding))

    def max_pool_ceil(self, k: int, s: int, pad: int = 0) -> Layer:
        """A max pool with ceil-mode output size (GoogLeNet / BN-Inception), as a layer."""
        return Pool(functools.partial(max_pool_ceil, k=k, s=s, pad=pad))

    def avg_pool(self, k: int, s: int = 1, padding: Padding = "SAME",
                 count_include_pad: bool = False) -> Layer:
        """A k x k average pool at stride s, as a layer (see `avg_pool`)."""
        return Pool(functools.partial(avg_pool, k=k, s=s, padding=padding,
                                      count_include_pad=count_include_pad))

    @property
    def dense(self) -> Callable[..., nn.Dense]:
        return functools.partial(
            nn.Dense, kernel_init=dense_init, dtype=self.dtype, param_dtype=self.param_dtype
        )

    @property
    def bias_conv(self) -> Callable[..., nn.Conv]:
        """Convolution with bias and no BN (Inception-ResNet residual projections)."""
        return functools.partial(
            nn.Conv, use_bias=True, kernel_init=conv_init, dtype=self.dtype,
            param_dtype=self.param_dtype, conv_general_dilated=conv_nhwc,
        )


Layer = Callable[..., jax.Array]  # called as layer(x, train)


@dataclasses.dataclass(frozen=True)
class Pool:
    """A pooling function as a layer: `Pool(fn)(x, train) == fn(x)`."""

    fn: Callable[[jax.Array], jax.Array]

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        return self.fn(x)


def fork(*layers: Layer) -> Layer:
    """Layers that each read the same input, their outputs concatenated (the parallel
    1x3 / 3x1 outputs of the expanded filter banks, Rethinking Fig. 7)."""
    def layer(x: jax.Array, train: bool) -> jax.Array:
        return concat([f(x, train) for f in layers])
    return layer


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
    y = conv_nhwc(x, jnp.concatenate(kernels, axis=-1), (1, 1), "VALID",
                  dimension_numbers=NHWC)
    parts = jnp.split(y, np.cumsum([k.shape[-1] for k in kernels])[:-1].tolist(), axis=-1)
    return {id(c): c.normalize(part, train) for c, part in zip(merge, parts)}


class InceptionNet(nn.Module):
    """Base for every network: input checks, shared knobs and the classifier top.

    Subclasses define `features(x, train) -> x` (everything up to the global pool)
    and may `sow` auxiliary logits through `aux_head`.
    """

    num_classes: int = 1000
    aux_logits: bool = False
    dropout_rate: float = 0.2
    depth_multiplier: float = 1.0
    min_depth: int = 16
    bn_momentum: float = 0.9997
    bn_epsilon: float = 1e-3
    bn_scale: bool = True
    axis_name: str | None = None
    remat: bool = False
    bn_remat: bool = False
    merge_pointwise: bool = True
    scan_unroll: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    min_image_size: ClassVar[int] = 75
    has_aux: ClassVar[bool] = True

    @property
    def common(self) -> Common:
        return Common(
            depth_multiplier=self.depth_multiplier,
            min_depth=self.min_depth,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            bn_scale=self.bn_scale,
            axis_name=self.axis_name,
            bn_remat=self.bn_remat,
            merge_pointwise=self.merge_pointwise,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def check_image_size(self, height: int, width: int) -> None:
        if min(height, width) < self.min_image_size:
            raise ValueError(
                f"{type(self).__name__} needs images of at least "
                f"{self.min_image_size}x{self.min_image_size}, got {height}x{width}: "
                f"raise image_size to {self.min_image_size} or more."
            )

    def wants_aux(self, train: bool) -> bool:
        """Aux heads run in training, and at init so their parameters exist."""
        return self.aux_logits and (train or self.is_initializing())

    def repeated(self, block: type[nn.Module], length: int, name: str, **kwargs) -> nn.Module:
        """`length` copies of `block` under `stack`, with this network's remat / unroll."""
        return stack(block, length, self.remat, self.scan_unroll, common=self.common,
                     name=name, **kwargs)

    def sow_aux(self, logits: jax.Array) -> None:
        """Auxiliary logits go to `intermediates/aux_logits` (a tuple, one per head)."""
        self.sow("intermediates", "aux_logits", jnp.asarray(logits, jnp.float32))

    def classifier(self, x: jax.Array, train: bool) -> jax.Array:
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = self.common.dense(self.num_classes, name="Logits")(x)
        return jnp.asarray(x, jnp.float32)

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        raise NotImplementedError

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Logits for NHWC images in [-1, 1]; aux logits are sown in training."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected NHWC images with 3 channels, got shape {tuple(images.shape)}"
            )
        self.check_image_size(images.shape[1], images.shape[2])
        if self.aux_logits and not self.has_aux:
            raise ValueError(f"{type(self).__name__} has no auxiliary head: set aux_logits=False")
        x = self.features(jnp.asarray(images, self.dtype), train)
        return self.classifier(x, train)


# ----------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------
#
# JAX differentiates a max pool through `select_and_scatter`, which XLA:CPU expands
# into an index map (an iota the size of the input) and a scatter: about 0.6 s of a
# 4.8 s Inception v3 train step at 299 px, batch 16. `_max_pool` instead routes the
# gradient with one strided slice and one interior-padded add per window tap, all
# elementwise. Ties go to the first maximum in row-major window order, as with
# `select_and_scatter`.


def _pool_pads(x: jax.Array, k: int, s: int, padding: Padding) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(jax.lax.padtype_to_pads(x.shape[1:3], (k, k), (s, s), padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _taps(xp: jax.Array, k: int, s: int, out: tuple[int, int]):
    """(row, col, strided view) for each tap of a k x k window, stride s, over padded xp."""
    for a in range(k):
        for b in range(k):
            yield a, b, jax.lax.slice(
                xp, (0, a, b, 0),
                (xp.shape[0], a + s * (out[0] - 1) + 1, b + s * (out[1] - 1) + 1, xp.shape[3]),
                (1, s, s, 1))


def _pad_for_max(x: jax.Array, pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """x padded with -inf on its spatial sides (no copy when there is no padding)."""
    if not any(lo or hi for lo, hi in pads):
        return x
    return jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jax.Array, k: int, s: int, pads: tuple[tuple[int, int], ...]) -> jax.Array:
    # The maximum of the k*k strided views: one elementwise loop, 2.4x faster on XLA:CPU
    # than its `reduce_window` (16x147x147x64, 3x3, stride 2: 5.6 against 13.2 ms).
    xp = _pad_for_max(x, pads)
    out = tuple((xp.shape[i] - k) // s + 1 for i in (1, 2))
    return functools.reduce(jnp.maximum, (view for _, _, view in _taps(xp, k, s, out)))


def _max_pool_fwd(x, k, s, pads):
    y = _max_pool(x, k, s, pads)
    return y, (x, y)


def _max_pool_bwd(k, s, pads, res, g):
    x, y = res
    xp = _pad_for_max(x, pads)
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, g.dtype)
    zero = jnp.zeros((), g.dtype)
    for a, b, view in _taps(xp, k, s, y.shape[1:3]):
        hit = (view == y) & ~taken
        taken = taken | hit
        # Put this tap's share back at its input positions: stride s via interior padding.
        hi = (xp.shape[1] - a - s * (y.shape[1] - 1) - 1, xp.shape[2] - b - s * (y.shape[2] - 1) - 1)
        dxp = dxp + jax.lax.pad(jnp.where(hit, g, zero), zero,
                                ((0, 0, 0), (a, hi[0], s - 1), (b, hi[1], s - 1), (0, 0, 0)))
    (top, bottom), (left, right) = pads
    return (dxp[:, top:xp.shape[1] - bottom, left:xp.shape[2] - right],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, k: int, s: int, padding: Padding = "VALID") -> jax.Array:
    """k x k max pool, stride s, on NHWC maps (padding: "VALID", "SAME" or explicit pairs).

    On the CPU: through the native kernels (`inception_flax.max_pool`) where they run
    (`native_kernels()`, float32), else `_max_pool`."""
    pads = _pool_pads(x, k, s, padding)
    if not cpu_kernels():
        return nn.max_pool(x, (k, k), (s, s), padding=pads)
    if native_kernels() and max_pool_lib.supports(x, k, pads):
        return max_pool_lib.max_pool(x, k, s, pads)
    return _max_pool(x, k, s, pads)


def _window_sum(x, k: int, s: int, out: Sequence[int]):
    """Sum over each k x k window, stride s, `out` windows per side: k strided row views
    summed, then k strided column views of that (a jax or numpy array)."""
    rows = sum(x[:, a:a + s * (out[0] - 1) + 1:s] for a in range(k))
    return sum(rows[:, :, b:b + s * (out[1] - 1) + 1:s] for b in range(k))


def _box_sum(x: jax.Array, k: int, xnp=jnp) -> jax.Array:
    """Sum over each k x k window, zero padding k // 2 on every side (k odd): separable.

    `xnp` is jax.numpy, or numpy for constants known when tracing.
    """
    h = k // 2
    return _window_sum(xnp.pad(x, ((0, 0), (h, h), (h, h), (0, 0))), k, 1, x.shape[1:3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _same_avg_pool(x: jax.Array, k: int, include_pad: bool) -> jax.Array:
    return _box_sum(x, k) * _inverse_counts(x, k, include_pad)


def _inverse_counts(x: jax.Array, k: int, include_pad: bool) -> jax.Array:
    """1 / (number of averaged values) at each output position, a constant."""
    if include_pad:
        return jnp.asarray(1.0 / (k * k), x.dtype)
    counts = _box_sum(np.ones((1, *x.shape[1:3], 1), np.float32), k, np)
    return jnp.asarray(1.0 / counts, x.dtype)


def _same_avg_pool_fwd(x, k, include_pad):
    return _same_avg_pool(x, k, include_pad), None


def _same_avg_pool_bwd(k, include_pad, _, g):
    # The zero-padded box sum is its own adjoint (symmetric window, symmetric padding),
    # so the gradient is the forward computation applied to g / counts.
    return (_box_sum(g * _inverse_counts(g, k, include_pad), k),)


_same_avg_pool.defvjp(_same_avg_pool_fwd, _same_avg_pool_bwd)


def _valid_avg_pool(x: jax.Array, k: int, s: int) -> jax.Array:
    """k x k average pool, stride s, no padding, as a separable window sum. Its gradient
    (JAX's, through the strided slices) is 2k interior-padded adds instead of the
    reduce-window over the input that XLA:CPU runs for `nn.avg_pool`'s (10x slower on
    the auxiliary heads' 16x17x17x768 maps)."""
    out = [(x.shape[i] - k) // s + 1 for i in (1, 2)]
    return _window_sum(x, k, s, out) * jnp.asarray(1.0 / (k * k), x.dtype)


def avg_pool(x: jax.Array, k: int, s: int = 1, padding: Padding = "SAME",
             count_include_pad: bool = False) -> jax.Array:
    """Average pool; `count_include_pad=False` is TF's 'SAME' behaviour.

    With `cpu_kernels()`, the stride-1 "SAME" pools of the Inception blocks are
    separable sums of shifted views times a constant map of window sizes, forward and
    backward, and "VALID" pools separable sums of strided views (no reduce-window,
    whose XLA:CPU loops are several times slower).
    """
    if cpu_kernels():
        if padding == "SAME" and s == 1 and k % 2 == 1:
            return _same_avg_pool(x, k, count_include_pad)
        if padding == "VALID":
            return _valid_avg_pool(x, k, s)
    if padding == "SAME" and s == 1:
        padding = ((k // 2, k // 2), (k // 2, k // 2))
    return nn.avg_pool(x, (k, k), (s, s), padding=padding, count_include_pad=count_include_pad)


def ceil_pool_padding(size: int, k: int, s: int, pad: int) -> tuple[int, int]:
    """Padding that reproduces PyTorch/Caffe `ceil_mode=True` pooling."""
    out = math.ceil((size + 2 * pad - k) / s) + 1
    if (out - 1) * s >= size + pad:  # the last window must start inside the input
        out -= 1
    extra = max((out - 1) * s + k - (size + 2 * pad), 0)
    return pad, pad + extra


def max_pool_ceil(x: jax.Array, k: int, s: int, pad: int = 0) -> jax.Array:
    """Max pool with ceil-mode output size (GoogLeNet / BN-Inception ports)."""
    padding = (ceil_pool_padding(x.shape[1], k, s, pad), ceil_pool_padding(x.shape[2], k, s, pad))
    return max_pool(x, k, s, padding)


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
    """PyTorch's adaptive average pooling to `out` x `out` (windows may overlap)."""
    def bounds(size: int) -> list[tuple[int, int]]:
        return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]

    rows = [jnp.mean(x[:, a:b], axis=1, keepdims=True) for a, b in bounds(x.shape[1])]
    x = jnp.concatenate(rows, axis=1)
    cols = [jnp.mean(x[:, :, a:b], axis=2, keepdims=True) for a, b in bounds(x.shape[2])]
    return jnp.concatenate(cols, axis=2)


class AuxHead(nn.Module):
    """The auxiliary classifier of Inception v3 / v4 / Inception-ResNet.

    avg-pool 5x5 stride 3 -> 1x1 conv 128 -> 5x5 conv 768 -> global pool -> FC.
    Feature maps smaller than 17x17 (small training images) are pooled adaptively
    to 5x5 instead, so the 5x5 conv always sees a 5x5 map. `bn_in_head=False`
    gives the Rethinking paper's Inception-v2 head: the 5x5 conv has a bias and no BN.
    """

    common: Common
    num_classes: int
    bn_in_head: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        if min(x.shape[1], x.shape[2]) >= 17:
            x = avg_pool(x, 5, 3, padding="VALID")
        else:
            x = adaptive_avg_pool(x, 5)
        x = c.conv(c.depth(128), 1, name="Conv2d_1a_1x1")(x, train)
        if self.bn_in_head:
            x = c.conv(c.depth(768), 5, padding="VALID", name="Conv2d_2a_5x5")(x, train)
        else:
            x = c.bias_conv(c.depth(768), (5, 5), padding="VALID", name="Conv2d_2a_5x5")(x)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return c.dense(self.num_classes, name="Logits")(x)


def stack(block: type[nn.Module], length: int, remat: bool = False, unroll: int = 1,
          **kwargs) -> nn.Module:
    """`length` copies of a block under `nn.scan`.

    Parameters and BN statistics gain a leading axis of size `length`. The block's
    `__call__(x, train)` returns `(x, None)`. `unroll` copies run per loop
    iteration: 1 compiles one body (fastest compile); `length` or more unrolls the
    loop completely (fastest run on CPU). The parameter layout is the same.
    """
    if remat:
        block = nn.remat(block, static_argnums=(2,))
    scanned = nn.scan(
        block,
        variable_axes={"params": 0, "batch_stats": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=length,
        unroll=min(max(unroll, 1), length),
    )
    return scanned(**kwargs)


def stem_3x3(common: Common, x: jax.Array, train: bool) -> jax.Array:
    """3x3/2 V -> 3x3 V -> 3x3 (299 -> 147x147x64): how v3, v4 and the Inception-ResNets open.

    Called inside a module's compact method, so the convolutions belong to that module.
    """
    conv, d = common.conv, common.depth
    x = conv(d(32), 3, strides=2, padding="VALID", name="Conv2d_1a_3x3")(x, train)
    x = conv(d(32), 3, padding="VALID", name="Conv2d_2a_3x3")(x, train)
    return conv(d(64), 3, name="Conv2d_2b_3x3")(x, train)


def stem_pool_1x1_3x3(common: Common, x: jax.Array, train: bool) -> jax.Array:
    """max-pool/2 -> 1x1 80 V -> 3x3 192 V (147x147x64 -> 71x71x192), after `stem_3x3`."""
    conv, d = common.conv, common.depth
    x = max_pool(x, 3, 2)
    x = conv(d(80), 1, padding="VALID", name="Conv2d_3b_1x1")(x, train)
    return conv(d(192), 3, padding="VALID", name="Conv2d_4a_3x3")(x, train)


def concat(branches: Sequence[jax.Array]) -> jax.Array:
    return jnp.concatenate(branches, axis=-1)
