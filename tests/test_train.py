"""The trainer: configs, checks before compile, every variant's step; that it learns, in the
user's setting (one train.py run: one device, XLA's default optimisation) and in bfloat16;
logs, checkpoints, resume and eval.py on that run. Fine-tuning: tests/test_finetune.py."""

import glob
import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator

from inception_flax.training import checks, loop, mesh, step
from inception_flax.training import setup as setup_lib
from tests import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ["TFDS_DATA_DIR"]
BF16_STEPS = 20
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


# ----------------------------------------------------------------------------
# It learns, in the user's setting: one train.py run of GoogLeNet on the digits
# ----------------------------------------------------------------------------

USER_STEPS = 132  # 3 epochs of the digits at batch 32
USER_CONFIG = os.path.join(ROOT, "configs", "inception_v1.py") + ":digits"


def user_train_command(workdir: str, steps: int) -> list[str]:
    """The digits preset of GoogLeNet (quarter width, 64 px, batch 32), logging every step."""
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--config={USER_CONFIG}",
            f"--workdir={workdir}", f"--config.num_train_steps={steps}",
            "--config.log_every_steps=1", "--config.checkpoint_every_steps=66",
            "--config.eval_every_steps=66", f"--config.dataset.data_dir={DATA_DIR}"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """`train.py` as a user runs it: one CPU device, XLA's default optimisation level."""
    workdir = str(tmp_path_factory.mktemp("digits"))
    run = runs.Run(user_train_command(workdir, USER_STEPS), os.path.join(workdir, "..", "log"),
                   runs.user_env())
    return workdir, run.wait_ok(timeout=900)


def texts(workdir: str) -> dict[str, str]:
    """The Text summaries of a run, by tag."""
    acc = plugin_event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.PluginTagToContent("text") if "text" in acc.ActivePlugins() else {}
    return {tag: tf.make_ndarray(acc.Tensors(tag)[0].tensor_proto).item().decode()
            for tag in tags}


@pytest.mark.xdist_group("digits_run")
def test_digits_run_learns_in_the_users_setting(digits_run):
    workdir, output = digits_run
    assert "process 0 of 1, 1 devices" in output
    loss = runs.logged(workdir, "train/main_loss")
    assert sorted(loss) == list(range(1, USER_STEPS + 1))
    first = np.mean([loss[s][0] for s in range(1, 12)])
    last = np.mean([loss[s][0] for s in range(USER_STEPS - 10, USER_STEPS + 1)])
    assert last < 0.5 * first, (first, last)  # ln(10) = 2.30 at the start
    top1 = runs.logged(workdir, "eval/top1")
    assert sorted(top1) == [66, USER_STEPS]
    assert top1[USER_STEPS][0] >= 0.6, top1  # chance: 0.1; 0.92-0.98 measured


@pytest.mark.xdist_group("digits_run")
def test_digits_run_logs_checkpoints_and_describes_itself(digits_run):
    workdir, _ = digits_run
    for tag in ("train/loss", "train/main_loss", "train/aux_loss", "train/top1",
                "train/learning_rate", "train/grad_norm", "train/images_per_sec",
                "train/steps_per_sec", "train/skipped_images", "eval/top1", "eval/top5",
                "eval/loss"):
        assert runs.logged(workdir, tag), tag
    assert runs.checkpoint_steps(workdir) == [66, USER_STEPS]
    with open(os.path.join(workdir, "run.json")) as f:
        assert json.load(f)["model"] == "inception_v1"
    with open(os.path.join(workdir, "labels.txt")) as f:  # the dataset's class names
        assert f.read().split() == [str(i) for i in range(10)]
    described = texts(workdir)
    assert {"config", "parameters"} <= set(described), sorted(described)
    assert "name: inception_v1" in described["config"]
    assert "depth_multiplier: 0.25" in described["config"]
    table = described["parameters"]
    assert "Conv2d_1_7x7" in table and "AuxLogits_4a" in table and "Total" in table
    acc = plugin_event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    assert "train/input_images" in acc.PluginTagToContent("images")


