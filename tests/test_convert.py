"""Weight conversion: timm / torchvision Inception state dicts -> our models, proven equal.

Each source's reference network gets random weights and random, non-trivial
BatchNorm statistics and affine parameters; its state dict is written to a file
(.safetensors for some sources, .pth for others, one nested under 'state_dict'
with 'module.' prefixes), converted through the CLI entry `main(argv)`, loaded with
`convert.load`, and run on the same images. Logits must agree to 1e-4 in float32 at
the canonical resolution and at one other, with the classifier scaled so that
logits are O(1-10).

Auxiliary heads are compared in two ways:
- eval mode, every source with a head: the feature map the head reads (Mixed_6e,
  Inception_4a / 4d) is captured in both frameworks and each head is applied with
  its BatchNorm running statistics. This checks every converted aux tensor,
  including BN statistics and GoogLeNet's NCHW -> NHWC flatten of fc1.
- train mode, torchvision's GoogLeNet (two heads, so their order too): both
  frameworks with dropout off and BatchNorm on batch statistics, through our real
  training path (`aux_logits_of` on the sown intermediates). See the note above
  `test_train_mode_aux_heads` for why Inception v3's head is checked in eval mode.
"""

from __future__ import annotations

import copy
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from inception_flax import convert, models  # noqa: E402
from inception_flax.models.inception_v1 import AuxHeadV1, GoogLeNet  # noqa: E402
from inception_flax.models.network import AuxHead  # noqa: E402

TOL = 1e-4
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
NUM_CLASSES = 11


class Case(NamedTuple):
    build: Any                     # () -> torch module
    sizes: tuple[int, int]         # canonical, other
    fmt: str                       # safetensors | pth | pth-nested
    head_gain: float               # classifier init gain: keeps logits O(1-10)
    taps: dict[str, tuple[str, str, str]]  # our head -> (our tap, torch tap, torch head)
    imagenet_input: bool           # torchvision transform_input: feed ImageNet-normalised


def _timm(name: str, **kw):
    return lambda: timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kw)


CASES = {
    "timm:inception_v3": Case(
        _timm("inception_v3", aux_logits=True), (299, 331), "safetensors", 0.5,
        {"AuxLogits": ("Mixed_6e", "Mixed_6e", "AuxLogits")}, False),
    "torchvision:inception_v3": Case(
        lambda: torchvision.models.inception_v3(
            weights=None, aux_logits=True, init_weights=True, transform_input=True,
            num_classes=NUM_CLASSES),
        (299, 331), "pth", 0.5, {"AuxLogits": ("Mixed_6e", "Mixed_6e", "AuxLogits")}, True),
    "timm:inception_v4": Case(
        _timm("inception_v4"), (299, 331), "pth-nested", 0.2, {}, False),
    "timm:inception_resnet_v2": Case(
        _timm("inception_resnet_v2"), (299, 331), "safetensors", 0.15, {}, False),
    "torchvision:googlenet": Case(
        lambda: torchvision.models.googlenet(
            weights=None, aux_logits=True, init_weights=True, transform_input=True,
            num_classes=NUM_CLASSES),
        (224, 256), "safetensors", 0.3,
        {"AuxLogits_4a": ("Inception_4a", "inception4a", "aux1"),
         "AuxLogits_4d": ("Inception_4d", "inception4d", "aux2")}, True),
}


