"""The input convention of each source's published weights, recorded in `model.json`.

A converted network should see the input its source model sees: the same resize,
crop, interpolation and normalisation. The figures are those of timm 1.0.31's
`pretrained_cfg` (`input_size`, `crop_pct`, `interpolation`, `mean`, `std`; its
evaluation resizes the shorter side to `floor(size / crop_pct)`, then takes the
central square) and of torchvision 0.29.1's `weights.transforms()` (`resize_size`,
`crop_size`, bilinear, ImageNet mean / std). torchvision's Inception networks take
ImageNet-normalised input and map it back to [-1, 1] themselves (`transform_input=True`,
which the published weights use); our converted network starts after that map, so
`transform_input` tells the predictor to apply it.

A source may name a timm weight tag after a dot (`timm:inception_v3.gluon_in1k`);
without one, timm's default tag for that architecture applies.
"""

from __future__ import annotations

import math
from typing import Any

INCEPTION = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _timm(size: int, crop_pct: float, tag: str, mean=INCEPTION, std=INCEPTION,
          interpolation: str = "bicubic") -> dict[str, Any]:
    return {"image_size": size, "resize_size": math.floor(size / crop_pct),
            "crop_fraction": crop_pct, "interpolation": interpolation, "mean": list(mean),
            "std": list(std), "transform_input": False,
            "reference": f"timm 1.0.31 pretrained_cfg of {tag}"}


def _torchvision(size: int, resize: int, weights: str) -> dict[str, Any]:
    return {"image_size": size, "resize_size": resize, "crop_fraction": round(size / resize, 6),
            "interpolation": "bilinear", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "transform_input": True, "reference": f"torchvision 0.29.1 {weights}.transforms()"}


# {source: {tag: convention}}; the first tag is timm's default for the architecture.
CONVENTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "timm:inception_v3": {
        tag: _timm(299, 0.875, f"inception_v3.{tag}",
                   *((IMAGENET_MEAN, IMAGENET_STD) if tag == "gluon_in1k" else ()))
        for tag in ("tv_in1k", "tf_in1k", "tf_adv_in1k", "gluon_in1k")},
    "timm:inception_v4": {"tf_in1k": _timm(299, 0.875, "inception_v4.tf_in1k")},
    "timm:inception_resnet_v2": {
        tag: _timm(299, 0.8975, f"inception_resnet_v2.{tag}")
        for tag in ("tf_in1k", "tf_ens_adv_in1k")},
    "torchvision:inception_v3": {
        "IMAGENET1K_V1": _torchvision(299, 342, "Inception_V3_Weights.IMAGENET1K_V1")},
    "torchvision:googlenet": {
        "IMAGENET1K_V1": _torchvision(224, 256, "GoogLeNet_Weights.IMAGENET1K_V1")},
}


def split_source(key: str) -> tuple[str, str | None]:
    """`timm:inception_v3.gluon_in1k` -> (`timm:inception_v3`, `gluon_in1k`)."""
    base, dot, tag = key.partition(".")
    return base, (tag if dot else None)


def convention(key: str) -> dict[str, Any]:
    """The input convention of `key` (a source, with or without a weight tag).

    Raises ValueError (one line) for a tag the source does not publish.
    """
    base, tag = split_source(key)
    tags = CONVENTIONS[base]
    if tag is None:
        tag = next(iter(tags))
    if tag not in tags:
        raise ValueError(f"{base} has no weights tagged {tag!r}: choose one of "
                         f"{', '.join(f'{base}.{t}' for t in tags)}, or give {base} alone")
    return {**tags[tag], "tag": tag}
