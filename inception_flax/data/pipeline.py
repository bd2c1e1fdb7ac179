"""tf.data input pipeline with Inception preprocessing (`inception_flax.data.preprocess`).

Sources:
  * Any TFDS dataset by name (`imagenet2012`, `imagenette`, `inception_digits`,
    ...) with `image` and `label` features, read from `data_dir`.
  * A folder of images, `folder:/path/to/root`, laid out as
    `root/<split>/<label>/<image>.{jpg,jpeg,png}` (`tfds.folder_dataset`).

Every element is a flat dict of tensors:
  * `image`: float32 [B, H, W, 3], values in [-1, 1].
  * `label`: int32 [B].
  * `mask`: float32 [B], 1 for real examples and 0 for eval padding.

Images are decoded by this pipeline (TFDS decoding is skipped) so that images
that fail to decode or preprocess are dropped instead of crashing the run.
Each dropped image increments a `guard.SkipCounter` returned with the dataset.

Augmentation randomness is stateless and derived from (seed, process index,
position of the example in the stream), so with `deterministic=True` a seed
fixes the exact batches, and a restored iterator (see
`create_checkpointable_iterator`) continues with the same batches.

TensorFlow only feeds JAX: the first use of a dataset (`get_builder`) hides the
GPUs from it (`hide_accelerators_from_tf`), leaving them to JAX.
"""

import math
from typing import Optional

from absl import logging
from clu import data as clu_data
import jax
import tensorflow as tf
import tensorflow_datasets as tfds

# Defining the builder registers `inception_digits` with TFDS.
from inception_flax.data import digits as _digits  # pylint: disable=unused-import
from inception_flax.data import guard
from inception_flax.data.preprocess import Preprocessing, make_preprocess_fn

FOLDER_PREFIX = "folder:"

_accelerators_hidden = False


def hide_accelerators_from_tf() -> None:
    """Makes TensorFlow run on CPU only, leaving GPUs to JAX (once per process).

    If TensorFlow's runtime was already initialised with visible GPUs, the
    setting cannot change anymore and a warning is logged instead of raising.
    """
    global _accelerators_hidden
    if _accelerators_hidden:
        return
    _accelerators_hidden = True
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as error:
        logging.warning("Could not hide GPUs from TensorFlow: %s", error)


