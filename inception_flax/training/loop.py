"""The training loop: resume, step, log, checkpoint, evaluate, and stop on preemption.

`train_and_evaluate(config, workdir)` trains from `setup`'s initial state, or
resumes from the workdir's latest checkpoint (parameters, optimizer state, BN
statistics, random key and each process's input position: a resumed run's
steps are the uninterrupted run's, bit for bit). TensorBoard summaries go to the
workdir, written by process 0.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from typing import Any

from absl import logging
import flax
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from inception_flax import checkpoint as ckpt_lib
from inception_flax import inference
from inception_flax.data import sharding
from inception_flax.training import state as state_lib
from inception_flax.training.checks import NonFiniteError
from inception_flax.training.evaluate import evaluate
from inception_flax.training.mesh import AXIS
from inception_flax.training.setup import setup
from inception_flax.training.state import TrainState
from inception_flax.training.step import make_eval_step, make_train_step


class _Preemption:
    """SIGTERM asks the loop to checkpoint at the current step and exit.

    One process: a Python SIGTERM handler. Several: JAX's preemption service
    (started by `jax.distributed.initialize`) receives the notice on any process
    and has all of them agree on the step to checkpoint at
    (`multihost_utils.reached_preemption_sync_point`), without a collective per step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if self._multi:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: checkpointing at the current step, then exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self, step: int) -> bool:
        """True on every process at the same step once any process got the notice."""
        if not self._multi:
            return self.requested
        if multihost_utils.reached_preemption_sync_point(step):
            logging.warning("preemption notice: all processes checkpoint at step %d", step)
            return True
        return False


@contextlib.contextmanager
def _closing_on_error(checkpointer: ckpt_lib.Checkpointer):
    """Close (finish writing) the checkpointer when the loop stops on an error."""
    try:
        yield
    except BaseException:
        checkpointer.close()
        raise


# ----------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------

def mark_session_start(workdir: str, step: int) -> None:
    """Tell TensorBoard an attempt of the run starts at `step`.

    TensorBoard reads a directory's event files in name order; from the second
    `SessionLog.START` on, it drops every earlier event at or after that START's
    step. So a run killed between its last checkpoint and its death, which logged
    steps that the resumed attempt logs again, shows each step once. The file is
    named to sort after earlier attempts' files (created seconds before) and
    before this attempt's.
    """
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    now = time.time()
    path = os.path.join(workdir, f"events.out.tfevents.{int(now) - 1:010d}.start.{step}")
    with tf.io.TFRecordWriter(path) as f:
        f.write(event_pb2.Event(wall_time=now, file_version="brain.Event:2")
                .SerializeToString())
        f.write(event_pb2.Event(wall_time=now, step=step, session_log=event_pb2.SessionLog(
            status=event_pb2.SessionLog.START)).SerializeToString())


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in flat.items()}


def _write_run_description(config: ml_collections.ConfigDict, workdir: str, params) -> None:
    """Hyperparameters, config and parameter table: to TensorBoard only (process 0)."""
    from clu import metric_writers, parameter_overview
    tb = metric_writers.SummaryWriter(workdir)
    tb.write_hparams(_flat_hparams(config))
    tb.write_texts(0, {
        "config": str(config),
        "parameters": parameter_overview.get_parameter_overview(params)})
    tb.close()
    logging.info("%s: %s parameters", config.model.name,
                 f"{parameter_overview.count_parameters(params):,}")


def _image_grid(images: np.ndarray, max_images: int = 16) -> np.ndarray:
    """A square grid of the first images, pixels back in [0, 1]."""
    images = np.asarray(images[:max_images], np.float32)
    n, h, w, c = images.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), np.float32)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = image
    return np.clip((grid + 1.0) / 2.0, 0.0, 1.0)[None]


def _train_summary(history: list[tuple[int, dict]], steps: int, elapsed: float,
                   batch_size: int, skipped: int) -> dict[str, float]:
    """The mean of each metric since the last summary, and the speed."""
    summary = {f"train/{k}": float(np.mean([m[k] for _, m in history]))
               for k in history[0][1] if k != "finite"}
    summary["train/nonfinite_steps"] = float(sum(1.0 - m["finite"] for _, m in history))
    summary["train/steps_per_sec"] = steps / elapsed
    summary["train/images_per_sec"] = summary["train/steps_per_sec"] * batch_size
    summary["train/skipped_images"] = float(skipped)
    return summary


