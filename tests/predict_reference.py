"""The PyTorch side of tests/test_predict.py, run in its own process (TensorFlow and
PyTorch must not share one): `python -m tests.predict_reference OUT SIZE IMAGE...`.

For each source: the reference network with random weights and BatchNorm statistics
(as tests/test_convert.py makes them) at 1000 classes, its classifier scaled up so that
the softmax is peaked (a wrong input moves the probabilities by far more than 1e-4), its
state dict converted with `python -m inception_flax.convert` into OUT/<source>, and its
softmax on the JPEG files, each decoded and preprocessed by its own library's evaluation
transform (timm's `create_transform` of the model's `pretrained_cfg`, torchvision's
`weights.transforms()`) at SIZE (GoogLeNet: its canonical 224). The three sources
between them use every element of the conventions: both interpolations, both mean / std,
two crop fractions, torchvision's `transform_input`, the source's own size and another.
Writes OUT/reference.npz: {source: probabilities [images, 1000]}, `categories`
(torchvision's ImageNet names), and OUT/conventions.json: what timm and torchvision say
for every entry of `inception_flax.convert.inputs.CONVENTIONS`.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import timm
import torch
import torchvision
from PIL import Image

from inception_flax import convert
from inception_flax.convert import inputs
from tests import test_convert as tc

tc.NUM_CLASSES = 1000  # ImageNet's, so that the class names apply

# source (as given to the converter) -> (timm tag or torchvision weights, format, head gain)
SOURCES = {
    "timm:inception_v3.gluon_in1k": ("inception_v3.gluon_in1k", "safetensors", 8.0),
    "timm:inception_resnet_v2": ("inception_resnet_v2.tf_in1k", "pth-nested", 4.0),
    "torchvision:googlenet": (torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1,
                              "safetensors", 6.0),
}
TORCHVISION_WEIGHTS = {"torchvision:inception_v3": torchvision.models.Inception_V3_Weights,
                       "torchvision:googlenet": torchvision.models.GoogLeNet_Weights}


def reference(source: str, size: int):
    """(network, its library's evaluation transform) of `source`, at `size`."""
    which = SOURCES[source][0]
    if source.startswith("timm:"):
        net = timm.create_model(which, pretrained=False)
        config = timm.data.resolve_data_config({"input_size": (3, size, size)}, model=net)
        return net, timm.data.create_transform(**config)
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True,
                                       transform_input=True)
    return net, which.transforms()


def library_conventions() -> dict:
    """{source: {tag: the library's own figures}} for every recorded convention."""
    said = {}
    for source, tags in inputs.CONVENTIONS.items():
        for tag in tags:
            if source.startswith("timm:"):
                cfg = timm.models.get_pretrained_cfg(f"{source[5:]}.{tag}").to_dict()
                size = cfg["input_size"][-1]
                figures = {"image_size": size, "crop_fraction": cfg["crop_pct"],
                           "resize_size": math.floor(size / cfg["crop_pct"]),
                           "interpolation": cfg["interpolation"], "mean": list(cfg["mean"]),
                           "std": list(cfg["std"])}
            else:
                t = getattr(TORCHVISION_WEIGHTS[source], tag).transforms()
                figures = {"image_size": t.crop_size[0], "resize_size": t.resize_size[0],
                           "interpolation": t.interpolation.value, "mean": list(t.mean),
                           "std": list(t.std)}
            said.setdefault(source, {})[tag] = figures
    return said


def main(out: str, size: int, paths: list[str]) -> None:
    results = {}
    for i, source in enumerate(SOURCES):
        torch.manual_seed(i)
        net, transform = reference(source, size)
        net = tc.randomize(net, SOURCES[source][2], seed=i)
        stem = os.path.join(out, source.replace(":", "_"))
        weights = tc.write_weights(net.state_dict(), stem, SOURCES[source][1])
        assert convert.main(["--source", source, "--weights", weights, "--out", stem]) == 0
        os.remove(weights)
        with torch.no_grad():
            x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
            results[source] = torch.softmax(net(x), -1).numpy()
    categories = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1.meta["categories"]
    np.savez(os.path.join(out, "reference.npz"), categories=np.array(categories),
             **results)
    with open(os.path.join(out, "conventions.json"), "w") as f:
        json.dump(library_conventions(), f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