def get_builder(dataset_name: str,
                data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
    """Returns the TFDS builder for a dataset name or a `folder:` root.

    Args:
        dataset_name: A TFDS name (e.g. `imagenet2012`) or `folder:<root>`.
        data_dir: TFDS data directory; ignored for folders.
    """
    hide_accelerators_from_tf()
    if dataset_name.startswith(FOLDER_PREFIX):
        root = dataset_name[len(FOLDER_PREFIX):]
        return tfds.folder_dataset.ImageFolder(root)
    return tfds.builder(dataset_name, data_dir=data_dir)


def prepare_dataset(dataset_name: str, data_dir: Optional[str] = None) -> None:
    """Prepares a TFDS dataset in `data_dir` if needed; folders need nothing.

    For `inception_digits` this works offline and takes seconds.
    """
    builder = get_builder(dataset_name, data_dir)
    if not isinstance(builder, tfds.folder_dataset.ImageFolder):
        builder.download_and_prepare()


def num_examples(dataset_name: str, split: str,
                 data_dir: Optional[str] = None) -> Optional[int]:
    """Returns the number of examples of a split, over all processes.

    Args:
        dataset_name: A TFDS name or `folder:<root>`.
        split: Split name or TFDS sub-split (e.g. `train[:90%]`).
        data_dir: TFDS data directory.

    Returns:
        The count from the builder's info, or None if unknown (e.g. under
        `tfds.testing.mock_data`).
    """
    splits = get_builder(dataset_name, data_dir).info.splits
    try:
        count = splits[split].num_examples
    except (KeyError, ValueError):
        return None
    return count or None


def num_classes(dataset_name: str,
                data_dir: Optional[str] = None) -> Optional[int]:
    """Returns the number of classes of the `label` feature, if known."""
    features = get_builder(dataset_name, data_dir).info.features
    return features["label"].num_classes or None


def eval_num_batches(num_eval_examples: int, batch_size: int,
                     process_count: int) -> int:
    """Returns how many batches the largest process shard needs.

    Pass it as `pad_to_num_batches` so that every process runs the same
    number of evaluation steps.

    Args:
        num_eval_examples: Examples in the whole evaluation split.
        batch_size: Per-process batch size.
        process_count: Number of processes sharing the split.
    """
    largest_shard = math.ceil(num_eval_examples / process_count)
    return math.ceil(largest_shard / batch_size)


def create_split(
    dataset_name: str,
    split: str,
    *,
    batch_size: int,
    image_size: int,
    train: bool,
    data_dir: Optional[str] = None,
    preprocessing: Preprocessing = Preprocessing(),
    shuffle_buffer: int = 10_000,
    seed: int = 0,
    deterministic: bool = True,
    threadpool_size: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    pad_to_num_batches: Optional[int] = None,
) -> tuple[tf.data.Dataset, guard.SkipCounter]:
    """Creates this process' dataset of preprocessed batches for a split.

    Training: the process shard is shuffled (seeded), repeated forever,
    augmented (random crop, optional flip) and batched with
    `drop_remainder=True`; `mask` is all ones. Evaluation: one pass in a fixed
    order, central crop; the last batch is padded to `batch_size` with
    `mask` 0, so every example of the shard is seen exactly once.

    Args:
        dataset_name: A TFDS name or `folder:<root>`.
        split: Split name; TFDS datasets also accept sub-splits.
        batch_size: Per-process batch size.
        image_size: Output height and width.
        train: Whether to build the training pipeline.
        data_dir: TFDS data directory (the dataset must be prepared).
        preprocessing: Crop and flip options.
        shuffle_buffer: Shuffle buffer size (training only).
        seed: Seed of file order, shuffling and augmentation.
        deterministic: Whether element order is deterministic.
        threadpool_size: Size of a private tf.data threadpool; None uses
            TensorFlow's shared pool.
        process_index: This process' shard; defaults to
            `jax.process_index()`.
        process_count: Number of shards; defaults to `jax.process_count()`.
        pad_to_num_batches: Evaluation only: append all-padding batches up to
            this many batches (see `eval_num_batches`).

    Returns:
        The dataset and the counter of skipped (undecodable) images.

    Raises:
        ValueError: If `pad_to_num_batches` is too small for the split.
    """
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    _check_num_batches(dataset_name, split, data_dir, batch_size,
                       process_count, pad_to_num_batches)
    builder = get_builder(dataset_name, data_dir)
    ds = _read_shard(builder, split, train=train, seed=seed,
                     process_index=process_index, process_count=process_count)
    if train:
        ds = ds.shuffle(shuffle_buffer, seed=seed,
                        reshuffle_each_iteration=True).repeat()
    ds, counter = _preprocess(
        ds, train=train, image_size=image_size, preprocessing=preprocessing,
        base_seed=tf.constant([seed, process_index], tf.int64))
    ds = _batch(ds, batch_size, train=train,
                pad_to_num_batches=pad_to_num_batches)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(deterministic, threadpool_size)), counter


def create_checkpointable_iterator(
        ds: tf.data.Dataset) -> clu_data.TfDatasetIterator:
    """Wraps a dataset in an iterator whose position can be saved/restored.

    `save(path)` / `restore(path)` store the full tf.data iterator state
    (including the shuffle buffer of encoded images, so checkpoints grow with
    `shuffle_buffer`). Must be used synchronously, without async prefetching.
    """
    return clu_data.TfDatasetIterator(ds, checkpoint=True)


def _check_num_batches(dataset_name: str, split: str, data_dir: Optional[str],
                       batch_size: int, process_count: int,
                       pad_to_num_batches: Optional[int]) -> None:
    """Raises ValueError if padding to `pad_to_num_batches` would drop data."""
    if pad_to_num_batches is None:
        return
    total = num_examples(dataset_name, split, data_dir)
    if total is None:
        return
    needed = eval_num_batches(total, batch_size, process_count)
    if pad_to_num_batches < needed:
        raise ValueError(f"pad_to_num_batches={pad_to_num_batches} is less "
                         f"than the {needed} batches needed for {split}.")


