"""The gateway row of `make bench`: its load generator against a stand-in gateway, its pooled row, and
gateway_vs_triton in the summary.

No timing is asserted: what is checked is what is sent, that the answers are
counted consistently, that failures show up, and how the ratio is formed.
"""

from __future__ import annotations

import base64
import http.server
import itertools
import json
import threading

import pytest

from bench import gateway, loadgen
from bench.candidates import GATEWAY_ROW, Candidate
from bench.pooling import pooled_row
from bench.summary import gateway_line, summarize
from safety_checker_admin.server import free_port
from safety_checker_client import spec

FILES = [b"\x89PNG first file", b"\xff\xd8 second file", b"\x89PNG third file"]


class StandIn:
    """An HTTP server answering the seed's route as the gateway does (or with `status` and no decision); it
    keeps every body it was sent."""

    def __init__(self, status: int = 200) -> None:
        self.bodies = []
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn answers

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stand_in.bodies.append((self.path, self.headers["Content-Type"], body))
                if status == 200:
                    answer = {"outputs": [{"name": "output-0", "datatype": "BOOL", "data": [False]}]}
                else:
                    answer = {"error": "Triton is not answering"}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_the_seed_body_is_the_runtimes_request_for_one_file():
    text = base64.b64encode(FILES[0]).decode()
    body = json.loads(gateway.seed_body(FILES[0]))
    assert body == {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "String", "data": [text]}]}
    assert b" " not in gateway.seed_body(FILES[0])  # JSON.stringify's compact text, as SDXL Studio sends it


@pytest.mark.parametrize(
    "status, answer, refusal",
    [
        (200, b'{"outputs":[{"data":[true]}]}', None),
        (503, b'{"error":"Triton is not answering"}', "HTTP 503: "),
        (200, b'{"error":"no outputs"}', "without outputs"),
        (200, b'{"outputs":[{"data":["false"]}]}', "not a boolean"),
        (200, b"not json", "without outputs"),
    ],
)
def test_an_answer_counts_only_with_a_decision(status, answer, refusal):
    if refusal is None:
        assert gateway.decision(status, answer) is True
    else:
        with pytest.raises(gateway.GatewayError, match=refusal):
            gateway.decision(status, answer)


def test_the_clients_send_the_files_in_turn_and_count_the_answers():
    cpu = itertools.count(0.5, 0.25)  # the gateway's CPU seconds, one step per reading
    with StandIn() as stand_in:
        measured = gateway.measure(
            stand_in.url, gateway.seed_bodies(FILES), 2, window_s=0.5, warmup_s=0.2, gateway_cpu=lambda: next(cpu)
        )
    result = measured["result"]
    assert result.errors == 0, result.first_error
    assert result.requests > 0 and result.batch == 1 and result.concurrency == 2
    assert result.images == result.requests
    assert result.server == {}  # no Triton client given, no statistics
    assert result.requests <= len(stand_in.bodies)  # warm-up and drain are sent but not counted
    assert measured["gateway_cpu_s"] == pytest.approx(0.25)  # read at the window's two edges
    assert result.client_cpu_s is not None and result.client_cpu_s >= 0
    assert {(path, kind) for path, kind, _ in stand_in.bodies} == {(gateway.SEED_ROUTE, "application/json")}
    sent = [base64.b64decode(json.loads(body)["inputs"][0]["data"][0]) for _, _, body in stand_in.bodies]
    assert set(sent) == set(FILES)  # two clients, each starting at its own index, go through every file


def test_answers_without_a_decision_are_errors_not_throughput():
    with StandIn(status=503) as stand_in:
        result = gateway.measure(stand_in.url, gateway.seed_bodies(FILES), 2, window_s=0.3, warmup_s=0.1)["result"]
    assert result.errors > 0 and result.requests == 0 and result.images_per_s == 0
    assert result.first_error.startswith("GatewayError: HTTP 503: "), result.first_error


def test_an_unreachable_gateway_is_counted_as_errors():
    result = gateway.measure(
        f"http://127.0.0.1:{free_port()}", gateway.seed_bodies(FILES), 1, window_s=0.2, warmup_s=0.1
    )["result"]
    assert result.errors > 0 and result.requests == 0
    assert "ConnectionRefusedError" in result.first_error


