"""predict.py: image files classified with class names, proven equal to the references.

- Converted weights: the reference networks of three sources (random weights and
  BatchNorm statistics, 1000 classes, built, converted and run by PyTorch in
  `tests/predict_reference.py`, a subprocess) classify the same JPEG files, each
  preprocessed by its own library; our probabilities must equal the reference softmax to
  1e-4 under the ImageNet names that torchvision gives those classes. The three use
  every element of the input conventions (both interpolations, ImageNet and Inception
  mean / std, two crop fractions, torchvision's `transform_input`, the source's own size
  and another), and every recorded convention is checked against its library.
- A digits run (BN-Inception, trained here on 2 devices, moving average kept): its
  held-out images written as PNG files, classified by predict.py on 1 device, must
  score eval.py's top-1; bad files are one line each and make the exit status 1.
"""

import importlib.util
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import bn_inception
from inception_flax import inference
from inception_flax.convert import inputs
from inception_flax.training import evaluate, loop
from tests import runs

if any(importlib.util.find_spec(m) is None for m in ("torch", "timm", "torchvision")):
    pytest.skip("the references need torch, timm and torchvision (requirements-test.txt)",
                allow_module_level=True)  # checked, not imported: TensorFlow is here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
SIZE = 75  # the timm sources at this size (the crop fraction kept); GoogLeNet at its 224
SOURCES = {"timm:inception_v3.gluon_in1k": SIZE, "timm:inception_resnet_v2": SIZE,
           "torchvision:googlenet": None}


def run(cmd: list[str], devices: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=runs.env(devices))


