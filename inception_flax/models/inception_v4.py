"""Inception v4.

Szegedy et al., "Inception-v4, Inception-ResNet and the Impact of Residual
Connections on Learning" (2016): Stem (Fig. 3), 4 x Inception-A (Fig. 4),
Reduction-A (Fig. 7, k=192 l=224 m=256 n=384), 7 x Inception-B (Fig. 5),
Reduction-B (Fig. 8), 3 x Inception-C (Fig. 6). The repeated blocks run under
`nn.scan`, so their parameters carry a leading axis (4, 7, 3).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from inception_flax.models.layers import Common, concat, fork
from inception_flax.models.network import AuxHead, InceptionNet, stem_3x3


class Stem(nn.Module):
    """Fig. 3: 299x299x3 -> 35x35x384."""

    common: Common

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        conv, d = c.conv, c.depth
        x = stem_3x3(c, x, train)
        x = concat(c.towers(
            x, train,
            [c.max_pool(3, 2)],
            [conv(d(96), 3, strides=2, padding="VALID", name="Mixed_3a_3x3")],
        ))
        x = concat(c.towers(
            x, train,
            [conv(d(64), 1, name="Mixed_4a_Branch_0_1x1"),
             conv(d(96), 3, padding="VALID", name="Mixed_4a_Branch_0_3x3")],
            [conv(d(64), 1, name="Mixed_4a_Branch_1_1x1"),
             conv(d(64), (1, 7), name="Mixed_4a_Branch_1_1x7"),
             conv(d(64), (7, 1), name="Mixed_4a_Branch_1_7x1"),
             conv(d(96), 3, padding="VALID", name="Mixed_4a_Branch_1_3x3")],
        ))
        return concat(c.towers(
            x, train,
            [conv(d(192), 3, strides=2, padding="VALID", name="Mixed_5a_3x3")],
            [c.max_pool(3, 2)],
        ))


class InceptionA(nn.Module):
    """Fig. 4 (35x35 grid, 384 channels). Returns `(x, None)` for `nn.scan`."""

    common: Common

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, None]:
        c = self.common
        conv, d = c.conv, c.depth
        return concat(c.towers(
            x, train,
            [conv(d(96), 1, name="Branch_0_1x1")],
            [conv(d(64), 1, name="Branch_1_1x1"), conv(d(96), 3, name="Branch_1_3x3")],
            [conv(d(64), 1, name="Branch_2_1x1"), conv(d(96), 3, name="Branch_2_3x3a"),
             conv(d(96), 3, name="Branch_2_3x3b")],
            [c.avg_pool(3), conv(d(96), 1, name="Branch_3_1x1")],
        )), None


class ReductionA(nn.Module):
    """Fig. 7, 35 -> 17: 3x3/2 n | 1x1 k -> 3x3 l -> 3x3/2 m | max-pool/2.

    Shared with Inception-ResNet, which uses other (k, l, m, n).
    """

    common: Common
    k: int = 192
    l: int = 224
    m: int = 256
    n: int = 384

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        conv, d = c.conv, c.depth
        return concat(c.towers(
            x, train,
            [conv(d(self.n), 3, strides=2, padding="VALID", name="Branch_0_3x3")],
            [conv(d(self.k), 1, name="Branch_1_1x1"), conv(d(self.l), 3, name="Branch_1_3x3a"),
             conv(d(self.m), 3, strides=2, padding="VALID", name="Branch_1_3x3b")],
            [c.max_pool(3, 2)],
        ))


class InceptionB(nn.Module):
    """Fig. 5 (17x17 grid, 1024 channels). Returns `(x, None)` for `nn.scan`."""

    common: Common

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, None]:
        c = self.common
        conv, d = c.conv, c.depth
        return concat(c.towers(
            x, train,
            [conv(d(384), 1, name="Branch_0_1x1")],
            [conv(d(192), 1, name="Branch_1_1x1"), conv(d(224), (1, 7), name="Branch_1_1x7"),
             conv(d(256), (7, 1), name="Branch_1_7x1")],
            [conv(d(192), 1, name="Branch_2_1x1"), conv(d(192), (7, 1), name="Branch_2_7x1a"),
             conv(d(224), (1, 7), name="Branch_2_1x7a"),
             conv(d(224), (7, 1), name="Branch_2_7x1b"),
             conv(d(256), (1, 7), name="Branch_2_1x7b")],
            [c.avg_pool(3), conv(d(128), 1, name="Branch_3_1x1")],
        )), None


class ReductionB(nn.Module):
    """Fig. 8, 17 -> 8: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max-pool/2."""

    common: Common

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        conv, d = c.conv, c.depth
        return concat(c.towers(
            x, train,
            [conv(d(192), 1, name="Branch_0_1x1"),
             conv(d(192), 3, strides=2, padding="VALID", name="Branch_0_3x3")],
            [conv(d(256), 1, name="Branch_1_1x1"), conv(d(256), (1, 7), name="Branch_1_1x7"),
             conv(d(320), (7, 1), name="Branch_1_7x1"),
             conv(d(320), 3, strides=2, padding="VALID", name="Branch_1_3x3")],
            [c.max_pool(3, 2)],
        ))


class InceptionC(nn.Module):
    """Fig. 6 (8x8 grid, 1536 channels). Returns `(x, None)` for `nn.scan`."""

    common: Common

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, None]:
        c = self.common
        conv, d = c.conv, c.depth
        return concat(c.towers(
            x, train,
            [conv(d(256), 1, name="Branch_0_1x1")],
            [conv(d(384), 1, name="Branch_1_1x1"),
             fork(conv(d(256), (1, 3), name="Branch_1_1x3"),
                  conv(d(256), (3, 1), name="Branch_1_3x1"))],
            [conv(d(384), 1, name="Branch_2_1x1"), conv(d(448), (3, 1), name="Branch_2_3x1a"),
             conv(d(512), (1, 3), name="Branch_2_1x3a"),
             fork(conv(d(256), (1, 3), name="Branch_2_1x3b"),
                  conv(d(256), (3, 1), name="Branch_2_3x1b"))],
            [c.avg_pool(3), conv(d(256), 1, name="Branch_3_1x1")],
        )), None


class InceptionV4(InceptionNet):
    """Inception v4; 299x299 input, aux head (optional) after the last Inception-B."""

    dropout_rate: float = 0.2

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        x = Stem(c, name="Stem")(x, train)
        x, _ = self.repeated(InceptionA, 4, "Mixed_5")(x, train)
        x = ReductionA(c, name="Mixed_6a")(x, train)
        x, _ = self.repeated(InceptionB, 7, "Mixed_6")(x, train)
        if self.wants_aux(train):
            self.sow_aux(AuxHead(c, self.num_classes, name="AuxLogits")(x, train))
        x = ReductionB(c, name="Mixed_7a")(x, train)
        x, _ = self.repeated(InceptionC, 3, "Mixed_7")(x, train)
        return x
