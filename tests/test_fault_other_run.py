"""Fault: the workdir holds another run. Resuming refuses rather than mixing the two."""

import pytest

from inception_flax import checkpoint as ckpt_lib
from inception_flax.training import loop
from inception_flax.training import setup as setup_lib
from tests import runs
from tests.test_fault_bad_config import no_compile


@pytest.mark.parametrize("field, value, named", [
    ("network", "inception_v3", "model='inception_resnet_v2' there, 'inception_v3' here"),
    ("dataset.num_classes", 5, "num_classes=10 there, 5 here"),
    ("model.depth_multiplier", 0.5, "depth_multiplier=0.25 there, 0.5 here"),
    ("optimizer", "sgd", "optimizer='rmsprop' there, 'sgd' here"),
    ("ema_decay", 0.0, "ema=True there, False here"),
])
def test_resuming_another_run_is_refused_before_any_compile(tmp_path, field, value, named):
    workdir = str(tmp_path / "run")
    # What a run of the tiny config writes first into its workdir.
    ckpt_lib.check_run_identity(workdir, setup_lib.run_identity(runs.config(2, 2), 10))
    other = runs.config(2, 2, **{field: value})
    with no_compile(), pytest.raises(ckpt_lib.RunMismatchError, match="holds another run") as e:
        loop.train_and_evaluate(other, workdir)
    assert named in str(e.value) and "use a new --workdir" in str(e.value)
    assert "\n" not in str(e.value)
