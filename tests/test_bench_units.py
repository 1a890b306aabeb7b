"""The benchmark's own parts: the load generator against a real tritonserver, the report writers, the summary
and the selection of rows (`--rows`).

No timing is asserted (the host is shared and slow); what is checked is that
the numbers are counted consistently and that failures show up.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import cascade, loadgen, pipeline, report, run, selection, served
from bench import scan as scan_bench
from bench.candidates import candidates
from bench.harness import Harness
from bench.settings import FULL, QUICK
from bench.summary import reference_batch, summarize
from safety_checker_client import spec

STATS_MODELS = (spec.ENSEMBLE_MODEL, spec.EMBEDDER_MODEL)


# -- loadgen against the session's tritonserver -------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_measure_counts_requests_and_reads_server_stats(server, parity_set, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    pixels = np.ascontiguousarray(parity_set.pixels[:1], dtype=np.float32)
    calls = []
    result = loadgen.measure(
        url,
        spec.ENSEMBLE_MODEL,
        {spec.PIXEL_VALUES.name: pixels},
        concurrency=2,
        window_s=1.5,
        warmup_s=0.5,
        protocol=protocol,
        stats_models=STATS_MODELS,
        progress=lambda: calls.append(1),
    )
    out = result.as_dict()
    json.dumps(out)  # JSON-ready as promised

    assert out["errors"] == 0, out["first_error"]
    assert out["first_error"] is None
    assert out["concurrency"] == 2 and out["batch"] == 1
    assert out["requests"] > 0
    assert out["images"] == out["requests"] * 1
    assert 1.0 < out["window_s"] < 3.0
    assert out["completed_images_per_s"] == pytest.approx(out["images"] / out["window_s"])
    # Two ways to the same rate: per-client cycles and the completion count. Each client's first answer in
    # the window opens its cycles, so there are at most `concurrency` fewer cycles than answers; and as no
    # client's cycles outlast the window, the cycle rate is never below the cycles / window. (How far the
    # two rates drift apart depends on stalls at the window edges, so no tolerance between them is asserted.)
    assert out["requests"] - 2 <= out["cycles"] <= out["requests"] - 1
    assert out["cycles"] > 0
    assert out["images_per_s"] >= out["cycles"] / out["window_s"] * (1 - 1e-9)
    assert len(calls) >= out["requests"]  # warm-up and drain also report progress
    latency = out["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert latency["mean"] > 0

    embedder = out["server"][spec.EMBEDDER_MODEL]
    assert embedder["executions"] >= 1
    # Triton counts a batch and its requests in separate steps, so a sample can fall between them at each
    # edge; two clients form batches of one or two.
    assert embedder["executions"] - 2 <= embedder["inferences"] <= 2 * embedder["executions"] + 2
    assert embedder["avg_batch_size"] == pytest.approx(embedder["inferences"] / embedder["executions"])
    assert embedder["failures"] == 0
    assert embedder["avg_queue_ms"] >= 0 and embedder["avg_compute_infer_ms"] > 0
    # The statistics are sampled just outside the window, so the server counts every answer in it but those
    # (at most two, one per client) it had counted before the first sample; it can count no more requests
    # than were sent in all (warm-up and drain included, each reported by `progress`).
    assert out["images"] - 2 <= embedder["inferences"] <= len(calls)
    assert out["server"][spec.ENSEMBLE_MODEL]["inferences"] >= 1


def test_measure_reports_refused_requests(server, parity_set):
    pixels = np.array(parity_set.pixels[:1], dtype=np.float32)
    pixels[0, 1, 100, 100] = np.nan
    result = loadgen.measure(
        server.grpc_url,
        spec.ENSEMBLE_MODEL,
        {spec.PIXEL_VALUES.name: pixels},
        concurrency=2,
        window_s=0.5,
        warmup_s=0.5,
        stats_models=(spec.EMBEDDER_MODEL,),
    )
    assert result.errors > 0
    assert result.requests == 0 and result.images_per_s == 0
    assert "non-finite" in result.first_error, result.first_error
    assert result.as_dict()["latency_ms"] == {"p50": None, "p95": None, "p99": None, "mean": None}


def test_measure_refuses_inputs_that_disagree_on_the_batch():
    with pytest.raises(ValueError, match="batch"):
        loadgen.measure("127.0.0.1:1", "m", {"a": np.zeros((1, 2)), "b": np.zeros((2, 2))}, 1, 1.0)


def test_measure_refuses_requests_of_different_batch_sizes():
    with pytest.raises(ValueError, match="different batch sizes"):
        loadgen.measure("127.0.0.1:1", "m", [{"a": np.zeros((1, 2))}, {"a": np.zeros((2, 2))}], 1, 1.0)


def test_measure_sends_image_files_in_turn(server):
    """A list of requests: each client sends them in turn; object arrays of bytes go as BYTES."""
    from image_files import small_png

    files = [{spec.IMAGE.name: np.array([[small_png(seed)]], dtype=object)} for seed in (1, 2, 3)]
    result = loadgen.measure(
        server.grpc_url,
        spec.IMAGES_MODEL,
        files,
        concurrency=2,
        window_s=1.0,
        warmup_s=0.3,
        stats_models=(spec.IMAGES_MODEL,),
    )
    assert result.errors == 0, result.first_error
    assert result.requests > 0 and result.batch == 1
    assert result.server[spec.IMAGES_MODEL]["requests"] >= result.requests - 2


class _StatsClient:
    """Answers get_inference_statistics with the samples given, as tritonclient.grpc's as_json does."""

    def __init__(self, *samples):
        self.samples = list(samples)

    def get_inference_statistics(self, model_name, as_json=False):
        assert as_json
        return self.samples.pop(0)


