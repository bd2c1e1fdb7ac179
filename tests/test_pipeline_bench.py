"""`benchmark.py --pipeline` at a tiny size: ours (JPEG folder and TFRecord) and timm's loader
on the same generated files, in one invocation; its table and JSON hold positive figures."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPEATS = 2
ROWS = ("ours, JPEG folder", "ours, TFRecord (TFDS)", "timm loader, JPEG folder")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    tmp = tmp_path_factory.mktemp("pipeline_bench")
    out = tmp / "result.json"
    proc = subprocess.run(
        [sys.executable, "benchmark.py", "--pipeline", "--batch", "4",
         "--config.image_size=64", "--pipeline_images", "8", "--pipeline_workers", "1",
         f"--pipeline_repeats={REPEATS}", "--pipeline_batches", "2", "--warmup", "1",
         f"--pipeline_root={tmp / 'jpegs'}", f"--json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_table_has_every_side_with_positive_figures(bench: tuple[str, dict]):
    stdout, _ = bench
    for row in ROWS:
        line = next((x for x in stdout.splitlines() if x.startswith(row)), None)
        assert line is not None, stdout
        figures = [float(x) for x in re.findall(r"\d+\.\d+", line[len(row):])]
        # images/s, cores used, images/s per core, cores to feed each of the 3 GPU rates
        assert len(figures) == 6 and all(x > 0 for x in figures), line
    match = re.search(r"JPEG folder (\d+\.\d+)x, TFRecord (\d+\.\d+)x", stdout)
    assert match and all(float(x) > 0 for x in match.groups()), stdout


def test_json_has_every_repeat_and_consistent_medians(bench: tuple[str, dict]):
    _, result = bench
    assert result["config"]["repeats"] == REPEATS
    for side, runs in result["runs"].items():
        assert len(runs) == REPEATS
        for run in runs:
            assert run["images"] == 4 * 2 and run["wall_s"] > 0 and run["cpu_s"] > 0
        per_core = sorted(r["images_per_core_sec"] for r in runs)
        median = result["medians"][side]
        assert per_core[0] <= median["images_per_core_sec"] <= per_core[-1]
        need = median["cores_for_gpu_rates"]["inception_v3"]
        assert need == pytest.approx(2721 / median["images_per_core_sec"])
    ratio = result["ours_over_timm_per_core"]["ours_folder"]
    assert ratio == pytest.approx(result["medians"]["ours_folder"]["images_per_core_sec"]
                                  / result["medians"]["timm_folder"]["images_per_core_sec"])
