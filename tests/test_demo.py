"""The offline start: `make demo` end to end, the tiny checker built by hand, `make serve`'s order (ports, then the
export) and its error when the hub cannot be reached."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
from conftest import ROOT, run_export
from PIL import Image

from demo import steps
from safety_checker_admin.server import free_port, port_in_use

HUB_CHECKPOINT = "CompVis/stable-diffusion-safety-checker"


@pytest.fixture(scope="module")
def demo_ports() -> Dict[str, int]:
    """Three distinct ports for the demo's server, held together while picked."""
    sockets = [socket.socket() for _ in range(3)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = dict(zip(("http", "grpc", "metrics"), (sock.getsockname()[1] for sock in sockets)))
    for sock in sockets:
        sock.close()
    return ports


def demo_arguments(folder: Path, ports: Dict[str, int]) -> list:
    arguments = ["--examples", str(folder / "examples"), "--work", str(folder / "work")]
    for name, port in ports.items():
        arguments += [f"--{name}-port", str(port)]
    return arguments


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_ports):
    """The demo run once, as `make demo` runs it: (exit status, stdout, stderr, its folder)."""
    folder = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, "-m", "demo", *demo_arguments(folder, demo_ports)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result.returncode, result.stdout, result.stderr, folder


@pytest.mark.server
@pytest.mark.slow
def test_the_demo_checks_and_scans_its_examples_and_says_where_to_look(demo):
    code, out, err, folder = demo
    assert code == 0, out + err
    examples = sorted(p.name for p in (folder / "examples").iterdir())
    assert examples == sorted([*steps.PHOTOS, steps.GENERATED])
    for name in examples:
        with Image.open(folder / "examples" / name) as image:
            image.verify()
    # `check`: one answered line per image, each with a decision.
    checked = [json.loads(line) for line in out.splitlines() if line.startswith('{"path"')]
    assert sorted(Path(line["path"]).name for line in checked) == examples
    assert all(isinstance(line["flagged"], bool) and line["error"] is None for line in checked)
    # `scan --html`: a report line per image, answered, and the page naming each.
    report = [json.loads(line) for line in (folder / "work" / "scan.jsonl").read_text().splitlines()]
    assert sorted(Path(line["path"]).name for line in report) == examples
    assert all(isinstance(line["flagged"], bool) for line in report)
    page = (folder / "work" / "scan.html").read_text()
    assert all(name in page for name in examples)
    # Where to look, and that the decisions mean nothing, said plainly (first and last).
    assert str(folder / "work" / "scan.html") in out and str(folder / "examples") in out
    assert out.startswith(steps.WARNING) and out.rstrip().endswith(steps.WARNING)
    assert "RANDOM weights" in steps.WARNING and "mean nothing" in steps.WARNING


@pytest.mark.server
@pytest.mark.slow
def test_the_demo_stops_its_server(demo, demo_ports):
    code, out, _, _ = demo
    assert code == 0
    assert f"gRPC 127.0.0.1:{demo_ports['grpc']}" in out, "the ports chosen are the ones served"
    assert not any(port_in_use("127.0.0.1", port) for port in demo_ports.values())


@pytest.mark.server
@pytest.mark.slow
def test_a_failed_step_stops_the_server_and_names_the_step(demo, demo_ports, monkeypatch, capsys):
    _, _, _, folder = demo

    def failing(command, what):
        if what == "scan":
            raise steps.DemoError("scan failed with exit status 2 (its output is above)")

    monkeypatch.setattr(steps, "_run", failing)
    code = steps.main(demo_arguments(folder, demo_ports))
    out, err = capsys.readouterr()
    assert code == 1
    assert "already holds the demo's checker" in out, "the export of the first run is served again"
    assert "error: scan failed" in err
    assert not any(port_in_use("127.0.0.1", port) for port in demo_ports.values())


