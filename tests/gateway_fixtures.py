"""A real gateway for the tests: uvicorn serving `Gateway(...).app` in a thread of this process, on a free port.

And the seed's own request, copied with its provenance, so that the tests send
what the seed's callers send, byte for byte. Nothing here reads ../shared.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import requests
import uvicorn

import safety_checker_admin.server as launcher
from safety_checker_gateway.app import Gateway
from safety_checker_gateway.settings import Settings

START_TIMEOUT_S = 30.0


class RunningGateway:
    """A gateway served on 127.0.0.1 for the length of a `with` block."""

    def __init__(self, settings: Settings, upstream=None) -> None:
        self.gateway = Gateway(settings, upstream)
        self.port = launcher.free_port()
        config = uvicorn.Config(
            self.gateway.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, lifespan="on"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"gateway-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RunningGateway:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            assert self._thread.is_alive(), "the gateway stopped before it started"
            assert time.monotonic() < deadline, f"the gateway did not start within {START_TIMEOUT_S:g} s"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(START_TIMEOUT_S)

    def post(self, path: str, body: bytes, headers: Optional[Dict[str, str]] = None) -> requests.Response:
        return requests.post(self.url + path, data=body, headers=headers or {}, timeout=120)

    def get(self, path: str, headers: Optional[Dict[str, str]] = None) -> requests.Response:
        return requests.get(self.url + path, headers=headers or {}, timeout=120)


# -- The seed's request -------------------------------------------------------------------------------------
# From rh-aiservices-bu/image-generation-on-openshift, stabe-diffusion-safety-checker/example_request.ipynb
# (commit 9dc0a763064928f4a0dc975f921cda82464354af), the notebook the seed runtime shipped with: its image
# preparation and `rest_request`, with the endpoint and key made arguments. `requests.post(json=...)` is what
# puts the body on the wire, so sending through it sends the notebook's bytes.


def notebook_image_string(path: Path) -> str:
    """The notebook's cell: open, convert("RGB"), save as PNG, base64."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    buffered = io.BytesIO()
    image.save(buffered, format="PNG")
    return base64.b64encode(buffered.getvalue()).decode("utf-8")


def notebook_rest_request(infer_url: str, api_key: str, data: str) -> list:
    """The notebook's `rest_request(data)`."""
    json_data = {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "String", "data": [data]}]}

    headers = {"Authorization": "Bearer " + api_key}

    response = requests.post(infer_url, json=json_data, headers=headers)
    response_dict = response.json()
    return response_dict["outputs"][0]["data"]


def studio_body(image: str) -> bytes:
    """SDXL Studio's sdxl/sdxl-studio/client/backend/src/services/image-safety-check.ts (same repository, commit
    a5be88dc62d94d886b206b4ed2821efe63bc284c) sends this object through axios, which writes JSON.stringify's
    compact text; it reads `outputs[0].data[0]` and blocks when `outputs` is missing."""
    body = {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "String", "data": [image]}]}
    return json.dumps(body, separators=(",", ":")).encode()


# -- A web server on this machine, for image URLs -----------------------------------------------------------


class ImageHost:
    """An http.server on 127.0.0.1 serving `files` by name, and `/redirect/<url>` as a 302 to that URL."""

    def __init__(self, files: Dict[str, bytes]) -> None:
        self.files = files
        self.requests = 0
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.requests += 1
                if self.path.startswith("/redirect/"):
                    self.send_response(302)
                    self.send_header("Location", self.path[len("/redirect/") :])
                    self.end_headers()
                    return
                data = host.files.get(self.path.lstrip("/"))
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", launcher.free_port()), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, name: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{name}"

    def __enter__(self) -> ImageHost:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
