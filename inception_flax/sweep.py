"""Hyperparameter sweeps: named grids of `--config.FIELD=VALUE` overrides, and their results.

A config file describes its sweeps in `get_sweep(name)`, built from `product`
and `zip` of value lists:

    def get_sweep(name):
        from inception_flax.sweep import product, select, zip
        return select(name, {
            "residual_scale": product(residual_scale=[0.1, 0.17, 0.3],
                                      label_smoothing=[0.0, 0.1]),
        })

A key is a config field: its full dotted path (`model.residual_scale`, given
through a dict: `product({"model.residual_scale": [...]})`) or, when unique, its
last component (`residual_scale`). `resolve` checks every key and value against
the config and names each run after its overrides, e.g.
`model.residual_scale=0.1,label_smoothing=0.0`. `sweep.py` at the repository
root runs them; `read_run` and `results_table` summarise a run's TensorBoard
event files, whoever wrote them.

This module imports nothing heavy at load time: config files import it.
"""

from __future__ import annotations

import builtins
import csv
import dataclasses
import glob
import hashlib
import io
import itertools
import math
import os
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections


class SweepError(ValueError):
    """A sweep that cannot run as written, reported in one line."""


class UnknownSweepError(SweepError):
    pass


# ----------------------------------------------------------------------------
# Building sweeps
# ----------------------------------------------------------------------------

class Sweep:
    """An ordered list of runs; each run is an ordered mapping of field -> value."""

    def __init__(self, runs: Iterable[Mapping[str, Any]]):
        self.runs: list[dict[str, Any]] = [dict(r) for r in runs]

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self):
        return iter(self.runs)

    def __mul__(self, other: Sweep) -> Sweep:
        return product(self, other)

    def __add__(self, other: Sweep) -> Sweep:
        return chain(self, other)

    def __repr__(self) -> str:
        return f"Sweep({self.runs!r})"


def _axis(key: str, values: Any) -> Sweep:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, range)):
        raise SweepError(f"sweep axis {key!r} needs a list of values, got {values!r}")
    if not values:
        raise SweepError(f"sweep axis {key!r} has no values")
    return Sweep({key: v} for v in values)


def _factors(args: tuple[Any, ...], axes: Mapping[str, Any]) -> list[Sweep]:
    factors = []
    for arg in args:
        if isinstance(arg, Sweep):
            factors.append(arg)
        elif isinstance(arg, Mapping):  # {"model.residual_scale": [...], ...}
            factors.extend(_axis(k, v) for k, v in arg.items())
        else:
            raise SweepError(f"expected a Sweep or a {{field: values}} dict, got {arg!r}")
    factors.extend(_axis(k, v) for k, v in axes.items())
    return factors