def test_stats_delta_from_grpc_json():
    # MessageToJson writes uint64 as strings and omits zero fields.
    start = {"model_stats": [{"name": "m", "version": "1"}]}
    end = {
        "model_stats": [
            {
                "name": "m",
                "version": "1",
                "inference_count": "6",
                "execution_count": "4",
                "inference_stats": {
                    "success": {"count": "6", "ns": "60000000"},
                    "queue": {"count": "6", "ns": "3000000"},
                    "compute_input": {"count": "6", "ns": "600000"},
                    "compute_infer": {"count": "6", "ns": "54000000"},
                    "compute_output": {"count": "6"},
                },
            }
        ]
    }
    client = _StatsClient(start, end)
    delta = loadgen.stats_delta(
        loadgen.stats_counters(client, "m", "grpc"), loadgen.stats_counters(client, "m", "grpc")
    )
    assert delta["executions"] == 4 and delta["inferences"] == 6 and delta["requests"] == 6
    assert delta["avg_batch_size"] == pytest.approx(1.5)
    assert delta["avg_queue_ms"] == pytest.approx(0.5)
    assert delta["avg_compute_input_ms"] == pytest.approx(0.1)
    assert delta["avg_compute_infer_ms"] == pytest.approx(9.0)
    assert delta["avg_compute_output_ms"] == 0.0
    assert loadgen.stats_delta({}, {})["avg_batch_size"] is None


# -- report ---------------------------------------------------------------------------------------


def _triton_row(name, concurrency, images_per_s, errors=0):
    return {
        "name": name,
        "kind": "triton",
        "concurrency": concurrency,
        "batch": 1,
        "images_per_s": images_per_s,
        "requests": 10 * concurrency,
        "images": 10 * concurrency,
        "window_s": 20.0,
        "latency_ms": {
            "p50": 900.0 * concurrency,
            "p95": 1000.0 * concurrency,
            "p99": 1100.0 * concurrency,
            "mean": 950.0 * concurrency,
        },
        "errors": errors,
        "first_error": "boom" if errors else None,
        # In stats_models order; the first model with all three numbers is the one the table shows.
        "server": {
            spec.POSTPROCESS_MODEL: {
                "executions": 0,
                "avg_batch_size": None,
                "avg_queue_ms": None,
                "avg_compute_infer_ms": None,
            },
            spec.EMBEDDER_MODEL: {
                "executions": 7,
                "avg_batch_size": 1.25 + concurrency,
                "avg_queue_ms": 12.5,
                "avg_compute_infer_ms": 876.5,
            },
            spec.ENSEMBLE_MODEL: {
                "executions": 9,
                "avg_batch_size": 1.0,
                "avg_queue_ms": 0.1,
                "avg_compute_infer_ms": 900.0,
            },
        },
    }


