"""benchmark.py (benchmarks/): a tiny end-to-end run next to torchvision, its flags and report.

No timing checks.
"""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import cli, measure, ours, overrides, report, run
from inception_flax.cpu import process

# One worker runs the module: the end-to-end run (the fixture) happens once.
pytestmark = pytest.mark.xdist_group("benchmark")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    # A subprocess: torchvision must load before TensorFlow (see import_torch_stack), and
    # the pytest worker has usually imported TensorFlow already. It inherits conftest's
    # XLA_FLAGS (2 devices, light optimisation) and TFDS_DATA_DIR.
    out = tmp_path_factory.mktemp("bench") / "result.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmark.py"), "--model", "googlenet",
           "--batch", "2", "--config.image_size=32", "--config.model.depth_multiplier=0.25",
           "--num_classes", "10", "--compare", "timm", "--steps", "2", "--warmup", "1",
           "--pipeline_batches", "2", "--matmul_size", "128", "--conv_layers",
           "--ab", "kernels=xla_cpu", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_json_has_every_figure(result):
    r, _ = result
    c = r["config"]
    assert (c["model"], c["batch"], c["image_size"], c["devices"]) == ("inception_v1", 2, 32, 2)
    # config.kernels as given (the default), and what it chose on this CPU.
    assert (c["kernels"], c["kernels_used"]) == ("auto", "native")
    assert c["device_kind"] and c["flax"]
    assert c["aux_logits"] and c["depth_multiplier"] == 0.25
    assert c["overrides"]["image_size"] == 32 and c["overrides"]["batch_size"] == 2
    assert c["overrides"]["config_file"].endswith(os.path.join("configs", "inception_v1.py"))
    for key in ("params", "macs_per_image", "train_forward_macs_per_image",
                "train_flops_per_image", "infer_flops_per_image"):
        assert _positive(r["model"][key]), key
    # The aux heads run (and cost) in training only.
    assert r["model"]["train_forward_macs_per_image"] > r["model"]["macs_per_image"]
    assert _positive(r["machine"]["matmul_gflops"])
    assert _positive(r["machine"]["torch_matmul_gflops"])
    ours, timm = r["ours"], r["timm"]
    for key in ("train_images_per_sec", "train_step_ms", "train_gflops",
                "train_fraction_of_matmul", "infer_images_per_sec", "infer_step_ms",
                "infer_fraction_of_matmul", "peak_rss_mb"):
        assert _positive(ours[key]), key
        assert _positive(timm[key]), key
    for d in (ours, timm):
        faults = d["train_page_faults_per_step"]
        assert isinstance(faults, float) and faults >= 0
    for key in ("lower_s", "compile_cold_s", "compile_warm_s", "xla_temp_mb"):
        assert _positive(ours[key]), key
    # The warm-compile subprocess repeats the command line (config file and overrides):
    # it compiles the same step, which the cold compile left in the cache. (GoogLeNet has
    # no rolled nn.scan, where a miss was once seen; a miss here means another config.)
    assert ours["warm_cache_hit"] is True and ours["cache_entries"]
    assert ours["device_peak_mb"] is None  # the CPU backend has no allocator statistics
    assert timm["library"] == "torchvision" and timm["model"] == "googlenet"
    assert timm["device"] == "cpu"  # PyTorch runs where JAX does
    assert timm["aux_logits"] is True and timm["channels_last"] is True
    assert timm["threads"] >= 1 and timm["optimizer"] == "SGD"  # googlenet's config: SGD
    assert any("depth_multiplier" in n for n in timm["notes"])
    assert _positive(r["pipeline"]["images_per_sec"])
    assert r["bound_by"] in ("input pipeline", "train step")
    # The subprocess re-executed itself with huge-page malloc where this machine can use it.
    assert c["huge_page_malloc"] is (process.environment(_without_tunables()) is not None)


def _without_tunables():
    return {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}


