"""Training BatchNorm with an optional ReLU on the CPU, through native kernels.

Written with `nn.BatchNorm` and `nn.relu`, a training step's BatchNorm costs XLA:CPU
about a dozen passes over each activation: the two sums of the statistics apart, the
centred input kept for the backward pass, the ReLU's mask, and four more sums and
products backward. `train` does the same computation in four passes, each through
one of the handlers of `native/batch_norm.cc` (built and loaded with the others, see
`cpu.native`):

- forward: the per-channel sums of `y` and `y^2` (one read), then
  `out = relu(y * a + b)` with `a = scale / sqrt(var + eps)` and `b = bias - mean * a`
  (one read, one write);
- backward: the sums of `gz` and `gz * (y - mean)`, where `gz` is the output gradient
  where the ReLU passed (two reads), then the input gradient (two reads, one write).

Only `y` and per-channel vectors are kept for the backward pass. Timed alone
(forward and backward, batch 16, this 2-core machine, ad hoc), a 16x35x35x288
BatchNorm + ReLU took 15 ms against 38 ms through `nn.BatchNorm`.

The statistics are Flax's: the batch mean and the biased variance `E[y^2] - E[y]^2`,
across the devices of `axis_name` when it is given (synchronised BatchNorm).
`batch_norm` fills `Ops.batch_norm` in `cpu.native_ops()`; it hands what the kernels
do not take (not float32, or a compute dtype other than the input's) to Flax's maths.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from inception_flax.cpu import forms, native
from inception_flax.models import ops as plain


def supports(x: jax.Array, dtype=None) -> bool:
    """Whether `train` takes `x` (channels last) computed in `dtype`: float32 both."""
    return x.dtype == np.float32 and x.ndim >= 2 and jnp.dtype(dtype or x.dtype) == x.dtype


def _call(name: str, like: jax.Array, shape: tuple[int, ...], *args, **attrs) -> jax.Array:
    (out,) = native.call(native.BATCH_NORM.format(name), like, [(shape, jnp.float32)], *args,
                         threads=native.team_threads(like.size), **attrs)
    return out


def _total(y: jax.Array, sums: jax.Array, axis_name: str | None):
    """The sums over every device of `axis_name`, and the number of rows they cover."""
    rows = y.size // y.shape[-1]
    if axis_name is None:
        return sums, rows
    return lax.psum(sums, axis_name), rows * lax.psum(1, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def train(y: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, relu: bool,
          axis_name: str | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(relu(bn(y)), batch mean, batch variance)` of float32 `y` with the channels last.

    Under shard_map, `scale` and `bias` must vary over the manual axes `y` varies over
    (`lax.pcast(..., to="varying")`, as the train step does for all parameters)."""
    return _train_fwd(y, scale, bias, epsilon, relu, axis_name)[0]


def _train_fwd(y, scale, bias, epsilon, relu, axis_name):
    c = y.shape[-1]
    sums, n = _total(y, _call("stats", y, (2, c), y), axis_name)
    mean = sums[0] / n
    var = jnp.maximum(sums[1] / n - mean * mean, 0.0)
    inv = lax.rsqrt(var + epsilon)
    a = scale * inv
    b = bias - mean * a
    out = _call("apply", y, y.shape, y, a, b, relu=relu)
    return (out, mean, var), (y, mean, inv, a, b)


def _train_bwd(epsilon, relu, axis_name, res, cotangents):
    del epsilon
    y, mean, inv, a, b = res
    g, g_mean, g_var = cotangents
    local = _call("grad_stats", y, (2, y.shape[-1]), g, y, a, b, mean, relu=relu)
    sums, n = _total(y, local, axis_name)
    # d(out)/dy through the batch statistics: gz * a - a/n * (sum gz + (y - mean) * inv^2 *
    # sum gz (y - mean)), written as gz * a + y * k1 + k0; plus the mean's and the
    # variance's own cotangents (zero when only the running averages use them). With
    # `axis_name` the sums are every device's; the parameters' gradients are this
    # device's share, as autodiff through `nn.BatchNorm` gives them.
    k1 = -a * inv * inv * sums[1] / n + 2.0 * g_var / n
    k0 = -a * sums[0] / n - mean * k1 + g_mean / n
    dy = _call("input_grad", y, y.shape, g, y, a, b, k1, k0, relu=relu)
    return dy, local[1] * inv, local[0]


train.defvjp(_train_fwd, _train_bwd)


def batch_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, *,
               epsilon: float, axis_name: str | None = None, relu: bool = False,
               dtype=None, remat: bool = False):
    """`Ops.batch_norm`: `train` where `supports`, else Flax's maths. `remat` changes
    nothing here: `train` keeps only `x` and per-channel vectors already."""
    if not supports(x, dtype):
        return plain.batch_norm(x, scale, bias, epsilon=epsilon, axis_name=axis_name, relu=relu,
                                dtype=dtype, remat=remat)
    features = x.shape[-1:]
    scale = jnp.ones(features, jnp.float32) if scale is None else scale
    bias = jnp.zeros(features, jnp.float32) if bias is None else bias
    scale, bias = (forms.varying_like(jnp.asarray(v, jnp.float32), x) for v in (scale, bias))
    return train(x, scale, bias, epsilon, relu, axis_name)
