"""What the benchmark feeds its candidates: real photographs, as pixels and as image files."""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from bench.settings import CASCADE_IMAGES
from fixtures.photos import PHOTOS, photo, photo_file
from safety_checker_client import spec
from safety_checker_client.preprocess import preprocess

# What safety_checker_images is fed, directly and through the gateway: every photo as PNG and as JPEG, at its
# own size (300x451 to 1411x1411).
ENCODED_FORMATS = ("png", "jpeg")
# What the decoder alone decodes: a 512x512 photograph.
DECODER_PHOTO = "astronaut"


def bench_pixels() -> np.ndarray:
    """Real photographs through the client's preprocessing: 8 images, the largest in-process batch."""
    images = [photo(name) for name in PHOTOS]
    return preprocess(images + [images[0][:, ::-1]])


def encoded_files() -> List[bytes]:
    """Every photo as each of ENCODED_FORMATS, in the order the image-file rows send them."""
    return [photo_file(name, extension) for name in PHOTOS for extension in ENCODED_FORMATS]


def encoded_requests() -> List[Dict[str, np.ndarray]]:
    """One request per file (batch 1), each client sending them in turn."""
    return [{spec.IMAGE.name: np.array([[data]], dtype=object)} for data in encoded_files()]


def cascade_images() -> List[np.ndarray]:
    """CASCADE_IMAGES real photographs for the cascade rows: each photo, then mirrored, then upside down."""
    images = [photo(name) for name in PHOTOS]
    return (images + [i[:, ::-1] for i in images] + [i[::-1] for i in images])[:CASCADE_IMAGES]


def decoder_photo_size() -> str:
    """The decoder photo's height x width, as the decoder rows name it."""
    return "x".join(str(d) for d in photo(DECODER_PHOTO).shape[:2])
