"""Tests for the tf.data input pipeline."""

import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from inception_flax.data import pipeline, preprocess

DIGITS = "inception_digits"
IMAGE_SIZE = 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Returns a temporary data_dir with the digits dataset prepared."""
    path = str(tmp_path_factory.mktemp("tfds"))
    pipeline.prepare_dataset(DIGITS, path)
    return path


def _digits_split(data_dir: str, split: str, *, train: bool,
                  batch_size: int = 32, **kwargs) -> tf.data.Dataset:
    """Returns the digits dataset of one process (single process default)."""
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    ds, _ = pipeline.create_split(
        DIGITS, split, batch_size=batch_size, image_size=IMAGE_SIZE,
        train=train, data_dir=data_dir, **kwargs)
    return ds


def _take(ds: tf.data.Dataset, n: int) -> list[dict[str, np.ndarray]]:
    """Returns the first `n` batches as NumPy dicts."""
    return list(ds.take(n).as_numpy_iterator())


def _fingerprints(batches: list[dict[str, np.ndarray]]) -> list[bytes]:
    """Returns sorted fingerprints of the real (unmasked) examples."""
    return sorted(
        image.tobytes() + label.tobytes()
        for batch in batches
        for image, label, mask in zip(batch["image"], batch["label"],
                                      batch["mask"])
        if mask)


def _write_folder_dataset(root: pathlib.Path) -> None:
    """Writes 2 labels x 3 JPEGs, a grey PNG and one corrupt .jpg file."""
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        label_dir = root / "train" / label
        label_dir.mkdir(parents=True)
        for i in range(3):
            image = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
            tf.io.write_file(str(label_dir / f"{i}.jpg"),
                             tf.io.encode_jpeg(image))
    grey = rng.integers(0, 256, (12, 10, 1), dtype=np.uint8)
    tf.io.write_file(str(root / "train" / "dog" / "grey.png"),
                     tf.io.encode_png(grey))
    (root / "train" / "cat" / "corrupt.jpg").write_bytes(b"\x00garbage" * 9)


def test_tf_sees_no_gpu():
    assert not tf.config.get_visible_devices("GPU")


def test_num_examples_and_classes(data_dir: str):
    assert pipeline.num_examples(DIGITS, "train", data_dir) == 1437
    assert pipeline.num_examples(DIGITS, "test", data_dir) == 360
    assert pipeline.num_examples(DIGITS, "test[:50%]", data_dir) == 180
    assert pipeline.num_examples(DIGITS, "nope", data_dir) is None
    assert pipeline.num_classes(DIGITS, data_dir) == 10


def test_train_batches(data_dir: str):
    ds = _digits_split(data_dir, "train", train=True, threadpool_size=2)
    batches = _take(ds, 50)  # More than one epoch: repeats.
    assert len(batches) == 50
    for batch in batches:
        assert batch["image"].shape == (32, IMAGE_SIZE, IMAGE_SIZE, 3)
        assert batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        assert (batch["mask"] == 1).all()
        assert -1 <= batch["image"].min() and batch["image"].max() <= 1
        assert ((0 <= batch["label"]) & (batch["label"] < 10)).all()
    images = np.stack([b["image"] for b in batches])
    assert images.min() == -1 and images.max() == 1


def test_train_is_deterministic_for_a_seed(data_dir: str):
    first = _take(_digits_split(data_dir, "train", train=True, seed=3), 3)
    again = _take(_digits_split(data_dir, "train", train=True, seed=3), 3)
    other = _take(_digits_split(data_dir, "train", train=True, seed=4), 3)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_train_without_flip_and_crop_matches_eval(data_dir: str):
    """Full-image crops (via the fallback) and no flip: train equals eval."""
    full_crop = preprocess.Preprocessing(
        area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0),
        random_flip=False, central_fraction=1.0)
    kwargs = dict(preprocessing=full_crop, batch_size=360)
    train = _take(_digits_split(data_dir, "test", train=True,
                                shuffle_buffer=1, **kwargs), 1)
    evaluation = _take(_digits_split(data_dir, "test", train=False,
                                     **kwargs), 1)
    np.testing.assert_array_equal(train[0]["image"],
                                  evaluation[0]["image"])


def test_eval_covers_every_example_once(data_dir: str):
    batches = list(_digits_split(data_dir, "test", train=False,
                                 batch_size=64).as_numpy_iterator())
    assert len(batches) == 6  # ceil(360 / 64)
    assert all(b["image"].shape[0] == 64 for b in batches)
    assert sum(b["mask"].sum() for b in batches) == 360
    assert batches[-1]["mask"].tolist() == [1] * 40 + [0] * 24
    assert (batches[-1]["image"][40:] == 0).all()
    assert len(set(_fingerprints(batches))) > 300  # Real, distinct images.


def test_process_shards_are_disjoint_and_cover(data_dir: str):
    whole = list(_digits_split(data_dir, "test", train=False)
                 .as_numpy_iterator())
    shards = [
        list(_digits_split(data_dir, "test", train=False, process_index=i,
                           process_count=2).as_numpy_iterator())
        for i in range(2)
    ]
    sizes = [sum(b["mask"].sum() for b in shard) for shard in shards]
    assert sizes == [180, 180]
    assert not set(_fingerprints(shards[0])) & set(_fingerprints(shards[1]))
    assert (sorted(_fingerprints(shards[0]) + _fingerprints(shards[1])) ==
            _fingerprints(whole))


def test_pad_to_num_batches(data_dir: str):
    num_batches = pipeline.eval_num_batches(360, 64, process_count=2)
    assert num_batches == 3
    batches = list(_digits_split(
        data_dir, "test", train=False, batch_size=64, process_index=1,
        process_count=2, pad_to_num_batches=num_batches + 1)
                   .as_numpy_iterator())
    assert len(batches) == 4
    assert sum(b["mask"].sum() for b in batches) == 180
    assert (batches[-1]["mask"] == 0).all()
    with pytest.raises(ValueError, match="pad_to_num_batches"):
        _digits_split(data_dir, "test", train=False, batch_size=64,
                      pad_to_num_batches=2)


def test_iterator_restore_resumes_at_same_batch(data_dir: str,
                                                tmp_path: pathlib.Path):
    def make_iterator():
        ds = _digits_split(data_dir, "train", train=True, batch_size=64,
                           shuffle_buffer=500, seed=7)
        return pipeline.create_checkpointable_iterator(ds)

    iterator = make_iterator()
    for _ in range(30):  # Past the first epoch (1437 / 64 ~ 22 batches).
        next(iterator)
    checkpoint = tmp_path / "iterator" / "ckpt"
    iterator.save(checkpoint)
    expected = [next(iterator) for _ in range(3)]

    restored = make_iterator()
    restored.restore(checkpoint)
    for want in expected:
        got = next(restored)
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(got[key], want[key])


def test_folder_dataset_skips_and_counts_corrupt_image(tmp_path: pathlib.Path):
    _write_folder_dataset(tmp_path)
    name = f"folder:{tmp_path}"
    assert pipeline.num_examples(name, "train") == 8
    assert pipeline.num_classes(name) == 2
    ds, skipped = pipeline.create_split(
        name, "train", batch_size=4, image_size=IMAGE_SIZE, train=False,
        process_index=0, process_count=1)
    batches = list(ds.as_numpy_iterator())
    assert skipped.count == 1
    assert sum(b["mask"].sum() for b in batches) == 7
    labels = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 1]
    assert all(b["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
               for b in batches)


def test_folder_dataset_train_and_shards(tmp_path: pathlib.Path):
    _write_folder_dataset(tmp_path)
    name = f"folder:{tmp_path}"
    ds, skipped = pipeline.create_split(
        name, "train", batch_size=4, image_size=IMAGE_SIZE, train=True,
        process_index=0, process_count=1)
    batches = _take(ds, 7)  # 4 epochs of the 7 good images.
    assert all((b["mask"] == 1).all() for b in batches)
    assert skipped.count >= 3  # Counted again in every epoch read so far.
    shard_sizes = []
    for index in range(2):
        ds, _ = pipeline.create_split(
            name, "train", batch_size=8, image_size=IMAGE_SIZE, train=False,
            process_index=index, process_count=2)
        shard_sizes.append(sum(b["mask"].sum()
                               for b in ds.as_numpy_iterator()))
    assert sum(shard_sizes) == 7


def test_decoded_grey_image_becomes_rgb():
    grey = tf.constant(np.arange(20, dtype=np.uint8).reshape(4, 5, 1))
    window_fn = lambda shape: tf.concat([[0, 0], shape], 0)
    rgb = preprocess.decode_and_crop(grey, window_fn)
    assert rgb.shape == (4, 5, 3)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize("name", ["imagenet2012", "imagenette"])
def test_mock_data_through_same_api(name: str, tmp_path: pathlib.Path):
    with tfds.testing.mock_data(num_examples=10):
        assert pipeline.num_examples(name, "train",
                                           str(tmp_path)) is None
        train, skipped = pipeline.create_split(
            name, "train", batch_size=4, image_size=IMAGE_SIZE, train=True,
            data_dir=str(tmp_path))
        batch = next(iter(train))
        evaluation, _ = pipeline.create_split(
            name, "validation", batch_size=4, image_size=IMAGE_SIZE,
            train=False, data_dir=str(tmp_path))
        eval_total = sum(b["mask"].sum()
                         for b in evaluation.as_numpy_iterator())
    assert batch["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert skipped.count == 0
    assert eval_total == 10
