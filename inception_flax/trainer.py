"""Data-parallel training and evaluation of the Inception networks.

The update step is a pmap-style per-device function (named-axis collectives)
compiled as `jax.jit(jax.shard_map(...))` over a 1-D mesh of every device of
every process. Sections, in the order a batch travels: Config checks, Mesh,
Input, Model and state, Update step, Evaluation, Checkpoints and init_from,
Loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from absl import logging
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from inception_flax import checkpoint as ckpt_lib
from inception_flax import models, optim
from inception_flax.models import layers

# TensorFlow comes in with the input pipeline and clu's writers, imported inside the
# functions that read data or write summaries: the model, state and steps need JAX only
# (benchmark.py runs without TensorFlow where it is not installed).
if TYPE_CHECKING:
    from inception_flax import input_pipeline

AXIS = "batch"
HEAD_MODULES = ("Logits", "AuxLogits", "AuxLogits_4a", "AuxLogits_4d")


class ConfigError(ValueError):
    """A configuration problem, reported in one line before anything compiles."""


class NonFiniteError(FloatingPointError):
    pass


# ----------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------

def model_overrides(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """`create_model` keyword arguments from `config.model` (minus `name`)."""
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


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> models.InceptionNet:
    try:
        return models.create_model(config.model.name, **model_overrides(config, num_classes))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


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
        layers.kernel_choice()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    create_model(config, num_classes=max(config.dataset.num_classes, 1))
    minimum = models.min_image_size(name)
    if config.image_size < minimum:
        raise ConfigError(
            f"image_size={config.image_size} is below {name}'s minimum of {minimum}: "
            f"set --config.image_size={minimum} or more")
    _choice(config, "optimizer", optim.OPTIMIZERS)
    _choice(config, "lr_schedule", optim.SCHEDULES)
    _choice(config, "nonfinite", ("stop", "skip"))
    for field in ("batch_size", "eval_batch_size", "log_every_steps", "eval_every_steps",
                  "checkpoint_every_steps", "keep_checkpoints"):
        if config[field] <= 0:
            raise ConfigError(f"{field} must be positive, got {config[field]}")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must lie in [0, 1), got {config.label_smoothing}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"ema_decay must lie in [0, 1), got {config.ema_decay}")


def check_devices(config: ml_collections.ConfigDict) -> None:
    n, procs = jax.device_count(), jax.process_count()
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % n:
            raise ConfigError(
                f"{field}={config[field]} does not divide evenly across {n} devices: "
                f"use a multiple of {n}")
        if config[field] % procs:
            raise ConfigError(f"{field}={config[field]} does not divide across {procs} processes")
    shards = input_shards(config)
    if shards % procs or config.batch_size % shards:
        raise ConfigError(
            f"dataset.input_shards={shards} must be a multiple of the {procs} processes and "
            f"divide batch_size={config.batch_size}")


@dataclasses.dataclass(frozen=True)
class DataInfo:
    num_classes: int
    train_examples: int | None
    eval_examples: int | None


def data_info(config: ml_collections.ConfigDict) -> DataInfo:
    """Classes and split sizes, with clear errors for a missing split or dataset."""
    from inception_flax import input_pipeline
    d = config.dataset
    try:
        if d.prepare and jax.process_index() == 0:
            try:
                input_pipeline.prepare_dataset(d.name, d.data_dir)
            except Exception:  # noqa: BLE001 - another run preparing the same data_dir
                time.sleep(2.0)  # lost the race to rename its output: theirs is complete
                input_pipeline.prepare_dataset(d.name, d.data_dir)
        if jax.process_count() > 1 and d.prepare:
            multihost_utils.sync_global_devices("dataset prepared")
        builder = input_pipeline.get_builder(d.name, d.data_dir)
    except Exception as e:  # noqa: BLE001 - TFDS raises many kinds
        raise ConfigError(f"dataset.name={d.name!r} cannot be read: {str(e).splitlines()[0]}"
                          ) from None
    if not d.name.startswith(input_pipeline.FOLDER_PREFIX):
        splits = set(builder.info.splits.keys())
        for field in ("train_split", "eval_split"):
            base = d[field].split("[")[0]
            if splits and base not in splits:
                raise ConfigError(
                    f"dataset.{field}={d[field]!r} is not a split of {d.name}: "
                    f"choose one of {', '.join(sorted(splits))}")
    num_classes = d.num_classes if d.num_classes > 0 else input_pipeline.num_classes(
        d.name, d.data_dir)
    if not num_classes:
        raise ConfigError(f"{d.name} does not state its number of classes: "
                          "set --config.dataset.num_classes")
    return DataInfo(
        num_classes=num_classes,
        train_examples=input_pipeline.num_examples(d.name, d.train_split, d.data_dir),
        eval_examples=input_pipeline.num_examples(d.name, d.eval_split, d.data_dir),
    )


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


# ----------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------

def create_mesh() -> jax.sharding.Mesh:
    """All devices on one axis, grouped by process (process 0's first).

    Each process's slice of the global batch is then one contiguous block, in
    process order, and device i of the mesh (its dropout key, its BN statistics)
    sees the same examples whatever the number of processes.
    """
    devices = jax.make_mesh((jax.device_count(),), (AXIS,)).devices.ravel()
    devices = sorted(devices, key=lambda d: d.process_index)  # stable within a process
    return jax.sharding.Mesh(np.array(devices), (AXIS,))


# ----------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------

def preprocessing(config: ml_collections.ConfigDict) -> input_pipeline.Preprocessing:
    from inception_flax import input_pipeline
    d = config.dataset
    return input_pipeline.Preprocessing(
        area_range=tuple(d.area_range), aspect_ratio_range=tuple(d.aspect_ratio_range),
        random_flip=d.random_flip, central_fraction=d.central_fraction)


def input_shards(config: ml_collections.ConfigDict) -> int:
    """How many shards of the train split make up a global batch (0: one per process).

    `dataset.input_shards=N` fixes the data order independently of the number of
    processes: every global batch is the concatenation of one batch of each of N
    shards (shard i is read as if by process i of N), and each process reads its
    N / process_count consecutive shards. Hence 2 processes x 2 devices and
    1 process x 4 devices see the same examples in the same order.
    """
    n = config.dataset.input_shards
    return n if n > 0 else jax.process_count()


class _ShardedIterator:
    """Batches of several shard iterators, concatenated; position saved per shard."""

    def __init__(self, iterators):
        self.iterators = iterators

    def __next__(self):
        batches = [next(it) for it in self.iterators]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def __iter__(self):
        return self

    @staticmethod
    def _path(path: str, i: int) -> str:
        return path if i == 0 else f"{path}_shard{i}"

    def save(self, path: str) -> None:
        for i, it in enumerate(self.iterators):
            it.save(self._path(path, i))

    def restore(self, path: str) -> None:
        for i, it in enumerate(self.iterators):
            it.restore(self._path(path, i))


class _SumCounter:
    def __init__(self, counters):
        self.counters = counters

    @property
    def count(self) -> int:
        return sum(c.count for c in self.counters)


def train_dataset(config: ml_collections.ConfigDict, index: int | None = None,
                  count: int | None = None):
    from inception_flax import input_pipeline
    d = config.dataset
    return input_pipeline.create_split(
        d.name, d.train_split, batch_size=config.batch_size // (count or jax.process_count()),
        image_size=config.image_size, train=True, data_dir=d.data_dir,
        preprocessing=preprocessing(config), shuffle_buffer=d.shuffle_buffer, seed=config.seed,
        threadpool_size=d.threadpool_size or None, process_index=index, process_count=count)


def train_iterator(config: ml_collections.ConfigDict):
    """This process's checkpointable iterator of its slice of each global batch."""
    from inception_flax import input_pipeline
    shards, procs = input_shards(config), jax.process_count()
    if shards == procs:
        ds, skipped = train_dataset(config)
        return input_pipeline.create_checkpointable_iterator(ds), skipped
    per = shards // procs
    parts = [train_dataset(config, index=jax.process_index() * per + i, count=shards)
             for i in range(per)]
    return (_ShardedIterator([input_pipeline.create_checkpointable_iterator(ds)
                              for ds, _ in parts]),
            _SumCounter([c for _, c in parts]))


def eval_dataset(config: ml_collections.ConfigDict, info: DataInfo):
    from inception_flax import input_pipeline
    d = config.dataset
    per_process = config.eval_batch_size // jax.process_count()
    pad_to = None
    if info.eval_examples is not None:
        pad_to = input_pipeline.eval_num_batches(
            info.eval_examples, per_process, jax.process_count())
    return input_pipeline.create_split(
        d.name, d.eval_split, batch_size=per_process, image_size=config.image_size,
        train=False, data_dir=d.data_dir, preprocessing=preprocessing(config),
        threadpool_size=d.threadpool_size or None, pad_to_num_batches=pad_to)


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's slice of the global batch, as one array sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


# ----------------------------------------------------------------------------
# Model and state
# ----------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
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


def from_checkpoint_view(view: dict[str, Any], mesh: jax.sharding.Mesh) -> TrainState:
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


# ----------------------------------------------------------------------------
# Update step
# ----------------------------------------------------------------------------

def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
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


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------

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


def evaluate(eval_step, params, batch_stats, dataset, mesh, num_steps: int = -1
             ) -> dict[str, float]:
    sharding = NamedSharding(mesh, P(AXIS))
    totals: dict[str, float] = {}
    for i, batch in enumerate(dataset.as_numpy_iterator()):
        if 0 < num_steps <= i:
            break
        sums = eval_step(params, batch_stats, to_global(batch, sharding))
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.get("count", 0.0), 1.0)
    return {"top1": totals.get("top1", 0.0) / count, "top5": totals.get("top5", 0.0) / count,
            "loss": totals.get("loss", 0.0) / count, "examples": totals.get("count", 0.0)}


