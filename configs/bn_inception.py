"""BN-Inception (Ioffe & Szegedy 2015): no dropout, no auxiliary head, faster decay.

The BN paper trains with lr 0.045 (its BN-x5 variant), decays it 6x faster than
GoogLeNet and drops dropout; SGD with momentum as in GoogLeNet.
"""

from configs import common


def get_config(preset: str = ""):
    c = common.base_config("bn_inception", image_size=224)
    c.model.aux_logits = False  # BN-Inception has no auxiliary classifier
    c.model.dropout_rate = 0.0
    c.optimizer = "sgd"
    c.label_smoothing = 0.0
    c.grad_clip_norm = 0.0
    c.lr_decay_factor = 0.94
    c.lr_decay_epochs = 1.33
    return common.apply_preset(c, preset)
