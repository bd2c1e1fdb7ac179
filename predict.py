"""Classify image files: `python predict.py --checkpoint=DIR IMAGE_OR_FOLDER_OR_GLOB...`.

DIR is a run's workdir (its moving average of the parameters when it kept one) or
converted weights, as `eval.py --checkpoint` takes. Prints, per image, its top-k
classes with their names and probabilities (`--top_k`); `--json FILE` / `--csv FILE`
write them too. Each image gets the network's own evaluation preprocessing
(inception_flax/data/files.py). A file that cannot be read is one `error:` line
naming it, the others are still classified, and the exit status is 1. Bad flags,
an unknown checkpoint or a too small `--image_size` are one line and exit status 2.
"""

if __name__ == "__main__":  # before JAX is imported: see inception_flax/cpu/process.py
    from inception_flax.cpu import process

    process.prepare()

import csv
import json
import sys

from absl import app, flags
from ml_collections import config_flags

from inception_flax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "a run's workdir or converted weights")
flags.DEFINE_integer("top_k", 5, "classes to show per image", lower_bound=1)
flags.DEFINE_integer("batch_size", 32, "images per step, over every local device",
                     lower_bound=1)
flags.DEFINE_integer("image_size", None, "input size (default: the network's own)")
flags.DEFINE_string("json", None, "also write the predictions to this JSON file")
flags.DEFINE_string("csv", None, "also write the predictions to this CSV file")
config_flags.DEFINE_config_file(
    "config", None, "a run's config, for a workdir without config.json (older runs)",
    lock_config=True)
flags.mark_flag_as_required("checkpoint")


def write_json(path: str, network, predictions, failures) -> None:
    with open(path, "w") as f:
        json.dump({"checkpoint": FLAGS.checkpoint, "network": network.name,
                   "step": network.step, "moving_average": network.moving_average,
                   "predictions": [
                       {"file": p.path, "top_k": [
                           {"class": c, "name": n, "probability": q}
                           for c, n, q in zip(p.classes, p.names, p.probabilities)]}
                       for p in predictions],
                   "errors": [{"file": e.path, "error": e.error} for e in failures]},
                  f, indent=1)


def write_csv(path: str, predictions) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "rank", "class", "name", "probability"])
        for p in predictions:
            for rank, (c, n, q) in enumerate(zip(p.classes, p.names, p.probabilities), 1):
                w.writerow([p.path, rank, c, n, f"{q:.8f}"])


def main(argv):
    patterns = argv[1:]
    if not patterns:
        raise app.UsageError("give image files, folders or globs to classify")
    from inception_flax import inference

    try:
        network = inference.load(FLAGS.checkpoint, FLAGS.image_size, FLAGS.config)
    except inference.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    paths = inference.expand(patterns)
    predictions, failures = [], []
    for result in inference.classify(network, paths, FLAGS.batch_size, FLAGS.top_k):
        if isinstance(result, inference.Failure):
            failures.append(result)
            print(f"error: {result.error}", file=sys.stderr, flush=True)
        else:
            predictions.append(result)
            print(inference.line(result), flush=True)
    if FLAGS.json:
        write_json(FLAGS.json, network, predictions, failures)
    if FLAGS.csv:
        write_csv(FLAGS.csv, predictions)
    if failures:
        print(f"{len(failures)} of {len(paths)} files could not be classified",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
