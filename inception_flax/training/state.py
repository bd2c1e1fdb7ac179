"""The training state: its layout over the devices, its creation, and what checkpoints hold.

BN statistics are kept per device (a leading device axis, sharded over the mesh)
between reconciliations, which average them; everything else is replicated. A
checkpoint holds one copy of the statistics, so a run resumes on any number of
devices.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import optax

from inception_flax import models
from inception_flax.training.mesh import AXIS


@flax.struct.dataclass
class TrainState:
    """Everything a step updates and a checkpoint restores."""

    step: jax.Array
    params: Any
    batch_stats: Any  # leading device axis: per-device statistics between reconciliations
    opt_state: Any
    ema_params: Any  # None when no moving average is kept
    rng: jax.Array  # raw uint32 key


def state_specs(state: Any) -> Any:
    """PartitionSpecs: everything replicated but the per-device BN statistics."""
    def spec(path, _):
        return P(AXIS) if getattr(path[0], "name", None) == "batch_stats" else P()
    return jax.tree_util.tree_map_with_path(spec, state)


def init_variables(model: models.InceptionNet, rng: jax.Array, image_size: int) -> Any:
    """Initial params / batch_stats; compiled with light optimisation (it runs once)."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    init = jax.jit(functools.partial(model.init, train=False))
    compiled = init.lower(jax.random.wrap_key_data(rng), images).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return compiled(jax.random.wrap_key_data(rng), images)


def _placed(build, mesh: jax.sharding.Mesh, *args) -> TrainState:
    """Run `build(*args) -> TrainState` as one program, straight into its shardings."""
    abstract = jax.eval_shape(build, *args)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(abstract))
    return jax.jit(build, out_shardings=shardings)(*args)


def _per_device(batch_stats: Any, n: int) -> Any:
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), batch_stats)


def create_state(params: Any, batch_stats: Any, tx: optax.GradientTransformation,
                 ema: bool, rng: jax.Array, mesh: jax.sharding.Mesh) -> TrainState:
    """Step 0's state from initial variables, placed on the mesh."""
    def build(params, batch_stats, rng):
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params,
            batch_stats=_per_device(batch_stats, mesh.devices.size),
            opt_state=tx.init(params),
            ema_params=jax.tree.map(jnp.copy, params) if ema else None, rng=rng)
    return _placed(build, mesh, params, batch_stats, rng)


@jax.jit
def mean_stats(batch_stats: Any) -> Any:
    """One copy of the BN statistics: the average over devices, replicated."""
    return jax.tree.map(lambda x: x.mean(0), batch_stats)


def checkpoint_view(state: TrainState) -> dict[str, Any]:
    """What a checkpoint holds: one copy of the BN statistics (device-count free)."""
    return {"step": state.step, "params": state.params,
            "batch_stats": mean_stats(state.batch_stats),
            "opt_state": state.opt_state, "ema_params": state.ema_params, "rng": state.rng}


def abstract_checkpoint_view(state: TrainState, mesh: jax.sharding.Mesh) -> Any:
    """Shapes, dtypes and (replicated) shardings to restore a checkpoint of `state` into."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
        jax.eval_shape(checkpoint_view, state))


def from_checkpoint_view(view: dict[str, Any], mesh: jax.sharding.Mesh) -> TrainState:
    """The training state of a restored checkpoint, placed on the mesh."""
    def build(view):
        return TrainState(
            step=view["step"], params=view["params"],
            batch_stats=_per_device(view["batch_stats"], mesh.devices.size),
            opt_state=view["opt_state"], ema_params=view["ema_params"], rng=view["rng"])
    return _placed(build, mesh, view)


def make_reconcile(state: TrainState):
    """Average per-device BN statistics, so all devices (and checkpoints) agree."""
    def reconcile(state: TrainState) -> TrainState:
        stats = jax.tree.map(lambda x: jnp.broadcast_to(x.mean(0, keepdims=True), x.shape),
                             state.batch_stats)
        return state.replace(batch_stats=stats)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(reconcile, out_shardings=shardings)
