"""The gateway (gateway/, docs/gateway.md) through a real uvicorn and, where it checks images, a real tritonserver.

The seed's callers: the notebook's body, byte for byte, gets diffusers'
decision as outputs[0].data[0], as safety_checker_images decides it, in the
seed runtime's answer; every datatype and shape the issue names; raw files
through the binary extension. OpenAI's callers: the official client's
moderations.create gets the same decisions. Image URLs on this machine are
refused unless allow-listed; garbage gets a 4xx without a traceback; auth,
metrics, limits; and with Triton stopped, nothing is answered 200.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import threading
import uuid

import numpy as np
import openai
import pytest
import requests
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from gateway_fixtures import ImageHost, RunningGateway, notebook_image_string, notebook_rest_request, studio_body
from prometheus_client.parser import text_string_to_metric_families
from reference import diffusers_forward

import safety_checker_admin.server as launcher
from safety_checker_client import spec
from safety_checker_client.cli import main as cli_main
from safety_checker_client.client import RECORD_OUTPUTS, result_from
from safety_checker_gateway import moderations
from safety_checker_gateway.failures import RequestError
from safety_checker_gateway.fetch import Fetcher, data_url_bytes
from safety_checker_gateway.settings import Settings, allow_list

INFER = "/v2/models/safety-checker/infer"
KEY = "test-key-0123456789"
# What an error must never hold: a traceback, a source path, a Python exception's type.
LEAKS = re.compile(r"Traceback|File \"|\.py\b|site-packages|/tmp/|/work/|\b[A-Z][A-Za-z]*(Error|Exception)\b")


def settings(server, **overrides) -> Settings:
    return Settings(triton=server.grpc_url, **overrides)


def triton_answer(server, elements) -> dict:
    """safety_checker_images' own answer, every output, for the elements as they are."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        batch = np.array(elements, dtype=object).reshape(-1, 1)
        tensor = grpcclient.InferInput(spec.IMAGE.name, list(batch.shape), "BYTES")
        tensor.set_data_from_numpy(batch)
        result = client.infer(spec.IMAGES_MODEL, [tensor])
        return {t.name: result.as_numpy(t.name) for t in spec.IMAGES_OUTPUTS}
    finally:
        client.close()


def decisions_of(answer: dict) -> list:
    return [bool(v) for v in answer[spec.HAS_NSFW_CONCEPTS.name].reshape(-1)]


def seed_body(data, datatype="String", shape=None, **extra) -> bytes:
    shape = shape if shape is not None else [len(data), 1]
    return json.dumps(
        {"inputs": [{"name": "image", "shape": shape, "datatype": datatype, "data": data}], **extra}
    ).encode()


@pytest.fixture(scope="module")
def gateway(server):
    with RunningGateway(settings(server)) as running:
        yield running


@pytest.fixture(scope="module")
def notebook_images(server, encoded_files, reference_checker):
    """{name: (the notebook's base64 string, diffusers' decision on it)} for the still PNG photos and pictures,
    with at least one the tiny checker flags and one it passes."""
    from diffusers.utils import load_image
    from PIL import Image
    from transformers import CLIPImageProcessor

    from fixtures.checkers import PREPROCESSOR_CONFIG

    names = sorted(n for n in encoded_files if n.endswith(".png") and not n.startswith(("animated", "hidden")))
    strings = [notebook_image_string(encoded_files[n]) for n in names]
    processor = CLIPImageProcessor(**json.loads(PREPROCESSOR_CONFIG.read_text()))
    images = [load_image(Image.open(io.BytesIO(base64.b64decode(s)))) for s in strings]
    pixels = torch.from_numpy(processor(images=images, return_tensors="np")["pixel_values"])
    flagged, _, _ = diffusers_forward(reference_checker, pixels)
    assert 0 < flagged.sum() < len(names)  # not vacuous: one of each
    return {n: (s, bool(f)) for n, s, f in zip(names, strings, flagged)}


@pytest.fixture(scope="module")
def one_of_each(notebook_images):
    """(a notebook string diffusers flags, one it passes)."""
    flagged = next(s for s, f in notebook_images.values() if f)
    passed = next(s for s, f in notebook_images.values() if not f)
    return flagged, passed


# -- The seed's callers ------------------------------------------------------------------------------------


