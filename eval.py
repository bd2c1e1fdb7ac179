"""Evaluate a run: `python eval.py --config=configs/NET.py[:preset] --workdir=DIR`.

Uses the latest readable checkpoint of DIR (its parameter moving average when the
run kept one), or `--checkpoint=PATH` (a run's workdir or converted weights).
Prints top-1 / top-5 (and the step evaluated) and writes them to DIR/eval for TensorBoard,
at the checkpoint's step. A misspelt or mistyped --config.FIELD is one line (inception_flax/cli.py).
"""

if __name__ == "__main__":  # before JAX is imported: see inception_flax/cpu/process.py
    from inception_flax.cpu import process

    process.prepare()

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from inception_flax import cli, distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "the run to evaluate")
flags.DEFINE_string("checkpoint", None, "a run's workdir or converted weights (overrides --workdir)")
distributed.define_flags()
flags.mark_flag_as_required("config")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    distributed.initialize()
    from inception_flax.training import checks, evaluate  # after jax.distributed.initialize

    try:
        result = evaluate.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)
    except (checks.ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: round(v, 6) for k, v in result.items()}))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
