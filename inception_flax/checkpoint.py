"""Checkpoints of a run: orbax state, the input position, and the run's identity.

Layout of a workdir:
  run.json                  the model and classes a run trains (refuses to mix runs)
  checkpoints/<step>/       orbax: params, batch_stats, opt_state, ema_params, step, rng
  input_state/<step>/       each process's tf.data iterator position at that step
  checksums/<step>.json     CRC32 of every array of that step's state, checked on restore
orbax finalises a step directory only when it is complete, so a run killed
mid-write resumes from the previous one. orbax does not notice flipped bytes in
its data files, so each checkpoint's arrays are also checksummed; an unreadable
or mismatching (truncated, corrupted) newest step is moved to
corrupt_checkpoints/ and the previous one is restored.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any
import zlib

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp


def restore_on_host(item: str) -> Any:
    """A saved orbax item (e.g. `checkpoints/<step>/default`) as numpy arrays.

    Restoring into host arrays built from the item's own metadata reads a
    checkpoint whatever the device count or topology that wrote it (orbax refuses
    to restore its saved shardings onto another one).
    """
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(item)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        return ckptr.restore(item, jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree))


def restore_newest_on_host(ckpt_dir: str) -> tuple[int, Any]:
    """(step, state) of the newest checkpoint in `ckpt_dir` that can be read, on the host
    (`restore_on_host`), trying older steps when a newer one cannot be read.

    Raises FileNotFoundError with each step's reason (one line) when none can.
    """
    steps = sorted((int(n) for n in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else ())
                    if n.isdigit()), reverse=True)
    errors = []
    for step in steps:
        item = os.path.join(os.path.abspath(ckpt_dir), str(step), "default")
        try:
            return step, restore_on_host(item)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt: the previous one
            errors.append(f"{step}: {str(e).splitlines()[0][:200] if str(e) else e!r}")
            logging.warning("checkpoint %s is unreadable (%s)", item, errors[-1])
    raise FileNotFoundError("; ".join(errors) or f"no checkpoint in {ckpt_dir}")


class RunMismatchError(ValueError):
    """The workdir holds another run (`run.json` differs): resuming would mix the two."""


class CheckpointError(RuntimeError):
    """No checkpoint of the workdir can be restored: the run will not start over on it."""


def check_run_identity(workdir: str, identity: dict[str, Any]) -> None:
    """Write `run.json` on a new workdir; refuse a workdir that holds another run."""
    path = os.path.join(workdir, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
        diff = {k: (existing[k], v) for k, v in identity.items()
                if k in existing and existing[k] != v}
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


def checksums(tree: Any) -> dict[str, str]:
    """CRC32 of each array's bytes, by path (replicated arrays: this process's copy)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(x, jax.Array):
            x = x.addressable_data(0)
        out[jax.tree_util.keystr(path)] = f"{zlib.crc32(np.ascontiguousarray(x).tobytes()):08x}"
    return out


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
        if jax.process_index() == 0:
            path = self._checksums_path(step)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(checksums(state), f)
            os.replace(path + ".tmp", path)
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._prune()

    def _checksums_path(self, step: int) -> str:
        return os.path.join(self.workdir, "checksums", f"{step}.json")

    def _prune(self) -> None:
        """Drop the input positions and checksums of steps orbax no longer keeps."""
        if jax.process_index() != 0:
            return
        keep = {str(s) for s in self.manager.all_steps()}
        pending = max(self.manager.all_steps(), default=-1)
        for sub in ("input_state", "checksums"):
            root = os.path.join(self.workdir, sub)
            for name in os.listdir(root) if os.path.isdir(root) else ():
                step = name.split(".")[0]
                if step not in keep and step.isdigit() and int(step) < pending:
                    target = os.path.join(root, name)
                    if os.path.isdir(target):
                        shutil.rmtree(target, ignore_errors=True)
                    else:
                        os.remove(target)

    def verify(self, step: int, state: Any) -> None:
        """Raises if `state` differs from what step `step` wrote (when it wrote checksums)."""
        path = self._checksums_path(step)
        if not os.path.exists(path):
            return
        with open(path) as f:
            expected = json.load(f)
        bad = [k for k, v in checksums(state).items() if expected.get(k, v) != v]
        if bad:
            raise ValueError(f"{len(bad)} arrays differ from their checksums, e.g. {bad[0]}")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state: Any) -> tuple[int, Any] | None:
        """The newest readable checkpoint as (step, state); older ones if it is corrupt.

        Unreadable checkpoints are moved to `corrupt_checkpoints/` (kept for
        inspection), so the resumed run can write those steps again.
        """
        bad, first_error = [], ""
        found = None
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
                self.verify(step, state)
                found = step, state
                break
            except Exception as e:  # a truncated or corrupted checkpoint  # noqa: BLE001
                reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                logging.warning("checkpoint %d is unreadable or corrupt (%s); trying the "
                                "previous one", step, reason)
                bad.append(step)
                first_error = first_error or reason
        if bad and found is None:  # never start over silently on top of a run
            raise CheckpointError(
                f"no checkpoint in {self.workdir}/checkpoints can be restored (steps "
                f"{', '.join(map(str, bad))}; newest: {first_error}): if the config changed, "
                "resume with the one that wrote them; if they are damaged, move them away "
                "or use a new --workdir")
        if bad:
            self._quarantine(bad)
        return found

    def _quarantine(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            dest = os.path.join(self.workdir, "corrupt_checkpoints")
            os.makedirs(dest, exist_ok=True)
            for step in steps:
                src = os.path.join(self.workdir, "checkpoints", str(step))
                target = os.path.join(dest, f"{step}.{int(time.time())}")
                if os.path.exists(src):
                    shutil.move(src, target)
                    logging.warning("moved unreadable checkpoint %d to %s", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoints quarantined")
        self.manager.reload()

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

