"""Checkpoints of a run: orbax state, the input position, and the run's identity.

Layout of a workdir:
  run.json                  the model and classes a run trains (refuses to mix runs)
  checkpoints/<step>/       orbax: params, batch_stats, opt_state, ema_params, step, rng
  input_state/<step>/       each process's tf.data iterator position at that step
Checkpoints are written asynchronously; orbax finalises a step directory only
when it is complete, so a run killed mid-write resumes from the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

from absl import logging
import jax
import orbax.checkpoint as ocp


class RunMismatchError(ValueError):
    pass


def check_run_identity(workdir: str, identity: dict[str, Any]) -> None:
    """Write `run.json` on a new workdir; refuse a workdir that holds another run."""
    path = os.path.join(workdir, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
        diff = {k: (existing.get(k), v) for k, v in identity.items() if existing.get(k) != v}
        if diff:
            what = ", ".join(f"{k}={old!r} there, {new!r} here" for k, (old, new) in diff.items())
            raise RunMismatchError(
                f"workdir {workdir} holds another run ({what}): use a new --workdir")
        return
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(identity, f, indent=2)
        os.replace(tmp, path)


class Checkpointer:
    """Orbax `CheckpointManager` plus the per-process input iterator positions."""

    def __init__(self, workdir: str, keep: int, async_save: bool):
        self.workdir = workdir
        self._input_checkpointable = True
        self.manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
        )

    def input_state_path(self, step: int) -> str:
        return os.path.join(self.workdir, "input_state", str(step),
                            f"process_{jax.process_index()}")

    def save(self, step: int, state: Any, input_iterator: Any | None = None) -> None:
        if input_iterator is not None and self._input_checkpointable:
            path = self.input_state_path(step)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                input_iterator.save(path)
            except Exception as e:  # e.g. a Python-generator source  # noqa: BLE001
                self._input_checkpointable = False
                logging.warning("the input position cannot be checkpointed (%s): a resumed "
                                "run restarts its data stream", str(e).splitlines()[0][:200])
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._prune_input_states()

    def _prune_input_states(self) -> None:
        root = os.path.join(self.workdir, "input_state")
        if jax.process_index() != 0 or not os.path.isdir(root):
            return
        keep = {str(s) for s in self.manager.all_steps()}
        pending = max(self.manager.all_steps(), default=-1)
        for name in os.listdir(root):
            if name not in keep and name.isdigit() and int(name) < pending:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state: Any,
                on_fallback: Callable[[int, Exception], None] | None = None
                ) -> tuple[int, Any] | None:
        """The newest readable checkpoint as (step, state); older ones if it is corrupt."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
                return step, state
            except Exception as e:  # a truncated or corrupted checkpoint  # noqa: BLE001
                logging.warning("checkpoint %d is unreadable (%s); trying the previous one",
                                step, str(e).splitlines()[0] if str(e) else type(e).__name__)
                if on_fallback:
                    on_fallback(step, e)
        return None

    def restore_input(self, step: int, input_iterator: Any) -> bool:
        path = self.input_state_path(step)
        if not os.path.exists(path + ".index"):
            logging.warning("no input position saved for step %d: the data stream restarts", step)
            return False
        input_iterator.restore(path)
        return True

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def restore_variables(path: str) -> dict[str, Any]:
    """`params` / `batch_stats` (numpy) from converted weights or a run's workdir.

    A converted directory holds `model.json` and `variables/`; a workdir holds
    `checkpoints/`, whose newest readable step is used (its moving average of the
    parameters when the run kept one).
    """
    if os.path.exists(os.path.join(path, "model.json")):
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(os.path.abspath(os.path.join(path, "variables")))
    ckpt_dir = os.path.join(path, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(
            f"init_from={path} is neither converted weights (model.json) nor a run's workdir "
            "(checkpoints/)")
    with ocp.CheckpointManager(os.path.abspath(ckpt_dir)) as manager:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                state = manager.restore(step, args=ocp.args.StandardRestore())
                break
            except Exception as e:  # noqa: BLE001
                logging.warning("checkpoint %d in %s is unreadable (%s)", step, path, e)
        else:
            raise FileNotFoundError(f"init_from={path}: no readable checkpoint")
    params = state.get("ema_params") or state["params"]
    return {"params": params, "batch_stats": state["batch_stats"]}
