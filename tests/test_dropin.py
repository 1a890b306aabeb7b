"""The diffusers drop-in without a server: failing closed, the replacements, what it imports.

Inside a real StableDiffusionPipeline against a real server: test_dropin_pipeline.py.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from safety_checker_admin.server import free_port
from safety_checker_client.client import CONNECT_DEADLINE_S, CheckError, CheckResult
from safety_checker_diffusers import TritonSafetyChecker, blur, pixelate
from safety_checker_diffusers.checker import TIMEOUT_S


def unreachable(**kwargs) -> TritonSafetyChecker:
    """A checker whose server is not there; each request is sent once (the client's retries are its own tests')."""
    return TritonSafetyChecker(f"127.0.0.1:{free_port()}", timeout_s=5, deadline_s=0, **kwargs)


def clip_input(count: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(count, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(dtype)


class FakeClient:
    """Answers with fixed decisions (None: no answer, the server was unavailable), and keeps what it was sent."""

    def __init__(self, flags):
        self.flags = flags
        self.sent = None

    def check_each(self, batch, strictness=None):
        self.sent = (batch, strictness)
        return [
            CheckError("safety_checker at h:1 (grpc): unavailable", "unavailable")
            if f is None
            else CheckResult(flagged=f, concept_scores=[0.0] * 17, special_scores=[0.0] * 3, image_embeds=np.zeros(2))
            for f in self.flags
        ]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_unreachable_server_raises(protocol):
    checker = unreachable(protocol=protocol)
    images = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    with pytest.raises(CheckError):
        checker(images=images, clip_input=clip_input(2))
    assert checker.last_results == []


def test_by_default_a_dead_url_fails_a_call_in_seconds_not_minutes():
    """Finding: a dead URL stalled a pipeline for 2 minutes. Counted on a fake clock: the defaults give up within the
    client's connect deadline, and a server that answered before is retried for the drop-in's 30 s, not 120 s."""
    from fake_tritonclient import FakeClock

    checker = TritonSafetyChecker(f"http://127.0.0.1:{free_port()}/")
    clock = FakeClock()
    checker.client._monotonic, checker.client._sleep = clock.monotonic, clock.sleep
    with pytest.raises(CheckError) as caught:
        checker(images=np.zeros((1, 8, 8, 3)), clip_input=clip_input(1))
    assert caught.value.unreachable and "127.0.0.1:" in str(caught.value)
    assert 0 < sum(clock.sleeps) <= CONNECT_DEADLINE_S and checker.client.attempts == len(clock.sleeps) + 1
    assert checker.client.timeout_s == checker.client.deadline_s == TIMEOUT_S == 30
    assert "30 s" in TritonSafetyChecker.__doc__ and "20 s" in TritonSafetyChecker.__doc__


def test_on_error_block_blacks_out_every_image_and_flags_it():
    vae_images = torch.rand(3, 3, 64, 64) * 2 - 1
    images, flags = unreachable(on_error="block", action="none")(images=vae_images.clone(), clip_input=clip_input(3))
    assert flags == [True, True, True]
    assert torch.equal(images, torch.zeros_like(vae_images))
    arrays = np.random.default_rng(0).random((2, 32, 32, 3))
    images, flags = unreachable(on_error="block")(images=arrays, clip_input=clip_input(2).numpy())
    assert flags == [True, True] and not images.any()


def test_only_the_images_without_an_answer_are_blocked_or_the_call_raises():
    arrays = np.random.default_rng(4).random((3, 16, 16, 3)).astype(np.float32)
    original = arrays.copy()
    checker = unreachable(on_error="block", action="none")
    checker.client = FakeClient([False, None, True])
    images, flags = checker(images=arrays, clip_input=clip_input(3))
    assert flags == [False, True, True]  # the one without an answer counts as flagged
    assert np.array_equal(images[0], original[0]) and np.array_equal(images[2], original[2])  # "none"
    assert not images[1].any()  # blocked: black, whatever the action
    assert [r is None for r in checker.last_results] == [False, True, False]
    checker = unreachable()
    checker.client = FakeClient([False, None, True])
    with pytest.raises(CheckError, match="unavailable"):
        checker(images=arrays, clip_input=clip_input(3))
    assert checker.last_results == []


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="action"):
        TritonSafetyChecker("127.0.0.1:1", action="hide")
    with pytest.raises(ValueError, match="on_error"):
        TritonSafetyChecker("127.0.0.1:1", on_error="ignore")
    with pytest.raises(ValueError, match="2 images"):
        unreachable()(images=np.zeros((3, 8, 8, 3)), clip_input=clip_input(2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_clip_input_of_any_float_dtype_goes_as_float32(dtype):
    checker = unreachable()
    checker.client = FakeClient([False, True])
    pixels = clip_input(2, dtype)
    images, flags = checker(images=np.ones((2, 8, 8, 3)), clip_input=pixels)
    sent, strictness = checker.client.sent
    assert sent.dtype == np.float32 and np.array_equal(sent, pixels.float().numpy()) and strictness is None
    assert flags == [False, True] and images[0].all() and not images[1].any()


def test_torch_flagged_images_come_back_in_zero_one_as_the_pipeline_expects():
    """The pipeline skips denormalising flagged images: "none", "blur" and "pixelate" return them in [0, 1]."""
    vae = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1)) * 2.2 - 1.1
    shown = (vae * 0.5 + 0.5).clamp(0, 1)
    for action in ("black", "none", "blur", "pixelate"):
        checker = unreachable(action=action)
        checker.client = FakeClient([True, False])
        images, flags = checker(images=vae.clone(), clip_input=clip_input(2))
        assert flags == [True, False]
        assert torch.equal(images[1], vae[1])  # not flagged: untouched
        expected = {
            "black": torch.zeros_like(vae[0]),
            "none": shown[0],
            "blur": torch.from_numpy(blur(shown[0].numpy(), channels_first=True)),
            "pixelate": torch.from_numpy(pixelate(shown[0].numpy(), channels_first=True)),
        }[action]
        assert torch.equal(images[0], expected), action


def test_numpy_flagged_images_are_replaced_in_place():
    arrays = np.random.default_rng(2).random((2, 40, 30, 3)).astype(np.float32)
    original = arrays.copy()
    checker = unreachable(action="pixelate")
    checker.client = FakeClient([False, True])
    images, _ = checker(images=arrays, clip_input=clip_input(2))
    assert images is arrays and np.array_equal(images[0], original[0])
    assert np.array_equal(images[1], pixelate(original[1]))
    as_list = [np.full((16, 16, 3), 200, np.uint8), np.full((16, 16, 3), 7, np.uint8)]
    checker.action = "blur"
    images, _ = checker(images=as_list, clip_input=clip_input(2))
    assert images[1].dtype == np.uint8 and (images[1] == 7).all() and (images[0] == 200).all()


def test_blur_and_pixelate_hide_detail_and_keep_colour():
    rng = np.random.default_rng(3)
    image = rng.random((96, 128, 3)).astype(np.float32)
    for filtered in (blur(image), pixelate(image)):
        assert filtered.shape == image.shape and filtered.dtype == np.float32
        assert abs(filtered.mean() - image.mean()) < 0.01
        assert np.abs(np.diff(filtered, axis=1)).mean() < 0.1 * np.abs(np.diff(image, axis=1)).mean()
    blocks = pixelate(image)
    assert len(np.unique(blocks[..., 0])) <= 16 * 22  # 6-pixel blocks: 16 x 22 of them
    assert np.array_equal(blur(np.full((20, 20, 3), 0.25, np.float32)), np.full((20, 20, 3), 0.25, np.float32))
    chw = np.moveaxis(image, -1, 0)
    assert np.allclose(np.moveaxis(blur(chw, channels_first=True), 0, -1), blur(image), atol=1e-6)


def test_strictness_goes_with_every_request():
    checker = unreachable(strictness="strong")
    checker.client = FakeClient([False])
    checker(images=np.zeros((1, 8, 8, 3)), clip_input=clip_input(1))
    assert checker.client.sent[1] == "strong"


def test_numpy_callers_never_import_torch_or_diffusers():
    script = (
        "import sys, numpy as np\n"
        "from safety_checker_diffusers import TritonSafetyChecker\n"
        "from safety_checker_client.client import CheckResult\n"
        "c = TritonSafetyChecker('127.0.0.1:1', action='blur')\n"
        "class Fake:\n"
        "    def check_each(self, batch, strictness=None):\n"
        "        return [CheckResult(True, [0.0] * 17, [0.0] * 3, np.zeros(2))] * len(batch)\n"
        "c.client = Fake()\n"
        "c(images=np.ones((2, 8, 8, 3)), clip_input=np.zeros((2, 3, 224, 224), np.float32))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
