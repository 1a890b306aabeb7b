"""The one description of the served networks.

Every tensor name, data type and shape that the export, the model repository
configs and the client use is defined here and nowhere else (the pattern of
TensorRT's demo/Diffusion). Shapes may name a model dimension symbolically
("num_concepts", ...); `ModelDims` resolves them for one exported checker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

# Triton model names: the checker fed CLIP pixels, uint8 images (a quarter of the bytes), or image files.
ENSEMBLE_MODEL = "safety_checker"
UINT8_ENSEMBLE_MODEL = "safety_checker_uint8"
IMAGES_MODEL = "safety_checker_images"
DECODE_MODEL = "safety_checker_decode"  # the images ensemble's first step: files -> uint8 images
NORMALIZE_MODEL = "safety_checker_normalize"
EMBEDDER_MODEL = "safety_checker_embedder"
# The cascade (`python -m export --cascade`): an int8 embedder answers first, the fp32 one where int8 is not sure.
INT8_EMBEDDER_MODEL = "safety_checker_embedder_int8"
CASCADE_MODEL = "safety_checker_cascade"
POSTPROCESS_MODEL = "safety_checker_postprocess"

# Largest batch one request (and one dynamic batch) may hold.
MAX_BATCH_SIZE = 32

# The pixel input is what CLIPImageProcessor produces for a ViT-L/14 checker.
IMAGE_SIZE = 224
NUM_CHANNELS = 3

# Files of the version folders: the embedder's and the normaliser's ONNX file; the postprocessor's thresholds
# and concept metadata, and the operator's own concepts (re-read by the running server when it changes).
ONNX_FILENAME = "model.onnx"
CONCEPTS_FILENAME = "concepts.json"
CUSTOM_CONCEPTS_FILENAME = "custom_concepts.json"
POSTPROCESS_VERSION = "1"

# diffusers' rule: once a special-care concept fires, every later score of the image gets this added.
SPECIAL_CARE_ADJUSTMENT = 0.01

# -- Strictness -------------------------------------------------------------
# A strictness adjustment is added to every score before the "> 0" test, as diffusers' `adjustment` is:
# positive flags more, negative less, every threshold (built-in, special-care, custom) alike. The presets
# are diffusers PR #9068's, measured on the concept scores of 8,000 Stable Diffusion 1.5 images: WEAK
# "maximum score", MEDIUM "average score that triggers the Safety Checker", STRONG "average of all
# scores", MAX "absolute value of the minimum score". "normal" (0.0) reproduces the reference exactly.
STRICTNESS_PRESETS = {"weak": -0.069, "medium": -0.0175, "normal": 0.0, "strong": 0.015, "max": 0.074}
DEFAULT_STRICTNESS = "normal"
# The largest |adjustment| a request may ask for.
MAX_STRICTNESS_ADJUSTMENT = 0.1
# Triton request parameters (KServe v2 "parameters") the ensemble reads; give at most one.
STRICTNESS_PARAMETER = "strictness"  # a preset name
STRICTNESS_ADJUSTMENT_PARAMETER = "strictness_adjustment"  # a number in [-0.1, 0.1]
# Key of the preset in the postprocessor's config.pbtxt `parameters`.
STRICTNESS_CONFIG_KEY = "strictness"

Dim = Union[int, str]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor without its batch dimension (Triton's `dims`)."""

    name: str
    datatype: str  # KServe v2 datatype; config.pbtxt's type is `config_type`
    dims: Tuple[Dim, ...]
    optional: bool = False  # an input a request may leave out

    @property
    def config_type(self) -> str:
        """The model config's data type: TYPE_ + datatype, except that BYTES is TYPE_STRING."""
        return "TYPE_STRING" if self.datatype == "BYTES" else f"TYPE_{self.datatype}"

    def resolve(self, dims: ModelDims) -> Tuple[int, ...]:
        return tuple(dims.value(d) for d in self.dims)


@dataclass(frozen=True)
class ModelDims:
    """The sizes of one checker that tensor shapes refer to by name."""

    num_concepts: int
    num_special: int
    projection_dim: int

    def value(self, dim: Dim) -> int:
        return dim if isinstance(dim, int) else int(getattr(self, dim))


# The published checkpoint CompVis/stable-diffusion-safety-checker.
REFERENCE_DIMS = ModelDims(num_concepts=17, num_special=3, projection_dim=768)

# -- Ensemble contract (what users call) ------------------------------------
PIXEL_VALUES = TensorSpec("pixel_values", "FP32", (NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE))
HAS_NSFW_CONCEPTS = TensorSpec("has_nsfw_concepts", "BOOL", (1,))
CONCEPT_SCORES = TensorSpec("concept_scores", "FP32", ("num_concepts",))
SPECIAL_SCORES = TensorSpec("special_scores", "FP32", ("num_special",))
IMAGE_EMBEDS = TensorSpec("image_embeds", "FP32", ("projection_dim",))
# One JSON text per image: the names of every concept whose score is > 0: built-in ones as "concept_NN",
# special-care ones as "special_care_N" (which never flag an image on their own), then custom ones by name.
FIRED_CONCEPTS = TensorSpec("fired_concepts", "BYTES", (1,))
# One JSON object per image: custom concept name -> score, scored like the built-in ones.
CUSTOM_SCORES = TensorSpec("custom_scores", "BYTES", (1,))
# One JSON object per image: custom concept name -> cosine to the image embedding (float32).
CUSTOM_COSINES = TensorSpec("custom_cosines", "BYTES", (1,))
# The `version` of the custom concept set that answered this image.
CONCEPT_SET_VERSION = TensorSpec("concept_set_version", "INT64", (1,))
# The strictness adjustment the scores were computed with (preset or request override).
STRICTNESS_ADJUSTMENT = TensorSpec("strictness_adjustment", "FP64", (1,))
# True where the answer is the fp32 checker's exactly; false where it came from an int8 embedder whose error bound
# cannot change this image's decision (scores then lie within that bound of fp32's).
EXACT_SCORES = TensorSpec("exact_scores", "BOOL", (1,))

