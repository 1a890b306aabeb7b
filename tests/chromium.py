"""Headless Chromium driven over `--remote-debugging-pipe`: load a page, click, take screenshots.

The DevTools protocol runs over two pipes (Chromium reads commands on fd 3
and writes answers on fd 4, each message JSON ended by a NUL byte), so no
port, no websocket library and no network are involved. Clicks are real
mouse events (Input.dispatchMouseEvent) at a point on the page, so the
page's own click handler runs as it does for a person.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from typing import Any, Dict, Optional

import numpy as np

# Debian's `chromium` package; `.ci/run` installs it.
BINARY = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
)


class ChromiumError(RuntimeError):
    pass


def _above_ten(fd: int) -> int:
    """The same pipe end on a descriptor >= 10 (close-on-exec), the old one closed."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Chromium:
    """One headless browser with one page, as a context manager."""

    def __init__(self, width: int = 1200, height: int = 900, timeout_s: float = 60.0) -> None:
        if BINARY is None:
            raise ChromiumError("chromium is not installed (apt-get install chromium)")
        self.width, self.height, self.timeout_s = width, height, timeout_s
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # Out of the way of 3 and 4 first, so that the dup2s below cannot overwrite each other.
        to_browser_read, from_browser_write = _above_ten(to_browser_read), _above_ten(from_browser_write)

        def pipes_on_3_and_4() -> None:  # in the child, before exec; dup2'd descriptors stay open across it
            os.dup2(to_browser_read, 3)
            os.dup2(from_browser_write, 4)

        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [
                BINARY,
                *FLAGS,
                f"--user-data-dir={self._profile}",
                f"--window-size={width},{height}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            close_fds=False,  # Python's own descriptors are not inheritable anyway (PEP 446)
            preexec_fn=pipes_on_3_and_4,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._next_id = 0
        self._buffer = b""
        self._events: list = []
        self.session: Optional[str] = None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    # -- the protocol ---------------------------------------------------------------
    def _read_message(self, deadline: float) -> Dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChromiumError(f"no answer from chromium in {self.timeout_s:g} s; log:\n{self.log()}")
            ready, _, _ = select.select([self._from_browser], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise ChromiumError(f"chromium closed its pipe; log:\n{self.log()}")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, **params: Any) -> Dict[str, Any]:
        self._next_id += 1
        message: Dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise ChromiumError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            if "method" in answer:
                self._events.append(answer)

    def wait_for_event(self, method: str) -> Dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            for event in self._events:
                if event["method"] == method:
                    self._events.remove(event)
                    return event.get("params", {})
            self._events.append(self._read_message(deadline))

    # -- what a test does ------------------------------------------------------------
    def open(self, url: str) -> None:
        self._events.clear()
        self.send("Page.navigate", url=url)
        self.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise ChromiumError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def box(self, selector: str, scroll: bool = True) -> Dict[str, float]:
        """The element's box in viewport pixels (as drawn, transforms included), scrolled into view first."""
        found = self.evaluate(
            f"(function () {{ var e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            + (" e.scrollIntoView({block: 'center'});" if scroll else "")
            + " var r = e.getBoundingClientRect(); return {x: r.x, y: r.y, width: r.width, height: r.height}; })()"
        )
        if found is None:
            raise ChromiumError(f"no element matches {selector!r}")
        return found

    def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def settle(self) -> None:
        """Wait until the page has drawn two more frames (so a screenshot shows what just changed)."""
        self.evaluate(
            "new Promise(function (done) { requestAnimationFrame(function () { requestAnimationFrame(done); }); })"
        )

    def screenshot(self, full_page: bool = False) -> np.ndarray:
        """The viewport (or the whole page) as uint8 RGB [H, W, 3]."""
        from PIL import Image

        params: Dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.evaluate(
                "({width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight})"
            )
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            )
        data = base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-3000:]

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.send("Browser.close")
        except (ChromiumError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