@pytest.fixture
def results():
    rows = [
        {"name": "diffusers forward() fp32", "kind": "baseline", "images_per_s": np.float64(0.53), "batch": 1},
        {"name": "onnxruntime fp32 in-process", "kind": "ort", "images_per_s": 0.9, "batch": 1},
    ]
    rows += [_triton_row("triton fp32 (gRPC)", c, 0.8 + 0.1 * c) for c in (1, 2, 4, 8)]
    rows += [_triton_row("triton int8 (gRPC)", c, 1.5 + 0.2 * c, errors=int(c == 4)) for c in (1, 2, 4, 8)]
    return {
        "machine": {"description": "2-core test VM, no GPU"},
        "settings": {"window_s": 20},
        "rows": rows,
        "summary": {"speedup_vs_diffusers": np.float32(3.0)},
    }


def test_plot_writes_a_png(results, tmp_path):
    import matplotlib.image

    path = report.plot(results, tmp_path / "plots" / "bench.png")
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(path))
    assert image.shape[:2] == (550, 1300)  # figsize (13, 5.5) at 100 dpi


def test_plot_without_series(results, tmp_path):
    results["rows"] = results["rows"][:2]
    assert report.plot(results, tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_draws_each_in_process_kinds_fastest_batch_once():
    rows = [
        {"kind": "ort", "batch": 1, "images_per_s": 1.0},
        {"kind": "baseline", "batch": 1, "images_per_s": 0.8},
        {"kind": "ort", "batch": 4, "images_per_s": 1.2},
        {"kind": "ort", "batch": 2, "images_per_s": 1.1},
    ]
    assert report._best_per_kind(rows) == [rows[2], rows[1]]


def test_table_has_every_row(results):
    text = report.table(results)
    lines = text.splitlines()
    assert len(lines) == 2 + len(results["rows"])
    for row, line in zip(results["rows"], lines[2:]):
        assert line.startswith(row["name"])
        cells = line[len(row["name"]) :].split()
        assert cells[0] == (str(row["concurrency"]) if "concurrency" in row else "-")
        if row["kind"] == "triton":
            # Server numbers come from the embedder, the first model that has them.
            assert f"{1.25 + row['concurrency']:.2f}" in cells and "12.5" in cells and "876.5" in cells
            assert cells[-1] == str(row["errors"])
        else:
            assert cells[3:] == ["-"] * 8
    assert len({len(line) for line in lines[:2]}) == 1


def test_write_json_round_trips(results, tmp_path):
    path = report.write_json(results, tmp_path / "out" / "results.json")
    loaded = json.loads(path.read_text())
    assert loaded["rows"][0]["images_per_s"] == 0.53
    assert loaded["summary"]["speedup_vs_diffusers"] == 3.0
    assert loaded == json.loads(json.dumps(results, default=lambda v: v.item()))


def test_every_reference_line_has_a_style_of_its_own():
    references = [
        {"name": "diffusers, batch 1", "kind": "baseline"},
        {"name": "diffusers, batch 4", "kind": "baseline"},
        *({"name": f"onnxruntime {i}", "kind": "ort"} for i in range(12)),
    ]
    styles = report.reference_styles(references)
    keys = [(s["color"], str(s["linestyle"])) for s in styles]
    assert len(set(keys)) == len(references)
    assert [s["color"] for s in styles[:2]] == ["black", "black"]  # the baselines: black, told apart by dashes
    assert all(s["linestyle"] not in ("-", "solid") for s in styles)  # the series are the solid lines


# -- summary ratios -------------------------------------------------------------------------------


def _row(kind, rates, concurrency=None, batch=1):
    return {
        "name": kind,
        "kind": kind,
        "concurrency": concurrency,
        "batch": batch,
        "images_per_s": sum(rates) / len(rates),
        "windows_images_per_s": rates,
        "spread": (max(rates) - min(rates)) / (sum(rates) / len(rates)),
    }


def test_the_summary_holds_each_concurrency_to_in_process_at_batch_min_of_it_and_the_best_batch():
    rows = [
        _row("baseline", [0.8, 0.9]),
        _row("ort", [1.0, 1.0], batch=1),
        _row("ort", [1.1, 0.9], batch=4),  # same mean as batch 1
        _row("ort", [1.2, 1.0], batch=8),  # the best batch: 1.1
        _row("triton", [1.1, 1.0], concurrency=1),  # held to batch 1
        _row("triton", [1.0, 1.09], concurrency=2),  # batch 2 was not measured: held to batch 1
        _row("triton", [1.0, 1.0], concurrency=5),  # held to batch 4
        _row("triton", [1.2, 1.0], concurrency=8),  # held to batch 8
        _row("ort-int8", [3.0, 3.0], batch=1),
        _row("ort-int8", [3.2, 3.4], batch=4),
        _row("triton-int8", [3.0, 3.0], concurrency=1),
        _row("triton-int8", [3.2, 3.1], concurrency=8),
    ]
    summary = summarize(rows)
    assert summary["ort_images_per_s"] == pytest.approx(1.1) and summary["ort_best_batch"] == 8
    assert summary["triton_vs_ort"] == pytest.approx(1.1 / 1.1)
    assert summary["triton_vs_ort_reference_batch_by_concurrency"] == {"1": 1, "2": 1, "5": 4, "8": 8}
    assert summary["triton_vs_ort_by_concurrency"] == pytest.approx({"1": 1.05, "2": 1.045, "5": 1.0, "8": 1.0})
    assert summary["triton_vs_ort_min"] == pytest.approx(1.0)
    assert summary["triton_vs_ort_min_at_concurrency"] == 5
    # Each round on its own: the worst of every served window over its reference's window of that round.
    assert summary["triton_vs_ort_min_by_round"] == pytest.approx(
        [min(1.1, 1.0, 1.0 / 1.1, 1.0), min(1.0, 1.09, 1.0 / 0.9, 1.0)]
    )
    assert summary["triton_vs_ort_spread"] == pytest.approx(0.2)  # batch 4's, the largest of the rows used
    # int8: concurrency 1 against batch 1, 8 against the best batch, 4.
    assert summary["triton_int8_vs_ort_int8_by_concurrency"] == pytest.approx({"1": 1.0, "8": 3.15 / 3.3})
    assert summary["triton_int8_vs_ort_int8_min"] == pytest.approx(3.15 / 3.3)
    assert summary["triton_int8_vs_ort_int8_min_at_concurrency"] == 8
    assert summary["speedup_vs_diffusers"] == pytest.approx(1.1 / 0.85)
    assert summary["speedup_vs_diffusers_spread"] == pytest.approx(0.2 / 1.1)
    assert "cascade_images_per_s" not in summary


@pytest.mark.parametrize(
    "concurrency, best, measured, held_to",
    [
        (1, 4, [1, 2, 3, 4], 1),
        (3, 4, [1, 2, 3, 4], 3),
        (8, 4, [1, 2, 3, 4], 4),
        (3, 4, [1, 4], 1),
        (8, 2, [1, 2, 4], 2),
    ],
)
def test_the_reference_batch_is_the_largest_measured_up_to_min_of_concurrency_and_best(
    concurrency, best, measured, held_to
):
    assert reference_batch(concurrency, best, measured) == held_to


def test_the_scan_ratios_carry_the_spread_of_the_scan_and_of_the_row():
    rows = [
        _row("triton", [2.0, 2.2], concurrency=4),
        {**_row(pipeline.KIND, [100.0, 100.0], concurrency=8), "path": pipeline.FLOAT, "server_cores": 2},
        {**_row(pipeline.KIND, [300.0, 300.0], concurrency=8), "path": pipeline.EMBEDDER, "server_cores": 2},
    ]
    served = {"images_per_s": 2.0, "images_per_client_cpu_s": 9.0, "spread": 0.3}
    ceiling = {"images_per_s": 40.0, "images_per_client_cpu_s": 60.0, "spread": 0.01}
    summary = summarize(rows, {"served": served, "ceiling": ceiling})
    assert summary["scan_vs_server"] == pytest.approx(2.0 / 2.1)
    assert summary["scan_vs_server_spread"] == pytest.approx(0.3)
    assert summary["scan_tiny_vs_server"] == pytest.approx(0.4)  # over the float path, not the embedder
    assert summary["scan_tiny_vs_server_spread"] == pytest.approx(0.01)


def test_the_scan_is_watched_until_it_exits_counting_its_report_lines_as_they_are_written(tmp_path):
    import subprocess
    import sys

    report = tmp_path / "report.jsonl"
    writer = (
        "import sys, time\n"
        "with open(sys.argv[1], 'w') as out:\n"
        "    for i in range(6):\n"
        "        out.write('{}\\n'); out.flush(); time.sleep(0.1)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", writer, str(report)])
    samples = scan_bench._watch(process, report, every_s=0.05)
    assert process.returncode == 0
    counts = [n for _, n in samples]
    assert counts[-1] == 6 and counts == sorted(counts) and len(set(counts)) > 2  # seen growing, all counted


