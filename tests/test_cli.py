"""The console command as a user runs it: `safety-checker serve`, then `safety-checker check FILE...`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safety_checker_admin.server import free_port

COMMAND = str(Path(sys.executable).parent / "safety-checker")


@pytest.fixture(scope="module")
def served(repository, tmp_path_factory):
    """`safety-checker serve` in its own process; yields (http_port, grpc_port)."""
    ports = [free_port() for _ in range(3)]
    log = tmp_path_factory.mktemp("serve") / "serve.out"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                COMMAND,
                "serve",
                "--repository",
                str(repository),
                "--http-port",
                str(ports[0]),
                "--grpc-port",
                str(ports[1]),
                "--metrics-port",
                str(ports[2]),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    deadline = time.monotonic() + 180
    while "Press Ctrl-C" not in log.read_text():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    banner = log.read_text()
    assert f"http://127.0.0.1:{ports[0]}" in banner and f"127.0.0.1:{ports[1]}" in banner
    assert "safety_checker" in banner
    yield ports[0], ports[1]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    from skimage import data

    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name in ("astronaut", "coffee", "camera"):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        paths[name] = path
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(paths["coffee"].read_bytes()[:2000])
    text = folder / "notes.txt"
    text.write_text("not an image\n")
    paths.update(corrupt=corrupt, text=text, missing=folder / "missing.jpg")
    return paths


def check(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([COMMAND, "check", *args], input=stdin, capture_output=True, text=True, timeout=300)


def lines(result: subprocess.CompletedProcess):
    return [json.loads(line) for line in result.stdout.splitlines()]


ONE_PICTURE = {"frame": 0, "frames": 1, "transparency": None, "views": 1}  # a still, opaque file's only view


def as_pixels(records):
    """`--encoded` records as the pixel path prints them: the same, but for `view` (which of a file's views
    answered, absent on the pixel path), after checking that each answered file was one picture."""
    for record in records:
        if "flagged" in record:
            assert record.pop("view") == ONE_PICTURE, record
    return records


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_check_prints_one_json_object_per_image(served, image_files, protocol):
    http_port, grpc_port = served
    port = grpc_port if protocol == "grpc" else http_port
    files = [str(image_files[n]) for n in ("astronaut", "coffee", "camera")]
    result = check("--url", f"127.0.0.1:{port}", "--protocol", protocol, *files)
    assert result.returncode == 0, result.stderr
    records = lines(result)
    assert [r["path"] for r in records] == files
    for record in records:
        assert isinstance(record["flagged"], bool)
        assert len(record["concept_scores"]) == 17 and len(record["special_scores"]) == 3


def test_check_matches_diffusers_on_real_photos(served, image_files, reference_checker):
    import torch
    from reference import diffusers_forward

    from safety_checker_client.preprocess import load_image, preprocess

    files = [str(image_files[n]) for n in ("astronaut", "coffee", "camera")]
    records = lines(check("--url", f"127.0.0.1:{served[1]}", *files))
    pixels = preprocess([load_image(f) for f in files])
    flagged, concept, special = diffusers_forward(reference_checker, torch.from_numpy(pixels))
    assert [r["flagged"] for r in records] == flagged.tolist()
    np.testing.assert_allclose([r["concept_scores"] for r in records], concept, atol=1e-6, rtol=0)
    np.testing.assert_allclose([r["special_scores"] for r in records], special, atol=1e-6, rtol=0)


def test_uint8_form_prints_the_same_answers(served, image_files):
    files = [str(image_files[n]) for n in ("astronaut", "coffee", "camera")]
    plain = check("--url", f"127.0.0.1:{served[1]}", *files)
    uint8 = check("--url", f"127.0.0.1:{served[0]}", "--protocol", "http", "--uint8", *files)
    assert uint8.returncode == 0, uint8.stderr
    assert lines(uint8) == lines(plain)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_encoded_form_prints_the_same_answers(served, image_files, protocol):
    files = [str(image_files[n]) for n in ("astronaut", "coffee", "camera")]
    plain = check("--url", f"127.0.0.1:{served[1]}", *files)
    port = served[1] if protocol == "grpc" else served[0]
    encoded = check("--url", f"127.0.0.1:{port}", "--protocol", protocol, "--encoded", *files)
    assert encoded.returncode == 0, encoded.stderr
    assert as_pixels(lines(encoded)) == lines(plain)


def test_encoded_form_gives_each_bad_file_its_own_error_line(served, image_files):
    """The server refuses a batch holding a file it cannot decode, naming it; the others are sent again without it."""
    files = [str(image_files[n]) for n in ("astronaut", "corrupt", "text", "missing", "coffee")]
    result = check("--url", f"127.0.0.1:{served[1]}", "--encoded", *files)
    assert result.returncode != 0
    records = as_pixels(lines(result))
    assert [r["path"] for r in records] == files
    good, corrupt, text, missing, good_again = records
    plain = lines(check("--url", f"127.0.0.1:{served[1]}", files[0], files[-1]))
    assert [good, good_again] == plain
    for bad in (corrupt, text, missing):
        assert "flagged" not in bad and bad["path"] in bad["error"]
    # Named by its place in the request the server refused: the second of the three files sent.
    assert "corrupt or truncated image file" in corrupt["error"] and "image 1: " in corrupt["error"]
    # A text file is not sent (the server would take it for base64): named, with the formats an image file may be.
    assert "a text file, not an image file (PNG, JPEG, WEBP, GIF, BMP, TIFF)" in text["error"]
    assert "No such file" in missing["error"]
    assert "3 of 5 images were not checked" in result.stderr
    both = check("--url", f"127.0.0.1:{served[1]}", "--encoded", "--uint8", files[0])
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_unreadable_files_get_an_error_line_and_a_failing_exit(served, image_files):
    files = [str(image_files[n]) for n in ("astronaut", "corrupt", "text", "missing", "coffee")]
    result = check("--url", f"127.0.0.1:{served[1]}", *files)
    assert result.returncode != 0
    records = lines(result)
    assert [r["path"] for r in records] == files
    good, corrupt, text, missing, good_again = records
    assert "flagged" in good and "flagged" in good_again
    for bad in (corrupt, text, missing):
        assert "flagged" not in bad
        assert bad["error"] and bad["path"] in bad["error"]
    assert "3 of 5 images were not checked" in result.stderr


def test_plain_json_request_as_in_the_readme(served, image_files):
    """The curl example: KServe v2 JSON over HTTP, no tritonclient."""
    import urllib.request

    from safety_checker_client.preprocess import load_image, preprocess

    pixels = preprocess([load_image(image_files["astronaut"])])
    body = {
        "inputs": [
            {"name": "pixel_values", "shape": list(pixels.shape), "datatype": "FP32", "data": pixels.ravel().tolist()}
        ]
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{served[0]}/v2/models/safety_checker/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=60) as response:
        outputs = {o["name"]: o for o in json.load(response)["outputs"]}
    expected = lines(check("--url", f"127.0.0.1:{served[1]}", str(image_files["astronaut"])))[0]
    assert outputs["has_nsfw_concepts"]["data"] == [expected["flagged"]]
    assert outputs["concept_scores"]["shape"] == [1, 17]
    np.testing.assert_allclose(outputs["concept_scores"]["data"], expected["concept_scores"], atol=1e-6)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_nothing_listening_is_said_on_stderr_at_once_and_check_exits_1(image_files, protocol):
    """Finding: 116 s of silence, and `--url http://...` crashed with a traceback. A hang guard, not a timing."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    result = check("--url", url, "--protocol", protocol, "--connect-deadline", "1", str(image_files["coffee"]))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "AttributeError" not in result.stderr
    told, summary = result.stderr.splitlines()
    assert told.startswith(f"safety-checker check: cannot reach safety_checker at 127.0.0.1:{port} ({protocol}): ")
    assert "Connection refused" in told and told.endswith("; retrying for up to 1 s")
    assert summary == "error: 1 of 1 images were not checked"
    (record,) = lines(result)
    assert "flagged" not in record and "Connection refused" in record["error"]


