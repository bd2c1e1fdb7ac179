"""Fault: the newest checkpoint is truncated or corrupted on disk.

Restore notices (orbax's own errors, or the per-array checksums written with
every checkpoint), warns, moves the damaged step to corrupt_checkpoints/ and
resumes from the previous one.
"""

import glob
import logging
import os
import shutil

import numpy as np
import pytest

from inception_flax import checkpoint as ckpt_lib
from inception_flax.training import loop
from tests import runs


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run of 4 steps with checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("corrupt") / "base")
    loop.train_and_evaluate(runs.config(4, 2), workdir)
    assert runs.checkpoint_steps(workdir) == [2, 4]
    return workdir


def damage(workdir: str, step: int, how: str) -> None:
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "default", "ocdbt.*",
                                   "d", "*"))
    assert files
    rng = np.random.default_rng(0)
    for path in files:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            if how == "truncated":
                f.truncate(size // 2)
            else:  # a few flipped bytes in the middle: orbax reads them without error
                f.seek(size // 2)
                f.write(rng.bytes(min(16, size - size // 2)))


@pytest.mark.xdist_group("corrupt")
@pytest.mark.parametrize("how", ["truncated", "corrupted"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(four_steps, tmp_path, how,
                                                              caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(four_steps, workdir)
    damage(workdir, 4, how)
    # absl's own logger: another test in this worker may have lowered absl's verbosity.
    with caplog.at_level(logging.INFO, logger="absl"):
        loop.train_and_evaluate(runs.config(6, 2), workdir)
    assert "checkpoint 4 is unreadable or corrupt" in caplog.text
    assert "resumed from step 2" in caplog.text
    assert runs.checkpoint_steps(workdir) == [2, 4, 6]  # 4 written again by the resumed run
    kept = os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
    assert len(kept) == 1 and kept[0].startswith("4.")  # kept for inspection, not deleted
    # The rewritten step 4 is the original's: same start, same batches.
    original, again = runs.read_state(four_steps, 4), runs.read_state(workdir, 4)
    for k, v in original.items():
        np.testing.assert_array_equal(again[k], v, err_msg=k)


@pytest.mark.xdist_group("corrupt")
def test_every_checkpoint_damaged_refuses_to_start_over(four_steps, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(four_steps, workdir)
    damage(workdir, 2, "corrupted")
    damage(workdir, 4, "corrupted")
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint in .* can be restored"):
        loop.train_and_evaluate(runs.config(6, 2), workdir)
    assert runs.checkpoint_steps(workdir) == [2, 4]  # nothing moved, nothing overwritten
