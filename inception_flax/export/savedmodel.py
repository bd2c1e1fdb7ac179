"""A TensorFlow SavedModel of the network, through `jax2tf`, with two serving signatures.

`serving_default(images)`: a float32 batch of preprocessed images.
`serving_bytes(image_bytes)`: a batch of encoded images (JPEG, PNG, ...), each
decoded and preprocessed in the graph with the network's own convention
(`inception_flax.data.files.tf_image`). The weights are TensorFlow variables.
"""

from __future__ import annotations

from inception_flax.data import files
from inception_flax.export.core import host_variables, serving_fn
from inception_flax.inference import Network


def export_savedmodel(network: Network, out: str, batch: int | None, softmax: bool = False,
                      top_k: int = 0, platforms: tuple[str, ...] | None = None) -> None:
    import tensorflow as tf
    from jax.experimental import jax2tf

    size = network.input.image_size
    images_poly = f"(b, {size}, {size}, 3)" if batch is None else None
    fn = jax2tf.convert(serving_fn(network, softmax, top_k), with_gradient=False,
                        polymorphic_shapes=[None, images_poly],
                        native_serialization_platforms=platforms)
    module = tf.Module()
    module.weights = tf.nest.map_structure(
        lambda x: tf.Variable(x, trainable=False), host_variables(network))

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([batch, size, size, 3], tf.float32, name="images")])
    def serve_images(images):
        return fn(module.weights, images)

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([batch], tf.string, name="image_bytes")])
    def serve_bytes(image_bytes):
        images = tf.map_fn(lambda data: files.tf_image(data, network.input), image_bytes,
                           fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
        return serve_images(images)  # the same traced network

    module.serve_images, module.serve_bytes = serve_images, serve_bytes
    tf.saved_model.save(module, out, signatures={"serving_default": serve_images,
                                                 "serving_bytes": serve_bytes})
