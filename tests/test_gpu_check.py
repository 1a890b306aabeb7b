"""The prepared GPU check, `python -m bench.gpu`, run as the tests can: on the CPU, tiny, quick.

On the GPU machine there is one try, so the command, its report and the
checker it builds without diffusers are proven here first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu
from fixtures.checkers import build_checker, clip_config

# Each test runs `python -m bench.gpu` in a subprocess (seconds).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {p.name for p in gpu.PRECISIONS}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("gpu") / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, output


def test_last_line_is_the_json_report(quick_run):
    stdout, output = quick_run
    last = stdout.rstrip("\n").splitlines()[-1]
    report = json.loads(last)
    assert json.loads(output.read_text()) == report
    assert {
        "date",
        "device",
        "device_type",
        "versions",
        "gflop_per_image",
        "peak_fp16_dense_tflops",
        "throughput",
        "agreement",
        "skipped",
        "seconds",
    } <= set(report)
    assert report["device_type"] == "cpu"
    assert "cuda_graphs" in report["skipped"] and report["skipped"]["tf32"]
    # Every precision is either measured or skipped with its reason.
    assert set(report["agreement"]) | set(report["skipped"]) >= PRECISIONS
    assert any(line.startswith("precision") for line in stdout.splitlines()[:-1]), "no table before the JSON"


def test_report_values_are_sane(quick_run):
    report = json.loads(quick_run[0].rstrip("\n").splitlines()[-1])
    measured = {row["precision"] for row in report["throughput"]}
    assert measured == set(report["agreement"]) and "fp32" in measured
    for row in report["throughput"]:
        assert row["batch"] in gpu.QUICK.batches
        assert row["images_per_s"] > 0 and row["iterations"] >= gpu.QUICK.min_iterations
        assert row["cuda_graph"] is False and row["peak_fraction"] == "unknown"
    for result in report["agreement"].values():
        assert result["cases"] > 0
        assert 0.0 <= result["decision_agreement"] <= 1.0 and 0.0 <= result["score_agreement"] <= 1.0
        assert result["max_cosine_deviation"] >= 0.0
    fp32 = report["agreement"]["fp32"]
    assert fp32["decision_agreement"] == fp32["score_agreement"] == 1.0
    assert fp32["max_cosine_deviation"] == 0.0


def test_checker_without_diffusers_is_the_fixture_checker():
    ours = gpu.build_checker("tiny", seed=3).state_dict()
    theirs = build_checker("tiny", seed=3).state_dict()
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_flops_and_peak_table():
    assert gpu.gflop_per_image(clip_config("full")) == pytest.approx(162.0, abs=0.5)
    assert gpu.dense_fp16_peak("NVIDIA H200") == gpu.dense_fp16_peak("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu.dense_fp16_peak("NVIDIA H100 PCIe") == 756.5
    assert gpu.dense_fp16_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.dense_fp16_peak("NVIDIA L40S") == 362.05
    assert gpu.dense_fp16_peak("NVIDIA L4") == 121.0
    assert gpu.dense_fp16_peak("NVIDIA H200 NVL") is None and gpu.dense_fp16_peak("NVIDIA L40") is None
