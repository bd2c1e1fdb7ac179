"""The XLA:CPU forms of convolution and pooling: same values and gradients as `lax` /
Flax's, written so that XLA:CPU runs them with its fast kernels.

GPUs and TPUs have fast convolutions for every dimension order and fast window
reductions, and XLA lays them out itself: there the plain operations of
`inception_flax.models.ops` run. These forms are `cpu.xla_ops()`, and what
`cpu.native_ops()` falls back to for the operands its kernels do not take. Each
follows the contract of the `Ops` field it fills.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inception_flax.models import ops as plain
from inception_flax.models.ops import NHWC, Pads


def varying_like(x: jax.Array, like: jax.Array) -> jax.Array:
    """`x` made to vary over the manual (shard_map) axes `like` varies over (a replicated
    parameter beside per-device activations), as JAX does for its own operations, so that
    a custom VJP gives its gradient the parameter's type (the cast's transpose sums over
    the devices)."""
    extra = tuple(jax.typeof(like).manual_axis_type.varying
                  - jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, extra, to="varying") if extra else x


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
# crawled. `conv` computes the same gradients with canonical convolutions
# and explicit transposes (or with matrix products for 1x1 kernels).



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


def conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Pads) -> jax.Array:
    """`Ops.conv` with canonical gradients: stride 1 the canonical one, larger strides
    the input gradient by phases (see above)."""
    w = varying_like(w, x)  # under shard_map the kernel is replicated, the images vary
    strides = tuple(int(v) for v in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if strides == (1, 1):
        return _conv_s1(x, w, padding, None)
    return _conv_strided(x, w, strides, padding, None)


# ----------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------
#
# JAX differentiates a max pool through `select_and_scatter`, which XLA:CPU expands
# into an index map (an iota the size of the input) and a scatter: about 0.6 s of a
# 4.8 s Inception v3 train step at 299 px, batch 16. `max_pool` instead routes the
# gradient with one strided slice and one interior-padded add per window tap, all
# elementwise. Ties go to the first maximum in row-major window order, as with
# `select_and_scatter`.


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


def max_pool(x: jax.Array, k: int, s: int, padding: Pads) -> jax.Array:
    """`Ops.max_pool` without `select_and_scatter` (see above)."""
    return _max_pool(x, k, s, tuple((int(lo), int(hi)) for lo, hi in padding))


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


def avg_pool(x: jax.Array, k: int, s: int, padding: Pads, count_include_pad: bool
             ) -> jax.Array:
    """`Ops.avg_pool`: the stride-1 "SAME" pools of the Inception blocks (k odd, k // 2 on
    every side) are separable sums of shifted views times a constant map of window sizes,
    forward and backward, unpadded pools separable sums of strided views (no reduce-window,
    whose XLA:CPU loops are several times slower); other pools are Flax's."""
    h = k // 2
    if s == 1 and k % 2 == 1 and tuple(map(tuple, padding)) == ((h, h), (h, h)):
        return _same_avg_pool(x, k, count_include_pad)
    if all(lo == 0 and hi == 0 for lo, hi in padding):
        return _valid_avg_pool(x, k, s)
    return plain.avg_pool(x, k, s, padding, count_include_pad)
