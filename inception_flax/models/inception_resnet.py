"""Inception-ResNet v1 and v2.

Szegedy et al., "Inception-v4, Inception-ResNet and the Impact of Residual
Connections on Learning" (2016). Each residual block adds `scale * residual` to
its input, the residual being a bias-carrying 1x1 projection of the concatenated
branches (no BN), then applies ReLU. Blocks are named as in the TF reference:
Block35 (Inception-ResNet-A, 35x35), Block17 (-B, 17x17), Block8 (-C, 8x8).

v1: stem of Fig. 14, 5 x A (Fig. 10), Reduction-A (Fig. 7, k=l=192, m=256, n=384),
10 x B (Fig. 11), Reduction-B (Fig. 12), 5 x C (Fig. 13).
v2: the TF reference stem, Mixed_5b, 10 x A (Fig. 16), Reduction-A (k=l=256,
m=n=384), 20 x B (Fig. 17), Reduction-B (Fig. 18), 9 x C (Fig. 19) and a final
C block without ReLU (scale 1.0), then a 1x1 conv to 1536.
Repeated blocks run under `nn.scan`: their parameters carry a leading axis.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from inception_flax.models.inception_v4 import ReductionA
from inception_flax.models.layers import Common, concat
from inception_flax.models.network import AuxHead, InceptionNet, stem_3x3, stem_pool_1x1_3x3

ResidualScale = float | Sequence[float]


def residual_scales(scale: ResidualScale, default: tuple[float, float, float]
                    ) -> tuple[float, float, float]:
    """One float for every block type, or one per type (A, B, C); each in [0, 1]."""
    if scale is None:
        scale = default
    scales = (float(scale),) * 3 if isinstance(scale, (int, float)) else tuple(map(float, scale))
    if len(scales) != 3:
        raise ValueError(
            f"residual_scale must be one float or three (Block35, Block17, Block8), got {scale!r}")
    for s in scales:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"residual_scale must lie in [0, 1], got {scale!r}")
    return scales


class ResidualBlock(nn.Module):
    """Shared tail: project the branches to the input width, scale, add, ReLU."""

    common: Common
    scale: float
    activation: bool = True

    def branches(self, x: jax.Array, train: bool) -> list[jax.Array]:
        raise NotImplementedError

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, None]:
        mixed = concat(self.branches(x, train))
        up = self.common.bias_conv(x.shape[-1], (1, 1), name="Conv2d_1x1")(mixed)
        x = x + jnp.asarray(self.scale, x.dtype) * up
        return (nn.relu(x) if self.activation else x), None


class Block35(ResidualBlock):
    """Inception-ResNet-A (v1 Fig. 10, v2 Fig. 16): 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3."""

    widths: tuple[int, int, int, int] = (32, 32, 48, 64)  # v1: (32, 32, 32, 32)

    def branches(self, x: jax.Array, train: bool) -> list[jax.Array]:
        c = self.common
        conv, d = c.conv, c.depth
        w0, w1, w2a, w2b = self.widths
        return c.towers(
            x, train,
            [conv(d(w0), 1, name="Branch_0_1x1")],
            [conv(d(w0), 1, name="Branch_1_1x1"), conv(d(w1), 3, name="Branch_1_3x3")],
            [conv(d(w0), 1, name="Branch_2_1x1"), conv(d(w2a), 3, name="Branch_2_3x3a"),
             conv(d(w2b), 3, name="Branch_2_3x3b")],
        )


class Block17(ResidualBlock):
    """Inception-ResNet-B (v1 Fig. 11, v2 Fig. 17): 1x1 | 1x1 -> 1x7 -> 7x1."""

    widths: tuple[int, int, int, int] = (192, 128, 160, 192)  # v1: (128, 128, 128, 128)

    def branches(self, x: jax.Array, train: bool) -> list[jax.Array]:
        c = self.common
        conv, d = c.conv, c.depth
        w0, w1a, w1b, w1c = self.widths
        return c.towers(
            x, train,
            [conv(d(w0), 1, name="Branch_0_1x1")],
            [conv(d(w1a), 1, name="Branch_1_1x1"), conv(d(w1b), (1, 7), name="Branch_1_1x7"),
             conv(d(w1c), (7, 1), name="Branch_1_7x1")],
        )


class Block8(ResidualBlock):
    """Inception-ResNet-C (v1 Fig. 13, v2 Fig. 19): 1x1 | 1x1 -> 1x3 -> 3x1."""

    widths: tuple[int, int, int, int] = (192, 192, 224, 256)  # v1: (192, 192, 192, 192)

    def branches(self, x: jax.Array, train: bool) -> list[jax.Array]:
        c = self.common
        conv, d = c.conv, c.depth
        w0, w1a, w1b, w1c = self.widths
        return c.towers(
            x, train,
            [conv(d(w0), 1, name="Branch_0_1x1")],
            [conv(d(w1a), 1, name="Branch_1_1x1"), conv(d(w1b), (1, 3), name="Branch_1_1x3"),
             conv(d(w1c), (3, 1), name="Branch_1_3x1")],
        )


class ReductionB(nn.Module):
    """v1 Fig. 12 / v2 Fig. 18, 17 -> 8: three conv towers and a max-pool."""

    common: Common
    widths: tuple[int, int, int, int] = (384, 288, 288, 320)  # v1: (384, 256, 256, 256)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        conv, d = c.conv, c.depth
        w0, w1, w2a, w2b = self.widths
        return concat(c.towers(
            x, train,
            [conv(d(256), 1, name="Branch_0_1x1"),
             conv(d(w0), 3, strides=2, padding="VALID", name="Branch_0_3x3")],
            [conv(d(256), 1, name="Branch_1_1x1"),
             conv(d(w1), 3, strides=2, padding="VALID", name="Branch_1_3x3")],
            [conv(d(256), 1, name="Branch_2_1x1"), conv(d(w2a), 3, name="Branch_2_3x3a"),
             conv(d(w2b), 3, strides=2, padding="VALID", name="Branch_2_3x3b")],
            [c.max_pool(3, 2)],
        ))


class StemV1(nn.Module):
    """Fig. 14: 299x299x3 -> 35x35x256."""

    common: Common

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        x = stem_pool_1x1_3x3(c, stem_3x3(c, x, train), train)
        return c.conv(c.depth(256), 3, strides=2, padding="VALID", name="Conv2d_4b_3x3")(x, train)


class StemV2(nn.Module):
    """The TF reference stem and Mixed_5b: 299x299x3 -> 35x35x320."""

    common: Common

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        conv, d = c.conv, c.depth
        x = c.max_pool(3, 2)(stem_pool_1x1_3x3(c, stem_3x3(c, x, train), train))
        return concat(c.towers(
            x, train,
            [conv(d(96), 1, name="Mixed_5b_Branch_0_1x1")],
            [conv(d(48), 1, name="Mixed_5b_Branch_1_1x1"),
             conv(d(64), 5, name="Mixed_5b_Branch_1_5x5")],
            [conv(d(64), 1, name="Mixed_5b_Branch_2_1x1"),
             conv(d(96), 3, name="Mixed_5b_Branch_2_3x3a"),
             conv(d(96), 3, name="Mixed_5b_Branch_2_3x3b")],
            [c.avg_pool(3), conv(d(64), 1, name="Mixed_5b_Branch_3_1x1")],
        ))


class InceptionResNetV2(InceptionNet):
    """Inception-ResNet v2; `residual_scale` is one float or (Block35, Block17, Block8)."""

    dropout_rate: float = 0.2
    residual_scale: ResidualScale | None = None

    default_scales: ClassVar[tuple[float, float, float]] = (0.17, 0.10, 0.20)
    repeats: ClassVar[tuple[int, int, int]] = (10, 20, 9)
    block_widths: ClassVar[dict] = {}  # v2's widths are the blocks' defaults

    def stem(self, x: jax.Array, train: bool) -> jax.Array:
        return StemV2(self.common, name="Stem")(x, train)

    def reduction_a(self, x: jax.Array, train: bool) -> jax.Array:
        return ReductionA(self.common, 256, 256, 384, 384, name="Mixed_6a")(x, train)

    def reduction_b(self, x: jax.Array, train: bool) -> jax.Array:
        return ReductionB(self.common, name="Mixed_7a")(x, train)

    def head(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        x, _ = Block8(c, 1.0, activation=False, name="Block8")(x, train)
        return c.conv(c.depth(1536), 1, name="Conv2d_7b_1x1")(x, train)

    def repeat(self, block: type[ResidualBlock], n: int, scale: float) -> nn.Module:
        return self.repeated(block, n, f"Repeat_{block.__name__}", scale=scale,
                             **self.block_widths.get(block.__name__, {}))

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        s35, s17, s8 = residual_scales(self.residual_scale, self.default_scales)
        n35, n17, n8 = self.repeats
        x = self.stem(x, train)
        x, _ = self.repeat(Block35, n35, s35)(x, train)
        x = self.reduction_a(x, train)
        x, _ = self.repeat(Block17, n17, s17)(x, train)
        if self.wants_aux(train):
            self.sow_aux(AuxHead(self.common, self.num_classes, name="AuxLogits")(x, train))
        x = self.reduction_b(x, train)
        x, _ = self.repeat(Block8, n8, s8)(x, train)
        return self.head(x, train)


class InceptionResNetV1(InceptionResNetV2):
    """Inception-ResNet v1 as in the paper's figures (5 / 10 / 5 blocks)."""

    default_scales: ClassVar[tuple[float, float, float]] = (0.17, 0.10, 0.20)
    repeats: ClassVar[tuple[int, int, int]] = (5, 10, 5)
    block_widths: ClassVar[dict] = {
        "Block35": {"widths": (32, 32, 32, 32)},
        "Block17": {"widths": (128, 128, 128, 128)},
        "Block8": {"widths": (192, 192, 192, 192)},
    }

    def stem(self, x: jax.Array, train: bool) -> jax.Array:
        return StemV1(self.common, name="Stem")(x, train)

    def reduction_a(self, x: jax.Array, train: bool) -> jax.Array:
        return ReductionA(self.common, 192, 192, 256, 384, name="Mixed_6a")(x, train)

    def reduction_b(self, x: jax.Array, train: bool) -> jax.Array:
        return ReductionB(self.common, (384, 256, 256, 256), name="Mixed_7a")(x, train)

    def head(self, x: jax.Array, train: bool) -> jax.Array:
        return x
