"""Issue 21, scan without a server: --include/--exclude, files that are not images skipped, failing over at once
from a refused connection (on an injected clock), one line per path after --resume, the HTML page's axis labels
and its images/s card."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
from fake_tritonclient import FakeClock
from PIL import Image
from test_scan_units import FakeServer, fake_items, run_fake, save

from safety_checker_scan.files import Filters, Item, expand
from safety_checker_scan.html_report import histogram_svg, render
from safety_checker_scan.report import ReportWriter, newest, read_report
from safety_checker_scan.scanner import Scanner, ScanOptions
from safety_checker_scan.sniff import not_an_image
from safety_checker_scan.tally import ScanResult, Tally, summary_lines

COMMAND = str(Path(sys.executable).parent / "safety-checker")


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def mixed(tmp_path):
    """Images and other files at several depths, and a folder of thumbnails."""
    root = tmp_path / "mixed"
    for relative in ("a.png", "raw/b.png", "raw/deep/c.jpg", "thumbs/t.png", "raw/thumbs/u.png"):
        save(root / relative, 1)
    (root / "README.txt").write_text("read me\n")
    (root / "raw" / "notes.md").write_text("# notes\n")
    return root


def listed(root: Path, *operands: str, include=(), exclude=()) -> List[str]:
    filters = Filters(include, exclude)
    return [str(Path(item.path).relative_to(root)) for item in expand(list(operands), filters=filters)]


def test_include_and_exclude_match_the_path_below_the_scanned_folder(mixed):
    root = str(mixed)
    everything = listed(mixed, root)
    assert everything == [
        "README.txt",
        "a.png",
        "raw/b.png",
        "raw/notes.md",
        "raw/deep/c.jpg",
        "raw/thumbs/u.png",
        "thumbs/t.png",
    ]
    # Without '/': the name, at any depth; with '/': the whole relative path, '**' crossing folders.
    assert listed(mixed, root, include=["*.png"]) == ["a.png", "raw/b.png", "raw/thumbs/u.png", "thumbs/t.png"]
    assert listed(mixed, root, include=["raw/*"]) == ["raw/b.png", "raw/notes.md"]
    assert listed(mixed, root, include=["raw/**/*.png"]) == ["raw/b.png", "raw/thumbs/u.png"]
    assert listed(mixed, root, include=["*.png", "*.jpg"], exclude=["thumbs"]) == ["a.png", "raw/b.png",
                                                                                    "raw/deep/c.jpg"]  # fmt: skip
    assert listed(mixed, root, exclude=["*.[mt][dx]*"]) == [p for p in everything if p[-3:] not in (".md", "txt")]
    assert listed(mixed, root, include=["*.PNG"]) == []  # case counts
    assert listed(mixed, root, exclude=["/thumbs/"]) == [p for p in everything if p != "thumbs/t.png"]  # anchored
    # A glob operand: below its leading folders; a file named itself: by its name.
    assert listed(mixed, f"{root}/raw/**", exclude=["thumbs/*"]) == ["raw/b.png", "raw/notes.md", "raw/deep/c.jpg"]
    assert listed(mixed, f"{root}/*", exclude=["raw"]) == ["README.txt", "a.png", "thumbs/t.png"]
    assert listed(mixed, f"{root}/README.txt", f"{root}/a.png", exclude=["*.txt"]) == ["a.png"]


def test_filters_count_what_they_leave_out_and_prune_excluded_folders(mixed):
    filters = Filters(include=["*.png"], exclude=["thumbs"])
    paths = [item.path for item in expand([str(mixed)], filters=filters)]
    assert len(paths) == 2  # a.png, raw/b.png
    assert filters.folders == 2  # thumbs and raw/thumbs: not walked, their files not counted
    assert filters.files == 3  # README.txt, raw/notes.md, raw/deep/c.jpg
    result = ScanResult(Tally(), seconds=1.0, this_run=2, excluded_files=3, excluded_folders=2)
    assert "excluded by --include/--exclude: 3 files and 2 folders (not walked)" in summary_lines(Tally(), result)


@pytest.mark.parametrize(
    "name, data, image",
    [
        ("README.txt", b"read me\n", False),
        ("data.bin", bytes(range(256)) * 4, False),
        ("empty.txt", b"", False),
        ("report.pdf", b"%PDF-1.4\n", False),
        ("photo.png", b"not an image\n", True),  # its name says image: an error, never a skip
        ("empty.png", b"", True),
        ("notes.txt", None, True),  # a PNG named .txt
        ("cut.dat", b"\x89PNG\r\n\x1a\n\x00\x00", True),  # a PNG's signature only: a damaged image
        ("drawing.xml", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', True),
        ("phone.bin", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", True),
        ("anim.riff", b"RIFF\x00\x00\x00\x00WEBPVP8 ", True),
        ("sound.wav", b"RIFF\x00\x00\x00\x00WAVEfmt ", False),
    ],
)
def test_not_an_image_only_when_neither_content_nor_name_says_image(name, data, image):
    data = png_bytes() if data is None else data
    assert (not_an_image(data, name) is None) is image


def write_files(folder: Path, names: List[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(f"{name}\n")


def scan_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([COMMAND, "scan", *args], capture_output=True, text=True, timeout=120)


def test_files_that_are_not_images_are_skipped_not_errors_unless_asked(tmp_path):
    from safety_checker_admin.server import free_port

    write_files(tmp_path / "docs", ["README.txt", "LICENSE", "notes.md"])
    url = f"127.0.0.1:{free_port()}"  # nothing listens: no request is sent for a file that is not an image
    report = tmp_path / "report.csv"
    result = scan_command(str(tmp_path / "docs"), "--url", url, "--report", str(report))
    assert result.returncode == 0, result.stderr
    assert "scanned 3 files: 0 images checked, 0 flagged, 0 errors, 3 skipped (not images)" in result.stdout
    records = read_report(str(report))
    assert len(records) == 3 and all(r["skipped"] and "flagged" not in r and not r["error"] for r in records)
    assert report.read_text().splitlines()[0].endswith(",error,skipped")
    asked = scan_command(str(tmp_path / "docs"), "--url", url, "--non-images", "error")
    assert asked.returncode == 1
    lines = [json.loads(line) for line in asked.stdout.splitlines()]
    assert len(lines) == 3 and all("not an image" in r["error"] and "skipped" not in r for r in lines)
    assert "0 errors" not in asked.stderr and "3 errors" in asked.stderr


def test_skipped_lines_through_the_scanner_are_counted_apart():
    items = fake_items(4) + [Item("README.txt", size=3, sha256="00" * 32, skipped="not an image: text")]
    result, records, _ = run_fake(items, {"a:1": FakeServer("a:1")}, concurrency=2, batch_size=2)
    assert result.tally.checked == 4 and result.tally.skipped == 1 and result.tally.errors == 0
    (skipped,) = [r for r in records if r["path"] == "README.txt"]
    assert skipped == {"path": "README.txt", "size": 3, "sha256": "00" * 32, "skipped": "not an image: text"}


def test_a_refused_connection_fails_over_at_once_and_the_live_server_gets_all_the_work():
    """Issue 21: one dead URL of two cost 30 s. On the injected clock: no wait at all; the dead server is tried
    by at most the requests already in flight when it first refused, then rests while the live one answers."""
    clock = FakeClock()
    servers = {"dead:1": FakeServer("dead:1", fail=True), "live:1": FakeServer("live:1")}
    result, records, warnings = run_fake(fake_items(64), servers, clock=clock, concurrency=4, batch_size=4)
    assert clock.sleeps == [] and clock.now == 0.0  # nothing waited on
    assert len(records) == 64 and all("flagged" in r for r in records)
    assert sorted(servers["live:1"].seen) == list(range(64))
    assert servers["live:1"].requests == 16  # each batch answered there once
    assert 1 <= servers["dead:1"].requests <= 4  # at most one per request in flight
    (warning,) = warnings  # its first failure, once, naming it and where its images go
    assert warning.startswith("scan: no answer from dead:1: ") and "its images go to live:1 at once" in warning
    assert "refused" in warning


def test_the_scan_client_sends_each_request_once_so_the_pool_can_fail_over():
    scanner = Scanner(ScanOptions(urls=["127.0.0.1:1"]), ReportWriter(io.StringIO(), ".jsonl", False, False))
    client = scanner._client("127.0.0.1:1")  # gRPC connects lazily: nothing is sent here
    try:
        assert client.deadline_s == 0 and scanner.servers.retry_s == 30.0
    finally:
        client.close()


def test_resume_keeps_the_newest_record_of_each_path(tmp_path):
    report = tmp_path / "report.jsonl"
    lines = [
        {"path": "a.png", "error": "not checked"},
        {"path": "b.png", "flagged": False, "error": None},
        {"path": "a.png", "flagged": True, "error": None},
        {"path": "c.png", "error": "no server answered"},
    ]
    report.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"path": "d.png", "fl')
    kept = newest(read_report(str(report)), str)
    assert list(kept) == ["a.png", "b.png", "c.png"] and kept["a.png"]["flagged"] is True
    del kept["c.png"]  # to be checked again: its new line is appended
    writer = ReportWriter.open(str(report), keep=kept.values())
    writer.write({"path": "c.png", "flagged": False, "error": None})
    writer.close()
    assert [(r["path"], r["flagged"]) for r in read_report(str(report))] == [
        ("a.png", True),
        ("b.png", False),
        ("c.png", False),
    ]


TICK = re.compile(r'<text class="tick" x="([\d.]+)"[^>]*>([^<]+)</text>')


@pytest.mark.parametrize(
    "scores",
    [
        [-0.3, -0.2, 0.05, 0.4],  # 0 well inside
        [-0.011, 0.2, 0.5, 0.9],  # 0 near the left end
        [-0.9, -0.5, 0.001],  # 0 near the right end
        [-0.0001, 0.0001],  # the narrowest range
        [float("nan")],  # nothing answered
    ],
)
def test_histogram_axis_labels_are_a_label_width_apart(scores):
    svg = histogram_svg(scores)
    ticks = [(float(x), text) for x, text in TICK.findall(svg)]
    assert len(ticks) >= 2  # the range's ends are always labelled
    width = lambda text: len(text) * 11 * 0.6  # an 11 px sans-serif digit is under 0.6 em wide
    for i, (x, text) in enumerate(ticks):
        assert width(text) / 2 <= x <= 720 - width(text) / 2  # inside the SVG
        for other, them in ticks[i + 1 :]:
            assert abs(x - other) >= max(width(text), width(them)), (ticks, "labels overlap")
    threshold = re.search(r'<text x="([\d.]+)" y="22"[^>]*?( text-anchor="end")?>threshold', svg)
    assert threshold is not None
    if not threshold.group(2):  # drawn rightwards from the line: it must fit
        assert float(threshold.group(1)) + len("threshold (score > 0 flags)") * 11 * 0.6 <= 720


def card(page: str, label: str) -> str:
    match = re.search(r'<div class="card[^"]*"><b>([^<]*)</b>' + re.escape(label) + "</div>", page)
    assert match, f"no card {label!r}"
    return match.group(1)


def page_of(result: ScanResult, tally: Tally) -> str:
    return render(tally, result, urls=["a:1"], mode="uint8", strictness=None, report="r.jsonl")


def test_images_per_s_card_is_this_runs_rate_on_the_injected_clock_and_never_0_after_resume():
    clock = FakeClock()
    server = FakeServer("a:1")
    answer = server.answer

    def slow_answer(batch: np.ndarray, names, kwargs):  # each request takes 2 s of the injected clock
        clock.now += 2.0
        return answer(batch, names, kwargs)

    server.answer = slow_answer
    result, records, _ = run_fake(fake_items(6), {"a:1": server}, clock=clock, concurrency=1, batch_size=3)
    assert result.this_run == 6 and result.seconds == 4.0
    result.already_done = 10
    page = page_of(result, result.tally)
    assert card(page, "images/s this run") == "1.500"  # 6 images in 4 s, not 16 in 4 s
    assert card(page, "resumed: already done") == "10"
    # A resume that found nothing left to check: no rate, and not 0.0.
    done = ScanResult(Tally(checked=10), seconds=0.4, this_run=0, already_done=10)
    page = page_of(done, done.tally)
    assert card(page, "images/s this run") == "-" and card(page, "resumed: already done") == "10"
    assert ">0.0<" not in page
    assert "(- images/s" in summary_lines(done.tally, done)[1]
