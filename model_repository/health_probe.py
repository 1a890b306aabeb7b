"""A real, tiny inference through the checker: the health probe of every deployment.

Triton 2.51's /v2/health/ready stays green when a Python-backend stub has
died (the 24.x Python backend does not restart it), so readiness and liveness
are judged by what matters: one black 224x224 image sent through the
`safety_checker_uint8` ensemble, which runs every model of the repository
(normaliser, embedder, postprocessor), answered with a well-formed decision.

The request carries Triton's `priority` 1: every model's dynamic batcher has
two priority levels and ordinary requests get level 2, so under load the
probe waits for the batch that is running, never behind the queue.

Used by `safety-checker serve`'s supervisor (`probe()`), and as a script by
docker-compose's healthcheck and the KServe runtimes' readiness and liveness
probes; the export copies this file to the root of the model repository (where
Triton ignores it), so the container runs it as

    python3 /mnt/models/health_probe.py --port 8000 --timeout 10

and it exits 0 when the answer came, 1 otherwise with one line saying why. It
needs Python 3.10's standard library only (the NGC image has python3) and
imports nothing from this package.
"""

import argparse
import json
import socket
import sys
import urllib.error
import urllib.request

# The names of the served contract (client/safety_checker_client/spec.py; a test keeps them equal).
PROBE_MODEL = "safety_checker_uint8"
PROBE_INPUT = "images"
PROBE_SHAPE = (1, 224, 224, 3)
DECISION = "has_nsfw_concepts"
VERSION = "concept_set_version"
# The priority level every model's dynamic batcher serves first (export/models.py PRIORITY_LEVELS).
PROBE_PRIORITY = 1

OK, UNAVAILABLE, TIMEOUT, FAILED = "ok", "unavailable", "timeout", "failed"

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request_body():
    pixels = bytes(PROBE_SHAPE[0] * PROBE_SHAPE[1] * PROBE_SHAPE[2] * PROBE_SHAPE[3])
    header = json.dumps(
        {
            "parameters": {"priority": PROBE_PRIORITY},
            "inputs": [
                {
                    "name": PROBE_INPUT,
                    "shape": list(PROBE_SHAPE),
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": len(pixels)},
                }
            ],
            "outputs": [{"name": DECISION}, {"name": VERSION}],
        }
    ).encode()
    return header, pixels


def probe(host="127.0.0.1", port=8000, timeout_s=10.0, model=PROBE_MODEL):
    """(status, message): status is OK, UNAVAILABLE (Triton answered 503), TIMEOUT or FAILED."""
    header, pixels = _request_body()
    request = urllib.request.Request(
        f"http://{host}:{port}/v2/models/{model}/infer",
        data=header + pixels,
        method="POST",
        headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
    )
    try:
        with _HTTP.open(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        detail = _error_text(error)
        status = UNAVAILABLE if error.code == 503 else FAILED
        return status, f"{model} answered HTTP {error.code}: {detail}"
    except (socket.timeout, TimeoutError):
        return TIMEOUT, f"{model} did not answer within {timeout_s:g} s"
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return TIMEOUT, f"{model} did not answer within {timeout_s:g} s"
        return FAILED, f"cannot reach {host}:{port}: {reason}"
    try:
        outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
        decision, version = outputs[DECISION], outputs[VERSION]
        well_formed = (
            decision["shape"] == [1, 1]
            and len(decision["data"]) == 1
            and isinstance(decision["data"][0], bool)
            and version["shape"] == [1, 1]
            and isinstance(version["data"][0], int)
        )
    except (ValueError, KeyError, TypeError, IndexError):
        well_formed = False
    if not well_formed:
        return FAILED, f"{model} answered something that is not a decision: {body[:200]!r}"
    return OK, f"{model} answered (flagged={decision['data'][0]}, concept set version {version['data'][0]})"


def _error_text(error):
    try:
        return json.loads(error.read())["error"][:300]
    except Exception:  # any body at all: the status code says enough
        return error.reason


def main(argv=None):
    parser = argparse.ArgumentParser(description="Exit 0 if the safety checker answers one tiny real request.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="Triton's HTTP port")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    parser.add_argument("--model", default=PROBE_MODEL)
    args = parser.parse_args(argv)
    status, message = probe(args.host, args.port, args.timeout, args.model)
    print(f"{status}: {message}", flush=True)
    return 0 if status == OK else 1


if __name__ == "__main__":
    sys.exit(main())
