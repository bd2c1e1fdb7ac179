"""The Inception model zoo: `create_model(name, *, ops=PLAIN, **overrides)`.

Every network is a Flax Linen module called as `model.apply(variables, images,
train=...)` on NHWC images in [-1, 1]. Auxiliary logits, when `aux_logits=True`,
are sown in training into the `intermediates` collection as
`intermediates["aux_logits"]`, a tuple with one entry per head (two for
GoogLeNet); `aux_logits_of` reads them back. At inference the heads do not run.

`ops` (`inception_flax.models.ops.Ops`) is the set of operations the layers run:
plain `lax` / Flax by default; `inception_flax.kernels.resolve` picks a faster set
for the machine. It changes how a network computes, not what.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

from inception_flax.models.bn_inception import BNInception
from inception_flax.models.inception_resnet import (
    InceptionResNetV1, InceptionResNetV2, residual_scales)
from inception_flax.models.inception_v1 import LAYOUTS, GoogLeNet
from inception_flax.models.inception_v3 import InceptionV2, InceptionV3
from inception_flax.models.inception_v4 import InceptionV4
from inception_flax.models.network import InceptionNet
from inception_flax.models.ops import PLAIN, Ops


class Spec(NamedTuple):
    cls: type[InceptionNet]
    image_size: int  # canonical training / evaluation resolution


MODELS: dict[str, Spec] = {
    "inception_v1": Spec(GoogLeNet, 224),
    "bn_inception": Spec(BNInception, 224),
    "inception_v2": Spec(InceptionV2, 299),
    "inception_v3": Spec(InceptionV3, 299),
    "inception_v4": Spec(InceptionV4, 299),
    "inception_resnet_v1": Spec(InceptionResNetV1, 299),
    "inception_resnet_v2": Spec(InceptionResNetV2, 299),
}
ALIASES = {"googlenet": "inception_v1"}


def canonical_name(name: str) -> str:
    """The registry name for `name` (aliases resolved); unknown names fail clearly."""
    name = ALIASES.get(name, name)
    if name not in MODELS:
        known = ", ".join(sorted([*MODELS, *ALIASES]))
        raise ValueError(f"unknown model {name!r}: choose one of {known}")
    return name


def spec(name: str) -> Spec:
    return MODELS[canonical_name(name)]


def min_image_size(name: str) -> int:
    return spec(name).cls.min_image_size


def override_names(name: str) -> list[str]:
    """The constructor fields `create_model(name, ...)` accepts as overrides (the
    network's configuration: not `ops`, which is how it runs)."""
    return [f.name for f in dataclasses.fields(spec(name).cls)
            if f.init and f.name not in ("parent", "name", "ops")]


def check_overrides(name: str, overrides: Mapping[str, Any]) -> None:
    """Validate overrides before any tracing, with one line per problem."""
    cls = spec(name).cls
    allowed = override_names(name)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"{name} has no option {', '.join(unknown)}: allowed are {', '.join(allowed)}")
    if overrides.get("aux_logits") and not cls.has_aux:
        raise ValueError(f"{name} has no auxiliary head: set aux_logits=False")
    if "residual_scale" in overrides:
        residual_scales(overrides["residual_scale"], cls.default_scales)
    if "layout" in overrides and overrides["layout"] not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {overrides['layout']!r}")
    rate = overrides.get("dropout_rate", 0.0)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must lie in [0, 1), got {rate}")
    if overrides.get("depth_multiplier", 1.0) <= 0:
        raise ValueError("depth_multiplier must be positive")


def create_model(name: str, *, ops: Ops = PLAIN, **overrides: Any) -> InceptionNet:
    """The Flax module for `name` with constructor `overrides` (e.g. num_classes=10),
    running `ops`."""
    name = canonical_name(name)
    check_overrides(name, overrides)
    return MODELS[name].cls(ops=ops, **overrides)


def aux_logits_of(state: Mapping[str, Any]) -> tuple:
    """The auxiliary logits sown during a training `apply` (empty tuple if none)."""
    return tuple(state.get("intermediates", {}).get("aux_logits", ()))


__all__ = ["MODELS", "ALIASES", "PLAIN", "Ops", "create_model", "canonical_name", "min_image_size",
           "aux_logits_of", "override_names", "spec"]
