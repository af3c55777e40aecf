"""A local JSON webhook, where Apprise's json:// target posts: what the operator's service would receive.
`mode`: ok (200), refuse (500), hang (holds each request until stopped)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    def __init__(self, mode: str = "ok", path: str = "/hook"):
        self.mode, self.path = mode, path
        self.received: list[tuple[float, dict]] = []  # (time.time() it came, the JSON body)
        self.attempts = 0
        self.released = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.attempts += 1
                if outer.mode == "hang":
                    outer.released.wait(60)
                    return
                if outer.mode == "ok":
                    outer.received.append((time.time(), json.loads(body)))
                self.send_response(200 if outer.mode == "ok" else 500)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.server.server_address[1]}{self.path}"

    def titles(self) -> list[str]:
        return [body["title"] for _, body in self.received]

    def wait_for(self, count: int, timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return [body for _, body in self.received]

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
