"""Our side: the trainer's own train and evaluation steps, built once and timed.

`build` is the one function here that calls the trainer: it checks the config and
builds model, mesh, optimizer, state and steps as training does. The rest times
what it returns: compile (cold, and warm from the persistent cache in a fresh
process), train and inference steps, two configs' train steps alternating (`ab`),
XLA's buffer sizes at two batch sizes (`memory_sweep`) and with K = 1, 2, 4
micro-batches per update (`accum_sweep`), and each convolution alone
(`network_convolutions`, `time_conv`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from benchmarks import measure, overrides

@dataclasses.dataclass
class Ours:
    """What `build` returns: everything the timing below needs, nothing of the trainer's API."""
    config: ml_collections.ConfigDict
    model: Any  # the flax module, for multiply-adds and its convolutions
    state: Any  # the initial train state
    train_step: Any  # jitted `(state, batch) -> (state, metrics)`, with `.lower`
    infer: Callable[[Any], Callable[[], Any]]  # state -> one inference step on `batch`
    conv: Callable[..., Any]  # the model's convolution: conv(x, w, strides, padding), NHWC
    batch: dict[str, Any]  # one global batch of random images and labels
    kernels: str  # the kernels the model computes with: "native", "xla_cpu" or "plain"


def build(config: ml_collections.ConfigDict, num_classes: int) -> Ours:
    """Our model, state, steps and a random batch, built by the trainer's own setup.

    The only place the benchmark touches the trainer: `training.setup` checks the
    config (a bad one is a `ConfigError`), resolves the kernels and builds model, mesh,
    optimizer and initial state as a training run does; the steps are the trainer's.
    Batch and image size are the config's (`batch_size`).
    """
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from inception_flax.data import sharding
    from inception_flax.models import ops
    from inception_flax.training import mesh as mesh_lib
    from inception_flax.training import setup, state as state_lib, step

    s = setup.setup(config, num_classes=num_classes)
    train_step = step.make_train_step(s.model, s.tx, s.schedule, s.config, s.mesh, s.state)
    eval_step = step.make_eval_step(s.model, s.mesh)

    gen = np.random.default_rng(0)
    n, size = config.batch_size, config.image_size
    host = {"image": gen.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
            "label": gen.integers(0, num_classes, (n,)).astype(np.int32),
            "mask": np.ones((n,), np.float32)}
    batch = sharding.to_global(host, NamedSharding(s.mesh, P(mesh_lib.AXIS)))

    def infer(state):
        state = state_lib.make_reconcile(state)(state)
        params, stats = state.params, state_lib.mean_stats(state.batch_stats)
        return lambda: eval_step(params, stats, batch)

    def conv(x, w, strides, padding):
        pads = ops.explicit_padding(x.shape, w.shape[:2], strides, padding)
        return s.model.ops.conv(x, w, tuple(strides), pads)

    return Ours(config, s.model, s.state, train_step, infer, conv, batch, s.model.ops.name)


# ----------------------------------------------------------------------------
# Compile
# ----------------------------------------------------------------------------

