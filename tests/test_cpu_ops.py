"""The faster forms of the operations (`inception_flax.cpu`: the XLA:CPU forms and the
native kernels) compute what the plain ones do: values, gradients, whole layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inception_flax import kernels
from inception_flax.cpu import native
from inception_flax.models.layers import Common
from inception_flax.models.ops import NHWC, PLAIN, Ops, explicit_padding


@pytest.mark.parametrize("choice", ["xla_cpu", "native"])
@pytest.mark.parametrize("kernel,padding", [
    ((1, 1), "SAME"), ((3, 3), "SAME"), ((1, 7), "SAME"), ((3, 1), ((1, 0), (0, 0))),
    ((3, 3), "VALID")])
def test_conv_gradients_equal_lax(kernel, padding, choice):
    """Stride 1: the canonical-gradient form and oneDNN's, called as `nn.Conv` calls
    them (`Ops.conv_general_dilated`)."""
    ops = kernels.resolve(choice)
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 5))
    w = jax.random.normal(jax.random.key(1), (*kernel, 5, 4))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (1, 1), padding, dimension_numbers=dn)))
    ours = jax.grad(loss(ops.conv_general_dilated), (0, 1))(x, w)
    ref = jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("choice", ["xla_cpu", "native"])
@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 3), (2, 2), "VALID"), ((3, 3), (2, 2), "SAME"), ((1, 1), (2, 2), "VALID"),
    ((7, 1), (2, 3), "SAME"), ((3, 3), (3, 3), ((0, 1), (2, 0))), ((5, 5), (2, 2), "VALID")])
def test_strided_conv_gradients_equal_lax(kernel, strides, padding,
                                                                choice):
    """Strided convolutions: the input gradient (by phases, or oneDNN's) equals JAX's
    (its compiled form: tests/test_hlo_properties.py, STRIDED-CONV)."""
    ops = kernels.resolve(choice)
    x = jax.random.normal(jax.random.key(0), (2, 13, 12, 5))
    w = jax.random.normal(jax.random.key(1), (*kernel, 5, 4))
    pads = explicit_padding(x.shape, kernel, strides, padding)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, pads)))
    ours = jax.grad(loss(ops.conv), (0, 1))(x, w)
    ref = jax.grad(loss(PLAIN.conv), (0, 1))(x, w)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("choice,team", [("native", False), ("native", True), ("xla_cpu", False)])
@pytest.mark.parametrize("k,s,padding", [(3, 2, "VALID"), (3, 1, "SAME"), (3, 2, ((0, 1), (1, 1)))])
def test_max_pool_gradient_equals_select_and_scatter_including_ties(k, s, padding, choice, team,
                                                                    monkeypatch):
    """The CPU forms of the max pool: the native kernels (`cpu.max_pool`, one FFI call
    forward and one backward; `team`: two OpenMP threads split the rows and the images)
    and the XLA:CPU form (elementwise, no scatter: tests/test_hlo_properties.py). Both
    route each output's gradient to the first maximum of its window, as
    `select_and_scatter` does."""
    if team:
        monkeypatch.setattr(native, "TEAM_ELEMENTS", 0)
        monkeypatch.setenv("OMP_NUM_THREADS", str(2 * jax.local_device_count()))
    pool = Common(ops=kernels.resolve(choice)).max_pool(k, s, padding)
    x = jax.random.normal(jax.random.key(0), (3, 13, 12, 5))
    x = jnp.maximum(jnp.round(x), 0.0)  # many ties, as after a ReLU
    ref_y, ref_vjp = jax.vjp(lambda x: nn.max_pool(x, (k, k), (s, s), padding=padding), x)
    y, vjp = jax.vjp(pool, x)
    # Whole numbers: the sums of overlapping windows' gradients are exact in any order.
    g = jnp.round(4 * jax.random.normal(jax.random.key(1), y.shape))
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(vjp(g)[0], ref_vjp(g)[0])


@pytest.mark.parametrize("include_pad", [False, True])
def test_avg_pool_and_its_gradient_equal_flax(include_pad):
    """The XLA:CPU form of the blocks' 3x3 "SAME" pool (separable sums)."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
    ours = Common(ops=kernels.resolve("xla_cpu")).avg_pool(3, count_include_pad=include_pad)

    def loss(pool):
        return lambda x: jnp.sum(jnp.sin(pool(x)))

    def ref(x):
        return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=include_pad)
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.grad(loss(ours))(x), jax.grad(loss(ref))(x),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k,s,hw", [(5, 3, (17, 17)), (5, 3, (14, 16)), (3, 2, (9, 8))])
def test_valid_avg_pool_and_its_gradient_equal_flax(k, s, hw):
    """The auxiliary heads' pool (5x5, stride 3) as strided views: same values and
    gradient as `nn.avg_pool` (its compiled form: tests/test_hlo_properties.py)."""
    x = jax.random.normal(jax.random.key(0), (2, *hw, 3))
    ours = Common(ops=kernels.resolve("xla_cpu")).avg_pool(k, s, padding="VALID")

    def loss(pool):
        return lambda x: jnp.sum(jnp.sin(pool(x)))

    def ref(x):
        return nn.avg_pool(x, (k, k), (s, s), padding="VALID")
    assert ours(x).shape == ref(x).shape
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.grad(loss(ours))(x), jax.grad(loss(ref))(x),
                               rtol=1e-6, atol=1e-6)


class ConvsAndPools(nn.Module):
    """Each kind of convolution and pool, with BatchNorm (also tests/test_hlo_properties.py)."""

    ops: Ops = PLAIN

    @nn.compact
    def __call__(self, x, train):
        c = Common(ops=self.ops)
        x = c.conv(6, 3, name="a")(x, train)
        x = c.conv(6, 3, strides=2, padding="VALID", name="b")(x, train)
        x = c.max_pool(3, 2)(x) + c.avg_pool(3, 2, padding="VALID")(x)
        return c.conv(4, 1, name="c")(c.avg_pool(3)(x) + c.max_pool(3, 1, "SAME")(x), train)


def test_kernel_choice_gives_the_same_network():
    """Every kernel choice runs the same network: "plain" (what GPUs and TPUs run) the
    lax / Flax operations, "xla_cpu" custom VJPs, "native" the native kernels (which
    each runs: tests/test_hlo_properties.py). Same variables, values and gradients."""
    x = jax.random.normal(jax.random.key(0), (2, 15, 14, 3))
    variables = ConvsAndPools().init(jax.random.key(1), x, False)

    def run(choice):
        model = ConvsAndPools(kernels.resolve(choice))
        assert jax.tree.structure(model.init(jax.random.key(1), x, False)) == \
            jax.tree.structure(variables)

        def loss(params):
            y, _ = model.apply({**variables, "params": params}, x, True,
                               mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y))
        return jax.value_and_grad(loss)(variables["params"])
    value, grads = run("plain")
    ref_value, ref_grads = run("xla_cpu")
    dnn_value, dnn_grads = run("native")
    for v, g in ((value, grads), (dnn_value, dnn_grads)):
        np.testing.assert_allclose(v, ref_value, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1, np.abs(b).max()))
