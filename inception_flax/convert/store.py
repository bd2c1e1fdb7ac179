"""The converted-weights directory: `model.json` + an orbax checkpoint of the variables.

    DIR/model.json   {"model": registry name, "overrides": create_model kwargs,
                      "source": where the weights came from, "config": configs/<...>.py,
                      "input": the source's input convention (convert/inputs.py), if known}
    DIR/variables/   orbax StandardCheckpointer: {"params": ..., "batch_stats": ...},
                     numpy float32

A directory is written next to DIR under a temporary name and renamed at the end,
so DIR is either complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

META_FILE = "model.json"
VARIABLES_DIR = "variables"
COLLECTIONS = ("params", "batch_stats")
CONFIGS = {
    "inception_v1": "configs/inception_v1.py",
    "inception_v3": "configs/inception_v3.py",
    "inception_v4": "configs/inception_v4.py",
    "inception_resnet_v2": "configs/inception_resnet_v2.py",
}


def default_config(name: str) -> str:
    return CONFIGS.get(name, f"configs/{name}.py")


def _numpy_tree(tree: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), dtype=np.float32), tree)


def save(directory: str | os.PathLike, name: str, overrides: Mapping[str, Any],
         variables: Mapping[str, Any], *, source: str | None = None,
         config: str | None = None, convention: Mapping[str, Any] | None = None,
         overwrite: bool = False) -> Path:
    """Write `variables` ({"params", "batch_stats"}) of `create_model(name, **overrides)`.

    Returns the directory. Refuses an existing `directory` unless `overwrite`.
    """
    from inception_flax import models

    name = models.canonical_name(name)
    overrides = dict(overrides)
    models.check_overrides(name, overrides)
    meta = {"model": name, "overrides": overrides, "source": source,
            "config": config or default_config(name)}
    if convention is not None:
        meta["input"] = dict(convention)
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=False) + "\n"
    except TypeError as e:
        raise ValueError(f"overrides must be JSON-serialisable: {e}") from e
    absent = [c for c in COLLECTIONS if c not in variables]
    if absent:
        raise ValueError(f"variables need {', '.join(COLLECTIONS)}; missing {', '.join(absent)}")
    tree = {c: _numpy_tree(variables[c]) for c in COLLECTIONS}

    out = Path(directory).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (overwrite it with --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / VARIABLES_DIR, tree)
            ckptr.wait_until_finished()
        (tmp / META_FILE).write_text(meta_text)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {META_FILE}: not converted weights")
    meta = json.loads(path.read_text())
    for key in ("model", "overrides"):
        if key not in meta:
            raise ValueError(f"{path}: no {key!r} entry")
    return meta


def load(directory: str | os.PathLike, *, check: bool = True):
    """`(model, variables)` from a converted directory, ready for
    `model.apply(variables, images, train=False)`.

    With `check`, every variable's shape is compared with the model's (orbax itself
    does not), and the tree must match exactly.
    """
    import orbax.checkpoint as ocp
    from flax.traverse_util import flatten_dict

    from inception_flax import models
    from inception_flax.convert.core import hashable, target_shapes

    meta = read_meta(directory)
    overrides = hashable(meta["overrides"])
    model = models.create_model(meta["model"], **overrides)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(Path(directory).absolute() / VARIABLES_DIR)
    variables = {c: restored[c] for c in COLLECTIONS if c in restored}
    if check:
        want = target_shapes(meta["model"], overrides)
        got = {k: tuple(np.shape(v)) for k, v in flatten_dict(variables).items()}
        problems = [f"missing {'/'.join(k)}" for k in sorted(set(want) - set(got))]
        problems += [f"unexpected {'/'.join(k)}" for k in sorted(set(got) - set(want))]
        problems += [f"{'/'.join(k)} {got[k]} != {want[k]}"
                     for k in sorted(set(want) & set(got)) if got[k] != want[k]]
        if problems:
            shown = ", ".join(problems[:12]) + (f", ... ({len(problems) - 12} more)"
                                                if len(problems) > 12 else "")
            raise ValueError(f"{directory}: variables do not fit {meta['model']} "
                             f"{meta['overrides']}: {shown}")
    return model, variables
