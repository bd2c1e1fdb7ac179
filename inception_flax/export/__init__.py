"""Serving artifacts of a trained network: `python -m inception_flax.export`.

    python -m inception_flax.export --checkpoint DIR --out OUT [--format savedmodel|stablehlo]
        [--batch-size N|polymorphic] [--softmax] [--top-k K]

exports the inference network of DIR (a run's workdir or converted weights; the
run's moving average of the parameters where it kept one, BatchNorm on its running
statistics), its weights inside the artifact:
- `stablehlo`: `OUT/model.stablehlo`, JAX's serialized `jax.export.Exported`, taking a
  float32 batch of preprocessed images (`OUT/serving.json` says their size and
  preprocessing); reload with `jax.export.deserialize(bytes).call(images)`, without
  this package;
- `savedmodel`: a TensorFlow SavedModel (through `jax2tf`) with two serving
  signatures: `serving_default` takes `images` (a float32 batch, preprocessed) and
  `serving_bytes` takes `image_bytes` (a batch of encoded JPEG / PNG strings,
  preprocessed inside the graph as the network expects).
Outputs: `logits`, and `probabilities` (`--softmax`) and `top_k_classes` /
`top_k_probabilities` (`--top-k K`).
"""

from inception_flax.export.cli import main
from inception_flax.export.core import export_network, serving_fn

__all__ = ["export_network", "main", "serving_fn"]
