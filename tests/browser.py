"""A real headless browser for tests of web pages: Debian's Chromium, driven over the Chrome
DevTools Protocol (a websocket per page). Only loopback addresses are opened."""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, width: int = 1400, height: int = 1000, nice: bool = False):
        """nice: at the lowest CPU priority (beside engines whose speed the test measures)."""
        exe = chromium()
        assert exe, "chromium is not installed (make sim-deps installs Debian's package)"
        self.profile = tempfile.mkdtemp(prefix="chromium-test-")
        self.proc = subprocess.Popen(
            [*(["nice", "-n", "19"] if nice else []), exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-default-browser-check",
             f"--window-size={width},{height}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        self.port = None
        while self.port is None:
            assert time.monotonic() < deadline and self.proc.poll() is None, "chromium did not start"
            line = self.proc.stderr.readline()
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                self.port = int(m.group(1))

    def page(self) -> "Page":
        targets = httpx.get(f"http://127.0.0.1:{self.port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        return Page(page["webSocketDebuggerUrl"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    def __init__(self, ws_url: str):
        self.stack = ExitStack()
        self.ws = self.stack.enter_context(connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=10))
        self.ids = itertools.count(1)
        self.console: list[str] = []
        self.call("Runtime.enable")

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(msg["params"]["exceptionDetails"])[:500])
            if msg.get("id") == msg_id:
                assert "error" not in msg, msg["error"]
                return msg.get("result", {})

    def goto(self, url: str) -> None:
        assert url.startswith("http://127.0.0.1:"), url
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def eval(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(f"(() => {{ try {{ return {expression}; }} catch (e) {{ return false; }} }})()")  # not loaded yet
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"the page never showed {what} within {timeout}s; errors: {self.console}")

    def log_in(self, token: str) -> None:
        """The status page asks for the API token once (events and incidents need it): give it."""
        self.wait("!document.getElementById('login').hidden", 30, "the page asking for the token")
        self.eval(f"document.getElementById('token').value = {json.dumps(token)}; document.getElementById('login').requestSubmit()")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.stack.close()
