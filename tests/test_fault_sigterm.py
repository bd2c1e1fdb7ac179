"""Fault: a preemption notice (SIGTERM). The run checkpoints at the current step and exits 0."""

import re
import signal

import pytest

from tests import runs


@pytest.mark.xdist_group("faults")
def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path / "run")
    run = runs.Run(runs.command(workdir, 1000, 2), str(tmp_path / "run.log"))
    runs.wait_for_checkpoint(run, workdir)
    run.proc.send_signal(signal.SIGTERM)
    out = run.wait_ok(timeout=600)
    step = int(re.search(r"preempted: checkpoint written at step (\d+)", out).group(1))
    assert 2 <= step < 1000
    assert runs.checkpoint_steps(workdir)[-1] == step
    assert sorted(runs.logged(workdir, "train/loss")) == list(range(1, step + 1))
