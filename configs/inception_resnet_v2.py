"""Inception-ResNet v2 (Inception-v4 paper): RMSProp recipe, residual scales 0.17 / 0.10 / 0.20."""

from ml_collections import config_dict

from configs import common


def get_config(preset: str = ""):
    c = common.base_config("inception_resnet_v2", image_size=299)
    c.model.residual_scale = config_dict.placeholder(float)  # one scale for every block type
    c.model.residual_scales = (0.17, 0.10, 0.20)  # Block35, Block17, Block8 (TF reference)
    return common.apply_preset(c, preset)


def get_sweep(name: str):
    """Named sweeps for `python sweep.py --config=configs/inception_resnet_v2.py[:preset]`."""
    from inception_flax.sweep import product, select, zip  # pylint: disable=redefined-builtin
    return select(name, {
        # The paper's residual scaling (it keeps the wide networks stable: 0.1 to 0.3),
        # with and without label smoothing: 6 runs.
        "residual_scale": product(residual_scale=[0.1, 0.17, 0.3],
                                  label_smoothing=[0.0, 0.1]),
        # One scale for every block type (the reference: 0.17 / 0.10 / 0.20 per type).
        "scale_only": product(residual_scale=[0.1, 0.17, 0.3]),
        # Peak learning rate, around the paper's 0.045 and the digits preset's 0.1.
        "learning_rate": product(learning_rate=[0.02, 0.045, 0.1]),
        # Batch size with the learning rate scaled linearly alongside it (digits: 32 / 0.1).
        "batch_lr": zip(batch_size=[16, 32, 64], learning_rate=[0.05, 0.1, 0.2]),
        # Two runs that move scale, smoothing and learning rate together: a quick check
        # of the sweep machinery and of TensorBoard's HParams view.
        "smoke": zip(residual_scale=[0.1, 0.3], label_smoothing=[0.0, 0.1],
                     learning_rate=[0.02, 0.01]),
    })
