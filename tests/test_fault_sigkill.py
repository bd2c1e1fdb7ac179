"""Fault: the process is killed (SIGKILL) part-way. Re-running the command resumes exactly.

Three runs of the same command: one uninterrupted; one killed as soon as it has
written its first checkpoint, then re-run to the end. The resumed run restores
the parameters, optimizer state, moving average, BN statistics, random key and
each process's input position, so its final state equals the uninterrupted
run's bit for bit, and TensorBoard shows every step once.
"""

import signal
import time

import numpy as np
import pytest

from tests import runs

STEPS, EVERY = 6, 2


@pytest.mark.xdist_group("faults")
def test_sigkill_then_rerun_is_bit_exact_with_no_gap_or_repeat(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    runs.Run(runs.command(straight, STEPS, EVERY), str(tmp_path / "straight.log")).wait_ok()

    run = runs.Run(runs.command(killed, STEPS, EVERY), str(tmp_path / "killed.log"))
    first = runs.wait_for_checkpoint(run, killed)
    run.proc.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    resumed_from = runs.checkpoint_steps(killed)[-1]
    assert first <= resumed_from < STEPS, "killed too late to test a resume"

    out = runs.Run(runs.command(killed, STEPS, EVERY), str(tmp_path / "rerun.log")).wait_ok()
    assert f"resumed from step {resumed_from}" in out

    a, b = runs.read_state(killed, STEPS), runs.read_state(straight, STEPS)
    assert a.keys() == b.keys() and any("ema_params" in k for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    for tag in ("train/loss", "train/learning_rate"):
        shown, reference = runs.logged(killed, tag), runs.logged(straight, tag)
        assert sorted(shown) == list(range(1, STEPS + 1)), (tag, shown)  # no gap
        assert all(len(v) == 1 for v in shown.values()), (tag, shown)  # no repeat
        assert shown == reference, tag


def test_session_start_hides_the_steps_a_killed_attempt_logged_past_its_checkpoint(tmp_path):
    import tensorflow as tf

    from inception_flax.training import loop

    def attempt(steps):
        writer = tf.summary.create_file_writer(str(tmp_path))
        with writer.as_default():
            for s in steps:
                tf.summary.scalar("train/loss", float(s), step=s)
        writer.close()

    loop.mark_session_start(str(tmp_path), 1)
    time.sleep(1.1)
    attempt([1, 2, 3, 4])  # checkpointed at 2, logged 3 and 4, then killed
    time.sleep(2.1)  # the resumed attempt starts seconds later
    loop.mark_session_start(str(tmp_path), 3)
    attempt([3, 4, 5])
    assert runs.logged(str(tmp_path), "train/loss") == {s: [float(s)] for s in range(1, 6)}
