"""The control plane's bounds: uvicorn serves the API, the page and /metrics on the gateway's event
loop, and uvicorn alone bounds none of what a peer sends (a 64 MiB header got 200 and stalled the
gateway's /health 5.7 s; trickling and idle connections stayed open). `guarded(limits)` is the HTTP
protocol uvicorn is given (its `http` setting takes a protocol class): each connection is uvicorn's
own h11 protocol behind a guard that reads the same bytes with httptools first and refuses, before
uvicorn holds anything, a head past `max_head` (431), a body past `max_body` (413), a request not
whole `deadline_s` after its first byte, blank lines included (408), a connection that sends
nothing for `idle_s`, and connections past `max_clients` or past `max_per_peer` from one address
(503). What passes reaches uvicorn unchanged."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Optional

import httptools
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import timeouts
from .client_bounds import HeadMeter, Peers

# What the control plane takes: its requests are small (a token, a cluster.yaml for a rolling change),
# its clients few (the status page, Prometheus, `up`, an operator's curl).
MAX_BODY = 2**20
MAX_CLIENTS = 256
MAX_PER_PEER = 64


@dataclass
class ControlLimits:
    max_head: int
    max_body: int
    deadline_s: float
    idle_s: float
    max_clients: int
    max_per_peer: int
    open: int = 0
    peers: Peers = field(init=False)

    def __post_init__(self) -> None:
        self.peers = Peers(self.max_per_peer)


def control_limits(max_head: int) -> ControlLimits:
    return ControlLimits(max_head=max_head, max_body=MAX_BODY, deadline_s=timeouts.CONTROL_REQUEST_S,
                         idle_s=timeouts.GATEWAY_KEEP_ALIVE_S, max_clients=MAX_CLIENTS, max_per_peer=MAX_PER_PEER)


def uvicorn_options(max_head: int) -> dict[str, Any]:
    """The settings of uvicorn.Config that serve the control plane behind the guard."""
    return {"http": guarded(control_limits(max_head)), "h11_max_incomplete_event_size": max_head,
            "timeout_keep_alive": int(timeouts.GATEWAY_KEEP_ALIVE_S)}


def guarded(limits: ControlLimits) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn.Config(http=...), bound to `limits` (shared by its connections)."""
    return type("GuardedH11", (ControlGuard,), {"limits": limits})


class ControlGuard(asyncio.Protocol):
    limits: ControlLimits

    def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Optional[asyncio.AbstractEventLoop] = None):
        self.inner = H11Protocol(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
        self.loop = _loop or asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.meter = HeadMeter(self.limits.max_head)
        self.transport: Optional[asyncio.Transport] = None
        self.peer = ""
        self.counted = False
        self.done = False  # refused: nothing more passes
        self.in_head = True
        self.body = 0
        self.answered = False  # a request reached uvicorn whole (its answer may be under way)
        self.timer: Optional[asyncio.TimerHandle] = None

    # ---- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        lim = self.limits
        if lim.open >= lim.max_clients:
            return self._refuse(503, f"more than {lim.max_clients} connections to the control plane are open")
        if not lim.peers.admit(self.peer):
            return self._refuse(503, f"more than {lim.max_per_peer} connections to the control plane are open from this address")
        lim.open += 1
        self.counted = True
        self._arm(lim.idle_s)  # a connection that never sends is closed
        self.inner.connection_made(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if self.in_head and self.meter.head_size == 0:
            self._arm(self.limits.deadline_s)  # the first byte of a request, blank lines included: it has deadline_s
        if self.in_head and self.meter.head_too_large(data):
            return self._refuse(431, f"the request line and headers are larger than {self.limits.max_head} bytes")
        if not self.in_head:
            self.meter.arrived(len(data))
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            pass  # uvicorn answers it (400) from the same bytes
        if self.done:
            return
        if not self.in_head and self.meter.framing_too_large():
            return self._refuse(431, f"the request's chunk framing and trailers are larger than {self.limits.max_head} bytes")
        self.inner.data_received(data)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.counted:
            self.counted = False
            self.limits.open -= 1
            self.limits.peers.leave(self.peer)
            self.inner.connection_lost(exc)

    def eof_received(self) -> Optional[bool]:
        return self.inner.eof_received() if self.counted else None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # ---- httptools' callbacks ---------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self.in_head = False
        self.meter.head_done()

    def on_chunk_header(self) -> None:
        self.meter.chunk()

    def on_body(self, body: bytes) -> None:
        self.meter.body(len(body))
        self.body += len(body)
        if self.body > self.limits.max_body and not self.done:
            self._refuse(413, f"the request body is larger than {self.limits.max_body} bytes")

    def on_message_complete(self) -> None:
        self.in_head, self.body, self.answered = True, 0, True
        self.meter = HeadMeter(self.limits.max_head)
        if self.timer is not None:  # what follows is uvicorn's: its keep-alive timeout, or the next request's first byte
            self.timer.cancel()
            self.timer = None

    # ---- refusing ---------------------------------------------------------------------------------
    def _arm(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(seconds, self._late)

    def _late(self) -> None:
        self.timer = None
        if self.meter.head_size or not self.in_head or not self.answered:
            self._refuse(408, f"the request was not whole within {self.limits.deadline_s:g}s")

    def _refuse(self, status: int, message: str) -> None:
        """An answer of the guard's own (unless a request went through: its answer may be under way), then the close."""
        self.done = True
        assert self.transport is not None
        if not self.answered and not self.transport.is_closing():
            body = message.encode()
            self.transport.write(b"HTTP/1.1 %d %b\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%b" % (status, HTTPStatus(status).phrase.encode(), len(body), body))
        self.transport.close()
