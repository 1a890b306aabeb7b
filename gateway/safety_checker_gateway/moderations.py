"""OpenAI's moderation API, answered by the checker, with every field saying no more than the checker knows.

The checker decides one thing per image: whether a concept of the sexual kind
fired. So `flagged` and `categories.sexual` are that decision, exactly;
`category_scores.sexual` is the checker's margin (its highest concept score,
which is > 0 exactly when it flags) mapped linearly onto [0, 1] so that 0.5
is the threshold: a margin-derived number, not a probability. Every other
category was not assessed: false, 0.0, and applied to no input type (OpenAI's
own way of saying so). The checker's whole answer rides along in the
extension field `safety_checker`. One result per image part, in order.
"""

from __future__ import annotations

import json
import uuid
from typing import Dict, List, Mapping

import numpy as np

from safety_checker_client import spec
from safety_checker_client.client import RECORD_OUTPUTS, CheckResult, result_from
from safety_checker_gateway.failures import bad_request

REQUEST_FIELDS = ("input", "model")
PART_FIELDS = ("type", "image_url")
IMAGE_URL_FIELDS = ("url",)
# OpenAI's categories, in its order; the checker assesses the one in ASSESSED, on images.
CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
ASSESSED = "sexual"
# The margin that maps to a score of 0 or 1: the largest strictness adjustment, which moves every margin by
# at most this much, so a score says how far a decision is from flipping at the strictest or loosest setting.
SCORE_SPAN = spec.MAX_STRICTNESS_ADJUSTMENT
OUTPUTS = RECORD_OUTPUTS  # the checker's whole answer but the embedding and the raw cosines
EXTENSION_FIELD = "safety_checker"


def image_urls(body: bytes, model_names: List[str]) -> tuple:
    """(the model answering, the image URLs in order) of a moderation request; a 400 naming what is wrong."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(request, dict):
        raise bad_request("the request must be a JSON object")
    extra = [name for name in request if name not in REQUEST_FIELDS]
    if extra:
        raise bad_request(f"unknown field(s) {', '.join(repr(n) for n in extra)}; known: input, model", extra[0])
    model = request.get("model", model_names[0])
    if model not in model_names:
        raise bad_request(f"unknown model {model!r}; this gateway serves {', '.join(model_names)}", "model")
    parts = request.get("input")
    if isinstance(parts, str) or (isinstance(parts, list) and any(isinstance(p, str) for p in parts)):
        raise bad_request("text input is not supported: this model checks images; send image_url parts", "input")
    if not isinstance(parts, list) or not parts:
        raise bad_request("'input' must be a non-empty list of image_url parts", "input")
    if len(parts) > spec.MAX_BATCH_SIZE:
        raise bad_request(f"a request holds at most {spec.MAX_BATCH_SIZE} images, not {len(parts)}", "input")
    return model, [_url(part, index) for index, part in enumerate(parts)]


def _url(part: object, index: int) -> object:
    if not isinstance(part, dict):
        raise bad_request(f"input[{index}] must be an image_url part", "input")
    if part.get("type") == "text":
        raise bad_request(f"input[{index}]: text input is not supported: this model checks images", "input")
    if part.get("type") != "image_url":
        raise bad_request(f"input[{index}]: unknown part type {part.get('type')!r}; send image_url parts", "input")
    extra = [name for name in part if name not in PART_FIELDS]
    image_url = part.get("image_url")
    if not extra and isinstance(image_url, dict):
        extra = [f"image_url.{name}" for name in image_url if name not in IMAGE_URL_FIELDS]
    if extra:
        raise bad_request(f"input[{index}]: unknown field(s) {', '.join(repr(n) for n in extra)}", "input")
    if not isinstance(image_url, dict):
        raise bad_request(f"input[{index}]: image_url must be an object with a url", "input")
    return image_url.get("url")


def score(result: CheckResult) -> float:
    """The checker's margin on [0, 1]: 0.5 + margin / (2 * SCORE_SPAN), clipped; > 0.5 exactly when flagged."""
    margins = list(result.concept_scores or []) + list((result.custom_scores or {}).values())
    margin = max(margins) if margins else 0.0
    return float(np.clip(0.5 + margin / (2 * SCORE_SPAN), 0.0, 1.0))


def moderation(result: CheckResult) -> Dict[str, object]:
    """One OpenAI moderation result for one image."""
    flagged = result.flagged
    return {
        "flagged": flagged,
        "categories": {name: flagged if name == ASSESSED else False for name in CATEGORIES},
        "category_scores": {name: score(result) if name == ASSESSED else 0.0 for name in CATEGORIES},
        "category_applied_input_types": {name: ["image"] if name == ASSESSED else [] for name in CATEGORIES},
        EXTENSION_FIELD: result.as_dict(),
    }


def answer(model: str, outputs: Mapping[str, np.ndarray], count: int) -> Dict[str, object]:
    return {
        "id": f"modr-{uuid.uuid4().hex}",
        "model": model,
        "results": [moderation(result_from(dict(outputs), i)) for i in range(count)],
    }
