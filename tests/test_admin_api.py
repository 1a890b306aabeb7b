"""The admin APIs are closed to any client without the operator's key (finding 4).

Everywhere a server is started (`safety-checker serve` and the launcher here,
docker-compose and KServe in test_compose*.py and test_deploy_*.py) the model
repository, logging, trace and shared-memory APIs need the key: over HTTP the
header `admin-key`, over gRPC the metadata `triton-grpc-protocol-admin-key`.
Without a key they are refused to everyone. Inference, health, metadata and
statistics stay open.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from export.models import served_models
from safety_checker_admin.admin_key import (
    ADMIN_KEY_ENV,
    ADMIN_KEY_HEADER,
    GRPC_ADMIN_KEY_HEADER,
    MIN_KEY_CHARS,
    PLACEHOLDER_KEYS,
    check_key,
    read_admin_key,
)
from safety_checker_admin.errors import ServerError
from safety_checker_admin.server import TritonServer, free_port
from safety_checker_client import spec

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
COMMAND = str(Path(sys.executable).parent / "safety-checker")

# Each admin API over HTTP: (method, path, body).
ADMIN_HTTP = [
    ("GET", "/v2/logging", None),
    ("POST", "/v2/logging", {"log_verbose_level": 1}),
    ("GET", "/v2/trace/setting", None),
    ("POST", "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
    ("GET", f"/v2/models/{spec.ENSEMBLE_MODEL}/trace/setting", None),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/systemsharedmemory/region/probe/register", {"key": "/probe", "offset": 0, "byte_size": 64}),
    ("POST", "/v2/systemsharedmemory/unregister", {}),
    ("GET", "/v2/cudasharedmemory/status", None),
    ("POST", "/v2/repository/index", {}),
    ("POST", f"/v2/repository/models/{spec.ENSEMBLE_MODEL}/unload", {}),
    ("POST", f"/v2/repository/models/{spec.ENSEMBLE_MODEL}/load", {}),
]
# What stays open: health, metadata, model config, statistics (inference is tested everywhere else).
OPEN_HTTP = [
    "/v2/health/live",
    "/v2/health/ready",
    "/v2",
    f"/v2/models/{spec.ENSEMBLE_MODEL}",
    f"/v2/models/{spec.ENSEMBLE_MODEL}/ready",
    f"/v2/models/{spec.ENSEMBLE_MODEL}/config",
    f"/v2/models/{spec.ENSEMBLE_MODEL}/stats",
    "/v2/models/stats",
]


def http(url: str, method: str, path: str, body=None, headers: Optional[Dict[str, str]] = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{url}{path}", data=data, method=method, headers=headers or {})
    try:
        with _HTTP.open(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def admin_calls_over_grpc(client: grpcclient.InferenceServerClient, headers=None):
    return {
        "get_log_settings": lambda: client.get_log_settings(headers=headers),
        "update_log_settings": lambda: client.update_log_settings({"log_verbose_level": 0}, headers=headers),
        "get_trace_settings": lambda: client.get_trace_settings(headers=headers),
        "get_system_shared_memory_status": lambda: client.get_system_shared_memory_status(headers=headers),
        "register_system_shared_memory": lambda: client.register_system_shared_memory(
            "probe", "/probe", 64, headers=headers
        ),
        "get_cuda_shared_memory_status": lambda: client.get_cuda_shared_memory_status(headers=headers),
        "get_model_repository_index": lambda: client.get_model_repository_index(headers=headers),
        "unload_model": lambda: client.unload_model(spec.ENSEMBLE_MODEL, headers=headers),
    }


@pytest.mark.server
def test_admin_apis_refused_without_the_key_and_accepted_with_it(server):
    url, key = server.http_url, server.admin_key
    for method, path, body in ADMIN_HTTP:
        for headers in (None, {ADMIN_KEY_HEADER: "not-the-key-0123456789"}, {"Authorization": f"Bearer {key}"}):
            status, text = http(url, method, path, body, headers)
            assert status == 403 and "restricted" in text, (method, path, headers, status, text)
        status, text = http(url, method, path, body, {ADMIN_KEY_HEADER: key})
        assert status != 403, (method, path, status, text)
    # With the key the API itself answers: the logging settings, the repository index ...
    assert http(url, "GET", "/v2/logging", None, {ADMIN_KEY_HEADER: key})[0] == 200
    assert http(url, "POST", "/v2/logging", {"log_verbose_level": 0}, {ADMIN_KEY_HEADER: key})[0] == 200
    status, index = http(url, "POST", "/v2/repository/index", {}, {ADMIN_KEY_HEADER: key})
    assert status == 200 and {m["name"] for m in json.loads(index)} >= {spec.ENSEMBLE_MODEL}
    # ... but model control stays off (--model-control-mode=none): nothing can be unloaded, even with the key.
    assert http(url, "POST", f"/v2/repository/models/{spec.ENSEMBLE_MODEL}/unload", {}, {ADMIN_KEY_HEADER: key})[
        0
    ] not in (200, 403)
    for path in OPEN_HTTP:
        assert http(url, "GET", path)[0] == 200, path
    assert server.ready_models() == sorted(m.name for m in served_models())


@pytest.mark.server
def test_admin_apis_over_grpc(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for name, call in admin_calls_over_grpc(client).items():
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert "restricted" in refused.value.message() or "admin-key" in refused.value.message(), name
        for call in admin_calls_over_grpc(client, {GRPC_ADMIN_KEY_HEADER: "not-the-key-0123456789"}).values():
            with pytest.raises(InferenceServerException):
                call()
        allowed = admin_calls_over_grpc(client, {GRPC_ADMIN_KEY_HEADER: server.admin_key})
        assert allowed["get_log_settings"]() is not None
        assert allowed["get_trace_settings"]() is not None
        assert allowed["get_system_shared_memory_status"]() is not None
        assert allowed["get_model_repository_index"]() is not None
        # Open: health, metadata, config, statistics and inference.
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(spec.ENSEMBLE_MODEL)
        assert client.get_server_metadata() and client.get_model_metadata(spec.ENSEMBLE_MODEL)
        assert client.get_model_config(spec.ENSEMBLE_MODEL)
        assert client.get_inference_statistics(spec.ENSEMBLE_MODEL)
        pixels = np.zeros((1, 3, 224, 224), np.float32)
        tensor = grpcclient.InferInput(spec.PIXEL_VALUES.name, list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        assert client.infer(spec.ENSEMBLE_MODEL, [tensor]).as_numpy(spec.HAS_NSFW_CONCEPTS.name).shape == (1, 1)
    finally:
        client.close()


def test_a_random_key_by_default_and_the_operators_key_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    assert read_admin_key(None) == (None, "refused to everyone (no key given)")
    first = TritonServer(tmp_path, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    second = TritonServer(tmp_path, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    assert len(first.admin_key) == 64 and first.admin_key != second.admin_key
    command = " ".join(first.tritonserver_arguments)
    restriction = f"model-repository,logging,trace,shared-memory:admin-key={first.admin_key}"
    assert f"--http-restricted-api={restriction}" in command
    assert f"--grpc-restricted-protocol={restriction}" in command
    assert "--model-control-mode=none" in command

    (tmp_path / "key").write_text("an-operators-key-of-a-good-length\n")
    assert read_admin_key(tmp_path / "key") == ("an-operators-key-of-a-good-length", f"the key in {tmp_path / 'key'}")
    monkeypatch.setenv(ADMIN_KEY_ENV, "another-key-from-the-environment")
    assert read_admin_key(None)[0] == "another-key-from-the-environment"
    for bad in ("short", "has space in it somewhere", "comma,in,the,key,1234567", "colon:in:the:key:1234567"):
        with pytest.raises(ServerError, match="admin key"):
            check_key(bad)
        with pytest.raises(ServerError, match="admin key"):
            TritonServer(tmp_path, admin_key=bad)
    with pytest.raises(ServerError, match="cannot read the admin key file"):
        read_admin_key(tmp_path / "missing")


# Issue 18, finding 4: nothing starts with a key anyone could know.
SHORT_KEY = "x" * (MIN_KEY_CHARS - 1)
GOOD_KEY = "0123456789abcdef" * 4  # what `openssl rand -hex 32` prints: 64 hex digits


@pytest.mark.parametrize("bad", [*PLACEHOLDER_KEYS, SHORT_KEY], ids=["placeholder", "short"])
def test_finding_4_the_admin_key_is_refused_when_short_or_a_placeholder(bad, tmp_path, monkeypatch):
    """read_admin_key (what `safety-checker serve` calls) refuses the key from a file and from the environment,
    naming where it came from and what to use instead, and never repeats the key."""
    assert "REPLACE-ME-with-openssl-rand-hex-32" in PLACEHOLDER_KEYS
    (tmp_path / "key").write_text(bad + "\n")
    monkeypatch.setenv(ADMIN_KEY_ENV, bad)
    for path, source in ((tmp_path / "key", str(tmp_path / "key")), (None, f"${ADMIN_KEY_ENV}")):
        with pytest.raises(ServerError) as refused:
            read_admin_key(path)
        message = str(refused.value)
        assert source in message and "openssl rand -hex 32" in message and bad not in message, message
        assert ("placeholder" if bad in PLACEHOLDER_KEYS else f"not {MIN_KEY_CHARS}-") in message
    with pytest.raises(ServerError, match="openssl rand -hex 32"):
        TritonServer(tmp_path, admin_key=bad)
    monkeypatch.setenv(ADMIN_KEY_ENV, GOOD_KEY)
    assert read_admin_key(None)[0] == check_key(GOOD_KEY) == GOOD_KEY
    assert check_key("k" * MIN_KEY_CHARS) == "k" * MIN_KEY_CHARS


@pytest.mark.parametrize("bad", [*PLACEHOLDER_KEYS, SHORT_KEY], ids=["placeholder", "short"])
def test_finding_4_serve_will_not_start_with_a_short_or_placeholder_key(bad, tmp_path):
    """The `safety-checker serve` command line stops before tritonserver starts, with one clear line; the same
    command with a good key starts (test_serve_restricts_admin_apis_with_the_operators_key)."""
    (tmp_path / "admin.key").write_text(bad + "\n")
    env = {k: v for k, v in os.environ.items() if k != ADMIN_KEY_ENV}
    for extra, extra_env in ((["--admin-key-file", str(tmp_path / "admin.key")], {}), ([], {ADMIN_KEY_ENV: bad})):
        result = subprocess.run(
            [COMMAND, "serve", "--repository", str(tmp_path), "--no-restart", *extra],
            capture_output=True, text=True, timeout=120, env={**env, **extra_env},
        )  # fmt: skip
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert "admin key" in result.stderr and "openssl rand -hex 32" in result.stderr, result.stderr
        assert bad not in result.stderr + result.stdout


@pytest.mark.server
@pytest.mark.slow
def test_serve_restricts_admin_apis_with_the_operators_key(repository, tmp_path):
    """`safety-checker serve --admin-key-file`: the key opens the admin APIs; without it, nothing does."""
    key = "a-key-the-operator-chose-0123456789"
    (tmp_path / "admin.key").write_text(key + "\n")
    for extra, expected_key in ((["--admin-key-file", str(tmp_path / "admin.key")], key), ([], None)):
        ports = [free_port() for _ in range(3)]
        env = {k: v for k, v in os.environ.items() if k != ADMIN_KEY_ENV}
        process = subprocess.Popen(
            [COMMAND, "serve", "--repository", str(repository), "--http-port", str(ports[0]), "--grpc-port",
             str(ports[1]), "--metrics-port", str(ports[2]), "--no-restart", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            banner = ""
            for line in process.stdout:
                banner += line
                if "Press Ctrl-C" in line:
                    break
            url = f"127.0.0.1:{ports[0]}"
            assert http(url, "GET", "/v2/logging")[0] == 403
            assert http(url, "GET", "/v2/logging", None, {ADMIN_KEY_HEADER: key})[0] == (200 if expected_key else 403)
            assert http(url, "GET", "/v2/health/ready")[0] == 200
            assert ("the key in" in banner) == bool(expected_key) and key not in banner
            if not expected_key:
                assert "refused to everyone" in banner
        finally:
            process.terminate()
            process.wait(60)
