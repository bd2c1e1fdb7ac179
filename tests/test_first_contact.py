"""First contact: what a new user's first commands answer.

Each mistake gets one line saying what is wrong and how to fix it, before anything
compiles: ImageNet not prepared, a misspelt or mistyped `--config.FIELD`, eval.py
on a workdir without a checkpoint. And eval.py logs its result at the checkpoint's
step, so it lines up with the training curves in TensorBoard. One tiny training
run serves every test that needs a checkpoint.
"""

import importlib
import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest
import tensorflow_datasets as tfds

from inception_flax import cli
from inception_flax.data.info import data_info
from inception_flax.training import checks, evaluate, loop
from tests import runs
from tests.test_fault_bad_config import fails_before_compile, no_compile

CONFIG = os.path.join(runs.ROOT, "configs", "inception_resnet_v2.py")
STEPS = 2  # the tiny run's length; it checkpoints at every step


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step run of the tiny digits config, with checkpoints at steps 1 and 2."""
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    loop.train_and_evaluate(runs.config(STEPS, 1), workdir)
    assert runs.checkpoint_steps(workdir) == [1, STEPS]
    return workdir


# ---- ImageNet not prepared ------------------------------------------------------------

@pytest.mark.parametrize("prepare, then", [
    (False, "then add --config.dataset.prepare=True"),
    (True, "then run again"),  # prepare=True cannot build it without the manual files
])
def test_unprepared_imagenet_says_where_tfds_looked_and_what_it_needs(tmp_path, prepare, then):
    """The design's main command on a machine without ImageNet: not "set steps_per_epoch"."""
    config = importlib.import_module("configs.inception_resnet_v2").get_config()
    data_dir = tmp_path / "tfds"
    config.dataset.data_dir = str(data_dir)
    config.dataset.prepare = prepare
    line = fails_before_compile(config, tmp_path / "run",
                                f"^dataset imagenet2012 is not prepared in data_dir {data_dir} ")
    for needed in (
            f"(no {data_dir}/imagenet2012/5.1.0/dataset_info.json)",
            "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
            f"in {data_dir}/downloads/manual, {then}",
            f"`tfds build imagenet2012 --data_dir={data_dir}`",
            "--config.dataset.name=folder:/path (/path/train/<label>/*.jpg",
            "--config=configs/inception_resnet_v2.py:digits"):
        assert needed in line
    assert "steps_per_epoch" not in line
    downloaded = [f for _, _, files in os.walk(data_dir) for f in files]
    assert downloaded == []


def test_a_prepared_split_of_unknown_size_still_asks_for_steps_per_epoch(tmp_path):
    """The steps_per_epoch advice stays for datasets that are there but do not state sizes
    (TFDS's mock data reads from its own directory: nothing is missing in data_dir)."""
    config = runs.config(2, 2, **{"dataset.name": "imagenet2012",
                                  "dataset.data_dir": str(tmp_path), "dataset.prepare": False})
    with tfds.testing.mock_data(num_examples=8):
        info = data_info(config)
    assert info.train_examples is None
    with pytest.raises(checks.ConfigError, match="the size of imagenet2012:train is unknown: "
                                                 "set --config.steps_per_epoch"):
        checks.durations(config, info)


# ---- a misspelt or mistyped --config.FIELD ---------------------------------------------

def parse(*overrides: str):
    """The entry scripts' parsing of `--config=CONFIG:digits` and `overrides`, in a fresh
    set of flags."""
    argv = ["train.py", f"--config={CONFIG}:digits", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values,
                                    sys_argv=argv)
    cli.parse_flags(argv, flag_values)
    return flag_values.config


@pytest.mark.parametrize("override, line", [
    ("--config.learnin_rate=0.1", "--config.learnin_rate: config has no field 'learnin_rate': "
                                  "did you mean --config.learning_rate?"),
    ("--config.model.dropot_rate=0.1", "--config.model.dropot_rate: config.model has no field "
                                       "'dropot_rate': did you mean --config.model.dropout_rate?"),
    ("--config.modl.name=inception_v3", "--config.modl.name: config has no field 'modl': "
                                        "did you mean --config.model.name?"),
    ("--config.batch_size=abc", "--config.batch_size=abc: batch_size takes an int "
                                "(e.g. --config.batch_size=32), not 'abc'"),
    ("--config.model.aux_logits=maybe", "--config.model.aux_logits=maybe: model.aux_logits "
                                        "takes a bool (e.g. --config.model.aux_logits=True), "
                                        "not 'maybe'"),
])
def test_a_bad_override_is_one_line_with_the_fix(capsys, override, line):
    with pytest.raises(SystemExit) as exit_:
        parse("--config.learning_rate=0.1", override)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {line}\n"


def test_good_overrides_still_apply():
    config = parse("--config.learning_rate=0.5", "--config.model.dropout_rate=0.3",
                   "--config.dataset.area_range=(0.3, 1.0)")
    assert (config.learning_rate, config.model.dropout_rate) == (0.5, 0.3)
    assert tuple(config.dataset.area_range) == (0.3, 1.0)


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_the_entry_scripts_answer_a_misspelt_field_in_one_line(tmp_path, script):
    cmd = [sys.executable, os.path.join(runs.ROOT, script), f"--config={CONFIG}:digits",
           f"--workdir={tmp_path}", "--config.learnin_rate=0.1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=runs.ROOT, env=runs.env(),
                         timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "error: --config.learnin_rate: config has no field 'learnin_rate': "
        "did you mean --config.learning_rate?")
    assert "Traceback" not in out.stderr
    assert os.listdir(tmp_path) == []


# ---- eval.py ---------------------------------------------------------------------------

def test_eval_of_a_workdir_without_a_checkpoint_names_the_real_problem(tmp_path):
    """A run before its first checkpoint: orbax's unfinished step directory does not count."""
    workdir = tmp_path / "run"
    os.makedirs(workdir / "checkpoints" / "2.orbax-checkpoint-tmp-1")
    config = runs.config(2, 2)
    with no_compile(), pytest.raises(checks.ConfigError) as err:
        evaluate.evaluate_checkpoint(config, str(workdir))
    assert str(err.value) == (
        f"--workdir={workdir} holds no checkpoint yet (no {workdir}/checkpoints/<step>/): "
        f"train first (train.py --workdir={workdir} checkpoints every "
        "--config.checkpoint_every_steps and at the end), or pass --checkpoint=PATH "
        "(a run's workdir or converted weights)")
    with no_compile(), pytest.raises(checks.ConfigError, match=(
            "^--checkpoint=.* is neither converted weights .no model.json. nor a run's workdir "
            "with a checkpoint")):
        evaluate.evaluate_checkpoint(config, None, str(workdir))


def test_eval_logs_at_the_checkpoints_step(tiny_run):
    """TensorBoard shows eval.py's result at the step of the checkpoint it evaluated (the
    newest), so it lines up with the training curves; eval.py prints that step too."""
    result = evaluate.evaluate_checkpoint(runs.config(STEPS, 1), tiny_run)
    assert result["step"] == STEPS
    for tag in ("eval/top1", "eval/top5", "eval/loss"):
        assert list(runs.logged(os.path.join(tiny_run, "eval"), tag)) == [STEPS], tag

