"""Inception v4: RMSProp (decay 0.9, epsilon 1.0), lr 0.045 x0.94 every 2 epochs, EMA eval."""

from configs import common


def get_config(preset: str = ""):
    return common.apply_preset(common.base_config("inception_v4", image_size=299), preset)
