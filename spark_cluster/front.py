"""The gateway's own HTTP/1.1 server: clients' /v1/* on `gateway.port`, on public asyncio and
httptools APIs only (the control plane, API, page and metrics, is uvicorn on `controller.port`).

Each request goes from the parser (httptools) to the gateway in one task; its answer is written to
the socket as it comes, and the client's leaving is seen in `connection_lost`. Through uvicorn's
ASGI the same request took three tasks (uvicorn's, a listener for the disconnect, the exchange),
ASGI's checks on every chunk: the largest part of the hop's CPU time, and the hop is paid before
every first token (bench/gateway_bench.py). Pipelined requests are answered in order; a client
reading slower than the engine writes stops the engine's connection being read (backpressure).
Besides /v1/*, `/health` answers as vLLM's does for load balancers (200 while the door is open);
anything else is 404.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import deque
from http import HTTPStatus
from typing import Any, Callable, Optional

import httptools

from . import timeouts
from .gateway import PATHS, Gateway, Signal, error_body

GATEWAY_PATHS = PATHS.encode()
MAX_PIPELINED = 16  # requests parsed while an earlier one is answered; past it the connection is closed
BACKLOG = 2048  # connections the kernel queues before the server accepts them (clients arriving at once)
STATUS_LINE = {s.value: b"HTTP/1.1 %d %b\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
log = logging.getLogger("spark_cluster.front")


class GatewayServer:
    """The listening socket and its connections; `stop` lets answers under way finish within a grace."""

    def __init__(self, gateway: Gateway, keep_alive_s: float = timeouts.GATEWAY_KEEP_ALIVE_S):
        self.gateway = gateway
        self.keep_alive_s = keep_alive_s
        self.connections: set[GatewayProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: Optional[asyncio.AbstractServer] = None

    async def start(self, sock: socket.socket) -> None:
        """Serve on a bound socket (bound by the caller: a port in use is its error to report)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: GatewayProtocol(self), sock=sock, backlog=BACKLOG)

    async def stop(self, grace_s: float) -> None:
        """No new connections; idle ones close now, the others after their answer or at the grace's end."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = time.monotonic() + grace_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace_s)


class _Request:
    """One request on a connection, from its parsing to the last byte of its answer."""

    __slots__ = ("conn", "method", "target", "headers", "body", "size", "keep_alive", "too_large", "gone", "no_body",
                 "head", "started", "complete", "on_drain")

    def __init__(self, conn: "GatewayProtocol"):
        self.conn = conn
        self.method = ""
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.keep_alive = True
        self.too_large = False
        self.gone = Signal()
        self.no_body = False
        self.head = b""
        self.started = False
        self.complete = False
        self.on_drain: Optional[Callable[[], None]] = None

    async def send(self, message: dict[str, Any]) -> None:
        """The gateway's response messages (ASGI's shape), written as they come (the body chunked); the
        head waits for the body's first message and goes out with it (a write less per answer)."""
        conn = self.conn
        if self.gone.is_set() or conn.transport is None or conn.transport.is_closing():
            return  # the client is gone: nothing to write to
        if message["type"] == "http.response.start":
            status = message["status"]
            head = [STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status]
            for name, value in message.get("headers", ()):
                head += (name, b": ", value, b"\r\n")
            self.no_body = self.method == "HEAD" or status in (204, 304)
            if not self.no_body:
                head.append(b"transfer-encoding: chunked\r\n")
            if not self.keep_alive:
                head.append(b"connection: close\r\n")
            head.append(b"\r\n")
            self.head = b"".join(head)
            self.started = True
            return
        more = message.get("more_body", False)
        out = self._framed(message.get("body", b""), last=not more)
        if not more:
            self.complete = True
        if out:
            conn.transport.write(out)
        if conn.drained is not None:  # the client reads slower than the engine writes
            await asyncio.shield(conn.drained)

    def write(self, chunk: bytes) -> bool:
        """A piece of the body at once (gateway.Writer, after the head went out); False when the
        client's buffer is full (`on_drain` is called once it has room again)."""
        conn = self.conn
        if self.gone.is_set() or conn.transport is None or conn.transport.is_closing():
            return True  # nobody to write to: the gateway is about to be told
        if out := self._framed(chunk, last=False):
            conn.transport.write(out)
        return conn.drained is None

    def _framed(self, body: bytes, last: bool) -> bytes:
        """The head if it has not gone yet, then `body` as a chunk, then the end mark if `last`."""
        out, self.head = self.head, b""
        if self.no_body:
            return out
        if body:
            out += b"%x\r\n%b\r\n" % (len(body), body)
        return out + b"0\r\n\r\n" if last else out

    async def answer(self, status: int, body: bytes) -> None:
        """A whole JSON answer of the server's own."""
        await self.send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await self.send({"type": "http.response.body", "body": body})


class GatewayProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: GatewayServer):
        self.server = server
        self.gateway = server.gateway
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Optional[asyncio.Transport] = None
        self.parsing: Optional[_Request] = None
        self.waiting: deque[_Request] = deque()  # parsed, after the one being answered (pipelined)
        self.current: Optional[_Request] = None
        self.reading = True  # False after a 413 or a bad request: nothing more is read
        self.closing = False  # the server stops: close once the current answer is done
        self.idle_timer: Optional[asyncio.TimerHandle] = None
        self.drained: Optional[asyncio.Future[None]] = None

    # ---- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self._next()

    def data_received(self, data: bytes) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if not self.reading:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._bad_request("a protocol upgrade is not answered by the gateway")
        except httptools.HttpParserError as exc:
            self._bad_request(f"invalid HTTP request: {exc}")
        self._next()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.server.connections.discard(self)
        for request in (self.current, self.parsing, *self.waiting):
            if request is not None:
                request.gone.set()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self._writable()

    def pause_writing(self) -> None:
        if self.drained is None:
            self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        self._writable()

    def _writable(self) -> None:
        if self.drained is not None:
            if not self.drained.done():
                self.drained.set_result(None)
            self.drained = None
            if self.current is not None and self.current.on_drain is not None:
                self.current.on_drain()

    def shutdown(self) -> None:
        """The server stops: close now when idle, else after the answer under way."""
        self.closing = True
        if self.current is None and self.transport is not None:
            self.transport.close()

    # ---- httptools' callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.parsing = _Request(self)

    def on_url(self, url: bytes) -> None:
        assert self.parsing is not None
        self.parsing.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.parsing is not None
        self.parsing.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.parsing
        assert request is not None and self.transport is not None
        request.method = self.parser.get_method().decode("ascii")
        request.keep_alive = self.parser.should_keep_alive()
        declared = next((v for k, v in request.headers if k.lower() == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.gateway.max_body:
            self._too_large(request)
        elif any(k.lower() == b"expect" and v.lower() == b"100-continue" for k, v in request.headers):
            if self.current is None and not self.waiting:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        if request is None or request.too_large:
            return
        request.size += len(body)
        if request.size > self.gateway.max_body:
            self._too_large(request)
            return
        request.body.append(body)

    def on_message_complete(self) -> None:
        request, self.parsing = self.parsing, None
        if request is None:
            return
        if len(self.waiting) >= MAX_PIPELINED:
            self._bad_request(f"more than {MAX_PIPELINED} requests sent ahead of their answers")
            return
        self.waiting.append(request)

    # ---- answering --------------------------------------------------------------------------------
    def _too_large(self, request: _Request) -> None:
        """Answered with 413 in its turn; what else it sends is not read (the connection closes after)."""
        request.too_large = True
        request.keep_alive = False
        request.body = []
        self.waiting.append(request)
        self.parsing = None
        self.reading = False
        assert self.transport is not None
        self.transport.pause_reading()

    def _next(self) -> None:
        """Answer the next parsed request, or close, or wait for more."""
        if self.current is not None or self.transport is None or self.transport.is_closing():
            return
        if self.waiting:
            request = self.current = self.waiting.popleft()
            task = self.loop.create_task(self._answer(request))
            self.server.tasks.add(task)
            task.add_done_callback(self.server.tasks.discard)
        elif self.closing or not self.reading:
            self.transport.close()
        elif self.parsing is None:
            self.idle_timer = self.loop.call_later(self.server.keep_alive_s, self._idle)

    async def _answer(self, request: _Request) -> None:
        try:
            if request.too_large:
                await self.gateway.refuse_too_large(request.send)
            elif request.target.startswith(GATEWAY_PATHS):
                await self.gateway.serve(request.method, request.target.decode("latin-1"), request.headers, b"".join(request.body),
                                         request.send, request.gone, request)
            elif request.target.split(b"?", 1)[0] == b"/health":
                door = self.gateway.door
                await request.answer(200 if door.mode == "open" else 503, json.dumps({"gateway": door.mode, "reason": door.reason}).encode())
            else:
                await request.answer(404, error_body("not found: the gateway answers /v1/* (and /health); the controller's API, "
                                                     "status page and metrics are on controller.port", "not_found", 404))
        except Exception:  # noqa: BLE001 - a fault of the gateway's own: logged, the client gets an answer or a close
            log.exception("the gateway failed on %s %r", request.method, request.target)
            if not request.started:
                request.keep_alive = False
                await request.answer(500, error_body("the gateway failed", "internal_error", 500))
        finally:
            self.current = None
            if self.transport is not None and (not request.complete or not request.keep_alive):
                self.transport.close()
            self._next()

    def _bad_request(self, message: str) -> None:
        """400 and close (when no answer is under way, else only the close)."""
        assert self.transport is not None
        self.reading = False
        if self.current is None:
            body = message.encode()
            self.transport.write(STATUS_LINE[400] + b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%b" % (len(body), body))
        self.transport.close()

    def _idle(self) -> None:
        self.idle_timer = None
        if self.current is None and self.transport is not None:
            self.transport.close()
