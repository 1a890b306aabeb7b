"""`python -m bench --quick`: the whole harness (build, export, serve, measure, report) on a tiny model.

No timing is asserted: only that every candidate was measured, nothing
failed, and the output has the promised shape.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from bench import selection
from bench.candidates import GATEWAY_ROW

# `python -m bench --quick` exports two repositories and serves them.
pytestmark = [pytest.mark.server, pytest.mark.slow]

SUMMARY_KEYS = {
    "diffusers_images_per_s",
    "ort_images_per_s",
    "triton_images_per_s",
    "speedup_vs_diffusers",
    "triton_vs_ort",
    "scan_images_per_s",
    "scan_vs_server",
    "scan_ceiling_images_per_s",
    "scan_ceiling_images_per_client_core_s",
    "images_encoded_per_s",
    "encoded_vs_pixels",
    "decoded_png_per_s_per_instance",
    "decoded_jpeg_per_s_per_instance",
    "triton_vs_ort_min",
    "triton_int8_vs_ort_int8_min",
    "cascade_images_per_s",
    "cascade_speedup_vs_diffusers",
    "cascade_forced_5pct_images_per_s",
    "cascade_forced_20pct_images_per_s",
    "gateway_images_per_s",
    "gateway_vs_triton",
    "pipeline_vs_embedder",
    "pipeline_images_per_s_per_core",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, output


def test_last_line_is_the_summary_json(quick_run):
    result, output = quick_run
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert SUMMARY_KEYS <= set(summary)
    assert all(summary[key] > 0 for key in SUMMARY_KEYS)
    results = json.loads((output / "results.json").read_text())
    assert summary == results["summary"]  # the same floats: JSON writes each as its repr
    rows = results["rows"]
    best = {kind: max(r["images_per_s"] for r in rows if r["kind"] == kind) for kind in ("baseline", "ort", "triton")}
    assert summary["speedup_vs_diffusers"] == pytest.approx(best["triton"] / best["baseline"])
    assert summary["triton_vs_ort"] == pytest.approx(best["triton"] / best["ort"])
    # Each concurrency c against in-process at batch min(c, best batch), for fp32 and for int8.
    for served, ort, key in (
        ("triton", "ort", "triton_vs_ort"),
        ("triton-int8", "ort-int8", "triton_int8_vs_ort_int8"),
    ):
        in_process = {r["batch"]: r["images_per_s"] for r in rows if r["kind"] == ort}
        best_batch = max(in_process, key=in_process.get)
        ratios = {
            str(r["concurrency"]): r["images_per_s"] / in_process[min(r["concurrency"], best_batch)]
            for r in rows
            if r["kind"] == served
        }
        assert summary[f"{key}_by_concurrency"] == pytest.approx(ratios)
        assert summary[f"{key}_min"] == pytest.approx(min(ratios.values()))
        assert len(summary[f"{key}_min_by_round"]) == 2 and summary[f"{key}_spread"] >= 0
    cascade = max((r for r in rows if r["kind"] == "cascade"), key=lambda r: r["images_per_s"])
    assert summary["cascade_speedup_vs_diffusers"] == pytest.approx(cascade["images_per_s"] / best["baseline"])
    assert summary["cpu_flags"] == results["machine"]["cpu_flags"]
    assert summary["scan_vs_server"] == pytest.approx(summary["scan_images_per_s"] / best["triton"])
    assert summary["scan_vs_server_spread"] >= 0 and summary["scan_tiny_vs_server"] > 0
    encoded = max((r for r in rows if r["kind"] == "triton-images"), key=lambda r: r["images_per_s"])
    assert summary["images_encoded_per_s"] == pytest.approx(encoded["images_per_s"])
    assert summary["encoded_best_concurrency"] == encoded["concurrency"]
    assert summary["encoded_vs_pixels"] == pytest.approx(encoded["images_per_s"] / best["triton"])
    # The gateway over Triton's own encoded path, both at concurrency 8 in this run, against --quick's goal.
    at_8 = {r["kind"]: r["images_per_s"] for r in rows if r.get("concurrency") == 8}
    assert summary["gateway_vs_triton"] == pytest.approx(at_8["gateway"] / at_8["triton-images"])
    assert summary["gateway_vs_triton_concurrency"] == 8 and summary["gateway_vs_triton_goal"] == 0.8
    assert len(summary["gateway_vs_triton_by_round"]) == 2
    assert "gateway: gateway_vs_triton " in result.stdout


def test_scan_ran_over_real_size_files(quick_run):
    result, output = quick_run
    scan = json.loads((output / "results.json").read_text())["scan"]
    for run in (scan["served"], scan["ceiling"]):
        assert run["images"] >= 48 and run["images_per_s"] > 0 and run["client_cpu_s"] > 0
    assert scan["ceiling"]["images_per_client_cpu_s"] == pytest.approx(
        scan["ceiling"]["images"] / scan["ceiling"]["client_cpu_s"]
    )
    assert "real-size files at" in result.stdout and "images/s per client core" in result.stdout
    assert (output / "logs" / "scan-served.log").read_text().count("images checked") >= 1


def test_every_candidate_was_measured_without_errors(quick_run):
    _, output = quick_run
    results = json.loads((output / "results.json").read_text())
    kinds = {r["kind"] for r in results["rows"]}
    assert results["settings"]["rows"] == sorted(selection.ROWS)  # no --rows: every row
    assert kinds == {
        "baseline",
        "ort",
        "ort-int8",
        "decoder",
        "triton",
        "triton-images",
        "gateway",
        "triton-int8",
        "cascade",
        "cascade-forced",
        "pipeline",
        "pipeline-gateway",
    }
    triton = [r for r in results["rows"] if r["kind"] == "triton"]
    assert [r["concurrency"] for r in triton] == [1, 2]
    assert [r["concurrency"] for r in results["rows"] if r["kind"] == "triton-int8"] == [1, 2]
    encoded = [r for r in results["rows"] if r["kind"] == "triton-images"]
    assert [r["concurrency"] for r in encoded] == [1, 8]
    through_gateway = [r for r in results["rows"] if r["kind"] == "gateway"]
    assert [r["concurrency"] for r in through_gateway] == [1, 8]
    for row in encoded + through_gateway:  # every request decoded on the server, then checked by the embedder
        assert row["server"]["safety_checker_images"]["requests"] > 0
        assert row["server"]["safety_checker_embedder"]["executions"] > 0
    for row in through_gateway:  # the gateway process's CPU time, read at each window's edges
        assert row["gateway_cpu_s"] >= 0 and row["gateway_cpu_ms_per_image"] >= 0
    decoders = [r for r in results["rows"] if r["kind"] == "decoder"]
    assert sorted(r["format"] for r in decoders) == ["JPEG", "PNG"]
    for row in results["rows"]:
        assert row["images_per_s"] > 0, row
        assert row.get("errors", 0) == 0, row
    for row in results["rows"]:  # every round measured every row
        assert len(row["windows_images_per_s"]) == 2 and row["spread"] >= 0, row["name"]
    for row in triton:
        embedder = row["server"]["safety_checker_embedder"]
        assert embedder["executions"] > 0 and 1 <= embedder["avg_batch_size"] <= row["concurrency"]
        latency = row["latency_ms"]
        assert latency["p95"] > 0
        if latency["p50"] is not None:  # else every window was unstable: perf_analyzer printed p95 only
            assert latency["p50"] <= latency["p95"] <= latency["p99"]


def test_perf_analyzer_measured_the_served_rows_and_its_csv_is_kept(quick_run):
    _, output = quick_run
    results = json.loads((output / "results.json").read_text())
    kinds = ("triton", "triton-int8", "cascade", "cascade-forced", "pipeline")
    perf_rows = [r for r in results["rows"] if r["kind"] in kinds]
    with open(output / "perf_analyzer.csv", newline="") as handle:
        kept = list(csv.DictReader(handle))
    # One CSV row per window that met perf_analyzer's criterion; an unstable one wrote none (and is counted).
    assert len(kept) == sum(2 - r["unstable_windows"] for r in perf_rows) > 0
    for row in perf_rows:
        windows = [k for k in kept if k["row"].startswith(row["name"]) and k["Concurrency"] == str(row["concurrency"])]
        assert len(windows) == 2 - row["unstable_windows"]
        assert {k["round"] for k in windows} <= {"1", "2"}
        for k in windows:  # each CSV's figure is one of the row's windows
            assert any(float(k["Inferences/Second"]) == pytest.approx(x) for x in row["windows_images_per_s"])
    logs = sorted((output / "perf_analyzer").glob("*.log"))
    assert len(logs) == 2 * len(perf_rows) and all("Pass [1] throughput" in log.read_text() for log in logs)


def test_the_pipeline_rows_measured_every_path_side_by_side(quick_run):
    result, output = quick_run
    results = json.loads((output / "results.json").read_text())
    summary = results["summary"]
    rows = [r for r in results["rows"] if r["kind"] in ("pipeline", "pipeline-gateway")]
    assert sorted((r["path"], r["batch"], r["concurrency"]) for r in rows) == [
        (path, 1, 8) for path in ("embedder", "float", "gateway", "images", "uint8")
    ]
    by_path = {r["path"]: r for r in rows}
    cores = summary["pipeline_server_cores"]
    assert cores >= 1 and all(r["server_cores"] == cores for r in rows)
    for row in rows:
        assert row["images_per_s_per_core"] == pytest.approx(row["images_per_s"] / cores)
    assert summary["pipeline_vs_embedder"] == pytest.approx(
        by_path["float"]["images_per_s"] / by_path["embedder"]["images_per_s"]
    )
    assert len(summary["pipeline_vs_embedder_by_round"]) == 2 and summary["pipeline_vs_embedder_spread"] >= 0
    assert summary["pipeline_images_per_s_per_core"] == pytest.approx(by_path["float"]["images_per_s_per_core"])
    images = by_path["images"]["server"]
    assert images["safety_checker_decode"]["inferences"] == images["safety_checker_images"]["requests"] > 0
    assert 0 < by_path["images"]["decode_share"] < 1 and 0 < summary["pipeline_decode_share_min"] < 1
    assert summary["pipeline_uint8_vs_float"].keys() == {"b1c8"}
    # The gateway row went through the gateway to the same server: its image-file ensemble answered it.
    assert by_path["gateway"]["server"]["safety_checker_images"]["requests"] > 0
    assert "pipeline: pipeline_vs_embedder " in result.stdout


def test_the_cascade_rows_count_their_fallbacks(quick_run):
    _, output = quick_run
    results = json.loads((output / "results.json").read_text())
    copies = results["cascade_bounds"]["copies"]
    assert sorted(c["fraction"] for c in copies.values()) == [0.05, 0.2]
    bounds = {c["fraction"]: c["cosine_bound"] for c in copies.values()}
    assert 0 < bounds[0.05] < bounds[0.2]
    cascade = [r for r in results["rows"] if r["kind"].startswith("cascade")]
    for row in cascade:  # what the fp32 embedder recomputed, of what the cascade answered
        stats = row["server"]
        answered = stats[row["cascade_model"]]["inferences"]
        assert answered > 0 and stats["safety_checker_embedder_int8"]["inferences"] == answered
        assert row["fallback_fraction"] == pytest.approx(stats["safety_checker_embedder"]["inferences"] / answered)
    forced = {r["forced_fallback"]: r["fallback_fraction"] for r in cascade if r["kind"] == "cascade-forced"}
    assert 0 < forced[0.05] < forced[0.2] < 1


def test_plot_table_and_int8_report(quick_run):
    result, output = quick_run
    assert (output / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "diffusers forward() fp32, batch 1" in result.stdout and "triton int8 (gRPC, perf_analyzer)" in result.stdout
    assert "triton fp32 image files, PNG+JPEG (gRPC)" in result.stdout
    assert GATEWAY_ROW in result.stdout
    assert "Traceback" not in (output / "logs" / "gateway.log").read_text()
    assert "decoder alone, 512x512 PNG (one instance)" in result.stdout
    report = json.loads((output / "results.json").read_text())["int8_report"]
    assert report["max_cosine_deviation"] > 0
    assert 0 <= report["stress_margins"]["decision_agreement"] <= 1
    assert "window" in result.stderr  # the progress bar
