"""The model zoo matches its references: parameters, multiply-adds, shapes, training."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from inception_flax import kernels, models
from inception_flax.models import __main__ as models_cli
from inception_flax.models.inception_resnet import Block35
from inception_flax.models.layers import Common
from inception_flax.models.network import InceptionNet
from inception_flax.models.ops import PLAIN
from inception_flax.models.summary import summarize
from tests.helpers import random_variables

# Each layout without and with its aux head(s): (name, overrides, (params, GMACs) without,
# (params, GMACs) with or None), from ../shared/REFERENCE.md, 1000 classes, canonical size.
REFERENCE = [
    ("inception_v1", dict(layout="torchvision"), (6_624_904, 1.498), (13_004_888, 1.507)),
    # The paper layout's heads are the torchvision layout's (same inputs, same layers), so
    # its figures with them are its own plus theirs: derived from the rows above.
    ("googlenet", dict(), (7_005_832, 1.583),
     (7_005_832 + 13_004_888 - 6_624_904, 1.583 + 1.507 - 1.498)),
    ("bn_inception", dict(), (11_285_224, 2.033), None),
    ("inception_v2", dict(), (23_815_336, 5.300), None),
    ("inception_v3", dict(), (23_834_568, 5.713), (27_161_264, 5.719)),
    ("inception_v4", dict(), (42_679_816, 12.254), (46_039_280, 12.260)),
    ("inception_resnet_v1", dict(), (22_756_328, 6.206), (26_099_408, 6.212)),
    ("inception_resnet_v2", dict(), (55_843_464, 13.156), (59_211_120, 13.163)),
]
NAMES = list(models.MODELS)


def _leaves_changed(new, old) -> list[bool]:
    return [bool(np.any(np.asarray(a) != np.asarray(b)))
            for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old))]


def _id(case):
    name, overrides, *_ = case
    return name + "".join(f"-{k}={v}" for k, v in overrides.items())


@pytest.mark.parametrize("case", REFERENCE, ids=_id)
def test_parameter_count_and_macs_equal_reference(case):
    """Exact parameters and GMACs at 0.1%, without and with the aux head(s).

    The reference GMACs have 3 decimals; the aux heads' own cost (e.g. Inception
    v3's 5.719 - 5.713) is checked to those decimals' rounding, 0.001 GMACs.
    """
    name, overrides, without, with_aux = case
    size = models.spec(name).image_size
    plain = summarize(models.create_model(name, **overrides, aux_logits=False), size)
    assert plain.params == without[0]
    assert plain.macs / 1e9 == pytest.approx(without[1], rel=0.001)
    assert plain.output_shape == (1, 1000)
    if with_aux is None:
        return
    aux = summarize(models.create_model(name, **overrides, aux_logits=True), size)
    assert aux.params == with_aux[0]
    assert aux.macs / 1e9 == pytest.approx(with_aux[1], rel=0.001)
    assert (aux.macs - plain.macs) / 1e9 == pytest.approx(with_aux[1] - without[1], abs=0.001)
    assert aux.output_shape == (1, 1000)


def test_unknown_name_lists_the_known_names():
    with pytest.raises(ValueError, match="inception_resnet_v2.*") as err:
        models.create_model("inception_v5")
    assert "googlenet" in str(err.value) and "bn_inception" in str(err.value)


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match="no option residual_scale"):
        models.create_model("inception_v3", residual_scale=0.2)


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes_at_canonical_and_minimum_size(name):
    model = models.create_model(name, num_classes=7)
    for size in (models.spec(name).image_size, models.min_image_size(name)):
        out = jax.eval_shape(
            lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, size, size, 3)))[0])
        assert out.shape == (2, 7) and out.dtype == jnp.float32
    too_small = models.min_image_size(name) - 1
    with pytest.raises(ValueError, match=f"at least {too_small + 1}x{too_small + 1}"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, too_small, too_small, 3))))


def test_minimum_sizes():
    assert {n: models.min_image_size(n) for n in NAMES} == {
        "inception_v1": 32, "bn_inception": 32, "inception_v2": 75, "inception_v3": 75,
        "inception_v4": 75, "inception_resnet_v1": 75, "inception_resnet_v2": 75}


@pytest.mark.parametrize("name", NAMES)
def test_one_training_step_updates_bn_and_produces_aux_logits(name):
    cls = models.spec(name).cls
    model = models.create_model(name, num_classes=5, aux_logits=cls.has_aux,
                                depth_multiplier=0.25, bn_momentum=0.9)
    size = 64 if cls.min_image_size < 64 else cls.min_image_size
    variables = random_variables(model, size)
    images = jax.random.uniform(jax.random.key(1), (2, size, size, 3), minval=-1, maxval=1)
    labels = jnp.array([1, 3])
    tx = optax.sgd(0.1)

    @jax.jit
    def step(params, batch_stats):
        def loss_fn(p):
            logits, state = model.apply(
                {"params": p, "batch_stats": batch_stats}, images, train=True,
                mutable=["batch_stats", "intermediates"], rngs={"dropout": jax.random.key(2)})
            aux = models.aux_logits_of(state)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            for a in aux:
                loss += 0.4 * optax.softmax_cross_entropy_with_integer_labels(a, labels).mean()
            return loss, (state["batch_stats"], aux)

        (loss, (new_stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates), new_stats, loss, aux

    params, stats, loss, aux = step(variables["params"], variables["batch_stats"])
    assert np.isfinite(float(loss))
    assert len(aux) == (2 if name == "inception_v1" else 1 if cls.has_aux else 0)
    assert all(a.shape == (2, 5) for a in aux)
    changed = _leaves_changed(stats, variables["batch_stats"])
    assert all(changed), "every BN layer's statistics must move in training"
    moved = _leaves_changed(params, variables["params"])
    assert sum(moved) > 0.9 * len(moved)


def test_auxiliary_heads_do_not_run_at_inference():
    model = models.create_model("inception_v1", num_classes=5, aux_logits=True,
                                depth_multiplier=0.25)
    variables = random_variables(model, 64)
    images = jnp.zeros((1, 64, 64, 3))
    logits, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    assert models.aux_logits_of(state) == ()


def test_residual_scale_scales_the_residual():
    common = Common(depth_multiplier=0.5)
    x = jax.random.normal(jax.random.key(0), (1, 9, 9, 32))

    def out(scale):
        block = Block35(common, scale, activation=False)
        variables = block.init(jax.random.key(1), x, False)
        return block.apply(variables, x, False)[0]

    r1, r05, r0 = out(1.0) - x, out(0.5) - x, out(0.0) - x
    assert float(jnp.abs(r1).max()) > 1e-3
    np.testing.assert_allclose(r05, 0.5 * r1, atol=1e-5)
    np.testing.assert_allclose(r0, 0.0, atol=1e-6)


@pytest.mark.parametrize("bad", [1.5, -0.1, (0.1, 0.2), (0.1, 0.2, 2.0)])
def test_residual_scale_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="residual_scale"):
        models.create_model("inception_resnet_v2", residual_scale=bad)


def test_residual_scale_reaches_the_network():
    images = jax.random.uniform(jax.random.key(3), (1, 75, 75, 3), minval=-1, maxval=1)
    base = models.create_model("inception_resnet_v1", depth_multiplier=0.25, num_classes=4)
    variables = random_variables(base, 75)
    outs = [models.create_model("inception_resnet_v1", depth_multiplier=0.25, num_classes=4,
                                residual_scale=s).apply(variables, images)
            for s in (0.0, 0.17, (0.17, 0.1, 0.2))]
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])


def test_bfloat16_compute_keeps_float32_parameters():
    model = models.create_model("inception_resnet_v2", num_classes=3, depth_multiplier=0.25,
                                dtype=jnp.bfloat16, param_dtype=jnp.float32)
    variables = random_variables(model, 75)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    images = jax.random.uniform(jax.random.key(0), (2, 75, 75, 3), minval=-1, maxval=1)
    ref = models.create_model("inception_resnet_v2", num_classes=3, depth_multiplier=0.25)
    logits = model.apply(variables, images)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_allclose(logits, ref.apply(variables, images), rtol=0.1, atol=0.1)


def test_ceil_mode_max_pool_keeps_its_output_size():
    x = jax.random.normal(jax.random.key(0), (1, 112, 112, 2))
    assert Common().max_pool_ceil(3, 2)(x).shape == (1, 56, 56, 2)  # floor mode would give 55


def test_create_model_runs_the_ops_it_is_given():
    """`ops` reaches every layer through `Common`; it is not a configuration override."""
    ops = kernels.resolve("xla_cpu")
    model = models.create_model("inception_v3", num_classes=3, depth_multiplier=0.25, ops=ops)
    assert model.common.ops is ops and models.create_model("inception_v3").common.ops is PLAIN
    assert "ops" not in models.override_names("inception_v3")
    with pytest.raises(ValueError, match="no option ops"):
        models.check_overrides("inception_v3", {"ops": ops})


def test_inception_net_declares_what_common_declares():
    """Each shared knob is a network field with `Common`'s default, and reaches `common`."""
    net = {f.name: f for f in dataclasses.fields(InceptionNet)}
    for f in dataclasses.fields(Common):
        assert f.name in net and net[f.name].default == f.default, f.name
    model = models.create_model("inception_v3", bn_epsilon=0.5, min_depth=3)
    assert (model.common.bn_epsilon, model.common.min_depth) == (0.5, 3)


