"""Which PyTorch tensor becomes which Flax variable, for every supported source.

A source is a published PyTorch implementation (timm or torchvision) whose state
dict we can read. Each one is described by a list of `Entry`s: one Flax module
(a path in our parameter tree) and the PyTorch module(s) that fill it. Modules that
our networks run under `nn.scan` (Inception v4's A/B/C blocks, Inception-ResNet's
Block35/17/8) take one PyTorch module per repetition, stacked on a leading axis.

Module kinds:
  convbn   ConvBN: `<p>.conv.weight`, `<p>.bn.{weight,bias,running_mean,running_var}`
  conv     convolution with bias, no BN (Inception-ResNet's residual projection)
  dense    Linear -> nn.Dense (kernel transposed to (in, out))
  dense_chw  Linear fed by an NCHW flatten; our NHWC flatten needs the input rows
           permuted from (c, h, w) to (h, w, c) order (GoogLeNet's aux `fc1`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple


class Entry(NamedTuple):
    flax: tuple[str, ...]        # module path in our tree, e.g. ("Mixed_5b", "Branch_0_1x1")
    torch: tuple[str, ...]       # PyTorch module prefix(es), one per repetition if stacked
    kind: str                    # convbn | conv | dense | dense_chw
    chw: tuple[int, int, int] | None = None  # dense_chw: the flattened (C, H, W)
    stacked: bool = False        # one torch module per nn.scan repetition (leading axis)


class Source(NamedTuple):
    key: str                     # "timm:inception_v3"
    model: str                   # our registry name
    config: str                  # the training config that fits
    classifier: str              # PyTorch prefix of the final Linear (num_classes)
    aux_prefixes: tuple[str, ...]  # PyTorch prefixes of the aux head(s); () = none
    layout: dict[str, Any]       # create_model overrides that make our layout match
    entries: Callable[[bool], list[Entry]]  # aux -> entries


def _one(flax: str | tuple[str, ...], torch: str, kind: str = "convbn", **kw) -> Entry:
    flax = (flax,) if isinstance(flax, str) else tuple(flax)
    return Entry(flax, (torch,), kind, **kw)


def _block(flax_prefix: tuple[str, ...], torch_prefix: str,
           table: dict[str, str]) -> list[Entry]:
    """One Inception block: {our conv name: torch sub-module name}."""
    return [_one((*flax_prefix, ours), f"{torch_prefix}.{theirs}", "convbn")
            for ours, theirs in table.items()]


def _stacked(flax: str, torch_prefixes: list[str], table: dict[str, str],
             bias_conv: str | None = None) -> list[Entry]:
    """A block repeated under nn.scan: each of our modules takes one torch module per repeat."""
    out = [Entry((flax, ours), tuple(f"{p}.{theirs}" for p in torch_prefixes), "convbn",
                 stacked=True)
           for ours, theirs in table.items()]
    if bias_conv is not None:
        out.append(Entry((flax, "Conv2d_1x1"),
                         tuple(f"{p}.{bias_conv}" for p in torch_prefixes), "conv", stacked=True))
    return out


# ---------------------------------------------------------------------------
# Inception v3 (timm and torchvision share module names).
# ---------------------------------------------------------------------------

V3_A = {"Branch_0_1x1": "branch1x1", "Branch_1_1x1": "branch5x5_1", "Branch_1_5x5": "branch5x5_2",
        "Branch_2_1x1": "branch3x3dbl_1", "Branch_2_3x3a": "branch3x3dbl_2",
        "Branch_2_3x3b": "branch3x3dbl_3", "Branch_3_1x1": "branch_pool"}
V3_B = {"Branch_0_3x3": "branch3x3", "Branch_1_1x1": "branch3x3dbl_1",
        "Branch_1_3x3a": "branch3x3dbl_2", "Branch_1_3x3b": "branch3x3dbl_3"}
V3_C = {"Branch_0_1x1": "branch1x1", "Branch_1_1x1": "branch7x7_1", "Branch_1_1x7": "branch7x7_2",
        "Branch_1_7x1": "branch7x7_3", "Branch_2_1x1": "branch7x7dbl_1",
        "Branch_2_7x1a": "branch7x7dbl_2", "Branch_2_1x7a": "branch7x7dbl_3",
        "Branch_2_7x1b": "branch7x7dbl_4", "Branch_2_1x7b": "branch7x7dbl_5",
        "Branch_3_1x1": "branch_pool"}
V3_D = {"Branch_0_1x1": "branch3x3_1", "Branch_0_3x3": "branch3x3_2",
        "Branch_1_1x1": "branch7x7x3_1", "Branch_1_1x7": "branch7x7x3_2",
        "Branch_1_7x1": "branch7x7x3_3", "Branch_1_3x3": "branch7x7x3_4"}
V3_E = {"Branch_0_1x1": "branch1x1", "Branch_1_1x1": "branch3x3_1", "Branch_1_1x3": "branch3x3_2a",
        "Branch_1_3x1": "branch3x3_2b", "Branch_2_1x1": "branch3x3dbl_1",
        "Branch_2_3x3": "branch3x3dbl_2", "Branch_2_1x3": "branch3x3dbl_3a",
        "Branch_2_3x1": "branch3x3dbl_3b", "Branch_3_1x1": "branch_pool"}


def inception_v3_entries(aux: bool) -> list[Entry]:
    e = [_one(n, n) for n in
         ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")]
    for name, table in [("Mixed_5b", V3_A), ("Mixed_5c", V3_A), ("Mixed_5d", V3_A),
                        ("Mixed_6a", V3_B), ("Mixed_6b", V3_C), ("Mixed_6c", V3_C),
                        ("Mixed_6d", V3_C), ("Mixed_6e", V3_C), ("Mixed_7a", V3_D),
                        ("Mixed_7b", V3_E), ("Mixed_7c", V3_E)]:
        e += _block((name,), name, table)
    if aux:
        e += [_one(("AuxLogits", "Conv2d_1a_1x1"), "AuxLogits.conv0"),
              _one(("AuxLogits", "Conv2d_2a_5x5"), "AuxLogits.conv1"),
              _one(("AuxLogits", "Logits"), "AuxLogits.fc", "dense")]
    e.append(_one("Logits", "fc", "dense"))
    return e


# ---------------------------------------------------------------------------
# timm Inception v4: one nn.Sequential `features.0` .. `features.21`.
# ---------------------------------------------------------------------------

V4_A = {"Branch_0_1x1": "branch0", "Branch_1_1x1": "branch1.0", "Branch_1_3x3": "branch1.1",
        "Branch_2_1x1": "branch2.0", "Branch_2_3x3a": "branch2.1", "Branch_2_3x3b": "branch2.2",
        "Branch_3_1x1": "branch3.1"}
V4_REDUCTION_A = {"Branch_0_3x3": "branch0", "Branch_1_1x1": "branch1.0",
                  "Branch_1_3x3a": "branch1.1", "Branch_1_3x3b": "branch1.2"}
V4_B = {"Branch_0_1x1": "branch0", "Branch_1_1x1": "branch1.0", "Branch_1_1x7": "branch1.1",
        "Branch_1_7x1": "branch1.2", "Branch_2_1x1": "branch2.0", "Branch_2_7x1a": "branch2.1",
        "Branch_2_1x7a": "branch2.2", "Branch_2_7x1b": "branch2.3", "Branch_2_1x7b": "branch2.4",
        "Branch_3_1x1": "branch3.1"}
V4_REDUCTION_B = {"Branch_0_1x1": "branch0.0", "Branch_0_3x3": "branch0.1",
                  "Branch_1_1x1": "branch1.0", "Branch_1_1x7": "branch1.1",
                  "Branch_1_7x1": "branch1.2", "Branch_1_3x3": "branch1.3"}
V4_C = {"Branch_0_1x1": "branch0", "Branch_1_1x1": "branch1_0", "Branch_1_1x3": "branch1_1a",
        "Branch_1_3x1": "branch1_1b", "Branch_2_1x1": "branch2_0", "Branch_2_3x1a": "branch2_1",
        "Branch_2_1x3a": "branch2_2", "Branch_2_1x3b": "branch2_3a", "Branch_2_3x1b": "branch2_3b",
        "Branch_3_1x1": "branch3.1"}


def _features(first: int, n: int) -> list[str]:
    return [f"features.{i}" for i in range(first, first + n)]


def inception_v4_entries(aux: bool) -> list[Entry]:
    del aux  # timm's Inception v4 has no auxiliary head
    stem = {"Conv2d_1a_3x3": "features.0", "Conv2d_2a_3x3": "features.1",
            "Conv2d_2b_3x3": "features.2", "Mixed_3a_3x3": "features.3.conv",
            "Mixed_4a_Branch_0_1x1": "features.4.branch0.0",
            "Mixed_4a_Branch_0_3x3": "features.4.branch0.1",
            "Mixed_4a_Branch_1_1x1": "features.4.branch1.0",
            "Mixed_4a_Branch_1_1x7": "features.4.branch1.1",
            "Mixed_4a_Branch_1_7x1": "features.4.branch1.2",
            "Mixed_4a_Branch_1_3x3": "features.4.branch1.3",
            "Mixed_5a_3x3": "features.5.conv"}
    e = [_one(("Stem", ours), theirs) for ours, theirs in stem.items()]
    e += _stacked("Mixed_5", _features(6, 4), V4_A)
    e += _block(("Mixed_6a",), "features.10", V4_REDUCTION_A)
    e += _stacked("Mixed_6", _features(11, 7), V4_B)
    e += _block(("Mixed_7a",), "features.18", V4_REDUCTION_B)
    e += _stacked("Mixed_7", _features(19, 3), V4_C)
    e.append(_one("Logits", "last_linear", "dense"))
    return e


# ---------------------------------------------------------------------------
# timm Inception-ResNet v2.
# ---------------------------------------------------------------------------

IRV2_STEM = {"Conv2d_1a_3x3": "conv2d_1a", "Conv2d_2a_3x3": "conv2d_2a",
             "Conv2d_2b_3x3": "conv2d_2b", "Conv2d_3b_1x1": "conv2d_3b",
             "Conv2d_4a_3x3": "conv2d_4a",
             "Mixed_5b_Branch_0_1x1": "mixed_5b.branch0",
             "Mixed_5b_Branch_1_1x1": "mixed_5b.branch1.0",
             "Mixed_5b_Branch_1_5x5": "mixed_5b.branch1.1",
             "Mixed_5b_Branch_2_1x1": "mixed_5b.branch2.0",
             "Mixed_5b_Branch_2_3x3a": "mixed_5b.branch2.1",
             "Mixed_5b_Branch_2_3x3b": "mixed_5b.branch2.2",
             "Mixed_5b_Branch_3_1x1": "mixed_5b.branch3.1"}
IRV2_BLOCK35 = {"Branch_0_1x1": "branch0", "Branch_1_1x1": "branch1.0", "Branch_1_3x3": "branch1.1",
                "Branch_2_1x1": "branch2.0", "Branch_2_3x3a": "branch2.1",
                "Branch_2_3x3b": "branch2.2"}
IRV2_BLOCK17 = {"Branch_0_1x1": "branch0", "Branch_1_1x1": "branch1.0", "Branch_1_1x7": "branch1.1",
                "Branch_1_7x1": "branch1.2"}
IRV2_BLOCK8 = {"Branch_0_1x1": "branch0", "Branch_1_1x1": "branch1.0", "Branch_1_1x3": "branch1.1",
               "Branch_1_3x1": "branch1.2"}
IRV2_REDUCTION_A = {"Branch_0_3x3": "branch0", "Branch_1_1x1": "branch1.0",
                    "Branch_1_3x3a": "branch1.1", "Branch_1_3x3b": "branch1.2"}
IRV2_REDUCTION_B = {"Branch_0_1x1": "branch0.0", "Branch_0_3x3": "branch0.1",
                    "Branch_1_1x1": "branch1.0", "Branch_1_3x3": "branch1.1",
                    "Branch_2_1x1": "branch2.0", "Branch_2_3x3a": "branch2.1",
                    "Branch_2_3x3b": "branch2.2"}
IRV2_REPEATS = (10, 20, 9)


def inception_resnet_v2_entries(aux: bool) -> list[Entry]:
    del aux  # timm's Inception-ResNet v2 has no auxiliary head
    n35, n17, n8 = IRV2_REPEATS
    e = [_one(("Stem", ours), theirs) for ours, theirs in IRV2_STEM.items()]
    e += _stacked("Repeat_Block35", [f"repeat.{i}" for i in range(n35)], IRV2_BLOCK35, "conv2d")
    e += _block(("Mixed_6a",), "mixed_6a", IRV2_REDUCTION_A)
    e += _stacked("Repeat_Block17", [f"repeat_1.{i}" for i in range(n17)], IRV2_BLOCK17, "conv2d")
    e += _block(("Mixed_7a",), "mixed_7a", IRV2_REDUCTION_B)
    e += _stacked("Repeat_Block8", [f"repeat_2.{i}" for i in range(n8)], IRV2_BLOCK8, "conv2d")
    e += _block(("Block8",), "block8", IRV2_BLOCK8)
    e.append(_one(("Block8", "Conv2d_1x1"), "block8.conv2d", "conv"))
    e.append(_one("Conv2d_7b_1x1", "conv2d_7b"))
    e.append(_one("Logits", "classif", "dense"))
    return e


# ---------------------------------------------------------------------------
# torchvision GoogLeNet (layout="torchvision": 3x3 in the "5x5" branch).
# ---------------------------------------------------------------------------

GOOGLENET_MODULES = ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")
GOOGLENET_BLOCK = {"Branch_0_1x1": "branch1", "Branch_1_1x1": "branch2.0",
                   "Branch_1_3x3": "branch2.1", "Branch_2_1x1": "branch3.0",
                   "Branch_2_3x3": "branch3.1", "Branch_3_1x1": "branch4.1"}
GOOGLENET_AUX_CHW = (128, 4, 4)  # the aux head's 1x1 conv output, flattened for fc1


def googlenet_entries(aux: bool) -> list[Entry]:
    e = [_one("Conv2d_1_7x7", "conv1"), _one("Conv2d_2a_1x1", "conv2"),
         _one("Conv2d_2b_3x3", "conv3")]
    for m in GOOGLENET_MODULES:
        e += _block((f"Inception_{m}",), f"inception{m}", GOOGLENET_BLOCK)
    if aux:
        for ours, theirs in (("AuxLogits_4a", "aux1"), ("AuxLogits_4d", "aux2")):
            e += [_one((ours, "Conv2d_1x1"), f"{theirs}.conv"),
                  _one((ours, "Fc1"), f"{theirs}.fc1", "dense_chw", chw=GOOGLENET_AUX_CHW),
                  _one((ours, "Logits"), f"{theirs}.fc2", "dense")]
    e.append(_one("Logits", "fc", "dense"))
    return e


# ---------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------

_V3_LAYOUT = {"pool_include_pad": True, "bn_epsilon": 1e-3}  # F.avg_pool2d's count_include_pad

SOURCES: dict[str, Source] = {s.key: s for s in [
    Source("timm:inception_v3", "inception_v3", "configs/inception_v3.py", "fc",
           ("AuxLogits.",), _V3_LAYOUT, inception_v3_entries),
    Source("torchvision:inception_v3", "inception_v3", "configs/inception_v3.py", "fc",
           ("AuxLogits.",), _V3_LAYOUT, inception_v3_entries),
    Source("timm:inception_v4", "inception_v4", "configs/inception_v4.py", "last_linear",
           (), {"bn_epsilon": 1e-3}, inception_v4_entries),
    Source("timm:inception_resnet_v2", "inception_resnet_v2", "configs/inception_resnet_v2.py",
           "classif", (), {"bn_epsilon": 1e-3, "residual_scale": [0.17, 0.1, 0.2]},
           inception_resnet_v2_entries),
    Source("torchvision:googlenet", "inception_v1", "configs/inception_v1.py", "fc",
           ("aux1.", "aux2."), {"layout": "torchvision", "bn_epsilon": 1e-3}, googlenet_entries),
]}

# The tensors each module kind reads: (torch suffix, collection, our leaf path, transform).
LEAVES: dict[str, list[tuple[str, str, tuple[str, ...], str]]] = {
    "convbn": [("conv.weight", "params", ("conv", "kernel"), "conv"),
               ("bn.weight", "params", ("bn", "scale"), "vector"),
               ("bn.bias", "params", ("bn", "bias"), "vector"),
               ("bn.running_mean", "batch_stats", ("bn", "mean"), "vector"),
               ("bn.running_var", "batch_stats", ("bn", "var"), "vector")],
    "conv": [("weight", "params", ("kernel",), "conv"),
             ("bias", "params", ("bias",), "vector")],
    "dense": [("weight", "params", ("kernel",), "dense"),
              ("bias", "params", ("bias",), "vector")],
    "dense_chw": [("weight", "params", ("kernel",), "dense_chw"),
                  ("bias", "params", ("bias",), "vector")],
}
