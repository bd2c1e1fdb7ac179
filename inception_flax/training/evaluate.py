"""Evaluation: top-1 / top-5 over a split, during training or of saved weights (eval.py)."""

from __future__ import annotations

import os

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections

from inception_flax import pretrained
from inception_flax.data import sharding
from inception_flax.training.checks import ConfigError
from inception_flax.training.mesh import AXIS
from inception_flax.training.setup import setup
from inception_flax.training.step import make_eval_step


def evaluate(eval_step, params, batch_stats, dataset, mesh, num_steps: int = -1
             ) -> dict[str, float]:
    """Mean loss, top-1 and top-5 over `dataset` (its first `num_steps` batches if > 0)."""
    batches = NamedSharding(mesh, P(AXIS))
    totals: dict[str, float] = {}
    for i, batch in enumerate(dataset.as_numpy_iterator()):
        if 0 < num_steps <= i:
            break
        sums = eval_step(params, batch_stats, sharding.to_global(batch, batches))
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.get("count", 0.0), 1.0)
    return {"top1": totals.get("top1", 0.0) / count, "top5": totals.get("top5", 0.0) / count,
            "loss": totals.get("loss", 0.0) / count, "examples": totals.get("count", 0.0)}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | None = None,
                        checkpoint: str | None = None) -> dict[str, float]:
    """Top-1 / top-5 of a run's latest checkpoint (or of converted weights).

    Written to `workdir`/eval for TensorBoard at the checkpoint's training step, so
    it lines up with the run's curves (converted weights: step 0).
    """
    from clu import metric_writers
    flag, source = ("--checkpoint", checkpoint) if checkpoint else ("--workdir", workdir)
    if source is None:
        raise ConfigError("nothing to evaluate: give --workdir=DIR (a run) or --checkpoint=PATH "
                          "(a run's workdir or converted weights)")
    steps = check_source(flag, source)  # before the setup: fails before anything compiles
    s = setup(config, init_state=False)
    try:
        variables = pretrained.restore_variables(source)
    except FileNotFoundError:
        raise ConfigError(f"{flag}={source}: none of its checkpoints (steps "
                          f"{', '.join(map(str, steps))}) can be read; the warnings above say "
                          "why") from None
    replicated = NamedSharding(s.mesh, P())
    params = jax.device_put(variables["params"], replicated)
    stats = jax.device_put(variables.get("batch_stats", {}), replicated)
    ds, _ = sharding.eval_dataset(config, s.info)
    result = evaluate(make_eval_step(s.model, s.mesh), params, stats, ds, s.mesh,
                      config.num_eval_steps)
    step = int(variables.get("step", 0))
    if workdir is not None and jax.process_index() == 0:
        writer = metric_writers.create_default_writer(os.path.join(workdir, "eval"))
        writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
        writer.flush()
    return {**result, "step": step}


def check_source(flag: str, path: str) -> list[int]:
    """The checkpointed steps of the run `path` names ([] for converted weights).

    Raises ConfigError, in one line, when `path` holds neither converted weights
    (`model.json`) nor a finished checkpoint (`checkpoints/<step>/`).
    """
    if os.path.exists(os.path.join(path, "model.json")):
        return []
    root = os.path.join(path, "checkpoints")
    steps = sorted(int(n) for n in (os.listdir(root) if os.path.isdir(root) else ())
                   if n.isdigit())
    if steps:
        return steps
    if flag == "--checkpoint":
        raise ConfigError(
            f"--checkpoint={path} is neither converted weights (no model.json) nor a run's "
            f"workdir with a checkpoint (no checkpoints/<step>/): give the directory that the "
            "converter or train.py --workdir wrote")
    other = "or pass --checkpoint=PATH (a run's workdir or converted weights)"
    if not os.path.isdir(path):
        raise ConfigError(f"--workdir={path} does not exist: give the --workdir of a train.py "
                          f"run, {other}")
    raise ConfigError(
        f"--workdir={path} holds no checkpoint yet (no {root}/<step>/): train first "
        f"(train.py --workdir={path} checkpoints every --config.checkpoint_every_steps and at "
        f"the end), {other}")
