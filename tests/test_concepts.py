"""Custom concepts on a running tritonserver: `safety-checker concepts ...` as a user runs it.

The server (concept_server) is started once and never restarted: every change
of the concept set below takes effect while it runs. Its checker's built-in
concepts never fire on these pictures (see concept_models.py), so whatever
flags a picture here is a custom concept.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

from export.parameters import ENVIRONMENT_FILENAME
from safety_checker_client import spec
from safety_checker_client.client import CheckResult, SafetyCheckerClient
from safety_checker_client.preprocess import load_image, preprocess
from safety_checker_served import concept_set, concept_writer
from safety_checker_served.concept_set import ConceptSet

COMMAND = str(Path(sys.executable).parent / "safety-checker")


def concepts(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([COMMAND, "concepts", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def set_file(repository: Path) -> Path:
    return repository / spec.POSTPROCESS_MODEL / "1" / spec.CUSTOM_CONCEPTS_FILENAME


def client_for(server, protocol: str = "grpc") -> SafetyCheckerClient:
    return SafetyCheckerClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol=protocol)


def check(server, files, protocol: str = "grpc", strictness=None) -> List[CheckResult]:
    with client_for(server, protocol) as client:
        return client.check_batch(preprocess([load_image(f) for f in files]), strictness)


def served_version(server) -> int:
    return check_pixels(server, np.zeros((1, 3, 224, 224), np.float32))[0].concept_set_version


def check_pixels(server, pixels, protocol: str = "grpc", strictness=None) -> List[CheckResult]:
    with client_for(server, protocol) as client:
        return client.check_batch(pixels, strictness)


def wait_for(server, version: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while served_version(server) < version:
        assert time.monotonic() < deadline, f"server never served version {version}"
        time.sleep(0.1)


def log_mark(server) -> int:
    return len(server.log_path.read_text())


def wait_for_log(server, fragment: str, since: int, timeout_s: float = 30) -> str:
    """Send requests (the set is looked at when a batch runs) until the server log after `since` holds `fragment`."""
    deadline = time.monotonic() + timeout_s
    while True:
        served_version(server)
        log = server.log_path.read_text()[since:]
        if fragment in log:
            return log
        assert time.monotonic() < deadline, f"{fragment!r} never appeared in the server log"
        time.sleep(0.1)


def url(server) -> str:
    return server.grpc_url


def add_images(server, repository, name, files, *extra) -> subprocess.CompletedProcess:
    return concepts("add", "--repository", repository, "--url", url(server), "--name", name, "--image", *files, *extra)


def expected_custom_scores(result: CheckResult, concepts_served: ConceptSet) -> Dict[str, float]:
    """What the served rule gives for this answer: round(cos - threshold + adjustment, 3), cos in float32."""
    embeds = np.asarray(result.image_embeds, dtype=np.float32)[np.newaxis]
    normalized = embeds / np.maximum(np.sqrt(np.sum(embeds * embeds, dtype=np.float32)), np.float32(1e-12))
    cos = (normalized @ concepts_served.unit_embeddings().T)[0]
    adjustment = result.strictness_adjustment + (0.01 if any(s > 0 for s in result.special_scores) else 0.0)
    return {
        c.name: float(np.round(np.float64(cos[i]) - c.threshold + adjustment, 3))
        for i, c in enumerate(concepts_served.concepts)
    }


@pytest.fixture(autouse=True)
def empty_set_afterwards(concept_server, concept_repository):
    """Each test starts from an empty, served set; a test may leave anything behind, even an invalid file."""
    yield
    path = set_file(concept_repository)
    try:
        on_disk: Optional[ConceptSet] = concept_set.read(path)
    except concept_set.ConceptSetError:
        on_disk = None
    served = served_version(concept_server)
    if on_disk is not None and not on_disk.concepts and on_disk.version == served:
        return
    version = max(served, on_disk.version if on_disk else 0) + 1
    concept_writer.write(path, concept_set.empty(16, version=version))
    wait_for(concept_server, version)


# -- adding concepts, no restart -------------------------------------------------
def test_export_writes_an_empty_set_and_the_shared_module(concept_repository):
    """The server validates with the very module the CLI uses: the served package in the postprocessor's
    environment (one per Python it may run on), never a copy beside its model.py."""
    written = concept_set.read(set_file(concept_repository))
    assert written.concepts == () and written.embedding_dim == 16
    model = concept_repository / spec.POSTPROCESS_MODEL
    assert not (model / "1" / "concept_set.py").exists()
    with tarfile.open(model / ENVIRONMENT_FILENAME) as environment:
        shared = [m for m in environment.getmembers() if m.name.endswith("/safety_checker_served/concept_set.py")]
        assert len(shared) >= 1, environment.getnames()[:20]
        for member in shared:
            assert environment.extractfile(member).read() == Path(concept_set.__file__).read_bytes(), member.name


def test_image_concept_flags_matching_pictures_without_restart(concept_server, concept_repository, pictures):
    pid = concept_server.pid
    before = served_version(concept_server)
    assert not any(r.flagged for r in check(concept_server, pictures["matches"] + pictures["others"]))

    result = add_images(concept_server, concept_repository, "stripes", pictures["examples"], "--category", "pattern")
    assert result.returncode == 0, result.stderr
    assert f"now serves version {before + 1}" in result.stdout
    assert "3 images" in result.stdout and "least similar example" in result.stdout

    stored = concept_set.read(set_file(concept_repository))
    assert stored.version == before + 1 and stored.names == ["stripes"]
    concept = stored.get("stripes")
    assert concept.category == "pattern" and concept.source["kind"] == "images"
    assert len(concept.source["sha256"]) == 3 and math.isclose(np.linalg.norm(concept.embedding), 1, abs_tol=1e-6)

    for protocol in ("grpc", "http"):
        matches = check(concept_server, pictures["matches"], protocol)
        others = check(concept_server, pictures["others"], protocol)
        for r in matches:
            assert r.flagged and r.fired_concepts == ["stripes"] and r.custom_scores["stripes"] > 0
        for r in others:
            assert not r.flagged and r.fired_concepts == [] and r.custom_scores["stripes"] <= 0
        for r in matches + others:
            assert r.concept_set_version == before + 1
            assert r.custom_scores == pytest.approx(expected_custom_scores(r, stored), abs=1.001e-3)
    assert concept_server.running and concept_server.pid == pid  # the same server, never restarted


def test_check_command_prints_custom_scores_and_fired_concepts(concept_server, concept_repository, pictures):
    assert add_images(concept_server, concept_repository, "stripes", pictures["examples"]).returncode == 0
    files = [pictures["matches"][0], pictures["others"][0]]
    result = subprocess.run(
        [COMMAND, "check", "--url", url(concept_server), *map(str, files)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    match, other = (json.loads(line) for line in result.stdout.splitlines())
    assert match["flagged"] is True and match["fired_concepts"] == ["stripes"]
    assert other["flagged"] is False and other["fired_concepts"] == []
    assert set(match["custom_scores"]) == {"stripes"} and match["custom_scores"]["stripes"] > 0
    assert match["concept_set_version"] == other["concept_set_version"] == served_version(concept_server)


def test_text_concept_on_the_tiny_clip(concept_server, concept_repository, concept_models, pictures):
    before = served_version(concept_server)
    result = concepts(
        "add",
        "--repository",
        concept_repository,
        "--url",
        url(concept_server),
        "--name",
        "stripes-text",
        "--text",
        "stripes",
        "--clip-model",
        concept_models.clip_dir,
        "--threshold",
        "0.5",
        "--category",
        "pattern",
    )
    assert result.returncode == 0, result.stderr
    stored = concept_set.read(set_file(concept_repository)).get("stripes-text")
    assert stored.source == {"kind": "text", "text": "stripes"}
    # The phrase's embedding is what the tiny CLIP was fitted to give it.
    assert float(np.dot(stored.embedding, concept_models.phrase_targets["stripes"])) > 0.999
    for r in check(concept_server, pictures["matches"]):
        assert r.flagged and r.fired_concepts == ["stripes-text"] and r.concept_set_version == before + 1
    for r in check(concept_server, pictures["others"]):
        assert not r.flagged and r.fired_concepts == []


def test_text_concept_default_threshold_is_the_builtin_mean(concept_server, concept_repository, concept_models):
    result = concepts(
        "add",
        "--repository",
        concept_repository,
        "--url",
        url(concept_server),
        "--name",
        "cat",
        "--text",
        "a cat",
        "--clip-model",
        concept_models.clip_dir,
    )
    assert result.returncode == 0, result.stderr
    assert concept_set.read(set_file(concept_repository)).get("cat").threshold == 0.99  # the concept checker's


def test_a_clip_model_of_another_space_is_refused(concept_server, concept_repository, tmp_path):
    import torch
    from concept_models import PROJECTION_DIM, write_tokenizer
    from transformers import CLIPModel

    from fixtures.checkers import clip_config

    torch.manual_seed(123)
    CLIPModel(clip_config("tiny", PROJECTION_DIM)).save_pretrained(str(tmp_path / "other-clip"))
    write_tokenizer(tmp_path / "other-clip")
    before = set_file(concept_repository).read_bytes()
    result = concepts(
        "add",
        "--repository",
        concept_repository,
        "--url",
        url(concept_server),
        "--name",
        "x",
        "--text",
        "stripes",
        "--clip-model",
        tmp_path / "other-clip",
    )
    assert result.returncode == 1
    assert "not the one the served checker was built from" in result.stderr
    assert set_file(concept_repository).read_bytes() == before


def test_list_and_remove(concept_server, concept_repository, pictures):
    assert (
        add_images(concept_server, concept_repository, "stripes", pictures["examples"], "--threshold", "0.5").returncode
        == 0
    )
    listing = concepts("list", "--repository", concept_repository)
    assert listing.returncode == 0, listing.stderr
    assert "stripes" in listing.stdout and "3 images" in listing.stdout and "0.5" in listing.stdout
    as_json = json.loads(concepts("list", "--repository", concept_repository, "--json").stdout)
    assert [c["name"] for c in as_json["concepts"]] == ["stripes"] and "embedding" not in as_json["concepts"][0]

    version = served_version(concept_server)
    result = concepts("remove", "--repository", concept_repository, "--url", url(concept_server), "--name", "stripes")
    assert result.returncode == 0, result.stderr
    assert f"now serves version {version + 1}" in result.stdout
    for r in check(concept_server, pictures["matches"]):
        assert not r.flagged and r.custom_scores == {} and r.concept_set_version == version + 1
    missing = concepts("remove", "--repository", concept_repository, "--url", url(concept_server), "--name", "stripes")
    assert missing.returncode == 1 and "no concept named 'stripes'" in missing.stderr


def test_special_care_adjustment_and_strictness_apply_to_custom_scores(concept_server, concept_repository, pictures):
    assert (
        add_images(concept_server, concept_repository, "stripes", pictures["examples"], "--threshold", "0.5").returncode
        == 0
    )
    stored = concept_set.read(set_file(concept_repository))
    normal = check(concept_server, pictures["matches"])
    strong = check(concept_server, pictures["matches"], strictness="max")
    for a, b in zip(normal, strong):
        assert b.strictness_adjustment == spec.STRICTNESS_PRESETS["max"]
        assert b.custom_scores == pytest.approx(expected_custom_scores(b, stored), abs=1.001e-3)
        assert b.custom_scores["stripes"] == pytest.approx(a.custom_scores["stripes"] + 0.074, abs=1.001e-3)


# -- calibration -----------------------------------------------------------------
def test_calibrate_a_custom_concept(concept_server, concept_repository, pictures, tmp_path):
    # A threshold far too strict: nothing fires; calibrate proposes one that separates the folders.
    assert (
        add_images(
            concept_server, concept_repository, "stripes", pictures["examples"], "--threshold", "0.95"
        ).returncode
        == 0
    )
    assert not any(r.flagged for r in check(concept_server, pictures["matches"]))
    plot = tmp_path / "stripes.png"
    folders = pictures["matches"][0].parent, pictures["others"][0].parent
    result = concepts(
        "calibrate",
        "--url",
        url(concept_server),
        "--positive",
        folders[0],
        "--negative",
        folders[1],
        "--name",
        "stripes",
        "--plot",
        plot,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "as served now: precision n/a, recall 0.000" in out
    threshold = float(out.split("proposed threshold: ")[1].split()[0])
    assert "precision 1.000" in out and "recall    1.000" in out and "false-positive rate 0.000" in out
    cosines = {
        "pos": [r.custom_cosines["stripes"] for r in check(concept_server, pictures["matches"])],
        "neg": [r.custom_cosines["stripes"] for r in check(concept_server, pictures["others"])],
    }
    assert max(cosines["neg"]) < threshold < min(cosines["pos"])
    from PIL import Image

    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 300

    # Apply the proposal: now exactly the positives fire.
    applied = concepts(
        "set-threshold",
        "--repository",
        concept_repository,
        "--url",
        url(concept_server),
        "--name",
        "stripes",
        "--threshold",
        f"{threshold:.3f}",
    )
    assert applied.returncode == 0, applied.stderr
    assert all(r.flagged for r in check(concept_server, pictures["matches"]))
    assert not any(r.flagged for r in check(concept_server, pictures["others"]))

    target = concepts(
        "calibrate",
        "--url",
        url(concept_server),
        "--positive",
        folders[0],
        "--negative",
        folders[1],
        "--name",
        "stripes",
        "--target-fpr",
        "0",
        "--plot",
        tmp_path / "fpr.png",
    )
    assert target.returncode == 0, target.stderr
    assert "false-positive rate 0.000" in target.stdout and "recall    1.000" in target.stdout


def test_calibrate_refuses_bad_folders_and_names(concept_server, pictures, tmp_path):
    (tmp_path / "empty").mkdir()
    folders = pictures["matches"][0].parent, pictures["others"][0].parent
    result = concepts(
        "calibrate",
        "--url",
        url(concept_server),
        "--positive",
        tmp_path / "empty",
        "--negative",
        folders[1],
        "--plot",
        tmp_path / "x.png",
    )
    assert result.returncode == 1 and "no images" in result.stderr
    result = concepts(
        "calibrate",
        "--url",
        url(concept_server),
        "--positive",
        folders[0],
        "--negative",
        folders[1],
        "--name",
        "nothing-like-this",
        "--plot",
        tmp_path / "x.png",
    )
    assert result.returncode == 1 and "no custom concept named 'nothing-like-this'" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_calibrate_the_builtin_concepts(server, tmp_path):
    """Without --name: a cut on the highest built-in score, proposed as a strictness adjustment."""
    from PIL import Image

    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (64, 64, 3)).astype(np.uint8) for _ in range(12)]
    images += [np.full((64, 64, 3), rng.integers(0, 256, 3), np.uint8) for _ in range(12)]
    with client_for(server) as client:
        results = client.check(images)
    flagged = [r.flagged for r in results]
    assert 0 < sum(flagged) < len(flagged), flagged
    for label in ("pos", "neg"):
        (tmp_path / label).mkdir()
    for i, (image, hit) in enumerate(zip(images, flagged)):
        Image.fromarray(image).save(tmp_path / ("pos" if hit else "neg") / f"{i}.png")
    result = concepts(
        "calibrate",
        "--url",
        server.grpc_url,
        "--positive",
        tmp_path / "pos",
        "--negative",
        tmp_path / "neg",
        "--plot",
        tmp_path / "builtin.png",
    )
    assert result.returncode == 0, result.stderr
    assert "highest built-in concept score" in result.stdout
    assert "precision 1.000" in result.stdout and "recall    1.000" in result.stdout
    cut = float(result.stdout.split("proposed cut on the highest built-in score: ")[1].split()[0])
    scores = [max(r.concept_scores) for r in results]
    assert max(s for s, f in zip(scores, flagged) if not f) <= cut < min(s for s, f in zip(scores, flagged) if f)
    assert f"strictness_adjustment={-cut + 0.0:.3f}" in result.stdout
    assert (tmp_path / "builtin.png").stat().st_size > 1000


# -- reload under load -------------------------------------------------------------
def test_reload_under_concurrent_load(concept_server, concept_repository, pictures):
    """Requests over gRPC and HTTP never stop while the set changes five times; each answer is wholly one set's."""
    path = set_file(concept_repository)
    files = pictures["matches"] + pictures["others"] + pictures["examples"]
    pixels = preprocess([load_image(f) for f in files])
    sets: Dict[int, ConceptSet] = {}
    first = concept_set.read(path)
    sets[first.version] = first
    strictness_choices = [None, "strong", "weak", 0.02]
    answers: List[tuple] = []
    failures: List[str] = []
    stop = threading.Event()
    deadline = time.monotonic() + 240

    def load(worker: int) -> None:
        rng = random.Random(worker)
        protocol = ("grpc", "http")[worker % 2]
        with client_for(concept_server, protocol) as client:
            while not stop.is_set() and time.monotonic() < deadline and len(answers) < 20000:
                index = rng.sample(range(len(pixels)), rng.randint(1, 6))
                strictness = rng.choice(strictness_choices)
                try:
                    answers.append((index, strictness, client.check_batch(pixels[index], strictness)))
                except Exception as error:  # every failure is a test failure
                    failures.append(f"{protocol}: {error}")

    threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        changes = [
            ("add", "--name", "load-a", "--image", *pictures["examples"], "--threshold", "0.5"),
            ("add", "--name", "load-b", "--image", pictures["matches"][0], "--threshold", "0.7"),
            ("set-threshold", "--name", "load-a", "--threshold", "0.6"),
            ("remove", "--name", "load-b"),
            ("remove", "--name", "load-a"),
        ]
        for action, *rest in changes:
            result = concepts(action, "--repository", concept_repository, "--url", url(concept_server), *rest)
            assert result.returncode == 0, result.stderr
            written = concept_set.read(path)
            sets[written.version] = written
            time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:5]
    assert len(sets) == 6
    seen = set()
    for _, _, results in answers:
        versions = {r.concept_set_version for r in results}
        assert len(versions) == 1, versions  # one request, one set
        version = versions.pop()
        seen.add(version)
        served = sets[version]
        for r in results:
            assert list(r.custom_scores) == served.names
            assert r.custom_scores == pytest.approx(expected_custom_scores(r, served), abs=1.001e-3)
            fired = [n for n, s in r.custom_scores.items() if s > 0]
            assert r.fired_concepts == fired and r.flagged == bool(fired)
    assert len(seen) >= 4, f"the load saw only versions {sorted(seen)}"
    assert len(answers) > 50


