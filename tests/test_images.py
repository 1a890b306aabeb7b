"""safety_checker_images through a real tritonserver: image files in, exactly the pixel path's answers out.

The files (tests/image_files.py): the scikit-image photos as PNG, JPEG (one
EXIF-rotated) and WebP, synthetic pictures in every PIL mode the client
accepts, animations. Each answer must equal the client's pixel_values path
bit for bit (the server decodes with the client's code) and diffusers'
forward() on CLIPImageProcessor applied to diffusers' load_image(file); raw
bytes and base64 text must give identical answers; a JSON request naming no
outputs gets the decision as outputs[0].data[0]; every bad element is refused
with its index, and the next request is answered.
"""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from image_files import bad_elements, small_png
from reference import diffusers_forward
from tritonclient.utils import InferenceServerException

from safety_checker_client import spec
from safety_checker_client.client import CheckError, SafetyCheckerClient, result_from
from safety_checker_client.preprocess import ImageError, decode_image, load_image, open_image, preprocess

PROTOCOLS = pytest.mark.parametrize("protocol", ["grpc", "http"])
MODULES = {"grpc": grpcclient, "http": httpclient}
INVALID_ARG = {"grpc": "INVALID_ARGUMENT", "http": "400"}
# Pictures hiding colour under an alpha channel: diffusers' load_image drops the alpha, the checker composites
# onto white as CLIPImageProcessor does (tests/test_decoding.py); their reference keeps the mode.
DROPS_ALPHA = {"hidden-rgba.png", "hidden-la.png"}
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def url_of(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.fixture(scope="module")
def names(encoded_files):
    return sorted(encoded_files)


@pytest.fixture(scope="module")
def pixel_answers(server, encoded_files, names):
    """What the client's pixel_values path answers for every file's first frame, composited (decoded and
    preprocessed by the client; `check_files` refuses a file that is more than that picture)."""
    with SafetyCheckerClient(server.grpc_url) as client:
        return client.check([open_image(encoded_files[n]) for n in names])


@pytest.fixture(scope="module")
def reference(reference_checker, encoded_files, names):
    """diffusers: forward() and the PyTorch embedding on CLIPImageProcessor(diffusers.utils.load_image(file))."""
    from diffusers.utils import load_image
    from transformers import CLIPImageProcessor

    from export.onnx_export import reference_outputs
    from fixtures.checkers import PREPROCESSOR_CONFIG

    processor = CLIPImageProcessor(**json.loads(PREPROCESSOR_CONFIG.read_text()))
    keep_mode = lambda image: image
    images = [load_image(str(encoded_files[n]), convert_method=keep_mode if n in DROPS_ALPHA else None) for n in names]
    pixels = torch.from_numpy(processor(images=images, return_tensors="np")["pixel_values"])
    flagged, concept, special = diffusers_forward(reference_checker, pixels)
    embeds = reference_outputs(reference_checker, pixels)[spec.IMAGE_EMBEDS.name]
    return flagged, concept, special, embeds


def assert_same(got, want):
    """Every field of every answer, the embedding bit for bit; `view` only where both sides answer one (the pixel
    path checks the one image it is given, a file's answer says which of its views answered)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g_fields, w_fields = g.as_dict(), w.as_dict()
        if w.view is None:
            assert g.view is None or g.view["views"] >= 1
            g_fields.pop("view", None), w_fields.pop("view", None)
        assert g_fields == w_fields
        assert np.array_equal(g.image_embeds, w.image_embeds)


def raw_infer(server, protocol, elements, parameters=None, model=spec.IMAGES_MODEL):
    module = MODULES[protocol]
    client = module.InferenceServerClient(url_of(server, protocol))
    try:
        batch = np.array(elements, dtype=object).reshape(-1, 1)
        tensor = module.InferInput(spec.IMAGE.name, list(batch.shape), "BYTES")
        tensor.set_data_from_numpy(batch)
        result = client.infer(model, [tensor], parameters=parameters)
        return {t.name: result.as_numpy(t.name) for t in spec.IMAGES_OUTPUTS}
    finally:
        client.close()


def post_json(server, model: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with _HTTP.open(request, timeout=120) as response:
        return json.load(response)


# Triton puts this before the message of a step of the images ensemble (the decoder) that refused a request.
IN_ENSEMBLE = f"in ensemble '{spec.IMAGES_MODEL}', "


def kserve_body(files) -> dict:
    """What a caller of the KServe runtime sends, with the standard datatype: base64 PNGs, no outputs named."""
    data = [base64.b64encode(f).decode() for f in files]
    return {"inputs": [{"name": "image", "shape": [len(data), 1], "datatype": "BYTES", "data": data}]}


# -- Parity ----------------------------------------------------------------------------------------------


@PROTOCOLS
def test_files_answer_as_the_pixel_path_and_diffusers(server, encoded_files, names, pixel_answers, reference, protocol):
    with SafetyCheckerClient(url_of(server, protocol), protocol=protocol, encoded=True) as client:
        assert client.model_name == spec.IMAGES_MODEL
        got = client.check_files([encoded_files[n] for n in names])  # requests of 32 files, mixing formats
    assert_same(got, pixel_answers)
    flagged, concept, special, embeds = reference
    assert 0 < flagged.sum() < len(names)  # not vacuous: the tiny checker flags some of these files
    assert [r.flagged for r in got] == flagged.tolist()
    np.testing.assert_allclose([r.concept_scores for r in got], concept, atol=1e-6, rtol=0)
    np.testing.assert_allclose([r.special_scores for r in got], special, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.stack([r.image_embeds for r in got]), embeds, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_requests_mixing_formats_and_forms(server, encoded_files, names, pixel_answers, batch):
    """Raw files and base64 text in one request are told apart element by element."""
    elements = [
        encoded_files[n].read_bytes() if i % 2 else base64.b64encode(encoded_files[n].read_bytes())
        for i, n in enumerate(names)
    ]
    answers = []
    for start in range(0, len(elements), batch):
        answer = raw_infer(server, "grpc", elements[start : start + batch])
        answers += [result_from(answer, i) for i in range(len(answer[spec.HAS_NSFW_CONCEPTS.name]))]
    assert_same(answers, pixel_answers)


def test_raw_bytes_and_base64_give_identical_answers(server, encoded_files, names):
    chosen = names[::4]
    files = [encoded_files[n].read_bytes() for n in chosen]
    raw = raw_infer(server, "grpc", files)
    as_text = raw_infer(server, "grpc", [base64.b64encode(f) for f in files])
    http_binary = raw_infer(server, "http", files)
    outputs = {o["name"]: o for o in post_json(server, spec.IMAGES_MODEL, kserve_body(files))["outputs"]}
    for tensor in spec.IMAGES_OUTPUTS:
        assert np.array_equal(raw[tensor.name], as_text[tensor.name]), tensor.name
        assert np.array_equal(raw[tensor.name], http_binary[tensor.name]), tensor.name
        json_data = np.array(outputs[tensor.name]["data"]).reshape(raw[tensor.name].shape)
        if tensor.datatype == "BYTES":
            assert json_data.tolist() == [[v.decode() for v in row] for row in raw[tensor.name]], tensor.name
        else:
            np.testing.assert_array_equal(json_data.astype(raw[tensor.name].dtype), raw[tensor.name], tensor.name)


# -- Every view a viewer or a pipeline can see (issue 18, findings 1 and 2) ------------------------------------


@pytest.fixture(scope="module")
def shown_and_hidden(server, encoded_files, names, pixel_answers):
    """(a still picture the tiny checker flags, a same-size one it passes), both as the pixel path answers them."""
    stills = [n for n in names if n.endswith(".png") and not n.startswith(("animated", "hidden"))]
    flagged = next(n for n, r in zip(names, pixel_answers) if r.flagged and n in stills)
    passed = next(n for n, r in zip(names, pixel_answers) if not r.flagged and n in stills)
    shown = load_image(encoded_files[flagged]).convert("RGB")
    return shown, load_image(encoded_files[passed]).convert("RGB").resize(shown.size)


def encoded_answer(server, data: bytes):
    with SafetyCheckerClient(server.grpc_url, encoded=True) as client:
        (result,) = client.check_encoded([data])
    return result


def test_an_apngs_animation_is_checked_beyond_its_default_image(server, shown_and_hidden):
    """Finding 1: a passing default image, and a flagged frame that a browser shows: flagged, by that frame."""
    flagged, passed = shown_and_hidden
    with SafetyCheckerClient(server.grpc_url) as client:
        assert [r.flagged for r in client.check([passed, flagged])] == [False, True]
    buffer = io.BytesIO()
    passed.save(buffer, "PNG", save_all=True, append_images=[flagged], default_image=True)
    result = encoded_answer(server, buffer.getvalue())
    assert result.flagged and result.view == {"frame": 1, "frames": 2, "transparency": None, "views": 2}


def test_content_under_transparency_is_checked_as_a_pipeline_sees_it(server, shown_and_hidden):
    """Finding 2: a flagged picture saved with alpha 0 composites to white, and is itself what load_image gives
    a pipeline: flagged, by the view with its alpha dropped."""
    flagged, _ = shown_and_hidden
    hidden = flagged.convert("RGBA")
    hidden.putalpha(0)
    buffer = io.BytesIO()
    hidden.save(buffer, "PNG")
    result = encoded_answer(server, buffer.getvalue())
    with pytest.raises(ImageError, match="hides colour under transparency"):  # the pixel path checks one picture
        decode_image(buffer.getvalue(), "hidden.png")
    with SafetyCheckerClient(server.grpc_url) as client:  # that picture, composited, is white
        (white,) = client.check([open_image(io.BytesIO(buffer.getvalue()))])
    # Flagged whatever white is (this tiny random checker may flag it): by white first, else by what it hides.
    first = "composited" if white.flagged else "dropped"
    assert result.flagged and result.view == {"frame": 0, "frames": 1, "transparency": first, "views": 2}


def test_a_still_opaque_file_is_one_view(server, shown_and_hidden):
    flagged, passed = shown_and_hidden
    for picture, flag in ((flagged, True), (passed, False)):
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        result = encoded_answer(server, buffer.getvalue())
        assert result.flagged is flag and result.view == {"frame": 0, "frames": 1, "transparency": None, "views": 1}


# -- The KServe runtime's request ----------------------------------------------------------------------


def test_kserve_style_body_naming_the_decision_gets_it_as_the_first_output(server, encoded_files, names, pixel_answers):
    """A JSON caller that reads outputs[0] names the decision: an ensemble answers the outputs a request names,
    in its own order, so one named output is the first. Every output, named or not, is there by name."""
    flagged = [n for n, r in zip(names, pixel_answers) if r.flagged and n.endswith(".png")]
    passed = [n for n, r in zip(names, pixel_answers) if not r.flagged and n.endswith(".png")]
    assert flagged and passed
    for name in (flagged[0], passed[0]):
        body = kserve_body([encoded_files[name].read_bytes()])
        body["outputs"] = [{"name": spec.HAS_NSFW_CONCEPTS.name}]
        answer = post_json(server, spec.IMAGES_MODEL, body)
        (first,) = answer["outputs"]
        assert first["name"] == spec.HAS_NSFW_CONCEPTS.name and first["datatype"] == "BOOL"
        assert first["shape"] == [1, 1]
        assert first["data"][0] is (name in flagged)
        assert answer["model_name"] == spec.IMAGES_MODEL
        everything = post_json(server, spec.IMAGES_MODEL, kserve_body([encoded_files[name].read_bytes()]))
        outputs = {o["name"]: o for o in everything["outputs"]}
        assert sorted(outputs) == sorted(t.name for t in spec.IMAGES_OUTPUTS)
        assert outputs[spec.HAS_NSFW_CONCEPTS.name]["data"] == first["data"]


def test_an_ensemble_answers_in_its_own_order(server):
    """Why a JSON caller that reads outputs by position names only the decision: Triton answers an ensemble's
    JSON request in the iteration order of a hash map of its output names (libstdc++'s unordered_map), named
    or not, which for these names does not put has_nsfw_concepts first."""
    pixels = np.zeros((1, 3, 224, 224), np.float32)
    body = {
        "inputs": [{"name": "pixel_values", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": [0.0] * pixels.size}]
    }
    order = [o["name"] for o in post_json(server, spec.ENSEMBLE_MODEL, body)["outputs"]]
    assert sorted(order) == sorted(t.name for t in spec.ENSEMBLE_OUTPUTS)
    assert order[0] != spec.HAS_NSFW_CONCEPTS.name


# -- Strictness ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parameters",
    [
        {"strictness": "strong"},
        {"strictness": "WEAK"},
        {"strictness_adjustment": -0.02},
        {"strictness_adjustment": "0.05"},
    ],
)
def test_strictness_parameters_work_as_on_the_pixel_ensemble(server, encoded_files, names, parameters):
    chosen = [encoded_files[n] for n in names[:6]]
    pixels = preprocess([open_image(p) for p in chosen])
    want = raw_pixels(server, pixels, parameters)
    got = raw_infer(server, "grpc", [p.read_bytes() for p in chosen], parameters)
    for tensor in spec.ENSEMBLE_OUTPUTS:
        assert np.array_equal(got[tensor.name], want[tensor.name]), tensor.name
    assert got[spec.STRICTNESS_ADJUSTMENT.name][0, 0] != 0.0


def raw_pixels(server, pixels, parameters):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        tensor = grpcclient.InferInput(spec.PIXEL_VALUES.name, list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        result = client.infer(spec.ENSEMBLE_MODEL, [tensor], parameters=parameters)
        return {t.name: result.as_numpy(t.name) for t in spec.ENSEMBLE_OUTPUTS}
    finally:
        client.close()


@PROTOCOLS
@pytest.mark.parametrize(
    "parameters",
    [{"strictness": "lenient"}, {"strictness_adjustment": 0.5}, {"strictness": "max", "strictness_adjustment": 0.0}],
)
def test_bad_strictness_is_refused_with_the_pixel_ensembles_words(server, protocol, parameters):
    pixels = np.zeros((1, 3, 224, 224), np.float32)
    with pytest.raises(InferenceServerException) as pixel_refusal:
        raw_pixels(server, pixels, parameters)
    with pytest.raises(InferenceServerException) as caught:
        raw_infer(server, protocol, [small_png()], parameters)
    # Each ensemble prefixes its step's error with "in ensemble '<its name>', ": the postprocessor's words follow.
    words = pixel_refusal.value.message().removeprefix(f"in ensemble '{spec.ENSEMBLE_MODEL}', ")
    assert caught.value.message() == f"{IN_ENSEMBLE}{words}"
    assert INVALID_ARG[protocol] in str(caught.value.status())


# -- Bad input -------------------------------------------------------------------------------------------

BAD = bad_elements()
# What a refusal must never hold: a traceback, a server path, a Python exception's type.
LEAKS = re.compile(r"Traceback|File \"|\.py\b|site-packages|/tmp/|/work/|\b[A-Z][A-Za-z]*(Error|Exception)\b")
BAD["file over 20 MiB"] = (
    b"\x89PNG\r\n\x1a\n" + bytes(spec.MAX_ENCODED_BYTES - 7),
    "more than the limit of 20971520 bytes",
)
BAD["base64 of a file over 20 MiB"] = (
    base64.b64encode(b"\xff\xd8\xff" + bytes(spec.MAX_ENCODED_BYTES)),
    "more than the limit of 20971520 bytes",
)


@PROTOCOLS
@pytest.mark.parametrize("case", list(BAD))
def test_bad_element_refuses_the_request_naming_it_and_the_next_request_is_answered(
    server, encoded_files, names, pixel_answers, protocol, case
):
    element, reason = BAD[case]
    good = [encoded_files[n].read_bytes() for n in names[:3]]
    with pytest.raises(InferenceServerException) as caught:
        raw_infer(server, protocol, [good[0], good[1], element, good[2]])
    message = caught.value.message()
    assert message.startswith(f"{IN_ENSEMBLE}image 2: ") and reason in message, message
    assert "nothing in this request was checked" in message
    assert not LEAKS.search(message), message
    assert INVALID_ARG[protocol] in str(caught.value.status()), caught.value.status()
    answer = raw_infer(server, protocol, good)
    assert_same([result_from(answer, i) for i in range(3)], pixel_answers[:3])


def test_json_refusal_names_the_index(server):
    body = kserve_body([small_png(), small_png()])
    body["inputs"][0]["data"][1] = "not base64 at all!"
    with pytest.raises(urllib.error.HTTPError) as caught:
        post_json(server, spec.IMAGES_MODEL, body)
    assert caught.value.code == 400
    error = json.load(caught.value)["error"]
    assert error.startswith(f"{IN_ENSEMBLE}image 1: invalid base64"), error


# -- The client --------------------------------------------------------------------------------------------


@PROTOCOLS
def test_client_sends_each_files_bytes_untouched(server, encoded_files, names, protocol, monkeypatch):
    """No decoding on the client: the tensor holds the files' bytes; over HTTP as binary data, not JSON."""
    module = MODULES[protocol]
    sent = []
    original = module.InferInput.set_data_from_numpy

    def spy(self, array, *args, **kwargs):
        sent.append((self.name(), array, kwargs.get("binary_data", True)))
        return original(self, array, *args, **kwargs)

    monkeypatch.setattr(module.InferInput, "set_data_from_numpy", spy)
    chosen = [encoded_files[n] for n in names if n.endswith(".jpeg")][:3]
    with SafetyCheckerClient(url_of(server, protocol), protocol=protocol, encoded=True) as client:
        results = client.check_files(chosen)
    assert len(results) == 3
    ((name, array, binary),) = sent
    assert name == spec.IMAGE.name and array.shape == (3, 1) and array.dtype == object
    assert [bytes(e) for e in array[:, 0]] == [p.read_bytes() for p in chosen]
    assert binary is True


def test_client_names_the_file_the_server_refused(server, encoded_files, names, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(small_png()[:300])
    paths = [encoded_files[n] for n in names[:2]] + [broken]
    with SafetyCheckerClient(server.grpc_url, encoded=True) as client:
        with pytest.raises(CheckError, match=r"broken\.png: .*image 2: corrupt or truncated"):
            client.check_files(paths)
        with pytest.raises(ValueError, match="check_files"):
            client.check([np.zeros((8, 8, 3), np.uint8)])
        assert len(client.check_encoded([p.read_bytes() for p in paths[:2]])) == 2


@pytest.mark.slow
def test_exported_repository_sizes_the_decoders_to_this_host(repository):
    from export.image_models import host_decoder_instances

    text = (repository / spec.DECODE_MODEL / "config.pbtxt").read_text()
    assert int(text.split("instance_group")[1].split("count:")[1].split()[0]) == host_decoder_instances()
