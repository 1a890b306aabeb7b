"""The adversarial suite (issue 18): hostile input on every surface, and no answer that marks unchecked content safe.

Surfaces: the images ensemble over HTTP JSON (raw bodies), HTTP binary
(tritonclient.http) and gRPC (tritonclient.grpc); raw requests below
tritonclient; `safety-checker scan`; custom concept files (a live server
and the CLI); the admin APIs and the admin key at start-up. Every case
asserts: a refusal (with a message holding no traceback, server path or
exception type) or a decision equal to that of the same content checked
properly (tests/hostile.py); no hang (pytest-timeout on each test's body,
client deadlines on each call); one report line per scanned file; and the
server answering a good request as before, after each case.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import serving
from hostile import ANSWERED, CONCEPT_FILES, EITHER, REFUSED, Pictures, concept_file, encode, image_cases, leaks
from hostile import proper_views as views_of
from PIL import Image
from raw_requests import Request, Tensor, send, send_http_body
from tritonclient.utils import InferenceServerException

from safety_checker_client import spec
from safety_checker_client.client import SafetyCheckerClient
from safety_checker_client.preprocess import load_image

pytestmark = [pytest.mark.server, pytest.mark.timeout(240, func_only=True)]

COMMAND = str(Path(sys.executable).parent / "safety-checker")
PROTOCOLS = ("json", "http", "grpc")
OUTPUTS = (spec.HAS_NSFW_CONCEPTS.name, spec.CONCEPT_SCORES.name, spec.VIEW.name)
CALL_TIMEOUT_S = 120
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
CASES = image_cases()


# -- the pictures, and what "checked properly" answers --------------------------------------------------------


@pytest.fixture(scope="module")
def pictures(server, encoded_files) -> Pictures:
    """A still PNG the tiny checker flags and one (resized to its size) it passes, on the pixel path."""
    stills = sorted(n for n in encoded_files if n.endswith(".png") and not n.startswith(("animated", "hidden")))
    with SafetyCheckerClient(server.grpc_url) as client:
        answers = client.check_files([encoded_files[n] for n in stills])
        flagged = [load_image(encoded_files[n]).convert("RGB") for n, r in zip(stills, answers) if r.flagged]
        passed = [load_image(encoded_files[n]).convert("RGB") for n, r in zip(stills, answers) if not r.flagged]
        for shown in flagged:
            for other in passed:
                candidate = Pictures(shown, other.resize(shown.size))
                if [r.flagged for r in client.check([candidate.flagged, candidate.passed])] == [True, False]:
                    return candidate
    raise AssertionError("no flagged and passed pair among the parity files")


class Oracle:
    """Decisions of content checked properly: every Pillow view of a file through the client's pixel path."""

    def __init__(self, server) -> None:
        self.server = server
        self.known: Dict[bytes, Tuple[bool, bool]] = {}

    def __call__(self, data: bytes) -> Tuple[bool, bool]:
        """(any view flagged, the first view flagged: what a first-frame, composited-only checker answers)."""
        if data not in self.known:
            views = views_of(data)
            with SafetyCheckerClient(self.server.grpc_url) as client:
                flags = [r.flagged for r in client.check(views)]
            self.known[data] = (any(flags), flags[0])
        return self.known[data]


@pytest.fixture(scope="module")
def oracle(server) -> Oracle:
    return Oracle(server)


@pytest.fixture(scope="module")
def good_png(pictures) -> bytes:
    return encode(pictures.passed, "PNG")


@pytest.fixture(scope="module")
def flagged_png(pictures) -> bytes:
    return encode(pictures.flagged, "PNG")


# -- the images ensemble over three protocols -----------------------------------------------------------------

Outcome = Tuple[Optional[str], object]  # (None, [(flagged, view, concept_scores)]) or (status, message)


def _json_infer(server, elements: List[bytes], texts: List[bool], parameters=None) -> Outcome:
    data = [e.decode("ascii") if t else base64.b64encode(e).decode() for e, t in zip(elements, texts)]
    body = {"inputs": [{"name": spec.IMAGE.name, "shape": [len(data), 1], "datatype": "BYTES", "data": data}]}
    body["outputs"] = [{"name": name} for name in OUTPUTS]
    if parameters:
        body["parameters"] = parameters
    return json_outcome(*post(server, json.dumps(body).encode()))


def post(server, body: bytes, headers: Optional[Dict[str, str]] = None):
    headers = {"Content-Type": "application/json", **(headers or {})}
    return send_http_body(server.http_url, f"/v2/models/{spec.IMAGES_MODEL}/infer", body, headers)


def json_outcome(status, answer) -> Outcome:
    if status is not None:
        return str(status), answer if isinstance(answer, str) else json.dumps(answer)
    header, _ = answer
    by_name = {o["name"]: o["data"] for o in header["outputs"]}
    count = len(by_name[spec.HAS_NSFW_CONCEPTS.name])
    scores = np.reshape(by_name[spec.CONCEPT_SCORES.name], (count, -1)).tolist()
    return None, [
        (by_name[spec.HAS_NSFW_CONCEPTS.name][i], json.loads(by_name[spec.VIEW.name][i]), scores[i])
        for i in range(count)
    ]


