"""`layers.BatchNorm` is Flax's BatchNorm, whichever operations train it: the plain
ones (Flax's maths, as GPUs and TPUs run them) and the native CPU kernels
(`inception_flax.cpu.batch_norm`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from inception_flax import kernels
from inception_flax.cpu import native
from inception_flax.models import layers
from inception_flax.models.ops import PLAIN

AXIS = "batch"


def _batch_norm_step(module, variables, x, probe, axis_name=None):
    """A function of (params, x): (loss, running statistics), gradients for params and x."""
    relu = isinstance(module, layers.BatchNorm) and module.name == "relu"

    def loss(params, x):
        kwargs = {"relu": True} if relu else {}
        y, new = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                              x, use_running_average=False, mutable=["batch_stats"], **kwargs)
        if isinstance(module, nn.BatchNorm) and module.name == "relu":
            y = nn.relu(y)
        value = jnp.sum(y.astype(jnp.float32) * probe)
        return (jax.lax.psum(value, axis_name) if axis_name else value), new["batch_stats"]
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def _close(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * max(1.0, np.abs(b).max()))


def _inputs(seed=0, shape=(5, 13, 11, 24)):
    gen = np.random.default_rng(seed)
    x = jnp.asarray(3 * gen.standard_normal(shape) + 1, jnp.float32)
    return gen, x, jnp.asarray(gen.standard_normal(shape), jnp.float32)


def _perturbed(variables, gen):
    """Variables away from their initial values."""
    return jax.tree.map(lambda v: v + jnp.asarray(0.3 * gen.standard_normal(v.shape), v.dtype),
                        variables)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype,use_scale", [(None, True), (jnp.bfloat16, False)])
def test_plain_batch_norm_is_flax_batch_norm_exactly(relu, dtype, use_scale):
    """With the plain operations: the same variables (names, shapes, initial values) as
    `nn.BatchNorm`, and bit for bit the same outputs, gradients and running statistics,
    in training and at inference."""
    name = "relu" if relu else "plain"
    kwargs = dict(momentum=0.9, epsilon=1e-3, use_scale=use_scale, dtype=dtype, name=name)
    ours, flax = layers.BatchNorm(ops=PLAIN, **kwargs), nn.BatchNorm(**kwargs)
    gen, x, probe = _inputs()
    x = x.astype(dtype or jnp.float32)
    variables = flax.init(jax.random.key(0), x, use_running_average=False)
    ours_init = ours.init(jax.random.key(0), x, use_running_average=False)
    assert jax.tree.structure(ours_init) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(ours_init), jax.tree.leaves(variables)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    variables = _perturbed(variables, gen)
    got, want = (_batch_norm_step(m, variables, x, probe)(variables["params"], x)
                 for m in (ours, flax))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    y = ours.apply(variables, x, use_running_average=True, relu=relu)
    want_y = flax.apply(variables, x, use_running_average=True)
    np.testing.assert_array_equal(y, nn.relu(want_y) if relu else want_y)


@pytest.mark.parametrize("relu,use_scale,team", [(True, True, True), (False, True, True),
                                                   (True, False, False)])
def test_native_batch_norm_is_flax_batch_norm(relu, use_scale, team, monkeypatch):
    """Loss, gradients of scale, bias and input, and the running statistics agree with
    `nn.BatchNorm` (+ `nn.relu`) (its four FFI calls: tests/test_hlo_properties.py).
    `team`: two OpenMP threads split the 715 rows (24 channels: not a whole number of
    vector registers), else one."""
    if team:
        monkeypatch.setattr(native, "TEAM_ELEMENTS", 0)
        monkeypatch.setenv("OMP_NUM_THREADS", str(2 * jax.local_device_count()))
        assert native.threads() == 2
    ops = kernels.resolve("native")
    kwargs = dict(momentum=0.9, epsilon=1e-3, use_scale=use_scale, name="relu" if relu else "plain")
    module = layers.BatchNorm(ops=ops, **kwargs)
    gen, x, probe = _inputs()
    variables = _perturbed(module.init(jax.random.key(0), x, use_running_average=False), gen)
    got = _batch_norm_step(module, variables, x, probe)
    want = _batch_norm_step(nn.BatchNorm(**kwargs), variables, x, probe)
    _close(got(variables["params"], x), want(variables["params"], x))


def test_native_batch_norm_synchronised_over_two_devices():
    """With `axis_name`, the statistics and the backward sums cover every device's
    examples (Flax's synchronised BatchNorm), under shard_map as in the train step."""
    assert jax.local_device_count() >= 2
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    gen = np.random.default_rng(1)
    x = jnp.asarray(2 * gen.standard_normal((2 * jax.device_count(), 7, 7, 24)) - 1, jnp.float32)
    probe = jnp.asarray(gen.standard_normal(x.shape), jnp.float32)
    variables = layers.BatchNorm(name="relu").init(jax.random.key(0), x,
                                                   use_running_average=False)

    def run(choice):
        module = layers.BatchNorm(momentum=0.9, epsilon=1e-3, axis_name=AXIS,
                                  ops=kernels.resolve(choice), name="relu")

        def per_device(params, x, probe):
            params = jax.lax.pcast(params, AXIS, to="varying")
            (_, stats), (g_params, g_x) = jax.value_and_grad(
                lambda p, x: _loss(p, x, probe), argnums=(0, 1), has_aux=True)(params, x)
            return stats, jax.lax.psum(g_params, AXIS), g_x

        def _loss(params, x, probe):
            y, new = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, use_running_average=False, relu=True,
                                  mutable=["batch_stats"])
            return jnp.sum(y * probe), new["batch_stats"]
        step = jax.jit(jax.shard_map(per_device, mesh=mesh,
                                     in_specs=(P(), P(AXIS), P(AXIS)),
                                     out_specs=(P(), P(), P(AXIS))))
        sharded = NamedSharding(mesh, P(AXIS))
        args = (variables["params"], jax.device_put(x, sharded), jax.device_put(probe, sharded))
        return step(*args)

    _close(run("native"), run("plain"))
