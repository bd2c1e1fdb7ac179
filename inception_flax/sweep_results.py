"""A sweep's runs after the fact: each workdir's state, its TensorBoard events, the results table.

`run_state` tells whether a run's workdir is new, part-way or complete (from its
checkpoints); `read_run` reads the scalars of a run's event files, whoever wrote
them; `result_row`, `results_markdown`, `results_csv` and `write_results` make the
table `sweep.py` prints and writes. The sweeps themselves are defined and resolved
in `inception_flax.sweep`. This module imports nothing heavy at load time.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from inception_flax.sweep import Run


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
