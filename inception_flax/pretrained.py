"""Weights from elsewhere: converted weights or another run, to start from or evaluate.

`restore_variables` reads `params` / `batch_stats` from either kind of directory;
`merge_pretrained` fits them to a model, re-initialising every classifier head
(`HEAD_MODULES`) that does not fit, e.g. for another number of classes (fine-tuning).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax
import numpy as np
import orbax.checkpoint as ocp

from inception_flax import checkpoint

# The classifier heads: re-initialised as a whole, not refused, when any of their
# weights does not fit (TF-slim's fine-tuning excludes these scopes the same way).
HEAD_MODULES = ("Logits", "AuxLogits", "AuxLogits_4a", "AuxLogits_4d")
# The model fields that shape the weights, as `--config.model.FIELD` flags.
SHAPE_FIELDS = ("depth_multiplier", "layout", "pool_include_pad", "aux_logits")


def restore_variables(path: str) -> dict[str, Any]:
    """`params` / `batch_stats` (numpy) from converted weights or a run's workdir.

    A converted directory holds `model.json` and `variables/`; a workdir holds
    `checkpoints/`, whose newest readable step is used (its moving average of the
    parameters when the run kept one), and its `step` is returned too. `architecture`
    is what the directory says of the network the weights belong to (`model.json`,
    or the run's `run.json`): its name and the fields that shape its weights.
    Errors are one line that starts with `init_from=PATH`.
    """
    if os.path.exists(os.path.join(path, "model.json")):
        with open(os.path.join(path, "model.json")) as f:
            meta = json.load(f)
        with ocp.StandardCheckpointer() as ckptr:
            variables = ckptr.restore(os.path.abspath(os.path.join(path, "variables")))
        fields = {"depth_multiplier": 1.0, **meta["overrides"]} if "overrides" in meta else {}
        return {**variables, "architecture": architecture(meta.get("model"), fields)}
    ckpt_dir = os.path.join(path, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(
            f"init_from={path} is neither converted weights (model.json) nor a run's workdir "
            "(checkpoints/)")
    try:  # on the host: any device count may have written them
        step, state = checkpoint.restore_newest_on_host(ckpt_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"init_from={path}: no readable checkpoint") from None
    params = state.get("ema_params") or state["params"]
    identity = {}
    if os.path.exists(os.path.join(path, "run.json")):
        with open(os.path.join(path, "run.json")) as f:
            identity = json.load(f)
    return {"params": params, "batch_stats": state["batch_stats"], "step": step,
            "architecture": architecture(identity.get("model"), identity)}


def architecture(name: str | None, fields: dict[str, Any]) -> dict[str, Any]:
    """The network's name and the fields of `fields` that shape its weights."""
    return {"name": name, **{k: fields[k] for k in SHAPE_FIELDS if fields.get(k) is not None}}


def merge_pretrained(target: dict[str, Any], source: dict[str, Any]) -> tuple[Any, list[str]]:
    """Take `source` weights wherever they fit `target`; re-initialise heads that do not.

    A head of `HEAD_MODULES` with any weight missing from `source` or of another
    shape keeps all of `target`'s weights (its fresh initialisation). Returns the
    merged variables and the names of those heads. Any other missing or mis-shaped
    weight is a ValueError (one line) naming them, and the flags that would give
    `source`'s network when `source` says which it is (`architecture`).
    """
    flat_t = flax.traverse_util.flatten_dict(target, sep="/")
    flat_s = flax.traverse_util.flatten_dict(
        {k: v for k, v in source.items() if k != "architecture"}, sep="/")

    def fits(key: str) -> bool:
        return key in flat_s and tuple(np.shape(flat_s[key])) == tuple(flat_t[key].shape)

    def head_of(key: str) -> str | None:
        return next((h for h in HEAD_MODULES if key.split("/")[1] == h), None)

    reset = {head_of(k) for k in flat_t if head_of(k) and not fits(k)}
    problems = [f"{k} missing" if k not in flat_s else
                f"{k} has shape {tuple(np.shape(flat_s[k]))}, needs {tuple(flat_t[k].shape)}"
                for k in flat_t if head_of(k) is None and not fits(k)]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more"
                                            if len(problems) > 8 else "")
        raise ValueError(f"init_from weights do not fit {len(problems)} tensors of this "
                         f"model: {shown}. {advice(source.get('architecture'))}")
    merged = {k: v if head_of(k) in reset else np.asarray(flat_s[k], v.dtype)
              for k, v in flat_t.items()}
    return flax.traverse_util.unflatten_dict(merged, sep="/"), sorted(reset)


def advice(arch: dict[str, Any] | None) -> str:
    """What to set for weights of the network `arch` describes (`restore_variables`)."""
    if not arch or not arch.get("name"):
        return "Check model.name, layout and depth_multiplier"
    flags = " ".join([f"--config.model.name={arch['name']}"] + [
        f"--config.model.{k}={str(arch[k]).lower() if isinstance(arch[k], bool) else arch[k]}"
        for k in SHAPE_FIELDS if k in arch])
    return f"The weights are of {arch['name']}: train with {flags}"
