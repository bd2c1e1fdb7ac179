"""Dataset builders of inception_flax.

Importing this package registers the TFDS builders defined here (currently
`inception_digits`) so that `tfds.builder(name)` finds them. It also hides all
GPUs from TensorFlow, which is only used for input pipelines and must leave
accelerators to JAX.
"""

from absl import logging
import tensorflow as tf


def hide_accelerators_from_tf() -> None:
    """Makes TensorFlow run on CPU only, leaving GPUs to JAX.

    Safe to call repeatedly. If TensorFlow's runtime was already initialised
    with visible GPUs, the setting cannot change anymore and a warning is
    logged instead of raising.
    """
    try:
        tf.config.set_visible_devices([], 'GPU')
    except RuntimeError as error:
        logging.warning('Could not hide GPUs from TensorFlow: %s', error)


hide_accelerators_from_tf()

# Imported after hiding accelerators; importing registers the builder.
# pylint: disable=g-import-not-at-top,wrong-import-position
from inception_flax.data import digits
from inception_flax.data.digits import InceptionDigits
# pylint: enable=g-import-not-at-top,wrong-import-position

__all__ = ['InceptionDigits', 'digits', 'hide_accelerators_from_tf']
