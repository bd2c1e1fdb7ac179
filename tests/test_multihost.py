"""Multi-process training on JAX's multi-controller runtime, on localhost.

2 processes x 2 CPU devices (gloo collectives, `jax.distributed.initialize`
through train.py's flags) train on the same global batches as 1 process x 4
devices. `dataset.input_shards=2` makes the
data order independent of the process count: each global batch is one batch of
each of 2 shards of the split, read by one process each, or both by the single
process. The SIGTERM test sends the preemption notice to one process only.
"""

import os
import re
import signal
import socket

import pytest

from tests import runs

STEPS = 3
SETTINGS = {"batch_size": 16, "eval_batch_size": 16, "dataset.input_shards": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(workdir: str, steps: int, every: int, tmp_path, tag: str) -> list[runs.Run]:
    port = free_port()
    return [runs.Run(runs.command(workdir, steps, every, **SETTINGS) + [
        f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
        str(tmp_path / f"{tag}{i}.log"), runs.env(2)) for i in range(2)]


@pytest.mark.xdist_group("multihost")
def test_two_processes_of_two_devices_train_like_one_process_of_four(tmp_path):
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    procs = two_processes(multi, STEPS, STEPS, tmp_path, "multi")
    one = runs.Run(runs.command(single, STEPS, STEPS, **SETTINGS), str(tmp_path / "single.log"),
                   runs.env(4))
    outputs = [p.wait_ok(timeout=1200) for p in [*procs, one]]
    assert "process 0 of 2, 4 devices" in outputs[0]
    assert "process 1 of 2, 4 devices" in outputs[1]
    assert "process 0 of 1, 4 devices" in outputs[2]

    # Same initialisation, same global batch on the same devices: the same first loss.
    a, b = (runs.logged(w, "train/loss") for w in (multi, single))
    assert sorted(a) == sorted(b) == [1, 2, 3]  # only process 0 writes events
    assert a[1][0] == pytest.approx(b[1][0], rel=1e-5)
    # Later steps agree only as far as float rounding allows: the cross-device sums
    # add in another order, and the backward pass of this tiny network at
    # initialisation magnifies that (a 1e-7 relative change of the input images
    # alone moves its gradients by ~3%), so no 1e-5 bound on the parameters holds.
    for step in (2, 3):
        assert a[step][0] == pytest.approx(b[step][0], rel=2e-2)
    sa, sb = runs.read_state(multi, STEPS), runs.read_state(single, STEPS)
    assert sa.keys() == sb.keys() and int(sa["['step']"]) == STEPS
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
