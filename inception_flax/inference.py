"""A trained network for inference: weights, class names and input, from a run or converted weights.

`load(DIR)` reads either kind of directory that `eval.py --checkpoint` takes:
- a run's workdir: the newest readable checkpoint (its moving average of the
  parameters when the run kept one), restored into host arrays so a run saved on any
  number of devices loads; the model and preprocessing from the `config.json` that
  `record_run` wrote at the run's start, class names from its `labels.txt`;
- converted weights (`model.json` + `variables/`): the source's input convention
  recorded at conversion (convert/inputs.py); ImageNet-1k class names for 1000 classes.

`classify(network, paths)` runs the network with BatchNorm in inference mode on every
local device, in fixed-size batches, and yields one result or failure per file.

The ImageNet-1k class names (`data/imagenet_classes.txt`, in class-index order) are
torchvision 0.29.1's (`weights.meta["categories"]` of its ImageNet weights).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, NamedTuple

import numpy as np

from inception_flax.data.files import ImageError, InputSpec, read

CONFIG_FILE = "config.json"
LABELS_FILE = "labels.txt"
IMAGENET_CLASSES = os.path.join(os.path.dirname(__file__), "data", "imagenet_classes.txt")


class InputError(ValueError):
    """Bad input to predict / export (checkpoint, image size): one line with the fix."""


class Network(NamedTuple):
    name: str                # registry name of the network
    model: Any               # the Flax module
    variables: dict          # {"params", "batch_stats"} as numpy arrays
    labels: list[str]        # class names, in class-index order
    input: InputSpec
    step: int                # the checkpoint's training step (0: converted weights)
    moving_average: bool     # the parameters are the run's moving average


class Prediction(NamedTuple):
    path: str
    classes: list[int]        # the top-k class indices, most probable first
    probabilities: list[float]
    names: list[str]


class Failure(NamedTuple):
    path: str
    error: str               # one line naming the file


# ----------------------------------------------------------------------------
# Recording a run (train.py, at its start) and loading either kind of directory
# ----------------------------------------------------------------------------

def record_run(workdir: str, config, num_classes: int,
               labels: "list[str] | tuple[str, ...] | None" = None) -> None:
    """Write the run's config and its classes' names (the dataset's, `DataInfo.label_names`)
    into its workdir, so that `load` needs neither the config file nor the dataset."""
    os.makedirs(workdir, exist_ok=True)
    _write(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2) + "\n")
    if labels is not None and len(labels) == num_classes:
        _write(os.path.join(workdir, LABELS_FILE), "".join(f"{n}\n" for n in labels))


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def read_labels(path: str, num_classes: int) -> list[str] | None:
    """One class name a line; None when absent or not one name per class."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        names = [line.rstrip("\n") for line in f]
    return names if len(names) == num_classes else None


def load(path: str, image_size: int | None = None, config=None) -> Network:
    """The network of `path` (a run's workdir or converted weights), for inference.

    `image_size` overrides the input size; `config` stands in for a run's missing
    `config.json`. Raises InputError (one line) before anything compiles.
    """
    if not os.path.isdir(path):
        raise InputError(f"--checkpoint={path} does not exist: give a run's workdir "
                         "(train.py --workdir) or converted weights (python -m "
                         "inception_flax.convert --out)")
    if os.path.isfile(os.path.join(path, "model.json")):
        network = _load_converted(path)
    else:
        network = _load_run(path, config)
    if image_size:
        from inception_flax import models
        minimum = models.min_image_size(network.name)
        if image_size < minimum:
            raise InputError(f"--image_size={image_size} is below {network.name}'s minimum "
                             f"of {minimum}: give {minimum} or more")
        network = network._replace(input=network.input.at_size(image_size))
    return network


def _load_converted(path: str) -> Network:
    from inception_flax import convert

    try:
        meta = convert.read_meta(path)
        model, variables = convert.load(path)
    except (OSError, ValueError) as e:
        raise InputError(f"--checkpoint={path}: converted weights that cannot be read "
                         f"({str(e).splitlines()[0]}): convert them again") from None
    num_classes = model.num_classes
    labels = (read_labels(IMAGENET_CLASSES, num_classes) if num_classes == 1000 else None)
    convention = meta.get("input")
    from inception_flax.convert import inputs
    if convention is None and meta.get("source") in inputs.CONVENTIONS:  # converted earlier
        convention = inputs.convention(meta["source"])
    spec = (InputSpec.from_convention(convention) if convention else
            InputSpec(image_size=_canonical_size(meta["model"])))
    variables = {k: _host(v) for k, v in variables.items()}
    return Network(meta["model"], model, variables, labels or _numbered(num_classes), spec,
                   0, False)


def _canonical_size(name: str) -> int:
    from inception_flax import models
    return models.spec(name).image_size


def _numbered(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def _host(tree: Any) -> Any:
    import jax
    return jax.tree.map(np.asarray, tree)


def _load_run(path: str, config) -> Network:
    import ml_collections

    from inception_flax import checkpoint, models
    from inception_flax.training import checks

    root = os.path.join(path, "checkpoints")
    if not any(n.isdigit() for n in (os.listdir(root) if os.path.isdir(root) else ())):
        raise InputError(
            f"--checkpoint={path} holds no weights: neither converted weights (model.json) "
            "nor a run's workdir with a checkpoint (checkpoints/<step>/); give the directory "
            "that python -m inception_flax.convert --out or train.py --workdir wrote")
    config_path = os.path.join(path, CONFIG_FILE)
    if config is None:
        if not os.path.isfile(config_path):
            raise InputError(
                f"--checkpoint={path} has no {CONFIG_FILE} (a run started before runs "
                "recorded it): pass the run's --config=configs/NET.py[:preset] and its "
                "--config.FIELD overrides")
        with open(config_path) as f:
            config = ml_collections.ConfigDict(json.load(f))
    try:
        with open(os.path.join(path, "run.json")) as f:
            num_classes = int(json.load(f)["num_classes"])
    except (OSError, ValueError, KeyError):
        raise InputError(f"--checkpoint={path} has no readable run.json (the run's model "
                         "and classes, written by train.py): give a train.py workdir") from None
    name = models.canonical_name(config.model.name)
    overrides = checks.model_overrides(config, num_classes)
    overrides.pop("axis_name", None)  # inference: running statistics, no batch statistics
    model = models.create_model(name, **overrides)
    try:
        step, state = checkpoint.restore_newest_on_host(root)
    except FileNotFoundError as e:
        raise InputError(f"--checkpoint={path}: no checkpoint can be read ({e})") from None
    ema = state.get("ema_params") is not None
    variables = {"params": state["ema_params"] if ema else state["params"],
                 "batch_stats": state.get("batch_stats") or {}}
    labels = read_labels(os.path.join(path, LABELS_FILE), num_classes)
    spec = InputSpec(image_size=int(config.image_size),
                     central_fraction=float(config.dataset.central_fraction))
    return Network(name, model, variables, labels or _numbered(num_classes), spec, step, ema)


# ----------------------------------------------------------------------------
# Classifying files
# ----------------------------------------------------------------------------

def make_probabilities(network: Network, devices=None):
    """`fn(images) -> probabilities` (numpy), the batch split over `devices` (default:
    every local device); batches must be a multiple of their number."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(devices or jax.local_devices()), ("batch",))
    replicated, batched = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    variables = jax.device_put(network.variables, replicated)

    @functools.partial(jax.jit, in_shardings=(replicated, batched), out_shardings=batched)
    def probabilities(variables, images):
        logits = network.model.apply(variables, images, train=False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    return lambda images: np.asarray(probabilities(variables, jax.device_put(images, batched)))


def line(p: Prediction) -> str:
    """How predict.py prints a prediction: `path: name probability | name probability ...`."""
    return f"{p.path}: " + " | ".join(f"{name} {prob:.6f}"
                                       for name, prob in zip(p.names, p.probabilities))


def expand(patterns: list[str]) -> list[str]:
    """Files named by paths, folders (their files, sorted, recursively) and globs.

    A pattern that names nothing is kept as it is: reading it reports the file missing.
    """
    import glob

    out: list[str] = []
    for p in patterns:
        if os.path.isdir(p):
            out += sorted(os.path.join(d, f) for d, _, names in os.walk(p) for f in names
                          if not f.startswith("."))
        elif any(c in p for c in "*?[") and (matches := sorted(glob.glob(p, recursive=True))):
            out += [m for m in matches if os.path.isfile(m)]
        else:
            out.append(p)
    return out


def classify(network: Network, paths: list[str], batch_size: int = 32, top_k: int = 5,
             devices=None) -> Iterator[Prediction | Failure]:
    """One `Prediction` or `Failure` per path, in order; batches padded to one size."""
    import jax

    n_dev = len(devices or jax.local_devices())
    batch = -(-min(batch_size, max(len(paths), 1)) // n_dev) * n_dev
    probabilities = make_probabilities(network, devices)
    k = min(top_k, len(network.labels))
    for start in range(0, len(paths), batch):
        entries: list[tuple[str, int | str]] = []  # (path, row of images or the error)
        images = []
        for path in paths[start:start + batch]:
            try:
                images.append(read(path, network.input))
                entries.append((path, len(images) - 1))
            except ImageError as e:
                entries.append((path, str(e)))
        probs = None
        if images:
            x = np.zeros((batch, *images[0].shape), np.float32)
            x[:len(images)] = np.stack(images)
            probs = probabilities(x)
        for path, what in entries:
            if isinstance(what, str):
                yield Failure(path, what)
                continue
            p = probs[what]
            top = np.argsort(-p, kind="stable")[:k]
            yield Prediction(path, [int(i) for i in top], [float(p[i]) for i in top],
                             [network.labels[i] for i in top])
