"""GoogLeNet (Inception v1).

Szegedy et al., "Going Deeper with Convolutions" (2014), Table 1 and Fig. 2(b),
with BatchNorm after every convolution (bias-free) and no LRN. Two layouts:

- `layout="paper"` (default): the 5x5 branches are true 5x5 convolutions.
- `layout="torchvision"`: the "5x5" branches are 3x3, as in the TF-slim weights
  that torchvision ports; this is the layout `inception_flax.convert` loads.

Pooling uses ceil-mode output sizes and convolutions pad symmetrically, as in the
Caffe model. The two auxiliary classifiers (after 4a and 4d) are sown in training.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax

from inception_flax.models.layers import Common, concat
from inception_flax.models.network import InceptionNet
from inception_flax.models.pooling import adaptive_avg_pool

# (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) per module, paper Table 1.
MODULES = {
    "Inception_3a": (64, 96, 128, 16, 32, 32),
    "Inception_3b": (128, 128, 192, 32, 96, 64),
    "Inception_4a": (192, 96, 208, 16, 48, 64),
    "Inception_4b": (160, 112, 224, 24, 64, 64),
    "Inception_4c": (128, 128, 256, 24, 64, 64),
    "Inception_4d": (112, 144, 288, 32, 64, 64),
    "Inception_4e": (256, 160, 320, 32, 128, 128),
    "Inception_5a": (256, 160, 320, 32, 128, 128),
    "Inception_5b": (384, 192, 384, 48, 128, 128),
}
POOL_BEFORE = {"Inception_4a": (3, 2), "Inception_5a": (2, 2)}  # (window, stride)
AUX_AFTER = {"Inception_4a": "AuxLogits_4a", "Inception_4d": "AuxLogits_4d"}
LAYOUTS = ("paper", "torchvision")


def same(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric k // 2 padding, as in Caffe and PyTorch."""
    return ((k // 2, k // 2), (k // 2, k // 2))


class InceptionModule(nn.Module):
    """Fig. 2(b): 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max-pool -> 1x1."""

    common: Common
    widths: tuple[int, int, int, int, int, int]
    wide_kernel: int = 5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        conv, d = c.conv, c.depth
        c1, c3r, c3, c5r, c5, cp = self.widths
        k = self.wide_kernel
        return concat(c.towers(
            x, train,
            [conv(d(c1), 1, name="Branch_0_1x1")],
            [conv(d(c3r), 1, name="Branch_1_1x1"),
             conv(d(c3), 3, padding=same(3), name="Branch_1_3x3")],
            [conv(d(c5r), 1, name="Branch_2_1x1"),
             conv(d(c5), k, padding=same(k), name=f"Branch_2_{k}x{k}")],
            [c.max_pool_ceil(3, 1, pad=1), conv(d(cp), 1, name="Branch_3_1x1")],
        ))


class AuxHeadV1(nn.Module):
    """GoogLeNet's auxiliary classifier: pool to 4x4 -> 1x1 conv 128 -> FC 1024 -> FC.

    The paper pools 5x5 / stride 3 (14x14 -> 4x4); torchvision pools adaptively.
    """

    common: Common
    num_classes: int
    adaptive: bool
    dropout_rate: float = 0.7

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        if self.adaptive or min(x.shape[1], x.shape[2]) < 14:
            x = adaptive_avg_pool(x, 4)
        else:
            x = c.avg_pool(5, 3, padding="VALID")(x)
        x = c.conv(c.depth(128), 1, name="Conv2d_1x1")(x, train)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(c.dense(1024, name="Fc1")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return c.dense(self.num_classes, name="Logits")(x)


class GoogLeNet(InceptionNet):
    """Inception v1; 224x224 input, aux heads after Inception_4a and Inception_4d."""

    dropout_rate: float = 0.4
    aux_dropout_rate: float = 0.7
    layout: str = "paper"

    min_image_size: ClassVar[int] = 32

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        c = self.common
        conv, d = c.conv, c.depth
        wide = 5 if self.layout == "paper" else 3

        def aux(x: jax.Array, name: str) -> None:
            if self.wants_aux(train):
                head = AuxHeadV1(c, self.num_classes, self.layout == "torchvision",
                                 self.aux_dropout_rate, name=name)
                self.sow_aux(head(x, train))

        x = conv(d(64), 7, strides=2, padding=same(7), name="Conv2d_1_7x7")(x, train)
        x = c.max_pool_ceil(3, 2)(x)
        x = conv(d(64), 1, name="Conv2d_2a_1x1")(x, train)
        x = conv(d(192), 3, padding=same(3), name="Conv2d_2b_3x3")(x, train)
        x = c.max_pool_ceil(3, 2)(x)
        for name, widths in MODULES.items():
            if name in POOL_BEFORE:
                x = c.max_pool_ceil(*POOL_BEFORE[name])(x)
            x = InceptionModule(c, widths, wide, name=name)(x, train)
            if name in AUX_AFTER:
                aux(x, AUX_AFTER[name])
        return x