# -- bad input ---------------------------------------------------------------------
@pytest.fixture
def one_concept(concept_server, concept_repository, pictures):
    """A served set holding "stripes"; yields (file bytes, served version)."""
    assert (
        add_images(concept_server, concept_repository, "stripes", pictures["examples"], "--threshold", "0.5").returncode
        == 0
    )
    return set_file(concept_repository).read_bytes(), served_version(concept_server)


def assert_unchanged(server, repository, snapshot, pictures):
    data, version = snapshot
    assert set_file(repository).read_bytes() == data
    assert served_version(server) == version
    assert all(r.fired_concepts == ["stripes"] for r in check(server, pictures["matches"]))


def test_duplicate_name(concept_server, concept_repository, pictures, one_concept):
    result = add_images(concept_server, concept_repository, "stripes", pictures["matches"])
    assert result.returncode == 1
    assert "a concept named 'stripes' already exists" in result.stderr and "Traceback" not in result.stderr
    assert_unchanged(concept_server, concept_repository, one_concept, pictures)


def test_empty_image_list(concept_server, concept_repository, pictures, one_concept):
    result = concepts("add", "--repository", concept_repository, "--url", url(concept_server), "--name", "nothing")
    assert result.returncode == 1 and "--image FILE" in result.stderr and "--text PHRASE" in result.stderr
    result = concepts(
        "add", "--repository", concept_repository, "--url", url(concept_server), "--name", "nothing", "--image"
    )
    assert result.returncode == 2 and "--image" in result.stderr and "expected at least one argument" in result.stderr
    both = concepts(
        "add",
        "--repository",
        concept_repository,
        "--url",
        url(concept_server),
        "--name",
        "x",
        "--image",
        pictures["matches"][0],
        "--text",
        "stripes",
    )
    assert both.returncode == 1 and "exactly one of the two" in both.stderr
    assert_unchanged(concept_server, concept_repository, one_concept, pictures)