@pytest.mark.slow
def test_the_tiny_checker_built_by_hand_loads_as_the_published_one(tmp_path):
    from export.checkpoint import load_checkpoint

    folder = tmp_path / "tiny-checker"
    result = subprocess.run(
        [sys.executable, "-m", "fixtures.checkers", "--output", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"make serve MODEL={folder}" in result.stdout
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
    checkpoint = load_checkpoint(str(folder))
    assert checkpoint.preprocessor_config is not None
    assert checkpoint.model.concept_embeds.shape[0] == 17 and checkpoint.model.special_care_embeds.shape[0] == 3


# -- make serve without the hub ------------------------------------------------------------------------------------


def offline_export(tmp_path: Path, **environment: str) -> subprocess.CompletedProcess:
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment, HF_HOME=str(tmp_path / "hf-home"))  # an empty cache
    try:
        return run_export(HUB_CHECKPOINT, tmp_path / "repository")
    finally:
        os.environ.pop("HF_HOME", None)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.mark.slow
@pytest.mark.parametrize(
    "environment",
    [
        {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "0"},  # nothing listens there
        {"HF_HUB_OFFLINE": "1"},  # diffusers' own refusal, told by its type
    ],
    ids=["unreachable", "offline-mode"],
)
def test_the_hub_out_of_reach_names_the_offline_ways(tmp_path, environment):
    result = offline_export(tmp_path, **environment)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "make serve MODEL=DIR" in result.stderr and "make demo" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "repository").exists()


def test_only_huggingface_hubs_not_found_error_counts_as_unreachable():
    from huggingface_hub.errors import LocalEntryNotFoundError

    from export.checkpoint import _hub_unreachable

    try:
        try:
            raise LocalEntryNotFoundError("not cached, and offline")
        except LocalEntryNotFoundError as cause:
            raise OSError("diffusers' own words") from cause
    except OSError as error:
        assert _hub_unreachable(error)
    assert not _hub_unreachable(OSError("We couldn't connect to 'https://huggingface.co'"))


# -- the Makefile --------------------------------------------------------------------------------------------------


def dry_run(target: str, *variables: str) -> str:
    """What `make -n TARGET` would run (recursive makes included), without running it."""
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", target, *variables],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_serve_checks_the_ports_before_the_export():
    commands = dry_run("serve", "HTTP_PORT=9100", "GRPC_PORT=9101", "METRICS_PORT=9102", "REPOSITORY=build/elsewhere")
    check = commands.index("safety-checker serve --check-ports")
    export = commands.index("-m export")
    serve = commands.rindex("safety-checker serve --repository")
    assert check < export < serve
    assert "--http-port 9100 --grpc-port 9101 --metrics-port 9102" in commands[check:export]


def test_make_demo_runs_the_demo_module():
    assert re.search(r"python -m demo\b", dry_run("demo"))


def test_every_pip_line_of_the_makefile_is_quiet():
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    pip_lines = [line for line in makefile.splitlines() if re.search(r"-m pip (install|download)", line)]
    assert pip_lines
    assert [line for line in pip_lines if "--quiet" not in line] == []


def check_ports(*arguments: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "safety-checker"), "serve", "--check-ports", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_a_port_in_use_is_named_before_anything_is_exported_or_started(tmp_path):
    ports = [str(free_port()) for _ in range(3)]
    flags = ["--repository", str(tmp_path / "not-exported-yet")]
    flags += [item for pair in zip(("--http-port", "--grpc-port", "--metrics-port"), ports) for item in pair]
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", int(ports[1])))
        blocker.listen()
        taken = check_ports(*flags)
    assert taken.returncode == 1
    assert taken.stderr == f"error: gRPC port {ports[1]} on 127.0.0.1 is already in use\n"
    free = check_ports(*flags)
    assert free.returncode == 0, free.stderr
    assert f"HTTP {ports[0]}, gRPC {ports[1]}, metrics {ports[2]}" in free.stdout
    assert not (tmp_path / "not-exported-yet").exists()


def test_the_same_port_twice_is_refused_at_once():
    result = check_ports("--http-port", "9100", "--grpc-port", "9100")
    assert result.returncode == 1 and "the ports must differ" in result.stderr and "Traceback" not in result.stderr