def test_the_gateway_row_pools_its_windows_and_its_cpu_per_image():
    def window(requests, gateway_cpu_s, client_cpu_s):
        result = loadgen.LoadResult(
            concurrency=8,
            batch=1,
            requests=requests,
            window_s=2.0,
            latencies_ms=[100.0] * requests,
            server={spec.IMAGES_MODEL: _stats(requests)},
            client_cpu_s=client_cpu_s,
        )
        return {"result": result, "gateway_cpu_s": gateway_cpu_s}

    candidate = Candidate(GATEWAY_ROW, "gateway", lambda *_: {}, {"concurrency": 8})
    candidate.windows = [window(60, 0.3, 0.06), window(40, 0.2, 0.04)]
    row = pooled_row(candidate)
    assert row["kind"] == "gateway" and row["concurrency"] == 8
    assert row["images"] == 100 and row["images_per_s"] == pytest.approx(100 / 4.0)
    assert row["windows_images_per_s"] == pytest.approx([30.0, 20.0])
    assert row["gateway_cpu_s"] == pytest.approx(0.5)
    assert row["gateway_cpu_ms_per_image"] == pytest.approx(5.0)
    assert row["client_cpu_ms_per_image"] == pytest.approx(1.0)
    assert row["server"][spec.IMAGES_MODEL]["requests"] == 100


def _stats(requests):
    return {
        "executions": requests,
        "inferences": requests,
        "requests": requests,
        "failures": 0,
        "avg_batch_size": 1.0,
        "avg_queue_ms": 0.1,
        "avg_compute_input_ms": 0.2,
        "avg_compute_infer_ms": 30.0,
        "avg_compute_output_ms": 1.0,
    }


def _row(kind, concurrency, rates, **extra):
    return {
        "name": kind,
        "kind": kind,
        "concurrency": concurrency,
        "images_per_s": sum(rates) / len(rates),
        "windows_images_per_s": rates,
        **extra,
    }


def test_gateway_vs_triton_is_taken_at_concurrency_8_in_the_same_run():
    rows = [
        _row("triton-images", 1, [10.0, 12.0]),
        _row("triton-images", 8, [40.0, 20.0], spread=0.2),
        _row("gateway", 1, [9.0, 13.0], gateway_cpu_ms_per_image=4.0),
        _row("gateway", 8, [36.0, 21.0], gateway_cpu_ms_per_image=3.0, spread=0.3),
    ]
    summary = summarize(rows, gateway_goal=0.8)
    assert summary["gateway_vs_triton_spread"] == 0.3  # the larger of the two rows' at concurrency 8
    assert summary["gateway_images_per_s"] == pytest.approx(28.5) and summary["gateway_best_concurrency"] == 8
    assert summary["gateway_vs_triton"] == pytest.approx(28.5 / 30.0)
    assert summary["gateway_vs_triton_concurrency"] == 8
    assert summary["gateway_vs_triton_by_concurrency"] == pytest.approx({"1": 1.0, "8": 28.5 / 30.0})
    assert summary["gateway_vs_triton_by_round"] == pytest.approx([36.0 / 40.0, 21.0 / 20.0])
    assert summary["gateway_vs_triton_goal"] == 0.8
    assert summary["gateway_cpu_ms_per_image"] == 3.0
    assert gateway_line(summary).startswith("gateway: gateway_vs_triton 0.950 at concurrency 8 (goal >= 0.8: met)")
    assert "(goal >= 0.96: missed)" in gateway_line(summarize(rows, gateway_goal=0.96))


def test_without_both_rows_at_8_the_ratio_is_taken_at_the_highest_concurrency_both_measured():
    rows = [
        _row("triton-images", 1, [10.0]),
        _row("triton-images", 4, [20.0]),
        _row("gateway", 1, [9.0]),
        _row("gateway", 4, [19.0]),
        _row("gateway", 8, [25.0]),
    ]
    summary = summarize(rows)
    assert summary["gateway_vs_triton_concurrency"] == 4
    assert summary["gateway_vs_triton"] == pytest.approx(0.95)
    assert "gateway_vs_triton_goal" not in summary and "(goal" not in gateway_line(summary)
    alone = summarize([r for r in rows if r["kind"] == "gateway"])
    assert alone["gateway_images_per_s"] == 25.0 and "gateway_vs_triton" not in alone
    assert gateway_line(alone) is None