def test_peak_rss_sees_a_short_lived_allocation():
    import numpy as np

    with measure.PeakRss() as rss:
        block = np.ones(256 * 2**20 // 8)  # 256 MiB, touched, freed before the block ends
        del block
    assert rss.peak - rss.before >= 200 * 2**20, (rss.method, rss.before, rss.peak)
    # Touching 256 MiB faults in at least 128 pages, even with 2 MiB huge pages.
    assert rss.minor_faults >= 128


def test_ratios_and_rates_are_computed_from_the_same_figures(result):
    r, _ = result
    ours, timm = r["ours"], r["timm"]
    for k in ("train", "infer"):
        ratio = r["ratio"][f"{k}_images_per_sec"]
        assert ratio == pytest.approx(ours[f"{k}_images_per_sec"] / timm[f"{k}_images_per_sec"])
        for side in (ours, timm):
            assert side[f"{k}_images_per_sec"] == pytest.approx(2 / (side[f"{k}_step_ms"] / 1e3))
            assert side[f"{k}_gflops"] == pytest.approx(
                side[f"{k}_images_per_sec"] * r["model"][f"{k}_flops_per_image"] / 1e9)
            assert side[f"{k}_fraction_of_matmul"] == pytest.approx(
                side[f"{k}_gflops"] / r["machine"]["matmul_gflops"])
    assert r["model"]["train_flops_per_image"] == pytest.approx(
        6 * r["model"]["train_forward_macs_per_image"])


def test_every_convolution_is_timed_alone_next_to_pytorch(result):
    r, stdout = result
    cl = r["conv_layers"]
    # GoogLeNet trains 57 convolutions in the trunk and 1 in each of its 2 aux heads; its
    # 9 inception modules each run their three sibling 1x1 convolutions as one.
    assert cl["convolutions"] == 59 - 9 * 2 and cl["per_device_batch"] == 1
    assert sum(row["count"] for row in cl["rows"]) == 41 and cl["distinct"] == len(cl["rows"])
    for row in cl["rows"]:
        assert len(row["input"]) == 4 and row["input"][-1] == row["kernel"][2]
        for key in ("ours_fwd_ms", "ours_bwd_ms", "torch_fwd_ms", "torch_bwd_ms"):
            assert _positive(row[key]), (row, key)
    for key in ("ours_fwd_ms", "ours_bwd_ms", "torch_fwd_ms", "torch_bwd_ms"):
        assert cl[key] == pytest.approx(sum(row["count"] * row[key] for row in cl["rows"]))
    gaps = [row["count"] * (row["ours_fwd_ms"] + row["ours_bwd_ms"] - row["torch_fwd_ms"]
                            - row["torch_bwd_ms"]) for row in cl["rows"]]
    assert gaps == sorted(gaps, reverse=True)
    assert "convolutions alone (41, " in stdout


def test_ab_alternates_the_two_variants_in_one_process(result):
    r, stdout = result
    ab = r["ab"]
    # B is the config with the override: XLA:CPU's forms instead of the native kernels.
    assert (ab["override"], ab["option"], ab["a"], ab["b"]) == (
        "kernels=xla_cpu", "kernels", "auto", "xla_cpu")
    assert ab["b_kernels"] == "xla_cpu" != r["config"]["kernels_used"]
    assert len(ab["a_times_ms"]) == len(ab["b_times_ms"]) == 2
    for k in ("a", "b"):
        assert all(_positive(t) for t in ab[f"{k}_times_ms"])
        assert ab[f"{k}_step_ms"] == pytest.approx(np.median(ab[f"{k}_times_ms"]))
    assert ab["a_over_b"] == pytest.approx(ab["a_step_ms"] / ab["b_step_ms"])
    assert ("A/B in one process, alternating train steps, medians of 2: kernels=auto "
            in stdout) and " ms, kernels=xla_cpu " in stdout


def test_scanned_convolutions_count_once_per_iteration():
    import jax
    import jax.numpy as jnp

    from inception_flax import models
    # Unmerged 1x1 siblings, so that each kernel is one convolution.
    net = models.create_model("inception_resnet_v2", num_classes=10, depth_multiplier=0.25,
                              merge_pointwise=False)
    convs = ours.network_convolutions(net, 1, 75)
    params = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))["params"]
    # One 4-D kernel per convolution; a scanned block's kernels gain a leading axis.
    kernels = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if path[-1].key == "kernel" and leaf.ndim >= 4]
    assert sum(c["count"] for c in convs) == sum(s[0] if len(s) == 5 else 1 for s in kernels)
    assert max(c["count"] for c in convs) >= 20  # Block17 runs 20 times


def test_table_is_printed(result):
    r, stdout = result
    assert stdout.strip().endswith(report.format_table(r).strip().splitlines()[-1].strip())
    for label in ("train images/s", "inference images/s", "compile cold s",
                  "compile warm cache s", "ours/timm", "input pipeline"):
        assert label in stdout


