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
from export.parameters import ENVIRONMENT_FILENAME
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
    modules = [
        *(f"safety_checker_client.{m}" for m in ("spec", "preprocess", "strictness", "errors", "client", "records")),
        "safety_checker_client.cli",
        *(f"safety_checker_scan.{m}" for m in ("cli", "files", "servers", "scanner", "report", "tally", "progress")),
        "safety_checker_scan.html_report",
        "safety_checker_diffusers",
        "safety_checker_diffusers.checker",
        "safety_checker_diffusers.filters",
    ]
    script = (
        f"import sys, {', '.join(modules)}\n"
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
    client_files = [
        f for f in tracked_files() if f.startswith("client/safety_checker_client/") and (ROOT / f).is_file()
    ]
    assert sorted(Path(f).name for f in client_files) == [
        "__init__.py",
        "cli.py",
        "client.py",
        "errors.py",
        "preprocess.py",
        "records.py",
        "spec.py",
        "strictness.py",
    ]
    # The thin client: the contract, preprocessing, the client and `check`, in at most 1,200 lines.
    assert sum(len((ROOT / f).read_text().splitlines()) for f in client_files) <= 1200


@pytest.mark.parametrize(
    ("folder", "dependencies"),
    [("scan", ["numpy", "pillow", "safety-checker-client"]), ("dropin", ["numpy", "safety-checker-client"])],
)
def test_scan_and_the_drop_in_are_packages_of_their_own_on_the_client(folder, dependencies):
    project = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]
    names = sorted(requirement.split("[")[0].split(">")[0].split("=")[0] for requirement in project["dependencies"])
    assert names == dependencies


def test_no_product_file_is_over_450_lines():
    product = [f for f in tracked_files() if f.endswith(".py") and not f.startswith("tests/") and (ROOT / f).is_file()]
    assert {f: n for f in product if (n := len((ROOT / f).read_text().splitlines())) > 450} == {}


@pytest.mark.slow
def test_an_exported_repository_holds_no_copy_of_shared_code(repository):
    """Served code has one home (an installed package); each Python model carries it as a packed environment,
    and no Python file of the repository repeats another or a file of client/ or admin/."""
    files = sorted(p for p in repository.rglob("*.py") if "site-packages" not in p.parts)
    contents = [p.read_bytes() for p in files]
    assert len(set(contents)) == len(contents), [str(p.relative_to(repository)) for p in files]
    packages = {p.read_bytes() for folder in ("client", "admin") for p in (ROOT / folder).rglob("*.py")}
    assert [p for p, text in zip(files, contents) if text in packages] == []
    # Every model.py is the model_repository/ one, and the deployments' health check sits at the root.
    for model_py in (ROOT / "model_repository").glob("*/1/model.py"):
        target = repository / model_py.relative_to(ROOT / "model_repository")
        assert not target.exists() or target.read_bytes() == model_py.read_bytes(), target
    probe = repository / "health_probe.py"
    assert not probe.is_symlink() and probe.read_bytes() == (ROOT / "model_repository" / "health_probe.py").read_bytes()
    for model in served_models():
        environment = repository / model.name / ENVIRONMENT_FILENAME
        assert environment.is_file() == model.python, model.name


def test_no_served_model_fakes_an_import():
    for path in (ROOT / "model_repository").rglob("*.py"):
        text = path.read_text()
        assert "sys.modules" not in text and "sys.path" not in text, path


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


@pytest.mark.install
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
