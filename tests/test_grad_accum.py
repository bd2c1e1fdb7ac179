"""Gradient accumulation (`config.grad_accum_steps`): what K micro-batches per update compute.

- Without batch statistics (BatchNorm on its running averages, no dropout), K=2 micro-
  batches of B/2 give the parameters, moving average and metrics of one batch of B.
- With training BatchNorm and dropout, K=2 micro-batches on a 1-device mesh give what a
  2-device mesh gives on the same global batch: parameters, BN statistics (the devices'
  mean, as checkpoints hold them), moving average, step counter and metrics.
- The training loop with K=2 counts updates: steps, checkpoints, the logged learning
  rate, the input position a checkpoint records; a resumed run ends where the whole
  run does.

Every test uses a two-layer network of the project's own layers (`ConvBN`, the
configured kernels, the classifier's dropout, an auxiliary head): the step's arithmetic
does not depend on the depth, and five full Inception steps would take minutes to compile.
"""

from __future__ import annotations

import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from inception_flax.data import sharding
from inception_flax.models.network import InceptionNet
from inception_flax.training import checks, loop, mesh as mesh_lib, setup as setup_lib
from inception_flax.training import state as state_lib, step as step_lib
from tests import runs

BATCH, SIZE, CLASSES, STEPS = 8, 16, 5, 3


class TinyNet(InceptionNet):
    """Two conv + BN + ReLU layers, an auxiliary head and the shared classifier."""

    min_image_size: ClassVar[int] = 8
    batch_statistics: bool = True  # False: BN normalises with its running averages in training

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        c, bn_train = self.common, train and self.batch_statistics
        x = c.conv(8, 3, strides=2, name="Conv1")(x, bn_train)
        if self.wants_aux(train):
            self.sow_aux(c.dense(self.num_classes, name="Aux")(jnp.mean(x, axis=(1, 2))))
        return c.conv(16, 3, name="Conv2")(x, bn_train)


def _config(**fields):
    """The tiny run's config: SGD with momentum (sensitive to the gradient's scale), a
    schedule that changes every step, L2, label smoothing, a moving average."""
    return runs.config(STEPS, STEPS, **{
        "batch_size": BATCH, "eval_batch_size": BATCH, "optimizer": "sgd",
        "learning_rate": 0.5, "steps_per_epoch": 2, "warmup_epochs": 1.0,
        "lr_decay_epochs": 0.5, "ema_decay": 0.9, "model.bn_momentum": 0.5, **fields})


def _batches(size: int = SIZE) -> list[dict[str, np.ndarray]]:
    gen = np.random.default_rng(0)
    return [{"image": gen.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32),
             "label": gen.integers(0, CLASSES, (BATCH,)).astype(np.int32)}
            for _ in range(STEPS)]


def _train(batch_statistics: bool, accum: int, devices: int, dropout: float):
    """STEPS updates of TinyNet on the same batches: the final state and each step's metrics."""
    config = _config(grad_accum_steps=accum)
    s = setup_lib.setup(config, num_classes=CLASSES, init_state=False)
    model = TinyNet(num_classes=CLASSES, aux_logits=True, dropout_rate=dropout,
                    batch_statistics=batch_statistics, bn_momentum=config.model.bn_momentum,
                    ops=s.model.ops)
    variables = jax.device_get(state_lib.init_variables(model, np.array([0, 1], np.uint32),
                                                        SIZE))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), (mesh_lib.AXIS,))
    state = state_lib.create_state(variables["params"], variables["batch_stats"], s.tx, True,
                                   np.array([3, 4], np.uint32), mesh)
    train_step = step_lib.make_train_step(model, s.tx, s.schedule, config, mesh, state)
    history = []
    for batch in _batches():
        state, metrics = train_step(state, jax.device_put(
            batch, NamedSharding(mesh, P(mesh_lib.AXIS))))
        history.append(jax.device_get(metrics))
    return jax.device_get(state_lib.checkpoint_view(state)), history, s.schedule


def _assert_same(a, b, rtol: float, atol: float) -> None:
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def _assert_metrics(a: list[dict], b: list[dict], keys: tuple[str, ...], rtol: float) -> None:
    for i, (m1, m2) in enumerate(zip(a, b)):
        for k in keys:
            np.testing.assert_allclose(m1[k], m2[k], rtol=rtol, err_msg=f"step {i} {k}")


@pytest.fixture(scope="module")
def without_batch_statistics():
    return {k: _train(False, k, 2, 0.0) for k in (1, 2)}


@pytest.fixture(scope="module")
def with_batch_statistics():
    return {"one_device_k2": _train(True, 2, 1, 0.2), "two_devices_k1": _train(True, 1, 2, 0.2)}


