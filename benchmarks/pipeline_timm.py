"""timm's training loader on a folder of JPEGs, timed for `benchmark.py --pipeline`.

Run by `benchmarks.pipeline` as `python -m benchmarks.pipeline_timm ARGS_JSON` (PyTorch and
TensorFlow do not share a process here): for each line `go` on stdin it times one repeat
with a fresh iterator of the loader and answers one JSON line of figures on stdout.

The loader is `timm.data.create_loader` over `timm.data.ImageDataset` (PIL decodes the
whole image), as timm's train.py builds it on a CPU (no prefetcher): RandomResizedCrop over
the area and aspect ranges given, horizontal flip, bilinear resize, ToTensor, normalize with
mean and std 0.5 (values in [-1, 1], as ours); no colour jitter, no other augmentation.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def cpu_seconds(process) -> float:
    """User + system CPU time of `process` and of its live worker processes."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except Exception:  # noqa: BLE001 - a worker that just ended
            continue
        total += t.user + t.system
    return total


def make_loader(args: dict[str, Any]):
    """timm's training loader of the folder `args["root"]`."""
    import timm.data
    import torch

    torch.manual_seed(args["seed"])
    dataset = timm.data.ImageDataset(args["root"])
    return timm.data.create_loader(
        dataset, input_size=(3, args["image_size"], args["image_size"]),
        batch_size=args["batch"], is_training=True, use_prefetcher=False,
        scale=tuple(args["scale"]), ratio=tuple(args["ratio"]), hflip=args["hflip"],
        color_jitter=None, interpolation="bilinear", mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5), num_workers=args["workers"], device=torch.device("cpu"),
        persistent_workers=True)


def main(argv: list[str]) -> int:
    import logging

    import psutil

    from benchmarks import pipeline

    logging.getLogger("timm").setLevel(logging.ERROR)  # a line per corrupt file otherwise
    args = json.loads(argv[1])
    loader = make_loader(args)
    process = psutil.Process()

    def epochs():
        while True:
            yield from loader

    for line in sys.stdin:
        if line.strip() != "go":
            continue
        it = epochs()
        result = pipeline.timed_batches(lambda: next(it), args["batch"], args["batches"],
                                        args["warmup"], cpu=lambda: cpu_seconds(process))
        it.close()
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
