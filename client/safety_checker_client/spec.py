"""The one description of the served networks.

Every tensor name, data type and shape that the export, the model repository
configs and the client use is defined here and nowhere else (the pattern of
TensorRT's demo/Diffusion). Shapes may name a model dimension symbolically
("num_concepts", ...); `ModelDims` resolves them for one exported checker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

# Triton model names.
ENSEMBLE_MODEL = "safety_checker"
# The same checker fed uint8 images (4x less on the wire than float32 pixels).
UINT8_ENSEMBLE_MODEL = "safety_checker_uint8"
NORMALIZE_MODEL = "safety_checker_normalize"
EMBEDDER_MODEL = "safety_checker_embedder"
POSTPROCESS_MODEL = "safety_checker_postprocess"

# Largest batch one request (and one dynamic batch) may hold.
MAX_BATCH_SIZE = 32

# The pixel input is what CLIPImageProcessor produces for a ViT-L/14 checker.
IMAGE_SIZE = 224
NUM_CHANNELS = 3

# The ONNX file inside the embedder's and the normaliser's version folders.
ONNX_FILENAME = "model.onnx"
# The thresholds and concept metadata inside the postprocessor's version folder.
CONCEPTS_FILENAME = "concepts.json"

Dim = Union[int, str]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor without its batch dimension (Triton's `dims`)."""

    name: str
    datatype: str  # KServe v2 datatype, also config.pbtxt's type without "TYPE_"
    dims: Tuple[Dim, ...]

    def resolve(self, dims: "ModelDims") -> Tuple[int, ...]:
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

ENSEMBLE_INPUTS = (PIXEL_VALUES,)
ENSEMBLE_OUTPUTS = (HAS_NSFW_CONCEPTS, CONCEPT_SCORES, SPECIAL_SCORES, IMAGE_EMBEDS)

# -- uint8 ensemble: resized and cropped RGB images, normalised on the server --
IMAGES = TensorSpec("images", "UINT8", (IMAGE_SIZE, IMAGE_SIZE, NUM_CHANNELS))

UINT8_ENSEMBLE_INPUTS = (IMAGES,)
UINT8_ENSEMBLE_OUTPUTS = ENSEMBLE_OUTPUTS

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
POSTPROCESS_INPUTS = (CONCEPT_COSINES, SPECIAL_COSINES, NONFINITE_VALUES)
POSTPROCESS_OUTPUTS = (HAS_NSFW_CONCEPTS, CONCEPT_SCORES, SPECIAL_SCORES)
