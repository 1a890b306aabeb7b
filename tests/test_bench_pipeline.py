"""The pipeline rows of `make bench` (bench/pipeline.py): their input data, how a row is pooled from
perf_analyzer's output, the summary's ratios, and one batch-8 window through a real tritonserver.

No timing is asserted: the rates below are made up or only checked for being counted consistently.
"""

from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest

from bench import perf, pipeline, pipeline_data, selection, served
from bench.candidates import Candidate
from bench.loadgen import LoadResult
from bench.pooling import pooled_row
from bench.served import PerfSettings
from bench.settings import FULL, QUICK
from bench.summary import summarize
from safety_checker_client import spec
from safety_checker_client.preprocess import preprocess, preprocess_uint8

# A CSV perf_analyzer 2.41 wrote for one pipeline window (`-f FILE --verbose-csv`, times in microseconds).
PERF_CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,"
    "request/response,response wait\n"
    "8,115.027,104,27529,1,878,37897,2130,6,65205,104275,110461,122180,110,68322\n"
)


def _stats(requests: int, compute_ms: float, batch: float = 1.0) -> dict:
    """One model's statistics over a window, as served.window records them (bench/loadgen.stats_delta)."""
    return {
        "executions": round(requests / batch),
        "inferences": requests,
        "requests": requests,
        "failures": 0,
        "avg_batch_size": batch,
        "avg_queue_ms": 0.1,
        "avg_compute_input_ms": 0.0,
        "avg_compute_infer_ms": compute_ms,
        "avg_compute_output_ms": 0.0,
    }


def _window(rate: float, server: dict) -> dict:
    return {
        "images_per_s": rate,
        "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
        "stable": True,
        "server": server,
    }


def _row(path: str, batch: int, concurrency: int, rates, cores: int = 2, server=None) -> dict:
    """A pooled pipeline row whose rounds measured `rates`."""
    server = server or {spec.EMBEDDER_MODEL: _stats(10, 1.0)}
    if path == pipeline.GATEWAY:  # the load generator's windows: whole requests in a 1 s window
        kind = pipeline.GATEWAY_KIND
        windows = [
            {"result": LoadResult(concurrency, 1, int(rate), 1.0, [1.0], server=server), "gateway_cpu_s": 0.5}
            for rate in rates
        ]
    else:
        kind, windows = pipeline.KIND, [_window(rate, server) for rate in rates]
    candidate = Candidate(
        f"{path} b{batch}",
        kind,
        window=lambda *_: {},
        extra={"concurrency": concurrency, "batch": batch, "path": path, "server_cores": cores},
        windows=windows,
    )
    return pooled_row(candidate)


# -- input data -----------------------------------------------------------------------------------


def test_the_committed_files_are_512_px_png_and_jpeg_written_again_byte_for_byte(tmp_path):
    from PIL import Image

    committed = pipeline_data.files()
    assert len(committed) == len(pipeline_data.PHOTOS) * 2
    for data, kind in zip(committed, ["PNG", "JPEG"] * len(pipeline_data.PHOTOS)):
        image = Image.open(io.BytesIO(data))
        assert image.format == kind and image.size == (512, 512) and image.mode == "RGB"
    pipeline_data.write_files(tmp_path)
    assert pipeline_data.files(tmp_path) == committed


def test_input_data_holds_the_committed_photographs_as_each_path_receives_them():
    documents = pipeline_data.documents()
    assert set(documents) == {p.model for p in pipeline.PATHS}
    pixels = preprocess(pipeline_data.decoded())
    for model in (spec.EMBEDDER_MODEL, spec.ENSEMBLE_MODEL):
        entries = documents[model]["data"]
        got = [np.frombuffer(base64.b64decode(e["pixel_values"]["b64"]), "<f4") for e in entries]
        assert np.array_equal(np.stack(got), pixels.reshape(len(pixels), -1))
    uint8 = preprocess_uint8(pipeline_data.decoded())
    entries = documents[spec.UINT8_ENSEMBLE_MODEL]["data"]
    got = [np.frombuffer(base64.b64decode(e["images"]["b64"]), np.uint8) for e in entries]
    assert np.array_equal(np.stack(got), uint8.reshape(len(uint8), -1))
    # BYTES: Triton's serialisation of one element, a little-endian length and the file's bytes.
    for entry, data in zip(documents[spec.IMAGES_MODEL]["data"], pipeline_data.files()):
        raw = base64.b64decode(entry["image"]["b64"])
        assert struct.unpack("<I", raw[:4]) == (len(data),) and raw[4:] == data