def _read_shard(builder: tfds.core.DatasetBuilder, split: str, *, train: bool,
                seed: int, process_index: int,
                process_count: int) -> tf.data.Dataset:
    """Reads this process' shard as {'image': encoded or uint8, 'label'}."""
    decoders = None
    if isinstance(builder.info.features["image"], tfds.features.Image):
        decoders = {"image": tfds.decode.SkipDecoding()}
    if isinstance(builder, tfds.folder_dataset.ImageFolder):
        # ImageFolder supports neither sub-splits nor seeded file shuffling.
        ds = builder.as_dataset(split=split, decoders=decoders)
        ds = ds.shard(process_count, process_index)
    else:
        shard = tfds.split_for_jax_process(
            split, process_index=process_index, process_count=process_count)
        ds = builder.as_dataset(split=shard, shuffle_files=train,
                                decoders=decoders,
                                read_config=tfds.ReadConfig(shuffle_seed=seed))
    return ds.map(lambda ex: {
        "image": ex["image"],
        "label": tf.cast(ex["label"], tf.int32),
        "name": _file_name(ex),
    })


def _file_name(example: dict[str, tf.Tensor]) -> tf.Tensor:
    """The example's file name where the dataset has one (folders and ImageNet do)."""
    keys = [k for k in ("image/filename", "file_name") if k in example]
    return example[keys[0]] if keys else tf.constant("")


def _preprocess(ds: tf.data.Dataset, *, train: bool, image_size: int,
                preprocessing: Preprocessing,
                base_seed: tf.Tensor) -> tuple[tf.data.Dataset, guard.SkipCounter]:
    """Decodes and preprocesses examples, dropping and counting failures."""
    preprocess = make_preprocess_fn(train, image_size, preprocessing, base_seed)
    return guard.map_dropping_failures(ds, preprocess, image_size)


def _batch(ds: tf.data.Dataset, batch_size: int, *, train: bool,
           pad_to_num_batches: Optional[int]) -> tf.data.Dataset:
    """Batches `(example, valid, name)` elements into masked example batches."""
    ds = ds.batch(batch_size, drop_remainder=train)
    ds = ds.map(lambda example, _, __: _add_mask(example, batch_size),
                num_parallel_calls=tf.data.AUTOTUNE)
    if pad_to_num_batches is not None and not train:
        ds = _pad_num_batches(ds, pad_to_num_batches)
    return ds


def _add_mask(batch: dict[str, tf.Tensor],
              batch_size: int) -> dict[str, tf.Tensor]:
    """Pads a (possibly partial) batch to `batch_size` and adds `mask`."""
    real = tf.shape(batch["label"])[0]
    batch = dict(batch, mask=tf.ones([real], tf.float32))
    return {k: _pad_leading(v, batch_size) for k, v in batch.items()}


def _pad_leading(x: tf.Tensor, size: int) -> tf.Tensor:
    """Zero-pads the leading dimension of `x` to `size`."""
    paddings = [[0, size - tf.shape(x)[0]]] + [[0, 0]] * (x.shape.rank - 1)
    return tf.ensure_shape(tf.pad(x, paddings), [size, *x.shape[1:]])


def _pad_num_batches(ds: tf.data.Dataset, num_batches: int) -> tf.data.Dataset:
    """Appends all-padding batches (mask 0) up to `num_batches` batches."""
    empty = {
        k: tf.zeros(spec.shape, spec.dtype)
        for k, spec in ds.element_spec.items()
    }
    filler = tf.data.Dataset.from_tensors(empty).repeat()
    return ds.concatenate(filler).take(num_batches)


def _options(deterministic: bool,
             threadpool_size: Optional[int]) -> tf.data.Options:
    """Returns the tf.data options of the pipeline."""
    options = tf.data.Options()
    options.deterministic = deterministic
    options.threading.max_intra_op_parallelism = 1
    if threadpool_size is not None:
        options.threading.private_threadpool_size = threadpool_size
    # The SkipCounter variable is external state; it is not checkpointed.
    options.experimental_external_state_policy = (
        tf.data.experimental.ExternalStatePolicy.IGNORE)
    return options
