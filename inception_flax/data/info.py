"""What a dataset says about itself: its classes and split sizes, checked against the config."""

from __future__ import annotations

import dataclasses
import time

import jax
from jax.experimental import multihost_utils
import ml_collections

from inception_flax.training.checks import ConfigError


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """Classes and split sizes (None: unknown, e.g. under `tfds.testing.mock_data`)."""

    num_classes: int
    train_examples: int | None
    eval_examples: int | None


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
        raise ConfigError(f"dataset.name={d.name!r} cannot be read: {str(e).splitlines()[0]}"
                          ) from None
    if not d.name.startswith(pipeline.FOLDER_PREFIX):
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
    )
