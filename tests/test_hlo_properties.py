"""The program-text properties that the speed of training depends on, in one place.

Everything else in the suite checks behaviour (values, gradients, shapes); these
read the traced jaxpr or XLA's compiled HLO, because the property is *how* a
result is computed, which no value shows. A refactor must keep each of them:

- STRIDED-CONV: the input gradient of a strided convolution in the CPU forms has no
  lhs-dilated (zero-spread) convolution; XLA:CPU runs those as slow naive loops.
- MAX-POOL: the CPU forms' max-pool gradient has no scatter (`select_and_scatter`
  is slow on XLA:CPU); the native form is one FFI call forward and one backward,
  float32 only (bfloat16 takes the plain path).
- VALID-AVG-POOL: the aux heads' 5x5/3 pool gradient in the XLA:CPU form has no
  reduce-window (slow on XLA:CPU).
- CANONICAL-IN-LOOPS: inside a rolled scan, the XLA:CPU forms' convolution
  gradients are canonical (b01f_01io->b01f); others run as naive loop nests.
- NATIVE-BN: the native BatchNorm is four FFI calls (statistics, apply, gradient
  sums, input gradient), also synchronised over devices under shard_map;
  bfloat16 and the plain ops use none.
- NATIVE-EVERYWHERE: with kernels=native every convolution (forward and both
  gradients), BatchNorm and max pool of a network runs its native kernel; the
  xla_cpu choice runs custom VJPs, plain neither; `create_model(ops=...)` reaches
  every layer.
- ONEDNN-KERNEL-GRAD: the native convolution's kernel gradient is oneDNN's own
  call, also under shard_map on two devices.
- NO-YNNPACK: with the entry points' XLA flag a convolution stays XLA's own
  (YNNPACK's were several times slower here); without it YNNPACK takes it.
- MERGED-POINTWISE: merge_pointwise runs a block's sibling 1x1 convolutions as one
  (two convolutions fewer in Inception v3's Mixed_5b).
- NO-AUX-AT-INFERENCE: the auxiliary heads cost nothing at inference.
- BF16-COMPUTE: dtype=bfloat16 computes in bfloat16 (the parameters stay float32).
"""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from inception_flax import kernels, models
from inception_flax.models.layers import BatchNorm, Common, ConvBN
from inception_flax.models.network import stack
from inception_flax.models.ops import PLAIN, Ops, explicit_padding
from tests.helpers import random_variables
from tests.test_cpu_ops import ConvsAndPools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AXIS = "batch"


def compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def jaxpr_text(fn, *args) -> str:
    return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("choice", ["xla_cpu", "native"])
@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 3), (2, 2), "VALID"), ((3, 3), (2, 2), "SAME"), ((1, 1), (2, 2), "VALID"),
    ((7, 1), (2, 3), "SAME"), ((3, 3), (3, 3), ((0, 1), (2, 0))), ((5, 5), (2, 2), "VALID")])
def test_strided_conv_gradient_has_no_dilated_convolution(kernel, strides, padding, choice):
    """STRIDED-CONV (values: tests/test_cpu_ops.py)."""
    ops = kernels.resolve(choice)
    x = jax.random.normal(jax.random.key(0), (2, 13, 12, 5))
    w = jax.random.normal(jax.random.key(1), (*kernel, 5, 4))
    pads = explicit_padding(x.shape, kernel, strides, padding)

    def dilated(conv):  # XLA names the zero-spread convolution, or shows its lhs_dilate
        hlo = compiled_text(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, pads)))),
                            x, w)
        return "lhs_dilate" in hlo or "base-dilated" in hlo
    assert dilated(PLAIN.conv) and not dilated(ops.conv)


@pytest.mark.parametrize("choice", ["native", "xla_cpu"])
@pytest.mark.parametrize("k,s,padding", [(3, 2, "VALID"), (3, 1, "SAME"), (3, 2, ((0, 1), (1, 1)))])
def test_max_pool_gradient_has_no_scatter(k, s, padding, choice):
    """MAX-POOL (values: tests/test_cpu_ops.py)."""
    pool = Common(ops=kernels.resolve(choice)).max_pool(k, s, padding)
    x = jnp.maximum(jnp.round(jax.random.normal(jax.random.key(0), (3, 13, 12, 5))), 0.0)
    y, vjp = jax.vjp(pool, x)
    assert " scatter(" not in compiled_text(vjp, y)
    jaxpr = jaxpr_text(lambda x, g: jax.vjp(pool, x)[1](g), x, y)
    calls = 1 if choice == "native" else 0
    grads = jaxpr.count("inception_flax_max_pool_grad")
    assert (jaxpr.count("inception_flax_max_pool") - grads, grads) == (calls, calls)
    assert "inception_flax_max_pool" not in jaxpr_text(pool, x.astype(jnp.bfloat16))


