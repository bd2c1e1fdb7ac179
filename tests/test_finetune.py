"""Fine-tuning end to end: reference weights converted, trained on with another class count
(`train.py --config.init_from=DIR`), evaluated (`eval.py --checkpoint`); and `init_from`
another run's workdir, which starts from its moving average.

The reference is torchvision's GoogLeNet (the smallest network) with random weights and
random BatchNorm statistics, built and written by a PyTorch subprocess (TensorFlow and
PyTorch do not share a process here), for 11 classes; the digits have 10. It trains at
full width (the converted weights' width) on 32x32 images for 2 steps. The digits
preset warms the learning rate up from 0, so step 1 changes no parameter: checkpoint 1
holds the parameters the run started from.
"""

import contextlib
import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from inception_flax import convert, pretrained
from inception_flax.training import checks, loop
from tests import runs

# Looked up, not imported: PyTorch runs in a subprocess only.
if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
    pytest.skip("the reference weights need torch and torchvision", allow_module_level=True)

ROOT = runs.ROOT
SOURCE = "torchvision:googlenet"
CONFIG = os.path.join(ROOT, "configs", "inception_v1.py") + ":digits"
HEADS = ["AuxLogits_4a", "AuxLogits_4d", "Logits"]
FLAGS = ["--config.model.depth_multiplier=1.0", "--config.image_size=32",
         "--config.batch_size=4", "--config.eval_batch_size=4", "--config.num_eval_steps=1",
         "--config.log_every_steps=1", "--config.checkpoint_every_steps=1",
         "--config.warmup_epochs=1", "--config.log_input_images=false",
         f"--config.dataset.data_dir={os.environ['TFDS_DATA_DIR']}"]
# Written by a PyTorch process: the reference network of tests/test_convert.py, randomised.
WRITE_REFERENCE = """
import sys, torch
from tests import test_convert as t
case = t.CASES[sys.argv[1]]
torch.manual_seed(0)
print(t.write_weights(t.randomize(case.build(), case.head_gain, seed=0).state_dict(),
                      sys.argv[2], case.fmt))
"""


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def train(workdir: str, steps: int, init_from: str, *flags: str) -> str:
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={CONFIG}",
           f"--workdir={workdir}", f"--config.init_from={init_from}",
           f"--config.num_train_steps={steps}", *FLAGS, *flags]
    return runs.Run(cmd, workdir + ".log").wait_ok(timeout=900)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[str, list[str]]:
    """The converted weights' directory, and the model flags the converter prints."""
    tmp = tmp_path_factory.mktemp("finetune")
    made = subprocess.run([sys.executable, "-c", WRITE_REFERENCE, SOURCE, str(tmp / "ref")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = convert.main(["--source", SOURCE, "--weights", made.stdout.split()[-1],
                             "--out", str(tmp / "weights")])
    assert code == 0, out.getvalue()
    (line,) = [ln for ln in out.getvalue().splitlines() if ln.startswith("train with: ")]
    model_flags = [f for f in line.split()[2:] if f.startswith("--config.model.")]
    assert "--config.model.layout=torchvision" in model_flags
    return str(tmp / "weights"), model_flags


@pytest.fixture(scope="module")
def tuned(converted, tmp_path_factory) -> dict[str, str]:
    """Run A: 2 steps from the converted weights. Run B: 1 step from A's workdir."""
    weights, model_flags = converted
    tmp = tmp_path_factory.mktemp("tuned")
    a, b = str(tmp / "a"), str(tmp / "b")
    out_a = train(a, 2, weights, *model_flags)
    out_b = train(b, 1, a, *model_flags)
    return {"weights": weights, "a": a, "b": b, "out_a": out_a, "out_b": out_b}


@pytest.mark.xdist_group("finetune")
def test_fine_tuning_starts_from_the_converted_weights_with_new_heads(tuned):
    source = flat({k: v for k, v in pretrained.restore_variables(tuned["weights"]).items()
                   if k == "params"})
    assert runs.logged(tuned["a"], "train/learning_rate")[1] == [0.0]  # step 1 moves nothing
    start, after = runs.read_state(tuned["a"], 1), runs.read_state(tuned["a"], 2)
    params = [k for k in start if k.startswith("['params']")]
    body = [k for k in params if not any(f"['{h}']" in k for h in HEADS)]
    assert len(body) > 100 and all(np.array_equal(start[k], source[k]) for k in body)
    stem = [k for k in params if k.startswith("['params']['Conv2d_1_7x7']")]
    assert stem and not all(np.array_equal(after[k], start[k]) for k in stem)  # step 2 trains
    assert start["['params']['Logits']['kernel']"].shape[-1] == 10
    assert source["['params']['Logits']['kernel']"].shape[-1] == 11
    # Every weight of each head is new, also those whose shape the class count leaves alone.
    for head in HEADS:
        same_shape = [k for k in params if f"['{head}']" in k and k in source
                      and start[k].shape == source[k].shape]
        assert same_shape or head == "Logits"
        assert not any(np.array_equal(start[k], source[k]) for k in same_shape), head
    assert "re-initialised heads: AuxLogits_4a, AuxLogits_4d, Logits" in tuned["out_a"]


@pytest.mark.xdist_group("finetune")
def test_init_from_a_workdir_starts_from_its_moving_average(tuned):
    assert "re-initialised heads: none" in tuned["out_b"]
    start, a = runs.read_state(tuned["b"], 1), runs.read_state(tuned["a"], 2)
    params = [k for k in start if k.startswith("['params']")]
    assert all(np.array_equal(start[k], a[k.replace("params", "ema_params", 1)]) for k in params)
    assert not all(np.array_equal(start[k], a[k]) for k in params)  # not A's raw parameters


@pytest.mark.xdist_group("finetune")
def test_eval_py_evaluates_the_fine_tuned_run(tuned):
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), f"--config={CONFIG}",
           f"--checkpoint={tuned['a']}", *FLAGS, "--config.model.layout=torchvision"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=runs.env(),
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (result["step"], result["examples"]) == (2, 4)
    # The run's own evaluation at its last step (its moving average, the same batch).
    assert result["loss"] == pytest.approx(runs.logged(tuned["a"], "eval/loss")[2][0], rel=1e-4)
    assert result["top1"] == pytest.approx(runs.logged(tuned["a"], "eval/top1")[2][0])


def digits_config(**fields):
    return runs.override(importlib.import_module("configs.inception_v1").get_config("digits"), {
        "dataset.data_dir": os.environ["TFDS_DATA_DIR"], "kernels": "plain",
        "model.layout": "torchvision", **fields})


@pytest.mark.xdist_group("finetune")  # shares the converted weights
def test_full_width_weights_on_the_quarter_width_preset_advise_the_width(converted, tmp_path):
    config = digits_config(init_from=converted[0])  # the preset's depth_multiplier: 0.25
    with pytest.raises(checks.ConfigError) as error:
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    message = str(error.value)
    assert message.startswith("init_from weights do not fit") and "\n" not in message
    assert "train with --config.model.name=inception_v1 --config.model.depth_multiplier=1.0 " \
           "--config.model.layout=torchvision" in message
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_init_from_a_missing_directory_is_named_once(tmp_path):
    config = digits_config(init_from=str(tmp_path / "nowhere"))
    with pytest.raises(checks.ConfigError) as error:
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    message = str(error.value)
    assert message.count("init_from=") == 1 and message.count("nowhere") == 1, message
    assert message.startswith(f"init_from={tmp_path / 'nowhere'} is neither converted weights")
