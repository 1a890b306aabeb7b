"""The layout: one room per role, no symlinks, one home for shared code, a thin client."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
import tomllib
from conftest import ROOT

from export.models import served_models
from safety_checker_client import spec

HEAVY = ("torch", "transformers", "onnxruntime", "pytriton", "matplotlib", "diffusers", "onnx")


def tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()


def test_no_symlink_anywhere_in_the_repository():
    staged = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert [line for line in staged.splitlines() if line.startswith("120000")] == []
    assert [f for f in tracked_files() if (ROOT / f).is_symlink()] == []


def test_every_top_level_folder_says_what_it_holds():
    folders = sorted({f.split("/")[0] for f in tracked_files() if "/" in f and not f.startswith(".")})
    assert {"client", "admin", "model_repository", "export", "bench", "fixtures", "tests", "docs"} <= set(folders)
    for folder in folders:
        readme, package = ROOT / folder / "README.md", ROOT / folder / "__init__.py"
        if readme.is_file():
            assert readme.read_text().startswith("# "), folder
        else:
            assert package.is_file() and ast.get_docstring(ast.parse(package.read_text())), folder


def test_importing_the_client_imports_nothing_heavy():
    script = (
        "import sys, safety_checker_client, safety_checker_client.spec, safety_checker_client.preprocess, "
        "safety_checker_client.client, safety_checker_client.cli, safety_checker_client.scan, "
        "safety_checker_client.progress, safety_checker_client.html_report, safety_checker_client.diffusers\n"
        "safety_checker_client.cli._parser()\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_client_package_declares_only_its_three_dependencies():
    project = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    names = sorted(requirement.split("[")[0].split(">")[0].split("=")[0] for requirement in project["dependencies"])
    assert names == ["numpy", "pillow", "tritonclient"]
    assert "optional-dependencies" not in project
    client_files = [f for f in tracked_files() if f.startswith("client/safety_checker_client/")]
    assert sorted(Path(f).name for f in client_files) == [
        "__init__.py",
        "cli.py",
        "client.py",
        "diffusers.py",
        "html_report.py",
        "preprocess.py",
        "progress.py",
        "scan.py",
        "spec.py",
    ]


@pytest.mark.slow
def test_copies_in_an_exported_repository_equal_their_sources(repository):
    """Code shared between served models has one home; the export copies it, byte for byte."""
    checked = 0
    for model in served_models():
        sources = list(model.copied_files)
        sources += (ROOT / "model_repository" / model.name / "1").glob("*.py")
        for source in sources:
            copy = repository / model.name / "1" / source.name
            assert not copy.is_symlink() and copy.read_bytes() == source.read_bytes(), copy
            checked += 1
    # embedder runner (2), its copies for the normaliser (2), postprocessor (3) + concept set (1), images model (2) +
    # the client's preprocess.py and spec.py and the postprocessor's strictness.py (3)
    assert checked >= 13
    from safety_checker_admin import health_probe

    probe = repository / "health_probe.py"  # the deployments' health check, at the repository root
    assert not probe.is_symlink() and probe.read_bytes() == Path(health_probe.__file__).read_bytes()


def test_served_python_reads_tensor_names_from_its_config():
    """No served model.py restates a tensor name of the contract; each reads them from config.pbtxt."""
    names = {
        t.name
        for group in (
            spec.ENSEMBLE_INPUTS,
            spec.ENSEMBLE_OUTPUTS,
            spec.EMBEDDER_OUTPUTS,
            spec.UINT8_ENSEMBLE_INPUTS,
            spec.IMAGES_INPUTS,
        )
        for t in group
    }
    for model_py in (ROOT / "model_repository").glob("*/1/*.py"):
        literals = {
            node.value
            for node in ast.walk(ast.parse(model_py.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        assert literals & names == set(), model_py
        assert literals & {spec.CONCEPTS_FILENAME, spec.CUSTOM_CONCEPTS_FILENAME} == set(), model_py


CLOSURE = r"""
import json, sys
from importlib import metadata
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

def closure(name, extras=()):
    seen, todo = set(), [(name, tuple(extras))]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, tuple(sorted(req.extras))))
    return {key for key, _ in seen}

installed = {canonicalize_name(d.metadata["Name"]) for d in metadata.distributions()}
needed = closure("safety-checker-client")
print(json.dumps({"installed": sorted(installed), "needed": sorted(needed)}))
"""


@pytest.mark.slow
def test_client_installs_alone_into_a_fresh_venv_and_checks_images(tmp_path, server):
    """`pip install ./client` brings tritonclient, numpy and pillow with their own dependencies, nothing more,
    and its `safety-checker check` answers as the full environment's does."""
    from PIL import Image

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(ROOT / "client")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    report = json.loads(subprocess.run([str(python), "-c", CLOSURE], capture_output=True, text=True, check=True).stdout)
    extra = set(report["installed"]) - set(report["needed"]) - {"pip", "setuptools", "wheel"}
    assert extra == set()
    assert {"tritonclient", "numpy", "pillow"} <= set(report["needed"])
    assert set(report["installed"]).isdisjoint(HEAVY + ("nvidia-pytriton",))

    image = tmp_path / "pattern.png"
    Image.fromarray((np.arange(64 * 48 * 3) * 37 % 256).astype(np.uint8).reshape(64, 48, 3)).save(image)
    url = server.grpc_url
    thin = subprocess.run(
        [str(env_dir / "bin" / "safety-checker"), "check", "--url", url, str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    full = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "safety-checker"), "check", "--url", url, str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert thin.returncode == 0, thin.stderr
    assert "flagged" in json.loads(thin.stdout) and thin.stdout == full.stdout
    missing = subprocess.run(
        [str(env_dir / "bin" / "safety-checker"), "serve", "--repository", "x"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "pip install ./admin" in missing.stderr + missing.stdout