def test_the_notebooks_body_gets_diffusers_decision_as_the_seed_answered(server, gateway, notebook_images):
    triton = triton_answer(server, [s.encode() for s, _ in notebook_images.values()])
    for (string, decision), by_triton in zip(notebook_images.values(), decisions_of(triton)):
        assert notebook_rest_request(gateway.url + INFER, "no key is configured", string) == [decision]
        assert by_triton is decision
        response = gateway.post(INFER, studio_body(string), {"Content-Type": "application/json"})
        assert response.status_code == 200
        answer = response.json()
        # kserve 0.12.1's InferenceResponse, fields in its order, nulls included.
        assert list(answer) == ["model_name", "model_version", "id", "parameters", "outputs"]
        assert answer["model_name"] == "safety-checker" and answer["model_version"] is None
        assert answer["parameters"] is None and str(uuid.UUID(answer["id"])) == answer["id"]
        assert answer["outputs"] == [
            {"name": "output-0", "shape": [1], "datatype": "BOOL", "parameters": None, "data": [decision]}
        ]


@pytest.mark.parametrize("datatype", ["String", "BYTES"])
@pytest.mark.parametrize("layout", ["[1,1]", "[1]", "[N,1]", "[N,1] nested"])
def test_datatypes_and_shapes(server, gateway, notebook_images, datatype, layout):
    strings = [s for s, _ in notebook_images.values()]
    if layout in ("[1,1]", "[1]"):
        strings = strings[:1]
    shape = [1] if layout == "[1]" else [len(strings), 1]
    data = [[s] for s in strings] if layout.endswith("nested") else strings
    response = gateway.post(INFER, seed_body(data, datatype, shape, id="request-7"))
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert response.json()["id"] == "request-7"
    assert output["shape"] == [len(strings)]
    assert output["data"] == [f for s, f in notebook_images.values() if s in strings]


def test_raw_files_through_the_binary_extension(server, gateway, encoded_files):
    """tritonclient.http sends raw file bytes after the JSON (and asks for binary outputs: JSON answers it)."""
    names = ["astronaut.jpeg", "coffee.webp", "rgb.bmp"]
    files = [encoded_files[n].read_bytes() for n in names]
    client = httpclient.InferenceServerClient(gateway.url.removeprefix("http://"))
    try:
        tensor = httpclient.InferInput("image", [3, 1], "BYTES")
        tensor.set_data_from_numpy(np.array(files, dtype=object).reshape(3, 1), binary_data=True)
        result = client.infer("safety-checker", [tensor])
    finally:
        client.close()
    assert result.as_numpy("output-0").tolist() == decisions_of(triton_answer(server, files))


def test_named_outputs_are_the_checkers_own(server, gateway, encoded_files):
    files = [encoded_files[n].read_bytes() for n in ("camera.png", "animated.gif")]
    data = [base64.b64encode(f).decode() for f in files]
    named = ["view", "output-0", spec.CONCEPT_SCORES.name, spec.FIRED_CONCEPTS.name, spec.HAS_NSFW_CONCEPTS.name]
    response = gateway.post(INFER, seed_body(data, "BYTES", outputs=[{"name": n} for n in named]))
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    assert [o["name"] for o in outputs] == named
    triton = triton_answer(server, files)
    for output in outputs:
        if output["name"] == "output-0":
            assert output["data"] == decisions_of(triton)
            continue
        want = triton[output["name"]]
        assert output["shape"] == list(want.shape)
        got = np.array(output["data"]).reshape(want.shape)
        if want.dtype == object:
            assert got.tolist() == [[v.decode() for v in row] for row in want]
        else:
            np.testing.assert_array_equal(got.astype(want.dtype), want)


def test_strictness_is_passed_on(server, gateway, notebook_images):
    strings = [s for s, _ in notebook_images.values()]
    answers = {}
    for parameters in ({"strictness": "max"}, {"strictness": "weak"}, {"strictness_adjustment": 0.0}):
        response = gateway.post(
            INFER, seed_body(strings, outputs=[{"name": "strictness_adjustment"}], parameters=parameters)
        )
        assert response.status_code == 200, response.text
        answers[json.dumps(parameters)] = response.json()["outputs"][0]["data"]
    assert set(answers['{"strictness": "max"}']) == {spec.STRICTNESS_PRESETS["max"]}
    assert set(answers['{"strictness": "weak"}']) == {spec.STRICTNESS_PRESETS["weak"]}
    refused = gateway.post(INFER, seed_body(strings[:1], parameters={"strictness": "lenient"}))
    assert refused.status_code == 400 and "unknown preset 'lenient'" in refused.json()["error"]