@pytest.mark.parametrize("k,s,hw", [(5, 3, (17, 17)), (3, 2, (9, 8))])
def test_valid_avg_pool_gradient_has_no_reduce_window(k, s, hw):
    """VALID-AVG-POOL (values: tests/test_cpu_ops.py)."""
    x = jax.random.normal(jax.random.key(0), (2, *hw, 3))
    ours = Common(ops=kernels.resolve("xla_cpu")).avg_pool(k, s, padding="VALID")
    assert "reduce-window" not in compiled_text(jax.grad(lambda x: jnp.sum(jnp.sin(ours(x)))), x)


class _Conv3(nn.Module):
    ops: Ops = PLAIN

    @nn.compact
    def __call__(self, x, train):
        return ConvBN(x.shape[-1], (1, 3), common=Common(ops=self.ops), name="c")(x, train), None


def test_rolled_scan_gradient_has_only_canonical_convolutions():
    """CANONICAL-IN-LOOPS: the XLA:CPU forms' gradients are canonical (JAX's own, the
    plain ops', are not)."""
    x = jnp.ones((2, 6, 6, 8))

    def labels(ops):
        block = stack(_Conv3, 3, unroll=1, name="s", ops=ops)
        variables = block.init(jax.random.key(0), x, False)

        def loss(params):
            y, _ = block.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
            return jnp.sum(y[0] ** 2)
        hlo = compiled_text(jax.grad(loss), variables["params"])
        assert " while(" in hlo
        return {line.split("dim_labels=")[1].split(",")[0]
                for line in hlo.splitlines() if " convolution(" in line}
    assert labels(kernels.resolve("xla_cpu")) == {"b01f_01io->b01f"}
    assert labels(PLAIN) - {"b01f_01io->b01f"}


def bn_step_jaxpr(module, x) -> str:
    """The jaxpr of a BatchNorm's training forward and its gradients."""
    variables = module.init(jax.random.key(0), x, use_running_average=False)

    def loss(params, x):
        y, _ = module.apply({**variables, "params": params}, x, use_running_average=False,
                            mutable=["batch_stats"])
        return jnp.sum(y.astype(jnp.float32))
    return jaxpr_text(jax.grad(loss, argnums=(0, 1)), variables["params"], x)


def test_native_batch_norm_is_four_calls_in_float32_only():
    """NATIVE-BN (values: tests/test_batch_norm.py)."""
    ops = kernels.resolve("native")
    x = jax.random.normal(jax.random.key(0), (5, 13, 11, 24))
    for use_scale in (True, False):
        jaxpr = bn_step_jaxpr(BatchNorm(ops=ops, use_scale=use_scale, name="relu"), x)
        assert [jaxpr.count(f"inception_flax_bn_{k}") for k in
                ("stats", "apply", "grad_stats", "input_grad")] == [1, 1, 1, 1]
    assert "inception_flax_bn_" not in bn_step_jaxpr(BatchNorm(ops=PLAIN, name="relu"), x)
    bf16 = BatchNorm(dtype=jnp.bfloat16, ops=ops, name="relu")
    assert "inception_flax_bn_" not in bn_step_jaxpr(bf16, x.astype(jnp.bfloat16))


def test_synchronised_native_batch_norm_calls_its_kernels():
    """NATIVE-BN, with `axis_name` under shard_map (values: tests/test_batch_norm.py)."""
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    x = jax.random.normal(jax.random.key(0), (2 * jax.device_count(), 7, 7, 24))

    def text(choice):
        module = BatchNorm(axis_name=AXIS, ops=kernels.resolve(choice), name="relu")
        variables = module.init(jax.random.key(0), x, use_running_average=False)

        def per_device(params, x):
            def loss(p):
                y, _ = module.apply({**variables, "params": p}, x, use_running_average=False,
                                    mutable=["batch_stats"])
                return jnp.sum(y)
            return jax.lax.psum(jax.grad(loss)(jax.lax.pcast(params, AXIS, to="varying")), AXIS)
        step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)),
                                     out_specs=P()))
        return step.lower(variables["params"],
                          jax.device_put(x, NamedSharding(mesh, P(AXIS)))).as_text()
    assert "inception_flax_bn_grad_stats" in text("native")
    assert "inception_flax_bn_" not in text("plain")


def test_each_kernel_choice_runs_its_own_operations():
    """NATIVE-EVERYWHERE, on a small network (values: tests/test_cpu_ops.py)."""
    x = jax.random.normal(jax.random.key(0), (2, 15, 14, 3))
    variables = ConvsAndPools().init(jax.random.key(1), x, False)

    def ops_of(choice):
        model = ConvsAndPools(kernels.resolve(choice))

        def loss(params):
            y, _ = model.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y))
        jaxpr = jaxpr_text(jax.grad(loss), variables["params"])
        return "custom_vjp" in jaxpr, (jaxpr.count("inception_flax_conv_"),
                                       jaxpr.count("inception_flax_bn_"),
                                       jaxpr.count("inception_flax_max_pool"))
    assert ops_of("plain") == (False, (0, 0, 0))
    assert ops_of("xla_cpu") == (True, (0, 0, 0))
    # Three convolutions, each forward and both gradients; three BatchNorms, each
    # statistics and output forward, sums and input gradient backward; two max pools,
    # each forward and backward.
    assert ops_of("native")[1] == (3 * 3, 3 * 4, 2 * 2)