# -- selection and settings ------------------------------------------------------------------------


def test_the_pipeline_rows_serve_the_tiny_checker_and_quick_stands_its_fp32_one_in():
    rows = selection.parse("pipeline")
    assert rows.kinds == {pipeline.KIND, pipeline.GATEWAY_KIND}
    assert rows.serves(quick=False) == ["tiny"] and rows.exports(quick=False) == ["tiny"]
    assert rows.serves(quick=True) == ["fp32"] and rows.exports(quick=True) == ["fp32"]
    assert selection.parse("triton,pipeline").serves(quick=True) == ["fp32"]
    assert "pipeline" in selection.ALL
    assert FULL.pipeline_batches == (1, 8) and FULL.pipeline_concurrency == (1, 2, 4, 8)
    assert pipeline.PIPELINE_CONCURRENCY in QUICK.pipeline_concurrency and 1 in QUICK.pipeline_batches


def test_batch_settings_keep_a_windows_images_about_equal():
    perf_settings = PerfSettings(min_requests=400, requests_per_client=50, stability_percentage=10, max_trials=6)
    assert pipeline.batch_settings(perf_settings, 1) == perf_settings
    eight = pipeline.batch_settings(perf_settings, 8)
    assert (eight.min_requests, eight.requests_per_client) == (50, 6)
    assert eight.request_count(8) * 8 == pytest.approx(perf_settings.request_count(8), rel=0.05)
    assert pipeline.batch_settings(PerfSettings(4, 1, 10, 3), 8).request_count(1) == 1


# -- a row from perf_analyzer's output ------------------------------------------------------------


def test_a_row_from_perf_analyzers_csv_gets_its_rate_per_server_core(tmp_path):
    csv_file = tmp_path / "pipeline-float-b1-c8-round1.csv"
    csv_file.write_text(PERF_CSV)
    (csv_row,) = perf.read_csv(csv_file)
    window = {**_window(perf.images_per_s(csv_row), {}), "latency_ms": perf.latency_ms(csv_row), "csv": csv_row}
    window["server"] = {spec.ENSEMBLE_MODEL: _stats(40, 37.9)}
    candidate = Candidate(
        "float",
        pipeline.KIND,
        window=lambda *_: {},
        extra={"concurrency": 8, "batch": 1, "path": pipeline.FLOAT, "server_cores": 2},
        windows=[window, {**window, "images_per_s": 125.027}],
    )
    row = pooled_row(candidate)
    assert row["images_per_s"] == pytest.approx(120.027)
    assert row["images_per_s_per_core"] == pytest.approx(120.027 / 2)
    assert row["latency_ms"]["p95"] == pytest.approx(110.461)
    assert row["spread"] == pytest.approx(10 / 120.027)
    assert "decode_share" not in row  # pixels: nothing decoded


def test_decode_share_is_the_decoders_part_of_the_composing_steps_server_time():
    server = {
        spec.IMAGES_MODEL: _stats(10, 100.0),  # the ensemble's own time holds its steps': not counted again
        spec.DECODE_MODEL: _stats(10, 6.0),
        spec.NORMALIZE_MODEL: _stats(10, 1.0),
        spec.EMBEDDER_MODEL: _stats(5, 2.0, batch=2.0),
        spec.POSTPROCESS_MODEL: _stats(5, 0.0, batch=2.0),
        spec.VIEWS_MODEL: _stats(10, 1.0),
    }
    assert pipeline.decode_share(server) == pytest.approx(60 / (60 + 10 + 10 + 0 + 10))
    row = _row(pipeline.IMAGES, 1, 8, [10.0, 12.0], server=server)
    assert row["decode_share"] == pytest.approx(60 / 90)
    assert pipeline.decode_share({**server, spec.VIEWS_MODEL: _stats(0, 1.0)}) is None  # a step never ran


# -- the summary ------------------------------------------------------------------------------------


def _run_rows(embedder_1=(200.0, 180.0), float_1=(190.0, 171.0)):
    rows = []
    for batch, scale in ((1, 1.0), (8, 1.5)):
        for concurrency, fraction in ((1, 0.5), (8, 1.0)):
            embedder = embedder_1 if batch == 1 else (300.0, 300.0)
            floats = float_1 if batch == 1 else (270.0, 290.0)
            rows.append(_row(pipeline.EMBEDDER, batch, concurrency, [r * fraction for r in embedder]))
            rows.append(_row(pipeline.FLOAT, batch, concurrency, [r * fraction for r in floats]))
            rows.append(_row(pipeline.UINT8, batch, concurrency, [r * fraction * scale * 0.7 for r in floats]))
    rows.append(_row(pipeline.GATEWAY, 1, 8, [30.0, 34.0]))
    return rows


