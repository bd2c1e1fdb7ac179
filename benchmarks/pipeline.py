"""`python benchmark.py --pipeline`: the input pipeline alone, ours against timm's loader.

Training batches (decode, Inception crop, flip, resize to the config's image size, scale)
per second, and per core used, from an ImageNet-like folder of JPEGs
(`inception_flax.data.synthetic_folder`, generated unless `--pipeline_root` holds one):

- ours from the folder (`folder:ROOT`), as train.py reads it;
- ours from the same images as a TFDS dataset of TFRecord files;
- timm's loader on the same files (`benchmarks.pipeline_timm`, in a subprocess: PyTorch and
  TensorFlow do not share a process here): `timm.data.create_loader`, RandomResizedCrop over
  the same area and aspect ranges, flip, bilinear resize, ToTensor, normalize to [-1, 1].

Ours runs on a private tf.data thread pool of `--pipeline_workers` threads, timm on as many
worker processes. A core is one CPU-second per second: images per CPU-second (user + system,
of every thread and worker process) is a figure the other tenants of a shared machine disturb
less than images per second. The sides alternate within each repeat; the table gives medians,
and the cores each side needs to feed the GPU train rates README states.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import flags

# Ours, train images/s on one H100 (batch 128, bfloat16): README's table.
GPU_TRAIN_RATES = {"inception_v3": 2721, "inception_v4": 1583, "inception_resnet_v2": 1269}
SIDES = ("ours_folder", "ours_tfrecord", "timm_folder")
LABELS = {"ours_folder": "ours, JPEG folder", "ours_tfrecord": "ours, TFRecord (TFDS)",
          "timm_folder": "timm loader, JPEG folder"}


def define_flags(flag_values: flags.FlagValues) -> None:
    """`--pipeline` and its options (the timed batches are `--pipeline_batches`, the untimed
    ones `--warmup`, the batch `--batch`)."""
    f = dict(flag_values=flag_values)
    flags.DEFINE_boolean("pipeline", False, "measure only the input pipeline, ours (JPEG "
                         "folder and TFRecord) against timm's loader on the same files", **f)
    flags.DEFINE_string("pipeline_root", None, "with --pipeline: the generated JPEG folder "
                        "(written there if missing; default: a temporary one)", **f)
    flags.DEFINE_integer("pipeline_images", 1000, "with --pipeline: JPEGs to generate", **f)
    flags.DEFINE_integer("pipeline_workers", 2, "with --pipeline: tf.data threads (ours) and "
                         "DataLoader worker processes (timm)", **f)
    flags.DEFINE_integer("pipeline_repeats", 5, "with --pipeline: repeats (medians)", **f)


def cpu_seconds() -> float:
    """User + system CPU time of every thread of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_batches(next_batch: Callable[[], Any], batch: int, batches: int, warmup: int,
                  cpu: Callable[[], float] = cpu_seconds) -> dict[str, float]:
    """Figures of `batches` calls of `next_batch` after `warmup` untimed ones: wall and CPU
    seconds, images/s, images per CPU-second and the cores used."""
    for _ in range(warmup):
        next_batch()
    wall0, cpu0 = time.perf_counter(), cpu()
    for _ in range(batches):
        next_batch()
    wall, used = time.perf_counter() - wall0, cpu() - cpu0
    images = batch * batches
    return {"images": images, "wall_s": wall, "cpu_s": used, "images_per_sec": images / wall,
            "images_per_core_sec": images / max(used, 1e-9), "cores_used": used / wall}


def ensure_data(root: str, num_images: int, split: str = "train") -> str:
    """The JPEG folder under `root` (written if missing) and its TFDS copy's data_dir."""
    from inception_flax.data import synthetic_folder
    tfds_dir = os.path.join(root, "tfds")
    if not os.path.isdir(os.path.join(tfds_dir, synthetic_folder.TFDS_NAME)):
        written = synthetic_folder.write_folder(root, num_images, split=split)
        synthetic_folder.write_tfds(written, tfds_dir)
    return tfds_dir


class _Ours:
    """Our training pipeline on one source; each repeat reads with a fresh iterator."""

    def __init__(self, config: ml_collections.ConfigDict, name: str, data_dir: str | None,
                 workers: int):
        from inception_flax.data import pipeline, sharding
        self.batch = config.batch_size
        self.ds, self.skipped = pipeline.create_split(
            name, "train", batch_size=config.batch_size, image_size=config.image_size,
            train=True, data_dir=data_dir, preprocessing=sharding.preprocessing(config),
            shuffle_buffer=config.dataset.shuffle_buffer, seed=config.seed,
            threadpool_size=workers, process_index=0, process_count=1)

    def repeat(self, batches: int, warmup: int) -> dict[str, float]:
        it = self.ds.as_numpy_iterator()
        return timed_batches(lambda: next(it), self.batch, batches, warmup)


