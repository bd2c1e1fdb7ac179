"""Convolutions through oneDNN (`native/onednn_conv.cc`), with both gradients.

`conv` fills `Ops.conv` in `cpu.native_ops()`: float32 operands with non-negative
padding go to oneDNN's forward, input-gradient and kernel-gradient primitives (why:
see `cpu.native`); anything else takes the XLA:CPU form (`cpu.forms.conv`).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from inception_flax.cpu import forms, native
from inception_flax.models.ops import Pads

FORWARD, INPUT_GRAD, KERNEL_GRAD = (native.CONV.format(k)
                                    for k in ("forward", "input_grad", "kernel_grad"))


def supports(x: jax.Array, w: jax.Array, padding: Pads) -> bool:
    """Whether `native_conv` takes these operands (float32, non-negative padding)."""
    return (x.dtype == np.float32 and w.dtype == np.float32 and x.ndim == 4 and w.ndim == 4
            and all(lo >= 0 and hi >= 0 for lo, hi in padding))


def output_shape(x_shape, w_shape, strides, padding) -> tuple[int, int, int, int]:
    spatial = [(x_shape[1 + i] + sum(padding[i]) - w_shape[i]) // strides[i] + 1 for i in (0, 1)]
    return (x_shape[0], *spatial, w_shape[3])


def _call(target: str, like: jax.Array, shape, *args, strides, padding) -> jax.Array:
    (pt, pb), (pl, pr) = padding
    (out,) = native.call(target, like, [(shape, like.dtype)], *args, sh=strides[0],
                         sw=strides[1], pt=pt, pb=pb, pl=pl, pr=pr, threads=native.threads())
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def native_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Pads
                ) -> jax.Array:
    """`lax.conv_general_dilated(x, w, strides, padding)` for float32 NHWC / HWIO,
    undilated, ungrouped, with non-negative padding, through oneDNN."""
    return _call(FORWARD, x, output_shape(x.shape, w.shape, strides, padding), x, w,
                 strides=strides, padding=padding)


def _native_conv_fwd(x, w, strides, padding):
    return native_conv(x, w, strides, padding), (x, w)


def _native_conv_bwd(strides, padding, res, g):
    x, w = res
    dx = _call(INPUT_GRAD, x, x.shape, g, w, strides=strides, padding=padding)
    dw = _call(KERNEL_GRAD, w, w.shape, x, g, strides=strides, padding=padding)
    return dx, dw


native_conv.defvjp(_native_conv_fwd, _native_conv_bwd)


def conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Pads) -> jax.Array:
    """`Ops.conv`: through oneDNN where `supports`, else the XLA:CPU form."""
    strides = tuple(int(v) for v in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if not supports(x, w, padding):
        return forms.conv(x, w, strides, padding)
    return native_conv(x, forms.varying_like(w, x), strides, padding)
