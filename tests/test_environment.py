"""The Python models' packed environment (export/environment.py): what it holds, how Triton activates it, and a
repository served by a Python that has none of its packages.

Triton's Python backend unpacks `python_env.tar.gz` and sources its `bin/activate` before it starts a stub;
these tests do the same, then serve a repository whose stubs' Python sees only NumPy besides the environment:
the NGC image's situation (no Pillow, no onnxruntime, none of this project's packages).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import image_python
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
    """Pillow for the NGC image's Python; the export's own Python's stubs import this virtualenv's (the .pth)."""
    pins = dict(line.split("==") for line in environment.pinned(["pillow"]))
    assert "pillow" in environment.outer_packages(OWN) and environment.outer_packages(environment.ngc_target()) == set()
    for target in environment.default_targets():
        root = decoder_env / target.version
        assert os.readlink(root / "bin" / "python3") == target.executable
        config = (root / "pyvenv.cfg").read_text()
        assert f"home = {target.home}\n" in config and "include-system-site-packages = true\n" in config
        site = root / "lib" / f"python{target.version}" / "site-packages"
        tag = target.version.replace(".", "")
        packed = "pillow" not in environment.outer_packages(target)
        assert bool(list((site / "PIL").glob(f"_imaging.cpython-{tag}-*.so"))) == packed, target.version
        assert (site / f"pillow-{pins['pillow']}.dist-info").is_dir() == packed
        assert (site / "outer-virtualenv.pth").is_file() == (not packed)
        for package in ("safety_checker_client", "safety_checker_served"):
            assert (site / package / "__init__.py").is_file()
    ngc = decoder_env / environment.NGC_PYTHON
    assert os.readlink(ngc / "bin" / "python3") == "/usr/bin/python3.10"


def test_activate_puts_this_pythons_environment_first(decoder_env):
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    script = "import sys, PIL, safety_checker_served as s; print(sys.prefix); print(s.__file__)"
    result = activated(decoder_env, f"python3 -c '{script}'", path)
    assert result.returncode == 0, result.stderr
    prefix, served = result.stdout.split()
    assert Path(prefix) == decoder_env / OWN.version
    assert Path(served).is_relative_to(decoder_env / OWN.version / "lib")


def test_activate_refuses_a_python_it_has_no_packages_for(decoder_env, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\necho 3.9\n")
    (fake / "python3").chmod(0o755)
    result = activated(decoder_env, "echo started", f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert result.returncode != 0 and "started" not in result.stdout
    assert "no packages for Python 3.9" in result.stderr


@pytest.fixture(scope="module")
def runner_env(tmp_path_factory) -> Path:
    (requirements,) = {m.requirements for m in served_models() if m.name == spec.EMBEDDER_MODEL}
    return unpacked(environment.build(requirements), tmp_path_factory.mktemp("runner-env"))


def test_the_cpu_runners_environment_carries_onnxruntime_and_not_the_images_numpy(runner_env):
    """Issue 20: the CPU configs' runner imports onnxruntime, which the NGC image lacks, from its environment;
    NumPy is the image's (numpy<2), never packed over it. The export's own Python's stubs import this
    virtualenv's onnxruntime, which quantised and verified the models."""
    (pin,) = environment.pinned(["onnxruntime"])
    site = runner_env / environment.NGC_PYTHON / "lib" / f"python{environment.NGC_PYTHON}" / "site-packages"
    assert list((site / "onnxruntime" / "capi").glob("onnxruntime_pybind11_state.cpython-310-*.so"))
    assert (site / f"{pin.replace('==', '-')}.dist-info").is_dir()
    for target in environment.default_targets():
        site = runner_env / target.version / "lib" / f"python{target.version}" / "site-packages"
        assert (site / "onnxruntime").is_dir() == ("onnxruntime" not in environment.outer_packages(target))
        assert not list(site.glob("numpy*")) and not (site / "PIL").exists()


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """The image's Python's stand-in (tests/image_python.py): its standard library and NumPy only."""
    return image_python.build(tmp_path_factory.mktemp("image-python"))


def test_stub_python_builds_the_environment_as_the_images_without_the_virtualenv(stand_in, tmp_path):
    target = environment.stub_python(str(stand_in))
    assert target == environment.PythonTarget(OWN.version, str(stand_in), ())
    env = unpacked(environment.build(("onnxruntime",), targets=(target,), cache=tmp_path / "cache"), tmp_path / "env")
    config = (env / OWN.version / "pyvenv.cfg").read_text()
    assert f"home = {stand_in.parent}\n" in config
    assert not list(env.rglob("*.pth"))
    script = "import numpy, onnxruntime; print(numpy.__file__, onnxruntime.__version__); import yaml"
    result = activated(env, f"python3 -c '{script}'", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    numpy_file, version = result.stdout.split()
    assert Path(numpy_file).is_relative_to(image_python.site_packages(stand_in)), result.stderr
    assert f"onnxruntime=={version}" == environment.pinned(["onnxruntime"])[0]  # packed, not this venv's
    assert "No module named 'yaml'" in result.stderr  # this venv has it, the stand-in has not


def test_stub_python_refuses_another_python_version(tmp_path):
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\necho 3.9\n")
    fake.chmod(0o755)
    with pytest.raises(environment.EnvironmentBuildError, match=f"is 3.9 .*not Python {OWN.version}"):
        environment.stub_python(str(fake))
    with pytest.raises(environment.EnvironmentBuildError, match="cannot run"):
        environment.stub_python(str(tmp_path / "missing"))


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
def bare_repository(repository, stand_in, tmp_path_factory) -> Path:
    """The session's exported repository, its environments rebuilt to see only the stand-in besides themselves."""
    target = tmp_path_factory.mktemp("bare-repository") / "repository"
    subprocess.run(["cp", "-r", str(repository), str(target)], check=True)
    bare = environment.stub_python(str(stand_in))
    cache = tmp_path_factory.mktemp("bare-cache")
    for model in served_models():
        if model.python:
            archive = environment.build(model.requirements, targets=(environment.ngc_target(), bare), cache=cache)
            (target / model.name / ENVIRONMENT_FILENAME).write_bytes(archive.read_bytes())
    return target


@pytest.mark.server
def test_a_repository_serves_from_its_environments_alone(bare_repository, stand_in, encoded_files):
    """No Pillow, no onnxruntime and none of this project's packages outside the environments: image files and
    pixels are still answered alike, so each model imported what its own environment carries."""
    site = image_python.site_packages(stand_in)  # what the stubs' Python sees besides the environments
    assert {p.name.split("-")[0] for p in site.iterdir()} - {"bin"} == {"numpy", "numpy.libs"}, list(site.iterdir())
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
