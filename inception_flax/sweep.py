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
root runs them; `inception_flax.sweep_results` summarises their workdirs and
TensorBoard event files.

This module imports nothing heavy at load time: config files import it.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import itertools
import re
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