def test_unreadable_image(concept_server, concept_repository, pictures, one_concept, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(pictures["matches"][0].read_bytes()[:200])
    for bad in (corrupt, tmp_path / "missing.png"):
        result = add_images(concept_server, concept_repository, "new", [pictures["matches"][0], bad])
        assert result.returncode == 1
        assert str(bad) in result.stderr and "cannot read image file" in result.stderr
    assert_unchanged(concept_server, concept_repository, one_concept, pictures)


@pytest.mark.parametrize("threshold", ["1.5", "-1.01", "nan", "inf"])
def test_threshold_outside_the_range(concept_server, concept_repository, pictures, one_concept, threshold):
    result = add_images(concept_server, concept_repository, "new", pictures["matches"], "--threshold", threshold)
    assert result.returncode == 1 and "outside [-1, 1]" in result.stderr
    result = concepts(
        "set-threshold",
        "--repository",
        concept_repository,
        "--url",
        url(concept_server),
        "--name",
        "stripes",
        "--threshold",
        threshold,
    )
    assert result.returncode == 1 and "outside [-1, 1]" in result.stderr
    assert_unchanged(concept_server, concept_repository, one_concept, pictures)


def test_hand_edited_invalid_json(concept_server, concept_repository, pictures, one_concept):
    path = set_file(concept_repository)
    text = path.read_text()
    broken = text.replace('"category": "custom",', '"category": "custom"', 1)  # a comma lost by hand
    assert broken != text
    line = next(i for i, row in enumerate(broken.splitlines(), 1) if '"source"' in row)
    mark = log_mark(concept_server)
    path.write_text(broken)
    log = wait_for_log(concept_server, "custom concept set rejected, still serving version", mark)
    assert f"is not valid JSON: line {line} column" in log
    assert "Expecting ',' delimiter" in log
    for action in (("add", "--name", "new", "--image", pictures["matches"][0]), ("remove", "--name", "stripes")):
        result = concepts(action[0], "--repository", concept_repository, "--url", url(concept_server), *action[1:])
        assert result.returncode == 1
        assert f"line {line} column" in result.stderr and "Not modifying it" in result.stderr
    listing = concepts("list", "--repository", concept_repository)
    assert listing.returncode == 1 and "is not valid JSON" in listing.stderr
    assert_unchanged(concept_server, concept_repository, (broken.encode(), one_concept[1]), pictures)

    mark = log_mark(concept_server)
    path.write_text(text)  # put back as it was: the same version, accepted again
    wait_for_log(concept_server, f"is valid again (version {one_concept[1]})", mark)
    assert_unchanged(concept_server, concept_repository, one_concept, pictures)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["concepts"][0].update(threshold=2.0), "threshold 2.0 is outside [-1, 1]"),
        (
            lambda d: d["concepts"][0].update(embedding=d["concepts"][0]["embedding"][:8]),
            "embedding has 8 values, the served image_embeds have 16",
        ),
        (lambda d: d["concepts"].append(dict(d["concepts"][0])), "duplicate concept name 'stripes'"),
        (lambda d: d["concepts"][0].update(embedding=[0.0] * 16), "not L2-normalised"),
        (lambda d: d.update(embedding_dim=8), "embedding_dim 8 does not match the served image_embeds width 16"),
        (lambda d: d["concepts"][0].update(name="concept_03"), "reserved for the built-in concepts"),
        (lambda d: d.update(version=d["version"] - 1), "is not newer than the served version"),
        (lambda d: d["concepts"][0].update(threshold=0.4), "is not newer than the served version"),
    ],
    ids=["threshold", "width", "duplicate", "zero", "dim", "reserved", "older", "same-version"],
)
def test_server_keeps_the_last_valid_set(concept_server, concept_repository, pictures, one_concept, edit, message):
    """A file changed behind the CLI's back: the server logs why and keeps serving the set it had."""
    path = set_file(concept_repository)
    data = json.loads(path.read_text())
    edit(data)
    if "not newer" not in message:
        data["version"] += 1
    mark = log_mark(concept_server)
    path.write_text(json.dumps(data))
    log = wait_for_log(concept_server, message, mark)
    assert f"still serving version {one_concept[1]}" in log
    assert served_version(concept_server) == one_concept[1]
    assert all(r.fired_concepts == ["stripes"] for r in check(concept_server, pictures["matches"]))