# -- OpenAI's callers ----------------------------------------------------------------------------------------


def openai_client(gateway, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=api_key, max_retries=0)


def test_the_openai_client_gets_the_same_decisions(server, gateway, notebook_images):
    strings = [s for s, _ in notebook_images.values()]
    parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{s}"}} for s in strings]
    response = openai_client(gateway).moderations.create(model="safety-checker", input=parts)
    assert response.model == "safety-checker" and response.id.startswith("modr-")
    decisions = [f for _, f in notebook_images.values()]
    assert [r.flagged for r in response.results] == decisions
    triton = triton_answer(server, [s.encode() for s in strings])
    for i, result in enumerate(response.results):
        assert result.categories.sexual is result.flagged
        assert (result.category_scores.sexual > 0.5) is result.flagged
        assert result.category_applied_input_types.sexual == ["image"]
        assert result.categories.violence is False and result.category_applied_input_types.violence == []
        assert result.safety_checker == result_from({n: triton[n] for n in RECORD_OUTPUTS}, i).as_dict()


def test_text_parts_and_strings_are_refused_with_a_400(gateway):
    client = openai_client(gateway)
    for given in ("a sentence", ["a sentence"], [{"type": "text", "text": "a sentence"}]):
        with pytest.raises(openai.BadRequestError) as caught:
            client.moderations.create(model="safety-checker", input=given)
        assert "text input is not supported" in caught.value.message


def test_an_image_url_on_this_machine_is_refused_unless_allow_listed(server, encoded_files, notebook_images):
    png = base64.b64decode(next(iter(notebook_images.values()))[0])
    decision = next(iter(notebook_images.values()))[1]
    with ImageHost({"picture.png": png}) as host:

        def ask(running, url):
            body = {"model": "safety-checker", "input": [{"type": "image_url", "image_url": {"url": url}}]}
            return running.post("/v1/moderations", json.dumps(body).encode())

        with RunningGateway(settings(server)) as plain:
            refused = ask(plain, host.url("picture.png"))
        names, networks = allow_list(("localhost",))
        with RunningGateway(settings(server, allow_names=names, allow_networks=networks)) as by_name:
            loopback = ask(by_name, host.url("picture.png", "localhost"))
        names, networks = allow_list(("127.0.0.1",))
        with RunningGateway(settings(server, allow_names=names, allow_networks=networks, max_image_bytes=100)) as tight:
            too_large = ask(tight, host.url("picture.png"))
        with RunningGateway(settings(server, allow_names=names, allow_networks=networks)) as allowed:
            answered = ask(allowed, host.url("picture.png"))
            to_refused = ask(allowed, host.url("redirect/" + host.url("picture.png", "localhost")))
            to_allowed = ask(allowed, host.url("redirect/" + host.url("picture.png")))
            missing = ask(allowed, host.url("nothing.png"))
        assert host.requests == 6  # none for a refused host: too_large, answered, to_refused 1 each, to_allowed 2
    for response, words in (
        (refused, "the image host 127.0.0.1 is not on the gateway's allow-list"),
        (loopback, "the image host localhost has an address that is not public"),
        (too_large, "larger than the limit of 100 bytes"),
        (to_refused, "the image host localhost is not on the gateway's allow-list"),
        (missing, "answered HTTP 404"),
    ):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and words in error["message"], error
        assert "picture.png" not in error["message"]  # no URL in an error
    for response in (answered, to_allowed):
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["flagged"] is decision


# -- Garbage, limits, auth, metrics ---------------------------------------------------------------------------

