"""The drop-in inside a real StableDiffusionPipeline built from tiny random components, against a real server.

The pipeline's own `run_safety_checker` calls `TritonSafetyChecker` (its own
feature_extractor makes clip_input), with output_type "pil", "np" and "pt".
The judge is diffusers' StableDiffusionSafetyChecker loaded from the very
checkpoint the server serves. A random tiny checker flags nothing a random
tiny pipeline draws, so this module exports its own: thresholds set between
the cosines of the pipeline's images, so that some are flagged and some not,
every score far from a rounding boundary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import exported, serving

from fixtures.checkers import PREPROCESSOR_CONFIG, build_checker, save_checker
from safety_checker_client.client import CheckError
from safety_checker_diffusers import TritonSafetyChecker, blur, pixelate

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROMPTS = ["a cat", "stripes", "noise"]
PER_PROMPT = 3  # nine images per call
OUTPUT_TYPES = ("pil", "np", "pt")


def tiny_pipeline(folder: Path):
    """StableDiffusionPipeline from tiny random components (64x64 images), no safety checker yet."""
    from concept_models import write_tokenizer
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=99,
        )
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(folder), model_max_length=77),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=CLIPImageProcessor.from_json_file(str(PREPROCESSOR_CONFIG)),
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, output_type: str):
    generator = torch.Generator().manual_seed(42)
    return pipe(
        PROMPTS,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=1.0,
        num_images_per_prompt=PER_PROMPT,
        output_type=output_type,
        generator=generator,
    )


def split_thresholds(cosines: np.ndarray) -> np.ndarray:
    """For each concept, a threshold in the widest gap between the images' cosines, keeping >= 2 on each side
    for concept 0 and every image quiet for the others. Every margin is over 1e-3: no score is near a tie."""
    thresholds = cosines.max(axis=0) + 0.05
    ordered = np.sort(cosines[:, 0])
    gaps = np.diff(ordered)[1:-2]  # at least two images below and three above
    widest = int(np.argmax(gaps)) + 1
    assert gaps.max() > 0.003, ordered  # the pipeline's images must differ enough to split them
    thresholds[0] = (ordered[widest] + ordered[widest + 1]) / 2
    return thresholds


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The pipeline, its unfiltered images, and a server serving a checker that flags some of them."""
    from export.onnx_export import reference_outputs

    folder = tmp_path_factory.mktemp("dropin")
    pipe = tiny_pipeline(folder / "tokenizer")
    unfiltered = {output_type: generate(pipe, output_type).images for output_type in OUTPUT_TYPES}
    # clip_input exactly as run_safety_checker makes it, from the same images.
    pil = pipe.image_processor.numpy_to_pil(unfiltered["np"])
    clip_input = pipe.feature_extractor(pil, return_tensors="pt").pixel_values

    checker = build_checker(seed=3)
    outputs = reference_outputs(checker, clip_input)
    concept = split_thresholds(outputs["concept_cosines"].astype(np.float64))
    special = outputs["special_cosines"].astype(np.float64).max(axis=0) + 0.05
    with torch.no_grad():
        checker.concept_embeds_weights.copy_(torch.from_numpy(concept.astype(np.float32)))
        checker.special_care_embeds_weights.copy_(torch.from_numpy(special.astype(np.float32)))
    checker_dir = save_checker(folder / "checker", checker)
    repository = exported(checker_dir, folder / "repository")
    for triton in serving(repository):
        yield pipe, unfiltered, checker_dir, triton