def _merge(runs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for run in runs:
        for k, v in run.items():
            if k in merged:
                raise SweepError(f"field {k!r} is swept twice in one run")
            merged[k] = v
    return merged


def product(*sweeps: Sweep | Mapping[str, Any], **axes: Sequence[Any]) -> Sweep:
    """Every combination; the last axis varies fastest.

    `product(residual_scale=[0.1, 0.3], label_smoothing=[0.0, 0.1])` is 4 runs.
    """
    factors = _factors(sweeps, axes)
    return Sweep(_merge(c) for c in itertools.product(*(f.runs for f in factors)))


def zip(*sweeps: Sweep | Mapping[str, Any], **axes: Sequence[Any]) -> Sweep:  # noqa: A001
    """Runs side by side: the i-th run takes the i-th value of every axis (equal lengths)."""
    factors = _factors(sweeps, axes)
    lengths = {len(f) for f in factors}
    if len(lengths) > 1:
        shown = ", ".join(f"{'/'.join(f.runs[0])}: {len(f)}" for f in factors)
        raise SweepError(f"zip needs axes of one length, got {shown}")
    return Sweep(_merge(c) for c in builtins.zip(*(f.runs for f in factors)))


def chain(*sweeps: Sweep) -> Sweep:
    """One sweep after another."""
    return Sweep(r for s in sweeps for r in s.runs)


def select(name: str, sweeps: Mapping[str, Sweep]) -> Sweep:
    """`sweeps[name]`, or an error that lists the known names."""
    if name not in sweeps:
        raise UnknownSweepError(
            f"unknown sweep {name!r}: choose one of {', '.join(sorted(sweeps))}")
    return sweeps[name]


# ----------------------------------------------------------------------------
# Resolving a sweep against a config
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # directory name under the sweep's workdir
    overrides: dict[str, Any]  # full dotted field path -> value, in sweep order

    def flags(self) -> list[str]:
        return override_flags(self.overrides)

    def description(self) -> str:
        return ", ".join(f"{k}={format_value(v)}" for k, v in self.overrides.items())


def _leaf_paths(config, prefix: str = "") -> list[str]:
    paths = []
    for key in config.keys():
        value = config[key]
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            paths.extend(_leaf_paths(value, path + "."))
        else:
            paths.append(path)
    return paths


def resolve_key(config, key: str) -> str:
    """The full dotted path of `key`: itself if it is one, else the unique field of that name."""
    paths = _leaf_paths(config)
    if key in paths:
        return key
    matches = [p for p in paths if p.endswith("." + key)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise SweepError(f"sweep field {key!r} is ambiguous: write one of {', '.join(matches)}")
    raise SweepError(f"sweep field {key!r} is not a config field")


def get_path(config, path: str) -> Any:
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def set_path(config, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value


def format_value(value: Any) -> str:
    """A value as `--config.FIELD=` text that ml_collections parses back to the same value."""
    if value is None:
        raise SweepError("None cannot be given on the command line")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(format_value(v) for v in value) + ("," if len(value) == 1
                                                                   else "") + ")"
    return str(value)


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
    return [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]


_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]+")
MAX_NAME = 160


def run_name(overrides: Mapping[str, Any]) -> str:
    """`model.residual_scale=0.1,label_smoothing=0.0`, made safe as a directory name."""
    if not overrides:
        return "default"
    parts = []
    for key, value in overrides.items():
        if isinstance(value, (list, tuple)):
            text = "_".join(format_value(v) for v in value)
        else:
            text = format_value(value)
        parts.append(f"{key}={_UNSAFE.sub('_', text).strip('_') or '_'}")
    name = ",".join(parts)
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9]}~{digest}"
    return name


def resolve(sweep: Sweep, config) -> list[Run]:
    """Full field paths, values typed as the config's fields, and unique run names.

    Each value is set on a copy of `config`, so a value of the wrong type or a
    field that does not exist fails here, before anything runs.
    """
    if not len(sweep):
        raise SweepError("the sweep has no runs")
    runs, names = [], {}
    for i, raw in enumerate(sweep.runs):
        trial = config.copy_and_resolve_references()
        overrides: dict[str, Any] = {}
        for key, value in raw.items():
            path = resolve_key(config, key)
            if path in overrides:
                raise SweepError(f"run {i}: {key!r} and another key both name {path}")
            try:
                set_path(trial, path, value)
            except (TypeError, ValueError, KeyError, AttributeError) as e:
                raise SweepError(f"{path}={value!r}: {str(e).splitlines()[0]}") from None
            typed = get_path(trial, path)
            overrides[path] = tuple(typed) if isinstance(typed, list) else typed
            format_value(overrides[path])  # every value must have a command-line form
        name = run_name(overrides)
        if name in names:
            raise SweepError(f"runs {names[name]} and {i} are the same: {name}")
        names[name] = i
        runs.append(Run(name, overrides))
    return runs


def apply(config, run: Run):
    """A copy of `config` with the run's overrides."""
    config = config.copy_and_resolve_references()
    for path, value in run.overrides.items():
        set_path(config, path, value)
    return config


# ----------------------------------------------------------------------------
# The state of a run's workdir
# ----------------------------------------------------------------------------

def checkpoint_steps(workdir: str) -> list[int]:
    """Finalised checkpoint steps (orbax writes into a temporary name, then renames)."""
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root)
                  if n.isdigit() and os.path.isdir(os.path.join(root, n)))


@dataclasses.dataclass(frozen=True)
class RunState:
    status: str  # new | partial | finished | started (checkpoints; the target is unknown)
    step: int  # latest checkpoint step, 0 for none
    target: int | None  # num_train_steps, when known

    def describe(self) -> str:
        if self.status == "new":
            return "new"
        if self.status == "finished":
            return f"finished (step {self.step})"
        if self.status == "partial":
            return f"resumes from step {self.step} of {self.target}"
        return f"resumes from step {self.step}"