def test_the_scan_halves_are_the_rates_either_side_of_the_middle_of_its_writing():
    samples = [(0.5, 0), (1.0, 2), (2.0, 12), (3.0, 22), (4.0, 27), (5.0, 32), (6.0, 32)]
    assert scan_bench.halves_images_per_s(samples) == pytest.approx([10.0, 5.0])
    assert scan_bench.halves_images_per_s([(1.0, 0), (2.0, 4)]) == []


def test_the_summary_reports_the_cascade_with_its_fallbacks_and_the_cpu_flags():
    rows = [
        _row("baseline", [1.0, 1.0]),
        _row("ort", [1.0, 1.0]),
        _row("triton", [1.0, 1.0], concurrency=1),
        {**_row("cascade", [2.9, 3.1], concurrency=8), "fallback_fraction": 0.0},
        {**_row("cascade-forced", [2.5, 2.5], concurrency=8), "forced_fallback": 0.05, "fallback_fraction": 0.06},
        {**_row("cascade-forced", [1.5, 1.5], concurrency=8), "forced_fallback": 0.2, "fallback_fraction": 0.19},
    ]
    summary = summarize(rows, cpu_flags=["avx2", "avx512_vnni"])
    assert summary["cascade_images_per_s"] == pytest.approx(3.0)
    assert summary["cascade_speedup_vs_diffusers"] == pytest.approx(3.0)
    assert summary["cascade_fallback_fraction"] == 0.0
    assert summary["cascade_forced_5pct_images_per_s"] == pytest.approx(2.5)
    assert summary["cascade_forced_5pct_fallback_fraction"] == 0.06
    assert summary["cascade_forced_20pct_images_per_s"] == pytest.approx(1.5)
    assert summary["cpu_flags"] == ["avx2", "avx512_vnni"]


