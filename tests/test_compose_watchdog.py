"""docker-compose's Triton entrypoint, run for real with the bundled tritonserver (no Docker needed).

The entrypoint script is taken from docker-compose.yml as Compose would hand it
to the container (`$$` is a literal `$`) and runs the service's command (what
`python -m deploy.render` writes there) with the substitutions a test host
needs, and nothing else: the repository path (/models), free ports instead of
8000-8002, and the CPU configuration (the bundled server has no onnxruntime
backend). What it must do:

* restrict the admin APIs with $TRITON_ADMIN_KEY, or with a random key nobody
  is shown when it is unset (finding 4);
* once the checker has answered, turn two failed health probes (a real
  inference: a dead stub leaves Triton "ready") into the container's exit, so
  that `restart: unless-stopped` restarts it (finding 2).
"""

from __future__ import annotations

import os
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import List

import pytest
import yaml
from conftest import ROOT, awaited_log

from safety_checker_admin.admin_key import MIN_KEY_CHARS, PLACEHOLDER_KEYS
from safety_checker_admin.errors import ServerError
from safety_checker_admin.procfs import command_line, descendants, running
from safety_checker_admin.server import TritonServer, free_port
from safety_checker_client import spec

pytestmark = [pytest.mark.server, pytest.mark.slow]
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def triton_service() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["triton"]


def interpolate(text: str) -> str:
    """Compose's interpolation for what the triton service uses: ${VAR:-default} with VAR unset, and $$."""
    text = re.sub(r"(?<!\$)\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)
    return text.replace("$$", "$")


def container(repository: Path, ports: dict) -> TritonServer:
    service = triton_service()
    shell, flag, script, name = (interpolate(part) for part in service["entrypoint"])
    script = script.replace("/models/health_probe.py", f"{repository}/health_probe.py")
    script = script.replace("--port 8000", f"--port {ports['http']}")
    assert f"{repository}/health_probe.py --port {ports['http']}" in script
    command: List[str] = [interpolate(part) for part in service["command"]]
    assert command[0] == "tritonserver"
    substituted = {
        "--model-repository": repository,
        "--model-config-name": "cpu",
        "--http-port": ports["http"],
        "--grpc-port": ports["grpc"],
        "--metrics-port": ports["metrics"],
    }
    arguments = []
    for arg in command[1:]:
        name = arg.split("=", 1)[0]
        arguments.append(f"{name}={substituted.pop(name)}" if name in substituted else arg)
    assert not substituted, f"the compose command has no {sorted(substituted)}"
    return TritonServer(
        repository,
        http_port=ports["http"],
        grpc_port=ports["grpc"],
        metrics_port=ports["metrics"],
        host="0.0.0.0",
        arguments=arguments,
        wrapper=[shell, flag, script, name],
    )


def status(port: int, path: str, headers=None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with _HTTP.open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return 0


@pytest.fixture
def ports():
    return {"http": free_port(), "grpc": free_port(), "metrics": free_port()}


def test_admin_apis_take_the_operators_key_or_nobodys(repository, ports, monkeypatch):
    key = "the-operators-admin-key-0123456789"
    monkeypatch.setenv("TRITON_ADMIN_KEY", key)
    with container(repository, ports):
        assert status(ports["http"], "/v2/logging") == 403
        assert status(ports["http"], "/v2/logging", {"admin-key": key}) == 200
        assert status(ports["http"], "/v2/health/ready") == 200
    monkeypatch.delenv("TRITON_ADMIN_KEY")
    ports = {name: free_port() for name in ports}
    with container(repository, ports) as server:
        assert status(ports["http"], "/v2/logging") == 403
        assert status(ports["http"], "/v2/logging", {"admin-key": key}) == 403
        # The shell, tritonserver and its stubs; the watchdog's `sleep` and probes come and go.
        (triton,) = [p for p in descendants(server.pid) if "tritonserver" in (command_line(p) or [""])[0]]
        keys = re.findall(r"--http-restricted-api=\S+:admin-key=(\S+)", " ".join(command_line(triton)))
        assert len(keys) == 1 and re.fullmatch(r"[0-9a-f]{64}", keys[0]), keys  # random, and never printed
        assert keys[0] not in server.log_path.read_text()


@pytest.mark.parametrize("bad", [*PLACEHOLDER_KEYS, "k" * (MIN_KEY_CHARS - 1)], ids=["placeholder", "short"])
def test_finding_4_the_entrypoint_refuses_a_short_or_placeholder_key(repository, ports, monkeypatch, bad):
    """Issue 18, finding 4: with TRITON_ADMIN_KEY a placeholder or too short, the container stops before
    tritonserver starts, with one line naming the variable and what to do; a good key starts it
    (test_admin_apis_take_the_operators_key_or_nobodys)."""
    monkeypatch.setenv("TRITON_ADMIN_KEY", bad)
    server = container(repository, ports)
    with pytest.raises(ServerError, match="exited with code 1"):
        server.start(timeout_s=120)
    (line,) = server.log_path.read_text().splitlines()  # the check's line, and nothing from a tritonserver
    assert line.startswith("error: the admin key in TRITON_ADMIN_KEY "), line
    assert "openssl rand -hex 32" in line and "unset it" in line and bad not in line
    assert ("placeholder" if bad in PLACEHOLDER_KEYS else f"has {len(bad)} characters, not {MIN_KEY_CHARS}-") in line
    assert status(ports["http"], "/v2/health/ready") == 0


def test_the_watchdog_gives_up_after_two_failed_probes_within_a_bound():
    """How soon a dead stub ends the container follows from the script: failures in a row x (pause + probe
    timeout). Read from the script, not timed (a timing is make soak's business)."""
    script = interpolate(triton_service()["entrypoint"][2])
    (pause,) = re.findall(r"sleep (\d+) & wait", script)
    (timeout,) = re.findall(r"health_probe\.py --port \d+ --timeout (\d+)", script)
    (failures,) = re.findall(r'"\$failures" -ge (\d+)', script)
    assert int(failures) == 2, "one failed probe could be a running batch of 32 images on two cores"
    assert int(failures) * (int(pause) + int(timeout)) <= 30


def test_a_dead_stub_makes_the_container_exit_and_a_restart_restores_it(repository, ports):
    server = container(repository, ports)
    server.start()
    try:
        awaited_log(server.log_path, "watchdog: the checker answered", 120)  # failures count from now on
        (stub,) = running(descendants(server.pid), f"/{spec.POSTPROCESS_MODEL}/1/model.py")
        os.kill(stub, signal.SIGKILL)
        assert status(ports["http"], "/v2/health/ready") == 200  # what Triton's own health check still says
        code = server.wait(timeout_s=300)
        assert code == 1, code
        log = server.log_path.read_text()
        assert "watchdog: failed:" in log and "killing tritonserver so that the container restarts" in log
        # `restart: unless-stopped`: Docker starts the container again.
        server.stop()
        server.start()
        assert status(ports["http"], "/v2/health/ready") == 200
    finally:
        server.stop()