def test_check_help_states_the_connect_deadline_and_version_is_the_package_s():
    from importlib.metadata import version

    usage = subprocess.run([COMMAND, "check", "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "--connect-deadline SECONDS" in " ".join(usage.split()) and "(default 20;" in " ".join(usage.split())
    shown = subprocess.run([COMMAND, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert shown.strip() == f"safety-checker {version('safety-checker-client')}"


def test_no_server_means_errors_never_safe(image_files):
    result = check(
        "--url", f"127.0.0.1:{free_port()}", "--protocol", "http", "--deadline", "1", str(image_files["astronaut"])
    )
    assert result.returncode != 0
    (record,) = lines(result)
    assert "flagged" not in record and record["error"]
    assert "not checked: " in record["error"] and " attempts in " in record["error"]  # retried, then gave up


def test_check_reports_custom_concepts_and_takes_a_strictness(served, image_files):
    files = [str(image_files["astronaut"]), str(image_files["coffee"])]
    normal = lines(check("--url", f"127.0.0.1:{served[1]}", *files))
    for record in normal:
        assert record["custom_scores"] == {} and record["concept_set_version"] == 0
        assert record["strictness_adjustment"] == 0.0
        assert record["flagged"] == any(name.startswith("concept_") for name in record["fired_concepts"])
    result = check("--url", f"127.0.0.1:{served[1]}", "--strictness", "max", *files)
    assert result.returncode == 0, result.stderr
    for before, after in zip(normal, lines(result)):
        assert after["strictness_adjustment"] == 0.074
        cascade = 0.01 * (any(v > 0 for v in after["special_scores"]) - any(v > 0 for v in before["special_scores"]))
        np.testing.assert_allclose(
            after["concept_scores"], np.array(before["concept_scores"]) + 0.074 + cascade, atol=1.01e-3
        )
    refused = check("--url", f"127.0.0.1:{served[1]}", "--strictness", "0.5", *files)
    assert refused.returncode == 2 and refused.stdout == ""  # refused before anything is sent
    assert "argument --strictness: request parameter 'strictness_adjustment' = 0.5 must be" in refused.stderr


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_paths_on_stdin_an_http_url_and_fail_on_flagged(served, image_files, protocol):
    port = served[1] if protocol == "grpc" else served[0]
    files = [str(image_files[n]) for n in ("astronaut", "coffee", "camera")]
    plain = lines(check("--url", f"127.0.0.1:{served[1]}", *files))
    url = f"http://127.0.0.1:{port}/"
    result = check("--url", url, "--protocol", protocol, "--fail-on-flagged", "-", stdin="\n".join(files) + "\n\n")
    assert lines(result) == plain and "Traceback" not in result.stderr
    # Exit 3 exactly when an answer says flagged (the random-weight checker decides which; both branches are also
    # counted without a server in test_check_cli.py).
    assert result.returncode == (3 if any(r["flagged"] for r in plain) else 0), result.stderr
    assert check("--url", url, "--protocol", protocol, *files).returncode == 0
