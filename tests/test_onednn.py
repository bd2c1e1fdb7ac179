"""oneDNN convolutions (inception_flax/onednn.py) run correctly when XLA runs them at once."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from inception_flax import onednn, trainer
from inception_flax.models import layers


def test_the_same_convolution_on_two_devices_at_once(monkeypatch):
    """The two CPU devices of the test session run one convolution (one oneDNN primitive)
    at the same time, with two OpenMP threads each. With oneDNN's shared scratchpad,
    half of the kernel gradient came out wrong here, and whole train steps hung."""
    monkeypatch.setenv("INCEPTION_FLAX_KERNELS", "onednn")
    monkeypatch.setenv("OMP_NUM_THREADS", str(2 * jax.local_device_count()))
    assert jax.local_device_count() >= 2 and onednn.threads() == 2
    mesh = trainer.create_mesh()
    x = jax.random.normal(jax.random.key(0), (2 * jax.device_count(), 35, 35, 64))
    w = jax.random.normal(jax.random.key(1), (3, 3, 64, 96))

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (1, 1), "SAME",
                                                  dimension_numbers=layers.NHWC)))

    @jax.jit
    def grads(x, w):  # each device: its examples' forward, input and kernel gradients
        return jax.shard_map(jax.grad(loss(layers.conv_nhwc), (0, 1)), mesh=mesh,
                             in_specs=(P(trainer.AXIS), P()),
                             out_specs=(P(trainer.AXIS), P()))(x, w)
    assert "inception_flax_conv_kernel_grad" in grads.lower(x, w).as_text()
    ref_dx, ref_dw = jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
    x = jax.device_put(x, NamedSharding(mesh, P(trainer.AXIS)))
    for _ in range(10):
        dx, dw = grads(x, w)
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-2)  # |dw| ~ 100
