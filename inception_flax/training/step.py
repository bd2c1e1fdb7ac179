"""The losses and the compiled steps: training (data parallel) and evaluation.

Each step is a pmap-style per-device function (named-axis collectives over
`AXIS`) compiled as `jax.jit(jax.shard_map(...))` over the 1-D mesh of every
device of every process.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import optax

from inception_flax import models, optim
from inception_flax.training.mesh import AXIS
from inception_flax.training.state import TrainState, state_specs


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Mean softmax cross-entropy against label-smoothed one-hot targets."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def mean_value_and_grad(loss_fn, params: Any) -> tuple[Any, Any]:
    """Inside the per-device step: this device's (loss, aux) and the devices' mean gradient.

    The gradient is taken per device, then averaged with `pmean`, as under pmap.
    Differentiating the replicated `params` directly would make shard_map sum the
    devices' gradients implicitly: a gradient `device_count` times the mean's.
    """
    out, grads = jax.value_and_grad(loss_fn, has_aux=True)(
        jax.lax.pcast(params, AXIS, to="varying"))
    return out, jax.lax.pmean(grads, AXIS)


def make_train_step(model: models.InceptionNet, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh, state: TrainState):
    """`step(state, batch) -> (state, metrics)`, data parallel over `mesh`."""
    smoothing, aux_weight = config.label_smoothing, config.aux_loss_weight
    l2 = config.weight_decay if config.optimizer != "adamw" else 0.0
    ema_decay, skip_nonfinite = config.ema_decay, config.nonfinite == "skip"

    def per_device(state: TrainState, batch: dict[str, jax.Array]):
        device = jax.lax.axis_index(AXIS)
        rng = jax.random.fold_in(jax.random.fold_in(
            jax.random.wrap_key_data(state.rng), state.step), device)
        stats = jax.tree.map(lambda x: x[0], state.batch_stats)
        images, labels = batch["image"], batch["label"]

        def loss_fn(params):
            logits, new = model.apply(
                {"params": params, "batch_stats": stats}, images, train=True,
                mutable=["batch_stats", "intermediates"], rngs={"dropout": rng})
            main = cross_entropy(logits, labels, smoothing)
            aux = sum((cross_entropy(a, labels, smoothing) for a in models.aux_logits_of(new)),
                      jnp.zeros(()))
            total = main + aux_weight * aux + (l2 * optim.l2_loss(params) if l2 else 0.0)
            return total, (new["batch_stats"], logits, main, aux)

        (loss, (new_stats, logits, main, aux)), grads = mean_value_and_grad(
            loss_fn, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        update_norm = optax.global_norm(updates)  # non-finite even when the gradient is not
        metrics = jax.lax.pmean({
            "loss": loss, "main_loss": main, "aux_loss": aux,
            "top1": jnp.mean(jnp.argmax(logits, -1) == labels),
        }, AXIS)
        finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(update_norm))
        metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step),
                       finite=finite.astype(jnp.float32))
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            batch_stats=jax.tree.map(lambda x: x[None], new_stats),
            ema_params=(optim.ema_update(state.ema_params, params, state.step, ema_decay)
                        if state.ema_params is not None else None))
        if skip_nonfinite:  # keep the old weights, move on to the next batch
            new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                                     new_state, state.replace(step=state.step + 1))
        return new_state, metrics

    specs = state_specs(state)
    step = jax.shard_map(per_device, mesh=mesh, in_specs=(specs, P(AXIS)),
                         out_specs=(specs, P()))
    return jax.jit(step, donate_argnums=0)


def make_eval_step(model: models.InceptionNet, mesh: jax.sharding.Mesh):
    """`eval_step(params, batch_stats, batch) -> sums` of loss, top-1, top-5, count."""
    def per_device(params, stats, batch):
        logits = model.apply({"params": params, "batch_stats": stats}, batch["image"])
        labels, mask = batch["label"], batch["mask"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        top5 = jnp.any(jax.lax.top_k(logits, min(5, logits.shape[-1]))[1] == labels[:, None], -1)
        sums = {"loss": jnp.sum(loss * mask),
                "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
                "top5": jnp.sum(top5 * mask), "count": jnp.sum(mask)}
        return jax.lax.psum(sums, AXIS)

    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(AXIS)),
                                 out_specs=P()))
