"""The serving function of a network, and its StableHLO export (`jax.export`)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import numpy as np

from inception_flax.inference import Network

FORMATS = ("savedmodel", "stablehlo")
STABLEHLO_FILE = "model.stablehlo"
SERVING_FILE = "serving.json"


def serving_fn(network: Network, softmax: bool = False, top_k: int = 0) -> Callable:
    """`fn(variables, images) -> {"logits", ...}`: the inference network (BatchNorm on
    its running statistics), plus `probabilities` and the `top_k` classes if asked."""
    import jax
    import jax.numpy as jnp

    model = network.model

    def serve(variables: Any, images: jax.Array) -> dict[str, jax.Array]:
        logits = model.apply(variables, images, train=False).astype(jnp.float32)
        out = {"logits": logits}
        if softmax or top_k:
            probabilities = jax.nn.softmax(logits, axis=-1)
            if softmax:
                out["probabilities"] = probabilities
            if top_k:
                out["top_k_probabilities"], out["top_k_classes"] = jax.lax.top_k(
                    probabilities, top_k)
        return out

    return serve


def input_shape(network: Network, batch: int | None) -> tuple:
    """(batch, size, size, 3); batch None: a symbolic (polymorphic) dimension `b`."""
    import jax

    size = network.input.image_size
    first = jax.export.symbolic_shape("b")[0] if batch is None else batch
    return (first, size, size, 3)


def export_stablehlo(network: Network, out: str, batch: int | None, softmax: bool = False,
                     top_k: int = 0, platforms: tuple[str, ...] | None = None) -> None:
    """Write `out/model.stablehlo`: the serialized `jax.export.Exported` of the network
    with its weights as constants, taking a float32 batch of images."""
    import functools

    import jax
    import jax.numpy as jnp

    fn = functools.partial(serving_fn(network, softmax, top_k), network.variables)
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(
        jax.ShapeDtypeStruct(input_shape(network, batch), jnp.float32))
    with open(os.path.join(out, STABLEHLO_FILE), "wb") as f:
        f.write(exported.serialize())


def describe(network: Network, fmt: str, batch: int | None, softmax: bool, top_k: int,
             checkpoint: str) -> dict[str, Any]:
    """What `serving.json` says: the input the artifact takes and what it returns."""
    size = network.input.image_size
    outputs = ["logits"] + (["probabilities"] if softmax else []) + (
        ["top_k_probabilities", "top_k_classes"] if top_k else [])
    return {"format": fmt, "network": network.name, "checkpoint": os.path.abspath(checkpoint),
            "step": network.step, "moving_average": network.moving_average,
            "input": {"shape": [batch, size, size, 3], "dtype": "float32",
                      "preprocessing": dataclasses.asdict(network.input)},
            "outputs": outputs, "top_k": top_k, "num_classes": len(network.labels)}


def export_network(network: Network, out: str, fmt: str = "savedmodel",
                   batch: int | None = None, softmax: bool = False, top_k: int = 0,
                   platforms: tuple[str, ...] | None = None, checkpoint: str = "",
                   overwrite: bool = False) -> str:
    """Write the serving artifact of `network` to the directory `out` (complete or
    absent: written under a temporary name, then renamed). Returns `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt}: choose one of {', '.join(FORMATS)}")
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"--out={out} already exists: pass --overwrite to replace it")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=os.path.dirname(out))
    try:
        if fmt == "stablehlo":
            export_stablehlo(network, tmp, batch, softmax, top_k, platforms)
        else:
            from inception_flax.export import savedmodel
            savedmodel.export_savedmodel(network, tmp, batch, softmax, top_k, platforms)
        with open(os.path.join(tmp, SERVING_FILE), "w") as f:
            json.dump(describe(network, fmt, batch, softmax, top_k, checkpoint), f, indent=1)
        with open(os.path.join(tmp, "labels.txt"), "w") as f:
            f.writelines(f"{name}\n" for name in network.labels)
        os.chmod(tmp, 0o755)  # mkdtemp's is private
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def host_variables(network: Network) -> Any:
    """The network's variables as float numpy arrays (for TensorFlow variables)."""
    import jax
    return jax.tree.map(np.asarray, network.variables)
