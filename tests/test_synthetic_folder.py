"""The JPEG-folder generator (`inception_flax.data.synthetic_folder`), and what the training
pipeline does with the folder's corrupt files: skips them, counts them (the figure train.py
logs as `train/skipped_images`) and names each one once."""

import io
import logging
import os
import pathlib

import pytest
import tensorflow as tf
from PIL import Image

from configs import common
from inception_flax.data import pipeline, sharding, synthetic_folder

NUM_IMAGES, NUM_CORRUPT = 6, 3


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> synthetic_folder.Written:
    return synthetic_folder.write_folder(str(tmp_path_factory.mktemp("jpegs")), NUM_IMAGES,
                                         num_classes=2, num_corrupt=NUM_CORRUPT, seed=5)


def _tree(root: str) -> dict[str, bytes]:
    """Every file under `root`, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(pathlib.Path(root).rglob("*")) if p.is_file()}


def test_layout_counts_and_sizes(written: synthetic_folder.Written):
    """root/train/<label>/*.jpg, labels in turn; good JPEGs of about 500x375 at quality
    90, both orientations, with content that is not flat."""
    assert sorted(os.listdir(os.path.join(written.root, "train"))) == ["class000", "class001"]
    assert len(_tree(written.root)) == NUM_IMAGES + NUM_CORRUPT
    assert len(written.good) == NUM_IMAGES and len(written.corrupt) == NUM_CORRUPT
    assert pipeline.num_examples(f"folder:{written.root}", "train") == NUM_IMAGES + NUM_CORRUPT
    shapes = []
    for path in written.good:
        data = pathlib.Path(path).read_bytes()
        assert tf.io.is_jpeg(data)
        image = tf.io.decode_jpeg(data).numpy()
        height, width = image.shape[:2]
        shapes.append((height, width))
        assert 400 <= max(height, width) <= 600 and 0.55 < min(height, width) / max(
            height, width) < 0.95
        assert len(data) > 30_000 and image.std() > 20  # not flat colour
        # Quality 90: re-encoding the decoded pixels at 90 gives about the same size.
        again = len(synthetic_folder.encode_jpeg(image, 90))
        assert 0.8 < len(data) / again < 1.25
    assert any(h > w for h, w in shapes) and any(w > h for h, w in shapes)


def test_corrupt_files_are_unreadable(written: synthetic_folder.Written):
    """Neither TensorFlow (whole image or any crop window) nor PIL reads them."""
    for path in written.corrupt:
        data = pathlib.Path(path).read_bytes()
        with pytest.raises(tf.errors.InvalidArgumentError):
            tf.io.decode_image(data, channels=3)
        if tf.io.is_jpeg(data):
            for window in ([0, 0, 8, 8], [0, 0, 300, 400], [100, 50, 60, 60]):
                with pytest.raises(tf.errors.InvalidArgumentError):
                    tf.image.decode_and_crop_jpeg(data, window, channels=3)
        with pytest.raises(OSError):
            Image.open(io.BytesIO(data)).convert("RGB")


def test_deterministic_from_the_seed(written: synthetic_folder.Written, tmp_path: pathlib.Path):
    same = synthetic_folder.write_folder(str(tmp_path / "same"), NUM_IMAGES, num_classes=2,
                                         num_corrupt=NUM_CORRUPT, seed=5)
    assert _tree(same.root) == _tree(written.root)
    other = synthetic_folder.write_folder(str(tmp_path / "other"), 1, num_classes=2,
                                          num_corrupt=0, seed=6)
    first = os.path.join("train", "class000", "000000.jpg")
    assert _tree(other.root)[first] != _tree(written.root)[first]


def test_tfds_copy_holds_the_same_bytes(written: synthetic_folder.Written,
                                        tmp_path: pathlib.Path):
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path / "tfds")
    synthetic_folder.write_tfds(written, data_dir)
    name = synthetic_folder.TFDS_NAME
    assert pipeline.num_examples(name, "train", data_dir) == NUM_IMAGES
    assert pipeline.num_classes(name, data_dir) == 2
    ds = pipeline.get_builder(name, data_dir).as_dataset(
        split="train", decoders={"image": tfds.decode.SkipDecoding()})
    got = {ex["image/filename"].decode(): (ex["image"], ex["label"])
           for ex in tfds.as_numpy(ds)}
    want = {p: (pathlib.Path(p).read_bytes(), i % 2) for i, p in enumerate(written.good)}
    assert got == want


def test_corrupt_files_counted_and_named_once(written: synthetic_folder.Written,
                                              caplog: pytest.LogCaptureFixture):
    """Through `sharding.train_iterator`, as the training loop reads the folder: every
    corrupt file is skipped and counted in each epoch, and named in one warning."""
    config = common.base_config("inception_v3", 32)
    config.dataset.name = f"folder:{written.root}"
    config.batch_size = 4
    with caplog.at_level(logging.WARNING):
        iterator, skipped = sharding.train_iterator(config)
        # Failures come out after the good images of their group of 32 examples (over 3
        # epochs of this folder): 8 batches read past the first group.
        for _ in range(8):
            batch = next(iterator)
            assert batch["mask"].sum() == 4
    assert skipped.count >= 2 * NUM_CORRUPT
    named = [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]
    assert sorted(next(p for p in written.corrupt if p in m) for m in named) == sorted(
        written.corrupt), named