def time_compile(ours: Ours) -> dict[str, Any]:
    """Trace + lower, then compile the train step: seconds of each, and the executable."""
    start = time.perf_counter()
    lowered = ours.train_step.lower(ours.state, ours.batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return {"lower_s": lowered_at - start, "compile_s": done - lowered_at, "compiled": compiled}


def memory_analysis(compiled) -> dict[str, float | None]:
    """XLA's static buffer sizes of a compiled step (MB), where the backend reports them."""
    try:
        analysis = compiled.memory_analysis()
        return {"xla_argument_mb": measure.mb(analysis.argument_size_in_bytes),
                "xla_output_mb": measure.mb(analysis.output_size_in_bytes),
                "xla_temp_mb": measure.mb(analysis.temp_size_in_bytes)}
    except Exception:  # noqa: BLE001 - not every backend reports it
        return {"xla_temp_mb": None}


PROBE_PREFIX = "PROBE "


def warm_compile_probe(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """In a fresh process whose persistent cache already holds the step: its compile time."""
    import jax
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    counts = measure.cache_events()
    ours = build(config, num_classes)
    before = counts.get("/jax/compilation_cache/cache_hits", 0)
    t = time_compile(ours)
    hit = counts.get("/jax/compilation_cache/cache_hits", 0) > before
    return {"lower_s": t["lower_s"], "compile_s": t["compile_s"], "cache_hit": hit,
            "cache_events": {k.rsplit("/", 1)[-1]: v for k, v in counts.items()}}


def run_probe(argv: Sequence[str], cache_dir: str) -> dict[str, Any]:
    """`warm_compile_probe` in a subprocess: the benchmark's own command line (`argv`: the
    same config file and overrides) with `--probe`, reading the cache at `cache_dir`.

    It inherits this process's environment, huge-page malloc included.
    """
    if not argv:
        raise ValueError("the warm-compile probe repeats the command line: build the run "
                         "with benchmarks.cli.parse(argv), or set warm_compile=False")
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    # `benchmarks` and `configs` sit side by side: the child imports both from there.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "benchmarks.cli", *argv[1:], "--probe"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PROBE_PREFIX):
            return json.loads(line[len(PROBE_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError("warm-compile subprocess failed: " + " | ".join(tail))


# ----------------------------------------------------------------------------
# Train and inference steps
# ----------------------------------------------------------------------------

def time_steps(ours: Ours, compiled, flops: dict[str, float], steps: int, warmup: int
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train steps (with peak memory and page faults), then inference steps: figures, and
    the compiled step with its state after training (`ab`'s A)."""
    import jax

    out: dict[str, Any] = {}
    holder = {"state": ours.state}

    def train_step():
        holder["state"], holder["metrics"] = compiled(holder["state"], ours.batch)
        jax.block_until_ready(holder)

    batch = ours.config.batch_size
    with measure.PeakRss() as rss:
        times = measure.step_times(train_step, steps, warmup)
    out.update(measure.rates(times, batch, flops["train"], "train"))
    metrics = jax.device_get(holder["metrics"])
    out["train_loss"] = float(metrics["loss"])
    out["train_finite"] = bool(metrics["finite"] > 0)
    out.update(rss.report(steps + warmup))
    out["device_peak_mb"] = measure.mb(measure.device_peak_bytes())

    infer = ours.infer(holder["state"])
    times = measure.step_times(lambda: jax.block_until_ready(infer()), steps, warmup)
    out.update(measure.rates(times, batch, flops["infer"], "infer"))
    return out, {"state": holder["state"], "step": compiled, "batch": ours.batch}


def alternate(runs: list[dict[str, Any]], steps: int, warmup: int) -> None:
    """Train steps of several compiled runs (`state`, `step`, `batch`), taking turns (in
    forward, then reverse order), each step's seconds appended to the run's `times`."""
    import jax

    def step(run, timed):
        start = time.perf_counter()
        run["state"], _ = run["step"](run["state"], run["batch"])
        jax.block_until_ready(run["state"])
        if timed:
            run["times"].append(time.perf_counter() - start)
    for _ in range(max(warmup, 1)):
        for run in runs:
            step(run, False)
    for i in range(steps):
        for run in runs if i % 2 == 0 else runs[::-1]:
            step(run, True)


def ab(config: ml_collections.ConfigDict, num_classes: int, override: str, steps: int,
       warmup: int, a: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config (A) and the config with `override` (B, `FIELD=VALUE`), train steps
    alternating in this process (A B, B A, A B, ...), so that both see the same machine:
    on a shared machine, separate runs drift by more than the few percent an option may
    be worth. `a`: A's compiled step, state and batch when `time_steps` has them."""
    b_config, field, b_value = overrides.apply(config, override)
    a_value = overrides.get(config, field)
    if b_value == a_value:
        raise ValueError(f"--ab {override}: the config has {field}={a_value!r} already")

    def compiled_run(run_config) -> dict[str, Any]:
        ours = build(run_config, num_classes)
        compiled = ours.train_step.lower(ours.state, ours.batch).compile()
        return {"state": ours.state, "step": compiled, "batch": ours.batch,
                "kernels": ours.kernels}
    runs = [{**(a or compiled_run(config)), "times": []},
            {**compiled_run(b_config), "times": []}]
    alternate(runs, steps, warmup)
    ms = [1e3 * statistics.median(run["times"]) for run in runs]
    return {"override": override, "option": field, "a": a_value, "b": b_value,
            "b_kernels": runs[1]["kernels"], "a_step_ms": ms[0], "b_step_ms": ms[1],
            "a_over_b": ms[0] / ms[1],
            "a_times_ms": [1e3 * t for t in runs[0]["times"]],
            "b_times_ms": [1e3 * t for t in runs[1]["times"]]}


def memory_sweep(config: ml_collections.ConfigDict, num_classes: int) -> list[dict[str, Any]]:
    """XLA's buffer sizes of the train step at batch/2 and batch, remat off and on.

    Compiles only (nothing runs): the static sizes show how memory grows with the
    batch and what recomputing the repeated blocks saves.
    """
    rows = []
    for batch in sorted({max(1, config.batch_size // 2), config.batch_size}):
        for remat in (False, True):
            ours = build(overrides.replaced(config, {"batch_size": batch,
                                                     "eval_batch_size": batch,
                                                     "model.remat": remat}), num_classes)
            t = time_compile(ours)
            analysis = t["compiled"].memory_analysis()
            rows.append({"batch": batch, "remat": remat, "compile_s": t["compile_s"],
                         "temp_mb": measure.mb(analysis.temp_size_in_bytes),
                         "argument_mb": measure.mb(analysis.argument_size_in_bytes),
                         "output_mb": measure.mb(analysis.output_size_in_bytes)})
            del ours, t
    return rows


ACCUM_STEPS = (1, 2, 4)


def accum_sweep(config: ml_collections.ConfigDict, num_classes: int, steps: int,
                warmup: int) -> list[dict[str, Any]]:
    """The train step at the config's global batch with `grad_accum_steps` K = 1, 2, 4
    (those dividing the per-device batch): XLA's buffer sizes, and the median step time
    with the K's steps taking turns in this process (as `ab`), all on the same machine.

    What accumulation is for: the temporaries (one micro-batch's activations live at a
    time) fall with K while the update stays the global batch's.
    """
    import jax

    per_device = config.batch_size // jax.device_count()
    runs = []
    for k in (k for k in ACCUM_STEPS if per_device % k == 0):
        ours = build(overrides.replaced(config, {"grad_accum_steps": k}), num_classes)
        t = time_compile(ours)
        analysis = t["compiled"].memory_analysis()
        runs.append({"grad_accum_steps": k, "micro_batch": per_device // k,
                     "compile_s": t["compile_s"],
                     "temp_mb": measure.mb(analysis.temp_size_in_bytes),
                     "argument_mb": measure.mb(analysis.argument_size_in_bytes),
                     "state": ours.state, "step": t["compiled"], "batch": ours.batch,
                     "times": []})
        del ours, t
    alternate(runs, steps, warmup)
    timed = ("state", "step", "batch", "times")
    return [{**{k: v for k, v in run.items() if k not in timed},
             "step_ms": 1e3 * statistics.median(run["times"]),
             "images_per_sec": config.batch_size / statistics.median(run["times"])}
            for run in runs]


# ----------------------------------------------------------------------------
# Convolutions one by one
# ----------------------------------------------------------------------------

def network_convolutions(model, batch: int, image_size: int) -> list[dict[str, Any]]:
    """Every convolution of the forward pass the model trains with: shapes, strides, padding,
    count. Convolutions inside `nn.scan` bodies count once per iteration."""
    from inception_flax.models import summary

    jaxpr = summary.forward_jaxpr(model, image_size, batch)[0]
    found: dict[tuple, int] = {}
    for eqn, _, times in summary.walk_ops(jaxpr.jaxpr):
        if eqn.primitive.name == "conv_general_dilated":
            key = (tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape),
                   tuple(eqn.params["window_strides"]), tuple(map(tuple, eqn.params["padding"])))
            found[key] = found.get(key, 0) + times
    return [{"input": list(x), "kernel": list(w), "strides": list(st),
             "padding": [list(p) for p in pad], "count": n}
            for (x, w, st, pad), n in found.items()]


def time_conv(conv: Callable[..., Any], arrays: dict[str, Any], c: dict[str, Any], dtype: str,
              steps: int, warmup: int) -> dict[str, float]:
    """Median ms of one convolution alone, forward and backward, with `Ours.conv` (the
    network's, with its custom gradient). `arrays`: input `x`, kernel `w`, output
    gradient `g` (numpy). The image (3 channels) needs no input gradient."""
    import jax
    import jax.numpy as jnp

    strides, padding = tuple(c["strides"]), tuple(map(tuple, c["padding"]))
    x, w, g = (jnp.asarray(arrays[k], dtype) for k in ("x", "w", "g"))

    def f(x, w):
        return conv(x, w, strides, padding)
    fwd = jax.jit(f)
    if c["kernel"][2] == 3:
        bwd = jax.jit(lambda x, w, g: jax.vjp(lambda w: f(x, w), w)[1](g))
    else:
        bwd = jax.jit(lambda x, w, g: jax.vjp(f, x, w)[1](g))
    timed = {"ours_fwd_ms": lambda: jax.block_until_ready(fwd(x, w)),
             "ours_bwd_ms": lambda: jax.block_until_ready(bwd(x, w, g))}
    # At least one untimed call: the first one compiles.
    return {k: 1e3 * statistics.median(measure.step_times(fn, steps, max(warmup, 1)))
            for k, fn in timed.items()}
