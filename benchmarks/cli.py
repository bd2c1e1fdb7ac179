"""The benchmark's command line: train.py's config flags, the benchmark's own, and `main`.

The network comes from a config file as for training: `--config=configs/NET.py[:preset]`
(or `--model NET`, short for it), any field overridden with `--config.FIELD=VALUE`
(`--config.model.dtype=bfloat16`, `--config.model.aux_logits=false`,
`--config.image_size=149`, ...). `--batch N` sets both batch sizes (default 16,
or `--config.batch_size`), `--kernels` sets `config.kernels`. The other flags are
the benchmark's own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from benchmarks import ours, pipeline, report, run, torch_side
from inception_flax import kernels

DEFAULT_MODEL = "inception_v3"
DEFAULT_BATCH = 16
KERNELS = kernels.CHOICES

# Model options the benchmark once mirrored: they are config overrides now.
REMOVED = {
    "dtype": "--config.model.dtype=bfloat16",
    "image_size": "--config.image_size=N",
    "aux": "--config.model.aux_logits=true", "noaux": "--config.model.aux_logits=false",
    "remat": "--config.model.remat=true", "noremat": "--config.model.remat=false",
    "bn_remat": "--config.model.bn_remat=true", "nobn_remat": "--config.model.bn_remat=false",
    "merge_pointwise": "--config.model.merge_pointwise=true",
    "nomerge_pointwise": "--config.model.merge_pointwise=false",
    "scan_unroll": "--config.model.scan_unroll=K",
    "depth_multiplier": "--config.model.depth_multiplier=D",
}


class UsageError(ValueError):
    """A command line the benchmark cannot run: one line for the user."""


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """The benchmark's flags on `flag_values` (a private set: absl's global one stays as is)."""
    f = dict(flag_values=flag_values)
    config_flags.DEFINE_config_file("config", None, "experiment config file, as train.py's",
                                    lock_config=True, sys_argv=list(argv), **f)
    flags.DEFINE_string("model", None, f"network: short for --config=configs/NET.py[:preset] "
                        f"(default {DEFAULT_MODEL})", **f)
    flags.DEFINE_integer("batch", None, f"global batch (a multiple of the devices): sets "
                         f"config.batch_size and eval_batch_size (default: "
                         f"--config.batch_size if given, else {DEFAULT_BATCH})", **f)
    flags.DEFINE_enum("kernels", None, KERNELS, "sets config.kernels: how convolutions, "
                      "BatchNorm and pools compute (default: the config's)", **f)
    flags.DEFINE_enum("compare", None, ["timm"], "also run the timm / torchvision model in "
                      "this process", **f)
    flags.DEFINE_string("json", None, "write the results here", **f)
    flags.DEFINE_integer("steps", 10, "timed steps (medians)", **f)
    flags.DEFINE_integer("warmup", 2, "untimed steps first", **f)
    flags.DEFINE_integer("num_classes", 1000, "classes of the classifier", **f)
    flags.DEFINE_boolean("memory_sweep", False, "also compile the step at batch/2 and batch, "
                         "remat off and on, and report XLA's buffer sizes", **f)
    flags.DEFINE_boolean("accum_sweep", False, "also compile and time the train step at "
                         "the same global batch with --config.grad_accum_steps=1, 2, 4 "
                         "(micro-batches per update): XLA's temporaries and step times", **f)
    flags.DEFINE_string("dataset", run.DIGITS, "input pipeline: TFDS name or folder:/path", **f)
    flags.DEFINE_string("split", "train", "input pipeline: split", **f)
    flags.DEFINE_string("data_dir", None, "input pipeline: TFDS data_dir", **f)
    flags.DEFINE_integer("pipeline_batches", 10, "timed input-pipeline batches; 0 skips it", **f)
    flags.DEFINE_integer("matmul_size", 2048, "side of the matmul that measures the machine", **f)
    flags.DEFINE_boolean("warm_compile", True, "time the compile from a warm persistent cache "
                         "in a subprocess (--nowarm_compile skips it)", **f)
    flags.DEFINE_integer("threads", None, "PyTorch threads (default: the CPUs this process "
                         "may use)", **f)
    flags.DEFINE_boolean("conv_layers", False, "with --compare timm: also time each "
                         "convolution of the network alone, forward and backward, ours and "
                         "PyTorch's", **f)
    flags.DEFINE_string("ab", None, "FIELD=VALUE: also time ours with this config override "
                        "(e.g. kernels=xla_cpu, model.bn_remat=false), train steps of the two "
                        "alternating in this process, and print the ratio", **f)
    flags.DEFINE_boolean("probe", False, "internal: the warm-compile subprocess", **f)
    pipeline.define_flags(flag_values)


def _normalize(arg: str) -> str:
    """`--pipeline-batches 0` and `--no-warm-compile` as absl spells them (the benchmark's
    flags once had argparse's spelling); config overrides are left alone."""
    if not arg.startswith("--") or arg.startswith("--config"):
        return arg
    name, sep, value = arg[2:].partition("=")
    if name.startswith("no-"):
        name = "no" + name[3:]
    return f"--{name.replace('-', '_')}{sep}{value}"


def expand(argv: Sequence[str]) -> list[str]:
    """`argv` with `--model NET[:preset]` (or neither it nor --config) turned into
    `--config=<configs>/NET.py[:preset]`, first, so that overrides come after it."""
    import configs

    from inception_flax import models

    argv = [argv[0]] + [_normalize(a) for a in argv[1:]]
    model, rest, i = None, [argv[0]], 1
    has_config = False
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].partition("=")[0] if arg.startswith("--") else None
        if name in REMOVED:
            raise UsageError(f"--{name} is a config override now: use {REMOVED[name]}")
        if name == "model":
            if "=" in arg:
                model = arg.partition("=")[2]
            elif i + 1 < len(argv):
                model, i = argv[i + 1], i + 1
            else:
                raise UsageError("--model needs a network name")
        else:
            has_config |= name == "config" or arg == "-config" or arg.startswith("-config=")
            rest.append(arg)
        i += 1
    if has_config:
        if model is not None:
            raise UsageError("give --config or --model, not both")
        return rest
    name, _, preset = (model or DEFAULT_MODEL).partition(":")
    try:
        name = models.canonical_name(name)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None
    path = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), f"{name}.py")
    return [rest[0], f"--config={path}" + (f":{preset}" if preset else "")] + rest[1:]


