"""The gateway's routes: the KServe runtime's, OpenAI's moderations, health and metrics.

Every route that checks images goes through `_guarded`: the Bearer token
(when one is configured), a slot among `max_concurrency` (none free: 503, or
429 on /v1, with Retry-After, at once), a body of at most `max_body_bytes`
(413), then the handler. Whatever fails becomes a JSON error in the route's
protocol, never a traceback and never a 200 without a decision; one log line
per request names the route and the status, never the body.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from typing import Awaitable, Callable, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from safety_checker_client.errors import REFUSED, CheckError
from safety_checker_gateway import moderations, seed
from safety_checker_gateway.failures import RequestError, error_response, from_check_error, overloaded
from safety_checker_gateway.fetch import Fetcher
from safety_checker_gateway.metrics import Metrics
from safety_checker_gateway.settings import Settings
from safety_checker_gateway.upstream import DECISION, Upstream

log = logging.getLogger("safety_checker_gateway")
Handler = Callable[[Request], Awaitable[Response]]

INFER = "/v2/models/{name}/infer"
MODEL_READY = "/v2/models/{name}/ready"
MODERATIONS = "/v1/moderations"


class Gateway:
    """One gateway: its settings, its upstream, its metrics. `app` is the ASGI application to serve."""

    def __init__(
        self,
        settings: Settings,
        upstream: Optional[Upstream] = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`upstream`: Triton (a stand-in in unit tests); `clock`: what latency is measured by."""
        self.settings = settings
        self.upstream = upstream or Upstream(settings.triton, settings.upstream_timeout_s)
        self.metrics = Metrics()
        self._clock = clock
        self._in_flight = 0
        self._fetcher: Optional[Fetcher] = None
        self.app = Starlette(
            routes=[
                Route(INFER, self._guarded(INFER, self.infer), methods=["POST"]),
                Route(MODEL_READY, self._plain(MODEL_READY, self.model_ready), methods=["GET"]),
                Route("/v2/health/live", self._plain("/v2/health/live", self.live), methods=["GET"]),
                Route("/v2/health/ready", self._plain("/v2/health/ready", self.ready), methods=["GET"]),
                Route(MODERATIONS, self._guarded(MODERATIONS, self.moderate), methods=["POST"]),
                Route("/metrics", self.metrics_page, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
            lifespan=self._lifespan,
        )

    @asynccontextmanager
    async def _lifespan(self, app: Starlette):
        """The gRPC channel and the HTTP client belong to the event loop that serves."""
        await self.upstream.open()
        self._fetcher = Fetcher(self.settings)
        try:
            yield
        finally:
            await self._fetcher.close()
            await self.upstream.close()

    # -- the wrapping every route shares ------------------------------------------------------------------
    def _plain(self, route: str, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            start = self._clock()
            try:
                response = await handler(request)
            except RequestError as error:
                response = error_response(request.url.path, error)
            except Exception as error:  # a bug of ours: a clear 500, the type in our log, nothing else anywhere
                log.error("%s %s failed: %s", request.method, route, type(error).__name__)
                response = error_response(
                    request.url.path, RequestError(500, "the gateway failed; nothing was checked")
                )
            self.metrics.answered(route, response.status_code, self._clock() - start)
            log.info("%s %s %d", request.method, route, response.status_code)
            return response

        return endpoint

    def _guarded(self, route: str, handler: Handler) -> Handler:
        overload_status = 429 if route.startswith("/v1/") else 503

        async def checked(request: Request) -> Response:
            self._authorize(request)
            if self._in_flight >= self.settings.max_concurrency:
                raise overloaded(overload_status)
            self._in_flight += 1
            self.metrics.in_flight.inc()
            try:
                return await handler(request)
            finally:
                self._in_flight -= 1
                self.metrics.in_flight.dec()

        return self._plain(route, checked)

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise RequestError(
                401, "a valid API key is required: Authorization: Bearer <key>", None, {"WWW-Authenticate": "Bearer"}
            )

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        too_large = RequestError(413, f"the request body is larger than the limit of {limit} bytes")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise too_large if declared.isdigit() else RequestError(400, "Content-Length is not a number")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _check(self, images, outputs, parameters=None) -> dict:
        """Triton's answer, counted; its failure as the caller's error, counted by kind."""
        try:
            answer = await self.upstream.check(images, outputs, parameters)
        except CheckError as error:
            self.metrics.upstream_errors.labels(error.kind).inc()
            if error.kind != REFUSED:
                log.warning("triton did not answer (%s): %s", error.kind, error)
            raise from_check_error(error) from None
        flagged = int(answer[DECISION].sum())
        self.metrics.decided(flagged, len(images) - flagged)
        return answer

    def _known(self, name: str) -> None:
        if name not in self.settings.model_names:
            raise RequestError(404, f"Model with name {name} does not exist.")

    async def _http_exception(self, request: Request, error: HTTPException) -> Response:
        """An unknown route or method: JSON in the protocol of its path, like every other error."""
        return error_response(request.url.path, RequestError(error.status_code, str(error.detail)))

    # -- routes -------------------------------------------------------------------------------------------
    async def infer(self, request: Request) -> Response:
        name = request.path_params["name"]
        self._known(name)
        parsed = seed.parse(await self._body(request), request.headers)
        answer = await self._check(parsed.images, seed.triton_outputs(parsed), parsed.parameters)
        return JSONResponse(seed.answer(name, parsed, answer))

    async def moderate(self, request: Request) -> Response:
        model, urls = moderations.image_urls(await self._body(request), list(self.settings.model_names))
        fetched = await asyncio.gather(
            *(self._fetcher.image(url, index) for index, url in enumerate(urls)), return_exceptions=True
        )
        for outcome in fetched:  # every fetch has ended: the first input's error is the one told
            if isinstance(outcome, BaseException):
                raise outcome
        images = list(fetched)
        answer = await self._check(images, moderations.OUTPUTS)
        return JSONResponse(moderations.answer(model, answer, len(images)))

    async def model_ready(self, request: Request) -> Response:
        name = request.path_params["name"]
        self._known(name)
        if not await self.upstream.ready():
            raise RequestError(503, f"Model with name {name} is not ready.")
        return JSONResponse({"name": name, "ready": True})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        """Ready only while Triton's images ensemble is: a probe then takes the gateway out of a rotation."""
        ready = await self.upstream.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def metrics_page(self, request: Request) -> Response:
        page, content_type = self.metrics.page()
        return Response(page, media_type=content_type)
