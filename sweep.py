"""Run a sweep: `python sweep.py --config=configs/NET.py[:preset] --sweep=NAME --workdir=DIR`.

The config file's `get_sweep(NAME)` lists the runs, each a set of
`--config.FIELD=VALUE` overrides (see inception_flax/sweep.py). Every run trains
in DIR/<run name> through `train.py` in a subprocess, with the same config file,
the extra `--config.FIELD=VALUE` flags given here (applied to every run) and its
own overrides: exactly the command a cluster would run (`--dry-run` prints them).
Runs go one after another; re-running the same command skips finished runs and
resumes interrupted ones. Each run's output is also appended to DIR/<run>/train.log.

At the end (and after each run) the results, read from each run's TensorBoard
event files, are printed and written to DIR/results.csv and DIR/results.md;
`--results-only` just rebuilds them, e.g. for runs a scheduler trained.

Ctrl-C (or SIGTERM) asks the current run to checkpoint and stop, then ends the
sweep; a second one kills the run.
"""

import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from inception_flax import cli
from inception_flax import sweep as sweep_lib
from inception_flax import sweep_results

ROOT = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "experiment config file; its get_sweep(name) describes the sweeps",
    lock_config=True)
flags.DEFINE_string("sweep", None, "the name of a sweep of the config file")
flags.DEFINE_string("workdir", None, "sweep directory: run R trains in WORKDIR/R")
flags.DEFINE_bool("dry-run", False, "print each run's state and train.py command; run nothing")
flags.DEFINE_bool("results-only", False, "run nothing; rebuild the results table from WORKDIR")
flags.DEFINE_alias("dry_run", "dry-run")
flags.DEFINE_alias("results_only", "results-only")
flags.mark_flags_as_required(["config", "sweep", "workdir"])


class _Stop:
    """The first SIGINT / SIGTERM asks the child to checkpoint and exit; the second kills it."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.signal: int | None = None

    def __call__(self, signum, frame):
        del frame
        first = self.signal is None
        self.signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM if first else signal.SIGKILL)
        print(f"\nsweep: {signal.Signals(signum).name}: " + (
            "stopping the current run at its next step (again to kill it)" if first
            else "killing the current run"), file=sys.stderr, flush=True)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_sweep(config_arg: str, name: str) -> sweep_lib.Sweep:
    path = config_arg.split(":", 1)[0]
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        fail(f"{path} describes no sweeps (it has no get_sweep function)")
    try:
        return module.get_sweep(name)
    except sweep_lib.SweepError as e:
        fail(f"{path}: {e}")


def target_steps(config) -> int | None:
    """The run's num_train_steps, as the trainer derives it; None when unknown here."""
    if config.num_train_steps > 0:
        return config.num_train_steps
    from inception_flax.data import info, pipeline
    from inception_flax.training import checks
    try:
        examples = None
        if config.steps_per_epoch <= 0:
            d = config.dataset
            examples = pipeline.num_examples(d.name, d.train_split, d.data_dir)
        return checks.durations(config, info.DataInfo(0, examples, None))[1]
    except Exception:  # noqa: BLE001 - unknown: train.py decides
        return None


def state_of(config, run_dir: str) -> sweep_results.RunState:
    has_checkpoints = bool(sweep_results.checkpoint_steps(run_dir))
    return sweep_results.run_state(run_dir, target_steps(config) if has_checkpoints else None)


def train_command(config_arg: str, run_dir: str, extra: list[str],
                  run: sweep_lib.Run) -> list[str]:
    train_py = os.path.join(ROOT, "train.py")
    if os.path.dirname(train_py) == os.getcwd():
        train_py = "train.py"
    return [sys.executable, train_py, f"--config={config_arg}", f"--workdir={run_dir}",
            *extra, *run.flags()]


