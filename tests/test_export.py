"""Export for serving: every artifact, reloaded in a fresh process, gives the Flax model's logits.

One network of each family (GoogLeNet, BN-Inception, Inception v3, v4, Inception-ResNet
v2) at quarter width and its smallest input size, with random weights and BatchNorm
statistics, is exported as StableHLO with a polymorphic batch; Inception v3, as a
training run that kept a moving average (the artifact must use it), also as a
SavedModel with a polymorphic batch and both signatures (float images; encoded
images preprocessed in the graph), and GoogLeNet as a SavedModel of a fixed batch.
One process (`tests/export_reload.py`, which must not import this package) reloads
them all; logits must equal the Flax model's (compiled, like the artifacts, with its
weights as constants) to 1e-5 at batch 1 and 3.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import inception_v3 as v3_config
from inception_flax import export, inference, models
from inception_flax.convert import store
from inception_flax.data import files
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
FAMILIES = {"inception_v1": 32, "bn_inception": 32, "inception_v3": 75, "inception_v4": 75,
            "inception_resnet_v2": 75}
NUM_CLASSES = 10


def converted_dir(root, name: str) -> str:
    """Random weights of `name` at quarter width, saved as converted weights."""
    overrides = {"num_classes": NUM_CLASSES, "depth_multiplier": 0.25}
    model = models.create_model(name, **overrides)
    variables = helpers.random_variables(model, FAMILIES[name], seed=len(name))
    return str(store.save(os.path.join(root, name), name, overrides, variables))


def run_dir(root) -> tuple[str, dict]:
    """A training run of Inception v3 (digits preset) whose checkpoint holds a moving
    average that differs from its parameters. Returns the workdir and the EMA variables."""
    config = v3_config.get_config("digits")
    model = models.create_model("inception_v3", num_classes=NUM_CLASSES,
                                depth_multiplier=0.25, aux_logits=True)
    variables = helpers.random_variables(model, 75, seed=3)
    noise = np.random.default_rng(4)
    ema = jax.tree.map(lambda x: np.asarray(x) * (1 + 0.2 * noise.standard_normal(x.shape)
                                                  ).astype(np.float32), variables["params"])
    workdir = os.path.join(root, "run")
    state = {"step": np.int32(3), "params": jax.tree.map(np.asarray, variables["params"]),
             "ema_params": ema, "batch_stats": jax.tree.map(np.asarray, variables["batch_stats"]),
             "opt_state": {"count": np.int32(3)}, "rng": np.zeros(2, np.uint32)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(workdir, "checkpoints", "3", "default"), state)
    with open(os.path.join(workdir, "run.json"), "w") as f:
        json.dump({"model": "inception_v3", "num_classes": NUM_CLASSES}, f)
    inference.record_run(workdir, config, NUM_CLASSES)
    return workdir, {"params": ema, "batch_stats": state["batch_stats"]}


def encoded_images(root) -> list[str]:
    """A PNG and a JPEG of other sizes and aspect ratios than the network's input."""
    from PIL import Image

    rng = np.random.default_rng(1)
    paths = []
    for shape, suffix in (((40, 52, 3), "png"), ((90, 71, 3), "jpg")):
        path = str(root / f"image.{suffix}")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def flax_logits(network: inference.Network, variables, x) -> np.ndarray:
    """The Flax model's logits, compiled with its weights as constants, as an artifact
    holds them: XLA then precomputes what depends on the weights alone (BatchNorm's
    scale), which moves the logits by float rounding (up to 9e-6 at |logit| 5.6 for
    Inception-ResNet v2) against weights passed as arguments."""
    return np.asarray(jax.jit(lambda x: network.model.apply(variables, x, train=False))(x))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every artifact, the inputs, the Flax logits, and what the fresh process returned."""
    root = tmp_path_factory.mktemp("export")
    jobs, expected = [], {}
    rng = np.random.default_rng(0)

    def images(name, size):
        """Batches of 1 and 3: the first image of the 3 alone (one Flax reference)."""
        x = rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
        paths = {}
        for batch in (1, 3):
            paths[f"batch{batch}"] = str(root / f"{name}_{batch}.npy")
            np.save(paths[f"batch{batch}"], x[:batch])
        return paths

    for name, size in FAMILIES.items():
        source = converted_dir(str(root), name)
        network = inference.load(source, size)
        out = str(root / f"{name}.stablehlo")
        softmax_top_k = name == "bn_inception"
        assert export.main(["--checkpoint", source, "--out", out, "--format", "stablehlo",
                            "--image-size", str(size)]
                           + (["--softmax", "--top-k", "3"] if softmax_top_k else [])) == 0
        jobs.append({"name": name, "format": "stablehlo", "dir": out,
                     "images": images(name, size)})
        expected[name] = (network, network.variables)

    workdir, ema_variables = run_dir(str(root))
    network = inference.load(workdir)
    assert network.moving_average and network.step == 3
    export.export_network(network, str(root / "v3_run.savedmodel"), "savedmodel", None,
                          softmax=True, top_k=2)
    jobs.append({"name": "v3_run", "format": "savedmodel", "dir": str(root / "v3_run.savedmodel"),
                 "images": images("v3_run", 75), "files": encoded_images(root)})
    expected["v3_run"] = (network, ema_variables)
    v1 = inference.load(jobs[0]["dir"].replace(".stablehlo", ""), 32)
    export.export_network(v1, str(root / "v1.savedmodel"), "savedmodel", 3)
    jobs.append({"name": "v1_fixed", "format": "savedmodel", "dir": str(root / "v1.savedmodel"),
                 "images": {"batch3": jobs[0]["images"]["batch3"]}})
    expected["v1_fixed"] = (v1, v1.variables)

    with open(root / "jobs.json", "w") as f:
        json.dump(jobs, f)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "export_reload.py"),
                           str(root / "jobs.json"), str(root / "out.npz")],
                          capture_output=True, text=True, cwd=str(root), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return jobs, expected, dict(np.load(root / "out.npz"))


@pytest.mark.xdist_group("export")  # one worker exports and reloads
@pytest.mark.parametrize("name", [*FAMILIES, "v3_run", "v1_fixed"])
def test_reloaded_artifact_gives_the_flax_logits(exported, name):
    jobs, expected, got = exported
    job = next(j for j in jobs if j["name"] == name)
    network, variables = expected[name]
    want = flax_logits(network, variables, np.load(job["images"]["batch3"]))
    for key in job["images"]:
        logits = got[f"{name}/{key}/logits"]
        batch = int(key[-1])
        assert logits.shape == (batch, NUM_CLASSES)
        assert np.abs(want).max() > 0.1
        diff = float(np.abs(logits - want[:batch]).max())
        print(f"\n{name} {job['format']} {key}: max |logits diff| {diff:.2e} "
              f"(max |logit| {np.abs(want).max():.1f})", end="")
        assert diff <= TOL, f"{name} {key}: {diff}"


@pytest.mark.xdist_group("export")
def test_optional_outputs_are_softmax_and_top_k(exported):
    _, _, got = exported
    logits = got["bn_inception/batch3/logits"]
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    np.testing.assert_allclose(got["bn_inception/batch3/probabilities"], probabilities, atol=1e-6)
    top = np.argsort(-probabilities, -1)[:, :3]
    np.testing.assert_array_equal(got["bn_inception/batch3/top_k_classes"], top)
    assert "inception_v3/batch3/probabilities" not in got  # only when asked


@pytest.mark.xdist_group("export")
def test_encoded_image_signature_preprocesses_as_predict(exported):
    """`serving_bytes` decodes and preprocesses in the graph as predict.py does."""
    jobs, expected, got = exported
    network, variables = expected["v3_run"]
    job = next(j for j in jobs if j["name"] == "v3_run")
    x = np.stack([files.read(p, network.input) for p in job["files"]])
    want = flax_logits(network, variables, x)
    assert np.abs(want[0] - want[1]).max() > 0.01  # the logits depend on the input
    diff = float(np.abs(got["v3_run/files/logits"] - want).max())
    print(f"\nv3_run serving_bytes: max |logits diff| {diff:.2e}", end="")
    assert diff <= TOL
    assert got["v3_run/files/top_k_classes"].shape == (len(job["files"]), 2)


@pytest.mark.xdist_group("export")
def test_bad_input_is_one_line(tmp_path, capsys, exported):
    jobs, _, _ = exported
    source = jobs[0]["dir"].replace(".stablehlo", "")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--checkpoint", str(tmp_path / "nowhere")], "does not exist"),
        (["--checkpoint", str(tmp_path / "empty")], "holds no weights"),
        (["--checkpoint", source, "--image-size", "16"], "below inception_v1's minimum of 32"),
        (["--checkpoint", source, "--out", jobs[0]["dir"]], "already exists"),
        (["--checkpoint", source, "--top-k", "11"], "--top-k=11"),
    ]
    for argv, words in cases:
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / "out")]
        assert export.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and words in err, err
    assert not (tmp_path / "out").exists()
