"""The ensembles: the public models, each a chain of the served models of `export.models`.

`safety_checker` takes CLIP pixel_values, `safety_checker_uint8` the resized
and cropped uint8 images, `safety_checker_images` the image files themselves;
all three answer the same outputs, with the same decisions (the images
ensemble adds `view`: which view of the file answered). In a --cascade
repository the cascade takes the place of the embedder and the postprocessor.
"""

from __future__ import annotations

from typing import Tuple

from export.description import ServedModel, Step, Variant
from safety_checker_client import spec
from safety_checker_client.spec import TensorSpec


def _required(tensors: Tuple[TensorSpec, ...]) -> Tuple[TensorSpec, ...]:
    """The tensors an ensemble step must map: an optional input stays unmapped."""
    return tuple(t for t in tensors if not t.optional)


_DECODE = Step(
    spec.DECODE_MODEL,
    spec.DECODE_INPUTS,
    spec.DECODE_OUTPUTS,
    "Python: every view of each image file (frames; not opaque: composited and alpha dropped), as the client does.",
)
# In the images ensemble every view is answered as one image; these are the answers' names there.
_PER_VIEW = tuple((t.name, per_view.name) for t, per_view in zip(spec.ENSEMBLE_OUTPUTS, spec.PER_VIEW_OUTPUTS))
_VIEWS = Step(
    spec.VIEWS_MODEL,
    spec.VIEWS_INPUTS,
    spec.VIEWS_OUTPUTS,
    "Python: each file answered by its first flagged view, else by frame 0 as a viewer shows it.",
)

_EMBED = Step(
    spec.EMBEDDER_MODEL,
    spec.EMBEDDER_INPUTS,
    spec.EMBEDDER_OUTPUTS,
    "ONNX graph: CLIP vision tower, projection, cosines to the concepts.",
)
_POSTPROCESS = Step(
    spec.POSTPROCESS_MODEL,
    _required(spec.POSTPROCESS_INPUTS),
    tuple(t for t in spec.POSTPROCESS_OUTPUTS if t in spec.ENSEMBLE_OUTPUTS),
    "Python: thresholds, rounding and the special-care rule, as diffusers.",
)
_NORMALIZE = Step(
    spec.NORMALIZE_MODEL,
    spec.NORMALIZE_INPUTS,
    spec.NORMALIZE_OUTPUTS,
    "ONNX lookup table: rescale and normalise, exactly as CLIPImageProcessor.",
)
_CASCADE = Step(
    spec.CASCADE_MODEL,
    spec.ENSEMBLE_INPUTS,
    spec.ENSEMBLE_OUTPUTS,
    "Python (BLS): int8 embedder, fp32 where int8 could decide otherwise, postprocessor.",
)


def ensemble(cascade: bool = False) -> ServedModel:
    """The public contract; in a cascade repository its one step is the cascade."""
    how = "\nHere the int8/fp32 cascade answers (python -m export --cascade)." if cascade else ""
    return ServedModel(
        spec.ENSEMBLE_MODEL,
        spec.ENSEMBLE_INPUTS,
        spec.ENSEMBLE_OUTPUTS,
        steps=(_CASCADE,) if cascade else (_EMBED, _POSTPROCESS),
        variants=(
            Variant(
                "ensemble",
                f"""The guardrail's public contract: CLIP pixel_values in, per image the
decision diffusers' StableDiffusionSafetyChecker.forward() takes, the rounded
per-concept scores behind it and the projected image embedding.{how}""",
            ),
        ),
    )


def uint8_ensemble(cascade: bool = False) -> ServedModel:
    return ServedModel(
        spec.UINT8_ENSEMBLE_MODEL,
        spec.UINT8_ENSEMBLE_INPUTS,
        spec.UINT8_ENSEMBLE_OUTPUTS,
        steps=(_NORMALIZE, _CASCADE) if cascade else (_NORMALIZE, _EMBED, _POSTPROCESS),
        variants=(
            Variant(
                "ensemble",
                f"""The same checker for clients that send resized and cropped uint8
RGB images (150 KB per image instead of 602 KB of float32 pixel_values);
the server normalises them. Same outputs and decisions as "{spec.ENSEMBLE_MODEL}".""",
            ),
        ),
    )


def _per_view(step: Step) -> Step:
    """`step` with its answers under their per-view names."""
    return Step(step.model, step.inputs, step.outputs, step.comment, renamed=_PER_VIEW)


def images_ensemble(cascade: bool = False) -> ServedModel:
    checked = (_per_view(_CASCADE),) if cascade else (_per_view(_EMBED), _per_view(_POSTPROCESS))
    return ServedModel(
        spec.IMAGES_MODEL,
        spec.IMAGES_INPUTS,
        spec.IMAGES_OUTPUTS,
        steps=(_DECODE, _NORMALIZE, *checked, _VIEWS),
        variants=(
            Variant(
                "ensemble",
                f"""The same checker for the image files themselves: each element is one PNG,
JPEG, WebP, GIF, BMP or TIFF file, its raw bytes or their base64 text,
decoded on the server with the client's own preprocessing into every view a
viewer or a pipeline can see (each frame; a frame that is not opaque
composited and with its alpha dropped), each checked as "{spec.UINT8_ENSEMBLE_MODEL}"
checks an image; a file is answered by its first flagged view, else by frame
0 as a viewer shows it. The outputs of "{spec.ENSEMBLE_MODEL}", and `view`: which view
answered. A JSON request that reads outputs by position names the one it reads.""",
            ),
        ),
    )
