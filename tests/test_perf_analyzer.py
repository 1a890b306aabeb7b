"""NVIDIA's perf_analyzer itself, against every served ensemble of a real tritonserver, with the committed data."""

from __future__ import annotations

import pytest

from bench import perf
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
