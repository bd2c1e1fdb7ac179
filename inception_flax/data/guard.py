"""Decoding that survives broken images: failures are dropped, counted and named.

`map_dropping_failures` applies a preprocessing function to a stream of examples.
An example whose function raises (a truncated JPEG, a file that is not an image)
is dropped instead of ending the run; a `SkipCounter` counts it (logged by the
trainer as `train/skipped_images`) and names its file once in a warning.
"""

from collections.abc import Callable

from absl import logging
import tensorflow as tf

# Examples are preprocessed in groups of this size inside the error guard
# (see `_guard`), which amortises its per-group cost.
_GUARD_GROUP_SIZE = 32


class SkipCounter:
    """Counts images dropped because they could not be decoded/preprocessed, and
    names each such file once in a warning (a user wants to fix or delete it).

    The count lives in a TensorFlow variable updated by the pipeline as it
    processes examples, so it includes examples still in prefetch buffers and
    counts a broken training image again in every epoch. It is local to the
    process and not part of iterator checkpoints (it restarts at 0).
    """

    def __init__(self):
        self._variable = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._logged: set[str] = set()

    @property
    def count(self) -> int:
        """Returns the number of skipped images so far."""
        return int(self._variable.numpy())

    def log_once(self, name: str) -> None:
        """Warns that the image `name` is skipped, the first time it is."""
        if name in self._logged:
            return
        self._logged.add(name)
        logging.warning("Skipping an image that cannot be decoded: %s (training goes on "
                        "without it; it is counted in train/skipped_images in every epoch: "
                        "fix or delete the file)", name or "(an example without a file name)")

    def keep_valid(self, example: dict[str, tf.Tensor], valid: tf.Tensor,
                   name: tf.Tensor) -> tf.Tensor:
        """Filter predicate: counts (and names) an invalid example, returns `valid`."""
        del example  # Unused.
        increment = self._variable.assign_add(
            tf.cast(tf.logical_not(valid), tf.int64))
        logged = tf.cond(valid, lambda: tf.constant(True), lambda: tf.py_function(
            lambda n: self.log_once(n.numpy().decode(errors="replace")) or True,
            [name], tf.bool))
        with tf.control_dependencies([increment, logged]):
            return tf.identity(valid)


def map_dropping_failures(
    ds: tf.data.Dataset, fn: Callable[..., dict[str, tf.Tensor]], image_size: int,
) -> tuple[tf.data.Dataset, "SkipCounter"]:
    """Maps `fn(index, example)` over `ds`, dropping and counting the examples it fails on.

    Yields `(result, valid, name)` elements (`valid` is always True once filtered),
    and returns the counter of the dropped ones.
    """
    counter = SkipCounter()
    ds = ds.enumerate().batch(_GUARD_GROUP_SIZE).interleave(
        _guard(fn, _placeholder(image_size)),
        block_length=_GUARD_GROUP_SIZE, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.filter(counter.keep_valid), counter


def _guard(
    fn: Callable[..., dict[str, tf.Tensor]],
    placeholder: dict[str, tf.Tensor],
) -> Callable[..., tf.data.Dataset]:
    """Makes `fn` failure-tolerant, for use with `Dataset.interleave`.

    The returned function takes a group of batched `(index, example)` and yields
    one `(result, valid, name)` per member: `(fn(...), True, name)` for each
    success, in order, then `(placeholder, False, name)` for each member where
    `fn` raised (e.g. a corrupt image), to be counted and named, then filtered
    out. Only a group with a failure runs its members again, one by one, to
    find which failed.
    """

    def guarded(index: tf.Tensor, example: dict[str, tf.Tensor]) -> tf.data.Dataset:
        size = tf.shape(index, out_type=tf.int64)[0]
        members = tf.data.Dataset.from_tensor_slices((index, example))
        results = members.map(
            lambda i, ex: (fn(i, ex), True, ex["name"])).ignore_errors()
        failures = members.flat_map(
            lambda i, ex: _if_fails(fn, i, ex).map(
                lambda _: (placeholder, False, ex["name"])))
        return results.concatenate(failures).take(size)

    return guarded


def _if_fails(fn: Callable[..., dict[str, tf.Tensor]], index: tf.Tensor,
              example: dict[str, tf.Tensor]) -> tf.data.Dataset:
    """One element if `fn(index, example)` fails, else none."""
    succeeded = tf.data.Dataset.from_tensors((index, example)).map(
        lambda i, ex: fn(i, ex)["image"]).ignore_errors().map(lambda _: True)
    return succeeded.concatenate(tf.data.Dataset.from_tensors(False)).take(1).filter(
        tf.logical_not)


def _placeholder(image_size: int) -> dict[str, tf.Tensor]:
    """Returns a dummy preprocessed example standing in for a failed one."""
    return {
        "image": tf.zeros([image_size, image_size, 3], tf.float32),
        "label": tf.constant(0, tf.int32),
    }
