"""The whole benchmark: what runs, in which order, into one result dictionary.

`run_benchmark(*cli.parse(argv))` returns the dictionary `--json` writes: the
config, the model's size and multiply-adds, the machine's matmul rate, ours
(`benchmarks.ours`), optionally PyTorch's (`benchmarks.torch_side`) and their
ratio, each convolution alone, the A/B, the memory and accumulation sweeps and the
input pipeline.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
from collections.abc import Callable
from typing import Any

import ml_collections

from benchmarks import measure, ours as ours_lib, torch_side

DIGITS = "inception_digits"


@dataclasses.dataclass
class Options:
    """The benchmark's own settings; everything about the network is in the config."""
    compare: str | None = None  # None | "timm"
    steps: int = 10  # timed steps (each framework, each of train / inference)
    warmup: int = 2
    num_classes: int = 1000
    memory_sweep: bool = False  # also compile at batch/2 and batch, remat off / on
    accum_sweep: bool = False  # also the train step with grad_accum_steps 1, 2, 4: memory, time
    dataset: str = DIGITS  # the input pipeline's
    split: str = "train"
    data_dir: str | None = None
    pipeline_batches: int = 10  # timed batches of the input pipeline; 0 skips it
    matmul_size: int = 2048
    warm_compile: bool = True  # measure the warm-cache compile in a subprocess
    threads: int | None = None  # PyTorch threads; None: the CPUs this process may use
    conv_layers: bool = False  # with compare="timm": every convolution alone, ours vs PyTorch
    ab: str | None = None  # FIELD=VALUE: B is the config with it, train steps alternating
    json: str | None = None  # write the result here
    # The command line the config came from (config file and overrides): the warm-compile
    # probe repeats it. Filled in by `cli.parse`.
    argv: tuple[str, ...] = ()
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # for the record


def check(config: ml_collections.ConfigDict, opts: Options) -> None:
    """The benchmark's own checks (the config's are the trainer's, in `ours.build`)."""
    from inception_flax import models
    if opts.compare not in (None, "timm"):
        raise ValueError(f"--compare must be timm, got {opts.compare!r}")
    if opts.steps < 1 or opts.warmup < 0 or config.batch_size < 1:
        raise ValueError("--steps and --batch must be positive, --warmup non-negative")
    if opts.conv_layers and opts.compare != "timm":
        raise ValueError("--conv_layers compares with PyTorch: add --compare timm")
    if opts.compare:
        torch_side.check_counterpart(models.canonical_name(config.model.name))


