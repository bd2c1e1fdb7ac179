"""Checks of a run's config, before anything compiles, and the errors a run reports.

A bad config is one `ConfigError` line naming the field and the fix. `check_config`
needs neither data nor devices (the sweep runner checks every run's config with
it); `check_devices` checks the batch against the devices and processes;
`durations` turns epochs into steps once the split size is known.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections

from inception_flax import kernels, models, optim
from inception_flax.data import sharding
from inception_flax.training.mesh import AXIS

if TYPE_CHECKING:
    from inception_flax.data.info import DataInfo


class ConfigError(ValueError):
    """A configuration problem, reported in one line before anything compiles."""


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient with `nonfinite="stop"`: the run stops."""


def model_overrides(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """`models.create_model` keyword arguments from `config.model` (minus `name`)."""
    kw = {k: v for k, v in config.model.items() if k != "name"}
    scale, scales = kw.pop("residual_scale", None), kw.pop("residual_scales", None)
    if scale is not None or scales is not None:
        kw["residual_scale"] = scale if scale is not None else tuple(scales)
    if "dtype" in kw:
        if kw["dtype"] not in ("float32", "bfloat16", "float64"):
            raise ConfigError(
                f"model.dtype must be float32, bfloat16 or float64, got {kw['dtype']!r}")
        if kw["dtype"] == "float64":  # numerical checks: float64 parameters too
            if not jax.config.jax_enable_x64:
                raise ConfigError("model.dtype=float64 needs 64-bit JAX: set JAX_ENABLE_X64=1")
            kw["param_dtype"] = jnp.float64
        kw["dtype"] = jnp.dtype(kw["dtype"])
    if config.sync_batch_norm:
        kw["axis_name"] = AXIS
    kw["num_classes"] = num_classes
    return kw


def _choice(config, field: str, allowed: tuple[str, ...]) -> None:
    if config[field] not in allowed:
        raise ConfigError(f"{field} must be one of {', '.join(allowed)}, got {config[field]!r}")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Everything that can be checked without data or devices."""
    try:
        name = models.canonical_name(config.model.name)
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
    try:
        kernels.check(config.kernels)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:  # the model's own checks of its fields (a module definition: nothing runs)
        models.create_model(name, **model_overrides(config, max(config.dataset.num_classes, 1)))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    minimum = models.min_image_size(name)
    if config.image_size < minimum:
        raise ConfigError(
            f"image_size={config.image_size} is below {name}'s minimum of {minimum}: "
            f"set --config.image_size={minimum} or more")
    _choice(config, "optimizer", optim.OPTIMIZERS)
    _choice(config, "lr_schedule", optim.SCHEDULES)
    _choice(config, "nonfinite", ("stop", "skip"))
    for field in ("batch_size", "eval_batch_size", "log_every_steps", "eval_every_steps",
                  "checkpoint_every_steps", "keep_checkpoints", "grad_accum_steps"):
        if config[field] <= 0:
            raise ConfigError(f"{field} must be positive, got {config[field]}")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must lie in [0, 1), got {config.label_smoothing}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"ema_decay must lie in [0, 1), got {config.ema_decay}")


def check_devices(config: ml_collections.ConfigDict) -> None:
    """The global batches divide across the devices and processes (and input shards)."""
    n, procs = jax.device_count(), jax.process_count()
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % n:
            raise ConfigError(
                f"{field}={config[field]} does not divide evenly across {n} devices: "
                f"use a multiple of {n}")
        if config[field] % procs:
            raise ConfigError(f"{field}={config[field]} does not divide across {procs} processes")
    if config.batch_size % (n * config.grad_accum_steps):
        raise ConfigError(
            f"grad_accum_steps={config.grad_accum_steps} does not divide the per-device batch "
            f"{config.batch_size // n}: use a divisor of it, or batch_size a multiple of "
            f"{n * config.grad_accum_steps}")
    shards = sharding.input_shards(config)
    if shards % procs or config.batch_size % shards:
        raise ConfigError(
            f"dataset.input_shards={shards} must be a multiple of the {procs} processes and "
            f"divide batch_size={config.batch_size}")


def durations(config: ml_collections.ConfigDict, info: DataInfo) -> tuple[int, int]:
    """(steps_per_epoch, num_train_steps) from the config and the split size."""
    steps_per_epoch = config.steps_per_epoch
    if steps_per_epoch <= 0:
        if info.train_examples is None:
            raise ConfigError(
                f"the size of {config.dataset.name}:{config.dataset.train_split} is unknown: "
                "set --config.steps_per_epoch (and --config.num_train_steps)")
        steps_per_epoch = max(1, info.train_examples // config.batch_size)
    num_steps = config.num_train_steps
    if num_steps <= 0:
        num_steps = int(math.ceil(config.num_epochs * steps_per_epoch))
    return steps_per_epoch, num_steps