def test_two_micro_batches_give_the_whole_batch_update(without_batch_statistics):
    """K=2 at B/2 per micro-batch = K=1 at B: parameters, moving average, metrics."""
    (one, one_metrics, schedule), (two, two_metrics, _) = (
        without_batch_statistics[1], without_batch_statistics[2])
    assert int(one["step"]) == int(two["step"]) == STEPS
    assert float(jnp.abs(one["params"]["Conv1"]["conv"]["kernel"]).sum()) > 0
    for k in ("params", "ema_params", "opt_state"):
        _assert_same(one[k], two[k], rtol=1e-5, atol=1e-6)
    _assert_metrics(one_metrics, two_metrics, ("loss", "main_loss", "aux_loss", "top1",
                                               "grad_norm"), rtol=1e-5)
    # The schedule counts updates: the learning rate of update i is schedule(i).
    assert [float(m["learning_rate"]) for m in two_metrics] == pytest.approx(
        [float(schedule(i)) for i in range(STEPS)])


def test_micro_batches_on_one_device_give_what_as_many_devices_give(with_batch_statistics):
    """Training BN and dropout: 1 device x K=2 = 2 devices x K=1, on the same global batch."""
    (acc, acc_metrics, _), (dev, dev_metrics, _) = (
        with_batch_statistics["one_device_k2"], with_batch_statistics["two_devices_k1"])
    assert int(acc["step"]) == int(dev["step"]) == STEPS
    for k in ("params", "batch_stats", "ema_params"):
        _assert_same(acc[k], dev[k], rtol=1e-4, atol=1e-6)
    _assert_metrics(acc_metrics, dev_metrics, ("loss", "aux_loss", "top1", "grad_norm",
                                               "learning_rate"), rtol=1e-4)


def test_bad_grad_accum_steps_is_one_line_before_compiling():
    with pytest.raises(checks.ConfigError, match=r"^grad_accum_steps must be positive, got 0$"):
        setup_lib.setup(_config(grad_accum_steps=0), num_classes=CLASSES, init_state=False)
    with pytest.raises(checks.ConfigError, match=r"^grad_accum_steps=3 does not divide the "
                       r"per-device batch 4: .* a multiple of 6$"):
        setup_lib.setup(_config(grad_accum_steps=3), num_classes=CLASSES, init_state=False)


@pytest.fixture(scope="module")
def accumulating_run(tmp_path_factory):
    """The trainer's loop on the digits with K=2 (1 image per micro-batch and device):
    3 updates with a checkpoint every 2; and the same run stopped at 2, then resumed.
    The network is TinyNet (the loop builds it in place of GoogLeNet): what is checked
    is the loop's counting, and a full network's step would take a minute to compile."""
    def config(steps: int):
        return runs.config(steps, 2, network="inception_v1", image_size=32,
                           grad_accum_steps=2, num_eval_steps=1, warmup_epochs=1.0)

    def tiny_model(config, num_classes, ops):
        return TinyNet(num_classes=num_classes, aux_logits=True, ops=ops,
                       dropout_rate=config.model.dropout_rate,
                       bn_momentum=config.model.bn_momentum)
    whole, resumed = (str(tmp_path_factory.mktemp(n)) for n in ("whole", "resumed"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(setup_lib, "create_model", tiny_model)
        loop.train_and_evaluate(config(3), whole)
        loop.train_and_evaluate(config(2), resumed)
        loop.train_and_evaluate(config(3), resumed)
    return config(3), whole, resumed


def test_a_run_with_accumulation_counts_updates(accumulating_run):
    """Steps, checkpoints, the logged learning rate and the saved input position count
    updates (global batches), not micro-batches; a resumed run's state is the whole run's."""
    config, whole, resumed = accumulating_run
    assert runs.checkpoint_steps(whole) == [2, 3]
    final = runs.read_state(whole, 3)
    assert int(final["['step']"]) == 3
    s = setup_lib.setup(config, init_state=False)
    assert s.schedule(1) != s.schedule(2)  # the check below can tell the counts apart
    rates = runs.logged(whole, "train/learning_rate")
    assert {k: pytest.approx(v) for k, v in rates.items()} == {
        i: [pytest.approx(float(s.schedule(i - 1)))] for i in (1, 2, 3)}
    # The input position saved at step 2: the third global batch comes next.
    fresh, _ = sharding.train_iterator(config)
    expected = [next(fresh) for _ in range(3)][-1]
    restored, _ = sharding.train_iterator(config)
    restored.restore(os.path.join(whole, "input_state", "2", "process_0"))
    following = next(restored)
    for k in ("image", "label"):
        np.testing.assert_array_equal(following[k], expected[k], err_msg=k)
    again = runs.read_state(resumed, 3)
    assert final.keys() == again.keys()
    for k in final:
        np.testing.assert_array_equal(final[k], again[k], err_msg=k)
