"""Inception preprocessing of one image: decode, crop (random or central), resize, flip.

Training crops are Inception-style random windows over the area and aspect ratio
ranges (the central crop when none is found); evaluation takes the central crop.
JPEGs are decoded only inside their crop window. The randomness is stateless:
each example's seed derives from the pipeline's seed and the example's position.
"""

import dataclasses
from collections.abc import Callable

import tensorflow as tf

# A crop window, int32 [offset_y, offset_x, height, width].
WindowFn = Callable[[tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Options of the Inception preprocessing.

    Attributes:
        area_range: Range of the fraction of the image area that a random
            training crop covers.
        aspect_ratio_range: Range of width / height of a random training crop.
        max_attempts: Attempts to sample a valid random crop before falling
            back to the central crop.
        random_flip: Whether training images are flipped left-right at random.
        central_fraction: Fraction of height and width kept by the evaluation
            central crop (also the training fallback crop).
    """

    area_range: tuple[float, float] = (0.05, 1.0)
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3)
    max_attempts: int = 10
    random_flip: bool = True
    central_fraction: float = 0.875


def make_preprocess_fn(
    train: bool, image_size: int, preprocessing: Preprocessing,
    base_seed: tf.Tensor
) -> Callable[[tf.Tensor, dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """Returns `fn(index, example) -> example` with a float [-1, 1] image."""

    def preprocess(index: tf.Tensor,
                   example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        seed = tf.random.experimental.stateless_fold_in(base_seed, index)
        crop_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 2))
        if train:
            window_fn = lambda shape: _random_window(shape, crop_seed,
                                                     preprocessing)
        else:
            window_fn = lambda shape: _central_window(
                shape, preprocessing.central_fraction)
        image = decode_and_crop(example["image"], window_fn)
        # Flipping the uint8 crop costs a quarter of flipping the float result, and
        # TensorFlow's bilinear resize runs faster from float32 than from uint8 input
        # (the same values: it converts each pixel to float32 either way).
        if train and preprocessing.random_flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size],
                                method="bilinear")
        image = tf.ensure_shape(image, [image_size, image_size, 3])
        return {"image": image / 127.5 - 1.0, "label": example["label"]}

    return preprocess


def decode_and_crop(image: tf.Tensor, window_fn: WindowFn) -> tf.Tensor:
    """Decodes (if encoded) and crops an image to uint8 RGB.

    Args:
        image: Encoded image bytes, or a decoded uint8 [H, W, C] image (as
            e.g. produced by `tfds.testing.mock_data`).
        window_fn: Maps the int32 [height, width] of the image to its crop
            window.

    Returns:
        The cropped uint8 image with 3 channels.
    """
    if image.dtype != tf.string:
        return _to_rgb(_crop(image, window_fn(tf.shape(image)[:2])))
    return tf.cond(tf.io.is_jpeg(image),
                   lambda: _decode_and_crop_jpeg(image, window_fn),
                   lambda: _decode_and_crop_any(image, window_fn))


def _decode_and_crop_jpeg(data: tf.Tensor, window_fn: WindowFn) -> tf.Tensor:
    """Decodes only the crop window of a JPEG, which is faster."""
    window = window_fn(tf.image.extract_jpeg_shape(data)[:2])
    return tf.image.decode_and_crop_jpeg(data, window, channels=3)


def _decode_and_crop_any(data: tf.Tensor, window_fn: WindowFn) -> tf.Tensor:
    """Decodes a PNG/GIF/BMP (or JPEG) image, then crops it."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return _crop(image, window_fn(tf.shape(image)[:2]))


def _crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    """Crops [H, W, C] to the window [offset_y, offset_x, height, width]."""
    return tf.slice(image, tf.concat([window[:2], [0]], 0),
                    tf.concat([window[2:], [-1]], 0))


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    """Converts a grey or RGBA [H, W, C] image to RGB."""
    if image.shape[-1] == 1:
        return tf.image.grayscale_to_rgb(image)
    return image[..., :3]


def _central_window(shape: tf.Tensor, fraction: float) -> tf.Tensor:
    """Returns the centred window keeping `fraction` of height and width."""
    size = tf.maximum(tf.cast(tf.cast(shape, tf.float32) * fraction, tf.int32),
                      1)
    return tf.concat([(shape - size) // 2, size], 0)


def _random_window(shape: tf.Tensor, seed: tf.Tensor,
                   preprocessing: Preprocessing) -> tf.Tensor:
    """Samples an Inception-style random crop window.

    As in the reference Inception/ResNet preprocessing, when no window within
    the area and aspect ratio ranges is found (the sampler then returns the
    whole image), the central crop is used instead.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([shape, [3]], 0),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=preprocessing.area_range[0],
        aspect_ratio_range=preprocessing.aspect_ratio_range,
        area_range=preprocessing.area_range,
        max_attempts=preprocessing.max_attempts,
        use_image_if_no_bounding_boxes=True)
    window = tf.concat([begin[:2], size[:2]], 0)
    failed = tf.reduce_all(tf.equal(size[:2], shape))
    return tf.where(failed,
                    _central_window(shape, preprocessing.central_fraction),
                    window)
