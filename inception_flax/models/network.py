"""What every network shares around its blocks: the base class, the auxiliary head, the
repeated-block scan and the opening layers of v3, v4 and the Inception-ResNets.

`InceptionNet` holds the constructor fields (those of `layers.Common` among them),
checks its input and ends in the classifier; a family defines `features`, written
with the layers of `layers`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from inception_flax.models.layers import Common, Dtype
from inception_flax.models.ops import Ops
from inception_flax.models.pooling import adaptive_avg_pool


class InceptionNet(nn.Module):
    """Base for every network: input checks, shared knobs and the classifier top.

    Subclasses define `features(x, train) -> x` (everything up to the global pool)
    and may sow auxiliary logits through `sow_aux`. The fields `Common` declares
    (defaults there) reach the blocks as `self.common`.
    """

    num_classes: int = 1000
    aux_logits: bool = False
    dropout_rate: float = 0.2
    depth_multiplier: float = Common.depth_multiplier
    min_depth: int = Common.min_depth
    bn_momentum: float = Common.bn_momentum
    bn_epsilon: float = Common.bn_epsilon
    bn_scale: bool = Common.bn_scale
    axis_name: str | None = Common.axis_name
    remat: bool = False
    bn_remat: bool = Common.bn_remat
    merge_pointwise: bool = Common.merge_pointwise
    scan_unroll: int = 1
    dtype: Dtype = Common.dtype
    param_dtype: Dtype = Common.param_dtype
    ops: Ops = Common.ops

    min_image_size: ClassVar[int] = 75
    has_aux: ClassVar[bool] = True

    @property
    def common(self) -> Common:
        return Common(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Common)})

    def check_image_size(self, height: int, width: int) -> None:
        if min(height, width) < self.min_image_size:
            raise ValueError(
                f"{type(self).__name__} needs images of at least "
                f"{self.min_image_size}x{self.min_image_size}, got {height}x{width}: "
                f"raise image_size to {self.min_image_size} or more."
            )

    def wants_aux(self, train: bool) -> bool:
        """Aux heads run in training, and at init so their parameters exist."""
        return self.aux_logits and (train or self.is_initializing())

    def repeated(self, block: type[nn.Module], length: int, name: str, **kwargs) -> nn.Module:
        """`length` copies of `block` under `stack`, with this network's remat / unroll."""
        return stack(block, length, self.remat, self.scan_unroll, common=self.common,
                     name=name, **kwargs)

    def sow_aux(self, logits: jax.Array) -> None:
        """Auxiliary logits go to `intermediates/aux_logits` (a tuple, one per head)."""
        self.sow("intermediates", "aux_logits", jnp.asarray(logits, jnp.float32))

    def classifier(self, x: jax.Array, train: bool) -> jax.Array:
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = self.common.dense(self.num_classes, name="Logits")(x)
        return jnp.asarray(x, jnp.float32)

    def features(self, x: jax.Array, train: bool) -> jax.Array:
        raise NotImplementedError

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Logits for NHWC images in [-1, 1]; aux logits are sown in training."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected NHWC images with 3 channels, got shape {tuple(images.shape)}"
            )
        self.check_image_size(images.shape[1], images.shape[2])
        if self.aux_logits and not self.has_aux:
            raise ValueError(f"{type(self).__name__} has no auxiliary head: set aux_logits=False")
        x = self.features(jnp.asarray(images, self.dtype), train)
        return self.classifier(x, train)


class AuxHead(nn.Module):
    """The auxiliary classifier of Inception v3 / v4 / Inception-ResNet.

    avg-pool 5x5 stride 3 -> 1x1 conv 128 -> 5x5 conv 768 -> global pool -> FC.
    Feature maps smaller than 17x17 (small training images) are pooled adaptively
    to 5x5 instead, so the 5x5 conv always sees a 5x5 map. `bn_in_head=False`
    gives the Rethinking paper's Inception-v2 head: the 5x5 conv has a bias and no BN.
    """

    common: Common
    num_classes: int
    bn_in_head: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.common
        if min(x.shape[1], x.shape[2]) >= 17:
            x = c.avg_pool(5, 3, padding="VALID")(x)
        else:
            x = adaptive_avg_pool(x, 5)
        x = c.conv(c.depth(128), 1, name="Conv2d_1a_1x1")(x, train)
        if self.bn_in_head:
            x = c.conv(c.depth(768), 5, padding="VALID", name="Conv2d_2a_5x5")(x, train)
        else:
            x = c.bias_conv(c.depth(768), (5, 5), padding="VALID", name="Conv2d_2a_5x5")(x)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return c.dense(self.num_classes, name="Logits")(x)


def stack(block: type[nn.Module], length: int, remat: bool = False, unroll: int = 1,
          **kwargs) -> nn.Module:
    """`length` copies of a block under `nn.scan`.

    Parameters and BN statistics gain a leading axis of size `length`. The block's
    `__call__(x, train)` returns `(x, None)`. `unroll` copies run per loop
    iteration: 1 compiles one body (fastest compile); `length` or more unrolls the
    loop completely (fastest run on CPU). The parameter layout is the same.
    """
    if remat:
        block = nn.remat(block, static_argnums=(2,))
    scanned = nn.scan(
        block,
        variable_axes={"params": 0, "batch_stats": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=length,
        unroll=min(max(unroll, 1), length),
    )
    return scanned(**kwargs)


def stem_3x3(common: Common, x: jax.Array, train: bool) -> jax.Array:
    """3x3/2 V -> 3x3 V -> 3x3 (299 -> 147x147x64): how v3, v4 and the Inception-ResNets open.

    Called inside a module's compact method, so the convolutions belong to that module.
    """
    conv, d = common.conv, common.depth
    x = conv(d(32), 3, strides=2, padding="VALID", name="Conv2d_1a_3x3")(x, train)
    x = conv(d(32), 3, padding="VALID", name="Conv2d_2a_3x3")(x, train)
    return conv(d(64), 3, name="Conv2d_2b_3x3")(x, train)


def stem_pool_1x1_3x3(common: Common, x: jax.Array, train: bool) -> jax.Array:
    """max-pool/2 -> 1x1 80 V -> 3x3 192 V (147x147x64 -> 71x71x192), after `stem_3x3`."""
    conv, d = common.conv, common.depth
    x = common.max_pool(3, 2)(x)
    x = conv(d(80), 1, padding="VALID", name="Conv2d_3b_1x1")(x, train)
    return conv(d(192), 3, padding="VALID", name="Conv2d_4a_3x3")(x, train)