def _tritonclient_infer(server, protocol: str, elements: List[bytes], parameters=None) -> Outcome:
    module = grpcclient if protocol == "grpc" else httpclient
    url = server.grpc_url if protocol == "grpc" else server.http_url
    options = {} if protocol == "grpc" else {"connection_timeout": CALL_TIMEOUT_S, "network_timeout": CALL_TIMEOUT_S}
    client = module.InferenceServerClient(url, **options)
    try:
        batch = np.empty((len(elements), 1), dtype=object)
        batch[:, 0] = elements
        tensor = module.InferInput(spec.IMAGE.name, list(batch.shape), "BYTES")
        if protocol == "http":
            tensor.set_data_from_numpy(batch, binary_data=True)
        else:
            tensor.set_data_from_numpy(batch)
        outputs = [module.InferRequestedOutput(name) for name in OUTPUTS]
        timeout = {"client_timeout": CALL_TIMEOUT_S} if protocol == "grpc" else {}
        try:
            result = client.infer(spec.IMAGES_MODEL, [tensor], outputs=outputs, parameters=parameters, **timeout)
        except InferenceServerException as error:
            return str(error.status()), error.message()
    finally:
        client.close()
    flags = result.as_numpy(spec.HAS_NSFW_CONCEPTS.name)[:, 0]
    views = result.as_numpy(spec.VIEW.name)[:, 0]
    scores = result.as_numpy(spec.CONCEPT_SCORES.name)
    return None, [(bool(f), json.loads(v), s.tolist()) for f, v, s in zip(flags, views, scores)]


def infer_images(server, protocol: str, elements: List[bytes], texts=None, parameters=None) -> Outcome:
    texts = texts or [False] * len(elements)
    if protocol == "json":
        return _json_infer(server, elements, texts, parameters)
    return _tritonclient_infer(server, protocol, elements, parameters)