# ----------------------------------------------------------------------------
# Checkpoints and init_from
# ----------------------------------------------------------------------------

def merge_pretrained(target: dict[str, Any], source: dict[str, Any]) -> tuple[Any, list[str]]:
    """Take `source` weights wherever they fit `target`; re-initialise mismatched heads.

    Returns the merged variables and the classifier heads that were reset. Any
    other missing or mis-shaped weight is an error naming every such weight.
    """
    flat_t = flax.traverse_util.flatten_dict(target, sep="/")
    flat_s = flax.traverse_util.flatten_dict(source, sep="/")
    merged, reset, problems = {}, set(), []
    for key, value in flat_t.items():
        head = next((h for h in HEAD_MODULES if key.split("/")[1] == h), None)
        src = flat_s.get(key)
        if src is not None and tuple(np.shape(src)) == tuple(value.shape):
            merged[key] = np.asarray(src, value.dtype)
        elif head is not None:
            merged[key] = value
            reset.add(head)
        elif src is None:
            problems.append(f"{key} missing")
        else:
            problems.append(f"{key} has shape {tuple(np.shape(src))}, needs {tuple(value.shape)}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more"
                                            if len(problems) > 8 else "")
        raise ConfigError(f"init_from weights do not fit {len(problems)} tensors of this "
                          f"model: {shown}. Check model.name, layout and depth_multiplier")
    return flax.traverse_util.unflatten_dict(merged, sep="/"), sorted(reset)