@pytest.fixture(scope="module")
def reference(setup):
    """diffusers' own checker with the weights the server serves, in the same pipeline."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    pipe, unfiltered, checker_dir, triton = setup
    pipe.safety_checker = StableDiffusionSafetyChecker.from_pretrained(str(checker_dir)).eval()
    try:
        return {output_type: generate(pipe, output_type) for output_type in OUTPUT_TYPES}
    finally:
        pipe.safety_checker = None


def as_array(images) -> np.ndarray:
    """pil -> uint8 NHWC, np -> float NHWC, pt -> float NCHW as numpy."""
    if isinstance(images, torch.Tensor):
        return images.numpy()
    if isinstance(images, list):
        return np.stack([np.asarray(image) for image in images])
    return images


def with_dropin(pipe, output_type: str, **kwargs):
    pipe.safety_checker = TritonSafetyChecker(**kwargs)
    try:
        return generate(pipe, output_type), pipe.safety_checker
    finally:
        pipe.safety_checker = None


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("output_type", OUTPUT_TYPES)
def test_same_decisions_and_images_as_diffusers_own_checker(setup, reference, output_type, protocol):
    pipe, _, _, triton = setup
    url = triton.grpc_url if protocol == "grpc" else f"http://{triton.http_url}/"  # as a browser shows it
    output, dropin = with_dropin(pipe, output_type, url=url, protocol=protocol)
    expected = reference[output_type]
    assert output.nsfw_content_detected == expected.nsfw_content_detected
    assert 2 <= sum(expected.nsfw_content_detected) <= len(expected.nsfw_content_detected) - 3
    assert all(isinstance(flag, bool) for flag in output.nsfw_content_detected)
    assert type(output.images) is type(expected.images)
    np.testing.assert_array_equal(as_array(output.images), as_array(expected.images))  # black, as diffusers
    assert [r.flagged for r in dropin.last_results] == output.nsfw_content_detected


def expected_replacement(unfiltered_pt: torch.Tensor, action: str) -> np.ndarray:
    """What a flagged image should become, as float NCHW in [0, 1], from the unfiltered image."""
    shown = unfiltered_pt.numpy()
    if action == "black":
        return np.zeros_like(shown)
    if action == "none":
        return shown
    return (blur if action == "blur" else pixelate)(shown, channels_first=True)


def to_output(pixels_chw: np.ndarray, output_type: str) -> np.ndarray:
    """A float CHW image in [0, 1] as the pipeline's postprocess would return it (array form of as_array)."""
    if output_type == "pt":
        return pixels_chw
    hwc = np.moveaxis(pixels_chw, 0, -1)
    return hwc if output_type == "np" else (hwc * 255).round().astype(np.uint8)


@pytest.mark.parametrize("action", ["black", "blur", "pixelate", "none"])
@pytest.mark.parametrize("output_type", OUTPUT_TYPES)
def test_flagged_images_are_replaced_as_asked(setup, reference, output_type, action):
    pipe, unfiltered, _, triton = setup
    output, _ = with_dropin(pipe, output_type, url=triton.grpc_url, action=action)
    flags = output.nsfw_content_detected
    assert flags == reference[output_type].nsfw_content_detected
    images, plain = as_array(output.images), as_array(unfiltered[output_type])
    for index, flagged in enumerate(flags):
        if not flagged:
            np.testing.assert_array_equal(images[index], plain[index])
            continue
        expected = to_output(expected_replacement(unfiltered["pt"][index], action), output_type)
        if output_type == "pil":  # the pipeline rounds floats the same way; allow one level for float noise
            assert np.abs(images[index].astype(int) - expected).max() <= 1, action
        else:
            np.testing.assert_allclose(images[index], expected, atol=1e-6, err_msg=action)
        if action in ("blur", "pixelate"):
            axis = 1 if output_type != "pt" else 2  # along the width
            assert detail(images[index], axis) < 0.3 * detail(plain[index], axis), action


def detail(image: np.ndarray, axis: int) -> float:
    return float(np.abs(np.diff(image.astype(np.float64), axis=axis)).mean())


def test_an_unreachable_server_raises_inside_the_pipeline(setup):
    from safety_checker_admin.server import free_port

    pipe, _, _, _ = setup
    with pytest.raises(CheckError):
        with_dropin(pipe, "np", url=f"127.0.0.1:{free_port()}", deadline_s=0)
    output, _ = with_dropin(pipe, "np", url=f"127.0.0.1:{free_port()}", deadline_s=0, on_error="block", action="none")
    assert output.nsfw_content_detected == [True] * len(PROMPTS) * PER_PROMPT
    assert not output.images.any()  # every image black


def test_strictness_reaches_the_server(setup):
    pipe, _, _, triton = setup
    output, dropin = with_dropin(pipe, "np", url=triton.grpc_url, strictness="max")
    assert all(r.strictness_adjustment == 0.074 for r in dropin.last_results)
    assert sum(output.nsfw_content_detected) >= 2
