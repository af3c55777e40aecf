"""What the gateway's server counts of each client to bound it (spark_cluster.front): the bytes of a
request that are not its body, the bodies held over every connection, the connections per address,
and how much of its answers a client has taken. Each is a small counter with one rule; the server
decides what to answer when one is passed."""

from __future__ import annotations

import asyncio
from typing import Callable, Optional, Protocol

from .upstream import CHUNK_FRAMING


class Reader(Protocol):
    """A connection the body budget can stop and start reading from, and close when its body stalls."""

    def set_reading(self, *, starved: Optional[bool] = None, held_back: Optional[bool] = None) -> None: ...
    def evict(self) -> None: ...


class HeadMeter:
    """The bytes of a request that are not its body: its line and headers, then (chunked) its chunks'
    framing and its trailers, all within `limit`. The parser keeps a header's (and a trailer's) whole
    value before it calls back, so the bytes are counted as they arrive, not as they are parsed."""

    def __init__(self, limit: int):
        self.limit = limit
        self.head_size = 0
        self.head_tail = b""  # the last bytes of the head so far (its end may be split between reads)
        self.framing = 0  # bytes after the head that were not body
        self.chunks = 0

    def head_too_large(self, data: bytes) -> bool:
        """Counts the bytes of the request head in `data` (up to the blank line that ends it)."""
        seen = self.head_tail + data
        end = seen.find(b"\r\n\r\n")
        self.head_size += len(data) if end < 0 else max(end + 4 - len(self.head_tail), 0)
        self.head_tail = seen[-3:]
        return self.head_size > self.limit

    def head_done(self) -> None:
        """The head is parsed: from here its body's framing is counted."""
        self.head_size, self.head_tail, self.framing, self.chunks = 0, b"", 0, 0

    def arrived(self, size: int) -> None:
        """Bytes after the head arrived (body() takes the body's own back out)."""
        self.framing += size

    def body(self, size: int) -> None:
        self.framing -= size

    def chunk(self) -> None:
        self.chunks += 1

    def framing_too_large(self) -> bool:
        return self.framing > self.limit + CHUNK_FRAMING * self.chunks


class BodyBudget:
    """Request bodies held in memory over every connection. A connection whose body takes it past
    the limit stops reading (what it already received is kept: at most one read more per
    connection) until earlier bodies are released, first starved first fed. While some starve, a
    body that has stopped arriving for `stall_s` gives its room back (its connection is `evict`ed):
    half-sent bodies cannot hold the budget until their request deadline while others wait."""

    def __init__(self, limit: int, stall_s: float):
        self.limit, self.stall_s = limit, stall_s
        self.used = 0
        self.starved: dict[Reader, None] = {}  # ordered
        self.held: dict[Reader, float] = {}  # connections holding a body still arriving -> when its last bytes came
        self.timer: Optional[asyncio.TimerHandle] = None

    def take(self, conn: Reader, size: int) -> None:
        self.used += size
        self.held[conn] = asyncio.get_running_loop().time()
        if self.used > self.limit:
            self.starved[conn] = None
            conn.set_reading(starved=True)
            self._watch()

    def whole(self, conn: Reader) -> None:
        """conn's body has arrived whole: it waits for the engine, not for its client."""
        self.held.pop(conn, None)

    def give(self, size: int) -> None:
        self.used -= size
        while self.starved and self.used < self.limit:
            conn = next(iter(self.starved))
            del self.starved[conn]
            if conn in self.held:  # it waited for room, it did not stall: its time starts again
                self.held[conn] = asyncio.get_running_loop().time()
            conn.set_reading(starved=False)

    def forget(self, conn: Reader) -> None:
        self.starved.pop(conn, None)
        self.held.pop(conn, None)

    def _watch(self) -> None:
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.stall_s / 2, self._reclaim)

    def _reclaim(self) -> None:
        """Someone starves: bodies stalled for stall_s give their room back."""
        self.timer = None
        if not self.starved:
            return
        now = asyncio.get_running_loop().time()
        for conn, last in list(self.held.items()):
            if now - last >= self.stall_s and conn not in self.starved:
                self.held.pop(conn, None)
                conn.evict()
        if self.starved:
            self._watch()


class Peers:
    """Connections open per client address, each within `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: dict[str, int] = {}

    def admit(self, peer: str) -> bool:
        if self.open.get(peer, 0) >= self.limit:
            return False
        self.open[peer] = self.open.get(peer, 0) + 1
        return True

    def leave(self, peer: str) -> None:
        left = self.open.pop(peer, 1) - 1
        if left > 0:
            self.open[peer] = left


class WriteWatch:
    """How much of its answers a client has taken: once its connection is full, `on_stuck` is called
    when it has taken nothing more for `timeout_s` (one that reads, however slowly, is watched again)."""

    def __init__(self, transport: asyncio.WriteTransport, timeout_s: float, on_stuck: Callable[[], None]):
        self.transport, self.timeout_s, self.on_stuck = transport, timeout_s, on_stuck
        self.written = 0  # bytes handed to the transport (it has sent on `written` less its buffer)
        self.mark = 0
        self.timer: Optional[asyncio.TimerHandle] = None

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.transport.write(data)

    def sent(self) -> int:
        return self.written - self.transport.get_write_buffer_size()

    def full(self) -> None:
        """The connection is full: watch it (the transport paused its writer)."""
        if self.timer is None:
            self.mark = self.sent()
            self.timer = asyncio.get_running_loop().call_later(self.timeout_s, self._check)

    def room(self) -> None:
        """It has room again, or is gone."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        self.timer = None
        # a closing transport counts too: a close waits for its buffer to be sent, which a client that
        # reads nothing never lets happen (a request refused behind an answer it left unread)
        if self.sent() > self.mark:
            self.full()  # it reads, slowly
            return
        self.on_stuck()
