"""Fault: the loss or the update turns non-finite (here: a learning rate of 1e38).

`nonfinite=stop` ends the run with a message naming the step and keeps the last
good checkpoint, never writing the non-finite state; `nonfinite=skip` drops each
such update and goes on.
"""

import shutil

import numpy as np
import pytest

from inception_flax.training import checks, loop
from tests import runs


@pytest.fixture(scope="module")
def two_good_steps(tmp_path_factory):
    """A run of 2 steps with its checkpoint at step 2."""
    workdir = str(tmp_path_factory.mktemp("nonfinite") / "base")
    loop.train_and_evaluate(runs.config(2, 2), workdir)
    return workdir


def resumed(base: str, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(base, workdir)
    return workdir


@pytest.mark.xdist_group("nonfinite")
def test_stop_names_the_step_and_keeps_the_last_good_checkpoint(two_good_steps, tmp_path):
    workdir = resumed(two_good_steps, tmp_path)
    with pytest.raises(checks.NonFiniteError, match="non-finite loss or gradient at step 3: "
                       "stopping; the last good checkpoint \\(step 2\\) is kept"):
        loop.train_and_evaluate(runs.config(6, 1, learning_rate=1e38), workdir)
    assert runs.checkpoint_steps(workdir) == [2]
    state = runs.read_state(workdir, 2)
    assert all(np.isfinite(v).all() for v in state.values())
    for k, v in runs.read_state(two_good_steps, 2).items():
        np.testing.assert_array_equal(state[k], v, err_msg=k)


@pytest.mark.xdist_group("nonfinite")
def test_skip_drops_each_non_finite_update_and_goes_on(two_good_steps, tmp_path):
    workdir = resumed(two_good_steps, tmp_path)
    loop.train_and_evaluate(runs.config(5, 5, learning_rate=1e38, nonfinite="skip"), workdir)
    assert runs.checkpoint_steps(workdir) == [2, 5]
    before, after = runs.read_state(workdir, 2), runs.read_state(workdir, 5)
    assert int(after["['step']"]) == 5
    counts = [k for k in after if "opt_state" in k and k.rstrip("']").endswith("count")]
    assert counts and all(int(after[k]) == 5 for k in counts)  # the schedule follows the step
    for k, v in before.items():  # every update of steps 3-5 was dropped
        if ("params" in k or "batch_stats" in k or "opt_state" in k) and k not in counts:
            np.testing.assert_array_equal(after[k], v, err_msg=k)
    assert runs.logged(workdir, "train/nonfinite_steps") == {
        1: [0.0], 2: [0.0], 3: [1.0], 4: [1.0], 5: [1.0]}