PNG_TEXT = "iVBORw0KGgo"  # base64 of a PNG's signature: any image in a body starts with it
GARBAGE = {
    INFER: [
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[1, 2, 3]", "must be a JSON object"),
        (b'{"inputs": "image"}', "'inputs' must hold one input"),
        (seed_body(["abc"], extra_field=1), "unknown request field(s) 'extra_field'"),
        (seed_body(["abc"], parameters={"binary_data": True, "x": 1}), "unknown parameter(s) 'binary_data', 'x'"),
        (seed_body(["abc"], "FP32"), "datatype must be one of String, BYTES, not 'FP32'"),
        (seed_body(["abc", "def"], shape=[2]), "input shape must be [1], [1, 1] or [N, 1], not [2]"),
        (seed_body(["abc"], shape=[2, 1]), "holds 2 images but the data holds 1"),
        (seed_body(["abc"] * 33), "at most 32 images"),
        (seed_body([7]), "image 0: each element must be a non-empty base64 string"),
        (seed_body(["abc"], outputs=[{"name": "secrets"}]), "unknown output 'secrets'"),
        (seed_body(["not base64 at all!"]), "image 0: invalid base64"),
        (seed_body([PNG_TEXT + "AAAA"]), "image 0: "),
    ],
    "/v1/moderations": [
        (b"{", "not valid JSON"),
        (b'{"input": [], "temperature": 1}', "unknown field(s) 'temperature'"),
        (b'{"input": []}', "non-empty list"),
        (b'{"input": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}', "input[0]: an image URL"),
        (b'{"input": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}', "input[0]: a data URL"),
        (b'{"input": [{"type": "image_url", "image_url": {"url": "x", "detail": "high"}}]}', "'image_url.detail'"),
        (b'{"input": [{"type": "video"}]}', "unknown part type 'video'"),
        (b'{"model": "omni-moderation-latest", "input": []}', "unknown model 'omni-moderation-latest'"),
    ],
}


@pytest.mark.parametrize("route, case", [(r, i) for r, cases in GARBAGE.items() for i in range(len(cases))])
def test_garbage_gets_a_4xx_without_a_traceback(gateway, route, case):
    body, words = GARBAGE[route][case]
    response = gateway.post(route, body, {"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    message = error if route == INFER else error["message"]
    assert words in message, message
    assert not LEAKS.search(message) and PNG_TEXT not in message, message


def test_unknown_models_routes_and_methods_are_json_errors(gateway):
    assert gateway.post("/v2/models/safety_checker_images/infer", seed_body(["abc"])).json() == {
        "error": "Model with name safety_checker_images does not exist."
    }
    for response, status in ((gateway.get(INFER), 405), (gateway.get("/v2/nothing"), 404)):
        assert response.status_code == status and isinstance(response.json()["error"], str)


def test_a_body_over_the_limit_gets_413(server):
    """Small bodies: a gateway that refuses one unread closes the connection while a large one is still sent."""
    with RunningGateway(settings(server, max_body_bytes=200)) as running:
        declared = running.post(INFER, seed_body(["A" * 300]))
        chunked = requests.post(running.url + INFER, data=iter([seed_body(["A" * 300])]), timeout=120)
        fits = running.post(INFER, seed_body(["abc"]))
    for response in (declared, chunked):
        assert response.status_code == 413 and "larger than the limit" in response.json()["error"]
    assert fits.status_code == 400  # read, parsed and sent: Triton refuses "abc"


def test_auth(server, tmp_path, notebook_images):
    string, decision = next(iter(notebook_images.values()))
    with RunningGateway(settings(server, api_key=KEY.encode())) as running:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},
            {"Authorization": f"Basic {KEY}"},
        ):
            response = running.post(INFER, seed_body([string]), headers)
            assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert notebook_rest_request(running.url + INFER, KEY, string) == [decision]
        with pytest.raises(openai.AuthenticationError):
            openai_client(running, "wrong").moderations.create(input=[{"type": "image_url", "image_url": {"url": "x"}}])
        assert running.get("/v2/health/ready").status_code == 200  # probes carry no key
        assert running.get("/metrics").status_code == 200


def samples(gateway) -> dict:
    page = gateway.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }


def test_metrics_count_requests_decisions_and_upstream_errors(server, notebook_images):
    strings = [s for s, _ in notebook_images.values()]
    flagged = sum(f for _, f in notebook_images.values())
    with RunningGateway(settings(server)) as running:
        for _ in range(3):
            assert running.post(INFER, seed_body(strings)).status_code == 200
        assert running.post(INFER, seed_body(["not base64 at all!"])).status_code == 400
        counts = samples(running)
    route = "/v2/models/{name}/infer"
    assert counts[("safety_checker_gateway_requests_total", (("code", "200"), ("route", route)))] == 3
    assert counts[("safety_checker_gateway_requests_total", (("code", "400"), ("route", route)))] == 1
    assert counts[("safety_checker_gateway_request_duration_seconds_count", (("route", route),))] == 4
    assert counts[("safety_checker_gateway_upstream_errors_total", (("kind", "refused"),))] == 1
    assert counts[("safety_checker_gateway_images_total", (("flagged", "true"),))] == 3 * flagged
    assert counts[("safety_checker_gateway_images_total", (("flagged", "false"),))] == 3 * (len(strings) - flagged)


