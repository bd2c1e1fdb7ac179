"""TFDS builder for scikit-learn's bundled 8x8 handwritten digits.

The 1,797 greyscale digits ship inside the scikit-learn package
(`sklearn.datasets.load_digits`), so preparing this dataset needs no network
access and takes a few seconds. It is a small, real dataset for smoke-testing
the whole training system end to end.

Stored images are 32x32 RGB uint8 PNGs: the 0..16 grey levels are rescaled to
0..255, every source pixel is upsampled to a 4x4 block (nearest neighbour, so
the original pixels can be recovered exactly) and the grey channel is repeated
three times. The finer grid lets random crops cut between source pixels; the
input pipeline resizes to the model's image size anyway.

Split: example `i` (in scikit-learn's order) goes to `test` when `i % 5 == 0`
and to `train` otherwise, giving 1,437 train and 360 test examples with every
class present in both.

Usage:

    import inception_flax.data.digits  # Registers the builder.
    builder = tfds.builder("inception_digits", data_dir=data_dir)
    builder.download_and_prepare()
"""

from collections.abc import Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

NUM_CLASSES = 10
IMAGE_SIZE = 32
TEST_EVERY = 5

_SOURCE_SIZE = 8
_SOURCE_MAX_VALUE = 16
_UPSAMPLE = IMAGE_SIZE // _SOURCE_SIZE

_DESCRIPTION = """\
Optical recognition of handwritten digits (UCI), as bundled with
scikit-learn: 1,797 8x8 images with 17 grey levels, 10 classes. Stored as
32x32 RGB (nearest-neighbour upsampling, grey repeated to 3 channels).
Deterministic split: every 5th example is in `test`.
"""

_CITATION = """\
@misc{alpaydin1998optical,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
}
"""


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Converts one 8x8 digit with values in [0, 16] to 32x32x3 uint8.

    Args:
        image: Array of shape [8, 8] with grey levels in [0, 16].

    Returns:
        Array of shape [32, 32, 3], dtype uint8, values in [0, 255].
    """
    grey = np.rint(image * (255.0 / _SOURCE_MAX_VALUE)).astype(np.uint8)
    block = np.ones((_UPSAMPLE, _UPSAMPLE), dtype=np.uint8)
    upsampled = np.kron(grey, block)
    return np.repeat(upsampled[:, :, None], 3, axis=-1)


def is_test_index(index: int) -> bool:
    """Returns whether the example at `index` belongs to the test split."""
    return index % TEST_EVERY == 0


class InceptionDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits as a 32x32 RGB image dataset."""

    name = "inception_digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # Set explicitly: TFDS' own lookup of the code path needs the optional
    # `importlib_resources` package. Only used to look for a (non-existent)
    # checksums file, as nothing is downloaded.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        """Returns the dataset metadata."""
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(
                    shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/"
            "sklearn.datasets.load_digits.html",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Returns the train and test generators; nothing is downloaded."""
        del dl_manager  # The data ships with scikit-learn.
        return {
            "train": self._generate_examples(test=False),
            "test": self._generate_examples(test=True),
        }

    def _generate_examples(self, test: bool) -> Iterator[tuple[int, dict]]:
        """Yields `(key, example)` for the examples of one split.

        Args:
            test: Whether to yield the test split (else the train split).

        Yields:
            The index in scikit-learn's order and the feature dict.
        """
        digits = sk_datasets.load_digits()
        for index, (image, label) in enumerate(
                zip(digits.images, digits.target)):
            if is_test_index(index) == test:
                yield index, {
                    "image": to_rgb_uint8(image),
                    "label": int(label),
                }
