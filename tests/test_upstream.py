"""The gateway's client to vLLM (spark_cluster.upstream) against a scripted HTTP server on a real
loopback socket: each test's server answers with exact bytes, so every way an answer can be
delimited, interrupted or delayed is met for real."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import pytest

from spark_cluster.upstream import ConnectFailed, ConnectionLost, ReadTimeout, Upstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    return head + (await reader.readexactly(length) if length else b"")


class Server:
    """Counts connections and the requests it read; `handler` answers each connection."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.connections = 0
        self.closed = asyncio.Event()

    async def __aenter__(self) -> "Server":
        async def on_connect(reader, writer):
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                self.closed.set()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()


def client(url: str, read_timeout_s: float = 5) -> Upstream:
    return Upstream(url, max_connections=4, connect_timeout_s=2, read_timeout_s=read_timeout_s)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def fetch(up: Upstream, path: str = "/v1/x", method: str = "POST") -> tuple[int, bytes]:
    resp = await up.send(method, path, [(b"content-type", b"application/json")], b"{}")
    try:
        return resp.status, await resp.read()
    finally:
        resp.close()


def keep_answering(*answers: bytes) -> Handler:
    async def handler(reader, writer):
        for answer in answers:
            await read_request(reader)
            writer.write(answer)
            await writer.drain()
        await reader.read()  # until the client closes
    return handler


def test_sized_and_chunked_answers_are_read_whole_over_one_kept_alive_connection():
    async def main():
        async with Server(keep_answering(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
                                         b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")) as srv:
            up = client(srv.url)
            assert await fetch(up) == (200, b"hello")
            assert await fetch(up) == (200, b"abcde")
            assert srv.connections == 1
            await up.aclose()
    run(main())


def test_the_request_reaches_the_server_with_host_length_and_prefix():
    seen = []

    async def handler(reader, writer):
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    async def main():
        async with Server(handler) as srv:
            up = client(srv.url + "/prefix/")
            assert await fetch(up) == (204, b"")
            await up.aclose()
            return srv.url
    url = run(main())
    head = seen[0].decode()
    assert head.startswith("POST /prefix/v1/x HTTP/1.1\r\n")
    assert f"host: {url.split('//')[1]}\r\n" in head and "content-length: 2\r\n" in head and head.endswith("\r\n\r\n{}")


def test_a_body_ended_by_the_close_of_the_connection_is_whole_and_the_connection_not_reused():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    async def main():
        async with Server(handler) as srv:
            up = client(srv.url)
            assert await fetch(up) == (200, b"all of it")
            assert await fetch(up) == (200, b"all of it")
            assert srv.connections == 2
    run(main())


def test_a_stale_kept_alive_connection_is_not_used_again():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()  # then the server closes it, as uvicorn does after its keep-alive timeout

    async def main():
        async with Server(handler) as srv:
            up = client(srv.url)
            assert await fetch(up) == (200, b"ok")
            await srv.closed.wait()
            await asyncio.sleep(0.05)  # the close reaches the client's loop
            assert await fetch(up) == (200, b"ok")
            assert srv.connections == 2
    run(main())


def test_an_interim_100_continue_is_skipped():
    async def main():
        async with Server(keep_answering(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")) as srv:
            assert await fetch(client(srv.url)) == (200, b"ok")
    run(main())


def test_the_answer_to_head_has_no_body_whatever_its_length_says():
    async def main():
        async with Server(keep_answering(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")) as srv:
            assert await fetch(client(srv.url), method="HEAD") == (200, b"")
    run(main())


def test_refused_connection_is_connect_failed():
    async def main():
        async with Server(keep_answering()) as srv:
            url = srv.url
        with pytest.raises(ConnectFailed, match="cannot connect"):
            await fetch(client(url))
    run(main())


def test_a_connection_reset_before_the_answer_is_lost():
    async def handler(reader, writer):
        await read_request(reader)
        writer.transport.abort()

    async def main():
        async with Server(handler) as srv:
            with pytest.raises(ConnectionLost):
                await fetch(client(srv.url))
    run(main())


def test_an_answer_cut_in_its_body_raises_while_reading_it():
    async def cut():
        async def handler(reader, writer):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await writer.drain()
            writer.transport.abort()
        async with Server(handler) as srv:
            resp = await client(srv.url).send("POST", "/v1/x", [], b"")
            chunks = resp.chunks()
            assert await chunks.__anext__() == b"abc"
            with pytest.raises(ConnectionLost):
                await chunks.__anext__()
            resp.close()
    run(cut())


def test_an_unparsable_answer_is_lost():
    async def main():
        async with Server(keep_answering(b"SPDY/9 what\r\n\r\n")) as srv:
            with pytest.raises(ConnectionLost, match="unparsable"):
                await fetch(client(srv.url))
    run(main())


def test_silence_past_the_read_deadline_is_a_read_timeout():
    async def main():
        async with Server(keep_answering(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")) as srv:
            resp = await client(srv.url, read_timeout_s=0.3).send("POST", "/v1/x", [], b"")
            chunks = resp.chunks()
            assert await chunks.__anext__() == b"hi"
            with pytest.raises(ReadTimeout):
                await chunks.__anext__()
            resp.close()
    run(main())


def test_an_abandoned_answer_closes_its_connection():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await writer.drain()
        assert await reader.read() == b""  # the client closed: vLLM aborts such a request

    async def main():
        async with Server(handler) as srv:
            up = client(srv.url)
            resp = await up.send("POST", "/v1/x", [], b"")
            resp.close()
            await asyncio.wait_for(srv.closed.wait(), 5)
            assert up.idle == []
    run(main())


def test_a_slow_reader_gets_every_chunk_in_order_while_reading_pauses():
    parts = [f"{i:05d}".encode() for i in range(2000)]

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for p in parts:
            writer.write(b"5\r\n" + p + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def main():
        async with Server(handler) as srv:
            up = client(srv.url)
            resp = await up.send("POST", "/v1/x", [], b"")
            got, paused = [], False
            async for chunk in resp.chunks():
                got.append(chunk)
                paused = paused or resp._conn.paused
                await asyncio.sleep(0)
                if len(got) % 100 == 0:
                    await asyncio.sleep(0.01)  # the server fills the buffer meanwhile
            resp.close()
            return b"".join(got), paused
    body, paused = run(main())
    assert body == b"".join(parts)
    assert paused