def train(cmd: list[str], run_dir: str, stop: _Stop) -> int:
    """Run one train.py; its output goes to stderr and to run_dir/train.log."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "train.log"), "ab", buffering=0) as log:
        log.write(f"\n$ {shlex.join(cmd)}\n".encode())
        # A session of its own: a terminal's Ctrl-C reaches only this process, which
        # turns it into the SIGTERM the trainer answers with a checkpoint.
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        stop.child = child
        try:
            for line in iter(child.stdout.readline, b""):
                log.write(line)
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
        finally:
            rc = child.wait()
            stop.child = None
    return rc


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config_arg = config_flags.get_config_filename(FLAGS["config"])
    sweep = load_sweep(config_arg, FLAGS.sweep)
    try:
        runs = sweep_lib.resolve(sweep, FLAGS.config)
        extra = dict(config_flags.get_override_values(FLAGS["config"]))
        both = [k for r in runs for k in r.overrides if k in extra]
        if both:
            raise sweep_lib.SweepError(
                f"--config.{both[0]} is one of the swept fields: leave it out")
        extra_flags = sweep_lib.override_flags(extra)
    except sweep_lib.SweepError as e:
        fail(f"sweep {FLAGS.sweep!r}: {e}")
    configs = [sweep_lib.apply(FLAGS.config, r) for r in runs]
    if not FLAGS["results-only"].value:
        from inception_flax.training import checks  # every run's config: the trainer's checks
        for run, config in zip(runs, configs):
            try:
                checks.check_config(config)
            except checks.ConfigError as e:
                fail(f"run {run.name}: {e}")

    workdir = FLAGS.workdir
    n = len(runs)
    stop = _Stop()
    if not (FLAGS["dry-run"].value or FLAGS["results-only"].value):
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
    failed: dict[str, int] = {}

    def rows():
        out = []
        for run, config in zip(runs, configs):
            run_dir = os.path.join(workdir, run.name)
            if run.name in failed:
                status = f"failed (exit {failed[run.name]})"
            else:
                state = state_of(config, run_dir)
                status = {"new": "not started", "started": f"step {state.step}",
                          "partial": f"step {state.step} of {state.target}"}.get(
                              state.status, state.status)
            out.append(sweep_results.result_row(run, run_dir, status))
        return out

    print(f"sweep {FLAGS.sweep!r}: {n} run{'s' * (n != 1)} in {workdir}", flush=True)
    for i, (run, config) in enumerate(zip(runs, configs), 1):
        if FLAGS["results-only"].value:
            break
        run_dir = os.path.join(workdir, run.name)
        state = state_of(config, run_dir)
        cmd = train_command(config_arg, run_dir, extra_flags, run)
        if FLAGS["dry-run"].value:
            print(f"# [{i}/{n}] {run.name}: {state.describe()}"
                  + (" (skipped)" if state.status == "finished" else ""))
            print(shlex.join(cmd), flush=True)
            continue
        if state.status == "finished":
            print(f"[{i}/{n}] {run.name}: {state.describe()}: skipped", flush=True)
            continue
        print(f"[{i}/{n}] {run.name}: {state.describe()}: training", flush=True)
        start = time.time()
        rc = train(cmd, run_dir, stop)
        if rc != 0 and stop.signal is None:
            failed[run.name] = rc
        print(f"[{i}/{n}] {run.name}: " + (
            f"done in {time.time() - start:.0f}s" if rc == 0 else f"exit {rc}"), flush=True)
        sweep_results.write_results(workdir, rows())
        if stop.signal is not None:
            print("sweep stopped: re-run the same command to resume", file=sys.stderr)
            sys.exit(128 + stop.signal)
    if FLAGS["dry-run"].value:
        return
    table = sweep_results.write_results(workdir, rows())
    print(f"\nresults ({os.path.join(workdir, 'results.md')}, results.csv):\n")
    print(table, flush=True)
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)} "
              f"(see their train.log)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)  # a bad --config.FIELD: one line
