"""The images model's decoding, in-process: bit-identical to the client, limits refused before decoding.

model_repository/safety_checker_images/1/decoding.py is the code the server
runs; here it runs without Triton (the client package is importable), so
every file can be compared pixel for pixel with the client's
preprocess(load_image(file)) and with CLIPImageProcessor on diffusers'
load_image(file). Through a real tritonserver: tests/test_images.py.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT
from image_files import (
    ROTATED,
    animated_files,
    animation_frames,
    bad_elements,
    has_transparency,
    png_claiming,
    small_png,
)
from PIL import Image

from export.served import served_module
from fixtures.checkers import PREPROCESSOR_CONFIG
from fixtures.photos import photo
from safety_checker_client import spec
from safety_checker_client.preprocess import load_image, preprocess

decoding = served_module(spec.IMAGES_MODEL, "decoding")
LIMITS = decoding.Limits(spec.MAX_ENCODED_BYTES, spec.MAX_IMAGE_PIXELS, spec.IMAGE_FORMATS)


@pytest.fixture(scope="module")
def files(encoded_files):
    """name -> (bytes, path) for every parity file."""
    return {name: (path.read_bytes(), path) for name, path in encoded_files.items()}


@pytest.fixture(scope="module")
def processor():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(**json.loads(PREPROCESSOR_CONFIG.read_text()))
    assert processor.backend == "pil"
    return processor


def client_pixels(path) -> np.ndarray:
    return preprocess([load_image(path)])


def test_the_files_cover_every_mode_format_and_animation(files):
    modes, formats = set(), set()
    for data, _ in files.values():
        with Image.open(io.BytesIO(data)) as image:
            modes.add(image.mode)
            formats.add(image.format)
    assert {"RGB", "RGBA", "LA", "P", "L", "I;16", "CMYK"} <= modes
    assert {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"} <= formats
    for data in animated_files().values():
        with Image.open(io.BytesIO(data)) as image:
            assert image.n_frames == 2


def test_decoded_pixels_are_bit_identical_to_the_client(files):
    for name, (data, path) in files.items():
        assert np.array_equal(decoding.decode([data], LIMITS), client_pixels(path)), name


def test_base64_text_decodes_to_the_same_pixels(files):
    for name, (data, path) in list(files.items())[::3]:
        text = base64.b64encode(data)
        wrapped = b"\n".join(text[i : i + 76] for i in range(0, len(text), 76)) + b"\n"  # as `base64` writes it
        want = client_pixels(path)
        assert np.array_equal(decoding.decode([text], LIMITS), want), name
        assert np.array_equal(decoding.decode([wrapped], LIMITS), want), name


def test_a_batch_mixing_formats_and_forms_is_each_file_alone(files):
    names = sorted(files)[::2]
    elements = [files[n][0] if i % 2 else base64.b64encode(files[n][0]) for i, n in enumerate(names)]
    batch = decoding.decode(elements, LIMITS)
    assert batch.shape == (len(names), 3, 224, 224) and batch.dtype == np.float32
    assert np.array_equal(batch, np.concatenate([client_pixels(files[n][1]) for n in names]))


def test_the_pixels_are_clip_image_processor_on_diffusers_load_image(files, processor):
    """The reference: CLIPImageProcessor applied to diffusers.utils.load_image(file).

    load_image converts to RGB by dropping an alpha channel, where the client
    (like CLIPImageProcessor given the image itself) composites transparency
    onto white. The two agree wherever transparent pixels are white underneath,
    and for palette transparency (which Pillow's RGB conversion keeps as a
    colour key that CLIPImageProcessor composites). For RGBA and LA pictures
    hiding colour under transparency the reference is load_image(file,
    convert_method=keep the mode), which leaves the conversion to
    CLIPImageProcessor, and plain load_image differs.
    """
    from diffusers.utils import load_image as diffusers_load_image

    drops_alpha = {"hidden-rgba.png", "hidden-la.png"}
    assert drops_alpha < set(files)
    for name, (data, path) in files.items():
        ours = decoding.decode([data], LIMITS)
        plain = processor(images=[diffusers_load_image(str(path))], return_tensors="np")["pixel_values"]
        kept = processor(
            images=[diffusers_load_image(str(path), convert_method=lambda image: image)], return_tensors="np"
        )["pixel_values"]
        assert np.array_equal(ours, kept), name
        if name in drops_alpha:
            assert has_transparency(data) and not np.array_equal(ours, plain), name
        else:
            assert np.array_equal(ours, plain), name


def test_exif_orientation_is_applied(files):
    data, _ = files["chelsea-exif-rotated.jpeg"]
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.getexif()[0x0112] == ROTATED and stored.size == (451, 300)
    upright = np.rot90(photo("chelsea"), k=-1)  # what a viewer shows
    assert np.abs(decoding.decode([data], LIMITS) - preprocess([upright])).mean() < 0.05
    assert np.abs(decoding.decode([data], LIMITS) - preprocess([photo("chelsea")])).mean() > 0.3


def test_only_the_first_frame_of_an_animation_is_checked():
    first, second = animation_frames()
    want, other = preprocess([first]), preprocess([second])
    for name, data in animated_files().items():
        got = decoding.decode([data], LIMITS)
        if name != "animated.gif":  # GIF quantises to a palette; the others are lossless
            assert np.array_equal(got, want), name
        assert np.abs(got - want).mean() < np.abs(got - other).mean() / 4, name


# -- What is refused, and why --------------------------------------------------


def refusal(element: bytes, index: int = 2, limits=LIMITS) -> str:
    """The reason given when `element` is image `index` of a request of good files."""
    good = small_png()
    elements = [good] * index + [element] + [good]
    with pytest.raises(decoding.ImageRefused) as caught:
        decoding.decode(elements, limits)
    assert caught.value.index == index
    assert str(caught.value).startswith(f"image {index}: ")
    return caught.value.reason


BAD = bad_elements()


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_element_is_refused_with_its_index_and_reason(case, monkeypatch):
    element, reason = BAD[case]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    decoding.set_pillow_limit(LIMITS)  # as the server does at load
    assert reason in refusal(element)


def test_sizes_are_refused_before_decoding():
    limits = LIMITS._replace(max_encoded_bytes=20_000, max_pixels=64 * 80)
    assert len(small_png()) < 20_000
    too_big = b"\xff\xd8\xff" + b"\0" * 19_998  # a JPEG signature, then nothing a decoder could read
    assert "the file is 20001 bytes, more than the limit of 20000 bytes" in refusal(too_big, 0, limits)
    assert "more than the limit of 20000 bytes" in refusal(base64.b64encode(b"\0" * 30_000), 1, limits)
    assert "the file is 20001 bytes" in refusal(base64.b64encode(too_big), 1, limits)
    assert len(decoding.decode([small_png()], limits)) == 1  # 64 x 80: exactly the limit
    assert "81x64 is 5184 pixels" in refusal(png_claiming(81, 64), 0, limits)


def test_raw_files_and_base64_text_are_told_apart_by_content(files):
    for data, _ in files.values():
        assert decoding.is_raw_file(data, LIMITS.formats)
        assert not decoding.is_raw_file(base64.b64encode(data), LIMITS.formats)
    # A GIF's signature is base64 text ("GIF89a"), yet a GIF is read as a file.
    gif = animated_files()["animated.gif"]
    assert gif.startswith(b"GIF89a") and decoding.file_bytes(gif, LIMITS) == gif


def test_limits_come_from_the_config_parameters():
    from export.models import images

    parameters = {p.key: p.value for p in images().variants[0].parameters}
    assert decoding.limits_from(parameters) == LIMITS
    assert LIMITS.max_encoded_bytes == 20 * 1024 * 1024
    with pytest.raises(ValueError, match="SVG"):
        decoding.limits_from({**parameters, "formats": "PNG,SVG"})


MISSING_PILLOW = textwrap.dedent(
    """
    import json, sys, types

    sys.modules["PIL"] = None  # as in an NGC container without Pillow
    errors = []

    class TritonError:
        INVALID_ARG = "INVALID_ARG"

        def __init__(self, message, code="INTERNAL"):
            self.text, self.code = message, code

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.error = error

    class Logger:
        log_error = errors.append
        log_info = staticmethod(lambda message: None)

    sys.modules["triton_python_backend_utils"] = types.SimpleNamespace(
        TritonError=TritonError, InferenceResponse=InferenceResponse, Logger=Logger
    )
    sys.path.insert(0, sys.argv[1])
    import model

    instance = model.TritonPythonModel()
    instance.initialize({"model_config": open(sys.argv[2]).read(), "model_name": "safety_checker_images"})
    (answer,) = instance.execute([object()])
    print(json.dumps({"logged": errors, "refused": answer.error.text}))
    """
)


def test_without_pillow_the_model_loads_and_refuses_every_request(tmp_path):
    """In a Triton image without Pillow the other models keep serving; every image request says what to install."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(
        (ROOT / "model_repository" / spec.IMAGES_MODEL / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    as_json = json_format.MessageToDict(config, preserving_proto_field_name=True)
    as_json["parameters"] = {k: {"string_value": v.string_value} for k, v in config.parameters.items()}
    (tmp_path / "config.json").write_text(json.dumps(as_json))
    folder = tmp_path / "1"
    folder.mkdir()
    from export.models import images

    model_folder = ROOT / "model_repository" / spec.IMAGES_MODEL / "1"
    for source in [*images().copied_files, *model_folder.glob("*.py")]:
        (folder / source.name).write_bytes(source.read_bytes())
    result = subprocess.run(
        [sys.executable, "-c", MISSING_PILLOW, str(folder), str(tmp_path / "config.json")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "Install Pillow" in report["refused"] and "docs/gpu.md" in report["refused"]
    assert report["logged"] == [report["refused"]]