@pytest.mark.xdist_group("digits_run")
def test_eval_py_reports_the_runs_top1_from_its_moving_average(digits_run):
    workdir, _ = digits_run
    state = runs.read_state(workdir, runs.checkpoint_steps(workdir)[-1])
    ema = [k for k in state if k.startswith("['ema_params']")]
    assert ema and any(not np.array_equal(state[k], state[k.replace("ema_params", "params")])
                       for k in ema)
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), f"--config={USER_CONFIG}",
           f"--workdir={workdir}", f"--config.dataset.data_dir={DATA_DIR}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=runs.user_env(), cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    step = result["step"]
    assert result["examples"] == 360  # the whole test split, each example once
    # The training loop evaluated the moving average at that step: the same figures.
    assert result["top1"] == pytest.approx(runs.logged(workdir, "eval/top1")[step][0], abs=1e-6)
    assert result["loss"] == pytest.approx(runs.logged(workdir, "eval/loss")[step][0], rel=1e-4)
    assert runs.logged(os.path.join(workdir, "eval"), "eval/top1") == {
        step: [pytest.approx(result["top1"], abs=1e-6)]}


@pytest.mark.xdist_group("digits_run")
def test_rerun_resumes_and_continues_the_step_counter(digits_run):
    workdir, _ = digits_run
    runs.Run(user_train_command(workdir, USER_STEPS + 2), os.path.join(workdir, "..", "log2"),
             runs.user_env()).wait_ok(timeout=600)
    loss = runs.logged(workdir, "train/loss")
    assert sorted(loss) == list(range(1, USER_STEPS + 3))  # no gap
    assert all(len(v) == 1 for v in loss.values())  # no repeat
    assert runs.checkpoint_steps(workdir)[-1] == USER_STEPS + 2


# ----------------------------------------------------------------------------
# bfloat16, on a folder of JPEGs with a corrupt one
# ----------------------------------------------------------------------------

def write_digit_jpegs(root: str, count: int) -> str:
    """`count` images of the digits 0 and 1 as JPEGs in root/train/<digit>/, and one file
    that is no JPEG."""
    from sklearn import datasets as sk_datasets

    from inception_flax.data import digits

    data = sk_datasets.load_digits(n_class=2)
    for i in range(count):
        label_dir = os.path.join(root, "train", str(data.target[i]))
        os.makedirs(label_dir, exist_ok=True)
        tf.io.write_file(os.path.join(label_dir, f"{i}.jpg"),
                         tf.io.encode_jpeg(digits.to_rgb_uint8(data.images[i])))
    with open(os.path.join(root, "train", "1", "corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8 no image here" * 4)
    return root


def test_bfloat16_training_lowers_the_loss_and_counts_skipped_images(tmp_path):
    root = write_digit_jpegs(str(tmp_path / "jpegs"), 160)
    config = tiny(load_config("inception_v1", "digits"), num_train_steps=BF16_STEPS,
                  batch_size=16, image_size=32, warmup_epochs=0.0, learning_rate=0.05,
                  checkpoint_every_steps=100,
                  num_eval_steps=1, log_input_images=False, **{
                      "model.dtype": "bfloat16", "dataset.name": f"folder:{root}",
                      "dataset.eval_split": "train", "dataset.prepare": False})
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)
    loss = runs.logged(workdir, "train/main_loss")
    assert sorted(loss) == list(range(1, BF16_STEPS + 1))
    first = np.mean([loss[s][0] for s in range(1, 5)])
    last = np.mean([loss[s][0] for s in range(BF16_STEPS - 3, BF16_STEPS + 1)])
    skipped = runs.logged(workdir, "train/skipped_images")[BF16_STEPS][0]
    failures = ([f"the loss went from {first:.3f} to {last:.3f}"] if last >= 0.5 * first else []
                ) + ([f"{skipped} skipped images"] if skipped < 1 else [])  # once per epoch
    assert not failures, failures  # ln(2) = 0.69 at the start


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
