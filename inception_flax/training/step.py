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


def accumulate(fn, batch: dict[str, jax.Array], k: int) -> Any:
    """Inside the per-device step: the mean of `fn(i, micro_batch_i)` over the `k`
    micro-batches of this device's `batch` (consecutive blocks of `batch_size / k` rows).

    The micro-batches run one after another (a scan), so one micro-batch's activations
    are alive at a time: the step's temporaries fall with `k`, the global batch does not.
    """
    micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)
    shapes = jax.eval_shape(fn, 0, jax.tree.map(lambda x: x[0], micro))
    # The running sums vary by device, as the terms added to them do.
    zeros = jax.lax.pcast(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                          AXIS, to="varying")

    def add(total, xs):
        return jax.tree.map(jnp.add, total, fn(*xs)), None
    total, _ = jax.lax.scan(add, zeros, (jnp.arange(k), micro))
    return jax.tree.map(lambda t: t / k, total)


def make_train_step(model: models.InceptionNet, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh, state: TrainState):
    """`step(state, batch) -> (state, metrics)`, data parallel over `mesh`.

    With `config.grad_accum_steps = K > 1`, each device's share of the global batch
    runs as K micro-batches in sequence (`accumulate`), inside this one compiled step:
    their gradients and metrics are averaged (then over the devices), and the
    optimizer, the moving average, the step counter and hence the learning-rate
    schedule, logging, checkpoints and the input position all advance once per step.
    A preemption therefore never lands mid-accumulation: a checkpoint holds completed
    updates only. The step computes what K times more devices compute on the same
    global batch: micro-batch j of device d normalises with its own batch statistics
    and draws dropout key `d * K + j`, as device `d * K + j` of a K-times-larger mesh
    (whose per-device shares are these micro-batches) would.
    """
    smoothing, aux_weight = config.label_smoothing, config.aux_loss_weight
    l2 = config.weight_decay if config.optimizer != "adamw" else 0.0
    ema_decay, skip_nonfinite = config.ema_decay, config.nonfinite == "skip"
    accum = config.grad_accum_steps

    def per_device(state: TrainState, batch: dict[str, jax.Array]):
        device = jax.lax.axis_index(AXIS)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        stats = jax.tree.map(lambda x: x[0], state.batch_stats)
        # Differentiated per device, averaged below (see `mean_value_and_grad`).
        varying_params = jax.lax.pcast(state.params, AXIS, to="varying")

        def micro_step(index, micro: dict[str, jax.Array]):
            """One micro-batch: its loss gradient, updated BN statistics and metrics."""
            rng = jax.random.fold_in(key, device * accum + index)
            images, labels = micro["image"], micro["label"]

            def loss_fn(params):
                logits, new = model.apply(
                    {"params": params, "batch_stats": stats}, images, train=True,
                    mutable=["batch_stats", "intermediates"], rngs={"dropout": rng})
                main = cross_entropy(logits, labels, smoothing)
                aux = sum((cross_entropy(a, labels, smoothing)
                           for a in models.aux_logits_of(new)), jnp.zeros(()))
                total = main + aux_weight * aux + (l2 * optim.l2_loss(params) if l2 else 0.0)
                return total, (new["batch_stats"], logits, main, aux)

            (loss, (new_stats, logits, main, aux)), grads = jax.value_and_grad(
                loss_fn, has_aux=True)(varying_params)
            return grads, new_stats, {
                "loss": loss, "main_loss": main, "aux_loss": aux,
                "top1": jnp.mean(jnp.argmax(logits, -1) == labels)}

        if accum == 1:
            grads, new_stats, metrics = micro_step(0, batch)
        else:
            # BN running statistics: every micro-batch updates the step's starting
            # statistics, and the K results are averaged. K devices each update their
            # own copy from the same start, and checkpoints, evaluation and
            # reconciliation see the devices' mean, which equals this average (the
            # update is linear). Chaining the K updates in sequence instead would weight
            # the micro-batches unequally (momentum^(K-1-j)): not what K devices give.
            grads, new_stats, metrics = accumulate(micro_step, batch, accum)
        grads = jax.lax.pmean(grads, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        update_norm = optax.global_norm(updates)  # non-finite even when the gradient is not
        metrics = jax.lax.pmean(metrics, AXIS)
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
            kept = state.replace(step=state.step + 1,
                                 opt_state=optim.advance_schedule(state.opt_state, opt_state))
            new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, kept)
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
