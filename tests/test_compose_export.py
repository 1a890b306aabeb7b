"""The compose `export` service's own install and export steps work in a fresh virtual environment.

docker-compose.yml's export job once installed only requirements/export.txt,
and every export module imports the client and served packages, so on a
fresh host it died with ModuleNotFoundError and Triton never started (issue
12, point 1); the export also builds each Python model's environment from
pinned wheels it needs downloaded first. This test reads the job's `pip
install`, `pip download` and `python -m export` lines from the compose file
itself and runs them, from a copy of the working tree, in a new venv whose
`python` and `pip` come first on PATH, on a tiny checker. Only paths are
substituted: the venv for the container's Python, the tiny checker for
${MODEL}; pip uses this machine's own cache and indexes.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import yaml

from fixtures.checkers import save_checker

ROOT = Path(__file__).resolve().parents[1]
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
STEP_TIMEOUT_S = 1200


def _export_script() -> str:
    """The export service's shell script, as written in docker-compose.yml (before Compose interpolates it)."""
    command = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["export"]["command"]
    return command if isinstance(command, str) else "\n".join(command)


def _interpolate(text: str, model: Path) -> str:
    """What Compose does to the script: ${MODEL:-default} -> MODEL, `$$` -> `$`."""
    text = re.sub(r"\$\{MODEL(:?-[^}]*)?\}", str(model), text)
    assert not re.search(r"(?<!\$)\$\{", text), f"a Compose variable other than MODEL: {text}"
    return text.replace("$$", "$")


def _steps(script: str) -> List[str]:
    """The `pip install ...`, `pip download ...` and `python -m export ...` commands, continuation lines joined."""
    lines = script.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if re.match(r"\s*(pip3? (install|download)|python3? -m export)\s", line)]


def _completeness_check(script: str) -> List[str]:
    """Files the script tests for before skipping the export: it must be what the export writes."""
    return re.findall(r'\[ -f "\$\$repo/([^"]+)" \]', script)


def _reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.install
@pytest.mark.timeout(3 * STEP_TIMEOUT_S)
def test_export_service_steps_build_the_repository(tmp_path):
    script = _export_script()
    model = save_checker(tmp_path / "tiny-checker")
    steps = [_interpolate(step, model) for step in _steps(script)]
    assert [s.split()[:2] for s in steps] == [["pip", "install"]] * 2 + [["pip", "download"]] * 2 + [
        ["python", "-m"]
    ], steps
    versions = [re.search(r"--python-version (\S+)", s).group(1) for s in steps if s.startswith("pip download")]
    assert versions[0] == "3.10", "the NGC 24.10 image's Python, which its Python backend stubs embed"
    if not _reachable("download.pytorch.org"):
        # Substitution: this machine cannot reach PyTorch's CPU index, so the torch step
        # takes the local torch==2.13.0 CPU wheel, which pip finds by itself (find-links).
        steps = [step.replace(f"--index-url {TORCH_CPU_INDEX}", "") for step in steps]

    workspace = tmp_path / "workspace"
    shutil.copytree(
        ROOT,
        workspace,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "__pycache__", ".pytest_cache", "*.egg-info", ".wheelhouse", ".perf-analyzer"
        ),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env["PIP_NO_COMPILE"] = "1"  # what is installed is the same; Python compiles on first import instead

    for step in steps:
        done = subprocess.run(
            ["/bin/sh", "-ec", step], cwd=workspace, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S
        )
        assert done.returncode == 0, f"{step}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"

    torch_build = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch; print(torch.version.cuda)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert torch_build == "None", f"the export venv got a CUDA build of torch (CUDA {torch_build})"
    repository = workspace / "build" / "repository"
    assert list(repository.glob("*/config.pbtxt")), "no config.pbtxt written"
    assert list(repository.glob("*/1/model.onnx")), "no model.onnx written"
    assert list(repository.glob("*/python_env.tar.gz")), "no Python model environment written"
    missing = [name for name in _completeness_check(script) if not (repository / name).is_file()]
    assert not missing, f"the compose job's 'already complete' check names files the export does not write: {missing}"