def test_the_network_is_a_config_with_train_py_overrides():
    config, opts = cli.parse(["benchmark.py", "--model", "inception_resnet_v2", "--batch", "4",
                              "--config.model.dtype=bfloat16", "--config.model.scan_unroll=20",
                              "--config.model.aux_logits=false", "--no-warm-compile"])
    assert config.model.name == "inception_resnet_v2"
    assert (config.batch_size, config.eval_batch_size) == (4, 4)
    assert (config.image_size, config.model.dtype, config.model.scan_unroll) == (
        299, "bfloat16", 20)
    assert not config.model.aux_logits and opts.warm_compile is False
    assert config.model.residual_scales == (0.17, 0.10, 0.20)  # the network's own recipe
    assert not config.model.remat and config.model.bn_remat  # the config's defaults stand
    assert config.kernels == "auto" and opts.compare is None
    # The warm-compile probe repeats this command line: the same config file, overrides.
    assert opts.argv[1].endswith(os.path.join("configs", "inception_resnet_v2.py"))
    assert "--config.model.dtype=bfloat16" in opts.argv and "--model" not in opts.argv
    config, opts = cli.parse(["benchmark.py", f"--config={ROOT}/configs/inception_v4.py",
                              "--config.model.remat=true", "--config.batch_size=8",
                              "--memory-sweep", "--kernels", "xla_cpu"])
    assert config.model.name == "inception_v4" and config.model.remat is True
    assert (config.batch_size, config.eval_batch_size) == (8, 8)  # --config.batch_size
    assert opts.memory_sweep is True and config.kernels == "xla_cpu"
    config, opts = cli.parse(["benchmark.py", "--model=googlenet:digits",
                              "--ab", "model.merge_pointwise=false"])
    assert (config.model.name, config.image_size, config.batch_size) == ("inception_v1", 64, 16)
    assert opts.ab == "model.merge_pointwise=false"


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "bfloat16"], "use --config.model.dtype=bfloat16"),
    (["--no-aux"], "use --config.model.aux_logits=false"),
    (["--no-bn-remat"], "use --config.model.bn_remat=false"),
    (["--image-size=149"], "use --config.image_size=N"),
    (["--conv-layers"], "add --compare timm"),  # the per-convolution comparison needs PyTorch
    (["--model", "inception_v3", "--config=configs/inception_v4.py"], "not both"),
    (["--config.model.no_such_field=1"], "no field 'no_such_field'"),
    (["--kernels", "onednn"], "auto|native|xla_cpu|plain"),
    (["--batch", "0"], "--batch must be positive"),
    (["--model", "bn_inception", "--compare", "timm"],
     "no timm / torchvision counterpart of bn_inception"),
])
def test_bad_command_lines_fail_in_one_line(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cli.parse(["benchmark.py", *argv])


def test_ab_overrides_parse_as_config_flags_do():
    config, _ = cli.parse(["benchmark.py", "--model", "inception_v3"])
    b, field, value = overrides.apply(config, "model.bn_remat=false")
    assert (field, value, b.model.bn_remat, config.model.bn_remat) == (
        "model.bn_remat", False, False, True)  # a copy: A stays as it was
    b, _, value = overrides.apply(config, "dataset.area_range=(0.1, 1.0)")
    assert value == (0.1, 1.0) and config.dataset.area_range == (0.05, 1.0)
    with pytest.raises(ValueError, match="no field 'model.no_such_field'"):
        overrides.apply(config, "model.no_such_field=1")
    with pytest.raises(ValueError, match="Non-boolean"):
        overrides.apply(config, "model.bn_remat=maybe")
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        overrides.apply(config, "model.bn_remat")
    with pytest.raises(ValueError, match="has model.merge_pointwise=True already"):
        ours.ab(config, 10, "model.merge_pointwise=true", steps=1, warmup=0)


def test_memory_sweep_and_loss_are_reported():
    r = {"config": {"model": "inception_v4", "batch": 16, "image_size": 299, "dtype": "float32",
                    "depth_multiplier": 1.0, "scan_unroll": 1, "aux_logits": True,
                    "optimizer": "rmsprop", "devices": 1, "backend": "cpu", "cpu_threads": 2,
                    "steps": 3, "warmup": 1},
         "model": {"params": 1, "macs_per_image": 1e9, "train_forward_macs_per_image": 1e9},
         "machine": {"matmul_size": 2048, "matmul_gflops": 80.0},
         "ours": {"train_images_per_sec": 1.0, "train_loss": 7.1, "train_finite": True},
         "memory_sweep": [{"batch": b, "remat": m, "temp_mb": t, "argument_mb": 500.0}
                          for b, m, t in ((8, False, 2000.0), (8, True, 900.0),
                                          (16, False, 4000.0), (16, True, 1700.0))]}
    table = report.format_table(r)
    assert "last train loss 7.1000 (finite)" in table
    assert "XLA buffers of the train step" in table and "4,000" in table and "1,700" in table


SMALL = ["benchmark.py", "--model", "googlenet", "--batch", "2", "--config.image_size=32",
         "--config.model.depth_multiplier=0.25", "--num_classes", "10"]


def test_a_run_without_ab_or_timm_writes_its_json():
    """Only ours: the result (what --json writes) holds plain values, no compiled step."""
    r = run.run_benchmark(*cli.parse(SMALL + [
        "--steps", "1", "--warmup", "0", "--pipeline_batches", "0", "--matmul_size", "64",
        "--nowarm_compile", "--kernels", "plain"]))
    assert "ab" not in r and "timm" not in r and "compile_warm_s" not in r["ours"]
    assert (r["config"]["kernels"], r["config"]["kernels_used"]) == ("plain", "plain")
    assert json.loads(json.dumps(r))["ours"]["train_images_per_sec"] > 0


_WITHOUT_TENSORFLOW = """
import importlib.abc, json, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Refuse())
from benchmarks import cli, ours
config, opts = cli.parse(["benchmark.py", "--model", "googlenet", "--batch", "2",
                          "--config.image_size=32", "--config.model.depth_multiplier=0.25"])
built = ours.build(config, opts.num_classes)
built.train_step.lower(built.state, built.batch)
built.infer(built.state)()
print(json.dumps(sorted(m for m in ("tensorflow", "clu") if m in sys.modules)))
"""


def test_the_steps_build_without_tensorflow():
    """GPU machines often have JAX and PyTorch but not TensorFlow: the model, the state
    and the train and eval steps (and so the benchmark, without its input-pipeline part)
    need JAX only."""
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