# ----------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------

class _Preemption:
    """SIGTERM asks the loop to checkpoint at the current step and exit.

    One process: a Python SIGTERM handler. Several: JAX's preemption service
    (started by `jax.distributed.initialize`) receives the notice on any process
    and has all of them agree on the step to checkpoint at
    (`multihost_utils.reached_preemption_sync_point`), without a collective per step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if self._multi:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: checkpointing at the current step, then exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self, step: int) -> bool:
        """True on every process at the same step once any process got the notice."""
        if not self._multi:
            return self.requested
        if multihost_utils.reached_preemption_sync_point(step):
            logging.warning("preemption notice: all processes checkpoint at step %d", step)
            return True
        return False


@contextlib.contextmanager
def _closing_on_error(checkpointer: ckpt_lib.Checkpointer):
    """Close (finish writing) the checkpointer when the loop stops on an error."""
    try:
        yield
    except BaseException:
        checkpointer.close()
        raise


def mark_session_start(workdir: str, step: int) -> None:
    """Tell TensorBoard an attempt of the run starts at `step`.

    TensorBoard reads a directory's event files in name order; from the second
    `SessionLog.START` on, it drops every earlier event at or after that START's
    step. So a run killed between its last checkpoint and its death, which logged
    steps that the resumed attempt logs again, shows each step once. The file is
    named to sort after earlier attempts' files (created seconds before) and
    before this attempt's.
    """
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    now = time.time()
    path = os.path.join(workdir, f"events.out.tfevents.{int(now) - 1:010d}.start.{step}")
    with tf.io.TFRecordWriter(path) as f:
        f.write(event_pb2.Event(wall_time=now, file_version="brain.Event:2")
                .SerializeToString())
        f.write(event_pb2.Event(wall_time=now, step=step, session_log=event_pb2.SessionLog(
            status=event_pb2.SessionLog.START)).SerializeToString())


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in flat.items()}


def _image_grid(images: np.ndarray, max_images: int = 16) -> np.ndarray:
    """A square grid of the first images, pixels back in [0, 1]."""
    images = np.asarray(images[:max_images], np.float32)
    n, h, w, c = images.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), np.float32)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = image
    return np.clip((grid + 1.0) / 2.0, 0.0, 1.0)[None]


def run_identity(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """The fields that shape a run's checkpoints: a resume must not change them."""
    m = config.model
    return {"model": models.canonical_name(m.name), "num_classes": num_classes,
            "depth_multiplier": m.depth_multiplier, "aux_logits": m.get("aux_logits"),
            "layout": m.get("layout"), "optimizer": config.optimizer,
            "grad_clipping": config.grad_clip_norm > 0, "ema": config.ema_decay > 0}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (resuming from `workdir` if it holds checkpoints); returns the last eval."""
    from clu import metric_writers, parameter_overview, periodic_actions
    # -- Checks: config, devices, data. Everything before any compile. --
    check_config(config)
    check_devices(config)
    info = data_info(config)
    steps_per_epoch, num_steps = durations(config, info)
    model = create_model(config, info.num_classes)
    ckpt_lib.check_run_identity(workdir, run_identity(config, info.num_classes))
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)

    mesh = create_mesh()
    logging.info("process %d of %d, %d devices (%d here)", jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.local_device_count())
    schedule = optim.learning_rate_schedule(config, steps_per_epoch, num_steps)
    tx = optim.create_optimizer(config, schedule)

    # -- State: fresh, init_from, or resumed. --
    source = None
    if config.init_from:  # shapes checked before anything compiles
        try:
            source = ckpt_lib.restore_variables(config.init_from)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"init_from={config.init_from!r}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from None
        merge_pretrained(flax.core.unfreeze(jax.eval_shape(lambda: model.init(
            jax.random.key(0), jnp.zeros((1, config.image_size, config.image_size, 3)),
            train=False))), source)
    init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
    variables = init_variables(model, jax.random.key_data(init_rng), config.image_size)
    if source is not None:
        variables, reset = merge_pretrained(flax.core.unfreeze(variables), source)
        logging.info("init_from %s; re-initialised heads: %s", config.init_from,
                     ", ".join(reset) or "none")
    state = create_state(variables["params"], variables.get("batch_stats", {}), tx,
                         config.ema_decay > 0, jax.random.key_data(state_rng), mesh)
    del variables

    checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints,
                                        config.async_checkpointing)
    train_iter, skipped = train_iterator(config)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
        jax.eval_shape(checkpoint_view, state))
    restored = checkpointer.restore(abstract)
    if restored is not None:
        step0, view = restored
        state = from_checkpoint_view(view, mesh)
        checkpointer.restore_input(step0, train_iter)
        logging.info("resumed from step %d", step0)
    start = int(jax.device_get(state.step))
    if jax.process_index() == 0 and start < num_steps:
        mark_session_start(workdir, start + 1)
    writer = metric_writers.create_default_writer(  # after mark_session_start: see there
        workdir, just_logging=jax.process_index() > 0, asynchronous=True)

    if start == 0 and jax.process_index() == 0:
        # Hyperparameters, config and parameter table go to TensorBoard only.
        tb = metric_writers.SummaryWriter(workdir)
        tb.write_hparams(_flat_hparams(config))
        tb.write_texts(0, {
            "config": str(config),
            "parameters": parameter_overview.get_parameter_overview(state.params)})
        tb.close()
        logging.info("%s: %s parameters", config.model.name,
                     f"{parameter_overview.count_parameters(state.params):,}")

    train_step = make_train_step(model, tx, schedule, config, mesh, state)
    eval_step = make_eval_step(model, mesh)
    reconcile = make_reconcile(state)
    batch_sharding = NamedSharding(mesh, P(AXIS))

    hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)]
    if config.profile_steps > 0 and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(
            num_profile_steps=config.profile_steps, first_profile=start + 10, logdir=workdir))

    def save(state: TrainState, step: int) -> TrainState:
        state = reconcile(state)
        writer.flush()  # a run killed after this checkpoint keeps every logged step up to it
        checkpointer.save(step, checkpoint_view(state), train_iter)
        return state

    def run_eval(state: TrainState, step: int) -> dict[str, float]:
        state = reconcile(state)
        ds, _ = eval_dataset(config, info)
        params = state.ema_params if state.ema_params is not None else state.params
        stats = mean_stats(state.batch_stats)
        result = evaluate(eval_step, params, stats, ds, mesh, config.num_eval_steps)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()
                                    if k != "examples"})
        logging.info("step %d: eval top-1 %.4f top-5 %.4f on %d examples", step,
                     result["top1"], result["top5"], int(result["examples"]))
        return state, result

    def next_batch() -> dict[str, jax.Array]:
        return to_global(next(train_iter), batch_sharding)

    def check_finite(history: list[tuple[int, dict]]) -> None:
        for step, metrics in history:
            if config.nonfinite == "stop" and metrics["finite"] < 1.0:
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {step}: stopping; the last good "
                    f"checkpoint (step {checkpointer.latest_step()}) is kept. Lower "
                    "learning_rate or set --config.nonfinite=skip")

    result: dict[str, float] = {}
    history: list[tuple[int, Any]] = []
    last_log, last_log_step = time.time(), start
    batch = next_batch() if start < num_steps else None
    if start == 0 and config.log_input_images and batch is not None:
        writer.write_images(0, {"train/input_images": _image_grid(  # what the model sees
            np.asarray(jax.device_get(batch["image"].addressable_shards[0].data)))})

    with _Preemption() as preemption, metric_writers.ensure_flushes(writer), \
            _closing_on_error(checkpointer):
        for step in range(start + 1, num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = train_step(state, batch)
            history.append((step, metrics))
            for hook in hooks:
                hook(step)
            preempted = preemption.agreed(step)
            is_last = step == num_steps
            if step % config.log_every_steps == 0 or is_last or preempted:
                history = [(s, jax.device_get(m)) for s, m in history]
                check_finite(history)
                elapsed = time.time() - last_log
                summary = {f"train/{k}": float(np.mean([m[k] for _, m in history]))
                           for k in history[0][1] if k != "finite"}
                summary["train/nonfinite_steps"] = float(
                    sum(1.0 - m["finite"] for _, m in history))
                summary["train/steps_per_sec"] = (step - last_log_step) / elapsed
                summary["train/images_per_sec"] = summary["train/steps_per_sec"] * \
                    config.batch_size
                summary["train/skipped_images"] = float(skipped.count)
                writer.write_scalars(step, summary)
                history, last_log, last_log_step = [], time.time(), step
            if step % config.checkpoint_every_steps == 0 or is_last or preempted:
                history = [(s, jax.device_get(m)) for s, m in history]
                check_finite(history)
                state = save(state, step)
            if step % config.eval_every_steps == 0 or is_last:
                state, result = run_eval(state, step)
            if preempted:
                logging.warning("preempted: checkpoint written at step %d", step)
                break
            if not is_last:
                batch = next_batch()
    checkpointer.wait()
    checkpointer.close()
    writer.flush()
    return result


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | None = None,
                        checkpoint: str | None = None) -> dict[str, float]:
    """Top-1 / top-5 of a run's latest checkpoint (or of converted weights)."""
    from clu import metric_writers
    check_config(config)
    check_devices(config)
    info = data_info(config)
    model = create_model(config, info.num_classes)
    source = checkpoint or workdir
    if source is None:
        raise ConfigError("give --workdir or --checkpoint")
    variables = ckpt_lib.restore_variables(source)
    mesh = create_mesh()
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(variables["params"], replicated)
    stats = jax.device_put(variables.get("batch_stats", {}), replicated)
    ds, _ = eval_dataset(config, info)
    result = evaluate(make_eval_step(model, mesh), params, stats, ds, mesh,
                      config.num_eval_steps)
    if workdir is not None and jax.process_index() == 0:
        writer = metric_writers.create_default_writer(os.path.join(workdir, "eval"))
        writer.write_scalars(0, {f"eval/{k}": v for k, v in result.items()})
        writer.flush()
    return result
