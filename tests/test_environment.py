"""The Python models' packed environment (export/environment.py): what it holds, how Triton activates it, and a
repository served by a Python that has none of its packages.

Triton's Python backend unpacks `python_env.tar.gz` and sources its `bin/activate` before it starts a stub;
these tests do the same, then serve a repository whose stubs' Python sees only NumPy and onnxruntime besides
the environment: the NGC image's situation (no Pillow, none of this project's packages).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest

from export import environment
from export.models import served_models
from export.parameters import ENVIRONMENT_FILENAME
from safety_checker_admin.server import TritonServer, free_port
from safety_checker_client import spec
from safety_checker_client.client import SafetyCheckerClient
from safety_checker_client.preprocess import open_image

OWN = environment.this_python()


def unpacked(archive: Path, target: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="tar")
    return target


def activated(env: Path, command: str, path: str) -> subprocess.CompletedProcess:
    """`command` in bash after sourcing the environment's activate, as the Python backend runs a stub."""
    return subprocess.run(
        ["bash", "-c", f"source {env}/bin/activate && {command}"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path},
    )


@pytest.fixture(scope="module")
def decoder_env(tmp_path_factory) -> Path:
    (requirements,) = {m.requirements for m in served_models() if m.name == spec.DECODE_MODEL}
    return unpacked(environment.build(requirements), tmp_path_factory.mktemp("decoder-env"))


def test_one_virtual_environment_per_python_with_the_pinned_packages(decoder_env):
    pins = dict(line.split("==") for line in environment.pinned(["pillow"]))
    for target in environment.default_targets():
        root = decoder_env / target.version
        assert os.readlink(root / "bin" / "python3") == target.executable
        config = (root / "pyvenv.cfg").read_text()
        assert f"home = {target.home}\n" in config and "include-system-site-packages = true\n" in config
        site = root / "lib" / f"python{target.version}" / "site-packages"
        tag = target.version.replace(".", "")
        assert list((site / "PIL").glob(f"_imaging.cpython-{tag}-*.so")), target.version
        assert (site / f"pillow-{pins['pillow']}.dist-info").is_dir()
        for package in ("safety_checker_client", "safety_checker_served"):
            assert (site / package / "__init__.py").is_file()
    ngc = decoder_env / environment.NGC_PYTHON
    assert os.readlink(ngc / "bin" / "python3") == "/usr/bin/python3.10"


def test_activate_puts_this_pythons_environment_first(decoder_env):
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    script = "import sys, PIL, safety_checker_served; print(sys.prefix); print(PIL.__file__)"
    result = activated(decoder_env, f"python3 -c '{script}'", path)
    assert result.returncode == 0, result.stderr
    prefix, pil = result.stdout.split()
    assert Path(prefix) == decoder_env / OWN.version
    assert Path(pil).is_relative_to(decoder_env / OWN.version / "lib")


def test_activate_refuses_a_python_it_has_no_packages_for(decoder_env, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\necho 3.9\n")
    (fake / "python3").chmod(0o755)
    result = activated(decoder_env, "echo started", f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert result.returncode != 0 and "started" not in result.stdout
    assert "no packages for Python 3.9" in result.stderr


@pytest.mark.slow
def test_the_archive_is_rebuilt_only_when_what_goes_into_it_changes(tmp_path):
    first = environment.build((), cache=tmp_path)
    modified = first.stat().st_mtime_ns
    assert environment.build((), cache=tmp_path) == first and first.stat().st_mtime_ns == modified
    assert environment.build(("pillow",), cache=tmp_path) != first


@pytest.mark.slow
def test_a_missing_wheel_names_make_setup(tmp_path):
    empty = tmp_path / "wheelhouse"
    empty.mkdir()
    with pytest.raises(environment.EnvironmentBuildError, match="make setup"):
        environment.build(("pillow",), wheelhouse=empty, cache=tmp_path / "cache")


@pytest.fixture(scope="module")
def bare_site(tmp_path_factory) -> Path:
    """site-packages holding NumPy and onnxruntime only, linked from this venv: what the stubs may see besides
    their environment (the NGC image has NumPy; the CPU configs' runner needs onnxruntime)."""
    source = Path(sysconfig.get_paths()["purelib"])
    site = tmp_path_factory.mktemp("bare-site")
    for name in ("numpy", "numpy.libs", "onnxruntime"):
        if (source / name).exists():
            (site / name).symlink_to(source / name)
    return site


@pytest.fixture(scope="module")
def bare_repository(repository, bare_site, tmp_path_factory) -> Path:
    """The session's exported repository, its environments rebuilt to see only `bare_site` besides themselves."""
    target = tmp_path_factory.mktemp("bare-repository") / "repository"
    subprocess.run(["cp", "-r", str(repository), str(target)], check=True)
    bare = environment.PythonTarget(OWN.version, OWN.executable, (str(bare_site),))
    cache = tmp_path_factory.mktemp("bare-cache")
    for model in served_models():
        if model.python:
            archive = environment.build(model.requirements, targets=(bare,), cache=cache)
            (target / model.name / ENVIRONMENT_FILENAME).write_bytes(archive.read_bytes())
    return target


@pytest.mark.server
def test_a_repository_serves_from_its_environments_alone(bare_repository, bare_site, encoded_files):
    """No Pillow and none of this project's packages outside the environments: image files and pixels are still
    answered alike, so each model imported what its own environment carries."""
    base_site = Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"])
    for site in (bare_site, base_site):  # what the stubs' Python sees besides the environments
        assert not (site / "PIL").exists() and not (site / "safety_checker_served").exists(), site
    paths = [p for name, p in sorted(encoded_files.items()) if name.endswith((".png", ".jpeg"))][:6]
    with TritonServer(
        bare_repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
    ) as triton:
        with SafetyCheckerClient(triton.grpc_url, encoded=True) as client:
            files = client.check_files(paths)
        with SafetyCheckerClient(triton.grpc_url) as client:
            pixels = client.check([open_image(p) for p in paths])  # frame 0, composited: what answers here
    assert [r.flagged for r in files] == [r.flagged for r in pixels]
    for got, want in zip(files, pixels):
        assert got.concept_scores == want.concept_scores and np.array_equal(got.image_embeds, want.image_embeds)