def randomize(module, head_gain: float, seed: int):
    """He-scaled weights, random BN affine and running statistics, eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                gain = head_gain if getattr(m, "out_features", 0) == NUM_CLASSES else 2.0 ** 0.5
                std = gain / m.weight[0].numel() ** 0.5
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return module.eval()


def write_weights(state: dict, path_base, fmt: str) -> str:
    if fmt == "safetensors":
        path = f"{path_base}.safetensors"
        safetensors_numpy.save_file(
            {k: v.detach().contiguous().numpy() for k, v in state.items()}, path)
    elif fmt == "pth":
        path = f"{path_base}.pth"
        torch.save(state, path)
    else:  # a training checkpoint: nested, DataParallel prefixes, extra entries
        path = f"{path_base}.pth"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}},
                   path)
    return path


def images(size: int, batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def torch_input(x: np.ndarray, imagenet: bool):
    """Our [-1, 1] NHWC images as the reference expects them (NCHW)."""
    if imagenet:  # transform_input=True maps ImageNet-normalised input back to [-1, 1]
        x = ((x + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def torch_eval(ref, x, case: Case):
    """Reference logits, and each aux head (eval mode) on its captured input."""
    feats = {}
    hooks = [getattr(ref, tap).register_forward_hook(
        lambda m, i, o, tap=tap: feats.__setitem__(tap, o)) for _, tap, _ in case.taps.values()]
    try:
        with torch.no_grad():
            out = ref(torch_input(x, case.imagenet_input))
            logits = out[0] if isinstance(out, tuple) else out
            aux = {head: getattr(ref, module)(feats[tap]).numpy()
                   for head, (_, tap, module) in case.taps.items()}
    finally:
        for h in hooks:
            h.remove()
    return logits.numpy(), aux


def our_aux_head(model, head: str):
    """The head module as the model builds it (standalone, to run in eval mode)."""
    if isinstance(model, GoogLeNet):
        return AuxHeadV1(model.common, model.num_classes, model.layout == "torchvision",
                         model.aux_dropout_rate)
    return AuxHead(model.common, model.num_classes, type(model).bn_in_aux_head)


def flax_eval_fn(model, case: Case):
    taps = {tap for tap, _, _ in case.taps.values()}

    @jax.jit
    def fwd(variables, x):
        if not taps:
            return model.apply(variables, x, train=False), {}
        logits, state = model.apply(
            variables, x, train=False, mutable=["intermediates"],
            capture_intermediates=lambda m, method: m.name in taps and method == "__call__")
        aux = {}
        for head, (tap, _, _) in case.taps.items():
            feat = state["intermediates"][tap]["__call__"][0]
            aux[head] = our_aux_head(model, head).apply(
                {"params": variables["params"][head],
                 "batch_stats": variables["batch_stats"][head]}, feat, train=False)
        return logits, aux

    return fwd


class Converted(NamedTuple):
    ref: Any
    model: Any
    variables: Any
    meta: dict
    fwd: Any


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


_CACHE: dict[str, Converted] = {}


def converted(source: str, workdir) -> Converted:
    """Reference model, file, CLI conversion and load, once per source per worker."""
    if source not in _CACHE:
        case = CASES[source]
        torch.manual_seed(0)
        ref = randomize(case.build(), case.head_gain, seed=sorted(CASES).index(source))
        stem = workdir / source.replace(":", "_")
        path = write_weights(ref.state_dict(), stem, case.fmt)
        out = workdir / f"{stem.name}_flax"
        assert convert.main(["--source", source, "--weights", path, "--out", str(out)]) == 0
        model, variables = convert.load(out)
        _CACHE[source] = Converted(ref, model, variables, convert.read_meta(out),
                                   flax_eval_fn(model, case))
    return _CACHE[source]


MEASURED: dict[tuple[str, int], float] = {}


@pytest.mark.parametrize("source", list(CASES))
def test_converted_matches_reference(source, workdir):
    case = CASES[source]
    c = converted(source, workdir)
    meta = c.meta
    assert meta["model"] == convert.SOURCES[source].model
    assert meta["config"] == convert.SOURCES[source].config
    assert meta["overrides"]["num_classes"] == NUM_CLASSES
    assert meta["overrides"]["aux_logits"] == bool(case.taps)
    for size, batch in zip(case.sizes, (2, 1)):
        x = images(size, batch, seed=size)
        want, want_aux = torch_eval(c.ref, x, case)
        got, got_aux = c.fwd(c.variables, jnp.asarray(x))
        assert 1.0 < np.abs(want).max() < 30.0  # logits O(1-10): 1e-4 is meaningful
        diff = float(np.abs(np.asarray(got) - want).max())
        MEASURED[(source, size)] = diff
        print(f"\n{source} {size}x{size} batch {batch}: max |logits diff| {diff:.2e} "
              f"(max |logit| {np.abs(want).max():.1f})", end="")
        assert diff <= TOL, f"{source} at {size}: {diff}"
        for head in case.taps:
            assert 0.1 < np.abs(want_aux[head]).max() < 100.0
            d = float(np.abs(np.asarray(got_aux[head]) - want_aux[head]).max())
            print(f"; {head} {d:.2e}", end="")
            assert d <= TOL, f"{source} {head} at {size}: {d}"


# Inception v3 is compared in eval mode only: its aux head normalises a 1x1 map, so
# in training its BatchNorm sees the batch alone (2 values per channel here). That is
# ill-conditioned: PyTorch's own float32 aux logits then differ from its float64 ones
# by ~1e-4 (measured 3e-5 .. 1.1e-4 at batch 2-4), so a 1e-4 comparison between two
# float32 implementations cannot decide anything there. GoogLeNet's heads normalise
# 4x4 maps (32 values per channel) and compare at ~1e-5.
@pytest.mark.parametrize("source", ["torchvision:googlenet"])
def test_train_mode_aux_heads(source, workdir):
    """Our training path (aux logits sown and read by `aux_logits_of`, GoogLeNet's two
    heads in order) against the reference's train-mode outputs: dropout off in both,
    BatchNorm on batch statistics in both."""
    case = CASES[source]
    c = converted(source, workdir)
    ref = copy.deepcopy(c.ref).train()
    for m in ref.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    overrides = {"dropout_rate": 0.0}
    if source == "torchvision:googlenet":
        overrides["aux_dropout_rate"] = 0.0
    model = c.model.clone(**overrides)
    x = images(case.sizes[0], 2, seed=7)
    with torch.no_grad():
        out = ref(torch_input(x, case.imagenet_input))
    if source == "torchvision:googlenet":  # (logits, aux2, aux1)
        want = [("logits", out.logits), ("aux 4a", out.aux_logits1), ("aux 4d", out.aux_logits2)]
    else:
        want = [("logits", out.logits), ("aux", out.aux_logits)]

    @jax.jit
    def train_fwd(variables, x):
        logits, state = model.apply(variables, x, train=True,
                                    mutable=["batch_stats", "intermediates"],
                                    rngs={"dropout": jax.random.key(0)})
        return (logits, *models.aux_logits_of(state))

    got = train_fwd(c.variables, jnp.asarray(x))
    assert len(got) == len(want)
    for ours, (name, theirs) in zip(got, want):
        theirs = theirs.numpy()
        assert np.abs(theirs).max() > 0.1
        d = float(np.abs(np.asarray(ours) - theirs).max())
        print(f"\n{source} train mode {name}: {d:.2e} (max {np.abs(theirs).max():.1f})", end="")
        assert d <= TOL, f"train-mode {name}: {d}"


# ---------------------------------------------------------------------------
# Refusals: nothing is written, one clear line, exit code 2.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def googlenet_state():
    torch.manual_seed(1)
    ref = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False,
                                       transform_input=True, num_classes=NUM_CLASSES)
    return {k: v.detach().contiguous().numpy() for k, v in ref.state_dict().items()}


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = convert.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_bad_tensors_are_all_named_and_nothing_is_written(tmp_path, capsys, googlenet_state):
    state = dict(googlenet_state)
    del state["inception3a.branch1.bn.running_var"]
    state["inception3a.branch5.conv.weight"] = np.zeros((4, 4, 1, 1), np.float32)
    state["conv1.conv.weight"] = np.zeros((64, 3, 5, 5), np.float32)
    path = tmp_path / "bad.safetensors"
    safetensors_numpy.save_file(state, str(path))
    out = tmp_path / "out"

    rc, err = run_cli(capsys, "--source", "torchvision:googlenet", "--weights", path, "--out", out)
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    for name in ("inception3a.branch1.bn.running_var", "inception3a.branch5.conv.weight",
                 "conv1.conv.weight", "(64, 3, 5, 5)", "(64, 3, 7, 7)"):
        assert name in err, err
    for word in ("missing 1", "unexpected 1", "shape mismatches 1"):
        assert word in err, err
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]  # no output, no temp dir

    with pytest.raises(convert.ConversionError) as e:
        convert.convert("torchvision:googlenet", state)
    assert e.value.missing == ["inception3a.branch1.bn.running_var"]
    assert e.value.unexpected == ["inception3a.branch5.conv.weight"]
    assert len(e.value.mismatched) == 1


def test_wrong_source_is_named(tmp_path, capsys, googlenet_state):
    path = tmp_path / "googlenet.safetensors"
    safetensors_numpy.save_file(googlenet_state, str(path))
    rc, err = run_cli(capsys, "--source", "timm:inception_v3", "--weights", path,
                      "--out", tmp_path / "out")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "torchvision:googlenet" in err  # the hint names the matching source
    assert not (tmp_path / "out").exists()


def test_pickled_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": NotATensor()}, path)
    rc, err = run_cli(capsys, "--source", "torchvision:googlenet", "--weights", path,
                      "--out", tmp_path / "out")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "weights_only" in err and "NotATensor" in err
    assert sorted(os.listdir(tmp_path)) == ["evil.pth"]


class NotATensor:
    """A pickled class: `torch.load(weights_only=True)` must refuse it."""


def test_cli_usage_errors(tmp_path, capsys, googlenet_state):
    path = tmp_path / "g.safetensors"
    safetensors_numpy.save_file(googlenet_state, str(path))

    rc, err = run_cli(capsys, "--source", "timm:googlenet", "--weights", path,
                      "--out", tmp_path / "out")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "unknown source 'timm:googlenet'" in err
    assert all(known in err for known in convert.SOURCES)

    rc, err = run_cli(capsys, "--source", "torchvision:googlenet", "--weights",
                      tmp_path / "nope.pth", "--out", tmp_path / "out")
    assert rc == 2 and len(err.splitlines()) == 1 and "not found" in err

    (tmp_path / "taken").mkdir()
    rc, err = run_cli(capsys, "--source", "torchvision:googlenet", "--weights", path,
                      "--out", tmp_path / "taken")
    assert rc == 2 and "already exists" in err
    assert sorted(os.listdir(tmp_path)) == ["g.safetensors", "taken"]
    assert not os.listdir(tmp_path / "taken")


def test_file_without_aux_heads_converts_without_them(tmp_path, capsys, googlenet_state):
    state = {k: v for k, v in googlenet_state.items() if not k.startswith(("aux1.", "aux2."))}
    path = tmp_path / "noaux.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
    out = tmp_path / "out"
    rc, _ = run_cli(capsys, "--source", "torchvision:googlenet", "--weights", path, "--out", out)
    assert rc == 0
    meta = convert.read_meta(out)
    assert meta["model"] == "inception_v1" and meta["config"] == "configs/inception_v1.py"
    assert meta["overrides"] == {"num_classes": NUM_CLASSES, "aux_logits": False,
                                 "layout": "torchvision", "bn_epsilon": 1e-3}
    model, variables = convert.load(out)
    assert not model.aux_logits and "AuxLogits_4a" not in variables["params"]
    np.testing.assert_array_equal(
        variables["params"]["Logits"]["kernel"], state["fc.weight"].T)
    assert sorted(os.listdir(tmp_path)) == ["noaux.pth", "out"]
