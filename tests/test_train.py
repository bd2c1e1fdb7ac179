"""The trainer: configs, checks before compile, every variant's step, resume, eval, init_from."""

import glob
import importlib
import json
import os
import subprocess
import sys

import jax
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorboard.backend.event_processing import event_accumulator

from inception_flax import pretrained
from inception_flax.training import checks, loop, mesh, state, step
from inception_flax.training import setup as setup_lib
from tests import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORKS = ["inception_v1", "bn_inception", "inception_v2", "inception_v3", "inception_v4",
            "inception_resnet_v1", "inception_resnet_v2"]


def load_config(network: str, preset: str = ""):
    return importlib.import_module(f"configs.{network}").get_config(preset)


def tiny(config, **overrides):
    """A config that compiles and runs in seconds."""
    config.model.depth_multiplier = 0.25
    config.batch_size = 4
    config.eval_batch_size = 4
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.eval_every_steps = 1000
    config.log_input_images = False
    return runs.override(config, overrides)


def scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            for e in acc.Tensors(tag):
                value = tf.make_ndarray(e.tensor_proto)
                if value.ndim == 0 and value.dtype.kind == "f":
                    out.setdefault(tag, []).append((e.step, float(value)))
    return out


@pytest.mark.parametrize("network", NETWORKS)
def test_every_config_loads_and_passes_checks(network):
    for preset in ("", "digits"):
        config = load_config(network, preset)
        checks.check_config(config)
        assert config.model.name == network
    paper = load_config(network)
    assert paper.image_size == (224 if network in ("inception_v1", "bn_inception") else 299)


def test_recipes_follow_the_papers():
    v3 = load_config("inception_v3")
    assert (v3.optimizer, v3.rmsprop_decay, v3.momentum, v3.rmsprop_epsilon) == (
        "rmsprop", 0.9, 0.9, 1.0)
    assert (v3.learning_rate, v3.lr_decay_factor, v3.lr_decay_epochs) == (0.045, 0.94, 2.0)
    assert (v3.grad_clip_norm, v3.label_smoothing, v3.weight_decay) == (2.0, 0.1, 4e-5)
    assert (v3.aux_loss_weight, v3.ema_decay) == (0.4, 0.9999)
    v1 = load_config("inception_v1")
    assert (v1.optimizer, v1.aux_loss_weight, v1.momentum) == ("sgd", 0.3, 0.9)
    v2 = load_config("inception_v2")
    assert (v2.optimizer, v2.label_smoothing, v2.momentum) == ("sgd", 0.0, 0.9)


def test_schedule_warms_up_then_decays_in_stairs():
    from inception_flax import optim
    config = load_config("inception_v3")
    config.warmup_epochs = 1.0
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, num_train_steps=1000)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.045 / 2)
    assert float(schedule(10)) == pytest.approx(0.045)
    assert float(schedule(29)) == pytest.approx(0.045)  # decays every 2 epochs after warm-up
    assert float(schedule(30)) == pytest.approx(0.045 * 0.94)
    assert float(schedule(50)) == pytest.approx(0.045 * 0.94 ** 2)


@pytest.mark.parametrize("network", NETWORKS)
def test_each_variant_trains_on_mock_imagenet(tmp_path, network):
    config = tiny(load_config(network), num_train_steps=2, steps_per_epoch=10,
                  num_eval_steps=1, eval_every_steps=2, image_size=75 if "resnet" in network
                  or network in ("inception_v2", "inception_v3", "inception_v4") else 64)
    config.checkpoint_every_steps = 100
    with tfds.testing.mock_data(num_examples=8):
        result = loop.train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= result["top1"] <= 1.0 and result["examples"] > 0
    logged = scalars(str(tmp_path))
    assert [s for s, _ in logged["train/loss"]] == [1, 2]
    if config.model.get("aux_logits", False):
        assert all(v > 0 for _, v in logged["train/aux_loss"])
    assert os.path.isdir(tmp_path / "checkpoints" / "2")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """4 steps on the embedded digits, checkpoint every 2, on the 2 test devices."""
    workdir = str(tmp_path_factory.mktemp("digits"))
    config = tiny(load_config("inception_resnet_v2", "digits"), num_train_steps=4,
                  eval_every_steps=4, num_eval_steps=-1)
    config.dataset.data_dir = os.environ["TFDS_DATA_DIR"]
    config.log_input_images = True
    result = loop.train_and_evaluate(config, workdir)
    return config, workdir, result


