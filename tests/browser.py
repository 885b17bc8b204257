"""Headless Chromium driven over the Chrome DevTools Protocol, for the playground's end-to-end test.

Standard library and httpx only: Playwright's browser download fails here and Selenium needs a chromedriver, while
a WebSocket client that only talks to a local Chromium (no TLS, no extensions, unfragmented text
frames) is a few dozen lines. Protocol reference: https://chromedevtools.github.io/devtools-protocol/
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx

__all__ = ["Browser", "BrowserError", "Page", "find_chromium"]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(Exception):
    pass


def find_chromium() -> str | None:
    """$CHROMIUM, else the first Chromium or Chrome on PATH."""
    for name in (os.environ.get("CHROMIUM"), *_CANDIDATES):
        if name and (path := shutil.which(name)):
            return path
    return None


class _WebSocket:
    """RFC 6455, client side, text frames only."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self._socket = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self._socket.sendall(
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self._file = self._socket.makefile("rb")
        status = self._file.readline()
        if b" 101 " not in status:
            raise BrowserError(f"WebSocket handshake with {url} failed: {status!r}")
        while self._file.readline() not in (b"\r\n", b""):
            pass

    def send(self, text: str, opcode: int = 0x1) -> None:
        payload = text.encode()
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        mask = os.urandom(4)  # a client must mask every frame
        self._socket.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._read(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._read(8))
            payload = self._read(length)  # a server never masks
            opcode = first & 0x0F
            if opcode == 0x8:
                raise BrowserError("the browser closed the DevTools connection")
            if opcode == 0x9:
                self.send(payload.decode(), opcode=0xA)
                continue
            message += payload
            if first & 0x80 and opcode in (0x0, 0x1, 0x2):
                return message.decode()

    def _read(self, size: int) -> bytes:
        data = self._file.read(size)
        if len(data) < size:
            raise BrowserError("the DevTools connection ended")
        return data

    def close(self) -> None:
        self._file.close()
        self._socket.close()


class Page:
    """One tab. `errors` collects uncaught exceptions and console.error calls seen while waiting on a reply."""

    def __init__(self, websocket_url: str, timeout: float = 10) -> None:
        self._socket = _WebSocket(websocket_url, timeout)
        self._last_id = 0
        self.errors: list[str] = []
        self.call("Runtime.enable")
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._last_id += 1
        ident = self._last_id
        self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._observe(message)

    def _observe(self, event: dict[str, Any]) -> None:
        params = event.get("params", {})
        if event.get("method") == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"]))

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (a promise is awaited); a thrown error raises BrowserError."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10, interval: float = 0.05) -> Any:
        """Poll `expression` until it is truthy in JavaScript; return its value."""
        # Truthiness is decided in the page: a DOM node comes back as {}, which Python finds falsy.
        deadline = time.monotonic() + timeout
        while (
            found := self.evaluate(f"(() => {{ const value = ({expression}); return value ? [value] : null; }})()")
        ) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"still falsy after {timeout}s: {expression}")
            time.sleep(interval)
        return found[0]

    def goto(self, url: str, timeout: float = 10) -> None:
        """Navigate (or reload, for the current URL) and wait until the new document has loaded."""
        # The mark lives in the old document's window, so it is gone once the new one is in place.
        self.evaluate("window.__leaving = true")
        self.call("Page.navigate", url=url)
        self.wait_for("!window.__leaving && document.readyState === 'complete'", timeout)

    def text(self, selector: str) -> str | None:
        """The text of the last element matching `selector`, or None."""
        return self.evaluate(f"[...document.querySelectorAll({json.dumps(selector)})].at(-1)?.textContent ?? null")

    def click(self, selector: str) -> None:
        """A real mouse click (pressed and released) in the middle of the element."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
        )
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        """Focus the element and insert `text` as typed input."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        common = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
        self.call("Input.dispatchKeyEvent", type="keyDown", text="\r", **common)
        self.call("Input.dispatchKeyEvent", type="keyUp", **common)

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    def close(self) -> None:
        self._socket.close()


class Browser:
    """A headless Chromium in its own session with a fresh profile; `close()` kills its process group."""

    def __init__(self, executable: str, profile: Path, *, size: tuple[int, int] = (1280, 800)) -> None:
        self.executable = executable
        self.profile = profile
        self.size = size
        self.log_path = profile.parent / f"{profile.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.pages: list[Page] = []

    def start(self, timeout: float = 20) -> Browser:
        command = [
            self.executable,
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
            "--no-default-browser-check", "--disable-dev-shm-usage", "--hide-scrollbars",
            f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--window-size={self.size[0]},{self.size[1]}", "about:blank",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        # With port 0, Chromium writes the port it chose to this file.
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BrowserError(f"Chromium did not start: {self.log_tail()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text().splitlines()[0])
        return self

    def page(self) -> Page:
        """The tab Chromium opened at start."""
        # trust_env=False: a proxy from the environment must not sit between us and 127.0.0.1.
        targets = httpx.get(f"http://127.0.0.1:{self.port}/json/list", timeout=5, trust_env=False).json()
        target = next(t for t in targets if t["type"] == "page")
        page = Page(target["webSocketDebuggerUrl"])
        # The viewport of a headless window is smaller than --window-size; screenshots get exactly `size`.
        width, height = self.size
        page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.pages.append(page)
        return page

    def close(self) -> None:
        for page in self.pages:
            page.close()
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        try:  # Chromium's zygote and renderers share its process group
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
