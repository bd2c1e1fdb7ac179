"""BN-Inception (the network TF-slim calls inception_v2).

Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift" (2015), Fig. 5: GoogLeNet with BatchNorm after
every (bias-free) convolution, each 5x5 replaced by two 3x3, average pooling in
most modules, and stride-2 modules (3c, 4e) in place of separate max-pools.
Plain 7x7 stem and ceil-mode pooling, as in the Caffe model. No auxiliary head.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax

from inception_flax.models.inception_v1 import same
from inception_flax.models.layers import Common, concat
from inception_flax.models.network import InceptionNet


class Widths(NamedTuple):
    """One row of Fig. 5. `c1 = 0` and `pool_proj = 0` mark the stride-2 modules."""

    c1: int
    c3r: int
    c3: int
    cd3r: int
    cd3: int
    pool: str
    pool_proj: int


MODULES = {
    "Inception_3a": Widths(64, 64, 64, 64, 96, "avg", 32),
    "Inception_3b": Widths(64, 64, 96, 64, 96, "avg", 64),
    "Inception_3c": Widths(0, 128, 160, 64, 96, "max", 0),
    "Inception_4a": Widths(224, 64, 96, 96, 128, "avg", 128),
    "Inception_4b": Widths(192, 96, 128, 96, 128, "avg", 128),
    "Inception_4c": Widths(160, 128, 160, 128, 160, "avg", 128),
    "Inception_4d": Widths(96, 128, 192, 160, 192, "avg", 128),
    "Inception_4e": Widths(0, 128, 192, 192, 256, "max", 0),
    "Inception_5a": Widths(352, 192, 320, 160, 224, "avg", 128),
    "Inception_5b": Widths(352, 192, 320, 192, 224, "max", 128),
}


class InceptionBN(nn.Module):
    """Fig. 5 module: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 | pool (-> 1x1).

    A stride-2 module has no 1x1 branch and passes its max-pool through unprojected.
    """

    common: Common
    widths: Widths

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        conv, d = c.conv, c.depth
        w = self.widths
        s = 1 if w.c1 else 2
        if w.pool == "avg":
            pool = c.avg_pool(3, count_include_pad=True)
        else:
            pool = c.max_pool_ceil(3, s, pad=1 if s == 1 else 0)
        tower_0 = [[conv(d(w.c1), 1, name="Branch_0_1x1")]] if w.c1 else []
        project = [conv(d(w.pool_proj), 1, name="Branch_3_1x1")] if w.pool_proj else []
        return concat(c.towers(
            x, train,
            *tower_0,
            [conv(d(w.c3r), 1, name="Branch_1_1x1"),
             conv(d(w.c3), 3, strides=s, padding=same(3), name="Branch_1_3x3")],
            [conv(d(w.cd3r), 1, name="Branch_2_1x1"),
             conv(d(w.cd3), 3, padding=same(3), name="Branch_2_3x3a"),
             conv(d(w.cd3), 3, strides=s, padding=same(3), name="Branch_2_3x3b")],
            [pool, *project],
        ))


class BNInception(InceptionNet):
    """BN-Inception; 224x224 input. The BN paper removes dropout: default rate 0."""

    dropout_rate: float = 0.0

    min_image_size: ClassVar[int] = 32
    has_aux: ClassVar[bool] = False

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        conv, d = c.conv, c.depth
        x = conv(d(64), 7, strides=2, padding=same(7), name="Conv2d_1_7x7")(x, train)
        x = c.max_pool_ceil(3, 2)(x)
        x = conv(d(64), 1, name="Conv2d_2a_1x1")(x, train)
        x = conv(d(192), 3, padding=same(3), name="Conv2d_2b_3x3")(x, train)
        x = c.max_pool_ceil(3, 2)(x)
        for name, widths in MODULES.items():
            x = InceptionBN(c, widths, name=name)(x, train)
        return x
