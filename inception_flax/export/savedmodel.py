"""A TensorFlow SavedModel of the network, through `jax2tf`, with two serving signatures.

`serving_default(images)`: a float32 batch of preprocessed images.
`serving_bytes(image_bytes)`: a batch of encoded images (JPEG, PNG, ...), each
decoded and preprocessed in the graph with the network's own convention
(`inception_flax.data.files.tf_image`). The weights are TensorFlow variables.
"""

from __future__ import annotations

import contextlib

from inception_flax.data import files
from inception_flax.export.core import host_variables, serving_fn
from inception_flax.inference import Network


@contextlib.contextmanager
def stablehlo_that_tensorflow_reads():
    """jax.export writes StableHLO at the version of 4 weeks before this JAX (jax 0.10.2:
    1.15.0), newer than TensorFlow's XlaCallModule reads (2.21: up to 1.13.7), so a
    SavedModel would load only beside JAX. Within this context, it writes the version
    of 12 weeks before (1.13.7), which StableHLO's compatibility window lets JAX write.
    (jax.export has no public option for it: this replaces its private serializer.)"""
    from jax._src import xla_bridge
    from jax._src.export import _export
    from jax._src.lib import _jax
    from jax._src.lib.mlir.dialects import hlo

    def older_bytecode(module) -> bytes:
        version = hlo.get_version_from_compatibility_requirement(
            hlo.StablehloCompatibilityRequirement.WEEK_12)
        return _jax.mlir.serialize_portable_artifact(
            module, version, xla_bridge.get_backend().serialize_with_sdy)

    original = _export._module_to_bytecode
    _export._module_to_bytecode = older_bytecode
    try:
        yield
    finally:
        _export._module_to_bytecode = original


def export_savedmodel(network: Network, out: str, batch: int | None, softmax: bool = False,
                      top_k: int = 0, platforms: tuple[str, ...] | None = None) -> None:
    import tensorflow as tf
    from jax.experimental import jax2tf

    size = network.input.image_size
    images_poly = f"(b, {size}, {size}, 3)" if batch is None else None
    # top-k in TensorFlow: the lowering of lax.top_k over a polymorphic batch has dynamic
    # shapes that TensorFlow's XlaCallModule cannot refine.
    network_fn = jax2tf.convert(serving_fn(network, softmax or top_k > 0), with_gradient=False,
                                polymorphic_shapes=[None, images_poly],
                                native_serialization_platforms=platforms)

    def fn(weights, images):
        out = network_fn(weights, images)
        if top_k:
            out["top_k_probabilities"], out["top_k_classes"] = tf.math.top_k(
                out["probabilities"], top_k)
        if not softmax:
            out.pop("probabilities", None)
        return out
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
    with stablehlo_that_tensorflow_reads():  # the network is lowered while saving
        tf.saved_model.save(module, out, signatures={"serving_default": serve_images,
                                                     "serving_bytes": serve_bytes})
