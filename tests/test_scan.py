"""`safety-checker scan` through a real tritonserver: a tree with photos, synthetic images, an unreadable file and
a non-image; the HTML page in headless Chromium; Ctrl-C then --resume; a server killed mid-scan; copy/move."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

from fixtures.photos import photos
from safety_checker_scan.report import read_report

COMMAND = str(Path(sys.executable).parent / "safety-checker")
ANSWER_FIELDS = (
    "flagged",
    "fired_concepts",
    "concept_scores",
    "special_scores",
    "custom_scores",
    "concept_set_version",
    "strictness_adjustment",
    "exact_scores",
)
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def synthetic(rng: np.random.Generator, kind: int, size: int = 224) -> np.ndarray:
    """Noise, a smooth wave or coloured blocks: the kinds of input the tiny checker's thresholds were set on."""
    if kind == 0:
        base = rng.uniform(0, 255, (1, 1, 3))
        image = base + rng.uniform(5, 120) * rng.standard_normal((size, size, 3))
    elif kind == 1:
        grid = np.linspace(-1, 1, size)
        fx, fy = rng.uniform(-3, 3, 2)
        wave = np.sin(fx * grid[None, :] + fy * grid[:, None])[..., None]
        image = rng.uniform(40, 215, (1, 1, 3)) + rng.uniform(20, 100) * wave
    else:
        blocks = -(-size // 32)
        image = np.kron(rng.uniform(0, 255, (blocks, blocks, 3)), np.ones((32, 32, 1)))[:size, :size]
    return np.clip(image, 0, 255).astype(np.uint8)


def write_synthetic(folder: Path, count: int, seed: int, size: int = 224, prefix: str = "s") -> List[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(synthetic(rng, i % 3, size)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Real photographs (PNG and JPEG), synthetic images in nested folders, one unreadable file, one non-image."""
    root = tmp_path_factory.mktemp("scan") / "tree"
    (root / "photos" / "jpeg").mkdir(parents=True)
    for name, pixels in photos().items():
        Image.fromarray(pixels).save(root / "photos" / f"{name}.png")
        Image.fromarray(pixels).save(root / "photos" / "jpeg" / f"{name}.jpg", quality=90)
    write_synthetic(root / "synthetic", 12, seed=5)
    write_synthetic(root / "synthetic" / "nested" / "deeper", 12, seed=6, prefix="n")
    (root / "photos" / "broken.png").write_bytes((root / "photos" / "coffee.png").read_bytes()[:3000])
    (root / "notes.txt").write_text("a text file, not an image\n")
    return root


def files_under(root: Path) -> List[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def scan(*args: str, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([COMMAND, "scan", *args], capture_output=True, text=True, timeout=timeout, input=stdin)


def check(url: str, files: List[str]) -> Dict[str, dict]:
    result = subprocess.run([COMMAND, "check", "--url", url, *files], capture_output=True, text=True, timeout=300)
    return {record["path"]: record for record in map(json.loads, result.stdout.splitlines())}


def inference_count(http_url: str, model: str = "safety_checker") -> int:
    with _HTTP.open(f"http://{http_url}/v2/models/{model}/stats", timeout=10) as response:
        return int(json.load(response)["model_stats"][0]["inference_count"])


def settled_inference_count(http_url: str, model: str = "safety_checker") -> int:
    """The count once it stops moving: Triton counts an ensemble's request after it has sent the answer."""
    last = inference_count(http_url, model)
    for _ in range(40):
        time.sleep(0.25)
        now = inference_count(http_url, model)
        if now == last:
            break
        last = now
    return last


def wait_for_lines(report: Path, count: int, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not report.exists() or report.read_text().count("\n") < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the scan wrote too few lines"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def tree_scan(server, tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("tree-scan")
    report, page = out / "report.jsonl", out / "page.html"
    result = scan(str(tree), "--url", server.grpc_url, "--report", str(report), "--html", str(page))
    return result, read_report(str(report)), page


def test_a_tree_gets_one_line_per_file_and_the_answers_of_check(server, tree, tree_scan):
    result, records, _ = tree_scan
    assert result.returncode == 1, result.stderr  # a file could not be checked
    files = files_under(tree)
    assert sorted(r["path"] for r in records) == files  # exactly one line per file
    by_path = {r["path"]: r for r in records}
    broken = by_path[str(tree / "photos/broken.png")]
    assert "flagged" not in broken and str(tree / "photos/broken.png") in broken["error"]
    notes = by_path[str(tree / "notes.txt")]  # not an image: skipped, not an error
    assert "flagged" not in notes and "error" not in notes and notes["skipped"].startswith("not an image")
    answered = [r for r in records if "flagged" in r]
    assert len(answered) == len(files) - 2 and all(r["error"] is None for r in answered)
    for record in records:
        data = Path(record["path"]).read_bytes()
        assert record["size"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()

    expected = check(server.grpc_url, files)
    for record in answered:
        assert {k: record[k] for k in ANSWER_FIELDS} == {k: expected[record["path"]][k] for k in ANSWER_FIELDS}
    flagged = [r for r in answered if r["flagged"]]
    assert 0 < len(flagged) < len(answered)  # the comparison covers both decisions

    summary = result.stdout
    assert (
        f"scanned {len(files)} files: {len(answered)} images checked, {len(flagged)} flagged, 1 errors, "
        "1 skipped (not images)" in summary
    )
    assert re.search(r"this run: \d+ images checked in [\d.]+ s \([\d.]+ images/s", summary)
    concepts = {}
    for record in flagged:
        for name in record["fired_concepts"]:
            if not name.startswith("special_care_"):  # never flags on its own: not counted
                concepts[name] = concepts.get(name, 0) + 1
    line = next(line for line in summary.splitlines() if line.startswith("flagged per concept: "))
    assert {n: int(c) for n, c in (p.rsplit(" ", 1) for p in line.split(": ", 1)[1].split(", "))} == concepts
    assert "scan: " in summary and "images/s, flagged" in summary  # plain progress lines: stdout is no terminal


def test_csv_over_http_with_uint8_says_the_same(server, tree, tree_scan, tmp_path):
    _, records, _ = tree_scan
    report = tmp_path / "report.csv"
    result = scan(str(tree), "--protocol", "http", "--url", server.http_url, "--uint8", "--report", str(report))
    assert result.returncode == 1
    lines = report.read_text().splitlines()
    assert lines[0] == "path,size,sha256,flagged,fired_concepts,concept_scores,special_scores,custom_scores," + (
        "concept_set_version,strictness_adjustment,exact_scores,view,error,skipped"
    )
    assert len(lines) == len(records) + 1
    assert {r["path"]: r.get("flagged") for r in read_report(str(report))} == {
        r["path"]: r.get("flagged") for r in records
    }


def test_encoded_files_go_to_the_server_as_they_are_and_say_the_same(server, tree, tree_scan, tmp_path):
    """--encoded: each file's bytes to safety_checker_images, decoded there by the same preprocessing."""
    _, records, _ = tree_scan
    report = tmp_path / "report.jsonl"
    result = scan(str(tree), "--url", server.grpc_url, "--encoded", "--report", str(report))
    assert result.returncode == 1  # the unreadable file
    encoded = {r["path"]: r for r in read_report(str(report))}
    assert set(encoded) == {r["path"] for r in records}
    for record in records:
        mine = encoded[record["path"]]
        if record.get("skipped"):
            assert mine["skipped"] == record["skipped"] and "flagged" not in mine
        elif record.get("error"):
            assert mine["error"] and "flagged" not in mine  # refused by the server instead: still an error
        else:
            assert {k: mine[k] for k in ("flagged", "concept_scores", "special_scores", "fired_concepts")} == {
                k: record[k] for k in ("flagged", "concept_scores", "special_scores", "fired_concepts")
            }


def test_globs_stdin_and_fail_on_flagged(server, tree, tree_scan):
    _, records, _ = tree_scan
    flagged = {r["path"]: r["flagged"] for r in records if "flagged" in r}
    clean = [p for p, f in flagged.items() if not f][:3]
    result = scan("-", "--url", server.grpc_url, "--fail-on-flagged", stdin="\n".join(clean) + "\n")
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(line)["path"] for line in result.stdout.splitlines()) == sorted(clean)
    assert "scanned 3 files: 3 images checked, 0 flagged, 0 errors" in result.stderr
    result = scan(str(tree / "photos" / "**" / "*.jpg"), "--url", server.grpc_url, "--fail-on-flagged")
    jpegs = sorted(p for p in flagged if p.endswith(".jpg"))
    assert sorted(json.loads(line)["path"] for line in result.stdout.splitlines()) == jpegs
    assert result.returncode == (3 if any(flagged[p] for p in jpegs) else 0)


def test_copy_and_move_flagged(server, tree, tree_scan, tmp_path):
    import shutil

    _, records, _ = tree_scan
    flagged = {os.path.relpath(r["path"], tree) for r in records if r.get("flagged")}
    images = tmp_path / "images"
    shutil.copytree(tree / "synthetic", images)
    flagged_here = {p[len("synthetic/") :] for p in flagged if p.startswith("synthetic/")}
    assert flagged_here
    copied, moved = tmp_path / "copied", images / "quarantine"  # inside the tree: never scanned itself
    result = scan(str(images), "--url", server.grpc_url, "--copy-flagged", str(copied), "--fail-on-flagged")
    assert result.returncode == 3, result.stderr
    assert {str(p.relative_to(copied)) for p in copied.rglob("*.png")} == flagged_here
    result = scan(str(images), "--url", server.grpc_url, "--move-flagged", str(moved))
    assert result.returncode == 0, result.stderr
    assert {str(p.relative_to(moved)) for p in moved.rglob("*.png")} == flagged_here
    assert not any((images / p).exists() for p in flagged_here)
    for path in flagged_here:
        assert (moved / path).read_bytes() == (tree / "synthetic" / path).read_bytes()
    # Only the unflagged ones are left (the quarantine inside the tree is not scanned).
    result = scan(str(images), "--url", server.grpc_url, "--move-flagged", str(moved), "--fail-on-flagged")
    assert result.returncode == 0 and '"flagged": true' not in result.stdout


def _detail(pixels: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels: what a blur takes away."""
    pixels = pixels.astype(np.float64)
    return float(np.abs(np.diff(pixels, axis=0)).mean() + np.abs(np.diff(pixels, axis=1)).mean())


def test_the_html_page_in_headless_chromium(tree_scan, tmp_path):
    """Self-contained; summary, per-concept counts, histogram; flagged images blurred until a real click."""
    from chromium import BINARY, Chromium

    assert BINARY is not None, "chromium is not installed (apt-get install chromium; .ci/run installs it)"
    _, records, page = tree_scan
    text = page.read_text()
    flagged = [r for r in records if r.get("flagged")]
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)  # nothing to fetch: it opens offline
    thumbnails = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)"', text)
    assert len(thumbnails) == len(flagged)
    # The thumbnail with the most detail shows best whether the blur hides it.
    decoded = [np.asarray(Image.open(io.BytesIO(base64.b64decode(t))).convert("RGB")) for t in thumbnails]
    chosen = max(range(len(decoded)), key=lambda i: _detail(decoded[i]))

    with Chromium(width=1200, height=900) as browser:
        browser.open(page.as_uri())
        assert browser.evaluate("document.querySelectorAll('#grid .thumb img').length") == len(flagged)
        summary = browser.evaluate("document.querySelector('#summary').innerText")
        assert f"{len(flagged)}\nflagged" in summary and "1\nerrors" in summary
        assert "1\nskipped (not images)" in summary
        # The axis labels as the browser lays them out: none overlaps another.
        boxes = browser.evaluate(
            "Array.from(document.querySelectorAll('#histogram text.tick')).map(t => {"
            "const b = t.getBBox(); return [b.x, b.x + b.width]; })"
        )
        assert len(boxes) >= 2
        boxes.sort()
        assert all(left[1] <= right[0] for left, right in zip(boxes, boxes[1:])), boxes
        concepts = browser.evaluate("document.querySelector('#concepts').innerText")
        assert all(name in concepts for r in flagged for name in r["fired_concepts"] if name.startswith("concept_"))
        whole = browser.screenshot(full_page=True)
        Image.fromarray(whole).save(tmp_path / "page.png")
        svg = browser.box("#histogram")
        histogram = browser.screenshot()[
            int(svg["y"]) : int(svg["y"] + svg["height"]), int(svg["x"]) : int(svg["x"] + svg["width"])
        ]
        red = (histogram[..., 0] > 150) & (histogram[..., 1] < 90) & (histogram[..., 2] < 90)
        grey = (abs(histogram[..., 0].astype(int) - 0x78) < 12) & (abs(histogram[..., 2].astype(int) - 0x9C) < 12)
        assert red.sum() > 50 and grey.sum() > 50  # bars on both sides of the threshold

        button = browser.box(f"#thumb-{chosen} button")
        browser.settle()
        before = browser.screenshot()
        browser.click(button["x"] + button["width"] / 2, button["y"] + button["height"] / 2)
        browser.settle()
        after = browser.screenshot()
        assert browser.evaluate(f"document.querySelector('#thumb-{chosen}').classList.contains('revealed')")
        image = browser.box(f"#thumb-{chosen} img", scroll=False)  # revealed: drawn at its own size
        browser.click(button["x"] + button["width"] / 2, button["y"] + button["height"] / 2)
        browser.settle()
        again = browser.screenshot()

    top, left = round(image["y"]), round(image["x"])
    height, width = decoded[chosen].shape[:2]
    crop = lambda shot: shot[top : top + height, left : left + width]
    Image.fromarray(np.concatenate([crop(before), crop(after)], axis=1)).save(tmp_path / "thumbnail.png")
    original = decoded[chosen]
    # Revealed: the thumbnail itself, as decoded by Pillow (JPEG decoders differ by a level or two).
    assert np.abs(crop(after).astype(int) - original).mean() < 6
    # Blurred: most of its detail gone (above the "click to reveal" caption), and a second click blurs it again.
    upper = lambda pixels: pixels[: int(0.7 * len(pixels))]
    assert _detail(upper(crop(before))) < 0.35 * _detail(upper(original))
    assert np.abs(crop(before).astype(int) - crop(after)).mean() > 4
    assert np.abs(crop(again).astype(int) - crop(before)).mean() < 1


def many_images(folder: Path, count: int) -> List[str]:
    return [str(p) for p in write_synthetic(folder, count, seed=11, size=64)]


def test_interrupt_then_resume_checks_every_image_exactly_once(server, tmp_path):
    paths = many_images(tmp_path / "many", 400)
    report = tmp_path / "report.jsonl"
    before = settled_inference_count(server.http_url)
    command = [COMMAND, "scan", str(tmp_path / "many"), "--url", server.grpc_url, "--report", str(report)]
    process = subprocess.Popen(
        [*command, "--concurrency", "2", "--batch-size", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_lines(report, 30, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted" in err and "(interrupted)" in out
    first = read_report(str(report))
    assert 30 <= len(first) < 400 and all("flagged" in r for r in first)

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(first)} already checked in {report}" in resumed.stdout
    records = read_report(str(report))
    assert sorted(r["path"] for r in records) == sorted(paths)  # one line each, across both runs
    assert all("flagged" in r for r in records)
    assert settled_inference_count(server.http_url) - before == 400  # and the server checked each once


def test_a_server_killed_mid_scan_loses_no_image(server, repository, tmp_path):
    from safety_checker_admin.server import TritonServer, free_port

    paths = many_images(tmp_path / "many", 400)
    report = tmp_path / "report.jsonl"
    second = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    second.start()
    try:
        process = subprocess.Popen(
            [COMMAND, "scan", str(tmp_path / "many"), "--url", second.grpc_url, "--url", server.grpc_url]
            + ["--report", str(report), "--concurrency", "4", "--batch-size", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_lines(report, 40, process)
        assert inference_count(second.http_url) > 0  # it was taking its share
        second.kill()  # SIGKILL: requests in flight on it fail
        out, err = process.communicate(timeout=300)
    finally:
        second.stop()
    records = read_report(str(report))
    assert sorted(r["path"] for r in records) == sorted(paths)
    for record in records:
        assert isinstance(record.get("flagged"), bool) or record["error"]
    # The other server was up all along, so every image got its answer there.
    assert process.returncode == 0, err
    assert all("flagged" in r for r in records)


# -- issue 18 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_finding_7_one_file_the_server_fails_on_takes_no_good_file_down(server, tmp_path, protocol):
    """`scan --encoded`, one batch: seven good PNGs and a 1x50,000,000 PNG (97 KB) the server fails on. The
    batch is split until every good file has its answer; the bad one gets an error line, never `flagged`."""
    from image_files import grey_png

    folder = tmp_path / "files"
    good = write_synthetic(folder, 7, seed=18)
    bad = folder / "thin.png"
    bad.write_bytes(grey_png(1, 50_000_000))
    report = tmp_path / "report.jsonl"
    url = server.grpc_url if protocol == "grpc" else server.http_url
    result = scan(str(folder), "--url", url, "--protocol", protocol, "--encoded", "--batch-size", "8",
                  "--report", str(report))  # fmt: skip
    assert result.returncode == 1, result.stderr  # an error line, no flagged image
    records = {r["path"]: r for r in read_report(str(report))}
    assert sorted(records) == sorted(map(str, [*good, bad]))
    for path in good:
        record = records[str(path)]
        assert "flagged" in record and not record.get("error"), record
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert records[str(bad)]["error"] and "flagged" not in records[str(bad)]
    assert "Traceback" not in records[str(bad)]["error"] and ".py" not in records[str(bad)]["error"]
    assert re.search(r"scanned 8 files: 7 images checked, \d+ flagged, 1 errors", result.stdout + result.stderr)


NOT_UTF8 = b"\xff\xfe.png"


@pytest.mark.parametrize("extension", [".jsonl", ".csv"])
def test_finding_10_a_name_that_is_not_utf8_through_scan_html_report_and_resume(server, tmp_path, extension):
    """Files named b"\xff\xfe.png" (an image) and b"\xff\xfe-notes.png" (not one) among others: the HTML page is
    written and shows the names with U+FFFD, the report holds paths that open the files, and --resume reads them
    back and checks no answered file twice."""
    folder = tmp_path / "files"
    (other,) = write_synthetic(folder, 1, seed=10)
    odd, notes = (os.fsencode(folder) + b"/" + name for name in (NOT_UTF8, b"\xff\xfe-notes.png"))
    with open(odd, "wb") as handle:
        handle.write(other.read_bytes())
    with open(notes, "wb") as handle:
        handle.write(b"not an image\n")
    page, report = tmp_path / "page.html", tmp_path / f"report{extension}"
    first = scan(str(folder), "--url", server.grpc_url, "--html", str(page), "--report", str(report))
    assert first.returncode == 1, first.stderr  # the file that is not an image
    assert "scanned 3 files: 2 images checked" in first.stdout + first.stderr
    html = page.read_text(encoding="utf-8")
    assert "\ufffd\ufffd-notes.png</b>" in html and "\udcff" not in html  # its error line names it
    records = read_report(str(report))
    assert sorted(os.fsencode(r["path"]) for r in records) == sorted([odd, notes, os.fsencode(other)])
    assert all(os.path.isfile(r["path"]) for r in records)
    assert sorted(os.fsencode(r["path"]) for r in records if "flagged" in r) == sorted([odd, os.fsencode(other)])
    resumed = scan(str(folder), "--url", server.grpc_url, "--resume", "--report", str(report), "--html", str(page))
    assert resumed.returncode == 1, resumed.stderr
    assert "this run: 0 images checked" in resumed.stdout + resumed.stderr
    answered_paths = [os.fsencode(r["path"]) for r in read_report(str(report)) if "flagged" in r]
    assert sorted(answered_paths) == sorted([odd, os.fsencode(other)])  # nothing answered twice
    assert "\ufffd\ufffd-notes.png</b>" in page.read_text(encoding="utf-8")


# -- issue 21 ---------------------------------------------------------------------------------------------------
def test_one_dead_url_of_two_is_left_at_once_and_said_so(server, tmp_path):
    """A refused connection fails over at once: every image is answered by the live server, and the dead one's
    first failure is on stderr, naming it and where its images go (the waits are counted in test_scan_filters)."""
    from safety_checker_admin.server import free_port

    paths = many_images(tmp_path / "many", 40)
    dead = f"127.0.0.1:{free_port()}"
    report = tmp_path / "report.jsonl"
    result = scan(str(tmp_path / "many"), "--url", dead, "--url", server.grpc_url, "--report", str(report),
                  "--concurrency", "4", "--batch-size", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = read_report(str(report))
    assert sorted(r["path"] for r in records) == sorted(paths) and all("flagged" in r for r in records)
    warnings = [line for line in result.stderr.splitlines() if "no answer from" in line]
    assert warnings and all(line.startswith(f"scan: no answer from {dead}: ") for line in warnings)
    assert f"its images go to {server.grpc_url} at once" in warnings[0]


def test_resume_checks_errors_again_and_leaves_one_line_per_path(server, tmp_path):
    """Issue 21: a first run against nothing (errors, and a README skipped), then --resume against the server:
    each image checked again and answered, one line per path; a last --resume finds nothing to check, and the
    page's images/s card says so instead of 0.0."""
    from safety_checker_admin.server import free_port

    folder = tmp_path / "files"
    paths = many_images(folder, 6)
    (folder / "README.txt").write_text("not an image\n")
    report, page = tmp_path / "report.csv", tmp_path / "page.html"
    first = scan(str(folder), "--url", f"127.0.0.1:{free_port()}", "--report", str(report), "--timeout", "1")
    assert first.returncode == 1 and "6 errors, 1 skipped" in first.stdout, first.stdout
    for run in ("checks the errors again", "finds nothing left"):
        again = scan(str(folder), "--url", server.grpc_url, "--resume", "--report", str(report), "--html", str(page))
        assert again.returncode == 0, again.stderr
        records = read_report(str(report))
        assert sorted(r["path"] for r in records) == sorted([*paths, str(folder / "README.txt")])  # one each
        assert sum("flagged" in r for r in records) == 6 and not any(r.get("error") for r in records)
        assert len(report.read_text().splitlines()) == 8  # the header and a line per file
        html = page.read_text()
        rate = re.search(r"<b>([^<]*)</b>images/s this run", html).group(1)
        if run == "checks the errors again":
            assert "this run: 6 images checked" in again.stdout and float(rate) > 0
        else:
            assert "this run: 0 images checked" in again.stdout and "6 already checked" in again.stdout
            assert rate == "-" and "<b>6</b>resumed: already done" in html


def test_default_options_size_the_window_from_the_answers_and_compute_each_image_once(server, tmp_path):
    """`--concurrency auto`: the window grows from one request as the server answers, each request is sent once and
    nothing is computed twice (the ensemble counts exactly the images the report has)."""
    folder = tmp_path / "many"
    write_synthetic(folder, 120, seed=22)
    report = tmp_path / "report.jsonl"
    before = settled_inference_count(server.http_url)
    result = scan(str(folder), "--url", server.grpc_url, "--report", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    records = read_report(str(report))
    assert len(records) == 120 and all("flagged" in record for record in records)
    assert settled_inference_count(server.http_url) - before == 120
    window = re.search(r"requests in flight \(auto\): (\S+) (\d+) at the end, (\d+) at most", result.stdout)
    assert window is not None, result.stdout
    assert window[1] == server.grpc_url and 1 <= int(window[2]) <= int(window[3]) and int(window[3]) >= 2


def test_a_request_that_times_out_is_cancelled_at_the_server(server, tmp_path):
    """Large files sent as they are, each attempt's timeout far below their decoding time: every image is reported
    not checked, and Triton, told by the gRPC deadline, passes none of them on from the decoder to the embedder."""
    folder = tmp_path / "large"
    folder.mkdir()
    rng = np.random.default_rng(22)
    for i in range(6):
        pixels = rng.integers(0, 256, (3000, 3000, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"large{i}.jpg", quality=90)
    decoded_before = inference_count(server.http_url, "safety_checker_decode")
    embedded_before = inference_count(server.http_url, "safety_checker_embedder")
    result = scan(str(folder), "--url", server.grpc_url, "--encoded", "--timeout", "0.05",
                  "--concurrency", "6", "--batch-size", "1")  # fmt: skip
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 6 and all("flagged" not in line and "not checked" in line["error"] for line in lines)
    # The decoder finishes what it had started (its count settles); those answers must go nowhere.
    assert settled_inference_count(server.http_url, "safety_checker_decode") - decoded_before <= 6
    assert inference_count(server.http_url, "safety_checker_embedder") == embedded_before
