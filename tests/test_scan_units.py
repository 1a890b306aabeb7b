"""`safety-checker scan` without a server: the walk, the report formats, resume, and the scheduling against fake
clients (round-robin, a failing server, a refused batch, an interrupted scan, failing closed)."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
from fake_tritonclient import FakeClock, FakeTriton, UpperBound, answers, numbers, refusal
from PIL import Image

from safety_checker_client import spec
from safety_checker_client.client import RECORD_OUTPUTS, CheckResult, SafetyCheckerClient
from safety_checker_client.records import answered, record
from safety_checker_scan import cli as scan_cli
from safety_checker_scan.files import Item, expand, path_key, prepare
from safety_checker_scan.html_report import histogram
from safety_checker_scan.progress import Progress
from safety_checker_scan.report import REPORT_FIELDS, ReportWriter, read_report
from safety_checker_scan.scanner import Scanner, ScanOptions
from safety_checker_scan.servers import COOLDOWN_S, MAX_COOLDOWN_S, RETRY_S, Servers, check_items

COMMAND = str(Path(sys.executable).parent / "safety-checker")


def save(path: Path, seed: int, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    files = [save(root / "a.png", 1), save(root / "sub" / "b.jpg", 2), save(root / "sub" / "deeper" / "c.png", 3)]
    (root / "notes.txt").write_text("not an image\n")
    return root, files


class FakeServer:
    """Answers like the ensemble: flags an image whose number (first pixel, or a file's text) is even; refuses a
    batch holding `refuse_value`, naming it; fails every request when `fail`. Records what it saw."""

    def __init__(
        self,
        url: str,
        fail: bool = False,
        refuse_value: int = -1,
        stop: Optional[threading.Event] = None,
        stop_after: int = 0,
    ) -> None:
        self.url = url
        self.fail = fail
        self.refuse_value = refuse_value
        self.stop, self.stop_after = stop, stop_after  # sets `stop` as its request number `stop_after` arrives
        self.seen: List[int] = []
        self.sent: List[object] = []  # every element of every request, as sent
        self.outputs: List[List[str]] = []
        self.requests = 0
        self.lock = threading.Lock()

    def answer(self, batch: np.ndarray, names: List[str], kwargs: dict):
        with self.lock:
            self.requests += 1
            self.outputs.append(names)
            self.sent.extend(batch.reshape(-1) if batch.dtype == object else [])
            if self.stop is not None and self.requests == self.stop_after:
                self.stop.set()
        if self.fail:
            raise ConnectionRefusedError(111, "connection refused")
        firsts = numbers(batch)
        if self.refuse_value in firsts:
            raise refusal(firsts.index(self.refuse_value))
        with self.lock:
            self.seen.extend(firsts)
        return answers([first % 2 == 0 for first in firsts], names)

    def client(self, url: str, mode: str) -> SafetyCheckerClient:
        """The real client, each request sent once (no retries: the scan's failover is under test)."""
        return SafetyCheckerClient(
            url,
            uint8=mode == "uint8",
            encoded=mode == "encoded",
            deadline_s=0,
            outputs=RECORD_OUTPUTS,
            triton=FakeTriton(self.answer),
        )


def fake_items(count: int, start: int = 0, mode: str = "uint8") -> List[Item]:
    """Items already prepared: each stands for its number, which the fake server reads (first pixel, or text)."""
    items = []
    for number in range(start, start + count):
        if mode == "encoded":
            data = str(number % 256).encode()
        else:
            data = np.full((224, 224, 3), number % 256, dtype=np.uint8)
        items.append(Item(f"image-{number}.png", size=number, sha256=f"{number:064x}", data=data))
    return items


def run_fake(items, servers: Dict[str, FakeServer], stop=None, mode="uint8", clock=None, **options):
    out = io.StringIO()
    writer = ReportWriter(out, ".jsonl", header=False, owned=False)
    settings = ScanOptions(urls=list(servers), mode=mode, workers=2, **options)
    warnings: List[str] = []
    clock = clock or FakeClock()  # moves only when slept on: a server that failed rests until the scan waits
    scanner = Scanner(
        settings,
        writer,
        make_client=lambda url: servers[url].client(url, mode),
        stop=stop,
        warn=warnings.append,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        prepare=lambda item, mode: item,  # the items are prepared already
    )
    result = scanner.run(items)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    return result, records, warnings


def test_every_item_gets_exactly_one_line_round_robin_over_servers():
    servers = {url: FakeServer(url) for url in ("a:1", "b:1", "c:1")}
    result, records, _ = run_fake(fake_items(100), servers, concurrency=4, batch_size=3)
    assert sorted(r["path"] for r in records) == sorted(f"image-{n}.png" for n in range(100))
    assert all(r["flagged"] == (int(r["path"][6:-4]) % 2 == 0) for r in records)
    assert result.tally.checked == 100 and result.tally.flagged == 50 and result.tally.errors == 0
    assert result.tally.per_concept == {"concept_00": 50}
    assert all(server.requests >= 8 for server in servers.values())  # 34 requests shared round-robin
    assert sorted(n for s in servers.values() for n in s.seen) == list(range(100))
    # Only what the report shows is requested: not the embeddings, not the raw cosines (nor `view`, which only the
    # images ensemble answers).
    pixel_outputs = [name for name in RECORD_OUTPUTS if name != spec.VIEW.name]
    assert all(names == pixel_outputs for s in servers.values() for names in s.outputs)


def test_a_failing_server_loses_nothing_its_images_go_to_another():
    servers = {"up:1": FakeServer("up:1"), "down:1": FakeServer("down:1", fail=True)}
    result, records, _ = run_fake(fake_items(60), servers, concurrency=4, batch_size=4)
    assert len(records) == 60 and all("flagged" in r for r in records)
    assert sorted(servers["up:1"].seen) == list(range(60))
    # Resting after a failure (on a clock that does not move: for the whole scan): only the requests already
    # headed for it when it first failed, at most one per request in flight, of the 15.
    assert 1 <= servers["down:1"].requests <= 4


def resting(servers: Servers, url: str) -> bool:
    """Whether `url` comes last in both turns of a two-server round-robin."""
    return all(servers.order()[-1] == url for _ in range(2))


def test_a_server_rests_after_a_failure_doubling_up_to_the_maximum_on_the_injected_clock():
    now = [0.0]
    servers = Servers(["a:1", "b:1"], make_client=lambda url: None, monotonic=lambda: now[0])
    assert [servers.order()[0] for _ in range(4)] == ["a:1", "b:1", "a:1", "b:1"]  # round-robin

    def rest_after_a_failure() -> float:
        servers.failed("a:1", "connection refused")
        start = now[0]
        while resting(servers, "a:1"):
            now[0] += 0.5
        return now[0] - start

    rests = [rest_after_a_failure() for _ in range(6)]
    assert rests == [COOLDOWN_S, 2 * COOLDOWN_S, 4 * COOLDOWN_S, 8 * COOLDOWN_S, MAX_COOLDOWN_S, MAX_COOLDOWN_S]
    assert servers.failures == {"a:1": 6, "b:1": 0}
    servers.answered("a:1")  # an answer ends the doubling
    assert rest_after_a_failure() == COOLDOWN_S


def test_no_server_answers_means_error_lines_never_flagged():
    servers = {url: FakeServer(url, fail=True) for url in ("a:1", "b:1")}
    result, records, warnings = run_fake(fake_items(10), servers, concurrency=2, batch_size=4)
    assert len(records) == 10
    for record_ in records:
        assert "flagged" not in record_
        assert record_["error"].startswith("no server answered") and "a:1" in record_["error"]
        assert "b:1" in record_["error"] and "tries in" in record_["error"]
        assert record_["size"] is not None and record_["sha256"]
    assert result.tally.errors == 10 and result.tally.checked == 0
    # Each server's first failure is reported once, naming it and what happens next.
    assert sorted(w.split()[4] for w in warnings) == ["a:1:", "b:1:"]
    assert all("its images go to" in w for w in warnings)


def test_every_server_tried_each_round_with_the_clients_waits_until_the_retry_time():
    """No server answers: each round tries every server once, then waits as the client's retries do (0.25 s,
    doubling, at most 5 s: the top of each draw here) until the next wait would pass RETRY_S."""
    clock = FakeClock()
    fakes = {url: FakeServer(url, fail=True) for url in ("a:1", "b:1")}
    servers = Servers(list(fakes), lambda url: fakes[url].client(url, "uint8"), clock.monotonic, clock.sleep,
                      rng=UpperBound())  # fmt: skip
    outcomes = check_items(servers, fake_items(3), "uint8", None)
    assert clock.sleeps == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]  # 27.75 s; a 5 s more would pass 30
    assert sum(clock.sleeps) < RETRY_S <= sum(clock.sleeps) + 5.0
    assert fakes["a:1"].requests == fakes["b:1"].requests == 10
    assert all(error.endswith("(not checked: 20 tries in 27.8 s)") for _, _, error in outcomes)
    assert [answer for _, answer, _ in outcomes] == [None] * 3


def test_a_refused_batch_is_split_so_one_bad_image_takes_no_other_down():
    servers = {"a:1": FakeServer("a:1", refuse_value=7)}
    result, records, _ = run_fake(fake_items(16), servers, concurrency=2, batch_size=8)
    by_path = {r["path"]: r for r in records}
    assert len(by_path) == 16
    assert "flagged" not in by_path["image-7.png"] and "invalid" in by_path["image-7.png"]["error"]
    assert by_path["image-7.png"]["error"].startswith("image-7.png: ")  # a refused file is named
    assert all("flagged" in r for p, r in by_path.items() if p != "image-7.png")
    # Two batches of 8, and the refused one sent again once without image 7.
    assert servers["a:1"].requests == 3


def test_encoded_sends_the_bytes_prepare_read_and_splits_a_refused_batch():
    servers = {"a:1": FakeServer("a:1", refuse_value=3), "b:1": FakeServer("b:1", refuse_value=3)}
    items = fake_items(20, mode="encoded")
    sent = {item.path: item.data for item in items}
    result, records, _ = run_fake(items, servers, mode="encoded", concurrency=2, batch_size=5)
    by_path = {r["path"]: r for r in records}
    assert len(by_path) == 20 and "flagged" not in by_path["image-3.png"]
    assert sum("flagged" in r for r in records) == 19
    assert sorted(n for s in servers.values() for n in s.seen) == [n for n in range(20) if n != 3]
    assert sum(s.requests for s in servers.values()) == 5  # four batches, one sent again without image 3
    on_the_wire = [element for s in servers.values() for element in s.sent]
    assert set(on_the_wire) == set(sent.values())  # exactly the bytes read, not the files read again


def test_stop_writes_the_answers_in_flight_and_sends_nothing_more():
    stop = threading.Event()
    servers = {"a:1": FakeServer("a:1", stop=stop, stop_after=5)}
    items = fake_items(400)
    result, records, warnings = run_fake(items, servers, stop=stop, concurrency=3, batch_size=2)
    assert result.interrupted and "interrupted" in warnings[0]
    assert 0 < len(records) < 400
    # Every image the server saw has its line; no line without the server having seen it.
    assert sorted(int(r["path"][6:-4]) for r in records) == sorted(servers["a:1"].seen)
    assert all("flagged" in r for r in records)


def test_expand_walks_folders_globs_and_stdin_each_file_once(tree, tmp_path, monkeypatch):
    root, files = tree
    monkeypatch.chdir(tmp_path)
    listed = [item.path for item in expand(["tree"])]
    assert listed == ["tree/a.png", "tree/notes.txt", "tree/sub/b.jpg", "tree/sub/deeper/c.png"]
    globbed = [item.path for item in expand(["tree/**/*.png", "tree/a.png"])]
    assert globbed == ["tree/a.png", "tree/sub/deeper/c.png"]
    stdin = io.StringIO("tree/sub/b.jpg\n\ntree/sub\n")
    assert [i.path for i in expand(["-"], stdin)] == ["tree/sub/b.jpg", "tree/sub/deeper/c.png"]
    missing = list(expand(["nothing-*.png", "no-such-file.png"]))
    assert missing[0].error == "no file matches 'nothing-*.png'" and missing[1].error is None
    skipped = [i.path for i in expand(["tree"], skip={path_key("tree/sub")})]
    assert skipped == ["tree/a.png", "tree/notes.txt"]


def test_prepare_reads_hashes_and_fails_closed(tree, tmp_path):
    import hashlib

    root, files = tree
    item = prepare(Item(str(files[0])), "float")
    assert item.error is None and item.data.shape == (3, 224, 224) and item.data.dtype == np.float32
    assert item.sha256 == hashlib.sha256(files[0].read_bytes()).hexdigest() and item.size == files[0].stat().st_size
    assert prepare(Item(str(files[0])), "uint8").data.shape == (224, 224, 3)
    encoded = prepare(Item(str(files[0])), "encoded")
    # --encoded keeps the very bytes it hashed, to send them: the file is read once.
    assert encoded.data == files[0].read_bytes() and encoded.error is None and encoded.sha256 == item.sha256
    text = prepare(Item(str(root / "notes.txt")), "float")
    assert text.skipped.startswith("not an image") and text.error is None and text.size == 13 and text.sha256
    asked = prepare(Item(str(root / "notes.txt")), "float", non_images="error")
    assert asked.skipped is None and "not an image" in asked.error and "notes.txt" in asked.error
    (root / "renamed.png").write_text("not an image\n")  # its name says image: an image that cannot be read
    renamed = prepare(Item(str(root / "renamed.png")), "encoded")
    assert renamed.skipped is None and renamed.data is not None  # sent: the server refuses it (an error line)
    renamed = prepare(Item(str(root / "renamed.png")), "float")
    assert renamed.skipped is None and "not an image file" in renamed.error and "BytesIO" not in renamed.error
    assert "no such file" in prepare(Item(str(tmp_path / "gone.png")), "float").error
    assert "not a regular file" in prepare(Item(str(root / "sub")), "float").error


@pytest.mark.parametrize("extension", [".jsonl", ".csv"])
def test_report_round_trip_and_a_partial_last_line(tmp_path, extension):
    path = tmp_path / f"report{extension}"
    writer = ReportWriter.open(str(path))
    answer = CheckResult(
        flagged=True,
        concept_scores=[0.004] + [-0.2] * 16,
        special_scores=[-0.1, 0.002, -0.3],
        image_embeds=np.zeros(4),
        custom_scores={"stripes": -0.5},
        fired_concepts=["concept_00", "special_care_1"],
        concept_set_version=3,
        strictness_adjustment=0.01,
        exact_scores=False,
        view={"frame": 1, "frames": 2, "transparency": None, "views": 2},
    )
    good = record("a.png", answer, size=10, sha256="ab" * 32)
    bad = record("b.png", error="cannot read 'b.png'", size=None, sha256=None)
    writer.write(good)
    writer.write(bad)
    writer.close()
    assert list(good) == list(REPORT_FIELDS[:-1]) and REPORT_FIELDS[-1] == "skipped" and "flagged" not in bad
    records = read_report(str(path))
    assert records[0] == good
    assert records[1]["error"] == bad["error"] and "flagged" not in records[1]
    assert [answered(r) for r in records] == [True, False]
    with path.open("a") as handle:
        handle.write('{"path": "c.png", "flag' if extension == ".jsonl" else "c.png,12,")
    assert len(read_report(str(path))) == 2
    # --resume rewrites the report with the records it keeps (the partial line is gone), then appends.
    writer = ReportWriter.open(str(path), keep=read_report(str(path))[:1])
    writer.write(bad)
    writer.close()
    assert [r["path"] for r in read_report(str(path))] == ["a.png", "b.png"]
    assert path.read_text().count("path") == (1 if extension == ".csv" else 2)  # one header


def test_histogram_puts_zero_on_an_edge_and_zero_scores_left_of_it():
    edges, counts = histogram([-0.3, -0.1, 0.0, 0.0005, 0.02, 0.001])
    zero = min(range(len(edges)), key=lambda i: abs(edges[i]))
    assert abs(edges[zero]) < 1e-12
    assert sum(counts[:zero]) == 3 and sum(counts[zero:]) == 3 and sum(counts) == 6


def test_progress_bar_on_a_terminal_plain_lines_otherwise():
    now = [100.0]
    out = io.StringIO()
    plain = Progress(out, total=10, tty=False, every_s=0, monotonic=lambda: now[0])
    now[0] += 2.0
    plain.update(done=4, flagged=1, errors=1)
    plain.show()
    assert out.getvalue() == "scan: 4/10 images (40%), 2.0 images/s, flagged 1, errors 1, ETA 0:03\n"
    out = io.StringIO()
    bar = Progress(out, total=10, tty=True, monotonic=lambda: now[0], columns=200)
    now[0] += 5.0
    bar.update(done=10)
    bar.close()
    assert out.getvalue() == (
        "\rscan 100% [########################] 10/10 images, 2.0 images/s, flagged 0, errors 0, ETA 0:00\x1b[K\n"
    )
    narrow = io.StringIO()
    cut = Progress(narrow, total=10, tty=True, monotonic=lambda: now[0], columns=30)
    cut.show(force=True)
    assert narrow.getvalue() == "\r" + cut.text()[:29] + "\x1b[K"


def scan_command(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([COMMAND, "scan", *args], capture_output=True, text=True, timeout=120, input=stdin)


def test_help_states_the_exit_statuses():
    result = scan_command("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for expected in (
        "0 every image was checked",
        "1 any error",
        "3 with --fail-on-flagged",
        "--uint8 | --encoded",
        "--copy-flagged DIR | --move-flagged DIR",
    ):
        assert expected in text, expected


@pytest.mark.parametrize(
    "args, message",
    [
        (["--uint8", "--encoded"], "not allowed with argument"),
        (["--copy-flagged", "a", "--move-flagged", "b"], "not allowed with argument"),
        (["--resume"], "--resume needs --report"),
        (["--report", "r.txt"], "must end in .jsonl or .csv"),
        (["--strictness", "0.5"], "must be a number in [-0.1, 0.1]"),
        (["--strictness", "paranoid"], "unknown preset"),
        (["--concurrency", "0"], "must be at least 1"),
        (["--url", "ftp://127.0.0.1:8001"], "--url: url 'ftp://127.0.0.1:8001'"),
        (["--url", "127.0.0.1:8001/v2"], "--url: url '127.0.0.1:8001/v2'"),
        (["--non-images", "keep"], "invalid choice"),
    ],
)
def test_wrong_arguments_exit_2(args, message, tmp_path):
    result = scan_command(str(tmp_path), *args)
    assert result.returncode == 2 and message in result.stderr


def test_unreachable_server_fails_closed_says_so_at_once_and_resume_keeps_one_line_per_file(tree, tmp_path):
    """Issue 21: nothing listening: error lines (never "flagged"), the first failure on stderr naming the address
    and what happens next, the text file skipped; --resume checks the errors again and leaves one line per file."""
    from safety_checker_admin.server import free_port

    root, files = tree
    report = tmp_path / "report.jsonl"
    url = f"http://127.0.0.1:{free_port()}/"  # the scheme and the slash are dropped, not a traceback
    for run in ("first", "resumed"):
        extra = ["--resume"] if run == "resumed" else []
        result = scan_command(str(root), "--url", url, "--report", str(report), "--timeout", "1", *extra)
        assert result.returncode == 1, result.stderr
        records = read_report(str(report))
        assert sorted(r["path"] for r in records) == sorted(map(str, [*files, root / "notes.txt"]))  # one each
        assert all("flagged" not in r for r in records)
        assert sorted(bool(r.get("error")) for r in records) == [False, True, True, True]
        assert next(r for r in records if not r.get("error"))["skipped"].startswith("not an image")
        assert "scanned 4 files: 0 images checked, 0 flagged, 3 errors, 1 skipped (not images)" in result.stdout
        # The first failure of the server, once, naming it and what happens next (checked again on resume).
        (warning,) = [line for line in result.stderr.splitlines() if "no answer from" in line]
        assert warning.startswith(f"scan: no answer from {url}: ") and "then reported as not checked" in warning
        assert "Traceback" not in result.stderr


def test_usage_error_helper_accepts_good_arguments():
    args = argparse.Namespace(resume=True, report="r.csv", strictness="strong", timeout=10.0, urls=["http://a:1/"])
    assert scan_cli._usage_error(args) is None


def test_finding_3_encoded_reports_the_hash_of_the_bytes_it_sent_though_the_file_was_replaced(tmp_path):
    """Issue 18, finding 3: `scan --encoded` sends exactly the bytes it hashed. Each file is replaced right after it
    was read and hashed; the server must get the bytes read (not the file read again), so the report's sha256 and
    verdict are both of those bytes."""
    import hashlib

    paths = []
    for number in range(6):
        path = tmp_path / f"image-{number}.png"
        path.write_bytes(str(number * 2).encode())  # even: flagged by the fake server
        paths.append(path)
    server = FakeServer("a:1")

    def prepare_then_replace(item: Item, mode: str) -> Item:
        prepared = prepare(item, mode)
        Path(item.path).write_bytes(str(int(Path(item.path).read_bytes()) + 1).encode())  # odd: not flagged
        return prepared

    out = io.StringIO()
    scanner = Scanner(
        ScanOptions(urls=["a:1"], mode="encoded", workers=2, concurrency=2, batch_size=4),
        ReportWriter(out, ".jsonl", header=False, owned=False),
        make_client=lambda url: server.client(url, "encoded"),
        monotonic=lambda: 0.0,
        prepare=prepare_then_replace,
    )
    scanner.run([Item(str(path)) for path in paths])
    records = {r["path"]: r for r in map(json.loads, out.getvalue().splitlines())}
    received = {hashlib.sha256(bytes(element)).hexdigest(): bytes(element) for element in server.sent}
    assert sorted(received.values()) == sorted(str(n * 2).encode() for n in range(6))
    for number, path in enumerate(paths):
        line = records[str(path)]
        assert line["sha256"] in received, "the report vouches for bytes the server never saw"
        assert received[line["sha256"]] == str(number * 2).encode() and line["flagged"] is True
        assert line["size"] == len(str(number * 2))


NOT_UTF8 = b"\xff\xfe.png"


@pytest.mark.parametrize("extension", [".jsonl", ".csv"])
def test_finding_10_a_name_that_is_not_utf8_survives_the_report_and_resume_reads_it_back(tmp_path, extension):
    """Issue 18, finding 10: a file name that is not UTF-8 (Python's surrogate-escaped str) is written to either
    report and read back as the same path, so --resume finds the file; what a person reads shows U+FFFD."""
    import os

    from safety_checker_scan.report import shown

    image = save(Path(os.fsdecode(bytes(tmp_path) + b"/" + NOT_UTF8)), 4)
    name = str(image)
    assert "\udcff" in name and os.path.isfile(name)
    answer = CheckResult(flagged=False, concept_scores=[-0.2] * 17, special_scores=[-0.1] * 3, image_embeds=None)
    path = tmp_path / f"report{extension}"
    writer = ReportWriter.open(str(path))
    writer.write(record(name, answer, size=10, sha256="cd" * 32))
    writer.write(record(name + ".gone", error=f"cannot read {name + '.gone'!r}", size=None, sha256=None))
    writer.close()
    if extension == ".jsonl":
        path.read_text(encoding="utf-8")  # JSON's escapes (\\udcff): valid UTF-8 text, read back to the same str
    else:
        assert b"/" + NOT_UTF8 + b"," in path.read_bytes()  # the name's own bytes, as the file system has them
    first, second = read_report(str(path))
    assert first["path"] == name and os.path.isfile(first["path"]) and second["path"] == name + ".gone"
    assert answered(first) and not answered(second)
    assert shown(name).endswith("/\ufffd\ufffd.png") and shown(name).encode("utf-8")