ENSEMBLE_INPUTS = (PIXEL_VALUES,)
ENSEMBLE_OUTPUTS = (HAS_NSFW_CONCEPTS, CONCEPT_SCORES, SPECIAL_SCORES, IMAGE_EMBEDS, FIRED_CONCEPTS, CUSTOM_SCORES)
ENSEMBLE_OUTPUTS += (CUSTOM_COSINES, CONCEPT_SET_VERSION, STRICTNESS_ADJUSTMENT, EXACT_SCORES)

# -- uint8 ensemble: resized and cropped RGB images, normalised on the server --
IMAGES = TensorSpec("images", "UINT8", (IMAGE_SIZE, IMAGE_SIZE, NUM_CHANNELS))

UINT8_ENSEMBLE_INPUTS = (IMAGES,)
UINT8_ENSEMBLE_OUTPUTS = ENSEMBLE_OUTPUTS

# -- Encoded images: the files themselves, decoded on the server ---------------
# One encoded image file per batch element: its raw bytes (gRPC, HTTP's binary tensor extension) or the base64
# text of those bytes (a JSON request).
IMAGE = TensorSpec("image", "BYTES", (1,))
# One JSON object per image: which of the file's views answered, e.g. {"frame": 3, "frames": 12,
# "transparency": "dropped", "views": 13}: every frame is checked, a frame with transparency twice (composited
# onto white, and with its alpha dropped, as a pipeline's convert("RGB") sees it); the first flagged view
# answers, else frame 0 as a viewer composites it. "transparency" is null for an opaque frame.
VIEW = TensorSpec("view", "BYTES", (1,))
IMAGES_INPUTS = (IMAGE,)
IMAGES_OUTPUTS = (*ENSEMBLE_OUTPUTS, VIEW)

# The decoder's views: per row, the image's index in its request, the frame, and 1 where its alpha was dropped.
VIEWS = TensorSpec("views", "INT32", (3,))
DECODE_INPUTS = (IMAGE,)
DECODE_OUTPUTS = (IMAGES, VIEWS)
# The images ensemble's last step reduces the views' answers to one per image.
VIEWS_MODEL = "safety_checker_views"
PER_VIEW_OUTPUTS = tuple(TensorSpec(f"per_view_{t.name}", t.datatype, t.dims) for t in ENSEMBLE_OUTPUTS)
VIEWS_INPUTS = (*PER_VIEW_OUTPUTS, VIEWS)
VIEWS_OUTPUTS = IMAGES_OUTPUTS

# What the server accepts, per image; each is a config parameter of the decoder.
MAX_ENCODED_BYTES = 20 * 1024 * 1024  # the file's size (20 MiB), before any base64
MAX_IMAGE_PIXELS = 50_000_000  # width x height, read from the file's header before any pixel is decoded
# Longest side over shortest, read from the header: resized to a 224 shortest side, an image stays this long.
MAX_ASPECT_RATIO = 16
MAX_FRAMES = 16  # frames of an animation; one with more is refused, never cut short
# Formats the server opens (Pillow's names); anything else (SVG, PDF, PSD, ...) is refused.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

# -- Normaliser (an ONNX lookup table: uint8 -> CLIP pixel_values) ------------
NORMALIZE_INPUTS = (IMAGES,)
NORMALIZE_OUTPUTS = (PIXEL_VALUES,)

# -- Embedder (the exported ONNX graph) -------------------------------------
CONCEPT_COSINES = TensorSpec("concept_cosines", "FP32", ("num_concepts",))
SPECIAL_COSINES = TensorSpec("special_cosines", "FP32", ("num_special",))
# Count of NaN/Inf values in each image's pixels, computed inside the graph so
# that the postprocessor can refuse non-finite input without seeing the pixels.
NONFINITE_VALUES = TensorSpec("nonfinite_values", "INT64", (1,))

EMBEDDER_INPUTS = (PIXEL_VALUES,)
EMBEDDER_OUTPUTS = (IMAGE_EMBEDS, CONCEPT_COSINES, SPECIAL_COSINES, NONFINITE_VALUES)

# -- Postprocessor ----------------------------------------------------------
# Whether no cosine within that bound could change any decision of the image; the cascade sends the rest to fp32.
DECISION_CERTAIN = TensorSpec("decision_certain", "BOOL", (1,))
# The largest |cosine| error of the embedder that produced the cosines (0: fp32, exact). Optional: without it the
# postprocessor uses its config's bound; the cascade sends it per request.
COSINE_BOUND = TensorSpec("cosine_bound", "FP64", (1,), optional=True)
POSTPROCESS_INPUTS = (CONCEPT_COSINES, SPECIAL_COSINES, NONFINITE_VALUES, IMAGE_EMBEDS, COSINE_BOUND)
# The ensemble's outputs but the embedding, which the embedder gives, and whether the decisions are certain.
POSTPROCESS_OUTPUTS = tuple(t for t in ENSEMBLE_OUTPUTS if t is not IMAGE_EMBEDS) + (DECISION_CERTAIN,)
