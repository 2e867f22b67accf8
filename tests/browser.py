"""A minimal headless-Chromium driver for the browser tests: the Chrome DevTools Protocol over a pipe.

`--remote-debugging-pipe` makes Chromium read protocol messages (JSON, each ended by a NUL byte) from its file
descriptor 3 and write replies and events to descriptor 4, so no websocket client, driver binary or network port
is needed: only Debian's `chromium` package. Input goes through `Input.*` (real key and mouse events).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-pipe"]


class BrowserError(RuntimeError):
    """The page threw, a protocol call failed, or a wait timed out."""


class Chromium:
    """One headless Chromium with one page; `close()` (or the context manager) ends the process."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900) -> None:
        assert CHROMIUM is not None, "chromium is not installed"
        to_child_read, to_child_write = os.pipe()
        from_child_read, from_child_write = os.pipe()
        # Copies above 9, so that moving them onto 3 and 4 in the child never overwrites one with the other (and
        # dup2 onto a different number makes the copy inheritable).
        child_read = fcntl.fcntl(to_child_read, fcntl.F_DUPFD_CLOEXEC, 10)
        child_write = fcntl.fcntl(from_child_write, fcntl.F_DUPFD_CLOEXEC, 10)

        def wire_descriptors() -> None:  # in the child: its fd 3 reads our commands, its fd 4 writes its replies
            os.dup2(child_read, 3)
            os.dup2(child_write, 4)

        self.process = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, close_fds=False,  # keeps the fds dup2'd to 3 and 4
                                        preexec_fn=wire_descriptors)
        for descriptor in (to_child_read, from_child_write, child_read, child_write):
            os.close(descriptor)
        self.commands = os.fdopen(to_child_write, "wb", buffering=0)
        self.replies = os.fdopen(from_child_read, "rb", buffering=0)
        self.buffer = b""
        self.next_id = 0
        self.errors: list[str] = []  # uncaught exceptions and console errors of the page
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=True)
        self.resize(width, height)

    # ------------------------------------------------------------------------------------------ protocol

    def _message(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            chunk = self.replies.read(1 << 16)
            if not chunk:
                raise BrowserError("chromium closed its pipe (crashed?)")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: bool = False) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.commands.write(json.dumps(message).encode("utf-8") + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._event(reply)

    def _event(self, event: dict[str, Any]) -> None:
        params = event.get("params", {})
        if event.get("method") == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", "?"))
        elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(params["entry"]["text"])

    # ------------------------------------------------------------------------------------------ page

    def resize(self, width: int, height: int) -> None:
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, session=True)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails'].get('text')} "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Poll until `expression` is truthy; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except BrowserError:
                value = None  # e.g. the page is between documents
            if value:
                return value
            time.sleep(0.1)
        raise BrowserError(f"timed out after {timeout} s waiting for {expression}")

    def point(self, selector: str, fx: float = 0.5, fy: float = 0.5) -> tuple[float, float]:
        """Viewport coordinates of the point at fractions (fx, fy) of the first element matching `selector`
        (scrolled into view)."""
        return self.wait_for(f"""(() => {{ const node = document.querySelector({json.dumps(selector)});
            if (!node) return null; node.scrollIntoView({{block: "center"}});
            const r = node.getBoundingClientRect(); return r.width ? [r.x + r.width * {fx}, r.y + r.height * {fy}] : null;
            }})()""")

    def click(self, selector: str) -> None:
        """A real left click at the centre of the first element matching `selector`."""
        x, y = self.point(selector)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
                      session=True)

    def hover(self, selector: str, fx: float, fy: float) -> None:
        """Move the mouse to fractions (fx, fy) of the element's box."""
        x, y = self.point(selector, fx, fy)
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y}, session=True)

    def type_into(self, selector: str, text: str) -> None:
        """Replace the field's content with `text` as typing does (focus, select all, insert: input events fire)."""
        self.click(selector)
        self.evaluate(f"document.querySelector({json.dumps(selector)}).select()")
        self.send("Input.insertText", {"text": text}, session=True)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.commands.close()
        self.replies.close()

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
