"""An ImageNet-like folder of JPEGs, generated offline, for input-pipeline tests and benchmarks.

`python -m inception_flax.data.synthetic_folder --root=/tmp/jpegs --num_images=1000`
writes `root/<split>/<label>/<n>.jpg`, the layout `--config.dataset.name=folder:/tmp/jpegs`
reads: JPEGs of about 500x375 (landscape and portrait, sizes varied) at quality 90, whose
content (gradients, shapes, stripes, noise) costs about what a photo costs to decode, and
a few corrupt `.jpg` files among them (a truncated JPEG, bytes that are no image, a JPEG
whose header is broken) that an input pipeline must skip. The same seed writes the same
bytes; nothing is downloaded.

`--tfds_dir=DIR` also writes the good images, byte for byte, as a TFDS dataset
(`TFDS_NAME`, TFRecord files) in DIR, read by `--config.dataset.name=inception_synthetic_jpegs
--config.dataset.data_dir=DIR`: the same images from a record file instead of one file each.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence

import numpy as np

TFDS_NAME = "inception_synthetic_jpegs"
QUALITY = 90
# The three kinds of corrupt file, written in turn.
CORRUPT_KINDS = ("truncated", "not_an_image", "broken_header")


@dataclasses.dataclass(frozen=True)
class Written:
    """What `write_folder` wrote: the paths of the good and of the corrupt files, and the labels."""

    root: str
    split: str
    labels: tuple[str, ...]
    good: tuple[str, ...]
    corrupt: tuple[str, ...]


def label_names(num_classes: int) -> tuple[str, ...]:
    """The class folders' names, in the order a folder dataset numbers them (sorted)."""
    return tuple(f"class{i:03d}" for i in range(num_classes))


def image_size(rng: np.random.Generator, portrait: bool) -> tuple[int, int]:
    """Height and width of one image: about 500x375 (or 375x500), the sides varied."""
    long_side = int(rng.integers(400, 601))
    short_side = int(round(long_side * rng.uniform(0.6, 0.9)))
    return (long_side, short_side) if portrait else (short_side, long_side)


def make_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 [height, width, 3] picture: a colour gradient, stripes, a few filled
    rectangles and discs, and sensor-like noise (flat colour would decode too fast)."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    start, end = rng.uniform(0, 255, (2, 1, 1, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * x + np.sin(angle) * y + 1.0) / 3.0
    image = start + (end - start) * t
    freq, phase = rng.uniform(4, 40), rng.uniform(0, 2 * np.pi)
    image = image + 25.0 * np.sin(2 * np.pi * freq * (x * np.cos(angle + 1) + y) + phase)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(3, 9))):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(10, height / 3), rng.uniform(10, width / 3)
        if rng.random() < 0.5:
            inside = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
        else:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0
        image[inside] = 0.3 * image[inside] + 0.7 * colour
    image = image + rng.normal(0.0, 10.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = QUALITY) -> bytes:
    """JPEG bytes of a uint8 RGB image (TensorFlow's libjpeg: the same bytes every time)."""
    import tensorflow as tf
    return tf.io.encode_jpeg(image, quality=quality).numpy()


def corrupt_bytes(kind: str, jpeg: bytes, rng: np.random.Generator) -> bytes:
    """A file no decoder reads, made from a good JPEG: cut just after the start of its
    scan (any crop window needs data past the cut), random bytes, or a JPEG whose
    start-of-image marker is overwritten."""
    if kind == "truncated":
        return jpeg[:jpeg.find(b"\xff\xda") + 64]
    if kind == "not_an_image":
        return b"not an image: " + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    if kind == "broken_header":
        return b"\x00" * 16 + jpeg[16:]
    raise ValueError(f"unknown corrupt kind {kind!r}: choose one of {', '.join(CORRUPT_KINDS)}")


def write_folder(root: str, num_images: int = 1000, *, num_classes: int = 4,
                 num_corrupt: int = 3, split: str = "train", seed: int = 0,
                 quality: int = QUALITY) -> Written:
    """Writes `num_images` good JPEGs and `num_corrupt` corrupt `.jpg` files under
    `root/split/<label>/`, labels in turn; file `n` depends only on (seed, n)."""
    if num_images < 1 or num_classes < 1 or num_corrupt < 0:
        raise ValueError("num_images and num_classes must be positive, num_corrupt >= 0")
    labels = label_names(num_classes)
    for label in labels:
        os.makedirs(os.path.join(root, split, label), exist_ok=True)
    good, corrupt = [], []
    for n in range(num_images + num_corrupt):
        rng = np.random.default_rng([seed, n])
        # Every third image is portrait.
        jpeg = encode_jpeg(make_image(rng, *image_size(rng, n % 3 == 2)), quality)
        path = os.path.join(root, split, labels[n % num_classes], f"{n:06d}.jpg")
        if n < num_images:
            data = jpeg
            good.append(path)
        else:
            data = corrupt_bytes(CORRUPT_KINDS[(n - num_images) % len(CORRUPT_KINDS)],
                                 jpeg, rng)
            corrupt.append(path)
        with open(path, "wb") as f:
            f.write(data)
    return Written(root, split, labels, tuple(good), tuple(corrupt))


def write_tfds(written: Written, data_dir: str, name: str = TFDS_NAME) -> str:
    """Writes the good images of `written` (the JPEG bytes as they are, with their labels
    and file names) as the TFDS dataset `name` in `data_dir`; returns its directory."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    labels = [written.labels.index(os.path.basename(os.path.dirname(p)))
              for p in written.good]
    contents = []
    for path in written.good:
        with open(path, "rb") as f:
            contents.append(f.read())
    ds = tf.data.Dataset.from_tensor_slices({
        "image": contents, "label": labels, "image/filename": list(written.good)})
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=list(written.labels)),
        "image/filename": tfds.features.Text()})
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version="1.0.0", features=features, split_datasets={written.split: ds},
        data_dir=data_dir, description="Synthetic JPEGs (inception_flax.data.synthetic_folder).")
    return str(builder.data_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: see the module's docstring."""
    import argparse

    from inception_flax.cpu import process
    process.prepare()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the folder to write (root/split/label)")
    parser.add_argument("--num_images", type=int, default=1000, help="good JPEGs")
    parser.add_argument("--num_classes", type=int, default=4)
    parser.add_argument("--num_corrupt", type=int, default=3, help="corrupt .jpg files")
    parser.add_argument("--split", default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tfds_dir", default=None,
                        help=f"also write the good images as the TFDS dataset {TFDS_NAME} here")
    args = parser.parse_args(argv)
    try:
        written = write_folder(args.root, args.num_images, num_classes=args.num_classes,
                               num_corrupt=args.num_corrupt, split=args.split, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written.good)} JPEGs and {len(written.corrupt)} corrupt files in "
          f"{len(written.labels)} classes under {os.path.join(args.root, args.split)}")
    if args.tfds_dir:
        print(f"wrote {TFDS_NAME} to {write_tfds(written, args.tfds_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
