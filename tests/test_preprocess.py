"""The client's preprocessing against transformers' CLIPImageProcessor (PIL path).

The reference processor is built from the checker's feature-extractor config;
the float inputs are checked against the uint8 images diffusers would make.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from transformers import CLIPImageProcessor

from fixtures.photos import PHOTOS
from safety_checker_client.preprocess import (
    ImageError,
    load_image,
    preprocess,
    to_uint8_image,
)

CONFIG = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
TOLERANCE = 1e-6

# (height, width): smaller than the crop, exactly the crop, panoramas, odd sizes.
SYNTHETIC_SIZES = [
    (50, 30),
    (30, 50),
    (224, 224),
    (223, 223),
    (224, 1000),
    (1000, 224),
    (225, 223),
    (333, 517),
    (517, 333),
    (7, 1001),
]


@pytest.fixture(scope="module")
def processor() -> CLIPImageProcessor:
    processor = CLIPImageProcessor(**CONFIG)
    # torchvision is absent, so transformers falls back to the PIL backend,
    # which is the one the client reproduces.
    assert type(processor).__name__ == "CLIPImageProcessorPil"
    assert processor.backend == "pil"
    return processor


def reference(processor: CLIPImageProcessor, image: Image.Image | np.ndarray) -> np.ndarray:
    return processor(images=[image], return_tensors="np")["pixel_values"]


def assert_matches(ours: np.ndarray, expected: np.ndarray) -> None:
    assert ours.dtype == np.float32 and expected.dtype == np.float32
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= TOLERANCE


def random_uint8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def diffusers_uint8(image: np.ndarray, minus_one_one: bool) -> np.ndarray:
    """What diffusers' VaeImageProcessor.postprocess(output_type="pil") makes of
    one float image: a CHW tensor in [-1, 1] (minus_one_one) or an HWC one in [0, 1]."""
    tensor = torch.from_numpy(image)[None]
    if minus_one_one:
        tensor = (tensor / 2 + 0.5).clamp(0, 1)  # denormalize, in the tensor's dtype
    else:
        tensor = tensor.permute(0, 3, 1, 2)
    array = tensor.cpu().permute(0, 2, 3, 1).float().numpy()  # pt_to_numpy
    return (array[0] * 255).round().astype("uint8")  # numpy_to_pil


def photo_floats(dtype: type) -> np.ndarray:
    """The astronaut as floats in [0, 1] HWC, off the 1/255 grid so rounding matters."""
    noise = np.random.default_rng(1).uniform(-0.5, 0.5, data.astronaut().shape) / 255
    return np.clip(data.astronaut() / 255 + noise, 0, 1).astype(dtype)


# -- Equality with transformers ------------------------------------------------


@pytest.mark.parametrize("name", PHOTOS)
def test_photos_match_transformers(processor: CLIPImageProcessor, name: str) -> None:
    array = getattr(data, name)()
    expected = reference(processor, Image.fromarray(array))
    assert_matches(preprocess([array]), expected)
    assert_matches(preprocess([Image.fromarray(array)]), expected)
    # The same arithmetic in the same dtypes gives the same bits.
    assert np.array_equal(preprocess([array]), expected)


@pytest.mark.parametrize("size", SYNTHETIC_SIZES)
def test_synthetic_sizes_match_transformers(processor: CLIPImageProcessor, size: tuple[int, int]) -> None:
    array = random_uint8(size + (3,))
    expected = reference(processor, array)
    assert_matches(preprocess([array]), expected)
    assert np.array_equal(preprocess([array]), expected)


@pytest.mark.parametrize("name", ["rocket.jpg", "retina.jpg", "hubble_deep_field.jpg", "coffee.png"])
def test_loaded_files_match_transformers(processor: CLIPImageProcessor, name: str) -> None:
    image = load_image(os.path.join(data.data_dir, name))
    assert_matches(preprocess([image]), reference(processor, Image.open(os.path.join(data.data_dir, name))))


def test_rgba_composited_onto_white_like_transformers(processor: CLIPImageProcessor) -> None:
    array = random_uint8((301, 257, 4))
    array[:40, :, 3] = 0  # fully transparent rows must come out white, not black
    ours = preprocess([array])
    assert_matches(ours, reference(processor, array))
    assert_matches(preprocess([Image.fromarray(array)]), reference(processor, Image.fromarray(array)))
    assert np.array_equal(np.asarray(to_uint8_image(array))[:40], np.full((40, 257, 3), 255, np.uint8))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "I;16"])
def test_other_pil_modes_match_transformers(processor: CLIPImageProcessor, mode: str) -> None:
    image = Image.fromarray(random_uint8((240, 300, 4))).convert(mode)
    if mode == "P":
        image.info["transparency"] = 7  # palette transparency, composited onto white too
    assert_matches(preprocess([image]), reference(processor, image))


def test_grayscale_array_layouts_agree(processor: CLIPImageProcessor) -> None:
    gray = data.camera()
    expected = reference(processor, Image.fromarray(gray))
    for array in (gray, gray[:, :, None], gray[None]):
        assert_matches(preprocess([array]), expected)


def test_batch_matches_per_image_processing(processor: CLIPImageProcessor) -> None:
    images = [data.astronaut(), data.coffee(), data.camera(), random_uint8((50, 30, 3))]
    batch = preprocess(images)
    assert batch.shape == (4, 3, 224, 224) and batch.dtype == np.float32
    assert batch.flags.c_contiguous
    assert_matches(batch, processor(images=[Image.fromarray(i) for i in images], return_tensors="np")["pixel_values"])


def test_four_dimensional_batches_in_either_layout() -> None:
    nhwc = np.stack([data.astronaut(), random_uint8((512, 512, 3))])
    expected = preprocess(list(nhwc))
    assert np.array_equal(preprocess(nhwc), expected)
    assert np.array_equal(preprocess(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))), expected)
    floats = nhwc.astype(np.float32) / 255
    assert np.array_equal(preprocess(floats), expected)
    assert np.array_equal(preprocess(floats.transpose(0, 3, 1, 2) * 2 - 1, value_range=(-1, 1)), expected)


# -- Float images from Stable Diffusion ----------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_zero_one_hwc_floats_become_what_diffusers_makes(processor: CLIPImageProcessor, dtype: type) -> None:
    image = photo_floats(dtype)
    uint8 = diffusers_uint8(image, minus_one_one=False)
    assert np.array_equal(np.asarray(to_uint8_image(image)), uint8)
    assert_matches(preprocess([image]), reference(processor, Image.fromarray(uint8)))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_minus_one_one_chw_floats_become_what_diffusers_makes(processor: CLIPImageProcessor, dtype: type) -> None:
    image = (photo_floats(np.float64) * 2 - 1).transpose(2, 0, 1)
    image[:, :3, :3] = 1.0005  # decoders overshoot a little: clamped like diffusers does
    image[:, -3:, -3:] = -1.0005
    image = image.astype(dtype)
    uint8 = diffusers_uint8(image, minus_one_one=True)
    assert np.array_equal(np.asarray(to_uint8_image(image, value_range=(-1.0, 1.0))), uint8)
    assert_matches(preprocess([image], value_range=(-1.0, 1.0)), reference(processor, Image.fromarray(uint8)))


def test_float_rounding_is_half_to_even_like_numpy_to_pil() -> None:
    # 0.5/255 * 255 rounds to 0 and 1.5/255 * 255 to 2 (NumPy rounds half to even).
    image = np.array([[[0.5, 1.5, 2.5]]], dtype=np.float64) / 255
    assert np.asarray(to_uint8_image(image)).tolist() == [[[0, 2, 2]]]


# -- Errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "array, value_range, message",
    [
        (np.full((8, 8, 3), np.nan, np.float32), (0.0, 1.0), "NaN or Inf"),
        (np.full((8, 8, 3), np.inf, np.float32), (0.0, 1.0), "NaN or Inf"),
        (np.zeros((8, 8, 2), np.uint8), (0.0, 1.0), "channel axis"),
        (np.zeros((5, 8, 8), np.float32), (0.0, 1.0), "channel axis"),
        (np.zeros(8, np.uint8), (0.0, 1.0), "got shape (8,)"),
        (np.zeros((1, 1, 8, 8, 3), np.uint8), (0.0, 1.0), "got shape (1, 1, 8, 8, 3)"),
        (np.zeros((0, 8, 3), np.uint8), (0.0, 1.0), "empty"),
        (np.zeros((8, 8, 3), np.int32), (0.0, 1.0), "dtype must be"),
        (np.zeros((8, 8, 3), np.uint16), (0.0, 1.0), "dtype must be"),
        (np.zeros((8, 8, 3), bool), (0.0, 1.0), "dtype must be"),
        (np.full((8, 8, 3), 1.01, np.float32), (0.0, 1.0), "outside the stated value_range"),
        (np.full((8, 8, 3), 255.0, np.float32), (0.0, 1.0), "outside the stated value_range"),
        (np.full((8, 8, 3), -1.0, np.float32), (0.0, 1.0), "outside the stated value_range"),
        (np.full((3, 8, 8), -1.01, np.float32), (-1.0, 1.0), "outside the stated value_range"),
    ],
)
def test_invalid_arrays_raise_image_error(array: np.ndarray, value_range: tuple[float, float], message: str) -> None:
    with pytest.raises(ImageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        to_uint8_image(array, value_range)


def test_values_just_outside_the_range_are_clamped() -> None:
    image = np.full((4, 4, 3), 1.0009, np.float32)
    image[0] = -0.0009
    assert np.asarray(to_uint8_image(image))[:, 0, 0].tolist() == [0, 255, 255, 255]


def test_batch_errors_name_the_image() -> None:
    with pytest.raises(ImageError, match=r"image 1: .*NaN"):
        preprocess([data.astronaut(), np.full((8, 8, 3), np.nan)])


@pytest.mark.parametrize("images", [[], data.astronaut(), Image.fromarray(data.astronaut()), ["not an image"]])
def test_preprocess_rejects_what_is_not_a_batch_of_images(images: object) -> None:
    with pytest.raises(ImageError):
        preprocess(images)  # type: ignore[arg-type]


def test_unsupported_value_range_is_refused() -> None:
    with pytest.raises(ValueError, match="value_range must be"):
        to_uint8_image(data.astronaut(), value_range=(0.0, 255.0))


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(random_uint8((64, 64, 3))).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content",
    [
        ("notes.txt", b"this is not an image\n"),
        ("empty.png", b""),
        ("truncated.png", png_bytes()[: len(png_bytes()) // 2]),
        ("corrupt.png", png_bytes()[:100] + bytes(b ^ 0xFF for b in png_bytes()[100:140]) + png_bytes()[140:]),
    ],
)
def test_unreadable_files_raise_image_error_naming_the_file(tmp_path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=f"cannot read image file .*{name}"):
        load_image(path)


def test_missing_file_raises_image_error(tmp_path) -> None:
    with pytest.raises(ImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_load_image_applies_exif_orientation(tmp_path) -> None:
    path = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(random_uint8((20, 30, 3))).save(path, exif=exif)
    image = load_image(path)
    assert image.size == (20, 30)
    assert np.array_equal(np.asarray(image), np.rot90(np.asarray(Image.open(path)), k=-1))


def test_client_module_imports_neither_torch_nor_transformers() -> None:
    code = "import sys, safety_checker_client.preprocess; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.stdout.strip() == "[]"
