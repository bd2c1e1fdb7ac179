"""Throughput, compile time and memory of the real training step, optionally next to timm.

`python benchmark.py --model inception_v3 --batch 16 --compare timm` measures, in
one process and side by side:

- ours: the trainer's own update step (`trainer.make_train_step`: forward,
  backward, optimizer, BN statistics, auxiliary heads, EMA: the network's config
  from `configs/<net>.py`, batch / size / dtype overridden) and its evaluation
  step (`trainer.make_eval_step`), as images/s from the median of timed steps
  after warm-up;
- the train step's compile time, cold (fresh persistent cache) and warm (a fresh
  subprocess reading the persistent cache the cold compile wrote);
- memory: device `memory_stats()` peaks where the backend has them, otherwise
  the process's peak resident set size during the timed steps (the kernel's
  high-water mark, see `PeakRss`) and its page faults per train step, and
  XLA's static buffer sizes of the compiled step;
- multiply-adds per image (`models.summary`) and the fraction of the machine's
  measured dense matmul rate the step achieves (a train step is counted as
  3x the forward pass: forward, and two products per layer backward);
- `--compare timm`: the same network in timm / torchvision (PyTorch, the same
  thread count, channels_last, train mode, the config's optimizer, loss with
  the aux head where the PyTorch model has one) and the ratios ours / timm;
- the input pipeline alone (`input_pipeline.create_split`), to show which side
  bounds a run;
- `--ab OPTION`: ours with one model option (`AB_OPTIONS`) as configured and
  flipped, their train steps alternating, and the ratio of the medians.

`run_benchmark(Options(...))` returns the same dictionary `--json` writes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from inception_flax import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `configs` lives at the repository root
    sys.path.insert(0, ROOT)

# The PyTorch counterpart of each network: (library, constructor name, has aux head).
TORCH_MODELS = {
    "inception_v1": ("torchvision", "googlenet", True),
    "inception_v3": ("timm", "inception_v3", True),
    "inception_v4": ("timm", "inception_v4", False),
    "inception_resnet_v2": ("timm", "inception_resnet_v2", False),
}
DIGITS = "inception_digits"


@dataclasses.dataclass
class Options:
    model: str = "inception_v3"
    batch: int = 16
    image_size: int | None = None  # None: the config's
    dtype: str = "float32"
    compare: str | None = None  # None | "timm"
    steps: int = 10  # timed steps (each framework, each of train / inference)
    warmup: int = 2
    scan_unroll: int | None = None  # None: the config's
    remat: bool | None = None  # None: the config's (recompute repeated blocks backward)
    bn_remat: bool | None = None  # None: the config's (recompute BatchNorm + ReLU backward)
    merge_pointwise: bool | None = None  # None: the config's (sibling 1x1 convs as one)
    memory_sweep: bool = False  # also compile at batch/2 and batch, remat off / on
    depth_multiplier: float | None = None  # None: the config's (1.0)
    aux_logits: bool | None = None  # None: the config's
    num_classes: int = 1000
    dataset: str = DIGITS
    split: str = "train"
    data_dir: str | None = None
    pipeline_batches: int = 10  # timed batches of the input pipeline; 0 skips it
    matmul_size: int = 2048
    warm_compile: bool = True  # measure the warm-cache compile in a subprocess
    threads: int | None = None  # PyTorch threads; None: the CPUs this process may use
    conv_layers: bool = False  # with compare="timm": every convolution alone, ours vs PyTorch
    ab: str | None = None  # one of AB_OPTIONS: time ours with it flipped, alternating steps
    kernels: str | None = None  # INCEPTION_FLAX_KERNELS for ours; None: the environment's


# Model options `--ab` can flip: each changes how the network computes, not what.
# "onednn": convolutions through oneDNN against XLA's own (`inception_flax.onednn`).
AB_OPTIONS = ("merge_pointwise", "bn_remat", "remat", "onednn")


# ----------------------------------------------------------------------------
# Small measuring tools
# ----------------------------------------------------------------------------

def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _median_times(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


class PeakRss:
    """Peak resident set size of this process while the block runs.

    On Linux the kernel keeps the high-water mark itself: writing 5 to
    /proc/self/clear_refs resets it to the current size, and VmHWM in
    /proc/self/status reads it back, at no cost to the block being timed.
    Elsewhere a thread samples the RSS every `interval` seconds; it takes a
    little time from the timed steps, and it can miss short peaks.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self.before = 0
        self.method = "sampled"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _status_kb(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def _sample(self) -> int:
        kb = self._status_kb("VmRSS")
        if kb is not None:
            return kb * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # lifetime peak

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.before = self.peak = self._sample()
        self._faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if self._status_kb("VmHWM") is not None:
                self.method = "kernel high-water mark"
                return self
        except OSError:
            pass
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        # Minor page faults: memory the process touched for the first time (or again,
        # after the allocator gave it back to the kernel).
        self.minor_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self._faults
        if self._thread is None:
            self.peak = max(self.peak, (self._status_kb("VmHWM") or 0) * 1024)
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())

    def report(self, steps: int) -> dict[str, Any]:
        """The figures of a block that ran `steps` train steps, for the benchmark's JSON."""
        return {"peak_rss_mb": _mb(self.peak), "peak_rss_method": self.method,
                "rss_before_mb": _mb(self.before),
                "train_page_faults_per_step": self.minor_faults / steps}


def _mb(x: float | None) -> float | None:
    return None if x is None else x / 2**20


