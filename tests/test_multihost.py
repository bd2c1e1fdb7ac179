"""Multi-process training on JAX's multi-controller runtime, on localhost.

2 processes x 2 CPU devices (gloo collectives, `jax.distributed.initialize`
through train.py's flags) train on the same global batches as 1 process x 4
devices, and end with the same parameters (in float64: see FLOAT64).
`dataset.input_shards=2` makes the data order independent of the process
count: each global batch is one batch of each of 2 shards of the split, read by
one process each, or both by the single process. The SIGTERM test sends the
preemption notice to one process only.
"""

import os
import re
import signal
import socket

import numpy as np
import pytest

from tests import runs

STEPS = 3
SETTINGS = {"batch_size": 16, "eval_batch_size": 16, "dataset.input_shards": 2}
# In float64: this tiny network's backward pass at initialisation magnifies float
# rounding enormously (in float32, a 1e-7 relative change of the input images
# moves its gradients by ~3%), and the two sides' cross-device sums add in
# different orders; float32 runs agree on the first loss, then part by ~1e-3.
FLOAT64 = {"model.dtype": "float64"}
# The bound README's Faults table states (2.4e-11 and 9.4e-11 measured), against 0.013
# of movement.
BOUND = 1e-9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(workdir: str, steps: int, every: int, tmp_path, tag: str, x64: bool = False,
                  **fields) -> list[runs.Run]:
    port = free_port()
    environ = runs.env(2)
    if x64:
        environ["JAX_ENABLE_X64"] = "1"
    return [runs.Run(runs.command(workdir, steps, every, **SETTINGS, **fields) + [
        f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
        str(tmp_path / f"{tag}{i}.log"), environ) for i in range(2)]


@pytest.mark.xdist_group("multihost")
def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path):
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    procs = two_processes(multi, STEPS, 1, tmp_path, "multi", x64=True, **FLOAT64)
    environ = dict(runs.env(4), JAX_ENABLE_X64="1")
    one = runs.Run(runs.command(single, STEPS, 1, **SETTINGS, **FLOAT64),
                   str(tmp_path / "single.log"), environ)
    outputs = [p.wait_ok(timeout=1200) for p in [*procs, one]]
    assert "process 0 of 2, 4 devices" in outputs[0]
    assert "process 1 of 2, 4 devices" in outputs[1]
    assert "process 0 of 1, 4 devices" in outputs[2]

    a, b = runs.read_state(multi, STEPS), runs.read_state(single, STEPS)
    params = [k for k in a if k.startswith("['params']")]
    assert params and a.keys() == b.keys() and a[params[0]].dtype == np.float64
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in params)
    assert worst <= BOUND, worst
    first = runs.read_state(single, 1)
    moved = max(float(np.max(np.abs(b[k] - first[k]))) for k in params)
    assert moved >= 1e6 * BOUND, moved  # steps 2 and 3 moved the parameters far beyond it
    # Only process 0 writes TensorBoard events; each process saved its input position.
    assert sorted(runs.logged(multi, "train/loss")) == [1, 2, 3]
    names = os.listdir(os.path.join(multi, "input_state", str(STEPS)))
    assert {n.split(".")[0] for n in names} == {"process_0", "process_1"}


@pytest.mark.xdist_group("multihost")
def test_sigterm_to_one_process_checkpoints_all_at_the_same_step(tmp_path):
    workdir = str(tmp_path / "run")
    procs = two_processes(workdir, 1000, 2, tmp_path, "proc")
    runs.wait_for_checkpoint(procs[0], workdir)
    procs[1].proc.send_signal(signal.SIGTERM)  # the notice reaches one host only
    outputs = [p.wait_ok(timeout=600) for p in procs]
    steps = {int(m) for out in outputs
             for m in re.findall(r"preempted: checkpoint written at step (\d+)", out)}
    assert len(steps) == 1, outputs[0][-2000:]
    step = steps.pop()
    assert 2 <= step < 1000 and runs.checkpoint_steps(workdir)[-1] == step
