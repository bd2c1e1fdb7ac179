"""Inception-ResNet v2 (Inception-v4 paper): RMSProp recipe, residual scales 0.17 / 0.10 / 0.20."""

from ml_collections import config_dict

from configs import common


def get_config(preset: str = ""):
    c = common.base_config("inception_resnet_v2", image_size=299)
    c.model.residual_scale = config_dict.placeholder(float)  # one scale for every block type
    c.model.residual_scales = (0.17, 0.10, 0.20)  # Block35, Block17, Block8 (TF reference)
    return common.apply_preset(c, preset)
