"""The fields every experiment has, with the Inception v3 / v4 paper recipe as defaults.

Each network's config file (`configs/<network>.py`) starts from `base_config()`,
sets its model and recipe, and accepts a preset argument after a colon:
`--config=configs/inception_resnet_v2.py:digits` trains on the embedded digits
dataset in minutes on a CPU. Any field can be overridden on the command line,
e.g. `--config.learning_rate=0.01 --config.model.residual_scale=0.2`.
"""

import ml_collections
from ml_collections import config_dict


def base_config(model_name: str, image_size: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds parameter init, dropout, data order and augmentation

    # ---- Model: every field except `name` is passed to create_model(). ----
    c.model = ml_collections.ConfigDict()
    c.model.name = model_name
    c.model.aux_logits = True  # train the auxiliary head(s)
    c.model.dropout_rate = 0.2  # before the classifier (TF reference: keep 0.8)
    c.model.bn_momentum = 0.9997  # BatchNorm moving-average decay (TF reference)
    c.model.bn_epsilon = 1e-3
    c.model.depth_multiplier = 1.0  # TF-slim width multiplier
    c.model.remat = False  # recompute repeated blocks in the backward pass (saves memory)
    # Recompute BatchNorm + ReLU in the backward pass: less memory, and faster on a GPU
    # (README, "On a GPU"); the native CPU BatchNorm keeps little anyway and ignores it.
    c.model.bn_remat = True
    c.model.merge_pointwise = True  # sibling 1x1 convolutions on one input as one (same result)
    c.model.scan_unroll = 1  # repeated blocks per loop iteration; >= their count: no loop
    c.model.dtype = "float32"  # compute: float32 | bfloat16 (params stay float32) | float64
    # (float64 params too, with JAX_ENABLE_X64=1: for numerical checks)
    # Which forms of convolution, BatchNorm and pools the model runs: auto | native |
    # xla_cpu | plain. auto: native on a CPU where they build (else xla_cpu), plain on
    # GPU / TPU. Not part of a run's identity: a run may resume with another choice.
    c.kernels = "auto"

    # ---- Data (TFDS name, or folder:/path with root/<split>/<label>/*.jpg). ----
    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "imagenet2012"
    c.dataset.data_dir = config_dict.placeholder(str)  # TFDS data_dir (None: TFDS default)
    c.dataset.train_split = "train"
    c.dataset.eval_split = "validation"
    c.dataset.num_classes = -1  # -1: read from the dataset's metadata
    c.dataset.prepare = False  # run download_and_prepare (datasets whose source ships locally)
    c.dataset.shuffle_buffer = 16_384
    c.dataset.area_range = (0.05, 1.0)  # distorted bounding-box crop: fraction of the area
    c.dataset.aspect_ratio_range = (0.75, 1.33)  # ... and its width / height
    c.dataset.random_flip = True
    c.dataset.central_fraction = 0.875  # evaluation central crop
    c.dataset.threadpool_size = 0  # private tf.data threads (0: shared pool)
    # Shards of the train split per global batch (0: one per process). A fixed N
    # (a multiple of the process count) gives the same batches on any number of hosts.
    c.dataset.input_shards = 0
    c.image_size = image_size

    # ---- Durations: steps, or epochs when the split size is known. ----
    c.batch_size = 1600  # global; the papers: 32 per replica x 50 replicas
    c.eval_batch_size = 200  # global
    # Micro-batches per update: each device runs its share of the global batch as K
    # micro-batches in sequence and averages their gradients, then one optimizer step
    # (memory of batch / K, result of batch; BN statistics per micro-batch, as on K times
    # more devices). Steps, schedule and checkpoints count updates.
    c.grad_accum_steps = 1
    c.num_epochs = 100.0
    c.num_train_steps = -1  # > 0 overrides num_epochs
    c.steps_per_epoch = -1  # -1: split size / batch_size (state it when the size is unknown)
    c.num_eval_steps = -1  # -1: the whole eval split

    # ---- Optimisation (Inception v3 paper). ----
    c.optimizer = "rmsprop"  # rmsprop | sgd | adamw
    c.learning_rate = 0.045
    c.lr_schedule = "exponential"  # exponential | cosine | constant
    c.warmup_epochs = 2.0  # linear warm-up from 0
    c.lr_decay_factor = 0.94  # exponential: multiply by this ...
    c.lr_decay_epochs = 2.0  # ... every this many epochs (staircase)
    c.momentum = 0.9
    c.nesterov = False  # sgd only
    c.rmsprop_decay = 0.9
    c.rmsprop_epsilon = 1.0
    c.grad_clip_norm = 2.0  # global-norm clipping; 0 disables
    c.weight_decay = 4e-5  # L2 on conv / dense kernels
    c.label_smoothing = 0.1  # on the main and auxiliary losses
    c.aux_loss_weight = 0.4  # per auxiliary head
    c.ema_decay = 0.9999  # moving average of parameters for evaluation; 0 disables
    c.sync_batch_norm = False  # True: BN statistics over the global batch; False: per device
    c.nonfinite = "stop"  # non-finite loss or gradient: stop (keep last checkpoint) | skip

    # ---- Logging and checkpoints. ----
    c.log_every_steps = 100
    c.eval_every_steps = 5000  # also at the end
    c.checkpoint_every_steps = 1000  # also at the end and on SIGTERM
    c.keep_checkpoints = 3
    c.async_checkpointing = False  # write checkpoints in a background thread (see README)
    c.init_from = config_dict.placeholder(str)  # converted weights or a run's workdir
    c.profile_steps = 0  # > 0: write a profiler trace of this many steps after step 10
    c.compilation_cache_dir = config_dict.placeholder(str)  # JAX persistent cache
    c.log_input_images = True  # image summary of the first augmented batch
    return c


def apply_preset(c: ml_collections.ConfigDict, preset: str | None) -> ml_collections.ConfigDict:
    """Named presets: '' (the paper recipe) or 'digits' (the embedded quickstart)."""
    if not preset:
        return c
    if preset != "digits":
        raise ValueError(f"unknown preset {preset!r}: use '' or 'digits'")
    # The 8x8 digits (upsampled to 32x32), 1,437 train / 360 test images, 10 classes,
    # at the network's minimum resolution and quarter width: minutes on a 2-core CPU.
    c.dataset.name = "inception_digits"
    c.dataset.prepare = True
    c.dataset.train_split = "train"
    c.dataset.eval_split = "test"
    c.dataset.shuffle_buffer = 2048
    c.dataset.area_range = (0.5, 1.0)
    c.dataset.random_flip = False  # digits are not mirror-symmetric
    c.dataset.central_fraction = 1.0
    c.image_size = 75 if c.image_size > 224 else 64
    c.model.depth_multiplier = 0.25
    c.model.bn_momentum = 0.9
    c.batch_size = 32
    c.eval_batch_size = 120
    c.num_epochs = 8.0
    # RMSProp as in the paper, with a larger step and no clipping: with the paper's
    # lr and clipping at 2.0 this small-batch run learns several times more slowly.
    c.learning_rate = 0.1
    c.grad_clip_norm = 0.0
    c.warmup_epochs = 1.0
    c.lr_decay_epochs = 1.0
    c.lr_decay_factor = 0.9
    c.ema_decay = 0.99
    c.log_every_steps = 44
    c.eval_every_steps = 176
    c.checkpoint_every_steps = 176
    return c