@pytest.mark.xdist_group("digits_run")
def test_digits_run_logs_checkpoints_and_evaluates(digits_run):
    config, workdir, result = digits_run
    assert jax.device_count() == 2
    assert result["examples"] == 360  # the whole test split, each example once
    logged = scalars(workdir)
    for tag in ("train/loss", "train/main_loss", "train/aux_loss", "train/top1",
                "train/learning_rate", "train/grad_norm", "train/images_per_sec",
                "train/steps_per_sec", "eval/top1", "eval/top5"):
        assert tag in logged, tag
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    with open(os.path.join(workdir, "run.json")) as f:
        assert json.load(f)["model"] == "inception_resnet_v2"


@pytest.mark.xdist_group("digits_run")
def test_rerun_resumes_and_continues_the_step_counter(digits_run, tmp_path):
    config, workdir, _ = digits_run
    config = config.copy_and_resolve_references()
    config.num_train_steps = 6
    loop.train_and_evaluate(config, workdir)
    steps = [s for s, _ in scalars(workdir)["train/loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]  # no gap, no repeat
    assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))


@pytest.mark.xdist_group("digits_run")
def test_eval_py_reports_top1_and_fine_tuning_resets_heads(digits_run, tmp_path):
    config, workdir, _ = digits_run
    env = dict(os.environ)
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"),
           "--config=" + os.path.join(ROOT, "configs/inception_resnet_v2.py:digits"),
           f"--workdir={workdir}", "--config.model.depth_multiplier=0.25",
           f"--config.dataset.data_dir={config.dataset.data_dir}", "--config.eval_batch_size=4"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["examples"] == 360 and 0.0 <= result["top1"] <= 1.0

    source = pretrained.restore_variables(workdir)
    target = state.init_variables(
        setup_lib.create_model(config, num_classes=5), jax.random.key_data(jax.random.key(1)),
        config.image_size)
    merged, reset = pretrained.merge_pretrained(dict(target), source)
    assert reset == ["AuxLogits", "Logits"]
    assert merged["params"]["Logits"]["kernel"].shape[-1] == 5
    stem = ("Stem", "Conv2d_1a_3x3", "conv", "kernel")
    a, b = merged["params"], source["params"]
    for k in stem:
        a, b = a[k], b[k]
    assert (a == b).all()


def test_the_step_averages_the_devices_gradients():
    """The gradient of the global batch's mean loss, not the sum over devices."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    devices = mesh.create_mesh()
    x = jnp.arange(8.0).reshape(8, 1)

    def per_device(w, x):
        (loss, _), grad = step.mean_value_and_grad(
            lambda w: (jnp.mean((w * x) ** 2), None), w)
        return jax.lax.pmean(loss, mesh.AXIS), grad

    run = jax.jit(jax.shard_map(per_device, mesh=devices, in_specs=(P(), P(mesh.AXIS)),
                                out_specs=(P(), P())))
    loss, grad = run(jnp.float32(1.5), jax.device_put(x, NamedSharding(devices, P(mesh.AXIS))))
    assert jax.device_count() == 2
    assert float(loss) == pytest.approx(float(jnp.mean((1.5 * x) ** 2)))
    assert float(grad) == pytest.approx(float(jnp.mean(2 * 1.5 * x ** 2)))  # 52.5, not 105


def test_setup_of_synthetic_data_reads_no_dataset():
    """The benchmark's setup: its own class count, no dataset read, an initial state."""
    config = runs.config(2, 2, **{"dataset.name": "no_such_dataset", "num_train_steps": -1})
    s = setup_lib.setup(config, num_classes=7)
    assert s.info is None and s.num_classes == 7
    assert (s.steps_per_epoch, s.num_steps) == (
        setup_lib.SYNTHETIC_STEPS_PER_EPOCH, int(config.num_epochs * s.steps_per_epoch))
    assert s.state.params["Logits"]["kernel"].shape[-1] == 7
    assert int(s.state.step) == 0 and s.mesh.devices.size == jax.device_count()
    with pytest.raises(checks.ConfigError, match="dataset.name='no_such_dataset' cannot be read"):
        setup_lib.setup(config)
