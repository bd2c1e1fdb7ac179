"""The one setup of a run, shared by the trainer, the evaluator and the benchmark.

`setup(config)` checks the config against the devices and the data, resolves the
kernels, builds the model, the mesh, the schedule and optimizer and the initial
training state (from `init_from` when given), in that order: every check that
can fail on a bad config runs before anything compiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from inception_flax import checkpoint as ckpt_lib
from inception_flax import kernels, models, optim, pretrained
from inception_flax.data.info import DataInfo, data_info
from inception_flax.models.ops import PLAIN, Ops
from inception_flax.training import checks
from inception_flax.training.checks import ConfigError
from inception_flax.training.mesh import create_mesh
from inception_flax.training.state import TrainState, create_state, init_variables

# Synthetic data (the benchmark): the schedule's epoch, unless the config states
# steps_per_epoch.
SYNTHETIC_STEPS_PER_EPOCH = 1000


@dataclasses.dataclass(frozen=True)
class Setup:
    """What `setup` built: everything a run needs before its first step."""

    config: ml_collections.ConfigDict
    info: DataInfo | None  # None for synthetic data (`num_classes` given to `setup`)
    num_classes: int
    steps_per_epoch: int
    num_steps: int
    model: models.InceptionNet
    mesh: jax.sharding.Mesh
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    state: TrainState | None  # None when `setup(..., init_state=False)`


def run_identity(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """The fields that shape a run's checkpoints: a resume must not change them."""
    m = config.model
    return {"model": models.canonical_name(m.name), "num_classes": num_classes,
            "depth_multiplier": m.depth_multiplier, "aux_logits": m.get("aux_logits"),
            "layout": m.get("layout"), "optimizer": config.optimizer,
            "grad_clipping": config.grad_clip_norm > 0, "ema": config.ema_decay > 0}


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 ops: Ops = PLAIN) -> models.InceptionNet:
    """The configured network with `num_classes` outputs, computed with `ops`."""
    try:
        return models.create_model(config.model.name, ops=ops,
                                   **checks.model_overrides(config, num_classes))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def setup(config: ml_collections.ConfigDict, *, num_classes: int | None = None,
          workdir: str | None = None, init_state: bool = True) -> Setup:
    """Check `config`, then build the model, mesh, optimizer and initial state.

    Args:
        config: the run's config (`configs/<network>.py` with its overrides).
        num_classes: synthetic data: the number of classes, and no dataset is read
            (`info` is None; an epoch is `config.steps_per_epoch` steps, or
            `SYNTHETIC_STEPS_PER_EPOCH`). None: read them from the dataset.
        workdir: training: refuse (`checkpoint.RunMismatchError`) a workdir that
            holds another run, or record this run's identity in a new one.
        init_state: False: no initial variables or state (`state` is None), for
            evaluating restored weights.

    Raises:
        ConfigError: a bad config, in one line, before anything compiles.
    """
    checks.check_config(config)
    checks.check_devices(config)
    if num_classes is None:
        info = data_info(config)
        num_classes = info.num_classes
        steps_per_epoch, num_steps = checks.durations(config, info)
    else:
        info = None
        epoch = DataInfo(num_classes, SYNTHETIC_STEPS_PER_EPOCH * config.batch_size, None)
        steps_per_epoch, num_steps = checks.durations(config, epoch)
    if workdir is not None:
        ckpt_lib.check_run_identity(workdir, run_identity(config, num_classes))
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)

    try:
        ops = kernels.resolve(config.kernels)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    model = create_model(config, num_classes, ops)
    mesh = create_mesh()
    logging.info("process %d of %d, %d devices (%d here)", jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.local_device_count())
    schedule = optim.learning_rate_schedule(config, steps_per_epoch, num_steps)
    tx = optim.create_optimizer(config, schedule)
    state = _initial_state(config, model, tx, mesh) if init_state else None
    return Setup(config=config, info=info, num_classes=num_classes,
                 steps_per_epoch=steps_per_epoch, num_steps=num_steps, model=model, mesh=mesh,
                 schedule=schedule, tx=tx, state=state)


def _initial_state(config: ml_collections.ConfigDict, model: models.InceptionNet,
                   tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> TrainState:
    """Step 0: fresh variables, or `init_from`'s weights where they fit (heads reset)."""
    source = None
    if config.init_from:  # shapes checked before anything compiles
        try:
            source = pretrained.restore_variables(config.init_from)
        except (FileNotFoundError, ValueError) as e:  # one line naming init_from
            raise ConfigError(str(e).splitlines()[0] if str(e) else
                              f"init_from={config.init_from}: {type(e).__name__}") from None
        _merge(jax.eval_shape(lambda: model.init(
            jax.random.key(0), jnp.zeros((1, config.image_size, config.image_size, 3)),
            train=False)), source)
    init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
    variables = init_variables(model, jax.random.key_data(init_rng), config.image_size)
    if source is not None:
        variables, reset = _merge(variables, source)
        logging.info("init_from %s; re-initialised heads: %s", config.init_from,
                     ", ".join(reset) or "none")
    return create_state(variables["params"], variables.get("batch_stats", {}), tx,
                        config.ema_decay > 0, jax.random.key_data(state_rng), mesh)


def _merge(target: Any, source: Any) -> tuple[Any, list[str]]:
    try:
        return pretrained.merge_pretrained(flax.core.unfreeze(target), source)
    except ValueError as e:
        raise ConfigError(str(e)) from None
