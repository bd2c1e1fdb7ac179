"""GoogLeNet (Inception v1): SGD momentum 0.9, lr -4% every 8 epochs, aux heads weighted 0.3.

`--config.model.layout=torchvision` selects the layout of torchvision's / TF-slim's
weights (3x3 in the "5x5" branches), e.g. for fine-tuning converted weights.
"""

from configs import common


def get_config(preset: str = ""):
    c = common.base_config("inception_v1", image_size=224)
    c.model.layout = "paper"  # paper (true 5x5) | torchvision (3x3)
    c.model.dropout_rate = 0.4  # paper: 40% dropout before the classifier
    c.model.aux_dropout_rate = 0.7
    c.optimizer = "sgd"
    c.learning_rate = 0.01
    c.lr_decay_factor = 0.96
    c.lr_decay_epochs = 8.0
    c.warmup_epochs = 0.0
    c.label_smoothing = 0.0
    c.grad_clip_norm = 0.0
    c.aux_loss_weight = 0.3
    c.ema_decay = 0.0  # the paper evaluates the raw weights (Polyak averaging was optional)
    return common.apply_preset(c, preset)
