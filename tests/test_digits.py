"""Tests for the `inception_digits` TFDS builder."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from inception_flax.data import digits


@pytest.fixture(scope="module")
def builder(
        tmp_path_factory: pytest.TempPathFactory) -> tfds.core.DatasetBuilder:
    """Prepares the dataset offline into a temporary data_dir."""
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = tfds.builder("inception_digits", data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


def _expected_examples(test: bool) -> list[tuple[int, bytes]]:
    """Returns sorted (label, image bytes) pairs of a split from sklearn."""
    source = sk_datasets.load_digits()
    return sorted((int(label), digits.to_rgb_uint8(image).tobytes())
                  for index, (image, label) in enumerate(
                      zip(source.images, source.target))
                  if digits.is_test_index(index) == test)


def test_registered_under_name():
    assert tfds.builder_cls("inception_digits") is digits.InceptionDigits


def test_to_rgb_uint8_scales_and_upsamples():
    image = np.zeros((8, 8))
    image[0, 1] = 16
    image[7, 7] = 8
    rgb = digits.to_rgb_uint8(image)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert (rgb[0:4, 4:8] == 255).all()
    assert (rgb[28:32, 28:32] == 128).all()
    assert rgb.sum() == 3 * 16 * (255 + 128)


def test_split_sizes_from_info(builder: tfds.core.DatasetBuilder):
    splits = builder.info.splits
    assert splits["train"].num_examples == 1437
    assert splits["test"].num_examples == 360
    assert builder.info.features["label"].num_classes == 10
    assert builder.info.version == "1.0.0"


@pytest.mark.parametrize("split", ["train", "test"])
def test_examples_match_sklearn(builder: tfds.core.DatasetBuilder, split: str):
    examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
    images = np.stack([ex["image"] for ex in examples])
    labels = np.array([ex["label"] for ex in examples])
    assert images.shape == (len(examples), 32, 32, 3)
    assert images.dtype == np.uint8
    assert set(labels.tolist()) == set(range(10))
    actual = sorted((int(ex["label"]), ex["image"].tobytes())
                    for ex in examples)
    assert actual == _expected_examples(test=split == "test")