def run_benchmark(config: ml_collections.ConfigDict, opts: Options,
                  log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    check(config, opts)
    if opts.compare == "timm":
        torch_side.import_torch_stack()
    with measure.fresh_cache():
        return _run(config, opts, log)


def _run(config: ml_collections.ConfigDict, opts: Options, log: Callable[[str], None]
         ) -> dict[str, Any]:
    import flax
    import jax

    from inception_flax import models
    from inception_flax.cpu import process
    from inception_flax.models import summary

    name = models.canonical_name(config.model.name)
    log(f"building {name} (trainer state and step)")
    ours = ours_lib.build(config, opts.num_classes)
    dtype = config.model.dtype
    result: dict[str, Any] = {"config": {
        "model": name, "batch": config.batch_size, "image_size": config.image_size,
        "dtype": dtype, "depth_multiplier": config.model.depth_multiplier,
        "scan_unroll": config.model.scan_unroll, "remat": bool(config.model.remat),
        "bn_remat": bool(config.model.get("bn_remat", False)),
        "merge_pointwise": bool(config.model.get("merge_pointwise", True)),
        "aux_logits": bool(config.model.aux_logits), "num_classes": opts.num_classes,
        "optimizer": config.optimizer, "ema": config.ema_decay > 0,
        "grad_accum_steps": config.grad_accum_steps,
        "kernels": config.kernels, "kernels_used": ours.kernels,
        "overrides": dict(opts.overrides),
        "steps": opts.steps, "warmup": opts.warmup,
        "backend": jax.default_backend(), "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_threads": measure.cpu_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "huge_page_malloc": process.active(), "jax": jax.__version__,
        "flax": flax.__version__}}

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
               "matmul_gflops_float32": measure.matmul_gflops(opts.matmul_size, "float32")}
    if dtype != "float32":
        machine[f"matmul_gflops_{dtype}"] = measure.matmul_gflops(opts.matmul_size, dtype)
    peak = machine["matmul_gflops"] = machine[f"matmul_gflops_{dtype}"]
    result["machine"] = machine

    log("ours: compile (cold, then warm in a subprocess), train and inference steps")
    # Cold: the step is not yet in the (fresh) persistent cache `fresh_cache` set up.
    t = ours_lib.time_compile(ours)
    ours_out = {"lower_s": t["lower_s"], "compile_cold_s": t["compile_s"]}
    if opts.warm_compile:
        cache_dir = jax.config.jax_compilation_cache_dir
        probe = ours_lib.run_probe(opts.argv, cache_dir)
        ours_out.update(compile_warm_s=probe["compile_s"], lower_warm_s=probe["lower_s"],
                        warm_cache_hit=probe["cache_hit"],
                        warm_cache_events=probe["cache_events"],
                        cache_entries=sorted(os.listdir(cache_dir)))
    ours_out.update(ours_lib.memory_analysis(t["compiled"]))
    timed, compiled_a = ours_lib.time_steps(ours, t.pop("compiled"), flops, opts.steps,
                                            opts.warmup)
    ours_out.update(timed)
    for k in ("train", "infer"):
        ours_out[f"{k}_fraction_of_matmul"] = ours_out[f"{k}_gflops"] / peak
    result["ours"] = ours_out
    model, conv = ours.model, ours.conv
    if not opts.ab:
        compiled_a = None  # release our state before the phases below
    del ours, t

    if opts.compare == "timm":
        log("timm: train and inference steps")
        device = torch_side.device()
        machine["torch_matmul_gflops"] = torch_side.matmul_gflops(opts.matmul_size, dtype,
                                                                  device=device)
        theirs = torch_side.bench(config, opts.num_classes, flops, opts.steps, opts.warmup,
                                  opts.threads or measure.cpu_threads(), device)
        for k in ("train", "infer"):
            theirs[f"{k}_fraction_of_matmul"] = theirs[f"{k}_gflops"] / peak
        result["timm"] = theirs
        result["ratio"] = {f"{k}_images_per_sec": ours_out[f"{k}_images_per_sec"]
                           / theirs[f"{k}_images_per_sec"] for k in ("train", "infer")}

    if opts.conv_layers:
        log("convolutions one by one: ours and PyTorch")
        result["conv_layers"] = conv_layers(model, conv, config, opts, torch_side.device())

    if opts.ab:
        log(f"A/B: as configured and with {opts.ab}, train steps alternating")
        result["ab"] = ours_lib.ab(config, opts.num_classes, opts.ab, opts.steps, opts.warmup,
                                   compiled_a)
        compiled_a = None

    if opts.memory_sweep:
        log("memory sweep: compiling at two batch sizes, remat off and on")
        result["memory_sweep"] = ours_lib.memory_sweep(config, opts.num_classes)

    if opts.accum_sweep:
        log("accumulation sweep: the train step with 1, 2, 4 micro-batches per update")
        result["accum_sweep"] = ours_lib.accum_sweep(config, opts.num_classes, opts.steps,
                                                     opts.warmup)

    if opts.pipeline_batches > 0:
        log(f"input pipeline: {opts.dataset}")
        pipe = bench_pipeline(config, opts)
        result["pipeline"] = pipe
        result["bound_by"] = ("input pipeline" if pipe["images_per_sec"]
                              < ours_out["train_images_per_sec"] else "train step")
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def conv_layers(model, conv, config: ml_collections.ConfigDict, opts: Options,
                device: str = "cpu") -> dict[str, Any]:
    """Each distinct convolution of the network alone, forward and backward, ours (the
    model's convolution, with its custom gradient) and PyTorch's (`nn.Conv2d`,
    channels-last), on the same arrays. The backward pass computes the kernel gradient,
    and the input gradient except where the input is the image."""
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(opts.threads or measure.cpu_threads())
    per_device = max(1, config.batch_size // jax.device_count())
    rng = np.random.default_rng(0)
    dtype, steps, warmup = config.model.dtype, opts.steps, opts.warmup
    rows = []
    for c in ours_lib.network_convolutions(model, per_device, config.image_size):
        arrays = _conv_arrays(c, rng)
        rows.append({**c, **ours_lib.time_conv(conv, arrays, c, dtype, steps, warmup),
                     **torch_side.time_conv(arrays, c, dtype, steps, warmup, device)})
    totals = {k: sum(r["count"] * r[k] for r in rows)
              for k in ("ours_fwd_ms", "ours_bwd_ms", "torch_fwd_ms", "torch_bwd_ms")}
    rows.sort(key=lambda r: -r["count"] * (r["ours_fwd_ms"] + r["ours_bwd_ms"]
                                          - r["torch_fwd_ms"] - r["torch_bwd_ms"]))
    return {"per_device_batch": per_device, "convolutions": sum(r["count"] for r in rows),
            "distinct": len(rows), **totals, "rows": rows}


def _conv_arrays(c: dict[str, Any], rng) -> dict[str, Any]:
    """Random input, kernel and output gradient (numpy) of one convolution."""
    n, h, w, _ = c["input"]
    kh, kw, _, cout = c["kernel"]
    (sh, sw), ((top, bottom), (left, right)) = c["strides"], c["padding"]
    out = (n, (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1, cout)
    return {"x": rng.standard_normal(c["input"]), "w": rng.standard_normal(c["kernel"]) * 0.1,
            "g": rng.standard_normal(out)}


def bench_pipeline(config: ml_collections.ConfigDict, opts: Options) -> dict[str, Any]:
    """The input pipeline alone: decoded and augmented batches per second."""
    from configs import common

    from inception_flax.data import pipeline
    d = config.dataset
    if opts.dataset == DIGITS:  # the digits preset's augmentation and buffer
        d = common.apply_preset(ml_collections.ConfigDict(config.to_dict()), "digits").dataset
        pipeline.prepare_dataset(DIGITS, opts.data_dir)
    pre = pipeline.Preprocessing(
        area_range=tuple(d.area_range), aspect_ratio_range=tuple(d.aspect_ratio_range),
        random_flip=d.random_flip, central_fraction=d.central_fraction)
    ds, _ = pipeline.create_split(
        opts.dataset, opts.split, batch_size=config.batch_size, image_size=config.image_size,
        train=True, data_dir=opts.data_dir, preprocessing=pre,
        shuffle_buffer=min(d.shuffle_buffer, 2048), seed=0)
    it = iter(ds.as_numpy_iterator())
    times = measure.step_times(lambda: next(it), opts.pipeline_batches, opts.warmup + 1)
    median = statistics.median(times)
    return {"dataset": opts.dataset, "split": opts.split, "batch_ms": 1e3 * median,
            "images_per_sec": config.batch_size / median,
            "images_per_sec_mean": config.batch_size * len(times) / sum(times)}
