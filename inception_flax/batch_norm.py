"""BatchNorm with an optional ReLU, for training on the CPU through native kernels.

Written with `nn.BatchNorm` and `nn.relu`, a training step's BatchNorm costs XLA:CPU
about a dozen passes over each activation: the two sums of the statistics apart, the
centred input kept for the backward pass, the ReLU's mask, and four more sums and
products backward. `train` does the same computation in four passes, each through
one of the handlers of `native/batch_norm.cc` (built and loaded with the convolutions,
see `inception_flax.onednn`):

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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from inception_flax import onednn


def supports(x: jax.Array) -> bool:
    """Whether `train` takes `x`: float32 with the channels last."""
    return x.dtype == np.float32 and x.ndim >= 2


# Maps smaller than this run on one thread. XLA:CPU runs independent operations (the
# branches of a block) at the same time, and two teams of threads started at once
# oversubscribe the cores. In-process A/B of the train step (ad hoc, this 2-core
# machine), teams for every map / from 2^18 elements / from 2^20 / never: the
# quickstart's Inception-ResNet v2 (quarter width, 75 px, batch 32) took 191 / 178 /
# 169 / 172 ms, Inception v3 at 299 px, batch 16, 3,721 / 3,700 / 3,664 / 3,714 ms.
TEAM_ELEMENTS = 1 << 20


def team_threads(size: int) -> int:
    """OpenMP threads for an elementwise native kernel over `size` elements (also the
    max pools' of `inception_flax.max_pool`)."""
    return onednn.threads() if size >= TEAM_ELEMENTS else 1


def _call(name: str, like: jax.Array, shape: tuple[int, ...], *args, **attrs):
    # The result varies over the same manual (shard_map) axes as `like`.
    out = jax.typeof(like).update(shape=shape, dtype=jnp.float32, weak_type=False)
    threads = team_threads(like.size)
    return jax.ffi.ffi_call(onednn.BATCH_NORM.format(name), out)(
        *args, threads=np.int64(threads), **attrs)


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
    onednn.load()
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
