"""The native training BatchNorm (inception_flax/batch_norm.py) is Flax's BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from inception_flax import batch_norm, onednn, trainer
from inception_flax.models import layers


def _batch_norm_step(module, variables, x, probe, kernels, axis_name=None):
    """(loss, running statistics), gradients for params and x, and the traced jaxpr."""
    def loss(params, x):
        with layers.kernels(kernels):
            y, new = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, use_running_average=False, relu=module.name == "relu",
                                  mutable=["batch_stats"])
        value = jnp.sum(y * probe)
        return (jax.lax.psum(value, axis_name) if axis_name else value), new["batch_stats"]
    fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return fn, str(jax.make_jaxpr(fn)(variables["params"], x))


def _close(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("relu,use_scale,team", [(True, True, True), (False, True, True),
                                                   (True, False, False)])
def test_native_batch_norm_is_flax_batch_norm(relu, use_scale, team, monkeypatch):
    """Loss, gradients of scale, bias and input, and the running statistics agree with
    `nn.BatchNorm` (+ `nn.relu`); the native path is four FFI calls, float32 only.
    `team`: two OpenMP threads split the 715 rows (24 channels: not a whole number of
    vector registers), else one."""
    if team:
        monkeypatch.setattr(batch_norm, "TEAM_ELEMENTS", 0)
        monkeypatch.setenv("OMP_NUM_THREADS", str(2 * jax.local_device_count()))
        assert onednn.threads() == 2
    module = layers.BatchNorm(momentum=0.9, epsilon=1e-3, use_scale=use_scale,
                              name="relu" if relu else "plain")
    gen = np.random.default_rng(0)
    x = jnp.asarray(3 * gen.standard_normal((5, 13, 11, 24)) + 1, jnp.float32)
    probe = jnp.asarray(gen.standard_normal(x.shape), jnp.float32)
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    variables = jax.tree.map(  # away from the initial values
        lambda v: v + jnp.asarray(0.3 * gen.standard_normal(v.shape), v.dtype), variables)
    got, jaxpr = _batch_norm_step(module, variables, x, probe, "onednn")
    want, ref_jaxpr = _batch_norm_step(module, variables, x, probe, "cpu")
    assert [jaxpr.count(f"inception_flax_bn_{k}") for k in
            ("stats", "apply", "grad_stats", "input_grad")] == [1, 1, 1, 1]
    assert "inception_flax_bn_" not in ref_jaxpr
    _close(got(variables["params"], x), want(variables["params"], x))
    _, bf16_jaxpr = _batch_norm_step(layers.BatchNorm(dtype=jnp.bfloat16, use_scale=use_scale,
                                                      name="relu"),
                                     variables, x.astype(jnp.bfloat16), probe, "onednn")
    assert "inception_flax_bn_" not in bf16_jaxpr


def test_native_batch_norm_synchronised_over_two_devices():
    """With `axis_name`, the statistics and the backward sums cover every device's
    examples (Flax's synchronised BatchNorm), under shard_map as in the train step."""
    assert jax.local_device_count() >= 2
    mesh = trainer.create_mesh()
    module = layers.BatchNorm(momentum=0.9, epsilon=1e-3, axis_name=trainer.AXIS, name="relu")
    gen = np.random.default_rng(1)
    x = jnp.asarray(2 * gen.standard_normal((2 * jax.device_count(), 7, 7, 24)) - 1, jnp.float32)
    probe = jnp.asarray(gen.standard_normal(x.shape), jnp.float32)
    variables = layers.BatchNorm(name="relu").init(jax.random.key(0), x,
                                                   use_running_average=False)

    def run(kernels):
        def per_device(params, x, probe):
            params = jax.lax.pcast(params, trainer.AXIS, to="varying")
            (_, stats), (g_params, g_x) = jax.value_and_grad(
                lambda p, x: _loss(p, x, probe), argnums=(0, 1), has_aux=True)(params, x)
            return stats, jax.lax.psum(g_params, trainer.AXIS), g_x

        def _loss(params, x, probe):
            with layers.kernels(kernels):
                y, new = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                      x, use_running_average=False, relu=True,
                                      mutable=["batch_stats"])
            return jnp.sum(y * probe), new["batch_stats"]
        step = jax.jit(jax.shard_map(per_device, mesh=mesh,
                                     in_specs=(P(), P(trainer.AXIS), P(trainer.AXIS)),
                                     out_specs=(P(), P(), P(trainer.AXIS))))
        sharded = NamedSharding(mesh, P(trainer.AXIS))
        args = (variables["params"], jax.device_put(x, sharded), jax.device_put(probe, sharded))
        return step(*args), step.lower(*args).as_text()

    got, text = run("onednn")
    want, ref_text = run("cpu")
    assert "inception_flax_bn_grad_stats" in text and "inception_flax_bn_" not in ref_text
    _close(got, want)