def run_state(workdir: str, target: int | None) -> RunState:
    steps = checkpoint_steps(workdir)
    if not steps:
        return RunState("new", 0, target)
    last = steps[-1]
    if target is None:
        return RunState("started", last, None)
    return RunState("finished" if last >= target else "partial", last, target)


# ----------------------------------------------------------------------------
# Reading a run's TensorBoard events
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class RunEvents:
    # tag -> step -> value, later sessions overriding earlier ones at the same step
    scalars: dict[str, dict[int, float]]
    images_per_sec: list[float]  # per logged interval, each session's first one dropped
    wall_time: float  # seconds between the first and last event, summed over sessions


def _event_files(run_dir: str) -> list[str]:
    def written(path: str) -> tuple[float, str]:
        parts = os.path.basename(path).split(".")  # events.out.tfevents.<time>.<host>...
        try:
            return float(parts[3]), path
        except (IndexError, ValueError):
            return 0.0, path
    return sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")), key=written)


def read_run(run_dir: str) -> RunEvents:
    """The scalar summaries of a run's own event files (not its subdirectories)."""
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.util import tensor_util

    scalars: dict[str, dict[int, float]] = {}
    rates: list[float] = []
    spans: list[tuple[float, float]] = []
    for path in _event_files(run_dir):
        times: list[float] = []
        file_rates: list[float] = []
        try:
            for event in event_file_loader.EventFileLoader(path).Load():
                if event.wall_time:
                    times.append(event.wall_time)
                for value in event.summary.value:
                    if not value.HasField("tensor"):
                        continue
                    array = tensor_util.make_ndarray(value.tensor)
                    if array.ndim or array.dtype.kind not in "fiu":
                        continue
                    scalars.setdefault(value.tag, {})[int(event.step)] = float(array)
                    if value.tag == "train/images_per_sec":
                        file_rates.append(float(array))
        except Exception:  # noqa: BLE001 - a truncated file: keep what was read
            pass
        rates.extend(file_rates[1:] if len(file_rates) > 1 else file_rates)
        if times:
            spans.append((min(times), max(times)))
    wall, end = 0.0, -math.inf
    for start, stop in sorted(spans):  # union of the files' spans
        if stop > end:
            wall += stop - max(start, end)
            end = stop
    return RunEvents(scalars, rates, wall)


# ----------------------------------------------------------------------------
# The results table
# ----------------------------------------------------------------------------

COLUMNS = ("run", "overrides", "status", "step", "final_train_loss", "best_eval_top1",
           "best_eval_top5", "images_per_sec", "wall_time_s")
HEADERS = ("run", "overrides", "status", "step", "final train loss", "best eval top-1",
           "best eval top-5", "images/s", "wall time")


def result_row(run: Run, run_dir: str, status: str) -> dict[str, Any]:
    events = read_run(run_dir) if os.path.isdir(run_dir) else RunEvents({}, [], 0.0)
    loss = events.scalars.get("train/loss", {})
    top1 = events.scalars.get("eval/top1", {})
    top5 = events.scalars.get("eval/top5", {})
    return {
        "run": run.name,
        "overrides": run.description(),
        "status": status,
        "step": max(loss) if loss else None,
        "final_train_loss": loss[max(loss)] if loss else None,
        "best_eval_top1": max(top1.values()) if top1 else None,
        "best_eval_top5": max(top5.values()) if top5 else None,
        "images_per_sec": statistics.median(events.images_per_sec)
        if events.images_per_sec else None,
        "wall_time_s": events.wall_time if events.wall_time else None,
    }


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("best_eval_top1", "best_eval_top5"):
        return f"{100 * value:.2f}%"
    if column == "final_train_loss":
        return f"{value:.4f}"
    if column == "images_per_sec":
        return f"{value:.1f}"
    if column == "wall_time_s":
        return _duration(value)
    return str(value).replace("|", "\\|")


def results_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c, row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def results_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row[c] is None else row[c] for c in COLUMNS})
    return out.getvalue()


def write_results(workdir: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """`results.csv` and `results.md` in the sweep's workdir; returns the markdown."""
    os.makedirs(workdir, exist_ok=True)
    text = results_markdown(rows)
    for name, content in (("results.csv", results_csv(rows)), ("results.md", text)):
        tmp = os.path.join(workdir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(content)
        os.replace(tmp, os.path.join(workdir, name))
    return text