class _TwoConvBN(nn.Module):
    bn_remat: bool = False

    @nn.compact
    def __call__(self, x, train):
        c = Common(dtype=jnp.bfloat16, bn_remat=self.bn_remat, axis_name="batch")
        x = c.conv(6, 3, name="a")(x, train)
        return c.conv(4, 3, strides=2, name="b")(x, train)


def test_bn_remat_recomputes_batchnorm_without_changing_the_step(capsys):
    """bn_remat keeps only the convolution outputs and the batch statistics for the
    backward pass: no float32 activations, no ReLU masks, and the same loss, gradients
    and running statistics."""
    x = jax.random.normal(jax.random.key(0), (2, 15, 14, 3))
    probe = jax.random.normal(jax.random.key(2), (1, 2, 8, 7, 4))

    def run(bn_remat):
        model = _TwoConvBN(bn_remat=bn_remat)
        variables = jax.vmap(lambda x: model.init(jax.random.key(1), x, False),
                             axis_name="batch")(x[None])
        variables = jax.tree.map(lambda v: v[0], variables)

        def loss(params):
            y, new = jax.vmap(lambda x: model.apply({**variables, "params": params}, x, True,
                                                    mutable=["batch_stats"]),
                              axis_name="batch")(x[None])
            return jnp.sum(y.astype(jnp.float32) * probe), new  # linear: saves nothing
        capsys.readouterr()
        jax.ad_checkpoint.print_saved_residuals(lambda p: loss(p)[0], variables["params"])
        saved = capsys.readouterr().out.splitlines()
        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        return saved, value, grads, new

    saved, value, grads, stats = run(True)
    ref_saved, ref_value, ref_grads, ref_stats = run(False)
    def activations(lines):  # float32 or boolean maps computed in the forward pass
        return [line for line in lines
                if line.startswith(("f32[1,2,", "bool[")) and " output of " in line]
    assert not activations(saved), saved
    assert activations(ref_saved), ref_saved
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((grads, stats)), jax.tree.leaves((ref_grads, ref_stats))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_merged_pointwise_branches_are_the_same_network():
    """merge_pointwise runs the sibling 1x1 convolutions of a block (Inception v3's
    Mixed_5b: three of them read the block's input) as one convolution: the same
    parameters and initial values, the same loss, gradients and running statistics
    (two convolutions fewer: tests/test_hlo_properties.py)."""
    from inception_flax.models.inception_v3 import InceptionA

    x = jax.random.normal(jax.random.key(0), (4, 9, 9, 16))
    probe = jax.random.normal(jax.random.key(2), (4, 9, 9, 64 + 64 + 96 + 8))

    def run(merge):
        block = InceptionA(Common(depth_multiplier=0.25, min_depth=8, merge_pointwise=merge), 8)
        variables = block.init(jax.random.key(1), x, False)

        def loss(params):
            y, new = block.apply({**variables, "params": params}, x, True,
                                 mutable=["batch_stats"])
            return jnp.sum(y * probe[..., :y.shape[-1]]), new
        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        return variables, value, grads, new

    variables, value, grads, stats = run(True)
    ref_variables, ref_value, ref_grads, ref_stats = run(False)
    assert jax.tree.structure(variables) == jax.tree.structure(ref_variables)
    assert all(np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(variables), jax.tree.leaves(ref_variables)))
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves((grads, stats)), jax.tree.leaves((ref_grads, ref_stats))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_depth_multiplier_and_bn_options():
    thin = summarize(models.create_model("inception_v3", depth_multiplier=0.5), 299)
    full_no_gamma = summarize(models.create_model("inception_v3", bn_scale=False), 299)
    assert thin.params < 0.35 * 23_834_568
    # keras.applications' layout: BN without gamma, 23,817,352 trainable parameters.
    assert full_no_gamma.params == 23_817_352


def test_cli_prints_json(capsys):
    assert models_cli.main(["inception_v3", "--image-size", "75", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 23_834_568 and out["output_shape"] == [1, 1000]
    assert 0 < out["macs"] < 5.713e9 / 10


def test_cli_refuses_small_image(capsys):
    assert models_cli.main(["inception_v4", "--image-size", "60"]) == 2
    assert "at least 75x75" in capsys.readouterr().err
