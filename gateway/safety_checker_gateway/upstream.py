"""Triton's `safety_checker_images`, over one pooled asyncio gRPC channel with a deadline per request.

Every failure comes out as the client's `CheckError` (classified once, by
`CheckError.from_exception`), and an answer that lacks a decision for every
image is itself an error: the routes can then never answer without one.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from safety_checker_client import spec
from safety_checker_client.errors import INTERNAL, CheckError

DECISION = spec.HAS_NSFW_CONCEPTS.name
READY_TIMEOUT_S = 5.0  # a readiness probe answers within a probe's own timeout


class Upstream:
    """The images ensemble of one Triton server. `open()` in the event loop that serves, `close()` at the end."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client = None

    async def open(self) -> None:
        """One channel for every request: gRPC multiplexes them, so no pool of connections is needed."""
        import tritonclient.grpc.aio as grpcaio

        self._client = grpcaio.InferenceServerClient(self.url)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def ready(self) -> bool:
        """Whether Triton would answer the images ensemble now; any failure to say so is "no"."""
        try:
            return bool(await self._client.is_model_ready(spec.IMAGES_MODEL, client_timeout=READY_TIMEOUT_S))
        except Exception:  # unreachable, refused, timed out: not ready, whatever the reason
            return False

    async def check(
        self, images: Sequence[bytes], outputs: Sequence[str], parameters: Optional[Mapping[str, object]] = None
    ) -> Dict[str, np.ndarray]:
        """The named outputs (the decision always among them) for image files given as raw bytes or base64 text."""
        import tritonclient.grpc as grpcclient

        batch = np.empty((len(images), 1), dtype=object)
        batch[:, 0] = list(images)
        tensor = grpcclient.InferInput(spec.IMAGE.name, list(batch.shape), "BYTES")
        tensor.set_data_from_numpy(batch)
        names = [DECISION, *(name for name in outputs if name != DECISION)]
        try:
            result = await self._client.infer(
                spec.IMAGES_MODEL,
                [tensor],
                outputs=[grpcclient.InferRequestedOutput(name) for name in names],
                parameters=dict(parameters) if parameters else None,
                client_timeout=self.timeout_s,
            )
        except Exception as error:  # tritonclient's, grpc's or a socket's: classified in one place
            raise CheckError.from_exception(error, "triton") from error
        answer = {name: result.as_numpy(name) for name in names}
        if any(value is None or len(value) != len(images) for value in answer.values()):
            raise CheckError("triton: the answer lacks an output asked for, or a row of one", INTERNAL)
        return answer