# ----------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (resuming from `workdir` if it holds checkpoints); returns the last eval."""
    from clu import metric_writers, periodic_actions
    s = setup(config, workdir=workdir)  # every check of the config before any compile
    mesh, num_steps, state = s.mesh, s.num_steps, s.state

    checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints,
                                        config.async_checkpointing)
    train_iter, skipped = sharding.train_iterator(config)
    restored = checkpointer.restore(state_lib.abstract_checkpoint_view(state, mesh))
    if restored is not None:
        step0, view = restored
        state = state_lib.from_checkpoint_view(view, mesh)
        checkpointer.restore_input(step0, train_iter)
        logging.info("resumed from step %d", step0)
    start = int(jax.device_get(state.step))
    if jax.process_index() == 0 and start < num_steps:
        mark_session_start(workdir, start + 1)
    writer = metric_writers.create_default_writer(  # after mark_session_start: see there
        workdir, just_logging=jax.process_index() > 0, asynchronous=True)
    if start == 0 and jax.process_index() == 0:
        _write_run_description(config, workdir, state.params)
    if jax.process_index() == 0:  # what predict.py and export need: no config file, no data
        inference.record_run(workdir, config, s.num_classes, s.info and s.info.label_names)

    train_step = make_train_step(s.model, s.tx, s.schedule, config, mesh, state)
    eval_step = make_eval_step(s.model, mesh)
    reconcile = state_lib.make_reconcile(state)
    batch_sharding = NamedSharding(mesh, P(AXIS))

    hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)]
    if config.profile_steps > 0 and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(
            num_profile_steps=config.profile_steps, first_profile=start + 10, logdir=workdir))

    def save(state: TrainState, step: int) -> TrainState:
        state = reconcile(state)
        writer.flush()  # a run killed after this checkpoint keeps every logged step up to it
        checkpointer.save(step, state_lib.checkpoint_view(state), train_iter)
        return state

    def run_eval(state: TrainState, step: int) -> dict[str, float]:
        state = reconcile(state)
        ds, _ = sharding.eval_dataset(config, s.info)
        params = state.ema_params if state.ema_params is not None else state.params
        stats = state_lib.mean_stats(state.batch_stats)
        result = evaluate(eval_step, params, stats, ds, mesh, config.num_eval_steps)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()
                                    if k != "examples"})
        logging.info("step %d: eval top-1 %.4f top-5 %.4f on %d examples", step,
                     result["top1"], result["top5"], int(result["examples"]))
        return state, result

    def next_batch() -> dict[str, jax.Array]:
        return sharding.to_global(next(train_iter), batch_sharding)

    def check_finite(history: list[tuple[int, dict]]) -> None:
        for step, metrics in history:
            if config.nonfinite == "stop" and metrics["finite"] < 1.0:
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {step}: stopping; the last good "
                    f"checkpoint (step {checkpointer.latest_step()}) is kept. Lower "
                    "learning_rate or set --config.nonfinite=skip")

    result: dict[str, float] = {}
    history: list[tuple[int, Any]] = []
    last_log, last_log_step = time.time(), start
    batch = next_batch() if start < num_steps else None
    if start == 0 and config.log_input_images and batch is not None:
        writer.write_images(0, {"train/input_images": _image_grid(  # what the model sees
            np.asarray(jax.device_get(batch["image"].addressable_shards[0].data)))})

    with _Preemption() as preemption, metric_writers.ensure_flushes(writer), \
            _closing_on_error(checkpointer):
        for step in range(start + 1, num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = train_step(state, batch)
            history.append((step, metrics))
            for hook in hooks:
                hook(step)
            preempted = preemption.agreed(step)
            is_last = step == num_steps
            if step % config.log_every_steps == 0 or is_last or preempted:
                history = [(i, jax.device_get(m)) for i, m in history]
                check_finite(history)
                writer.write_scalars(step, _train_summary(
                    history, step - last_log_step, time.time() - last_log,
                    config.batch_size, skipped.count))
                history, last_log, last_log_step = [], time.time(), step
            if step % config.checkpoint_every_steps == 0 or is_last or preempted:
                history = [(i, jax.device_get(m)) for i, m in history]
                check_finite(history)
                state = save(state, step)
            if step % config.eval_every_steps == 0 or is_last:
                state, result = run_eval(state, step)
            if preempted:
                logging.warning("preempted: checkpoint written at step %d", step)
                break
            if not is_last:
                batch = next_batch()
    checkpointer.wait()
    checkpointer.close()
    writer.flush()
    return result
