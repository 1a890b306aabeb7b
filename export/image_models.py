"""The images ensemble's own models: the decoder, and the step that answers each file by one of its views.

Described once in the vocabulary of `export.description`, like the models of
`export.models`; `export.ensembles` chains them with the uint8 path.
"""

from __future__ import annotations

import os

from export.description import Parameter, ServedModel, Variant, queue
from export.parameters import ENVIRONMENT, REQUEST_LIMITS
from export.queues import CPU_QUEUE_TIMEOUT_US, DECODER_MAX_QUEUE, POSTPROCESS_MAX_QUEUE, POSTPROCESS_QUEUE_TIMEOUT_US
from safety_checker_client import spec

# The decoder's CPU instances: one per core of the host the export runs on, unless the export is told
# (--decoder-instances). The committed reference configs show this many.
REFERENCE_DECODER_INSTANCES = 4


def host_decoder_instances() -> int:
    """One decoder per core this process may run on: the export's default --decoder-instances."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def decoder(decoder_instances: int = REFERENCE_DECODER_INSTANCES) -> ServedModel:
    """Image files -> uint8 images, with `decoder_instances` CPU instances (--decoder-instances)."""
    if decoder_instances < 1:
        raise ValueError(f"decoder instances must be at least 1, not {decoder_instances}")
    parameters = (
        Parameter(
            "max_encoded_bytes",
            str(spec.MAX_ENCODED_BYTES),
            """Largest image file per element, in bytes (20 MiB), raw or as what its base64
text decodes to; a larger one refuses the request.""",
        ),
        Parameter(
            "max_pixels",
            str(spec.MAX_IMAGE_PIXELS),
            """Largest width x height per image, read from the file's header before any
pixel is decoded: a decompression bomb is refused without decoding it.""",
        ),
        Parameter(
            "max_aspect_ratio",
            f"{spec.MAX_ASPECT_RATIO:g}",
            """Longest side over shortest, read from the header: a thin, tall image would grow
huge when resized to a 224 shortest side, so one beyond this is refused first.""",
        ),
        Parameter(
            "max_frames",
            str(spec.MAX_FRAMES),
            "Frames of an animation, each checked; one with more is refused, never cut short.",
        ),
        Parameter(
            "max_views",
            str(spec.MAX_BATCH_SIZE),
            """Views a request's files may make (each frame, and each frame that is not opaque
twice): the steps after the decoder take at most max_batch_size images.""",
        ),
        Parameter(
            "formats",
            ",".join(spec.IMAGE_FORMATS),
            "The formats decoded (Pillow's names); anything else (SVG, PDF, ...) is refused.",
        ),
        *REQUEST_LIMITS,
        ENVIRONMENT,
    )
    return ServedModel(
        spec.DECODE_MODEL,
        spec.DECODE_INPUTS,
        spec.DECODE_OUTPUTS,
        requirements=("pillow",),
        variants=(
            Variant(
                "python",
                f"""Image files -> every view of them as resized and cropped uint8 RGB images, the
first step of "{spec.IMAGES_MODEL}": each element is one PNG, JPEG, WebP, GIF, BMP
or TIFF file, its raw bytes or their base64 text (told apart by content),
decoded with the client's own preprocessing (safety_checker_served.decoding):
every frame, and every frame that is not opaque twice (composited, alpha
dropped). One element that cannot be checked refuses its request with
INVALID_ARG naming its index.""",
                instance_kind="KIND_CPU",
                instance_count=decoder_instances,
                comment_instances=f"""Decoding is CPU work: CPU instances on a GPU host too, one per core
({decoder_instances}, rendered by the export: --decoder-instances, default the
cores of the host it runs on).""",
                # No batching delay (each request is decoded on its own); the queue is what is bounded: fewer
                # requests than the embedder's, since each may carry 32 files of up to 20 MiB.
                batching=queue(0, DECODER_MAX_QUEUE, CPU_QUEUE_TIMEOUT_US),
                parameters=parameters,
            ),
        ),
    )


VIEWS = ServedModel(
    spec.VIEWS_MODEL,
    spec.VIEWS_INPUTS,
    spec.VIEWS_OUTPUTS,
    variants=(
        Variant(
            "python",
            f"""Every view's answer -> one answer per image file, the last step of "{spec.IMAGES_MODEL}":
a file's first flagged view answers, else its first (frame 0 as a viewer shows
it); `view` says which. It only copies rows: no batching delay.""",
            instance_kind="KIND_CPU",
            batching=queue(0, POSTPROCESS_MAX_QUEUE, POSTPROCESS_QUEUE_TIMEOUT_US),
            parameters=(*REQUEST_LIMITS, ENVIRONMENT),
        ),
    ),
)
