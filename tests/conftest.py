"""Session fixtures: a tiny checker crafted for the parity tests, its export, and a real tritonserver."""

from __future__ import annotations

import itertools
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import numpy as np
import pytest
from crafting import Crafted, calibrate_thresholds, craft, unambiguous, varied_inputs
from filelock import FileLock

from fixtures.checkers import build_checker, save_checker
from fixtures.photos import photos as sample_photos

ROOT = Path(__file__).resolve().parent.parent


def _worker_ports() -> None:
    """Under pytest-xdist, each worker draws the ports of the servers it starts from a range of its own, below the
    ephemeral range: two workers that each ask the system for a free port could otherwise be handed the same one
    between asking and binding it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return
    import safety_checker_admin.server as launcher

    first = PORT_RANGE_START + int(worker[2:]) * PORTS_PER_WORKER
    candidates = itertools.cycle(range(first, first + PORTS_PER_WORKER))

    def free_port() -> int:
        for port in candidates:
            if not launcher.port_in_use("127.0.0.1", port) and not launcher.port_in_use("0.0.0.0", port):
                return port
        raise AssertionError("unreachable: the cycle is endless")

    launcher.free_port = free_port


PORT_RANGE_START = 20000
PORTS_PER_WORKER = 2000
_worker_ports()

# Fixtures that start a tritonserver: every test using one is marked `server`.
SERVER_FIXTURES = {"server", "concept_server", "served", "int8_server"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


@pytest.fixture(autouse=True)
def _server_marker_is_honest(request, monkeypatch) -> None:
    """A test that starts a tritonserver itself must be marked `server`, so `make test-fast` never starts one."""
    if request.node.get_closest_marker("server") is None:
        from safety_checker_admin.server import TritonServer

        def refuse(*args, **kwargs):
            raise AssertionError(f"{request.node.nodeid} starts a tritonserver: mark it @pytest.mark.server")

        monkeypatch.setattr(TritonServer, "start", refuse)


def awaited_log(log_path: Path, pattern: str, timeout_s: float = 30) -> str:
    """The server log once `pattern` (a regular expression) is in it: lines from the Python stubs and from a
    wrapper's shell reach the log on their own schedule, after the answers that caused them."""
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, log := log_path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"no {pattern!r} in {log_path} after {timeout_s:g} s: {log[-2000:]}"
        time.sleep(0.2)
    return log


def run_export(model: Path | str, repository: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m export` as a user runs it, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "export", "--model", str(model), "--repository", str(repository), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@dataclass
class ParitySet:
    checker_dir: Path
    pixels: np.ndarray  # [N, 3, 224, 224]: varied images, real photos and crafted inputs
    crafted: List[Crafted]
    crafted_offset: int  # pixels[crafted_offset:] are the crafted ones


def photos() -> np.ndarray:
    """Real photographs from scikit-image, through the client's own preprocessing."""
    from safety_checker_client.preprocess import preprocess

    images = list(sample_photos().values())
    images += [image[::-1] for image in images] + [image[:, ::-1] for image in images]
    return preprocess(images)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that `build` fills once per test session. Under pytest-xdist the first worker that asks builds it
    while the others wait (the workers' temporary folders share a parent), then every worker reads it: what a
    session builds once is built once, however many workers run the session."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


def _build_parity_set(folder: Path) -> None:
    rng = np.random.default_rng(20261128)
    checker = build_checker(seed=7)
    pool = varied_inputs(rng, 300)
    calibrate_thresholds(checker, pool)
    crafted = craft(checker, pool, rng, per_margin=4)
    plain = np.concatenate([pool[:220], photos()])
    plain = plain[unambiguous(checker, plain)]
    save_checker(folder / "tiny-checker", checker)
    np.save(folder / "pixels.npy", np.concatenate([plain, np.stack([c.pixels for c in crafted])]))
    (folder / "crafted.pickle").write_bytes(pickle.dumps((crafted, len(plain))))


@pytest.fixture(scope="session")
def parity_set(tmp_path_factory) -> ParitySet:
    folder = built_once(tmp_path_factory, "parity-set", _build_parity_set)
    crafted, offset = pickle.loads((folder / "crafted.pickle").read_bytes())
    return ParitySet(folder / "tiny-checker", np.load(folder / "pixels.npy"), crafted, offset)


@pytest.fixture(scope="session")
def encoded_files(tmp_path_factory) -> Dict[str, Path]:
    """Image files by name: the photos as PNG, JPEG (one EXIF-rotated) and WebP, every PIL mode, animations
    (tests/image_files.py)."""
    from image_files import parity_files

    folder = tmp_path_factory.mktemp("image-files")
    paths = {}
    for name, data in parity_files().items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


@pytest.fixture(scope="session")
def reference_checker(parity_set):
    """The judge: diffusers' class loaded from the saved checkpoint, as a pipeline would."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    return StableDiffusionSafetyChecker.from_pretrained(str(parity_set.checker_dir)).eval()


def exported(checker_dir: Path, target: Path) -> Path:
    result = run_export(checker_dir, target)
    assert result.returncode == 0, result.stderr
    return target


def serving(repository: Path) -> Iterator:
    """A started tritonserver on free ports for the length of a fixture."""
    from safety_checker_admin.server import TritonServer, free_port

    triton = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    triton.start()
    yield triton
    triton.stop()


@pytest.fixture(scope="session")
def repository(parity_set, tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "repository", lambda folder: exported(parity_set.checker_dir, folder))


@pytest.fixture(scope="session")
def server(repository):
    yield from serving(repository)


# -- custom concepts ----------------------------------------------------------
# A second checker and server, so that changing the concept set never touches
# the parity tests' server: see concept_models.py.


@dataclass
class ConceptModels:
    checker: object  # the StableDiffusionSafetyChecker served by concept_server
    checker_dir: Path
    clip_dir: Path  # a tiny CLIPModel + tokenizer sharing its vision tower
    phrase_targets: dict


@pytest.fixture(scope="session")
def concept_models(tmp_path_factory) -> ConceptModels:
    from concept_models import build_concept_checker, build_tiny_clip, save_concept_checker

    folder = tmp_path_factory.mktemp("concept-models")
    checker = build_concept_checker()
    checker_dir = save_concept_checker(folder / "checker", checker)
    clip_dir, targets = build_tiny_clip(checker, folder / "clip")
    return ConceptModels(checker=checker, checker_dir=checker_dir, clip_dir=clip_dir, phrase_targets=targets)


@pytest.fixture(scope="session")
def concept_repository(concept_models, tmp_path_factory) -> Path:
    return exported(concept_models.checker_dir, tmp_path_factory.mktemp("concept-repository"))


@pytest.fixture(scope="session")
def concept_server(concept_repository):
    yield from serving(concept_repository)


@pytest.fixture(scope="session")
def pictures(tmp_path_factory):
    """PNG files: stripe examples, other stripe pictures (matches), and pictures that are not stripes."""
    from concept_models import other_pictures, stripe_examples, stripe_matches
    from PIL import Image

    root = tmp_path_factory.mktemp("pictures")
    files = {}
    for group, images in (
        ("examples", dict(enumerate(stripe_examples()))),
        ("matches", dict(enumerate(stripe_matches()))),
        ("others", other_pictures()),
    ):
        (root / group).mkdir()
        files[group] = []
        for name, image in images.items():
            path = root / group / f"{name}.png"
            Image.fromarray(image).save(path)
            files[group].append(path)
    return files
