"""Image files as a network's input: each network's own evaluation preprocessing.

Two conventions (`InputSpec`):
- a run of this trainer: its evaluation preprocessing, the same TensorFlow ops as the
  eval split (`preprocess.make_preprocess_fn`): the central crop of `central_fraction`
  of height and width, a bilinear resize to `image_size`, pixels in [-1, 1];
- converted weights: their source's (timm / torchvision) evaluation transform, done
  as the source does it, with PIL: the shorter side resized to `resize_size`, the
  central `image_size` square, pixels / 255 normalised with `mean` / `std` (and
  torchvision's `transform_input` map back to [-1, 1] where the source applies it).

A missing, unreadable, non-image or truncated file raises `ImageError`, one line.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import numpy as np


class ImageError(ValueError):
    """A file that cannot be read as an image: the message names it, in one line."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How a network's input is made from an image file (see the module docstring)."""

    image_size: int
    central_fraction: float = 0.875  # runs: the central crop kept before the resize
    resize_size: int | None = None  # converted: the shorter side's length before the crop
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    transform_input: bool = False

    @property
    def source_style(self) -> bool:
        """True for converted weights: resize the shorter side, then crop (PIL)."""
        return self.resize_size is not None

    def at_size(self, size: int) -> "InputSpec":
        """The same convention at another input size (the crop fraction kept)."""
        if size == self.image_size:
            return self
        resize = None if self.resize_size is None else math.floor(
            size / round(self.image_size / self.resize_size, 6))
        return dataclasses.replace(self, image_size=size, resize_size=resize)

    @classmethod
    def from_convention(cls, c: dict) -> "InputSpec":
        """From a converted `model.json`'s `input` entry (convert/inputs.py)."""
        return cls(image_size=int(c["image_size"]), resize_size=int(c["resize_size"]),
                   central_fraction=float(c["crop_fraction"]), interpolation=c["interpolation"],
                   mean=tuple(c["mean"]), std=tuple(c["std"]),
                   transform_input=bool(c.get("transform_input", False)))


def read(path: str, spec: InputSpec) -> np.ndarray:
    """The float32 [size, size, 3] network input made from the image file `path`."""
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ImageError(f"{path}: not a file")
    return _read_pil(path, spec) if spec.source_style else _read_tf(path, spec)


def _read_tf(path: str, spec: InputSpec) -> np.ndarray:
    import tensorflow as tf

    with open(path, "rb") as f:
        data = f.read()
    try:
        image = _tf_reader(spec.image_size, spec.central_fraction)(tf.constant(data))
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
        raise ImageError(f"{path}: not a readable image ({_tf_reason(e.message)})") from None
    return image.numpy()


def _tf_reason(message: str) -> str:
    """The decoder's own words in a TensorFlow graph error (which also names the
    graph node and the Python lines that built it)."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(
        ("Graph execution error", "Detected at node", "File ", "[["))]
    return (said or lines or ["unknown error"])[-1].split(" [Op:")[0]


def _tf_preprocess(data, size: int, fraction: float):
    """The eval split's preprocessing of one encoded image (TensorFlow ops)."""
    import tensorflow as tf

    from inception_flax.data import preprocess

    fn = preprocess.make_preprocess_fn(
        False, size, preprocess.Preprocessing(central_fraction=fraction),
        tf.zeros([2], tf.int64))
    return fn(tf.constant(0, tf.int64), {"image": data, "label": tf.constant(0)})["image"]


@functools.lru_cache(maxsize=8)
def _tf_reader(size: int, fraction: float):
    """`_tf_preprocess` as one `tf.function`, for eager use (traced once per size)."""
    import tensorflow as tf

    return tf.function(lambda data: _tf_preprocess(data, size, fraction),
                       input_signature=[tf.TensorSpec([], tf.string)])


def tf_image(data, spec: InputSpec):
    """The network input from one encoded image (a scalar tf.string), in TensorFlow ops:
    the serving signature's preprocessing. For converted weights, TensorFlow's
    antialiased resize stands in for PIL's (the same method; values differ slightly)."""
    import tensorflow as tf

    if not spec.source_style:
        return _tf_preprocess(data, spec.image_size, spec.central_fraction)
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    short = tf.minimum(h, w)
    new_h = tf.math.floordiv(spec.resize_size * h, short)
    new_w = tf.math.floordiv(spec.resize_size * w, short)
    image = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]),
                            method=spec.interpolation, antialias=True)
    s = spec.image_size
    top = tf.cast(tf.round(tf.cast(new_h - s, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - s, tf.float32) / 2.0), tf.int32)
    image = tf.ensure_shape(image[top:top + s, left:left + s], [s, s, 3]) / 255.0
    scale, shift = _normalise_affine(spec)
    return image * scale + shift


def _normalise_affine(spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with network input = a * pixel01 + b, as the source computes it."""
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    if spec.transform_input:
        return np.full(3, 2.0, np.float32), np.full(3, -1.0, np.float32)
    return 1.0 / std, -mean / std


def _read_pil(path: str, spec: InputSpec) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "nearest": Image.NEAREST}[spec.interpolation]
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # decodes the whole file: a truncated one fails here
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (no decoder recognises it)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: not a readable image ({str(e).splitlines()[0]})") from None
    w, h = im.size
    r = spec.resize_size
    size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)  # shorter side -> r
    im = im.resize(size, resample)
    s = spec.image_size
    top, left = int(round((size[1] - s) / 2.0)), int(round((size[0] - s) / 2.0))
    x = np.asarray(im.crop((left, top, left + s, top + s)), np.float32) / np.float32(255)
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    x = (x - mean) / std  # the source's Normalize
    if spec.transform_input:  # torchvision's transform_input: back to [-1, 1]
        x = x * (std / np.float32(0.5)) + (mean - np.float32(0.5)) / np.float32(0.5)
    return x.astype(np.float32)