class _Timm:
    """timm's loader in a subprocess that runs one repeat per request."""

    def __init__(self, root: str, config: ml_collections.ConfigDict, workers: int,
                 batches: int, warmup: int):
        d = config.dataset
        args = {"root": root, "batch": config.batch_size, "image_size": config.image_size,
                "workers": workers, "batches": batches, "warmup": warmup,
                "scale": list(d.area_range), "ratio": list(d.aspect_ratio_range),
                "hflip": 0.5 if d.random_flip else 0.0, "seed": config.seed}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.pipeline_timm", json.dumps(args)],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def repeat(self) -> dict[str, float]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the timm loader's process ended (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def run(config: ml_collections.ConfigDict, *, root: str | None, images: int, workers: int,
        repeats: int, batches: int, warmup: int, model: str,
        log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every side `repeats` times, alternating; the per-repeat figures and their medians."""
    if min(images, workers, repeats, batches) < 1 or warmup < 0:
        raise ValueError("--pipeline_images, --pipeline_workers, --pipeline_repeats and "
                         "--pipeline_batches must be positive, --warmup non-negative")
    from inception_flax.data import synthetic_folder
    with tempfile.TemporaryDirectory(prefix="inception_flax_jpegs_") as tmp:
        root = root or tmp
        log(f"JPEG folder and its TFRecord copy: {root}")
        tfds_dir = ensure_data(root, images)
        timm = _Timm(os.path.join(root, "train"), config, workers, batches, warmup)
        try:
            ours = {"ours_folder": _Ours(config, f"folder:{root}", None, workers),
                    "ours_tfrecord": _Ours(config, synthetic_folder.TFDS_NAME, tfds_dir,
                                           workers)}
            runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
            for r in range(repeats):
                log(f"repeat {r + 1}/{repeats}")
                for side, o in ours.items():
                    runs[side].append(o.repeat(batches, warmup))
                runs["timm_folder"].append(timm.repeat())
            skipped = ours["ours_folder"].skipped.count
        finally:
            timm.close()
    medians = {side: {k: statistics.median(x[k] for x in rs) for k in rs[0]}
               for side, rs in runs.items()}
    rate = GPU_TRAIN_RATES.get(model)
    for m in medians.values():
        m["cores_for_gpu_rates"] = {n: g / m["images_per_core_sec"]
                                    for n, g in GPU_TRAIN_RATES.items()}
    ratio = {side: medians[side]["images_per_core_sec"]
             / medians["timm_folder"]["images_per_core_sec"] for side in SIDES[:2]}
    return {"config": {"batch": config.batch_size, "image_size": config.image_size,
                       "workers": workers, "repeats": repeats, "timed_batches": batches,
                       "warmup": warmup, "images": images, "model": model,
                       "gpu_train_rate": rate, "cpu_threads": len(os.sched_getaffinity(0))},
            "runs": runs, "medians": medians, "ours_over_timm_per_core": ratio,
            "ours_skipped_images": skipped}


def format_table(r: dict[str, Any]) -> str:
    """The result as `benchmark.py --pipeline` prints it."""
    c, med = r["config"], r["medians"]
    names = list(GPU_TRAIN_RATES)
    lines = [
        (f"input pipeline: training batches of {c['batch']} at {c['image_size']}x"
         f"{c['image_size']} (decode, Inception crop, flip, resize), {c['images']} JPEGs, "
         f"{c['workers']} workers, medians of {c['repeats']} repeats of {c['timed_batches']} "
         f"batches, {c['cpu_threads']} CPU threads"),
        f"{'':26s} {'images/s':>9s} {'cores used':>10s} {'images/s per core':>18s}   "
        + "cores to feed " + ", ".join(f"{n} {GPU_TRAIN_RATES[n]:,}/s" for n in names)]
    for side in SIDES:
        m = med[side]
        cores = "  ".join(f"{m['cores_for_gpu_rates'][n]:6.1f}" for n in names)
        lines.append(f"{LABELS[side]:26s} {m['images_per_sec']:9.1f} {m['cores_used']:10.2f} "
                     f"{m['images_per_core_sec']:18.1f}   {cores}")
    ratio = r["ours_over_timm_per_core"]
    lines.append(f"ours / timm, images/s per core: JPEG folder {ratio['ours_folder']:.2f}x, "
                 f"TFRecord {ratio['ours_tfrecord']:.2f}x")
    lines.append(f"ours skipped {r['ours_skipped_images']} undecodable images so far "
                 "(the folder's corrupt files, once per epoch read)")
    return "\n".join(lines)


def main(config: ml_collections.ConfigDict, fv: flags.FlagValues, model: str,
         log: Callable[[str], None]) -> int:
    """`benchmark.py --pipeline`: run, print the table, write `--json`."""
    try:
        result = run(config, root=fv.pipeline_root, images=fv.pipeline_images,
                     workers=fv.pipeline_workers, repeats=fv.pipeline_repeats,
                     batches=fv.pipeline_batches, warmup=fv.warmup, model=model, log=log)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result), flush=True)
    if fv.json:
        with open(fv.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
