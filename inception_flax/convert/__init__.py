"""Convert published PyTorch Inception weights (timm, torchvision) to inception_flax.

    python -m inception_flax.convert --source timm:inception_v3 --weights FILE --out DIR

writes DIR/model.json ({"model", "overrides", "source", "config"}) and DIR/variables/
(an orbax checkpoint of {"params", "batch_stats"}); `load(DIR)` gives back
`(model, variables)` for `model.apply(variables, images, train=False)` on NHWC
images in [-1, 1] (torchvision's `transform_input=True` convention, timm's
Inception mean/std of 0.5).
"""

from inception_flax.convert.cli import main
from inception_flax.convert.core import Converted, convert
from inception_flax.convert.reader import ConversionError, read_state_dict
from inception_flax.convert.sources import SOURCES
from inception_flax.convert.store import load, read_meta, save

__all__ = ["SOURCES", "ConversionError", "Converted", "convert", "load", "main",
           "read_meta", "read_state_dict", "save"]
