"""Train an Inception network: `python train.py --config=configs/NET.py[:preset] --workdir=DIR`.

Re-running the same command on the same workdir resumes from its latest checkpoint.
Override any config field with `--config.FIELD=VALUE`. Multi-process runs join
through `jax.distributed.initialize` (automatic on TPU pods and SLURM / Open MPI;
otherwise pass --coordinator_address, --num_processes and --process_id).
"""

if __name__ == "__main__":  # before JAX is imported: see inception_flax/cpu/process.py
    from inception_flax.cpu import process

    process.prepare()

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from inception_flax import cli, distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints and TensorBoard logs")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    distributed.initialize()
    # imported after jax.distributed.initialize
    from inception_flax import checkpoint
    from inception_flax.training import checks, loop

    try:
        loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (checks.ConfigError, checkpoint.RunMismatchError, checkpoint.CheckpointError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except checks.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
