"""Helpers of the fault and multi-host tests: train.py subprocesses and what they leave.

Every run here is the same tiny digits config (Inception-ResNet v2 at quarter
width, batch 4, the repeated blocks in loops), so the persistent compilation
cache of the test session serves one compiled step to every run; subprocesses
inherit the session's environment (fake device count, XLA flags, cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fields(steps: int, every: int, **overrides: Any) -> dict[str, Any]:
    """The tiny run's config fields: `steps` steps, a checkpoint every `every`."""
    return {
        "model.depth_multiplier": 0.25, "model.scan_unroll": 1, "batch_size": 4,
        "eval_batch_size": 4, "log_every_steps": 1, "checkpoint_every_steps": every,
        "eval_every_steps": 1000, "log_input_images": False, "num_train_steps": steps,
        "num_eval_steps": 1, "dataset.data_dir": os.environ["TFDS_DATA_DIR"], **overrides}


def flags(steps: int, every: int, **overrides: Any) -> list[str]:
    return [f"--config.{k}={v}" for k, v in fields(steps, every, **overrides).items()]


def config(steps: int, every: int, network: str = "inception_resnet_v2", **overrides: Any):
    """The same run as `command`, as a config for `training.loop.train_and_evaluate`."""
    import importlib

    c = importlib.import_module(f"configs.{network}").get_config("digits")
    return override(c, fields(steps, every, **overrides))


def override(config, fields: dict[str, Any]):
    """Set dotted `fields` ("model.depth_multiplier": 0.5) of a config in place."""
    for key, value in fields.items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return config


def command(workdir: str, steps: int, every: int, network: str = "inception_resnet_v2",
            **overrides: Any) -> list[str]:
    config = os.path.join(ROOT, "configs", f"{network}.py") + ":digits"
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config}",
            f"--workdir={workdir}", *flags(steps, every, **overrides)]


def env(devices: int | None = None, *xla_flags: str) -> dict[str, str]:
    """This session's environment, with another fake device count and more XLA flags."""
    e = dict(os.environ)
    if devices is not None:
        kept = [f for f in e.get("XLA_FLAGS", "").split()
                if "xla_force_host_platform_device_count" not in f]
        e["XLA_FLAGS"] = " ".join(
            kept + [f"--xla_force_host_platform_device_count={devices}", *xla_flags])
    return e


def user_env() -> dict[str, str]:
    """This session's environment in a user's setting: the machine's one CPU device and
    XLA's default optimisation level (the test-wide flags of conftest.py removed); the
    compilation caches are kept."""
    e = dict(os.environ)
    e["XLA_FLAGS"] = " ".join(
        f for f in e.get("XLA_FLAGS", "").split()
        if "xla_force_host_platform_device_count" not in f
        and "xla_backend_optimization_level" not in f)
    return e


class Run:
    """A train.py subprocess writing its output to a file (a full pipe would block it)."""

    def __init__(self, cmd: list[str], log_path: str, environ: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=environ or env())

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def wait(self, timeout: float = 900) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"timed out after {timeout} s:\n{self.output()[-3000:]}")
        finally:
            self._log.close()
        return code

    def wait_ok(self, timeout: float = 900) -> str:
        code = self.wait(timeout)
        out = self.output()
        assert code == 0, f"exit {code}:\n{out[-3000:]}"
        return out


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps whose checkpoint orbax has finalised (temporary directories excluded)."""
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root) if n.isdigit())


def wait_for_checkpoint(run: Run, workdir: str, timeout: float = 900) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if steps := checkpoint_steps(workdir):
            return steps[-1]
        if run.proc.poll() is not None:
            raise AssertionError("the run ended before its first checkpoint:\n"
                                 + run.output()[-3000:])
        time.sleep(0.01)
    run.proc.kill()
    raise AssertionError("no checkpoint in time")


def read_state(workdir: str, step: int) -> dict[str, np.ndarray]:
    """A checkpoint's whole state as flat numpy arrays keyed by path."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "default")
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
        state = ckptr.restore(path, target)
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def logged(workdir: str, tag: str) -> dict[int, list[float]]:
    """Every value of a scalar tag by step, as TensorBoard shows the directory.

    TensorBoard's server-side reader loads the event files in name order and drops
    what a later session start supersedes; a step with two values is a repeat.
    """
    import tensorflow as tf
    from tensorboard.backend.event_processing import plugin_event_accumulator

    acc = plugin_event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    out: dict[int, list[float]] = {}
    for e in acc.Tensors(tag):
        out.setdefault(e.step, []).append(float(tf.make_ndarray(e.tensor_proto)))
    return out