def test_create_model_runs_the_ops_it_is_given():
    """NATIVE-EVERYWHERE: `ops` reaches the network's layers (the xla_cpu forms' custom VJPs)."""
    model = models.create_model("inception_v3", num_classes=3, depth_multiplier=0.25,
                                ops=kernels.resolve("xla_cpu"))
    jaxpr = jaxpr_text(lambda v: model.apply(
        v, jnp.zeros((1, 75, 75, 3)), train=True, mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(0)}), random_variables(model, 75))
    assert "custom_vjp" in jaxpr


def test_native_kernel_gradient_is_onednns_call_on_two_devices():
    """ONEDNN-KERNEL-GRAD (values: tests/test_onednn.py)."""
    conv = kernels.resolve("native").conv
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    x = jnp.ones((2 * jax.device_count(), 9, 9, 8))
    w = jnp.ones((3, 3, 8, 4))

    def loss(x, w):
        return jnp.sum(jnp.sin(conv(x, w, (1, 1), ((1, 1), (1, 1)))))
    grads = jax.jit(jax.shard_map(jax.grad(loss, (0, 1)), mesh=mesh,
                                  in_specs=(P(AXIS), P()), out_specs=(P(AXIS), P())))
    assert "inception_flax_conv_kernel_grad" in grads.lower(x, w).as_text()


def test_configure_xla_flags_keeps_convolutions_out_of_ynnpack():
    """NO-YNNPACK. In a fresh process: with the flag, set before JAX starts, a
    convolution stays XLA's; without it, YNNPACK takes it."""
    script = textwrap.dedent("""
        import os, sys
        from inception_flax.cpu import process
        if sys.argv[1] == "configure":
            process.configure_xla_flags()
        import jax, jax.numpy as jnp
        x, w = jnp.ones((2, 35, 35, 64)), jnp.ones((3, 3, 64, 64))
        hlo = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))).lower(
            x, w).compile().as_text()
        print(" convolution(" in hlo, "__ynn_fusion" in hlo)
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT

    def run(how):
        return subprocess.run([sys.executable, "-c", script, how], env=env, capture_output=True,
                              text=True, check=True, timeout=300).stdout.split()
    assert run("configure") == ["True", "False"]
    assert run("leave") == ["True", "True"]


def test_merged_pointwise_runs_two_convolutions_fewer():
    """MERGED-POINTWISE (same network: tests/test_models.py)."""
    from inception_flax.models.inception_v3 import InceptionA

    x = jax.random.normal(jax.random.key(0), (4, 9, 9, 16))

    def convs(merge):
        block = InceptionA(Common(depth_multiplier=0.25, min_depth=8, merge_pointwise=merge), 8)
        variables = block.init(jax.random.key(1), x, False)

        def loss(params):
            y, _ = block.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
            return jnp.sum(y)
        return jaxpr_text(loss, variables["params"]).count("conv_general_dilated[")
    assert (convs(True), convs(False)) == (5, 7)


def test_auxiliary_heads_cost_nothing_at_inference():
    """NO-AUX-AT-INFERENCE."""
    model = models.create_model("inception_v1", num_classes=5, aux_logits=True,
                                depth_multiplier=0.25)
    variables = random_variables(model, 64)
    images = jnp.zeros((1, 64, 64, 3))
    inference = jaxpr_text(lambda v: model.apply(v, images), variables)
    training = jaxpr_text(lambda v: model.apply(
        v, images, train=True, mutable=["batch_stats", "intermediates"],
        rngs={"dropout": jax.random.key(0)}), variables)
    assert inference.count("conv_general_dilated") < training.count("conv_general_dilated")


def test_bfloat16_compute_runs_in_bfloat16():
    """BF16-COMPUTE (float32 parameters and close logits: tests/test_models.py)."""
    model = models.create_model("inception_resnet_v2", num_classes=3, depth_multiplier=0.25,
                                dtype=jnp.bfloat16, param_dtype=jnp.float32)
    variables = random_variables(model, 75)
    jaxpr = jaxpr_text(lambda v: model.apply(v, jnp.zeros((2, 75, 75, 3))), variables)
    convs = [line.split("conv_general_dilated[")[0] for line in jaxpr.splitlines()
             if "conv_general_dilated[" in line]
    assert convs and all(":bf16[" in out and ":f32[" not in out for out in convs)