REFUSAL = {"json": "400", "http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}


def assert_clean(message: str) -> None:
    """An error tells what was wrong, in bounded size, and nothing about the server's code or files."""
    assert not leaks(message), (leaks(message), message[:2000])
    assert len(message) < 2000, message[:2000]


def assert_refused(outcome: Outcome, protocol: str, index: Optional[int] = 0) -> str:
    status, message = outcome
    assert status == REFUSAL[protocol], (status, str(message)[:2000])
    assert_clean(message)
    if index is not None:
        assert f"image {index}: " in message, message
    return message


@pytest.fixture(scope="module")
def baseline(server, good_png, flagged_png) -> Dict[str, object]:
    """What each protocol answers for a passing and a flagged PNG before any hostile case."""
    return {p: infer_images(server, p, [good_png, flagged_png]) for p in PROTOCOLS}


def assert_answers_as_before(server, protocol: str, baseline, good_png, flagged_png) -> None:
    now = infer_images(server, protocol, [good_png, flagged_png])
    assert now == baseline[protocol], now
    assert [flag for flag, *_ in now[1]] == [False, True]


def case_file(name: str, element: bytes) -> bytes:
    """The image file a case's element carries (text cases: what their base64 decodes to)."""
    if not CASES[name].text:
        return element
    return base64.b64decode(b"".join(element.split()))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_image(server, pictures, oracle, baseline, good_png, flagged_png, name, protocol):
    case = CASES[name]
    element = case.make(pictures)
    outcome = infer_images(server, protocol, [element], [case.text])
    if case.hides_flagged:  # not vacuous: flagged, and missed by a first-view checker (unless it flags white)
        any_view, first_view = oracle(case_file(name, element))
        assert any_view and (not first_view or oracle(encode(Image.new("RGB", (64, 64), "white"), "PNG"))[0])
    if case.expect == REFUSED or (case.expect == EITHER and outcome[0] is not None):
        assert_refused(outcome, protocol)
    else:
        status, answers = outcome
        assert status is None, (status, answers)
        ((flagged, view, _),) = answers
        assert flagged == oracle(case_file(name, element))[0], (flagged, view)
        if case.expect == ANSWERED and case.hides_flagged:
            assert view["views"] >= 2, view
    assert_answers_as_before(server, protocol, baseline, good_png, flagged_png)


def _many_views(pictures) -> bytes:
    """An APNG of 16 frames, each not opaque: 32 views, all that one request may hold."""
    frames = [pictures.passed.convert("RGBA")] * 15 + [pictures.flagged.convert("RGBA")]
    for frame in frames:
        frame.putalpha(254)
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_hidden_frame_among_good_files_is_flagged_alone(server, pictures, good_png, protocol):
    hidden = CASES["apng-default-image-passes-animation-flagged"].make(pictures)
    status, answers = infer_images(server, protocol, [good_png, hidden, good_png])
    assert status is None, answers
    assert [flag for flag, *_ in answers] == [False, True, False]
    assert answers[1][1]["frame"] == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_bomb_among_good_files_refuses_the_request_naming_it(server, good_png, baseline, flagged_png, protocol):
    bomb = CASES["png-claims-1x50000000"].make(None)
    assert_refused(infer_images(server, protocol, [good_png, good_png, bomb, good_png]), protocol, index=2)
    assert_answers_as_before(server, protocol, baseline, good_png, flagged_png)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_files_making_too_many_views_are_refused_whole_and_the_client_splits_them(
    server, pictures, baseline, good_png, flagged_png, protocol
):
    many = _many_views(pictures)
    message = assert_refused(infer_images(server, protocol, [many, many]), protocol, index=None)
    assert "image 0" not in message and "image 1" not in message and "max_views" in message
    status, answers = infer_images(server, protocol, [many])
    assert status is None and answers[0][0] is True and answers[0][1]["views"] == 32, answers
    if protocol != "json":
        url = server.grpc_url if protocol == "grpc" else server.http_url
        with SafetyCheckerClient(url, protocol=protocol, encoded=True) as client:
            assert [r.flagged for r in client.check_encoded([many, good_png, many])] == [True, False, True]
    assert_answers_as_before(server, protocol, baseline, good_png, flagged_png)


# -- requests of every wrong shape, type and size --------------------------------------------------------------


def _bytes_tensor(items: List[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _json(flagged_b64: str, passed_b64: str, kind: str) -> bytes:
    """A JSON request body, raw, for `kind` (the text cannot be made by json.dumps: duplicated keys and such)."""
    image = lambda data, shape="[1, 1]", datatype="BYTES": (
        f'{{"name": "image", "shape": {shape}, "datatype": "{datatype}", "data": {data}}}'
    )
    one = image(f'["{flagged_b64}"]')
    quoted_image, quoted_pixels = '"image"', '"pixel_values"'
    bodies = {
        "duplicated-data-key": f'{{"inputs": [{{"name": "image", "shape": [1, 1], "datatype": "BYTES", '
        f'"data": ["{flagged_b64}"], "data": ["{passed_b64}"]}}]}}',
        "duplicated-inputs-key": f'{{"inputs": [{one}], "inputs": [{image(json.dumps([passed_b64]))}]}}',
        "duplicated-strictness": f'{{"parameters": {{"strictness": "max", "strictness": "weak"}}, "inputs": [{one}]}}',
        "duplicated-name-key": f'{{"inputs": [{{"name": "image", "name": "pixel_values", "shape": [1, 1], '
        f'"datatype": "BYTES", "data": ["{flagged_b64}"]}}]}}',
        "unknown-top-level-field": f'{{"inputs": [{one}], "smuggled": {{"data": ["{passed_b64}"]}}}}',
        "unknown-input-field": f'{{"inputs": [{{"name": "image", "shape": [1, 1], "datatype": "BYTES", '
        f'"data": ["{flagged_b64}"], "contents": ["{passed_b64}"]}}]}}',
        "shape-2-with-one-element": f'{{"inputs": [{image(f"[{json.dumps(flagged_b64)}]", "[2, 1]")}]}}',
        "shape-rank-1": f'{{"inputs": [{image(f"[{json.dumps(flagged_b64)}]", "[1]")}]}}',
        "shape-rank-3": f'{{"inputs": [{image(f"[{json.dumps(flagged_b64)}]", "[1, 1, 1]")}]}}',
        "shape-zero": f'{{"inputs": [{image("[]", "[0, 1]")}]}}',
        "shape-negative": f'{{"inputs": [{image(f"[{json.dumps(flagged_b64)}]", "[-1, 1]")}]}}',
        "batch-of-33": f'{{"inputs": [{image(json.dumps([flagged_b64] * 33), "[33, 1]")}]}}',
        "datatype-String": f'{{"inputs": [{image(json.dumps([flagged_b64]), datatype="String")}]}}',
        "datatype-FP32": f'{{"inputs": [{image("[0.5]", datatype="FP32")}]}}',
        "datatype-UINT8": f'{{"inputs": [{image("[137]", datatype="UINT8")}]}}',
        "bytes-given-numbers": f'{{"inputs": [{image("[1]")}]}}',
        "data-nested": f'{{"inputs": [{image(json.dumps([[flagged_b64]]))}]}}',
        "data-an-object": f'{{"inputs": [{image(json.dumps({"a": flagged_b64}))}]}}',
        "two-inputs-named-image": f'{{"inputs": [{one}, {image(json.dumps([passed_b64]))}]}}',
        "input-named-pixel_values": f'{{"inputs": [{one.replace(quoted_image, quoted_pixels)}]}}',
        "unknown-output": f'{{"inputs": [{one}], "outputs": [{{"name": "no_such_output"}}]}}',
        "decision-named-twice": f'{{"inputs": [{one}], "outputs": [{{"name": "has_nsfw_concepts"}}, '
        '{"name": "has_nsfw_concepts"}]}',
    }
    return bodies[kind].encode()


def _json_parameters(parameters: dict, flagged_b64: str) -> bytes:
    body = {"parameters": parameters, "inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES"}]}
    body["inputs"][0]["data"] = [flagged_b64]
    return json.dumps(body).encode()


# Parameters of every wrong type and size, as JSON.
JSON_PARAMETERS = {
    "strictness-an-int": {"strictness": 3},
    "strictness-a-bool": {"strictness": True},
    "strictness-a-list": {"strictness": ["max"]},
    "strictness-an-object": {"strictness": {"preset": "max"}},
    "strictness-null": {"strictness": None},
    "strictness-a-float": {"strictness": 0.05},
    "strictness-2000-characters": {"strictness": "m" * 2000},
    "adjustment-1e400-as-text": {"strictness_adjustment": "1e400"},
    "adjustment-1e308": {"strictness_adjustment": 1e308},
    "adjustment-just-outside": {"strictness_adjustment": -0.1000001},
    "adjustment-inf-as-text": {"strictness_adjustment": "inf"},
    "adjustment-nan-as-text": {"strictness_adjustment": "-nan"},
    "adjustment-hex-float": {"strictness_adjustment": "0x1p-4"},
    "adjustment-int-too-large": {"strictness_adjustment": 2**62},
    "unknown-parameter": {"foo": 1},
    "parameter-name-2000-characters": {"s" * 2000: 1},
    "5000-unknown-parameters": {f"p{i}": i for i in range(5000)},
    "triton-reserved-prefix": {"triton_anything": 1},
}
# Bodies whose request must be refused, or answered for the flagged file it holds (never "safe").
JSON_BODIES = {
    "duplicated-data-key": EITHER,
    "duplicated-inputs-key": EITHER,
    "duplicated-strictness": REFUSED,
    "duplicated-name-key": EITHER,
    "unknown-top-level-field": EITHER,
    "unknown-input-field": EITHER,
    "shape-2-with-one-element": REFUSED,
    "shape-rank-1": EITHER,
    "shape-rank-3": REFUSED,
    "shape-zero": REFUSED,
    "shape-negative": REFUSED,
    "batch-of-33": REFUSED,
    "datatype-String": REFUSED,
    "datatype-FP32": REFUSED,
    "datatype-UINT8": REFUSED,
    "bytes-given-numbers": REFUSED,
    "data-nested": EITHER,
    "data-an-object": REFUSED,
    "two-inputs-named-image": REFUSED,
    "input-named-pixel_values": REFUSED,
    "unknown-output": REFUSED,
    "decision-named-twice": EITHER,
}


def assert_not_safe(status, answer, expect: str) -> None:
    """A refusal (status set, message clean), or, where allowed, the flagged file's decision: flagged."""
    if status is not None:
        assert_clean(answer if isinstance(answer, str) else json.dumps(answer))
        assert int(status) != 200
        return
    assert expect == EITHER, f"answered: {answer}"
    header, _ = answer
    decisions = [o["data"] for o in header["outputs"] if o["name"] == spec.HAS_NSFW_CONCEPTS.name]
    assert decisions and all(d == [True] for d in decisions), header


@pytest.fixture(scope="module")
def texts(pictures) -> Tuple[str, str]:
    return tuple(base64.b64encode(encode(p, "PNG")).decode() for p in (pictures.flagged, pictures.passed))


@pytest.mark.parametrize("kind", list(JSON_BODIES))
def test_json_body(server, texts, baseline, good_png, flagged_png, kind):
    status, answer = post(server, _json(*texts, kind))
    assert_not_safe(status, answer, JSON_BODIES[kind])
    assert_answers_as_before(server, "json", baseline, good_png, flagged_png)


@pytest.mark.parametrize("kind", list(JSON_PARAMETERS))
def test_json_parameters_of_every_wrong_type_and_size(server, texts, baseline, good_png, flagged_png, kind):
    status, answer = post(server, _json_parameters(JSON_PARAMETERS[kind], texts[0]))
    assert status == 400, (status, answer)
    assert_not_safe(status, answer, REFUSED)
    assert_answers_as_before(server, "json", baseline, good_png, flagged_png)


@pytest.mark.parametrize(
    "kind, body, headers",
    [
        ("not-utf-8-in-a-string", b'{"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", '
         b'"data": ["\xff\xfe\xfd"]}]}', {}),
        ("header-length-beyond-the-body", b'{"inputs": []}', {"Inference-Header-Content-Length": "100000"}),
        ("header-length-negative", b'{"inputs": []}', {"Inference-Header-Content-Length": "-5"}),
        ("header-length-not-a-number", b'{"inputs": []}', {"Inference-Header-Content-Length": "lots"}),
        ("body-over-64-mib", b'{"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": ["'
         + b"A" * (65 * 1024 * 1024) + b'"]}]}', {}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)  # fmt: skip
def test_json_bodies_the_parser_refuses(server, baseline, good_png, flagged_png, kind, body, headers):
    status, answer = post(server, body, headers)
    assert_not_safe(status, answer, REFUSED)
    assert_answers_as_before(server, "json", baseline, good_png, flagged_png)


def _raw(items=None, data=None, shape=None, datatype="BYTES", name=spec.IMAGE.name, parameters=None) -> Request:
    data = _bytes_tensor(items) if data is None else data
    shape = [len(items), 1] if shape is None else shape
    inputs = [Tensor(name, datatype, shape, data)]
    return Request(spec.IMAGES_MODEL, inputs, dict(parameters or {}), outputs=[spec.HAS_NSFW_CONCEPTS.name])


def raw_cases(flagged: bytes) -> Dict[str, Request]:
    """Requests below tritonclient (HTTP binary, gRPC raw contents), all for the flagged file."""
    return {
        "length-prefix-claims-4-gib": _raw(data=struct.pack("<I", 2**32 - 1) + flagged, shape=[1, 1]),
        "length-prefix-one-too-long": _raw(data=struct.pack("<I", len(flagged) + 1) + flagged, shape=[1, 1]),
        "length-prefix-cut": _raw(data=struct.pack("<I", len(flagged))[:2], shape=[1, 1]),
        "trailing-bytes-after-the-element": _raw(data=_bytes_tensor([flagged]) + b"\0\0", shape=[1, 1]),
        "datatype-FP32": _raw(data=np.zeros(1, np.float32).tobytes(), shape=[1, 1], datatype="FP32"),
        "datatype-UINT8": _raw(data=flagged, shape=[1, len(flagged)], datatype="UINT8"),
        "shape-1x2": _raw([flagged, flagged], shape=[1, 2]),
        "shape-2-with-one-element": _raw([flagged], shape=[2, 1]),
        "batch-of-33": _raw([flagged] * 33),
        "empty-element": _raw([b""]),
        "input-named-pixel_values": _raw([flagged], name=spec.PIXEL_VALUES.name),
        "strictness-an-int": _raw([flagged], parameters={"strictness": 3}),
        "strictness-a-bool": _raw([flagged], parameters={"strictness": True}),
        "strictness-a-float": _raw([flagged], parameters={"strictness": 0.5}),
        "adjustment-text": _raw([flagged], parameters={"strictness_adjustment": "0.05x"}),
        "adjustment-int-out-of-range": _raw([flagged], parameters={"strictness_adjustment": 1}),
        "unknown-parameter": _raw([flagged], parameters={"strictnes": "max"}),
        "both-parameters": _raw([flagged], parameters={"strictness": "weak", "strictness_adjustment": 0.0}),
    }


RAW_KINDS = list(raw_cases(b"x"))


def _raw_answer_flags(protocol: str, answer) -> List[bool]:
    if protocol == "grpc":
        return np.frombuffer(answer.raw_output_contents[0], dtype=np.bool_).tolist()
    header, _ = answer
    return header["outputs"][0]["data"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("kind", RAW_KINDS)
def test_raw_request(server, flagged_png, good_png, baseline, kind, protocol):
    status, answer = send(server, protocol, raw_cases(flagged_png)[kind])
    assert status is not None, _raw_answer_flags(protocol, answer)
    assert_clean(str(answer))
    assert_answers_as_before(server, protocol, baseline, good_png, flagged_png)


# -- safety-checker scan ----------------------------------------------------------------------------------------

# File name -> (the case of hostile.py it holds, or a picture: "flagged"/"passed"; what its line must say).
SCAN_FILES: Dict[bytes, Tuple[str, str]] = {
    b"passed.png": ("passed", ANSWERED),
    b"flagged.png": ("flagged", ANSWERED),
    b"apng-hidden-frame.png": ("apng-default-image-passes-animation-flagged", ANSWERED),
    b"alpha-hidden.png": ("png-rgba-alpha-0", ANSWERED),
    b"webp-hidden-frame.webp": ("webp-second-frame-flagged", ANSWERED),
    b"truncated.png": ("png-truncated", REFUSED),
    b"bomb.png": ("png-claims-100000x100000", REFUSED),
    b"thin.png": ("png-claims-1x50000000", REFUSED),
    b"svg-named.png": ("svg", REFUSED),
    b"empty.png": ("empty", REFUSED),
    b"seventeen-frames.gif": ("gif-17-frames", REFUSED),
    b"\xff\xfe-not-utf-8.png": ("flagged", ANSWERED),
    b"new\nline.png": ("flagged", ANSWERED),
    b"<img src=x onerror=alert(1)>.png": ("flagged", ANSWERED),
}
# Files holding more than one picture (a hidden frame, colour under transparency): the server checks every view of
# them; the client's pixel path, which checks one picture, refuses them.
MORE_THAN_ONE_PICTURE = {b"apng-hidden-frame.png", b"alpha-hidden.png", b"webp-hidden-frame.webp"}
SCAN_RUNS = {
    "float-grpc-jsonl": ("--url", "{grpc}", "--report", "{out}/report.jsonl"),
    "uint8-http-csv": ("--uint8", "--protocol", "http", "--url", "{http}", "--report", "{out}/report.csv"),
    "encoded-grpc-jsonl": ("--encoded", "--url", "{grpc}", "--report", "{out}/report.jsonl"),
    "encoded-http-csv": ("--encoded", "--protocol", "http", "--url", "{http}", "--report", "{out}/report.csv"),
}


@pytest.fixture(scope="module")
def scan_tree(pictures, tmp_path_factory) -> Tuple[Path, Dict[str, Tuple[str, str, bytes]]]:
    root = tmp_path_factory.mktemp("hostile-scan")
    files = {}
    for name, (source, expect) in SCAN_FILES.items():
        picture = getattr(pictures, source, None)
        data = encode(picture, "PNG") if picture is not None else CASES[source].make(pictures)
        path = os.path.join(os.fsencode(root), name)
        with open(path, "wb") as handle:
            handle.write(data)
        files[os.fsdecode(path)] = (source, expect, data)
    return root, files


@pytest.fixture(scope="module")
def scans(server, scan_tree, tmp_path_factory):
    from safety_checker_scan.report import read_report

    root, _ = scan_tree
    done = {}
    for run, arguments in SCAN_RUNS.items():
        out = tmp_path_factory.mktemp(run)
        filled = [a.format(grpc=server.grpc_url, http=server.http_url, out=out) for a in arguments]
        command = [COMMAND, "scan", str(root), *filled, "--html", str(out / "page.html"), "--timeout", "60"]
        result = subprocess.run(command, capture_output=True, timeout=300)
        report = filled[filled.index("--report") + 1]
        done[run] = (result, read_report(report) if os.path.exists(report) else [], out / "page.html")
    return done


@pytest.mark.parametrize("run", list(SCAN_RUNS))
def test_scan_writes_one_line_per_file_and_the_page(scans, scan_tree, run):
    result, records, page = scans[run]
    _, files = scan_tree
    assert result.returncode == 1, result.stderr.decode(errors="replace")  # some files are refused
    assert sorted(r["path"] for r in records) == sorted(files)
    assert b"Traceback" not in result.stderr and b"Traceback" not in result.stdout
    html = page.read_text(errors="replace")
    assert "<img src=x onerror" not in html  # a file name is text on the page, never markup


@pytest.mark.parametrize("run", list(SCAN_RUNS))
@pytest.mark.parametrize("name", list(SCAN_FILES), ids=[n.decode(errors="replace") for n in SCAN_FILES])
def test_scan_line(scans, scan_tree, oracle, run, name):
    _, records, _ = scans[run]
    _, files = scan_tree
    path = next(p for p in files if os.fsencode(p).endswith(name))
    source, expect, data = files[path]
    (record,) = [r for r in records if r["path"] == path]
    if name in MORE_THAN_ONE_PICTURE and not run.startswith("encoded"):
        # The client's pixel path checks one picture: it refuses a file that shows more, naming the way that works.
        assert "flagged" not in record and "send the file itself (--encoded)" in record["error"], record
    elif expect == REFUSED:
        assert record.get("error") and "flagged" not in record, record
        assert_clean(record["error"].replace(path, "<file>"))
    else:
        assert "flagged" in record, record
        assert record["flagged"] is oracle(data)[0], (record, "a view of this file is flagged")


def test_scan_survives_a_fifo_and_a_symlink_loop(server, pictures, tmp_path):
    """Neither a named pipe (no writer: an open for reading blocks) nor a loop of links makes scan hang."""
    root = tmp_path / "tree"
    root.mkdir()
    (root / "flagged.png").write_bytes(encode(pictures.flagged, "PNG"))
    os.mkfifo(root / "pipe.png")
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    report = tmp_path / "report.jsonl"
    command = [COMMAND, "scan", str(root), "--url", server.grpc_url, "--report", str(report), "--timeout", "60"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    from safety_checker_scan.report import read_report

    records = {r["path"]: r for r in read_report(str(report))}
    assert records[str(root / "flagged.png")]["flagged"] is True, records
    for path, record in records.items():
        assert record.get("error") or "flagged" in record, record
        assert not (record.get("flagged") is False and "flagged" not in path), record
    assert "Traceback" not in result.stderr


# -- custom concept files ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def concept_server(repository, tmp_path_factory):
    """A server of its own (a copy of the repository), serving a custom concept set of version 1."""
    copy = shutil.copytree(repository, tmp_path_factory.mktemp("concepts") / "repository")
    path = copy / spec.POSTPROCESS_MODEL / "1" / spec.CUSTOM_CONCEPTS_FILENAME
    path.write_text(json.dumps(concept_file(version=1, count=3)))
    for triton in serving(copy):
        triton.concept_path = path
        yield triton


def rejected_count(server) -> float:
    with _HTTP.open(server.metrics_url, timeout=30) as response:
        text = response.read().decode()
    lines = [line for line in text.splitlines() if line.startswith("safety_checker_concept_set_rejected_total")]
    return float(lines[0].split()[-1]) if lines else 0.0


def concept_answer(server, parity_set) -> dict:
    with SafetyCheckerClient(server.grpc_url, deadline_s=CALL_TIMEOUT_S) as client:
        (result,) = client.check_batch(parity_set.pixels[:1])
    return result.as_dict()


@pytest.fixture(scope="module")
def concept_baseline(concept_server, parity_set) -> dict:
    answer = concept_answer(concept_server, parity_set)
    assert answer["concept_set_version"] == 1 and len(answer["custom_scores"]) == 3
    return answer


def place(path: Path, kind: str) -> None:
    """Put what `kind` names where the concept file is, as an operator (or a ConfigMap swap) would."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    if kind == "a-directory":
        path.mkdir()
    elif kind == "a-link-to-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "over-16-mib-sparse":
        with open(path, "wb") as handle:
            handle.truncate(16 * 1024 * 1024 + 1)
    elif kind != "missing":
        temporary = path.with_name(".incoming")
        temporary.write_bytes(CONCEPT_FILES[kind]())
        os.replace(temporary, path)


SPECIAL_CONCEPT_FILES = ["a-directory", "a-link-to-dev-zero", "over-16-mib-sparse", "missing"]


@pytest.mark.parametrize("kind", list(CONCEPT_FILES) + SPECIAL_CONCEPT_FILES)
def test_a_hostile_concept_file_keeps_the_last_good_set(concept_server, concept_baseline, parity_set, kind):
    before = rejected_count(concept_server)
    place(concept_server.concept_path, kind)
    for _ in range(200):  # the postprocessor looks at the file once per batch
        answer = concept_answer(concept_server, parity_set)
        assert answer == concept_baseline, answer  # the last good set answers, exactly as before
        if rejected_count(concept_server) > before:
            break
    else:
        raise AssertionError(f"the server never rejected {kind}")
    log = concept_server.log_path.read_text(errors="replace")
    assert "Traceback" not in log


def test_the_largest_version_is_served_and_answered_exactly(concept_server, concept_baseline, parity_set):
    place(concept_server.concept_path, "missing")
    concept_server.concept_path.write_text(json.dumps(concept_file(version=2**53 - 1, count=3)))
    for _ in range(200):
        if concept_answer(concept_server, parity_set)["concept_set_version"] == 2**53 - 1:
            break
    else:
        raise AssertionError("version 2**53 - 1 was never served")


# With --concepts-dir the CLI cannot know the served width, so a consistent file of another width is not hostile to it.
CLI_CONCEPT_FILES = [k for k in CONCEPT_FILES if k != "embedding-dim-claims-32"]


@pytest.mark.parametrize("kind", CLI_CONCEPT_FILES + ["a-directory", "a-link-to-dev-zero", "over-16-mib-sparse"])
def test_the_concepts_cli_refuses_a_hostile_file(tmp_path, kind):
    place(tmp_path / spec.CUSTOM_CONCEPTS_FILENAME, kind)
    command = [COMMAND, "concepts", "list", "--concepts-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stdout == "", (result.stdout[:500], result.stderr[:2000])
    assert "Traceback" not in result.stderr and len(result.stderr) < 2000, result.stderr[:2000]


# -- the admin APIs ----------------------------------------------------------------------------------------------

from safety_checker_admin.admin_key import (  # noqa: E402
    ADMIN_KEY_ENV,
    ADMIN_KEY_HEADER,
    GRPC_ADMIN_KEY_HEADER,
    PLACEHOLDER_KEYS,
    read_admin_key,
)
from safety_checker_admin.errors import ServerError  # noqa: E402
from safety_checker_admin.server import TritonServer, free_port  # noqa: E402

ADMIN_HTTP = [
    ("GET", "/v2/logging", None),
    ("POST", "/v2/logging", {"log_verbose_level": 1}),
    ("GET", "/v2/trace/setting", None),
    ("POST", "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/systemsharedmemory/region/probe/register", {"key": "/probe", "offset": 0, "byte_size": 64}),
    ("POST", "/v2/cudasharedmemory/unregister", {}),
    ("POST", "/v2/repository/index", {}),
    ("POST", f"/v2/repository/models/{spec.IMAGES_MODEL}/unload", {}),
    ("POST", f"/v2/repository/models/{spec.POSTPROCESS_MODEL}/load", {}),
]
KEYS = {
    "no-key": lambda key: {},
    "wrong-key": lambda key: {ADMIN_KEY_HEADER: "0" * 64},
    "placeholder-key": lambda key: {ADMIN_KEY_HEADER: PLACEHOLDER_KEYS[0]},
    "key-less-its-last-character": lambda key: {ADMIN_KEY_HEADER: key[:-1]},
    "key-with-a-character-more": lambda key: {ADMIN_KEY_HEADER: key + "0"},
    "key-in-an-authorization-header": lambda key: {"Authorization": f"Bearer {key}"},
    "empty-key": lambda key: {ADMIN_KEY_HEADER: ""},
}


def http_call(url: str, method: str, path: str, body, headers) -> Tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{url}{path}", data=data, method=method, headers=headers)
    try:
        with _HTTP.open(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.parametrize("key", list(KEYS))
@pytest.mark.parametrize("method, path, body", ADMIN_HTTP, ids=[f"{m}-{p}" for m, p, _ in ADMIN_HTTP])
def test_an_admin_api_over_http_is_closed_without_the_key(
    server, baseline, good_png, flagged_png, method, path, body, key
):
    status, text = http_call(server.http_url, method, path, body, KEYS[key](server.admin_key))
    assert status == 403 and "restricted" in text, (status, text)
    assert_answers_as_before(server, "http", baseline, good_png, flagged_png)


GRPC_KEYS = {
    "no-key": lambda key: None,
    "wrong-key": lambda key: {GRPC_ADMIN_KEY_HEADER: "0" * 64},
    "placeholder-key": lambda key: {GRPC_ADMIN_KEY_HEADER: PLACEHOLDER_KEYS[0]},
    "key-under-the-http-header-name": lambda key: {ADMIN_KEY_HEADER: key},
}
GRPC_CALLS = {
    "get_log_settings": lambda c, h: c.get_log_settings(headers=h),
    "update_log_settings": lambda c, h: c.update_log_settings({"log_verbose_level": 1}, headers=h),
    "get_trace_settings": lambda c, h: c.get_trace_settings(headers=h),
    "register_system_shared_memory": lambda c, h: c.register_system_shared_memory("p", "/p", 64, headers=h),
    "get_model_repository_index": lambda c, h: c.get_model_repository_index(headers=h),
    "unload_model": lambda c, h: c.unload_model(spec.IMAGES_MODEL, headers=h),
}


@pytest.mark.parametrize("key", list(GRPC_KEYS))
@pytest.mark.parametrize("call", list(GRPC_CALLS))
def test_an_admin_api_over_grpc_is_closed_without_the_key(server, baseline, good_png, flagged_png, call, key):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as refused:
            GRPC_CALLS[call](client, GRPC_KEYS[key](server.admin_key))
    finally:
        client.close()
    assert "restricted" in refused.value.message() or "admin-key" in refused.value.message(), refused.value
    assert_answers_as_before(server, "grpc", baseline, good_png, flagged_png)


PLACEHOLDER_SOURCES = {
    "as-given": lambda path, env: TritonServer(path, admin_key=PLACEHOLDER_KEYS[0]),
    "in-a-file-with-spaces": lambda path, env: read_admin_key(_written(path, f"  {PLACEHOLDER_KEYS[0]}\r\n")),
    "in-the-environment": lambda path, env: read_admin_key(None, {ADMIN_KEY_ENV: PLACEHOLDER_KEYS[0]}),
    "31-characters": lambda path, env: TritonServer(path, admin_key="k" * 31),
    "a-colon-that-would-split-the-restriction": lambda path, env: TritonServer(path, admin_key="a" * 40 + ":x"),
    "a-newline-inside": lambda path, env: read_admin_key(_written(path, "a" * 20 + "\n" + "b" * 20)),
}


def _written(folder: Path, text: str) -> Path:
    (folder / "key").write_text(text)
    return folder / "key"


@pytest.mark.parametrize("source", list(PLACEHOLDER_SOURCES))
def test_a_known_or_weak_admin_key_is_refused_before_start(tmp_path, source):
    with pytest.raises(ServerError, match="admin key") as refused:
        PLACEHOLDER_SOURCES[source](tmp_path, os.environ)
    assert PLACEHOLDER_KEYS[0] not in str(refused.value)  # a key is never repeated


@pytest.mark.parametrize("how", ["file", "environment"])
def test_serve_refuses_the_placeholder_key(repository, tmp_path, how):
    (tmp_path / "key").write_text(PLACEHOLDER_KEYS[0] + "\n")
    env = {k: v for k, v in os.environ.items() if k != ADMIN_KEY_ENV}
    extra = ["--admin-key-file", str(tmp_path / "key")] if how == "file" else []
    if how == "environment":
        env[ADMIN_KEY_ENV] = PLACEHOLDER_KEYS[0]
    ports = [str(free_port()) for _ in range(3)]
    command = [COMMAND, "serve", "--repository", str(repository), "--http-port", ports[0], "--grpc-port", ports[1]]
    command += ["--metrics-port", ports[2], "--no-restart", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0 and "placeholder" in result.stderr, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr


# -- last: a body that nests 100,000 deep (the parser's own recursion) ------------------------------------------


def test_a_deeply_nested_json_body_leaves_the_server_answering(server, baseline, good_png, flagged_png):
    body = b'{"parameters": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b'}, "inputs": []}'
    status, answer = post(server, body)
    assert_not_safe(status, answer, REFUSED)
    assert_answers_as_before(server, "json", baseline, good_png, flagged_png)
    for protocol in PROTOCOLS:
        assert_answers_as_before(server, protocol, baseline, good_png, flagged_png)