def test_a_served_row_takes_its_latency_percentiles_from_the_same_windows():
    def window(stable, p50, p95, p99):
        latency = {"p50": p50, "p95": p95, "p99": p99}
        return {"images_per_s": 1.0, "latency_ms": latency, "stable": stable, "server": {}}

    stable, unstable = window(True, 25.0, 30.0, 35.0), window(False, None, 10.0, None)
    assert served.pooled([stable, unstable])["latency_ms"] == {"p50": 25.0, "p95": 30.0, "p99": 35.0}
    assert served.pooled([unstable, unstable])["latency_ms"] == {"p50": None, "p95": 10.0, "p99": None}


def test_a_forced_bound_lies_between_neighbouring_critical_bounds():
    critical = np.array([0.3, 0.1, 0.2, 0.4])
    assert cascade.bound_for(critical, 1) == pytest.approx(0.15)
    assert cascade.bound_for(critical, 3) == pytest.approx(0.35)
    for k in (0, 4):
        with pytest.raises(ValueError, match="between 1 and 3 of 4"):
            cascade.bound_for(critical, k)
    with pytest.raises(ValueError, match="cannot be told apart"):
        cascade.bound_for(np.array([0.1, 0.2, 0.2]), 2)


# -- --rows: which rows a selection sets up and measures, and which summary keys it yields -------

