"""The controller's HTTP/1.1 server side: /v1/* answered by a protocol of its own, the rest by uvicorn.

uvicorn runs the controller (API, page, metrics) and is given `FrontProtocol` as its http
protocol class. A connection whose first request asks for /v1/* stays with it: each request goes
from the parser (httptools) to the gateway in one task, its answer is written to the socket as
it comes, and the client's leaving is seen in `connection_lost`. The same request through
uvicorn's ASGI took three tasks (uvicorn's, a listener for the disconnect, the exchange), ASGI
messages and uvicorn's header checks on every chunk: the largest part of the hop's CPU time, and
the hop is paid before every first token (bench/gateway_bench.py).

A connection that asks for anything else first is handed to uvicorn's own protocol with the bytes
it sent, and a /v1/* connection that later asks for another path is handed over at that request
(when it began a read: pipelined requests of two kinds on one connection are not handed over, the
connection is closed instead, and the client sends them again). The application answers /v1/*
through ASGI too (`Gateway.serve_asgi`), so every request meets the same gateway.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Callable, Optional

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .gateway import PATHS, Gateway, Signal, error_body

GATEWAY_PATHS = PATHS.encode()
MAX_PIPELINED = 16  # requests parsed while an earlier one is answered; past it the connection is closed
log = logging.getLogger("spark_cluster.front")


class _Request:
    """One request on a front connection, from its parsing to the last byte of its answer."""

    __slots__ = ("conn", "method", "target", "headers", "body", "size", "keep_alive", "too_large", "gone", "no_body",
                 "head", "started", "complete", "on_drain")

    def __init__(self, conn: "FrontProtocol", target: bytes, headers: list[tuple[bytes, bytes]]):
        self.conn = conn
        self.method = ""
        self.target = target
        self.headers = headers
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
        """ASGI's response messages, written as they come (the body chunked); the head waits for the
        body's first message and goes out with it (a write less per answer)."""
        conn = self.conn
        if self.gone.is_set() or conn.transport is None or conn.transport.is_closing():
            return  # the client is gone: as uvicorn, nothing to write to
        if message["type"] == "http.response.start":
            status = message["status"]
            head = [STATUS_LINE[status]]
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