def _parse(argv: Sequence[str]
           ) -> tuple[ml_collections.ConfigDict, run.Options, flags.FlagValues]:
    argv = expand(argv)
    fv = flags.FlagValues()
    try:
        define_flags(fv, argv)
        extra = fv(argv)
    except flags.Error as e:
        raise UsageError(str(e)) from None
    except (AttributeError, KeyError) as e:  # ml_collections: --config.FIELD it lacks
        field = str(e).strip("\"'")
        raise UsageError(f"--config.*: the config has no field {field!r}") from None
    if len(extra) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(extra[1:])}")
    config = fv.config
    given = dict(config_flags.get_override_values(fv["config"]))
    batch = fv.batch
    if batch is None:
        batch = config.batch_size if "batch_size" in given else DEFAULT_BATCH
    if batch < 1:
        raise UsageError(f"--batch must be positive, got {batch}")
    config.batch_size = config.eval_batch_size = batch  # inference times the same batch
    config.dataset.num_classes = fv.num_classes
    if fv.kernels is not None:
        config.kernels = fv.kernels
    fields = {f.name for f in dataclasses.fields(run.Options)}
    opts = run.Options(
        **{name: fv[name].value for name in fields if name in fv},
        argv=tuple(argv), overrides={"config_file": fv["config"].config_filename, **given,
                                     "batch_size": batch, "kernels": config.kernels})
    return config, opts, fv


def parse(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, run.Options]:
    """The config (file + overrides + --batch / --kernels / --num_classes) and the
    benchmark's options, from a command line (`argv[0]` is the program)."""
    config, opts, _ = _parse(argv)
    run.check(config, opts)
    return config, opts


def _help(argv: Sequence[str]) -> str:
    fv = flags.FlagValues()
    define_flags(fv, argv[:1])
    doc = sys.modules[__name__].__doc__
    return f"usage: benchmark.py [--config=FILE | --model NET] [flags]\n\n{doc}\n{fv}"


def _stderr_log() -> Callable[[str], None]:
    """Progress lines on stderr, stamped with the seconds since this call."""
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[benchmark {time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr,
              flush=True)
    return log


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull", "-help") for a in argv[1:]):
        print(_help(argv))
        return 0
    try:
        config, opts, fv = _parse(argv)
        run.check(config, opts)
    except ValueError as e:  # UsageError, and a bad --compare / --conv_layers
        print(f"error: {e}", file=sys.stderr)
        return 2
    if fv.pipeline:
        return pipeline.main(config, fv, config.model.name, _stderr_log())
    if opts.compare == "timm":
        # On a GPU, JAX would otherwise take 75% of its memory up front, and PyTorch
        # shares the device in this process. Set before JAX is imported.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if not fv.probe:
            torch_side.import_torch_stack()  # before anything loads TensorFlow
    if fv.probe:
        probe = ours.warm_compile_probe(config, opts.num_classes)
        print(ours.PROBE_PREFIX + json.dumps(probe), flush=True)
        return 0
    log = _stderr_log()
    try:
        result = run.run_benchmark(config, opts, log=log)
    except ValueError as e:  # the trainer's ConfigError among them
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format_table(result), flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":  # the warm-compile probe's entry (see `ours.run_probe`)
    sys.exit(main())
