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

Bounded against careless and hostile clients (docs/bad-input.md): a request line and headers past
gateway.max_head get 431, as do a chunked body's framing and trailers past it (trailers are never
passed on); a request not complete within gateway.request_deadline_s 408; a connection past
gateway.max_clients, or past gateway.max_clients_per_peer from one address, 503; each then closed.
Blank lines before a request do not keep a connection alive (its keep-alive timeout runs until a
request begins). Request bodies held at once over every connection stay within
gateway.max_buffered (past it reading pauses), and a pipelined request's body is not read while an
earlier one is answered. A client that leaves its answer unread for gateway.client_write_timeout_s
is cut: a request nobody reads holds nothing at the engine or here.
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
from .client_bounds import BodyBudget, HeadMeter, Peers, WriteWatch

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
        self.max_head = gateway.s.max_head_bytes()
        self.request_deadline_s = gateway.s.request_deadline_s
        self.max_clients = gateway.s.max_clients
        self.write_timeout_s = gateway.s.client_write_timeout_s
        self.peers = Peers(gateway.s.max_clients_per_peer)
        self.budget = BodyBudget(gateway.s.max_buffered_bytes(), timeouts.BODY_STALL_S)
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
        self.body = bytearray()  # one copy of each byte, passed to the engine as it is
        self.size = 0  # bytes of the body held (counted in the server's BodyBudget until released)
        self.keep_alive = True
        self.too_large = False
        self.gone = Signal()
        self.no_body = False
        self.head = b""
        self.started = False
        self.complete = False
        self.on_drain: Optional[Callable[[], None]] = None

    @property
    def blocked(self) -> bool:
        """The client is not reading: its connection holds as much as it may (gateway.Writer)."""
        return self.conn.drained is not None

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
            conn.writes.write(out)
        if conn.drained is not None:  # the client reads slower than the engine writes
            await asyncio.shield(conn.drained)

    def write(self, chunk: bytes) -> bool:
        """A piece of the body at once (gateway.Writer, after the head went out); False when the
        client's buffer is full (`on_drain` is called once it has room again)."""
        conn = self.conn
        if self.gone.is_set() or conn.transport is None or conn.transport.is_closing():
            return True  # nobody to write to: the gateway is about to be told
        if out := self._framed(chunk, last=False):
            conn.writes.write(out)
        return conn.drained is None

    def _framed(self, body: bytes, last: bool) -> bytes:
        """The head if it has not gone yet, then `body` as a chunk, then the end mark if `last`."""
        out, self.head = self.head, b""
        if self.no_body:
            return out
        if body:
            out += b"%x\r\n%b\r\n" % (len(body), body)
        return out + b"0\r\n\r\n" if last else out

    def release(self) -> None:
        """The body is no longer needed: its bytes leave the server's budget."""
        if self.size:
            self.conn.server.budget.give(self.size)
            self.size = 0
        self.body = bytearray()

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
        self.deadline: Optional[asyncio.TimerHandle] = None  # the request being read must be complete by then
        self.drained: Optional[asyncio.Future[None]] = None
        self.in_head = True  # the bytes arriving are a request's line and headers
        self.meter = HeadMeter(server.max_head)
        self.starved = False  # the server's body budget is spent: not reading
        self.held_back = False  # a request's body waits until the earlier answers are done: not reading
        self.paused = False
        self.peer = ""  # the client's address
        self.counted = False  # in the server's connections (and its peer's count)
        self.writes: Optional[WriteWatch] = None

    # ---- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.writes = WriteWatch(self.transport, self.server.write_timeout_s, self._not_reading)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        server = self.server
        if len(server.connections) >= server.max_clients:
            self._refuse(503, f"more than gateway.max_clients ({server.max_clients}) connections are open: try again shortly", "max_clients")
            return
        if not server.peers.admit(self.peer):
            self._refuse(503, f"more than gateway.max_clients_per_peer ({server.peers.limit}) connections are open from this "
                              "address: try again shortly", "max_clients_per_peer")
            return
        server.connections.add(self)
        self.counted = True
        self._next()

    def data_received(self, data: bytes) -> None:
        # the idle timer keeps running until a request begins (on_message_begin): blank lines keep nothing open
        if not self.reading:
            return
        if self.in_head and self.meter.head_too_large(data):
            self._refuse(431, f"the request line and headers are larger than gateway.max_head ({self.gateway.s.max_head})", "max_head")
            return
        in_body = not self.in_head
        if in_body:
            self.meter.arrived(len(data))
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "a protocol upgrade is not answered by the gateway", "invalid")
        except httptools.HttpParserError as exc:
            self._refuse(400, f"invalid HTTP request: {exc}", "invalid")
        if in_body and not self.in_head and self.reading and self.meter.framing_too_large():
            self._refuse(431, f"the request's chunk framing and trailers are larger than gateway.max_head ({self.gateway.s.max_head})",
                         "max_head")
        self._next()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.counted:
            self.counted = False
            self.server.connections.discard(self)
            self.server.peers.leave(self.peer)
        self.server.budget.forget(self)
        for request in (self.current, self.parsing, *self.waiting):
            if request is not None:
                request.gone.set()
                if request is not self.current:  # the current one is released when its answer ends
                    request.release()
        for timer in (self.idle_timer, self.deadline):
            if timer is not None:
                timer.cancel()
        self._writable()

    def set_reading(self, *, starved: Optional[bool] = None, held_back: Optional[bool] = None) -> None:
        """Read from the client unless the body budget is spent or an earlier answer is under way."""
        if starved is not None:
            self.starved = starved
        if held_back is not None:
            self.held_back = held_back
        pause = self.starved or self.held_back or not self.reading
        if self.transport is None or pause == self.paused or self.transport.is_closing():
            return
        self.paused = pause
        if pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.drained is None:
            self.drained = self.loop.create_future()
        if self.writes is not None:
            self.writes.full()

    def resume_writing(self) -> None:
        self._writable()

    def _not_reading(self) -> None:
        """gateway.client_write_timeout_s after the client's connection filled, with nothing taken since: cut."""
        assert self.transport is not None
        log.info("cut a client (%s) that left its answer unread for gateway.client_write_timeout_s (%gs)", self.peer,
                 self.server.write_timeout_s)
        self.gateway.obs.cut("not_reading")
        self.transport.abort()  # connection_lost follows: its request is cancelled at the engine

    def _writable(self) -> None:
        if self.writes is not None:
            self.writes.room()
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
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.parsing = _Request(self)
        if self.deadline is None:
            self.deadline = self.loop.call_later(self.server.request_deadline_s, self._too_slow)

    def on_url(self, url: bytes) -> None:
        assert self.parsing is not None
        self.parsing.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.parsing is not None
        if self.in_head:  # after the head: a chunked body's trailer, counted as framing and never passed on
            self.parsing.headers.append((name, value))

    def on_chunk_header(self) -> None:
        self.meter.chunk()

    def on_headers_complete(self) -> None:
        request = self.parsing
        assert request is not None and self.transport is not None
        request.method = self.parser.get_method().decode("ascii")
        request.keep_alive = self.parser.should_keep_alive()
        self.in_head = False
        self.meter.head_done()
        if self.current is not None or self.waiting:  # pipelined: its body is read once the earlier answers are done
            self.set_reading(held_back=True)
        declared = next((v for k, v in request.headers if k.lower() == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.gateway.max_body:
            self._too_large(request)
        elif any(k.lower() == b"expect" and v.lower() == b"100-continue" for k, v in request.headers):
            if self.current is None and not self.waiting:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.meter.body(len(body))
        request = self.parsing
        if request is None or request.too_large:
            return
        if request.size + len(body) > self.gateway.max_body:
            self._too_large(request)
            return
        request.size += len(body)
        request.body += body
        self.server.budget.take(self, len(body))

    def on_message_complete(self) -> None:
        self.server.budget.whole(self)
        request, self.parsing = self.parsing, None
        self.in_head = True
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if request is None:
            return
        if len(self.waiting) >= MAX_PIPELINED:
            self._refuse(400, f"more than {MAX_PIPELINED} requests sent ahead of their answers", "invalid")
            return
        self.waiting.append(request)

    # ---- answering --------------------------------------------------------------------------------
    def _too_large(self, request: _Request) -> None:
        """Answered with 413 in its turn; what else it sends is not read (the connection closes after)."""
        request.too_large = True
        request.keep_alive = False
        request.release()
        self.waiting.append(request)
        self.parsing = None
        self.reading = False
        self.set_reading()

    def _next(self) -> None:
        """Answer the next parsed request, or close, or wait for more."""
        if self.current is not None or self.transport is None or self.transport.is_closing():
            return
        if self.held_back:
            self.set_reading(held_back=False)
        if self.waiting:
            request = self.current = self.waiting.popleft()
            task = self.loop.create_task(self._answer(request))
            self.server.tasks.add(task)
            task.add_done_callback(self.server.tasks.discard)
        elif self.closing or not self.reading:
            self.transport.close()
        elif self.parsing is None and self.idle_timer is None:
            self.idle_timer = self.loop.call_later(self.server.keep_alive_s, self._idle)

    async def _answer(self, request: _Request) -> None:
        try:
            if request.too_large:
                await self.gateway.refuse_too_large(request.send)
            elif request.target.startswith(GATEWAY_PATHS):
                await self.gateway.serve(request.method, request.target.decode("latin-1"), request.headers, request.body,
                                         request.send, request.gone, request, self.peer)
            elif request.target.split(b"?", 1)[0] == b"/health":
                door = self.gateway.door
                await request.answer(200 if door.mode == "open" else 503, json.dumps({"gateway": door.mode, "reason": door.told}).encode())
            else:
                await request.answer(404, error_body("not found: the gateway answers /v1/* (and /health); the controller's API, "
                                                     "status page and metrics are on controller.port", "not_found", 404))
        except Exception:  # noqa: BLE001 - a fault of the gateway's own: logged, the client gets an answer or a close
            log.exception("the gateway failed on %s %r", request.method, request.target)
            if not request.started:
                request.keep_alive = False
                await request.answer(500, error_body("the gateway failed", "internal_error", 500))
        finally:
            request.release()
            self.current = None
            if self.transport is not None and (not request.complete or not request.keep_alive):
                self.transport.close()
            self._next()

    def _refuse(self, status: int, message: str, why: str) -> None:
        """An answer of the server's own, then the close (when an answer is under way, only the close:
        nothing more of this client's is read). why: the bound it passed, counted."""
        assert self.transport is not None
        self.gateway.obs.cut(why)
        self.reading = False
        if self.current is None:
            body = error_body(message, HTTPStatus(status).phrase.lower().replace(" ", "_"), status)
            self.transport.write(STATUS_LINE[status] + b"content-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%b" % (len(body), body))
        self.transport.close()

    def _too_slow(self) -> None:
        if self.held_back or self.starved:  # the gateway is not reading: not the client's time
            self.deadline = self.loop.call_later(self.server.request_deadline_s, self._too_slow)
            return
        self.deadline = None
        if self.transport is not None and not self.transport.is_closing():
            self._refuse(408, f"the request was not complete within gateway.request_deadline_s ({self.server.request_deadline_s:g}s)",
                         "request_deadline")

    def evict(self) -> None:
        """The body budget needs the room this connection's stalled body holds (BodyBudget)."""
        if self.transport is not None and not self.transport.is_closing():
            self._refuse(408, f"the request's body stopped arriving for {timeouts.BODY_STALL_S:g}s while others waited for "
                              "room (gateway.max_buffered)", "request_deadline")

    def _idle(self) -> None:
        self.idle_timer = None
        if self.current is None and self.transport is not None:
            self.transport.close()