# The keys of a served-over-in-process ratio (summary._served_vs_in_process).
RATIO_KEYS = (
    "",
    "_min",
    "_min_at_concurrency",
    "_by_concurrency",
    "_min_by_round",
    "_reference_batch_by_concurrency",
    "_spread",
)
# Every key of a full run's summary, in the order it prints them.
FULL_SUMMARY = [
    "diffusers_images_per_s",
    "ort_images_per_s",
    "ort_best_batch",
    "triton_images_per_s",
    "triton_best_concurrency",
    "speedup_vs_diffusers",
    "speedup_vs_diffusers_spread",
    *(f"triton_vs_ort{k}" for k in RATIO_KEYS),
    "unstable_perf_analyzer_windows",
    "images_encoded_per_s",
    "encoded_best_concurrency",
    "encoded_vs_pixels",
    "encoded_vs_pixels_spread",
    "decoded_png_per_s_per_instance",
    "decoded_jpeg_per_s_per_instance",
    "gateway_images_per_s",
    "gateway_best_concurrency",
    *(f"gateway_vs_triton{k}" for k in ("", "_concurrency", "_by_concurrency", "_by_round", "_spread", "_goal")),
    "gateway_cpu_ms_per_image",
    "triton_int8_images_per_s",
    "ort_int8_images_per_s",
    "int8_speedup_vs_diffusers",
    "int8_speedup_vs_diffusers_spread",
    *(f"triton_int8_vs_ort_int8{k}" for k in RATIO_KEYS),
    "cascade_images_per_s",
    "cascade_fallback_fraction",
    "cascade_speedup_vs_diffusers",
    "cascade_speedup_vs_diffusers_spread",
    "cascade_forced_5pct_images_per_s",
    "cascade_forced_5pct_fallback_fraction",
    "cascade_forced_20pct_images_per_s",
    "cascade_forced_20pct_fallback_fraction",
    *(f"pipeline_vs_embedder{k}" for k in ("", "_spread", "_by_round", "_concurrency")),
    "pipeline_images_per_s_per_core",
    "pipeline_images_per_s_per_core_spread",
    "pipeline_server_cores",
    "pipeline_by_path",
    "pipeline_uint8_vs_float_min",
    "pipeline_uint8_vs_float_min_spread",
    "pipeline_uint8_vs_float",
    "cpu_flags",
    "scan_images_per_s",
    "scan_vs_server",
    "scan_vs_server_spread",
    "scan_ceiling_images_per_s",
    "scan_ceiling_images_per_client_core_s",
    "scan_tiny_vs_server",
    "scan_tiny_vs_server_spread",
]


class _Unused:
    """A server or worker the candidates hold but that no test asks to measure."""

    grpc_url = "127.0.0.1:1"
    url = "http://127.0.0.1:1"
    pid = None  # a server's: the cores it may use are this process's

    def window(self, batch, window_s):
        raise AssertionError("no window is measured here")

    def cpu_s(self):
        raise AssertionError("no window is measured here")


def _built(chosen, quick, tmp_path):
    """A harness as `chosen` would set it up, with stand-ins for its servers and workers."""
    forced = {"copies": {f"cascade_{f}": {"fraction": f, "cosine_bound": f / 10} for f in (0.05, 0.2)}}
    return Harness(
        tmp_path,
        servers={name: _Unused() for name in chosen.serves(quick)},
        workers={kind: _Unused() for kind in ("baseline", "ort", "ort-int8") if kind in chosen.kinds},
        decoders={ext: _Unused() for ext in ("png", "jpeg") if "decoder" in chosen.kinds},
        cascade_data=tmp_path / "cascade-images.json" if "cascade" in chosen else None,
        forced=forced if "cascade" in chosen else None,
        pipeline_gateway=_Unused() if "pipeline" in chosen else None,
    )


def _summary_of(chosen, settings, tmp_path):
    """The summary of a run of `chosen`, every candidate given made-up windows."""
    rows = []
    for index, candidate in enumerate(candidates(settings, chosen, _built(chosen, False, tmp_path), tmp_path)):
        rows.append({**_row(candidate.kind, [1.0 + index, 1.1 + index]), **candidate.extra, "name": candidate.name})
        if candidate.kind.startswith("cascade"):
            rows[-1]["fallback_fraction"] = 0.1
    scan = None
    if "scan" in chosen:
        scan = {"served": {"images_per_s": 2.0}, "ceiling": {"images_per_s": 9.0, "images_per_client_cpu_s": 5.0}}
    return summarize(rows, scan, ["avx2"], settings.gateway_goal)


def test_rows_parse_names_and_refuse_unknown_ones():
    assert selection.parse("all") == selection.ALL
    assert selection.parse(" triton, images ").names == {"triton", "images"}
    with pytest.raises(ValueError, match="unknown rows pixels; choose from all, diffusers"):
        selection.parse("triton,pixels")
    with pytest.raises(ValueError, match="none given"):
        selection.parse(",")
    assert all(name in selection.describe() for name in selection.ROWS)


@pytest.mark.parametrize(
    "rows, quick, exports, serves",
    [
        ("all", False, ["fp32", "int8", "cascade", "tiny"], ["fp32", "int8", "cascade", "tiny"]),
        ("all", True, ["fp32", "int8", "cascade"], ["fp32", "int8", "cascade"]),
        ("triton,images", False, ["fp32"], ["fp32"]),
        ("diffusers", False, [], []),
        ("ort,decoder", False, ["fp32"], []),
        ("cascade", False, ["int8", "cascade"], ["int8", "cascade"]),
        ("scan", False, ["fp32", "tiny"], ["fp32", "tiny"]),
        ("scan", True, ["fp32"], ["fp32"]),
        ("images,gateway", False, ["fp32"], ["fp32"]),
        ("gateway", True, ["fp32"], ["fp32"]),
    ],
)
def test_a_selection_exports_and_serves_only_what_its_rows_use(rows, quick, exports, serves):
    chosen = selection.parse(rows)
    assert chosen.exports(quick) == exports and chosen.serves(quick) == serves


