"""Sweeps: grids of overrides, run names, sweep.py, its results table, and TensorBoard's view.

One tiny sweep (2 runs x 6 steps on the embedded digits, through sweep.py and
train.py subprocesses) is trained once per module, as a user whose sweep is
interrupted would: stopped by SIGTERM while its first run trains, then run again
to the end. The tests that read it share the xdist group "sweep".
"""

import csv
import glob
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from inception_flax import sweep as sweep_lib
from inception_flax import sweep_results
from tests import runs as train_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/inception_resnet_v2.py:digits"
RUNS = {  # the "smoke" sweep of configs/inception_resnet_v2.py
    "model.residual_scale=0.1,label_smoothing=0.0,learning_rate=0.02":
        {"model.residual_scale": 0.1, "label_smoothing": 0.0, "learning_rate": 0.02},
    "model.residual_scale=0.3,label_smoothing=0.1,learning_rate=0.01":
        {"model.residual_scale": 0.3, "label_smoothing": 0.1, "learning_rate": 0.01},
}
SCALARS = ("train/loss", "train/main_loss", "train/aux_loss", "train/top1",
           "train/learning_rate", "train/grad_norm", "train/images_per_sec",
           "train/steps_per_sec", "eval/top1", "eval/top5", "eval/loss")
NUM_STEPS = 6
CHECKPOINT_EVERY = 2


def irv2_config(preset: str = "digits"):
    return importlib.import_module("configs.inception_resnet_v2").get_config(preset)


def tiny_flags() -> list[str]:
    flags = ["--config.model.depth_multiplier=0.25", "--config.image_size=75",
             "--config.batch_size=4", "--config.eval_batch_size=4",
             f"--config.num_train_steps={NUM_STEPS}", "--config.log_every_steps=1",
             f"--config.eval_every_steps={NUM_STEPS}", "--config.num_eval_steps=2",
             f"--config.checkpoint_every_steps={CHECKPOINT_EVERY}", "--config.log_input_images=true",
             f"--config.dataset.data_dir={os.environ['TFDS_DATA_DIR']}"]
    if "scan_unroll" in irv2_config().model:  # the quickest compile: repeated blocks in a loop
        flags.append("--config.model.scan_unroll=1")
    return flags


def sweep_command(workdir: str, *args: str, sweep: str = "smoke") -> list[str]:
    return [sys.executable, "sweep.py", f"--config={CONFIG}", f"--sweep={sweep}",
            f"--workdir={workdir}", *tiny_flags(), *args]


