"""Weights from elsewhere: converted weights or another run, to start from or evaluate.

`restore_variables` reads `params` / `batch_stats` from either kind of directory;
`merge_pretrained` fits them to a model, re-initialising the classifier heads
(`HEAD_MODULES`) when the number of classes differs (fine-tuning).
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import flax
import numpy as np
import orbax.checkpoint as ocp

# The classifier heads: re-initialised, not refused, when their shapes differ.
HEAD_MODULES = ("Logits", "AuxLogits", "AuxLogits_4a", "AuxLogits_4d")


def restore_variables(path: str) -> dict[str, Any]:
    """`params` / `batch_stats` (numpy) from converted weights or a run's workdir.

    A converted directory holds `model.json` and `variables/`; a workdir holds
    `checkpoints/`, whose newest readable step is used (its moving average of the
    parameters when the run kept one), and its `step` is returned too.
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
    return {"params": params, "batch_stats": state["batch_stats"], "step": step}


def merge_pretrained(target: dict[str, Any], source: dict[str, Any]) -> tuple[Any, list[str]]:
    """Take `source` weights wherever they fit `target`; re-initialise mismatched heads.

    Returns the merged variables and the classifier heads that were reset. Any
    other missing or mis-shaped weight is a ValueError (one line) naming every
    such weight.
    """
    flat_t = flax.traverse_util.flatten_dict(target, sep="/")
    flat_s = flax.traverse_util.flatten_dict(source, sep="/")
    merged, reset, problems = {}, set(), []
    for key, value in flat_t.items():
        head = next((h for h in HEAD_MODULES if key.split("/")[1] == h), None)
        src = flat_s.get(key)
        if src is not None and tuple(np.shape(src)) == tuple(value.shape):
            merged[key] = np.asarray(src, value.dtype)
        elif head is not None:
            merged[key] = value
            reset.add(head)
        elif src is None:
            problems.append(f"{key} missing")
        else:
            problems.append(f"{key} has shape {tuple(np.shape(src))}, needs {tuple(value.shape)}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more"
                                            if len(problems) > 8 else "")
        raise ValueError(f"init_from weights do not fit {len(problems)} tensors of this "
                         f"model: {shown}. Check model.name, layout and depth_multiplier")
    return flax.traverse_util.unflatten_dict(merged, sep="/"), sorted(reset)