def test_no_image_data_in_logs(server, gateway, notebook_images, caplog):
    string = next(iter(notebook_images.values()))[0]
    data_url = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{string}"}}
    with caplog.at_level("DEBUG"):
        gateway.post(INFER, seed_body([string]))
        gateway.post(INFER, seed_body([string[:-8]]))
        gateway.post("/v1/moderations", json.dumps({"input": [data_url]}).encode())
        gateway.post("/v1/moderations", json.dumps({"input": [data_url], "x": string}).encode())
    assert caplog.records and "/v2/models/{name}/infer" in caplog.text
    assert PNG_TEXT not in caplog.text and string[100:140] not in caplog.text


# -- Triton stopped -------------------------------------------------------------------------------------------


@pytest.mark.server
def test_with_triton_stopped_nothing_is_answered_200(repository, notebook_images):
    string, _ = next(iter(notebook_images.values()))
    moderation = json.dumps({"input": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{string}"}}]})
    triton = launcher.TritonServer(
        repository, http_port=launcher.free_port(), grpc_port=launcher.free_port(), metrics_port=launcher.free_port()
    )
    triton.start()
    try:
        with RunningGateway(Settings(triton=triton.grpc_url, upstream_timeout_s=10)) as running:
            assert running.post(INFER, seed_body([string])).status_code == 200
            assert running.post("/v1/moderations", moderation.encode()).status_code == 200
            assert running.get("/v2/health/ready").status_code == 200
            triton.stop()
            answers = {
                "infer": running.post(INFER, seed_body([string])),
                "moderations": running.post("/v1/moderations", moderation.encode()),
                "health": running.get("/v2/health/ready"),
                "model": running.get("/v2/models/safety-checker/ready"),
            }
            with pytest.raises(openai.APIStatusError) as caught:
                openai_client(running).moderations.create(input=json.loads(moderation)["input"])
            counts = samples(running)
    finally:
        triton.stop()
    assert caught.value.status_code == 503
    assert {name: r.status_code for name, r in answers.items()} == dict.fromkeys(answers, 503)
    assert answers["infer"].json() == {
        "error": "the safety checker is unavailable; nothing was checked: send again later"
    }
    assert answers["infer"].headers["Retry-After"] == "1"
    assert answers["moderations"].json()["error"]["type"] == "server_error"
    assert "outputs" not in answers["infer"].json()  # what SDXL Studio blocks on
    assert counts[("safety_checker_gateway_upstream_errors_total", (("kind", "unavailable"),))] == 3


# -- The command ----------------------------------------------------------------------------------------------


def test_the_gateway_command_serves(server, tmp_path, notebook_images):
    import subprocess
    import sys
    import time

    string, decision = next(iter(notebook_images.values()))
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    port = launcher.free_port()
    command = [sys.executable, "-m", "safety_checker_client.cli", "gateway", "--triton", server.grpc_url]
    command += [
        "--port",
        str(port),
        "--api-key-file",
        str(key_file),
        "--model-name",
        "checker",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):  # at most 30 s
            try:
                if requests.get(url + "/v2/health/ready", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                assert process.poll() is None, process.stdout.read().decode()
            time.sleep(0.1)
        assert notebook_rest_request(url + "/v2/models/checker/infer", KEY, string) == [decision]
        assert requests.get(url + "/v2/models/checker/ready", timeout=5).json() == {"name": "checker", "ready": True}
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0].decode()
    assert PNG_TEXT not in output and "Traceback" not in output, output


def test_bad_settings_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").write_text("\n")
    assert cli_main(["gateway", "--api-key-file", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip() == f"error: the API key file {tmp_path / 'empty'} is empty"
    with pytest.raises(SystemExit):
        cli_main(["gateway", "--max-concurrency", "0"])


# -- Units: the concurrency bound, the fetch rules, the score ---------------------------------------------------


class HeldUpstream:
    """A stand-in for Triton that holds every check until released: requests stay in flight as long as needed."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        return True

    async def check(self, images, outputs, parameters=None):
        self.entered.set()
        for _ in range(3000):  # at most 30 s
            if self.released.is_set():
                break
            await asyncio.sleep(0.01)
        return {spec.HAS_NSFW_CONCEPTS.name: np.zeros((len(images), 1), bool)}


def test_requests_beyond_the_concurrency_bound_get_503_or_429_with_retry_after():
    upstream = HeldUpstream()
    with RunningGateway(Settings(max_concurrency=1), upstream) as running:
        first = {}
        thread = threading.Thread(target=lambda: first.update(r=running.post(INFER, seed_body(["abc"]))))
        thread.start()
        assert upstream.entered.wait(30)
        over = running.post(INFER, seed_body(["abc"]))
        over_v1 = running.post("/v1/moderations", b'{"input": []}')
        live = running.get("/v2/health/live")
        upstream.released.set()
        thread.join(30)
        after = running.post(INFER, seed_body(["abc"]))
    assert (over.status_code, over.headers["Retry-After"]) == (503, "1")
    assert (over_v1.status_code, over_v1.headers["Retry-After"]) == (429, "1")
    assert over_v1.json()["error"]["type"] == "rate_limit_exceeded"
    assert live.json() == {"live": True}
    assert first["r"].status_code == after.status_code == 200
    assert first["r"].json()["outputs"][0]["data"] == [False]


def fetch_rules(*entries: str) -> Fetcher:
    names, networks = allow_list(entries)
    answers = {"public.example": ["93.184.216.34"], "inside.example": ["93.184.216.34", "10.0.0.7"]}
    answers["mapped.example"] = ["::ffff:127.0.0.1"]

    async def resolve(host, port):
        import ipaddress

        return [ipaddress.ip_address(a) for a in answers[host]]

    return Fetcher(Settings(allow_names=names, allow_networks=networks), resolve)


@pytest.mark.parametrize(
    "entries, url, refusal",
    [
        ((), "http://public.example/a.png", "not on the gateway's allow-list"),
        (("public.example",), "http://public.example/a.png", None),
        (("*.example",), "https://public.example:8443/a.png", None),
        (("inside.example",), "http://inside.example/a.png", "not public (10.0.0.7)"),
        (("inside.example", "10.0.0.0/8"), "http://inside.example/a.png", None),
        (("mapped.example",), "http://mapped.example/a.png", "not public (::ffff:7f00:1)"),
        (("169.254.169.254",), "http://169.254.169.254/latest/meta-data", None),
        (("public.example",), "http://169.254.169.254/latest/meta-data", "not on the gateway's allow-list"),
        (("::1",), "http://[::1]:8080/a.png", None),
        (("public.example",), "http://[::1]:8080/a.png", "not on the gateway's allow-list"),
    ],
)
def test_fetch_rules(entries, url, refusal):
    import httpx

    fetcher = fetch_rules(*entries)

    async def permitted():
        try:
            return await fetcher._permitted(httpx.URL(url), 3)
        finally:
            await fetcher.close()

    if refusal is None:
        assert asyncio.run(permitted())
    else:
        with pytest.raises(RequestError) as caught:
            asyncio.run(permitted())
        assert caught.value.status == 400 and caught.value.message.startswith("input[3]: ")
        assert refusal in caught.value.message


def test_data_urls():
    assert data_url_bytes("data:image/png;base64," + base64.b64encode(b"12345").decode(), 0, 5) == b"12345"
    for url, words in (
        ("data:image/png;base64," + base64.b64encode(b"123456").decode(), "larger than the limit of 5 bytes"),
        ("data:image/png;base64,***", "not valid base64"),
        ("data:image/png,12345", "data:<media type>;base64,<data>"),
    ):
        with pytest.raises(RequestError, match=re.escape(words)):
            data_url_bytes(url, 0, 5)


@pytest.mark.parametrize("margin, flagged", [(-0.5, False), (-0.001, False), (0.0, False), (0.001, True), (0.3, True)])
def test_the_score_is_over_one_half_exactly_when_flagged(margin, flagged):
    from safety_checker_client.client import CheckResult

    result = CheckResult(flagged=flagged, concept_scores=[-0.2, margin], custom_scores={"stripes": -0.05})
    score = moderations.score(result)
    assert 0.0 <= score <= 1.0 and (score > 0.5) is flagged
    assert moderations.moderation(result)["categories"]["sexual"] is flagged
