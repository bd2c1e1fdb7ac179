"""Learning-rate schedules, optimizers and the parameter moving average.

Everything a user tunes comes from the config: see `configs/common.py` for the
fields and their meaning.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("rmsprop", "sgd", "adamw")
SCHEDULES = ("exponential", "cosine", "constant")


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                           num_train_steps: int) -> optax.Schedule:
    """Linear warm-up, then staircase exponential decay (or cosine / constant).

    The exponential schedule is the papers': lr x `lr_decay_factor` every
    `lr_decay_epochs` epochs, counted from the end of the warm-up.
    """
    base = config.learning_rate
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.lr_schedule == "exponential":
        decay = optax.exponential_decay(
            base, transition_steps=max(1, int(round(config.lr_decay_epochs * steps_per_epoch))),
            decay_rate=config.lr_decay_factor, staircase=True)
    elif config.lr_schedule == "cosine":
        decay = optax.cosine_decay_schedule(base, max(1, num_train_steps - warmup))
    else:
        decay = optax.constant_schedule(base)
    if warmup == 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, base, warmup), decay], boundaries=[warmup])


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
    """Gradient clipping followed by the configured optimizer.

    RMSProp follows the TF reference: mean-square accumulator starting at 1,
    epsilon inside the square root, momentum applied after the learning rate.
    Weight decay is an L2 term of the loss (see `l2_loss`), not part of the
    update, except for `adamw`, whose decoupled decay uses the same mask.
    """
    if config.optimizer == "rmsprop":
        tx = optax.rmsprop(schedule, decay=config.rmsprop_decay, eps=config.rmsprop_epsilon,
                           initial_scale=1.0, momentum=config.momentum or None)
    elif config.optimizer == "sgd":
        tx = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
    else:
        tx = optax.adamw(schedule, weight_decay=config.weight_decay, mask=kernel_mask)
    if config.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx


def kernel_mask(params: Any) -> Any:
    """True for convolution and dense kernels: the weights that weight decay applies to."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def l2_loss(params: Any) -> jax.Array:
    """Half the sum of squares of every kernel (TF's `l2_loss` convention)."""
    leaves = [x for x, keep in zip(jax.tree.leaves(params), jax.tree.leaves(kernel_mask(params)))
              if keep]
    return 0.5 * sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """TF's ExponentialMovingAverage with `num_updates`: decay min(d, (1+t)/(10+t)).

    `params` are the weights after the optimizer's update and `step` the number
    of updates before it (the train state's `step` as the step begins). TF
    applies the average after the optimizer's update, whose `global_step` has
    already counted it: `num_updates` t is `step + 1`.
    """
    t = step.astype(jnp.float32) + 1.0
    d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def advance_schedule(kept: Any, updated: Any) -> Any:
    """The optimizer state `kept`, with the learning-rate schedule's step count of `updated`.

    A dropped (non-finite) update keeps the old optimizer state, but the schedule
    still follows the train state's step, as the logged learning rate does.
    """
    def is_schedule(x):
        return isinstance(x, optax.ScaleByScheduleState)

    return jax.tree.map(lambda k, u: u if is_schedule(k) else k, kept, updated,
                        is_leaf=is_schedule)
