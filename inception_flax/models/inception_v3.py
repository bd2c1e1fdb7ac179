"""Inception v3 and the "Rethinking" paper's Inception-v2.

Szegedy et al., "Rethinking the Inception Architecture for Computer Vision" (2015).
Block names follow the paper's figures: InceptionA is Fig. 5 (two 3x3 in place of
5x5), InceptionB / InceptionD the grid reductions (Fig. 10), InceptionC Fig. 6
(n x 1 factorisation, n = 7), InceptionE Fig. 7 (expanded filter bank, 8x8 grid).
Inception-v2 is the same body with one 7x7/2 stem convolution, no BN in the
auxiliary head's 5x5 convolution, and the paper's SGD baseline recipe.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax

from inception_flax.models.layers import Common, concat, fork
from inception_flax.models.network import AuxHead, InceptionNet, stem_3x3, stem_pool_1x1_3x3


class InceptionA(nn.Module):
    """Fig. 5: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | pool -> 1x1 (35x35 grid)."""

    common: Common
    pool_features: int
    pool_include_pad: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        conv, d = c.conv, c.depth
        return concat(c.towers(
            x, train,
            [conv(d(64), 1, name="Branch_0_1x1")],
            [conv(d(48), 1, name="Branch_1_1x1"), conv(d(64), 5, name="Branch_1_5x5")],
            [conv(d(64), 1, name="Branch_2_1x1"), conv(d(96), 3, name="Branch_2_3x3a"),
             conv(d(96), 3, name="Branch_2_3x3b")],
            [c.avg_pool(3, count_include_pad=self.pool_include_pad),
             conv(d(self.pool_features), 1, name="Branch_3_1x1")],
        ))


class InceptionB(nn.Module):
    """Fig. 10 grid reduction 35 -> 17: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max-pool/2."""

    common: Common

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        conv, d = c.conv, c.depth
        return concat(c.towers(
            x, train,
            [conv(d(384), 3, strides=2, padding="VALID", name="Branch_0_3x3")],
            [conv(d(64), 1, name="Branch_1_1x1"), conv(d(96), 3, name="Branch_1_3x3a"),
             conv(d(96), 3, strides=2, padding="VALID", name="Branch_1_3x3b")],
            [c.max_pool(3, 2)],
        ))


class InceptionC(nn.Module):
    """Fig. 6 with n = 7: 7x7 convolutions factorised into 1x7 and 7x1 (17x17 grid)."""

    common: Common
    channels_7x7: int
    pool_include_pad: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        conv, d = c.conv, c.depth
        c7 = d(self.channels_7x7)
        return concat(c.towers(
            x, train,
            [conv(d(192), 1, name="Branch_0_1x1")],
            [conv(c7, 1, name="Branch_1_1x1"), conv(c7, (1, 7), name="Branch_1_1x7"),
             conv(d(192), (7, 1), name="Branch_1_7x1")],
            [conv(c7, 1, name="Branch_2_1x1"), conv(c7, (7, 1), name="Branch_2_7x1a"),
             conv(c7, (1, 7), name="Branch_2_1x7a"), conv(c7, (7, 1), name="Branch_2_7x1b"),
             conv(d(192), (1, 7), name="Branch_2_1x7b")],
            [c.avg_pool(3, count_include_pad=self.pool_include_pad),
             conv(d(192), 1, name="Branch_3_1x1")],
        ))


class InceptionD(nn.Module):
    """Fig. 10 grid reduction 17 -> 8: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max-pool/2."""

    common: Common

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        conv, d = c.conv, c.depth
        return concat(c.towers(
            x, train,
            [conv(d(192), 1, name="Branch_0_1x1"),
             conv(d(320), 3, strides=2, padding="VALID", name="Branch_0_3x3")],
            [conv(d(192), 1, name="Branch_1_1x1"), conv(d(192), (1, 7), name="Branch_1_1x7"),
             conv(d(192), (7, 1), name="Branch_1_7x1"),
             conv(d(192), 3, strides=2, padding="VALID", name="Branch_1_3x3")],
            [c.max_pool(3, 2)],
        ))


class InceptionE(nn.Module):
    """Fig. 7: expanded filter bank with parallel 1x3 / 3x1 outputs (8x8 grid)."""

    common: Common
    pool_include_pad: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        conv, d = c.conv, c.depth
        return concat(c.towers(
            x, train,
            [conv(d(320), 1, name="Branch_0_1x1")],
            [conv(d(384), 1, name="Branch_1_1x1"),
             fork(conv(d(384), (1, 3), name="Branch_1_1x3"),
                  conv(d(384), (3, 1), name="Branch_1_3x1"))],
            [conv(d(448), 1, name="Branch_2_1x1"), conv(d(384), 3, name="Branch_2_3x3"),
             fork(conv(d(384), (1, 3), name="Branch_2_1x3"),
                  conv(d(384), (3, 1), name="Branch_2_3x1"))],
            [c.avg_pool(3, count_include_pad=self.pool_include_pad),
             conv(d(192), 1, name="Branch_3_1x1")],
        ))


class InceptionV3(InceptionNet):
    """Inception v3 (paper Table 1 with all Table 3 improvements); 299x299 input.

    `pool_include_pad=True` averages over padded windows as the PyTorch ports do;
    False is TF 'SAME' average pooling.
    """

    dropout_rate: float = 0.2
    pool_include_pad: bool = True

    min_image_size: ClassVar[int] = 75
    factorized_stem: ClassVar[bool] = True
    bn_in_aux_head: ClassVar[bool] = True

    def stem(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        if self.factorized_stem:
            x = stem_3x3(c, x, train)
        else:
            x = c.conv(c.depth(64), 7, strides=2, padding="VALID", name="Conv2d_1a_7x7")(x, train)
        return c.max_pool(3, 2)(stem_pool_1x1_3x3(c, x, train))

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        c, pad = self.common, self.pool_include_pad
        x = self.stem(x, train)
        x = InceptionA(c, 32, pad, name="Mixed_5b")(x, train)
        x = InceptionA(c, 64, pad, name="Mixed_5c")(x, train)
        x = InceptionA(c, 64, pad, name="Mixed_5d")(x, train)
        x = InceptionB(c, name="Mixed_6a")(x, train)
        x = InceptionC(c, 128, pad, name="Mixed_6b")(x, train)
        x = InceptionC(c, 160, pad, name="Mixed_6c")(x, train)
        x = InceptionC(c, 160, pad, name="Mixed_6d")(x, train)
        x = InceptionC(c, 192, pad, name="Mixed_6e")(x, train)
        if self.wants_aux(train):
            self.sow_aux(AuxHead(c, self.num_classes, self.bn_in_aux_head, name="AuxLogits")(x, train))
        x = InceptionD(c, name="Mixed_7a")(x, train)
        x = InceptionE(c, pad, name="Mixed_7b")(x, train)
        return InceptionE(c, pad, name="Mixed_7c")(x, train)


class InceptionV2(InceptionV3):
    """The Rethinking paper's Inception-v2: one 7x7/2 stem conv, no BN in the aux head."""

    factorized_stem: ClassVar[bool] = False
    bn_in_aux_head: ClassVar[bool] = False