def test_a_full_run_measures_every_row_in_table_order(tmp_path):
    measured = candidates(QUICK, selection.ALL, _built(selection.ALL, True, tmp_path), tmp_path)
    assert [(c.kind, c.extra.get("concurrency") or c.extra.get("format")) for c in measured] == [
        ("baseline", None),
        ("ort", None),
        ("ort-int8", None),
        ("decoder", "PNG"),
        ("decoder", "JPEG"),
        ("triton", 1),
        ("triton", 2),
        ("triton-int8", 1),
        ("triton-int8", 2),
        ("cascade", 2),
        ("cascade-forced", 2),
        ("cascade-forced", 2),
        ("triton-images", 1),
        ("triton-images", 8),
        ("gateway", 1),
        ("gateway", 8),
        ("pipeline", 8),
        ("pipeline", 8),
        ("pipeline", 8),
        ("pipeline", 8),
        ("pipeline-gateway", 8),
    ]
    assert list(_summary_of(selection.ALL, QUICK, tmp_path)) == FULL_SUMMARY


def test_triton_and_images_measure_encoded_vs_pixels_at_the_levels_given(tmp_path):
    args = run._parser().parse_args(["--rows", "triton,images", "--concurrency", "1,4,8", "--images-concurrency", "8"])
    settings = run.settings_from(args)
    assert settings.concurrency == (1, 4, 8) and settings.images_concurrency == (8,)
    assert settings.batches == FULL.batches and settings.window_s == FULL.window_s
    measured = candidates(settings, args.rows, _built(args.rows, False, tmp_path), tmp_path)
    assert [(c.kind, c.extra["concurrency"]) for c in measured] == [
        ("triton", 1),
        ("triton", 4),
        ("triton", 8),
        ("triton-images", 8),
    ]
    assert set(_summary_of(args.rows, settings, tmp_path)) == {
        "triton_images_per_s",
        "triton_best_concurrency",
        "unstable_perf_analyzer_windows",
        "images_encoded_per_s",
        "encoded_best_concurrency",
        "encoded_vs_pixels",
        "encoded_vs_pixels_spread",
        "cpu_flags",
    }


@pytest.mark.parametrize(
    "rows, present, absent",
    [
        ("images,scan", {"images_encoded_per_s", "scan_images_per_s"}, {"encoded_vs_pixels", "scan_vs_server"}),
        ("ort,triton", {"triton_vs_ort_min", "triton_vs_ort_min_by_round"}, {"speedup_vs_diffusers"}),
        (
            "diffusers,cascade",
            {"cascade_speedup_vs_diffusers", "cascade_forced_20pct_images_per_s"},
            {"ort_images_per_s"},
        ),
        ("triton-int8,diffusers", {"int8_speedup_vs_diffusers"}, {"triton_int8_vs_ort_int8_min"}),
        ("ort-int8,triton-int8", {"triton_int8_vs_ort_int8_min"}, {"int8_speedup_vs_diffusers"}),
        ("decoder", {"decoded_png_per_s_per_instance", "decoded_jpeg_per_s_per_instance"}, {"triton_images_per_s"}),
        ("gateway", {"gateway_images_per_s", "gateway_best_concurrency"}, {"gateway_vs_triton"}),
        ("images,gateway", {"gateway_vs_triton", "gateway_vs_triton_goal"}, {"encoded_vs_pixels"}),
    ],
)
def test_a_selection_reports_the_ratios_its_rows_allow(rows, present, absent, tmp_path):
    keys = set(_summary_of(selection.parse(rows), QUICK, tmp_path))
    assert present <= keys and not absent & keys
    assert keys <= set(FULL_SUMMARY)


def test_level_options_refuse_what_is_not_a_list_of_positive_integers():
    for bad in ("0", "1,x", ""):
        with pytest.raises(SystemExit):
            run._parser().parse_args(["--concurrency", bad])
    with pytest.raises(SystemExit):
        run._parser().parse_args(["--rows", "everything"])
