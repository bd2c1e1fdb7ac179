"""Fault: bad configuration. One line naming the field and the fix, before any compile."""

import contextlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from inception_flax import models
from inception_flax.cpu import native
from inception_flax.training import checks, loop
from tests import runs


@contextlib.contextmanager
def no_compile():
    """Fails if JAX compiles (or loads a compiled program) inside the block.

    Tracing (`jax.eval_shape`, for shape checks) is allowed.
    """
    seen = []

    def compiling(name: str) -> bool:
        return "backend_compile" in name or "compilation_cache" in name

    def duration(name, *args, **kwargs):
        del args, kwargs
        if compiling(name):
            seen.append(name)

    def event(name, **kwargs):
        del kwargs
        if compiling(name):
            seen.append(name)

    jax.monitoring.register_event_duration_secs_listener(duration)
    jax.monitoring.register_event_listener(event)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(duration)
        jax.monitoring.unregister_event_listener(event)
    assert not seen, f"compiled before reporting the error: {sorted(set(seen))}"


def fails_before_compile(config, workdir, message):
    with no_compile(), pytest.raises(checks.ConfigError, match=message) as err:
        loop.train_and_evaluate(config, str(workdir))
    assert "\n" not in str(err.value)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    return str(err.value)


@pytest.mark.parametrize("field, value, message", [
    ("model.name", "inception_v9", "model.name: unknown model 'inception_v9'"),
    ("model.residual_scale", 1.5, "residual_scale must lie in \\[0, 1\\]"),
    ("model.residual_scale", -0.1, "residual_scale must lie in \\[0, 1\\]"),
    ("image_size", 60, "image_size=60 is below inception_resnet_v2's minimum of 75"),
    ("optimizer", "lamb", "optimizer must be one of rmsprop, sgd, adamw"),
    ("batch_size", 3, "batch_size=3 does not divide evenly across 2 devices: use a multiple"),
    ("dataset.eval_split", "validation", "dataset.eval_split='validation' is not a split"),
    ("dataset.input_shards", 3, "dataset.input_shards=3 must .* divide batch_size=4"),
    ("nonfinite", "ignore", "nonfinite must be one of stop, skip"),
    ("model.dtype", "float16", "model.dtype must be float32, bfloat16 or float64"),
    ("model.dtype", "float64", "model.dtype=float64 needs 64-bit JAX: set JAX_ENABLE_X64=1"),
    ("kernels", "cuda", "kernels must be one of auto, native, xla_cpu, plain, got 'cuda'"),
])
def test_bad_field_is_one_line_before_any_compile(tmp_path, field, value, message):
    config = runs.config(2, 2, **{field: value})
    fails_before_compile(config, tmp_path / "run", message)


def test_native_kernels_that_cannot_be_built_are_one_line_before_any_compile(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_state", {})  # as in a fresh process
    monkeypatch.setenv("INCEPTION_FLAX_CACHE", str(tmp_path / "native"))
    monkeypatch.setenv("CXX", "no-such-compiler")
    fails_before_compile(runs.config(2, 2, kernels="native"), tmp_path / "run",
                         r"kernels=native: no C\+\+ compiler 'no-such-compiler' on PATH: "
                         r"install g\+\+, or name one in CXX")


def test_init_from_weights_of_another_shape_is_refused_before_any_compile(tmp_path):
    # Weights of a half-width network: every tensor of the quarter-width one mis-fits.
    config = runs.config(2, 2)
    wide = models.create_model("inception_resnet_v2", num_classes=10, depth_multiplier=0.5)
    shapes = jax.eval_shape(lambda: wide.init(jax.random.key(0), np.zeros((1, 75, 75, 3))))
    source = tmp_path / "wide"
    os.makedirs(source)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(str(source / "variables"),
                   jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes)))
    with open(source / "model.json", "w") as f:
        json.dump({"model": "inception_resnet_v2", "depth_multiplier": 0.5}, f)
    config.init_from = str(source)
    line = fails_before_compile(config, tmp_path / "run", "init_from weights do not fit")
    assert "batch_stats/Block8/Branch_0_1x1/bn/mean has shape (96,), needs (48,)" in line


def test_init_from_a_missing_path_is_one_line(tmp_path):
    config = runs.config(2, 2, init_from=str(tmp_path / "nowhere"))
    fails_before_compile(config, tmp_path / "run", "is neither converted weights")