def test_server_refuses_to_start_on_an_invalid_set(concept_repository, tmp_path):
    import shutil

    from safety_checker_admin.errors import ServerError
    from safety_checker_admin.server import TritonServer, free_port

    copy = tmp_path / "repository"
    shutil.copytree(concept_repository, copy, ignore=shutil.ignore_patterns(".*"))
    set_file(copy).write_text('{"format_version": 1, "version": 1, "embedding_dim": 16, "concepts": [}')
    with pytest.raises(ServerError, match="custom concept set rejected: .* is not valid JSON: line 1 column"):
        TritonServer(copy, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()).start(60)


def test_the_server_must_serve_the_repository(concept_server, concept_repository, pictures, tmp_path):
    """A concept written to a repository the server at --url does not serve is reported, not silently lost."""
    import shutil

    copy = tmp_path / "repository"
    shutil.copytree(concept_repository, copy, ignore=shutil.ignore_patterns(".*"))
    result = add_images(
        concept_server, copy, "elsewhere", pictures["examples"], "--threshold", "0.5", "--wait-timeout", "2"
    )
    assert result.returncode == 1
    assert "after 2 s the server at" in result.stderr and "still serves version" in result.stderr
    assert "elsewhere" not in [n for r in check(concept_server, pictures["matches"]) for n in r.custom_scores]