def device_peak_bytes() -> int | None:
    """Sum over local devices of the allocator's peak, where the backend reports it."""
    import jax
    total, seen = 0, False
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - backends without allocator stats
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            total += stats["peak_bytes_in_use"]
            seen = True
    return total if seen else None


def matmul_gflops(n: int, dtype: str, steps: int = 5) -> float:
    """Measured dense (n x n) @ (n x n) rate of JAX on the default device, GFLOP/s."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.matmul)
    times = _median_times(lambda: f(a, b).block_until_ready(), steps, 1)
    return 2 * n**3 / statistics.median(times) / 1e9


def torch_device() -> str:
    """PyTorch's side runs where JAX's does: CUDA when JAX runs on a GPU (with
    `cudnn.benchmark` on, as timm's train.py: the fastest algorithms)."""
    import jax
    import torch
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return "cuda"
    return "cpu"


def _torch_timed(fn: Callable[[], Any], device: str) -> Callable[[], None]:
    """`fn`, then wait for the device: CUDA kernels run asynchronously."""
    import torch
    if device == "cpu":
        return fn

    def timed():
        fn()
        torch.cuda.synchronize()
    return timed


def torch_matmul_gflops(n: int, dtype: str, steps: int = 5, device: str = "cpu") -> float:
    import torch
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a = torch.randn(n, n, device=device).to(tdtype)
    b = torch.randn(n, n, device=device).to(tdtype)
    times = _median_times(_torch_timed(lambda: torch.mm(a, b), device), steps, 1)
    return 2 * n**3 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------
# Config and our step
# ----------------------------------------------------------------------------

def load_config(opts: Options):
    """The network's config (`configs/<net>.py`) with the benchmark's overrides."""
    from inception_flax import models
    name = models.canonical_name(opts.model)
    config = importlib.import_module(f"configs.{name}").get_config()
    config.batch_size = opts.batch
    config.eval_batch_size = opts.batch
    if opts.image_size is not None:
        config.image_size = opts.image_size
    config.model.dtype = opts.dtype
    if opts.scan_unroll is not None:
        config.model.scan_unroll = opts.scan_unroll
    if opts.remat is not None:
        config.model.remat = opts.remat
    if opts.bn_remat is not None:
        config.model.bn_remat = opts.bn_remat
    if opts.merge_pointwise is not None:
        config.model.merge_pointwise = opts.merge_pointwise
    if opts.depth_multiplier is not None:
        config.model.depth_multiplier = opts.depth_multiplier
    if opts.aux_logits is not None:
        config.model.aux_logits = opts.aux_logits
    config.dataset.num_classes = opts.num_classes
    return config


@dataclasses.dataclass
class Ours:
    config: Any
    model: Any
    mesh: Any
    state: Any
    step: Any  # the jitted train step
    batch: dict


def build_ours(opts: Options) -> Ours:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from inception_flax import optim, trainer

    config = load_config(opts)
    trainer.check_config(config)
    trainer.check_devices(config)
    model = trainer.create_model(config, opts.num_classes)
    mesh = trainer.create_mesh()
    steps_per_epoch = 1000
    schedule = optim.learning_rate_schedule(config, steps_per_epoch, 100 * steps_per_epoch)
    tx = optim.create_optimizer(config, schedule)
    rng = jax.random.key_data(jax.random.key(config.seed))
    init_rng, state_rng = jax.random.split(jax.random.wrap_key_data(rng))
    variables = trainer.init_variables(model, jax.random.key_data(init_rng), config.image_size)
    state = trainer.create_state(variables["params"], variables.get("batch_stats", {}), tx,
                                 config.ema_decay > 0, jax.random.key_data(state_rng), mesh)
    step = trainer.make_train_step(model, tx, schedule, config, mesh, state)
    gen = np.random.default_rng(0)
    size = config.image_size
    host = {"image": gen.uniform(-1, 1, (opts.batch, size, size, 3)).astype(np.float32),
            "label": gen.integers(0, opts.num_classes, (opts.batch,)).astype(np.int32),
            "mask": np.ones((opts.batch,), np.float32)}
    batch = trainer.to_global(host, NamedSharding(mesh, P(trainer.AXIS)))
    return Ours(config, model, mesh, state, step, batch)


def _cache_events() -> dict[str, int]:
    """Counts of JAX's persistent-cache events from now on."""
    import jax
    counts: dict[str, int] = {}

    def listener(event: str, **kwargs):
        del kwargs
        if event.startswith("/jax/compilation_cache/"):
            counts[event] = counts.get(event, 0) + 1
    jax.monitoring.register_event_listener(listener)
    return counts


def _use_cache_dir(path: str | None) -> None:
    import jax
    from jax._src import compilation_cache
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()


def time_compile(ours: Ours) -> dict[str, Any]:
    start = time.perf_counter()
    lowered = ours.step.lower(ours.state, ours.batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return {"lower_s": lowered_at - start, "compile_s": done - lowered_at, "compiled": compiled}


def warm_compile_probe(opts: Options) -> dict[str, Any]:
    """Run in a fresh process whose persistent cache already holds the step."""
    import jax
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    use_kernels(opts)
    counts = _cache_events()
    ours = build_ours(opts)
    before = counts.get("/jax/compilation_cache/cache_hits", 0)
    t = time_compile(ours)
    hit = counts.get("/jax/compilation_cache/cache_hits", 0) > before
    return {"lower_s": t["lower_s"], "compile_s": t["compile_s"], "cache_hit": hit,
            "cache_events": {k.rsplit("/", 1)[-1]: v for k, v in counts.items()}}


def _run_probe(opts: Options, cache_dir: str) -> dict[str, Any]:
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    cmd = [sys.executable, "-m", "inception_flax.benchmark", "--_probe",
           json.dumps(dataclasses.asdict(opts))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError("warm-compile subprocess failed: " + " | ".join(tail))


@contextlib.contextmanager
def fresh_cache():
    """A new, empty persistent compilation cache for the block (every entry kept)."""
    import jax
    cache_dir = tempfile.mkdtemp(prefix="inception_flax_bench_cache_")
    previous_dir = jax.config.jax_compilation_cache_dir
    previous_min = jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        _use_cache_dir(cache_dir)
        yield cache_dir
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous_min)
        _use_cache_dir(previous_dir)
        shutil.rmtree(cache_dir, ignore_errors=True)


def bench_ours(opts: Options, ours: Ours, flops: dict[str, float]
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    import jax

    from inception_flax import trainer

    out: dict[str, Any] = {}
    # Cold: the step is not yet in the (fresh) persistent cache `fresh_cache` set up.
    t = time_compile(ours)
    compiled = t.pop("compiled")
    out["lower_s"] = t["lower_s"]
    out["compile_cold_s"] = t["compile_s"]
    if opts.warm_compile:
        probe = _run_probe(opts, jax.config.jax_compilation_cache_dir)
        out["compile_warm_s"] = probe["compile_s"]
        out["lower_warm_s"] = probe["lower_s"]
        out["warm_cache_hit"] = probe["cache_hit"]
        out["warm_cache_events"] = probe["cache_events"]
        out["cache_entries"] = sorted(os.listdir(jax.config.jax_compilation_cache_dir))
    try:
        analysis = compiled.memory_analysis()
        out["xla_argument_mb"] = _mb(analysis.argument_size_in_bytes)
        out["xla_output_mb"] = _mb(analysis.output_size_in_bytes)
        out["xla_temp_mb"] = _mb(analysis.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        out["xla_temp_mb"] = None

    holder = {"state": ours.state}

    def train_step():
        holder["state"], holder["metrics"] = compiled(holder["state"], ours.batch)
        jax.block_until_ready(holder)

    with PeakRss() as rss:
        times = _median_times(train_step, opts.steps, opts.warmup)
    out.update(_rates(times, opts.batch, flops["train"], "train"))
    metrics = jax.device_get(holder["metrics"])
    out["train_loss"] = float(metrics["loss"])
    out["train_finite"] = bool(metrics["finite"] > 0)
    out.update(rss.report(opts.steps + opts.warmup))
    out["device_peak_mb"] = _mb(device_peak_bytes())

    state = trainer.make_reconcile(holder["state"])(holder["state"])
    eval_step = trainer.make_eval_step(ours.model, ours.mesh)
    stats = trainer.mean_stats(state.batch_stats)

    def infer_step():
        jax.block_until_ready(eval_step(state.params, stats, ours.batch))

    times = _median_times(infer_step, opts.steps, opts.warmup)
    out.update(_rates(times, opts.batch, flops["infer"], "infer"))
    # The compiled step and its state: `bench_ab`'s A.
    return out, {"state": holder["state"], "step": compiled, "batch": ours.batch}


def bench_ab(opts: Options, a: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ours as configured (A) and with `opts.ab` flipped (B), train steps alternating in
    this process (A B, B A, A B, ...), so that both see the same machine: on a shared
    machine, separate runs drift by more than the few percent an option may be worth.
    `a`: A's compiled step, state and batch when `bench_ours` has them already."""
    import jax

    from inception_flax.models import layers

    field = opts.ab
    if field == "onednn":  # the kernels are chosen when the step is traced
        value = layers.native_kernels()
        b_opts, choices = opts, (layers.kernel_choice(), "cpu" if value else "onednn")
    else:
        value = bool(load_config(opts).model[field])
        b_opts = dataclasses.replace(opts, **{field: not value})
        choices = (layers.kernel_choice(),) * 2

    def compiled_run(run_opts: Options, choice: str) -> dict[str, Any]:
        ours = build_ours(run_opts)
        with layers.kernels(choice):
            compiled = ours.step.lower(ours.state, ours.batch).compile()
        return {"state": ours.state, "step": compiled, "batch": ours.batch}
    runs = [{**(a or compiled_run(opts, choices[0])), "times": []},
            {**compiled_run(b_opts, choices[1]), "times": []}]

    def step(run, times):
        start = time.perf_counter()
        run["state"], _ = run["step"](run["state"], run["batch"])
        jax.block_until_ready(run["state"])
        if times:
            run["times"].append(time.perf_counter() - start)
    for _ in range(max(opts.warmup, 1)):
        for run in runs:
            step(run, False)
    for i in range(opts.steps):
        for run in runs if i % 2 == 0 else runs[::-1]:
            step(run, True)
    ms = [1e3 * statistics.median(run["times"]) for run in runs]
    return {"option": field, "a": value, "b": not value, "a_step_ms": ms[0], "b_step_ms": ms[1],
            "a_over_b": ms[0] / ms[1],
            "a_times_ms": [1e3 * t for t in runs[0]["times"]],
            "b_times_ms": [1e3 * t for t in runs[1]["times"]]}


def memory_sweep(opts: Options) -> list[dict[str, Any]]:
    """XLA's buffer sizes of the train step at batch/2 and batch, remat off and on.

    Compiles only (nothing runs): the static sizes show how memory grows with the
    batch and what recomputing the repeated blocks saves.
    """
    rows = []
    for batch in sorted({max(1, opts.batch // 2), opts.batch}):
        for remat in (False, True):
            ours = build_ours(dataclasses.replace(opts, batch=batch, remat=remat))
            t = time_compile(ours)
            analysis = t["compiled"].memory_analysis()
            rows.append({"batch": batch, "remat": remat, "compile_s": t["compile_s"],
                         "temp_mb": _mb(analysis.temp_size_in_bytes),
                         "argument_mb": _mb(analysis.argument_size_in_bytes),
                         "output_mb": _mb(analysis.output_size_in_bytes)})
            del ours, t
    return rows


def _rates(times: list[float], batch: int, flops_per_image: float, prefix: str
           ) -> dict[str, float]:
    median = statistics.median(times)
    ips = batch / median
    return {f"{prefix}_step_ms": 1e3 * median,
            f"{prefix}_step_ms_min": 1e3 * min(times),
            f"{prefix}_step_ms_max": 1e3 * max(times),
            f"{prefix}_images_per_sec": ips,
            f"{prefix}_gflops": ips * flops_per_image / 1e9}


# ----------------------------------------------------------------------------
# The PyTorch counterpart
# ----------------------------------------------------------------------------

def build_torch_model(name: str, config, num_classes: int, aux: bool):
    library, ctor, _ = TORCH_MODELS[name]
    if library == "torchvision":
        import torchvision
        return getattr(torchvision.models, ctor)(
            weights=None, num_classes=num_classes, aux_logits=aux, init_weights=True,
            transform_input=False, dropout=config.model.dropout_rate,
            dropout_aux=config.model.get("aux_dropout_rate", 0.7))
    import timm
    kwargs = {"aux_logits": True} if aux else {}
    return timm.create_model(ctor, pretrained=False, num_classes=num_classes,
                             drop_rate=config.model.dropout_rate, **kwargs)


def torch_optimizer(config, params):
    """The config's optimizer in PyTorch (RMSProp: timm's TF-style variant)."""
    import torch
    lr = config.learning_rate
    wd = config.weight_decay
    if config.optimizer == "rmsprop":
        from timm.optim import RMSpropTF
        return RMSpropTF(params, lr=lr, alpha=config.rmsprop_decay, eps=config.rmsprop_epsilon,
                         momentum=config.momentum, weight_decay=wd)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def bench_torch(opts: Options, config, flops: dict[str, float], device: str = "cpu"
                ) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from inception_flax import models

    name = models.canonical_name(opts.model)
    if name not in TORCH_MODELS:
        raise ValueError(f"--compare timm: no timm / torchvision counterpart of {name}; "
                         f"choose one of {', '.join(TORCH_MODELS)}")
    library, ctor, torch_has_aux = TORCH_MODELS[name]
    threads = opts.threads or cpu_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours_aux = bool(config.model.aux_logits)
    aux = ours_aux and torch_has_aux
    size, batch = config.image_size, opts.batch
    x = torch.rand(batch, 3, size, size, device=device).mul_(2).sub_(1).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, opts.num_classes, (batch,), device=device)
    notes = []
    model = build_torch_model(name, config, opts.num_classes, aux).to(device)
    if aux:  # timm's v3 aux head pools 5x5 with no padding: small images cannot run it
        try:
            with torch.no_grad():
                model.train()(x)
        except RuntimeError:
            aux = False
            notes.append(f"{library}'s {ctor} auxiliary head cannot run at {size}x{size}: "
                         "it is left out there, ours trains it")
            model = build_torch_model(name, config, opts.num_classes, aux).to(device)
    model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch_optimizer(config, model.parameters())
    ema = None
    if config.ema_decay > 0:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=config.ema_decay)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=opts.dtype == "bfloat16")
    smoothing, aux_weight = config.label_smoothing, config.aux_loss_weight

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(x)
            if aux:  # timm: (logits, aux); torchvision: (logits, aux2, aux1)
                logits, heads = out[0], tuple(out[1:])
            else:
                logits, heads = out, ()
            loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
            for h in heads:
                loss = loss + aux_weight * F.cross_entropy(h.float(), y,
                                                           label_smoothing=smoothing)
        loss.backward()
        if config.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        opt.step()
        if ema is not None:
            ema.update(model)

    out: dict[str, Any] = {
        "library": library, "model": ctor, "device": device, "threads": threads,
        "torch": torch.__version__, "aux_logits": aux,
        "channels_last": True, "optimizer": type(opt).__name__, "ema": ema is not None}
    if ours_aux and not torch_has_aux:
        notes.append(f"{library}'s {ctor} has no auxiliary head: ours trains one, it does not "
                     "(--no-aux for like-for-like)")
    if config.model.depth_multiplier != 1.0:
        notes.append(f"{library}'s {ctor} has full width; ours has depth_multiplier "
                     f"{config.model.depth_multiplier}: the ratio is not like-for-like")
    out["notes"] = notes
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as rss:
        times = _median_times(_torch_timed(train_step, device), opts.steps, opts.warmup)
    out.update(_rates(times, batch, flops["train"], "train"))
    out.update(rss.report(opts.steps + opts.warmup))
    if device == "cuda":
        out["device_peak_mb"] = _mb(torch.cuda.max_memory_allocated())

    model.eval()

    def infer_step():
        with torch.inference_mode(), autocast:
            model(x)

    times = _median_times(_torch_timed(infer_step, device), opts.steps, opts.warmup)
    out.update(_rates(times, batch, flops["infer"], "infer"))
    return out


# ----------------------------------------------------------------------------
# Input pipeline
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


def bench_conv_layers(opts: Options, config, device: str = "cpu") -> dict[str, Any]:
    """Each distinct convolution of the network alone, forward and backward, ours and PyTorch.

    Ours is `layers.conv_nhwc` (the network's convolution, with its custom gradient);
    PyTorch's is `nn.Conv2d` in channels-last. The backward pass computes the kernel
    gradient, and the input gradient except where the input is the image.
    """
    import jax
    import numpy as np
    import torch

    from inception_flax import trainer

    torch.set_num_threads(opts.threads or cpu_threads())
    model = trainer.create_model(config, opts.num_classes)
    per_device = max(1, opts.batch // jax.device_count())
    rng = np.random.default_rng(0)
    rows = [{**c, **_time_conv(opts, c, rng, device)}
            for c in network_convolutions(model, per_device, config.image_size)]
    totals = {k: sum(r["count"] * r[k] for r in rows)
              for k in ("ours_fwd_ms", "ours_bwd_ms", "torch_fwd_ms", "torch_bwd_ms")}
    rows.sort(key=lambda r: -r["count"] * (r["ours_fwd_ms"] + r["ours_bwd_ms"]
                                          - r["torch_fwd_ms"] - r["torch_bwd_ms"]))
    return {"per_device_batch": per_device, "convolutions": sum(r["count"] for r in rows),
            "distinct": len(rows), **totals, "rows": rows}


def _time_conv(opts: Options, c: dict[str, Any], rng, device: str) -> dict[str, float]:
    """Median ms of one convolution's forward and backward passes, ours and PyTorch's
    (on the GPU when JAX runs on one)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from inception_flax.models import layers

    (kh, kw, cin, cout), strides = c["kernel"], tuple(c["strides"])
    padding = tuple(map(tuple, c["padding"]))
    image = cin == 3  # the network's input needs no gradient
    x = jnp.asarray(rng.standard_normal(c["input"]), opts.dtype)
    w = jnp.asarray(rng.standard_normal(c["kernel"]) * 0.1, opts.dtype)

    def conv(x, w):
        return layers.conv_nhwc(x, w, strides, padding, dimension_numbers=layers.NHWC)
    fwd = jax.jit(conv)
    g = jnp.asarray(rng.standard_normal(fwd(x, w).shape), opts.dtype)
    if image:
        bwd = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g))
    else:
        bwd = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g))

    def torch_nhwc(a):
        t = torch.from_numpy(np.array(a, np.float32)).permute(0, 3, 1, 2)
        return t.to(device=device, dtype=getattr(torch, opts.dtype))
    (top, bottom), (left, right) = padding
    tx = torch.nn.functional.pad(torch_nhwc(x), (left, right, top, bottom))
    tx = tx.contiguous(memory_format=torch.channels_last).requires_grad_(not image)
    tg = torch_nhwc(g).contiguous(memory_format=torch.channels_last)
    tconv = torch.nn.Conv2d(cin, cout, (kh, kw), stride=strides, bias=False).to(
        device=device, dtype=getattr(torch, opts.dtype), memory_format=torch.channels_last)
    out = tconv(tx)
    wrt = [tconv.weight] if image else [tx, tconv.weight]

    def torch_forward():
        with torch.no_grad():
            return tconv(tx)

    timed = {
        "ours_fwd_ms": lambda: jax.block_until_ready(fwd(x, w)),
        "ours_bwd_ms": lambda: jax.block_until_ready(bwd(x, w, g)),
        "torch_fwd_ms": _torch_timed(torch_forward, device),
        "torch_bwd_ms": _torch_timed(
            lambda: torch.autograd.grad(out, wrt, tg, retain_graph=True), device),
    }
    # At least one untimed call: the first one compiles.
    return {k: 1e3 * statistics.median(_median_times(f, opts.steps, max(opts.warmup, 1)))
            for k, f in timed.items()}


def bench_pipeline(opts: Options, config) -> dict[str, Any]:
    from inception_flax import input_pipeline
    d = config.dataset
    if opts.dataset == DIGITS:  # the digits preset's augmentation and buffer
        d = importlib.import_module("configs.inception_v3").get_config("digits").dataset
    else:
        d.name = opts.dataset
    if opts.dataset == DIGITS:
        input_pipeline.prepare_dataset(DIGITS, opts.data_dir)
    pre = input_pipeline.Preprocessing(
        area_range=tuple(d.area_range), aspect_ratio_range=tuple(d.aspect_ratio_range),
        random_flip=d.random_flip, central_fraction=d.central_fraction)
    ds, _ = input_pipeline.create_split(
        opts.dataset, opts.split, batch_size=opts.batch, image_size=config.image_size,
        train=True, data_dir=opts.data_dir, preprocessing=pre,
        shuffle_buffer=min(d.shuffle_buffer, 2048), seed=0)
    it = iter(ds.as_numpy_iterator())
    times = _median_times(lambda: next(it), opts.pipeline_batches, opts.warmup + 1)
    median = statistics.median(times)
    return {"dataset": opts.dataset, "split": opts.split, "batch_ms": 1e3 * median,
            "images_per_sec": opts.batch / median,
            "images_per_sec_mean": opts.batch * len(times) / sum(times)}


# ----------------------------------------------------------------------------
# The whole benchmark
# ----------------------------------------------------------------------------

def import_torch_stack() -> None:
    """Import PyTorch, torchvision and timm; it must happen before TensorFlow loads.

    torchvision pulls in triton, whose import crashes the process (SIGSEGV)
    once TensorFlow's shared libraries are loaded; the other order is fine.
    """
    if "torchvision" in sys.modules and "timm" in sys.modules:
        return
    if "tensorflow" in sys.modules and "triton" not in sys.modules:
        raise RuntimeError(
            "--compare timm: import torch, torchvision and timm before TensorFlow (triton "
            "crashes when loaded after it); run benchmark.py, or call "
            "inception_flax.benchmark.import_torch_stack() first")
    import timm
    import timm.optim
    import timm.utils  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401


def run_benchmark(opts: Options, log: Callable[[str], None] = lambda s: None
                  ) -> dict[str, Any]:
    from inception_flax import models

    if opts.compare not in (None, "timm"):
        raise ValueError(f"--compare must be timm, got {opts.compare!r}")
    if opts.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {opts.dtype!r}")
    name = models.canonical_name(opts.model)
    if opts.compare and name not in TORCH_MODELS:
        raise ValueError(f"--compare timm: no timm / torchvision counterpart of {name}; "
                         f"choose one of {', '.join(TORCH_MODELS)}")
    use_kernels(opts)
    if opts.compare == "timm":
        import_torch_stack()
    with fresh_cache():
        return _run(opts, name, log)


def use_kernels(opts: Options) -> None:
    """`--kernels`: set INCEPTION_FLAX_KERNELS for this process (and the probe's)."""
    from inception_flax.models import layers
    if opts.kernels is not None:
        os.environ[layers.KERNELS_ENV] = opts.kernels
    layers.kernel_choice()  # a bad choice, or oneDNN that cannot be built: one line, now


def kernels_in_use() -> str:
    """Which convolutions ours traces with: "onednn", "cpu" (XLA:CPU forms) or "xla"."""
    from inception_flax.models import layers
    if layers.native_kernels():
        return "onednn"
    return "cpu" if layers.cpu_kernels() else "xla"


def _run(opts: Options, name: str, log: Callable[[str], None]) -> dict[str, Any]:
    import flax
    import jax

    from inception_flax.models import summary

    log(f"building {name} (trainer state and step)")
    ours = build_ours(opts)
    config = ours.config
    result: dict[str, Any] = {"config": {
        "model": name, "batch": opts.batch, "image_size": config.image_size,
        "dtype": opts.dtype, "depth_multiplier": config.model.depth_multiplier,
        "scan_unroll": config.model.scan_unroll, "remat": bool(config.model.remat),
        "bn_remat": bool(config.model.get("bn_remat", False)),
        "merge_pointwise": bool(config.model.get("merge_pointwise", True)),
        "aux_logits": bool(config.model.aux_logits), "num_classes": opts.num_classes,
        "optimizer": config.optimizer, "ema": config.ema_decay > 0,
        "steps": opts.steps, "warmup": opts.warmup,
        "backend": jax.default_backend(), "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_threads": cpu_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "huge_page_malloc": hugepages.active(), "jax": jax.__version__,
        "flax": flax.__version__, "kernels": kernels_in_use()}}

    log("counting multiply-adds")
    infer_macs = summary.summarize(ours.model.clone(aux_logits=False), config.image_size).macs
    train_macs = (summary.summarize(ours.model, config.image_size).macs
                  if config.model.aux_logits else infer_macs)
    params = sum(x.size for x in jax.tree.leaves(ours.state.params))
    # FLOPs per image: 2 per multiply-add; training = forward + backward (2x forward).
    flops = {"train": 3 * 2 * train_macs, "infer": 2 * infer_macs}
    result["model"] = {"params": int(params), "macs_per_image": infer_macs,
                       "train_forward_macs_per_image": train_macs,
                       "train_flops_per_image": flops["train"],
                       "infer_flops_per_image": flops["infer"]}

    log(f"measuring the {opts.matmul_size}^2 matmul rate")
    machine = {"matmul_size": opts.matmul_size,
               "matmul_gflops_float32": matmul_gflops(opts.matmul_size, "float32")}
    if opts.dtype == "bfloat16":
        machine["matmul_gflops_bfloat16"] = matmul_gflops(opts.matmul_size, "bfloat16")
    peak = machine[f"matmul_gflops_{opts.dtype}"]
    machine["matmul_gflops"] = peak
    result["machine"] = machine

    log("ours: compile (cold, then warm in a subprocess), train and inference steps")
    ours_out, compiled_a = bench_ours(opts, ours, flops)
    if not opts.ab:
        compiled_a = None  # release our state before the phases below
    del ours
    for k in ("train", "infer"):
        ours_out[f"{k}_fraction_of_matmul"] = ours_out[f"{k}_gflops"] / peak
    result["ours"] = ours_out

    if opts.compare == "timm":
        log("timm: train and inference steps")
        device = torch_device()
        machine["torch_matmul_gflops"] = torch_matmul_gflops(opts.matmul_size, opts.dtype,
                                                             device=device)
        theirs = bench_torch(opts, config, flops, device)
        for k in ("train", "infer"):
            theirs[f"{k}_fraction_of_matmul"] = theirs[f"{k}_gflops"] / peak
        result["timm"] = theirs
        result["ratio"] = {
            "train_images_per_sec": ours_out["train_images_per_sec"]
            / theirs["train_images_per_sec"],
            "infer_images_per_sec": ours_out["infer_images_per_sec"]
            / theirs["infer_images_per_sec"],
        }

    if opts.conv_layers:
        log("convolutions one by one: ours and PyTorch")
        result["conv_layers"] = bench_conv_layers(opts, config, torch_device())

    if opts.ab:
        log(f"A/B: {opts.ab} as configured and flipped, train steps alternating")
        result["ab"] = bench_ab(opts, compiled_a)
        compiled_a = None

    if opts.memory_sweep:
        log("memory sweep: compiling at two batch sizes, remat off and on")
        result["memory_sweep"] = memory_sweep(opts)

    if opts.pipeline_batches > 0:
        log(f"input pipeline: {opts.dataset}")
        pipe = bench_pipeline(opts, config)
        result["pipeline"] = pipe
        result["bound_by"] = ("input pipeline" if pipe["images_per_sec"]
                              < ours_out["train_images_per_sec"] else "train step")
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------

def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def format_table(r: dict[str, Any]) -> str:
    c, m = r["config"], r["model"]
    lines = [
        (f"{c['model']}  batch {c['batch']}  {c['image_size']}x{c['image_size']}  {c['dtype']}  "
        f"depth x{c['depth_multiplier']}  scan_unroll {c['scan_unroll']}  "
        f"aux {_fmt(c['aux_logits'])}  {c['optimizer']}  "
        f"{c['devices']} {c['backend']} device(s) ({c.get('device_kind', '?')}), "
        f"{c['cpu_threads']} CPU threads, "
        f"huge-page malloc {'on' if c.get('huge_page_malloc') else 'off'}, "
        f"{c.get('kernels', '?')} kernels"),
        (f"params {m['params']:,}   {m['macs_per_image'] / 1e9:.3f} GMACs/image (inference), "
        f"{m['train_forward_macs_per_image'] / 1e9:.3f} with aux heads; train step = 3x forward"),
        f"machine: {r['machine']['matmul_size']}^2 matmul {r['machine']['matmul_gflops']:.1f} "
        f"GFLOP/s (JAX, {c['dtype']})"
        + (f", {r['machine']['torch_matmul_gflops']:.1f} GFLOP/s (PyTorch)"
           if "torch_matmul_gflops" in r["machine"] else ""),
        f"medians of {c['steps']} steps after {c['warmup']} warm-up",
        "",
    ]
    cols = [("ours", r["ours"])] + ([("timm", r["timm"])] if "timm" in r else [])
    rows = [
        ("train images/s", "train_images_per_sec", 1),
        ("train step ms", "train_step_ms", 1),
        ("train GFLOP/s", "train_gflops", 1),
        ("train % of matmul", "train_fraction_of_matmul", None),
        ("inference images/s", "infer_images_per_sec", 1),
        ("inference step ms", "infer_step_ms", 1),
        ("inference % of matmul", "infer_fraction_of_matmul", None),
        ("trace+lower s", "lower_s", 2),
        ("compile cold s", "compile_cold_s", 2),
        ("compile warm cache s", "compile_warm_s", 2),
        ("peak RSS MB (train)", "peak_rss_mb", 0),
        ("page faults/train step", "train_page_faults_per_step", 0),
        ("device peak MB", "device_peak_mb", 0),
        ("XLA temp buffers MB", "xla_temp_mb", 0),
    ]
    head = f"{'':24}" + "".join(f"{n:>14}" for n, _ in cols)
    if "ratio" in r:
        head += f"{'ours/timm':>14}"
    lines.append(head)
    for label, key, digits in rows:
        vals = [d.get(key) for _, d in cols]
        if all(v is None for v in vals):
            continue
        cells = [("-" if v is None else f"{100 * v:.1f}%") if digits is None
                 else _fmt(v, digits) for v in vals]
        line = f"{label:24}" + "".join(f"{s:>14}" for s in cells)
        if key in r.get("ratio", {}):
            line += f"{r['ratio'][key]:>13.2f}x"
        lines.append(line)
    if r["ours"].get("warm_cache_hit") is False:
        lines.append("warning: the warm-cache compile missed the persistent cache")
    if "train_finite" in r["ours"]:
        lines.append(f"ours: last train loss {r['ours']['train_loss']:.4f} "
                     f"({'finite' if r['ours']['train_finite'] else 'NOT FINITE'})")
    for note in r.get("timm", {}).get("notes", []):
        lines.append(f"note: {note}")
    if "conv_layers" in r:
        cl = r["conv_layers"]
        lines += ["", (f"convolutions alone ({cl['convolutions']}, {cl['distinct']} distinct, "
                       f"batch {cl['per_device_batch']}), summed ms:  forward "
                       f"{cl['ours_fwd_ms']:,.0f} ours / {cl['torch_fwd_ms']:,.0f} PyTorch,  "
                       f"backward {cl['ours_bwd_ms']:,.0f} / {cl['torch_bwd_ms']:,.0f}"),
                  "largest differences (ms, ours / PyTorch, times the count):"]
        for row in cl["rows"][:8]:
            lines.append(
                f"  x{row['count']:<3} {'x'.join(map(str, row['input'])):>14} * "
                f"{'x'.join(map(str, row['kernel'])):>13} stride {row['strides'][0]}  "
                f"forward {row['ours_fwd_ms']:7.1f} / {row['torch_fwd_ms']:7.1f}  "
                f"backward {row['ours_bwd_ms']:7.1f} / {row['torch_bwd_ms']:7.1f}")
    if "ab" in r:
        ab = r["ab"]
        lines += ["", (f"A/B in one process, alternating train steps, medians of "
                       f"{len(ab['a_times_ms'])}: {ab['option']}={ab['a']} "
                       f"{ab['a_step_ms']:,.1f} ms, {ab['option']}={ab['b']} "
                       f"{ab['b_step_ms']:,.1f} ms per step: {ab['a_over_b']:.3f}")]
    if "memory_sweep" in r:
        lines += ["", "XLA buffers of the train step (MB)   batch  remat      temp  arguments"]
        for m in r["memory_sweep"]:
            lines.append(f"{'':36}{m['batch']:>6}  {_fmt(m['remat']):>5}"
                         f"{m['temp_mb']:>10,.0f}{m['argument_mb']:>11,.0f}")
    if "pipeline" in r:
        p = r["pipeline"]
        lines += ["", (f"input pipeline ({p['dataset']}:{p['split']}, decoded + augmented): "
                       f"{p['images_per_sec']:,.0f} images/s ({p['batch_ms']:.1f} ms/batch)  "
                       f"-> bound by the {r['bound_by']}")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="benchmark.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="inception_v3", help="network (configs/<net>.py)")
    p.add_argument("--batch", type=int, default=16, help="global batch (multiple of devices)")
    p.add_argument("--image-size", type=int, default=None, help="default: the config's")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--compare", choices=("timm",), default=None,
                   help="also run the timm / torchvision model in this process")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--steps", type=int, default=10, help="timed steps (medians)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--scan-unroll", type=int, default=None,
                   help="1: rolled nn.scan loops; >= block count: straight-line code")
    p.add_argument("--remat", dest="remat", action="store_true", default=None,
                   help="recompute the repeated blocks in the backward pass (less memory)")
    p.add_argument("--no-remat", dest="remat", action="store_false")
    p.add_argument("--bn-remat", dest="bn_remat", action="store_true", default=None,
                   help="recompute BatchNorm and ReLU in the backward pass (less memory)")
    p.add_argument("--no-bn-remat", dest="bn_remat", action="store_false")
    p.add_argument("--merge-pointwise", dest="merge_pointwise", action="store_true",
                   default=None, help="run sibling 1x1 convolutions on one input as one "
                                      "(the default)")
    p.add_argument("--no-merge-pointwise", dest="merge_pointwise", action="store_false")
    p.add_argument("--memory-sweep", action="store_true",
                   help="also compile the step at batch/2 and batch, remat off and on, and "
                        "report XLA's buffer sizes")
    p.add_argument("--depth-multiplier", type=float, default=None, help="width multiplier")
    p.add_argument("--aux", dest="aux_logits", action="store_true", default=None)
    p.add_argument("--no-aux", dest="aux_logits", action="store_false",
                   help="train without the auxiliary head(s)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--dataset", default=DIGITS, help="input pipeline: TFDS name or folder:/path")
    p.add_argument("--split", default="train")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir")
    p.add_argument("--pipeline-batches", type=int, default=10, help="0 skips the pipeline")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--no-warm-compile", dest="warm_compile", action="store_false",
                   help="skip the warm-cache compile subprocess")
    p.add_argument("--threads", type=int, default=None,
                   help="PyTorch threads (default: the CPUs this process may use)")
    p.add_argument("--conv-layers", action="store_true",
                   help="with --compare timm: also time each convolution of the network "
                        "alone, forward and backward, ours and PyTorch's")
    p.add_argument("--ab", choices=AB_OPTIONS, default=None,
                   help="also time ours with this model option flipped, train steps of the "
                        "two alternating in this process, and print the ratio")
    p.add_argument("--kernels", choices=("auto", "onednn", "cpu", "xla"), default=None,
                   help="ours' convolutions: oneDNN, XLA:CPU's, or plain XLA (sets "
                        "INCEPTION_FLAX_KERNELS; default: that variable, else auto)")
    p.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._probe is not None:
        return Options(**json.loads(args._probe)), args
    fields = {f.name for f in dataclasses.fields(Options)}
    opts = Options(**{k: v for k, v in vars(args).items() if k in fields})
    if opts.steps < 1 or opts.batch < 1 or opts.warmup < 0:
        p.error("--steps and --batch must be positive, --warmup non-negative")
    if opts.conv_layers and opts.compare != "timm":
        p.error("--conv-layers compares with PyTorch: add --compare timm")
    return opts, args


def main(argv: list[str] | None = None) -> int:
    opts, args = parse_args(argv)
    if opts.compare == "timm":
        # On a GPU, JAX would otherwise take 75% of its memory up front, and PyTorch
        # shares the device in this process. Set before JAX is imported.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if opts.compare == "timm" and args._probe is None:
        import_torch_stack()  # before anything loads TensorFlow
    if args._probe is not None:
        print("PROBE " + json.dumps(warm_compile_probe(opts)), flush=True)
        return 0
    from inception_flax import trainer
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[benchmark {time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr,
              flush=True)
    try:
        result = run_benchmark(opts, log=log)
    except (trainer.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    hugepages.reexec()  # `python -m inception_flax.benchmark`: before JAX is imported
    sys.exit(main())
