"""The running server a concepts command talks to: what it serves, its embeddings, and waiting for a new set.

A change is confirmed, not assumed: after writing the file the command sends
small requests until the server answers with the new set's version, or
fails with a clear error once the wait is over. The clock and the sleep of
that wait are arguments, so that tests count the requests without waiting.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from safety_checker_admin.concept_store import ConceptCommandError
from safety_checker_client import spec
from safety_checker_client.client import SafetyCheckerClient
from safety_checker_client.errors import CheckError
from safety_checker_client.preprocess import ImageError, load_image, preprocess
from safety_checker_served.concept_set import ConceptSet

# How often the wait asks the server which set it serves.
POLL_INTERVAL_S = 0.25
# How long one request may take, and a failing server's requests be sent again (after the first contact).
REQUEST_TIMEOUT_S = 60.0


def connect(url: Optional[str], protocol: str, triton=None) -> SafetyCheckerClient:
    """A client of the server at `url` (default: the client's, where make serve listens) that has answered once.

    The first request is sent once, not retried: a server that is not there is reported at once, naming the
    address, instead of after the retries a running server gets while the command waits for a new set.
    `triton`: stands in for the tritonclient module (tests)."""
    try:
        client = SafetyCheckerClient(url, protocol=protocol, timeout_s=REQUEST_TIMEOUT_S, triton=triton)
    except ValueError as error:  # a --url that is no HOST:PORT
        raise ConceptCommandError(f"--url: {error}") from None
    deadline_s, client.deadline_s = client.deadline_s, 0.0
    try:
        served(client)
    except ConceptCommandError as error:
        client.close()
        raise ConceptCommandError(
            f"{error}: is a server running there? (make serve starts one; --url HOST:PORT and --protocol say "
            "where it is)"
        ) from None
    client.deadline_s = deadline_s
    return client


def served(client: SafetyCheckerClient) -> Tuple[int, int]:
    """(served concept set version, image_embeds width) from a one-image request."""
    pixels = np.zeros((1, spec.NUM_CHANNELS, spec.IMAGE_SIZE, spec.IMAGE_SIZE), dtype=np.float32)
    try:
        answer = client.check_batch(pixels)[0]
    except CheckError as error:
        raise ConceptCommandError(f"cannot reach the server: {error}") from None
    return answer.concept_set_version, int(answer.image_embeds.shape[-1])


def check_server(client: SafetyCheckerClient, current: ConceptSet, where: Path) -> None:
    """Refuse to change a set the server at --url is evidently not serving (`where`: the set's file)."""
    version, width = served(client)
    if width != current.embedding_dim:
        raise ConceptCommandError(
            f"the server at {client.url} serves image embeddings of width {width}, but {where}'s concept set "
            f"has embedding_dim {current.embedding_dim}: is the server serving {where}?"
        )
    if version > current.version:
        raise ConceptCommandError(
            f"the server at {client.url} serves concept set version {version}, newer than {where}'s "
            f"version {current.version}: is the server serving {where}?"
        )


def wait_for_version(
    client: SafetyCheckerClient,
    version: int,
    timeout_s: float,
    path: Path,
    *,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once the server answers with concept set `version` or a newer one; ConceptCommandError after
    `timeout_s`, saying what the server answered last."""
    deadline = monotonic() + timeout_s
    while True:
        try:
            answered, _ = served(client)
        except ConceptCommandError:
            answered = None
        if answered is not None and answered >= version:
            return
        if monotonic() >= deadline:
            now = "did not answer" if answered is None else f"still serves version {answered}"
            raise ConceptCommandError(
                f"wrote version {version} to {path}, but after {timeout_s:g} s the server at {client.url} {now}: "
                "check that it serves this repository, and its log for a rejected concept set"
            )
        sleep(POLL_INTERVAL_S)


def image_embeddings(client: SafetyCheckerClient, files: Sequence[str]) -> Tuple[np.ndarray, list]:
    """(image_embeds [N, D] from the server, sha256 of each file)."""
    images, hashes = [], []
    for name in files:
        try:
            images.append(load_image(name))
            hashes.append(hashlib.sha256(Path(name).read_bytes()).hexdigest())
        except ImageError as error:
            raise ConceptCommandError(str(error)) from None
        except OSError as error:
            raise ConceptCommandError(f"cannot read image file {name!r}: {error}") from None
    try:
        results = client.check_batch(preprocess(images))
    except (CheckError, ImageError) as error:
        raise ConceptCommandError(f"cannot embed the images: {error}") from None
    return np.stack([r.image_embeds for r in results]).astype(np.float64), hashes
