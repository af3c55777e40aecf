"""The gateway's client to vLLM: HTTP/1.1 on asyncio with httptools' parser (llhttp, in C), a pool
of kept-alive connections, and nothing else.

Why not httpx here: measured on the simulated cluster (bench/gateway_bench.py and a raw-socket
client), a hop through httpx added ~3-4 ms to a 25 ms time to first token on 2 shared cores, most
of it httpx/httpcore's pure-Python work per request; this client adds ~0.5-1.5 ms. It speaks to one
server (vLLM's API, or the endpoint cluster.yaml names), so it needs little: request head and body
written at once, the response head, its body chunk by chunk as it arrives (chunked or sized,
decoded by httptools), a connection returned to the pool only after a whole answer, and a
connection closed when its answer is abandoned (vLLM aborts a request whose client is gone).

An answer's head, its chunks' framing and its trailers together stay within the gateway's
max_head (an engine or a proxy sending an endless header costs no memory: the answer fails).

Failures are typed for the gateway's one question, "did anything reach the client yet?":
`ConnectFailed` (refused, unreachable, connect or pool deadline), `ConnectionLost` (reset or
closed before the answer was whole), `ReadTimeout` (silence longer than the read deadline).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import AsyncIterator, Callable, Optional
from urllib.parse import urlsplit

import httptools

# a connection stops reading from vLLM while this many chunks wait for a slow client, and reads again below LOW
HIGH_WATER, LOW_WATER = 64, 16
# A chunk's own framing (its size in hex, two line ends, a short extension): what a chunked body may carry
# besides its bytes, per chunk, on top of the bound of a head (which its trailers count against too)
CHUNK_FRAMING = 32


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    """No connection (refused, unreachable, the connect or pool deadline passed): nothing was sent."""


class ConnectionLost(UpstreamError):
    """The connection ended (reset, closed, unparsable) before the answer was whole."""


class ReadTimeout(UpstreamError):
    """vLLM was silent for longer than the read deadline."""


_END = object()


ONE_WRITE_BELOW = 16384  # a body smaller than this goes out with the head in one write; a larger one is not copied

class _Conn(asyncio.Protocol):
    """One kept-alive connection; one exchange at a time."""

    def __init__(self, read_timeout_s: float, max_head: int):
        self.read_timeout_s = read_timeout_s
        self.max_head = max_head
        self.loop = asyncio.get_running_loop()  # made by create_connection, in the loop
        self.transport: Optional[asyncio.Transport] = None
        self.lost = False
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: Optional[asyncio.Future[None]] = None
        self.items: deque = deque()  # body chunks, then _END or an exception
        self.waiter: Optional[asyncio.Future[None]] = None
        self.complete = False
        self.keep_alive = False
        self.no_body = False
        self.paused = False
        self.sink: Optional[Callable[[bytes], bool]] = None  # Response.splice
        self.timer: Optional[asyncio.TimerHandle] = None
        self.last_read = 0.0
        self.framing = 0  # bytes of the answer that were not its body: head, chunk framing, trailers
        self.chunks = 0

    # ---- the exchange ----------------------------------------------------------------------------
    def start(self, head: bytes, body: bytes, no_body: bool) -> asyncio.Future[None]:
        """Send a request (its body as it is: a large one is not copied into one buffer with the head)."""
        self._reset()
        self.no_body = no_body
        self.head = self.loop.create_future()
        self._arm()
        assert self.transport is not None
        if len(body) < ONE_WRITE_BELOW:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)
        return self.head

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.last_read = self.loop.time()
        self.timer = self.loop.call_at(self.last_read + self.read_timeout_s, self._timed_out)

    def _timed_out(self) -> None:
        # a read moves `last_read` only (no timer per read): the deadline is checked here
        deadline = self.last_read + self.read_timeout_s
        if self.loop.time() < deadline:
            self.timer = self.loop.call_at(deadline, self._timed_out)
            return
        self._fail(ReadTimeout(f"vLLM sent nothing for {self.read_timeout_s:g}s"))
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: UpstreamError) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
        elif not self.complete:
            self._push(exc)

    def _push(self, item: object) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if len(self.items) >= HIGH_WATER:
            self._pause()

    async def next_chunk(self) -> Optional[bytes]:
        """The next piece of the body as it arrived; None at its end."""
        while not self.items:
            self.waiter = self.loop.create_future()
            await self.waiter
        item = self.items.popleft()
        if self.paused and len(self.items) <= LOW_WATER:
            self.resume()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    # ---- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.head is None:  # bytes between exchanges: the connection is not trustworthy
            assert self.transport is not None
            self.transport.close()
            return
        self.last_read = self.loop.time()
        self.framing += len(data)  # on_body takes the body's bytes back out
        try:
            self.parser.feed_data(data)
            if self.framing > self.max_head + CHUNK_FRAMING * self.chunks and not self.complete:
                raise httptools.HttpParserError(f"its head, chunk framing or trailers are larger than {self.max_head} bytes")
        except httptools.HttpParserUpgrade:
            self._fail(ConnectionLost("vLLM answered with a protocol upgrade"))
            assert self.transport is not None
            self.transport.close()
        except httptools.HttpParserError as exc:
            self._fail(ConnectionLost(f"unparsable answer from vLLM: {exc}"))
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.lost = True
        if self.head is not None and self.head.done() and not self.complete and self._ends_at_close():
            self.on_message_complete()  # a body delimited by the connection's close (RFC 9112 6.3)
            return
        self._fail(ConnectionLost(f"vLLM's connection closed ({exc or 'by the server'})"))

    def _ends_at_close(self) -> bool:
        names = {k.lower() for k, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    # ---- httptools callbacks ------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head is not None and not self.head.done():  # after the head: a trailer, never passed on
            self.headers.append((name, value))

    def on_chunk_header(self) -> None:
        self.chunks += 1

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:  # an interim answer (100 Continue): the real one follows
            self.headers = []
            return
        assert self.head is not None
        if not self.head.done():
            self.head.set_result(None)
        if self.no_body:  # the answer to HEAD has no body whatever its length says
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        self.framing -= len(body)
        if self.complete or not body:
            return
        if self.sink is None:
            self._push(body)
        elif not self.sink(body):
            self._pause()

    def _pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()

    def on_message_complete(self) -> None:
        if self.complete or self.status < 200:
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # answered by llhttp only until the message is done
        if self.timer is not None:
            self.timer.cancel()
        self._push(_END)

    def reusable(self) -> bool:
        return (self.complete and not self.lost and not self.no_body and self.transport is not None
                and not self.transport.is_closing() and self.keep_alive)


class Response:
    """An answer whose head has arrived; its body is read with `chunks()`; `close()` ends it (the
    connection goes back to the pool only when the whole answer had arrived, else it is closed)."""

    def __init__(self, upstream: "Upstream", conn: _Conn):
        self._upstream, self._conn = upstream, conn
        self.status = conn.status
        self.headers = conn.headers
        self._closed = False

    def header(self, name: bytes) -> bytes:
        return next((v for k, v in self.headers if k.lower() == name), b"")

    async def next_chunk(self) -> Optional[bytes]:
        """The next piece of the body as it arrived (never empty: the connection keeps none); None at its end."""
        return await self._conn.next_chunk()

    def ready(self) -> list[bytes]:
        """The pieces of the body that have arrived and not been read, without waiting (its end or an
        error stays for next_chunk)."""
        conn, out = self._conn, []
        while conn.items and isinstance(conn.items[0], bytes):
            out.append(conn.items.popleft())
        if conn.paused and len(conn.items) <= LOW_WATER:
            conn.resume()
        return out

    def splice(self, sink: Callable[[bytes], bool]) -> None:
        """From here on every piece of the body goes to `sink` as it is read, in the connection's
        own callback (no task woken per piece); `next_chunk()` then returns only the end (None) or
        raises. `sink` returns False when its reader is behind: reading from vLLM pauses until
        `resume()`."""
        conn = self._conn
        keep_up = True
        while conn.items and isinstance(conn.items[0], bytes):
            keep_up = sink(conn.items.popleft())
        conn.sink = sink
        if not keep_up:
            conn._pause()
        elif not conn.items:
            conn.resume()

    def resume(self) -> None:
        """Read from vLLM again (the sink's reader caught up)."""
        if not self._closed:
            self._conn.resume()

    async def chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self.next_chunk()) is not None:
            yield chunk

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._conn.sink = None
            self._upstream._release(self._conn)


