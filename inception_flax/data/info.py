"""What a dataset says about itself: its classes and split sizes, checked against the config."""

from __future__ import annotations

import dataclasses
import os
import re
import time

import jax
from jax.experimental import multihost_utils
import ml_collections

from inception_flax import models
from inception_flax.training.checks import ConfigError


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """Classes and split sizes (None: unknown, e.g. under `tfds.testing.mock_data`)."""

    num_classes: int
    train_examples: int | None
    eval_examples: int | None
    label_names: tuple[str, ...] | None = None  # the classes' names, where the dataset has them


def data_info(config: ml_collections.ConfigDict) -> DataInfo:
    """Classes and split sizes, with clear errors for a missing split or dataset.

    Prepares the dataset first (process 0; the others wait) when `dataset.prepare`.
    """
    from inception_flax.data import pipeline
    d = config.dataset
    try:
        if d.prepare and jax.process_index() == 0:
            try:
                pipeline.prepare_dataset(d.name, d.data_dir)
            except Exception:  # noqa: BLE001 - another run preparing the same data_dir
                time.sleep(2.0)  # lost the race to rename its output: theirs is complete
                pipeline.prepare_dataset(d.name, d.data_dir)
        if jax.process_count() > 1 and d.prepare:
            multihost_utils.sync_global_devices("dataset prepared")
        builder = pipeline.get_builder(d.name, d.data_dir)
    except Exception as e:  # noqa: BLE001 - TFDS raises many kinds
        waiting = _awaiting_manual_files(d.name, d.data_dir)
        if waiting is not None:  # prepare=True without the manual downloads
            raise ConfigError(not_prepared_message(config, waiting)) from None
        raise ConfigError(f"dataset.name={d.name!r} cannot be read: {str(e).splitlines()[0]}"
                          ) from None
    if not d.name.startswith(pipeline.FOLDER_PREFIX):
        if searched_dir(builder, d.data_dir) is not None:
            raise ConfigError(not_prepared_message(config, builder))
        splits = set(builder.info.splits.keys())
        for field in ("train_split", "eval_split"):
            base = d[field].split("[")[0]
            if splits and base not in splits:
                raise ConfigError(
                    f"dataset.{field}={d[field]!r} is not a split of {d.name}: "
                    f"choose one of {', '.join(sorted(splits))}")
    num_classes = d.num_classes if d.num_classes > 0 else pipeline.num_classes(
        d.name, d.data_dir)
    if not num_classes:
        raise ConfigError(f"{d.name} does not state its number of classes: "
                          "set --config.dataset.num_classes")
    return DataInfo(
        num_classes=num_classes,
        train_examples=pipeline.num_examples(d.name, d.train_split, d.data_dir),
        eval_examples=pipeline.num_examples(d.name, d.eval_split, d.data_dir),
        label_names=label_names(builder),
    )


def label_names(builder) -> tuple[str, ...] | None:
    """The names of a dataset's classes (a TFDS `ClassLabel`'s, or a folder dataset's
    class folders); None when it does not state them."""
    try:
        names = builder.info.features["label"].names
    except Exception:  # noqa: BLE001 - no label feature, no names: numbered classes
        return None
    return tuple(str(n) for n in names) or None


def searched_dir(builder, data_dir: str | None) -> str | None:
    """The data directory that TFDS searched in vain for `builder`'s prepared files.

    None when the dataset is prepared, or when TFDS reads it from somewhere other
    than `data_dir` (another registered data directory, or the package's metadata
    under `tfds.testing.mock_data`): there is nothing to prepare in `data_dir`.
    """
    import tensorflow_datasets as tfds
    if builder.is_prepared():
        return None
    path, full_name = str(builder.data_dir).rstrip("/"), builder.info.full_name
    if not path.endswith("/" + full_name):
        return None
    root = path[:-len(full_name) - 1]
    wanted = data_dir or tfds.core.constants.get_default_data_dir()
    if "://" not in root:
        root, wanted = os.path.abspath(root), os.path.abspath(os.path.expanduser(wanted))
    return root if root == wanted.rstrip("/") else None


def _awaiting_manual_files(name: str, data_dir: str | None):
    """The builder of `name` when it is not prepared in `data_dir` and TFDS can only
    prepare it from manually downloaded files; else None."""
    from inception_flax.data import pipeline
    if name.startswith(pipeline.FOLDER_PREFIX):
        return None
    try:
        builder = pipeline.get_builder(name, data_dir)
    except Exception:  # noqa: BLE001 - an unknown name: the caller's message says so
        return None
    if not builder.MANUAL_DOWNLOAD_INSTRUCTIONS or searched_dir(builder, data_dir) is None:
        return None
    return builder


def not_prepared_message(config: ml_collections.ConfigDict, builder) -> str:
    """One line: where TFDS looked, what it needs to prepare the dataset, and the alternatives."""
    d = config.dataset
    root = searched_dir(builder, d.data_dir) or str(builder.data_dir)
    name = builder.name
    where = (f"dataset {name} is not prepared in data_dir {root} "
             f"(no {os.path.join(str(builder.data_dir), 'dataset_info.json')})")
    build = f"`tfds build {name} --data_dir={root}`"
    instructions = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    if instructions:
        urls = re.findall(r"https?://[^\s)>\]]+", instructions)
        files = re.findall(r"[\w.-]+\.(?:tar\.gz|tgz|tar|zip|7z)\b",
                           re.sub(r"https?://\S+", "", instructions))
        wanted = " and ".join(dict.fromkeys(files)) or "the files its instructions name"
        source = f" (from {urls[0].rstrip('.,')})" if urls else ""
        how = (f"TFDS builds it from manual downloads: put {wanted}{source} in "
               f"{os.path.join(root, 'downloads', 'manual')}, then "
               f"{'run again' if d.prepare else 'add --config.dataset.prepare=True'} "
               f"(or run {build})")
    else:
        how = (f"add --config.dataset.prepare=True to download and prepare it (or run {build})")
    network = models.canonical_name(config.model.name)
    return (f"{where}: {how}; or point --config.dataset.data_dir at a prepared copy; or train "
            f"on a folder of images with --config.dataset.name=folder:/path "
            f"(/path/{d.train_split}/<label>/*.jpg and /path/{d.eval_split}/<label>/*.jpg); "
            f"or try the embedded digits: --config=configs/{network}.py:digits")
