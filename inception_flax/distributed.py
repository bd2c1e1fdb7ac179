"""Joining a multi-process run through `jax.distributed.initialize`."""

import os

from absl import flags
import jax

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 (multi-process runs off TPU / SLURM / MPI)")
    flags.DEFINE_integer("num_processes", None, "number of processes in the run")
    flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)")
    flags.DEFINE_string("cpu_collectives", "gloo",
                        "CPU collectives for multi-process CPU runs (gloo or mpi)")


def _cluster_detected() -> bool:
    env = os.environ
    return any(k in env for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                                  "CLOUD_TPU_TASK_ID"))


def initialize() -> None:
    """Explicit flags win; a detected cluster initialises itself; else single process."""
    explicit = FLAGS.coordinator_address is not None or (FLAGS.num_processes or 1) > 1
    if not explicit and not _cluster_detected():
        return
    if FLAGS.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
    if explicit:
        missing = [n for n in ("coordinator_address", "num_processes", "process_id")
                   if getattr(FLAGS, n) is None]
        if missing:
            raise SystemExit(f"error: multi-process runs need --{', --'.join(missing)}")
        jax.distributed.initialize(FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)
    else:
        jax.distributed.initialize()
