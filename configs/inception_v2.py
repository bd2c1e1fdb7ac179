"""The "Rethinking" paper's Inception-v2 and its baseline recipe.

SGD with momentum 0.9, lr 0.045 decayed x0.94 every 2 epochs, no label smoothing,
no gradient clipping, no RMSProp (those are the Table 3 steps that lead to v3).
"""

from configs import common


def get_config(preset: str = ""):
    c = common.base_config("inception_v2", image_size=299)
    c.optimizer = "sgd"
    c.label_smoothing = 0.0
    c.grad_clip_norm = 0.0
    return common.apply_preset(c, preset)
