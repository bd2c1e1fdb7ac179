"""From each process's batches to global arrays sharded over every device.

Each process reads its slice of every global batch from the input pipeline
(`inception_flax.data.pipeline`) and `to_global` assembles the slices into one
array per feature, sharded over the mesh's batch axis. The train split can be
cut into a fixed number of shards (`dataset.input_shards`) so that the data
order does not depend on the number of processes.

TensorFlow comes in with the pipeline, imported inside the functions that read
data: `to_global` needs JAX only (the benchmark runs without TensorFlow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
from jax.sharding import NamedSharding
import ml_collections
import numpy as np

if TYPE_CHECKING:
    from inception_flax.data import info as info_lib
    from inception_flax.data import pipeline, preprocess


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's slice of the global batch, as one array sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def preprocessing(config: ml_collections.ConfigDict) -> preprocess.Preprocessing:
    """The pipeline's crop and flip options from `config.dataset`."""
    from inception_flax.data import preprocess
    d = config.dataset
    return preprocess.Preprocessing(
        area_range=tuple(d.area_range), aspect_ratio_range=tuple(d.aspect_ratio_range),
        random_flip=d.random_flip, central_fraction=d.central_fraction)


def input_shards(config: ml_collections.ConfigDict) -> int:
    """How many shards of the train split make up a global batch (0: one per process).

    `dataset.input_shards=N` fixes the data order independently of the number of
    processes: every global batch is the concatenation of one batch of each of N
    shards (shard i is read as if by process i of N), and each process reads its
    N / process_count consecutive shards. Hence 2 processes x 2 devices and
    1 process x 4 devices see the same examples in the same order.
    """
    n = config.dataset.input_shards
    return n if n > 0 else jax.process_count()


class _ShardedIterator:
    """Batches of several shard iterators, concatenated; position saved per shard."""

    def __init__(self, iterators):
        self.iterators = iterators

    def __next__(self):
        batches = [next(it) for it in self.iterators]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def __iter__(self):
        return self

    @staticmethod
    def _path(path: str, i: int) -> str:
        return path if i == 0 else f"{path}_shard{i}"

    def save(self, path: str) -> None:
        for i, it in enumerate(self.iterators):
            it.save(self._path(path, i))

    def restore(self, path: str) -> None:
        for i, it in enumerate(self.iterators):
            it.restore(self._path(path, i))


class _SumCounter:
    """The skipped-image counters of several shards, as one."""

    def __init__(self, counters):
        self.counters = counters

    @property
    def count(self) -> int:
        return sum(c.count for c in self.counters)


def train_dataset(config: ml_collections.ConfigDict, index: int | None = None,
                  count: int | None = None):
    """Shard `index` of `count` (default: this process's) of the train split, batched."""
    from inception_flax.data import pipeline
    d = config.dataset
    return pipeline.create_split(
        d.name, d.train_split, batch_size=config.batch_size // (count or jax.process_count()),
        image_size=config.image_size, train=True, data_dir=d.data_dir,
        preprocessing=preprocessing(config), shuffle_buffer=d.shuffle_buffer, seed=config.seed,
        threadpool_size=d.threadpool_size or None, process_index=index, process_count=count)


def train_iterator(config: ml_collections.ConfigDict):
    """This process's checkpointable iterator of its slice of each global batch,
    and the counter of the images it skipped."""
    from inception_flax.data import pipeline
    shards, procs = input_shards(config), jax.process_count()
    if shards == procs:
        ds, skipped = train_dataset(config)
        return pipeline.create_checkpointable_iterator(ds), skipped
    per = shards // procs
    parts = [train_dataset(config, index=jax.process_index() * per + i, count=shards)
             for i in range(per)]
    return (_ShardedIterator([pipeline.create_checkpointable_iterator(ds)
                              for ds, _ in parts]),
            _SumCounter([c for _, c in parts]))


def eval_dataset(config: ml_collections.ConfigDict, info: info_lib.DataInfo):
    """This process's share of the eval split, padded so every process runs as many steps."""
    from inception_flax.data import pipeline
    d = config.dataset
    per_process = config.eval_batch_size // jax.process_count()
    pad_to = None
    if info.eval_examples is not None:
        pad_to = pipeline.eval_num_batches(
            info.eval_examples, per_process, jax.process_count())
    return pipeline.create_split(
        d.name, d.eval_split, batch_size=per_process, image_size=config.image_size,
        train=False, data_dir=d.data_dir, preprocessing=preprocessing(config),
        threadpool_size=d.threadpool_size or None, pad_to_num_batches=pad_to)