def sweep_py(workdir: str, *args: str, sweep: str = "smoke", timeout: float = 600):
    return subprocess.run(sweep_command(workdir, *args, sweep=sweep), capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


# ----------------------------------------------------------------------------
# Building and resolving sweeps (no training)
# ----------------------------------------------------------------------------

def test_product_zip_and_chain():
    grid = sweep_lib.product(residual_scale=[0.1, 0.3], label_smoothing=[0.0, 0.1])
    assert grid.runs == [
        {"residual_scale": 0.1, "label_smoothing": 0.0},
        {"residual_scale": 0.1, "label_smoothing": 0.1},
        {"residual_scale": 0.3, "label_smoothing": 0.0},
        {"residual_scale": 0.3, "label_smoothing": 0.1}]
    paired = sweep_lib.zip({"batch_size": [32, 64]}, learning_rate=[0.02, 0.04])
    assert paired.runs == [{"batch_size": 32, "learning_rate": 0.02},
                           {"batch_size": 64, "learning_rate": 0.04}]
    nested = sweep_lib.product(paired, seed=[0, 1])
    assert len(nested) == 4 and nested.runs[1] == {"batch_size": 32, "learning_rate": 0.02,
                                                   "seed": 1}
    assert len(paired + grid) == 6 and len(paired * grid) == 8
    with pytest.raises(sweep_lib.SweepError, match="one length"):
        sweep_lib.zip(batch_size=[32, 64], learning_rate=[0.1])
    with pytest.raises(sweep_lib.SweepError, match="list of values"):
        sweep_lib.product(optimizer="sgd")
    with pytest.raises(sweep_lib.SweepError, match="swept twice"):
        sweep_lib.product(sweep_lib.product(seed=[0]), seed=[1])


def test_resolve_names_runs_after_their_typed_overrides():
    config = irv2_config()
    runs = sweep_lib.resolve(sweep_lib.product(residual_scale=[0.1], label_smoothing=[0, 0.1]),
                             config)
    assert [r.name for r in runs] == ["model.residual_scale=0.1,label_smoothing=0.0",
                                      "model.residual_scale=0.1,label_smoothing=0.1"]
    assert runs[0].overrides == {"model.residual_scale": 0.1, "label_smoothing": 0.0}
    assert runs[0].flags() == ["--config.model.residual_scale=0.1",
                               "--config.label_smoothing=0.0"]
    odd = sweep_lib.resolve(sweep_lib.product({
        "model.residual_scales": [(0.1, 0.2, 0.3)], "dataset.data_dir": ["/data/tf ds"],
        "model.remat": [True]}), config)[0]
    assert odd.name == ("model.residual_scales=0.1_0.2_0.3,dataset.data_dir=data_tf_ds,"
                        "model.remat=true")
    assert odd.flags()[0] == "--config.model.residual_scales=(0.1, 0.2, 0.3)"
    assert "/" not in sweep_lib.run_name({"x": "a/b"})
    assert len(sweep_lib.run_name({"dataset.data_dir": "x" * 500})) <= sweep_lib.MAX_NAME


@pytest.mark.parametrize("sweep, message", [
    (sweep_lib.product(name=["inception_v3"]), "ambiguous: write one of dataset.name, model.name"),
    (sweep_lib.product(residual_scal=[0.1]), "'residual_scal' is not a config field"),
    (sweep_lib.product(batch_size=[32.5]), "batch_size=32.5: Could not override"),
    (sweep_lib.product(seed=[1, 1]), "runs 0 and 1 are the same"),
])
def test_bad_sweeps_fail_before_anything_runs(sweep, message):
    with pytest.raises(sweep_lib.SweepError, match=message):
        sweep_lib.resolve(sweep, irv2_config())


def test_every_named_sweep_resolves_and_passes_the_trainer_checks():
    from inception_flax.training import checks
    module = importlib.import_module("configs.inception_resnet_v2")
    with pytest.raises(sweep_lib.UnknownSweepError) as err:
        module.get_sweep("nope")
    names = re.search(r"choose one of (.*)", str(err.value)).group(1).split(", ")
    assert {"residual_scale", "smoke"} <= set(names)
    for name in names:
        for preset in ("", "digits"):
            config = irv2_config(preset)
            for run in sweep_lib.resolve(module.get_sweep(name), config):
                checks.check_config(sweep_lib.apply(config, run))
    grid = sweep_lib.resolve(module.get_sweep("residual_scale"), irv2_config())
    assert len(grid) == 6 and grid[0].name == "model.residual_scale=0.1,label_smoothing=0.0"


def test_run_state_reads_finalised_checkpoints(tmp_path):
    run = str(tmp_path / "run")
    assert sweep_results.run_state(run, 4).status == "new"
    os.makedirs(os.path.join(run, "checkpoints", "2"))
    os.makedirs(os.path.join(run, "checkpoints", "4.orbax-checkpoint-tmp-17"))  # unfinished
    state = sweep_results.run_state(run, 4)
    assert (state.status, state.step, state.describe()) == (
        "partial", 2, "resumes from step 2 of 4")
    assert sweep_results.run_state(run, None).status == "started"
    os.makedirs(os.path.join(run, "checkpoints", "4"))
    assert sweep_results.run_state(run, 4).status == "finished"


def test_unknown_sweep_is_one_line_listing_the_known_ones(tmp_path):
    out = sweep_py(str(tmp_path), sweep="nope", timeout=120)
    assert out.returncode == 2
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert errors == ["error: configs/inception_resnet_v2.py: unknown sweep 'nope': choose one "
                      "of batch_lr, learning_rate, residual_scale, scale_only, smoke"]
    assert not os.listdir(tmp_path)


def test_dry_run_prints_each_train_command_and_state(tmp_path):
    names = list(RUNS)
    os.makedirs(tmp_path / names[0] / "checkpoints" / str(NUM_STEPS))
    os.makedirs(tmp_path / names[1] / "checkpoints" / "1")
    out = sweep_py(str(tmp_path), "--dry-run", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert f"# [1/2] {names[0]}: finished (step {NUM_STEPS}) (skipped)" in lines
    assert f"# [2/2] {names[1]}: resumes from step 1 of {NUM_STEPS}" in lines
    commands = [l for l in lines if " train.py " in l]
    assert len(commands) == 2
    assert commands[1].startswith(f"{sys.executable} train.py --config={CONFIG} "
                                  f"--workdir={tmp_path}/{names[1]} ")
    assert commands[1].endswith(" ".join(tiny_flags()) + " --config.model.residual_scale=0.3 "
                                "--config.label_smoothing=0.1 --config.learning_rate=0.01")
    assert sorted(os.listdir(tmp_path)) == sorted(names)  # nothing written


def test_a_swept_field_cannot_also_be_an_extra_override(tmp_path):
    out = sweep_py(str(tmp_path), "--config.label_smoothing=0.2", timeout=120)
    assert out.returncode == 2
    assert "error: sweep 'smoke': --config.label_smoothing is one of the swept fields" in out.stderr


# ----------------------------------------------------------------------------
# A tiny sweep, trained once
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """The smoke sweep: SIGTERM to sweep.py once its first run has checkpointed step 2 of 6,
    then the same command again. Returns the workdir, the second sweep's output and the
    first run's train.log after the interruption."""
    workdir = str(tmp_path_factory.mktemp("sweep"))
    first = os.path.join(workdir, list(RUNS)[0])
    stopped = train_runs.Run(sweep_command(workdir), workdir + ".log")
    # orbax renames a checkpoint's directory into place once it is complete.
    train_runs.wait_for_checkpoint(stopped, first, timeout=600)
    stopped.proc.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=300) == 128 + signal.SIGTERM, stopped.output()[-3000:]
    with open(os.path.join(first, "train.log")) as f:
        interrupted = f.read()
    last_checkpoint = train_runs.checkpoint_steps(first)[-1]
    out = sweep_py(workdir)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return workdir, out.stdout, (interrupted, last_checkpoint)


def _multiplexer(workdir: str):
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    mux = plugin_event_multiplexer.EventMultiplexer(size_guidance={"tensors": 0})
    mux.AddRunsFromDirectory(workdir)
    mux.Reload()
    return mux


@pytest.mark.xdist_group("sweep")
def test_each_run_logs_every_tag_its_hparams_and_the_input_grid(tiny_sweep):
    from tensorboard.plugins.hparams import metadata as hp_metadata
    from tensorboard.util import tensor_util
    workdir, _, _ = tiny_sweep
    mux = _multiplexer(workdir)
    assert set(mux.Runs()) == set(RUNS)
    scalars = mux.PluginRunToTagToContent("scalars")
    hparams = mux.PluginRunToTagToContent(hp_metadata.PLUGIN_NAME)
    images = mux.PluginRunToTagToContent("images")
    tag_sets = []
    for run, overrides in RUNS.items():
        assert set(SCALARS) <= set(scalars[run]), (run, sorted(scalars[run]))
        tag_sets.append(set(scalars[run]))
        assert [e.step for e in mux.Tensors(run, "train/loss")] == list(range(1, NUM_STEPS + 1))
        assert [e.step for e in mux.Tensors(run, "eval/top1")] == [NUM_STEPS]

        info = hp_metadata.parse_session_start_info_plugin_data(
            hparams[run][hp_metadata.SESSION_START_INFO_TAG])
        for field, value in overrides.items():
            assert info.hparams[field].number_value == pytest.approx(value), (run, field)
        assert info.hparams["model.depth_multiplier"].number_value == 0.25
        assert info.hparams["num_train_steps"].number_value == NUM_STEPS

        assert "train/input_images" in images[run]
        (event,) = mux.Tensors(run, "train/input_images")
        width, height, png = tensor_util.make_ndarray(event.tensor_proto)
        assert event.step == 0 and png.startswith(b"\x89PNG")
        assert (int(width), int(height)) == (2 * 75, 75)  # one device's 2 images, side by side
    assert tag_sets[0] == tag_sets[1]  # the same tags in every run


@pytest.mark.xdist_group("sweep")
def test_results_table_has_a_row_per_run(tiny_sweep):
    workdir, stdout, _ = tiny_sweep
    with open(os.path.join(workdir, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == list(RUNS)
    for row in rows:
        assert row["status"] == "finished" and int(row["step"]) == NUM_STEPS
        assert float(row["final_train_loss"]) > 0
        assert 0.0 <= float(row["best_eval_top1"]) <= float(row["best_eval_top5"]) <= 1.0
        assert float(row["images_per_sec"]) > 0 and float(row["wall_time_s"]) > 0
    assert rows[0]["overrides"] == ("model.residual_scale=0.1, label_smoothing=0.0, "
                                    "learning_rate=0.02")
    with open(os.path.join(workdir, "results.md")) as f:
        table = f.read()
    assert table.startswith("| run | overrides | status | step | final train loss | "
                            "best eval top-1 | best eval top-5 | images/s | wall time |")
    assert table in stdout
    assert all(f"| {name} |" in table for name in RUNS)
    for name in RUNS:
        with open(os.path.join(workdir, name, "train.log")) as f:
            assert "$ " in f.readline() + f.readline()


@pytest.mark.xdist_group("sweep")
def test_an_interrupted_sweep_resumes_and_logs_each_step_once(tiny_sweep):
    workdir, stdout, (interrupted, last_checkpoint) = tiny_sweep
    names = list(RUNS)
    # SIGTERM reached the trainer, which checkpointed where it was and exited.
    steps = re.findall(r"preempted: checkpoint written at step (\d+)", interrupted)
    assert len(steps) == 1, interrupted[-3000:]
    step = int(steps[0])
    assert CHECKPOINT_EVERY < step < NUM_STEPS and last_checkpoint == step
    assert f"[1/2] {names[0]}: resumes from step {step} of {NUM_STEPS}: training" in stdout
    assert f"[2/2] {names[1]}: new: training" in stdout
    for name in names:
        logged = train_runs.logged(os.path.join(workdir, name), "train/loss")
        assert {s: len(v) for s, v in logged.items()} == {
            s: 1 for s in range(1, NUM_STEPS + 1)}, (name, logged)


def test_a_misspelt_override_is_one_line(tmp_path):
    out = sweep_py(str(tmp_path), "--config.learnin_rate=0.1", timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: --config.learnin_rate: config has no field 'learnin_rate': did you mean "
        "--config.learning_rate?")
    assert "Traceback" not in out.stderr and not os.listdir(tmp_path)


@pytest.mark.xdist_group("sweep")
def test_rerun_skips_finished_runs(tiny_sweep):
    workdir, _, _ = tiny_sweep
    events = sorted(glob.glob(os.path.join(workdir, "*", "events.out.tfevents.*")))
    out = sweep_py(workdir, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for i, name in enumerate(RUNS, 1):
        assert f"[{i}/2] {name}: finished (step {NUM_STEPS}): skipped" in out.stdout
    assert "training" not in out.stdout
    assert sorted(glob.glob(os.path.join(workdir, "*", "events.out.tfevents.*"))) == events
    results = sweep_py(workdir, "--results-only", timeout=300)
    assert results.returncode == 0 and all(f"| {n} |" in results.stdout for n in RUNS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, request: dict | None = None):
    url = base + path
    if request is not None:
        url += "?" + urllib.parse.urlencode({"request": json.dumps(request)})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.xdist_group("sweep")
def test_tensorboard_serves_runs_tags_images_and_hparams(tiny_sweep):
    workdir, _, _ = tiny_sweep
    base = f"http://127.0.0.1:{_free_port()}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", f"--logdir={workdir}", "--host=127.0.0.1",
         f"--port={base.rsplit(':', 1)[1]}", "--load_fast=false", "--reload_interval=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, runs, tags, last_error = time.time() + 120, [], {}, None
        while time.time() < deadline:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                runs = _get(base, "/data/runs")
                tags = _get(base, "/data/plugin/scalars/tags")
                if set(runs) == set(RUNS) and all(set(SCALARS) <= set(tags.get(r, {}))
                                                  for r in RUNS):
                    break
            except OSError as e:  # not listening yet
                last_error = e
            time.sleep(1)
        else:
            pytest.fail(f"TensorBoard listed runs {runs} (tags of {sorted(tags)}); "
                        f"last error {last_error}")

        images = _get(base, "/data/plugin/images/tags")
        assert all("train/input_images" in images[r] for r in RUNS)

        experiment = _get(base, "/data/plugin/hparams/experiment",
                          {"experimentName": "", "includeMetrics": True})
        infos = {h["name"]: h for h in experiment["hparamInfos"]}
        for field in ("model.residual_scale", "label_smoothing", "learning_rate"):
            assert infos[field]["differs"], field
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"eval/top1", "eval/top5", "train/loss"} <= metrics

        groups = _get(base, "/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 10, "includeMetrics": True,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                "STATUS_RUNNING"],
            "colParams": [{"hparam": "model.residual_scale"}, {"hparam": "label_smoothing"},
                          {"hparam": "learning_rate"}, {"metric": {"tag": "eval/top1"}}]})
        seen = {}
        for group in groups["sessionGroups"]:
            (session,) = group["sessions"]
            seen[session["name"]] = group["hparams"]
            assert {m["name"]["tag"] for m in group["metricValues"]} >= {"eval/top1"}
        assert set(seen) == set(RUNS)
        for run, overrides in RUNS.items():
            for field, value in overrides.items():
                assert seen[run][field] == pytest.approx(value), (run, field)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)
