"""Inception v3: RMSProp, label smoothing 0.1, clipping at 2.0, aux head with BN, EMA eval."""

from configs import common


def get_config(preset: str = ""):
    c = common.base_config("inception_v3", image_size=299)
    c.model.pool_include_pad = True  # PyTorch-style average pooling (False: TF 'SAME')
    return common.apply_preset(c, preset)
