"""NVIDIA's perf_analyzer itself, against every served ensemble of a real tritonserver, with the committed data."""

from __future__ import annotations

import pytest

from bench import perf, served
from safety_checker_client import spec

ENSEMBLES = (spec.ENSEMBLE_MODEL, spec.UINT8_ENSEMBLE_MODEL)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", ENSEMBLES)
def test_perf_analyzer_measures_every_ensemble(server, model, protocol, tmp_path):
    csv_file = tmp_path / f"{model}.csv"
    url = server.grpc_url if protocol == "grpc" else server.http_url
    # This proves the tool against the server and its CSV, not stability: on a shared test machine the p95 of a
    # short window can wander by more than perf_analyzer's 10% default, so the criterion is opened wide here.
    output = perf.run(perf.command(model, url, csv_file, protocol=protocol, batch=2, concurrency=(1, 2),
                                   measurement_ms=1000, stability_percentage=1000))  # fmt: skip
    assert "Throughput:" in output
    rows = perf.read_csv(csv_file)
    assert sorted(int(r["Concurrency"]) for r in rows) == [1, 2]  # perf_analyzer orders rows by throughput
    for row in rows:
        assert perf.images_per_s(row) > 0
        assert int(row["p95 latency"]) >= int(row["p50 latency"]) > 0
        # Server-side times of the ensemble's composing models are in the verbose CSV.
        assert int(row["Server Compute Infer"]) > 0


def test_committed_input_data_exists_for_every_ensemble():
    for model in ENSEMBLES:
        assert perf.input_data(model).is_file(), model


def test_a_missing_binary_is_reported(tmp_path):
    with pytest.raises(perf.PerfAnalyzerError, match="make setup"):
        perf.binary(tmp_path)


def test_the_clients_tritonclient_stays_current():
    """perf_analyzer's old tritonclient lives in its own prefix; the environment keeps the pinned one."""
    from importlib.metadata import version

    from conftest import ROOT

    pinned = [line for line in (ROOT / "requirements" / "dev.txt").read_text().splitlines()
              if line.startswith("tritonclient")]  # fmt: skip
    assert pinned == [f"tritonclient[grpc,http]=={version('tritonclient')}"]
    assert perf.binary().is_file()


def test_a_bench_window_pairs_perf_analyzer_with_the_servers_statistics(server, tmp_path):
    """bench/served.py: one perf_analyzer run at one concurrency, and what Triton counted meanwhile."""
    settings = served.PerfSettings(min_requests=12, requests_per_client=4, stability_percentage=1000, max_trials=3)
    stats = (spec.EMBEDDER_MODEL, spec.ENSEMBLE_MODEL)
    window = served.window(server.grpc_url, spec.ENSEMBLE_MODEL, 2, settings, tmp_path / "w.csv", stats)
    assert window["stable"] and "error" not in window
    assert window["request_count"] == 12 and window["csv"]["Concurrency"] == "2"
    assert window["images_per_s"] == perf.images_per_s(window["csv"]) > 0
    assert 0 < window["latency_ms"]["p50"] <= window["latency_ms"]["p95"] <= window["latency_ms"]["p99"]
    # perf_analyzer's three windows of at least 12 requests, with its warm-up, all reached the embedder.
    ensemble, embedder = window["server"][spec.ENSEMBLE_MODEL], window["server"][spec.EMBEDDER_MODEL]
    assert ensemble["requests"] >= 3 * 12 and embedder["failures"] == 0
    # Triton counts an ensemble's request after its answer is sent, so a sample taken at that moment sees it
    # in the embedder alone: at most the two in flight apart, per edge.
    assert abs(embedder["inferences"] - ensemble["inferences"]) <= 2
    assert embedder["executions"] - 2 <= embedder["inferences"] <= 2 * embedder["executions"] + 2

    pooled = served.pooled([{**window, "round": 1}, {**window, "images_per_s": 2 * window["images_per_s"], "round": 2}])
    assert pooled["images_per_s"] == pytest.approx(1.5 * window["images_per_s"])
    assert pooled["spread"] == pytest.approx(1 / 1.5) and pooled["errors"] == 0
    assert pooled["server"][spec.ENSEMBLE_MODEL]["requests"] == 2 * ensemble["requests"]
    csv_file = served.keep_csv([{**window, "round": 1}], ["fp32 c=2"], tmp_path / "all.csv")
    (row,) = perf.read_csv(csv_file)
    assert row["row"] == "fp32 c=2" and row["round"] == "1" and row["Concurrency"] == "2"


def test_a_failed_bench_window_is_reported_in_perf_analyzers_words(server, tmp_path):
    settings = served.PerfSettings(min_requests=4, requests_per_client=1, stability_percentage=1000, max_trials=3)
    data = perf.input_data(spec.ENSEMBLE_MODEL)
    window = served.window(server.grpc_url, "no_such_model", 1, settings, tmp_path / "w.csv", (), data)
    assert "no_such_model" in window["error"] and "images_per_s" not in window
    pooled = served.pooled([{**window, "round": 1}])
    assert pooled["errors"] == 1 and pooled["images_per_s"] is None and "no_such_model" in pooled["first_error"]