class FrontProtocol(asyncio.Protocol):
    """uvicorn's http protocol class for the controller (`FrontProtocol.factory`)."""

    @classmethod
    def factory(cls, gateway: Callable[[], Optional[Gateway]]) -> Callable[..., asyncio.Protocol]:
        """What uvicorn's `http` option takes: it calls it with its config and state per connection.
        `gateway` gives the controller's gateway, made at the lifespan's start (uvicorn listens only
        after it)."""
        def make(config: Any, server_state: Any, app_state: dict[str, Any], _loop: Optional[asyncio.AbstractEventLoop] = None) -> FrontProtocol:
            return cls(config, server_state, app_state, _loop, gateway=gateway)
        return make

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Optional[asyncio.AbstractEventLoop] = None, *,
                 gateway: Callable[[], Optional[Gateway]]):
        self.config, self.server_state, self.app_state = config, server_state, app_state
        self.loop = _loop or asyncio.get_event_loop()
        made = gateway()
        assert made is not None, "a connection before the lifespan's start"
        self.gateway = made
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Optional[asyncio.Transport] = None
        self.received = bytearray()  # what the client sent since a read began between two requests (a hand-over replays it)
        self.begun = 0  # requests begun within `received`
        self.parsing: Optional[_Request] = None
        self.url = b""
        self.waiting: deque[_Request] = deque()  # parsed, after the one being answered (pipelined)
        self.current: Optional[_Request] = None
        self.hand_over: Optional[bool] = None  # the rest goes to uvicorn: True once it can be replayed, False when it cannot
        self.closing = False  # uvicorn is shutting down: close once the current answer is done
        self.idle_timer: Optional[asyncio.TimerHandle] = None
        self.drained: Optional[asyncio.Future[None]] = None

    # ---- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server_state.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.parsing is None and self.hand_over is None:
            self.received = bytearray(data)
            self.begun = 0
        else:
            self.received += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self.hand_over is None:  # an upgrade of a /v1/* path: not the gateway's
                self._bad_request("a protocol upgrade is not answered on the gateway's paths")
        except httptools.HttpParserError as exc:
            self._bad_request(f"invalid HTTP request: {exc}")
        self._next()

    def eof_received(self) -> Optional[bool]:
        return None  # as uvicorn: the transport closes

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.server_state.connections.discard(self)
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

    # ---- uvicorn's calls ------------------------------------------------------------------------
    def shutdown(self) -> None:
        """uvicorn stops: close now when idle, else after the answer under way."""
        self.closing = True
        if self.current is None and self.transport is not None:
            self.transport.close()

    # ---- httptools' callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.begun += 1
        self.url = b""
        self.parsing = _Request(self, b"", []) if self.hand_over is None else None  # after a hand-over: uvicorn's

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.hand_over is None and self.parsing is not None:
            self.parsing.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.parsing
        if self.hand_over is not None or request is None:
            return
        if not self.url.startswith(GATEWAY_PATHS):
            self.hand_over = self.begun == 1  # replayable only when this request began a read
            self.parsing = None
            assert self.transport is not None
            self.transport.pause_reading()
            return
        request.target = self.url
        request.method = self.parser.get_method().decode("ascii")
        request.keep_alive = self.parser.should_keep_alive()
        declared = next((v for k, v in request.headers if k.lower() == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.gateway.max_body:
            self._too_large(request)
        elif any(k.lower() == b"expect" and v.lower() == b"100-continue" for k, v in request.headers):
            assert self.transport is not None
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
        self.hand_over = False  # nothing after it is answered
        assert self.transport is not None
        self.transport.pause_reading()

    def _next(self) -> None:
        """Answer the next parsed request, or hand the connection over, or wait for more."""
        if self.current is not None or self.transport is None or self.transport.is_closing():
            return
        if self.waiting:
            request = self.current = self.waiting.popleft()
            task = self.loop.create_task(self._answer(request))
            self.server_state.tasks.add(task)
            task.add_done_callback(self.server_state.tasks.discard)
            return
        if self.closing or self.hand_over is False:
            self.transport.close()
        elif self.hand_over:
            self._to_uvicorn()
        elif self.parsing is None:
            self.idle_timer = self.loop.call_later(self.config.timeout_keep_alive, self._idle)

    async def _answer(self, request: _Request) -> None:
        try:
            if request.too_large:
                await self.gateway.refuse_too_large(request.send)
            else:
                await self.gateway.serve(request.method, request.target.decode("latin-1"), request.headers, b"".join(request.body),
                                    request.send, request.gone, request)
        except Exception:  # noqa: BLE001 - a fault of the gateway's own: logged, the client gets an answer or a close
            log.exception("the gateway failed on %s %r", request.method, request.target)
            if not request.started:
                request.keep_alive = False
                await request.send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
                await request.send({"type": "http.response.body", "body": error_body("the gateway failed", "internal_error", 500)})
        finally:
            self.current = None
            if self.transport is not None and (not request.complete or not request.keep_alive):
                self.transport.close()
            self._next()

    def _to_uvicorn(self) -> None:
        """The rest of the connection to uvicorn's own protocol, from the request that asked for another path."""
        assert self.transport is not None
        other = HttpToolsProtocol(config=self.config, server_state=self.server_state, app_state=self.app_state, _loop=self.loop)
        self.server_state.connections.discard(self)
        other.connection_made(self.transport)
        self.transport.set_protocol(other)
        self.transport.resume_reading()
        other.data_received(bytes(self.received))

    def _bad_request(self, message: str) -> None:
        """As uvicorn: 400 and close (when no answer is under way, else only the close)."""
        assert self.transport is not None
        if self.current is None:
            body = message.encode()
            self.transport.write(STATUS_LINE[400] + b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%b" % (len(body), body))
        self.transport.close()

    def _idle(self) -> None:
        self.idle_timer = None
        if self.current is None and self.transport is not None:
            self.transport.close()