def write_jpegs(root) -> list[str]:
    """Smooth patterns with noise, of three shapes (portrait, landscape, square)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(131, 97), (120, 160), (90, 90)]):
        yy, xx = np.mgrid[0:h, 0:w]
        image = np.stack([128 + 100 * np.sin(xx / (7 + i)), 128 + 100 * np.cos(yy / (5 + i)),
                          (xx + yy) % 256], -1) + rng.normal(0, 20, (h, w, 3))
        paths.append(str(root / f"image{i}.jpg"))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_reference")
    images = write_jpegs(root)
    proc = run([sys.executable, "-m", "tests.predict_reference", str(root), str(SIZE), *images])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(root / "conventions.json") as f:
        said = json.load(f)
    return root, images, dict(np.load(root / "reference.npz")), said


def compare(source: str, predictions, reference, categories) -> float:
    """Max |probability - reference| over the top 5 of every image; same classes, names."""
    worst = 0.0
    for i, p in enumerate(predictions):
        want = reference[i]
        assert want.max() > 0.05  # peaked: a wrong input moves it by far more than TOL
        assert p.classes == list(np.argsort(-want, kind="stable")[:5]), (source, i)
        assert p.names == [str(categories[c]) for c in p.classes]
        worst = max(worst, max(abs(q - want[c]) for q, c in zip(p.probabilities, p.classes)))
    return worst


@pytest.mark.xdist_group("predict_reference")  # one worker builds the references
@pytest.mark.parametrize("source", [s for s, size in SOURCES.items() if size])
def test_probabilities_equal_the_reference_softmax(references, source):
    root, images, reference, _ = references
    network = inference.load(str(root / source.replace(":", "_")), SOURCES[source])
    predictions = list(inference.classify(network, images, top_k=5))
    printed = [inference.line(p) for p in predictions]  # as predict.py prints them
    assert printed[0].startswith(f"{images[0]}: {predictions[0].names[0]} ")
    diff = compare(source, predictions, reference[source], reference["categories"])
    print(f"\n{source} at {SIZE}: max |probability diff| {diff:.2e}", end="")
    assert diff <= TOL


@pytest.mark.xdist_group("predict_reference")
def test_predict_py_prints_the_reference_probabilities(references, tmp_path):
    """GoogLeNet through predict.py, at the size its model.json records (224)."""
    root, images, reference, _ = references
    source = "torchvision:googlenet"
    proc = run([sys.executable, "predict.py", f"--checkpoint={root / 'torchvision_googlenet'}",
                f"--json={tmp_path / 'out.json'}", *images])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(images)
    predictions = []
    for path, line in zip(images, lines):
        assert line.startswith(f"{path}: ")
        pairs = re.findall(r"(?:: | \| )(.+?) ([01]\.\d{6})", line)
        names = [n for n, _ in pairs]
        classes = [list(reference["categories"]).index(n) for n in names]
        predictions.append(inference.Prediction(path, classes, [float(q) for _, q in pairs],
                                                names))
    diff = compare(source, predictions, reference[source], reference["categories"])
    print(f"\n{source} at 224, printed: max |probability diff| {diff:.2e}", end="")
    assert diff <= TOL
    with open(tmp_path / "out.json") as f:
        written = json.load(f)
    assert written["network"] == "inception_v1" and not written["moving_average"]
    assert [p["top_k"][0]["name"] for p in written["predictions"]] == [p.names[0]
                                                                       for p in predictions]


@pytest.mark.xdist_group("predict_reference")
def test_recorded_conventions_are_the_libraries(references):
    said = references[3]
    for source, tags in inputs.CONVENTIONS.items():
        for tag, recorded in tags.items():
            for field, value in said[source][tag].items():
                assert recorded[field] == pytest.approx(value), (source, tag, field)


# ----------------------------------------------------------------------------
# A digits run
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """BN-Inception trained 90 steps (2 epochs) on the digits (moving average kept), eval.py's top-1,
    and the held-out split written as PNG files named `<index>_<label>.png`."""
    root = tmp_path_factory.mktemp("predict_digits")
    workdir = str(root / "run")
    config = runs.override(bn_inception.get_config("digits"), {
        "num_train_steps": 90, "checkpoint_every_steps": 1000, "eval_every_steps": 1000,
        "log_every_steps": 25, "log_input_images": False,
        "dataset.data_dir": os.environ["TFDS_DATA_DIR"]})
    loop.train_and_evaluate(config, workdir)
    top1 = evaluate.evaluate_checkpoint(config, checkpoint=workdir)["top1"]  # eval.py's
    images = root / "images"
    images.mkdir()
    split = tfds.load("inception_digits", split="test", data_dir=config.dataset.data_dir,
                      decoders={"image": tfds.decode.SkipDecoding()})
    for i, example in enumerate(split.as_numpy_iterator()):
        (images / f"{i:03d}_{example['label']}.png").write_bytes(example["image"])
    return workdir, images, top1


def bad_files(root) -> list[str]:
    """A missing file, a text file named .jpg and a JPEG cut in half."""
    from PIL import Image

    (root / "notes.jpg").write_text("not an image")
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buffer, "JPEG")
    (root / "cut.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    return [str(root / "missing.png"), str(root / "notes.jpg"), str(root / "cut.jpg")]


@pytest.mark.xdist_group("predict_digits")  # one worker trains the run
def test_digits_predictions_score_eval_top1(digits, tmp_path):
    workdir, images, top1 = digits
    bad = bad_files(tmp_path)
    proc = run([sys.executable, "predict.py", f"--checkpoint={workdir}", "--top_k=3",
                f"--json={tmp_path / 'out.json'}", f"--csv={tmp_path / 'out.csv'}",
                str(images), *bad], devices=1)  # trained on 2 devices
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert [e.split(": ")[1] for e in errors] == bad, errors
    for line, words in zip(errors, ("no such file", "Unknown image file format", "JPEG")):
        assert words in line, line
    assert "3 of 363 files could not be classified" in proc.stderr
    with open(tmp_path / "out.json") as f:
        written = json.load(f)
    assert written["moving_average"] and written["step"] == 90
    predictions = written["predictions"]
    assert len(predictions) == 360 == len(proc.stdout.strip().splitlines())
    correct = sum(p["top_k"][0]["name"] == os.path.basename(p["file"])[4:-4]
                  for p in predictions)
    print(f"\ndigits: predict.py top-1 {correct / 360:.4f}, eval.py {top1:.4f}", end="")
    assert top1 > 0.3  # trained: a shifted class name could not score the same
    assert abs(correct / 360 - top1) <= 1 / 360 + 1e-9
    with open(tmp_path / "out.csv") as f:
        rows = f.read().splitlines()
    assert rows[0] == "file,rank,class,name,probability" and len(rows) == 1 + 360 * 3


@pytest.mark.xdist_group("predict_digits")
def test_bad_checkpoint_and_size_are_one_line(digits, tmp_path):
    workdir, images, _ = digits
    proc = run([sys.executable, "predict.py", f"--checkpoint={workdir}", "--image_size=16",
                str(images)])
    assert proc.returncode == 2 and not proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert errors == [
        "error: --image_size=16 is below bn_inception's minimum of 32: give 32 or more"]
    (tmp_path / "empty").mkdir()
    for path, words in ((tmp_path / "nowhere", "does not exist"),
                        (tmp_path / "empty", "holds no weights")):
        with pytest.raises(inference.InputError, match=words) as e:
            inference.load(str(path))
        assert len(str(e.value).splitlines()) == 1