def test_pipeline_vs_embedder_is_the_public_ensemble_over_the_embedder_at_batch_1_concurrency_8():
    summary = summarize(_run_rows())
    assert summary["pipeline_vs_embedder"] == pytest.approx(180.5 / 190.0)
    assert summary["pipeline_vs_embedder_by_round"] == pytest.approx([0.95, 0.95])
    assert summary["pipeline_vs_embedder_spread"] == pytest.approx(0.0, abs=1e-12)
    assert summary["pipeline_vs_embedder_concurrency"] == 8
    assert summary["pipeline_images_per_s_per_core"] == pytest.approx(180.5 / 2)
    assert summary["pipeline_images_per_s_per_core_spread"] == pytest.approx(19.0 / 180.5)
    assert summary["pipeline_server_cores"] == 2
    json.dumps(summary)
    # Rounds that disagree widen the spread: (max - min) over the ratio.
    apart = summarize(_run_rows(embedder_1=(200.0, 200.0), float_1=(200.0, 160.0)))
    assert apart["pipeline_vs_embedder_by_round"] == pytest.approx([1.0, 0.8])
    assert apart["pipeline_vs_embedder_spread"] == pytest.approx(0.2 / 0.9)


def test_the_summary_reports_every_path_per_batch_and_uint8_against_float():
    summary = summarize(_run_rows())
    table = summary["pipeline_by_path"]
    assert set(table) == {pipeline.EMBEDDER, pipeline.FLOAT, pipeline.UINT8, pipeline.GATEWAY}
    assert set(table[pipeline.FLOAT]) == {"1", "8"} and set(table[pipeline.GATEWAY]) == {"1"}
    float_8 = table[pipeline.FLOAT]["8"]
    assert float_8["images_per_s"] == pytest.approx(280.0) and float_8["concurrency"] == 8
    assert float_8["images_per_s_per_core"] == pytest.approx(140.0)
    assert float_8["best_concurrency"] == 8 and table[pipeline.GATEWAY]["1"]["images_per_s"] == pytest.approx(32.0)
    # uint8 is 0.7 of float at batch 1 and 1.05 at batch 8, at both concurrencies.
    assert summary["pipeline_uint8_vs_float"] == pytest.approx({"b1c1": 0.7, "b1c8": 0.7, "b8c1": 1.05, "b8c8": 1.05})
    assert summary["pipeline_uint8_vs_float_min"] == pytest.approx(0.7)
    spreads = [r["spread"] for r in _run_rows() if r.get("path") in (pipeline.UINT8, pipeline.FLOAT)]
    assert summary["pipeline_uint8_vs_float_min_spread"] == pytest.approx(max(spreads))
    assert "pipeline_vs_embedder" in pipeline.line(summary) and "per server core" in pipeline.line(summary)


def test_without_concurrency_8_the_ratio_is_read_at_the_highest_both_measured():
    rows = [r for r in _run_rows() if r["concurrency"] == 1]
    summary = summarize(rows)
    assert summary["pipeline_vs_embedder_concurrency"] == 1
    assert summary["pipeline_vs_embedder"] == pytest.approx(180.5 / 190.0)


def test_a_run_without_pipeline_rows_has_no_pipeline_keys():
    summary = summarize([])
    assert not [key for key in summary if key.startswith("pipeline")]
    assert pipeline.line(summary) is None


# -- one window through a real tritonserver ---------------------------------------------------------


@pytest.mark.server
def test_a_batch_8_window_of_image_files_decodes_8_files_a_request(server, tmp_path):
    data = pipeline_data.write_input_data(tmp_path / "input")
    path = next(p for p in pipeline.PATHS if p.name == pipeline.IMAGES)
    quick = PerfSettings(min_requests=4, requests_per_client=2, stability_percentage=1000, max_trials=3)
    window = served.window(
        server.grpc_url, path.model, 2, quick, tmp_path / "images.csv", path.steps, data[path.model], batch=8
    )
    assert "error" not in window, window.get("error")
    assert window["images_per_s"] > 0 and window["csv"]["Concurrency"] == "2"
    decode, ensemble = window["server"][spec.DECODE_MODEL], window["server"][spec.IMAGES_MODEL]
    assert ensemble["requests"] > 0 and ensemble["failures"] == 0
    assert decode["inferences"] == 8 * ensemble["requests"]  # every request held 8 files
    assert 0 < pipeline.decode_share(window["server"]) < 1