class Upstream:
    def __init__(self, url: str, *, max_connections: int, connect_timeout_s: float, read_timeout_s: float, max_head: int = 65536):
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.prefix = u.path.rstrip("/")
        self.host_header = u.netloc.rsplit("@", 1)[-1].encode("idna")
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        self.connect_timeout_s, self.read_timeout_s, self.max_head = connect_timeout_s, read_timeout_s, max_head
        self.slots = asyncio.Semaphore(max_connections)  # connections open or being opened
        self.idle: list[_Conn] = []  # kept alive, newest last

    async def send(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
        """Send one request (headers without Host, Content-Length and hop-by-hop ones); returns once
        the answer's head has arrived."""
        conn = await self._connection()
        head = [f"{method} {self.prefix}{target} HTTP/1.1\r\n".encode("latin-1"), b"host: " + self.host_header + b"\r\n"]
        head += [k + b": " + v + b"\r\n" for k, v in headers]
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        try:
            await conn.start(b"".join(head), body, no_body=method == "HEAD")
        except BaseException:
            self._release(conn)
            raise
        return Response(self, conn)

    async def _connection(self) -> _Conn:
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None and not conn.transport.is_closing() and not conn.lost:
                return conn
            self.slots.release()
        try:
            await asyncio.wait_for(self.slots.acquire(), self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise ConnectFailed(f"no free connection to vLLM within {self.connect_timeout_s:g}s") from None
        try:
            _, conn = await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(lambda: _Conn(self.read_timeout_s, self.max_head), self.host, self.port, ssl=self.ssl),
                self.connect_timeout_s)
            return conn
        except asyncio.TimeoutError:
            self.slots.release()
            raise ConnectFailed(f"no connection to {self.host}:{self.port} within {self.connect_timeout_s:g}s") from None
        except OSError as exc:
            self.slots.release()
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        except BaseException:
            self.slots.release()
            raise

    def _release(self, conn: _Conn) -> None:
        if conn.reusable():
            conn.head = None
            self.idle.append(conn)
            return
        if conn.timer is not None:
            conn.timer.cancel()
        if conn.transport is not None:
            conn.transport.close()  # an abandoned answer: vLLM sees its client leave and aborts it
        self.slots.release()

    async def get_status(self, path: str, timeout_s: float) -> Optional[int]:
        """The status of a small GET (e.g. /health), None when there is no answer in time."""
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self.send("GET", path, [], b"")
                try:
                    await resp.read()
                finally:
                    resp.close()
                return resp.status
        except (UpstreamError, TimeoutError):
            return None

    async def aclose(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()
