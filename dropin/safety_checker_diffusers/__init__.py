"""A drop-in for diffusers' `StableDiffusionSafetyChecker` that asks the checker served by Triton instead.

    from safety_checker_diffusers import TritonSafetyChecker

    pipe.safety_checker = TritonSafetyChecker("triton:8001", protocol="grpc", action="black", strictness=None)

Images come as the pipeline passes them: a torch tensor [N, C, H, W] fresh
from the VAE, in [-1, 1], or numpy [N, H, W, C] in [0, 1] (older pipelines).
The pipeline does not denormalise images it was told are flagged, so a
flagged torch image that is blurred, pixelated or kept ("none") comes back
already in [0, 1], and the user sees the picture they asked for. Neither
torch nor diffusers is a dependency: torch is imported only when the caller
passes torch tensors, and diffusers never.
"""

from safety_checker_diffusers.checker import ON_ERROR, TritonSafetyChecker
from safety_checker_diffusers.filters import ACTIONS, blur, pixelate

__all__ = ["ACTIONS", "ON_ERROR", "TritonSafetyChecker", "blur", "pixelate"]
