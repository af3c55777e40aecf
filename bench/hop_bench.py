#!/usr/bin/env python3
"""Benchmark: what the gateway's hop costs, without an engine's noise.

A stand-in upstream answers every completion at once (an event stream's first event, then its end),
so the time to the first byte is the hops' own: straight to it, through a bare relay (bytes copied
both ways: the floor of any proxy, bench/gateway_bench.py's) and through the gateway (its own
server, spark_cluster.front, and its client, spark_cluster.upstream; the door open), each in a
process of its own, asked in turn by one client on a kept-alive connection. Prints the medians and
p90s side by side and the hop over the relay. No cluster needed.

Usage: python -m bench.hop_bench [--requests 5000] [--rounds 10] [--split-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.fake_engine import free_ports

ROOT = Path(__file__).resolve().parent.parent

BODY = b'data: {"id": "cmpl-1", "choices": [{"index": 0, "text": "x"}]}\n\n'


def upstream(port: int, split_ms: float) -> None:
    """The stand-in vLLM: every request answered with one event, chunked, kept alive; with split_ms,
    as vLLM does, the head at once and the event that much later (the prefill)."""
    import uvloop

    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    rest = b"%x\r\n%b\r\n" % (len(BODY), BODY) + b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                asked = await r.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in asked.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
                if length:
                    await r.readexactly(length)
                if not split_ms:
                    w.write(head + rest)
                    continue
                w.write(head)
                await asyncio.sleep(split_ms / 1000)
                w.write(rest)
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


def gateway(upstream_port: int, port: int) -> None:
    """The gateway as the controller serves it, door open, nothing else."""
    import uvloop

    from spark_cluster.serving_settings import GatewaySettings
    from spark_cluster.controller import listening_socket
    from spark_cluster.front import GatewayServer
    from spark_cluster.door import Door
    from spark_cluster.gateway import Gateway

    async def main() -> None:
        gw = Gateway(f"http://127.0.0.1:{upstream_port}", GatewaySettings())
        gw.set_door(Door("open"))
        server = GatewayServer(gw, keep_alive_s=3600)
        await server.start(listening_socket("127.0.0.1", port, "gateway.port"))
        await asyncio.Event().wait()

    uvloop.run(main())


def request(body: bytes) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(body), body))


def first_byte_s(sock: socket.socket, data: bytes) -> float:
    """Send one request, time its first event (`data: {`), read the whole chunked answer."""
    t0 = time.perf_counter()
    sock.sendall(data)
    got = sock.recv(65536)
    while b"data: {" not in got:
        got += sock.recv(65536)
    t = time.perf_counter() - t0
    while not got.endswith(b"0\r\n\r\n"):
        got += sock.recv(65536)
    return t


def wait_port(port: int) -> None:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000, help="requests per target")
    ap.add_argument("--rounds", type=int, default=10, help="the targets take turns this many times")
    ap.add_argument("--split-ms", type=float, default=0, help="the stand-in's head at once, its first event this much later (as vLLM)")
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--gateway", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.upstream:
        return upstream(args.upstream, args.split_ms)
    if args.gateway:
        return gateway(*args.gateway)

    ports = dict(zip(("direct", "relay", "gateway"), free_ports(3)))
    procs = [subprocess.Popen([sys.executable, "-m", "bench.hop_bench", "--upstream", str(ports["direct"]), "--split-ms", str(args.split_ms)], cwd=ROOT),
             subprocess.Popen([sys.executable, "-m", "bench.gateway_bench", "--relay", f"127.0.0.1:{ports['direct']}", str(ports["relay"])], cwd=ROOT),
             subprocess.Popen([sys.executable, "-m", "bench.hop_bench", "--gateway", str(ports["direct"]), str(ports["gateway"])], cwd=ROOT)]
    try:
        for p in ports.values():
            wait_port(p)
        data = request(b'{"model": "m", "prompt": "p", "max_tokens": 1, "stream": true}')
        socks = {name: socket.create_connection(("127.0.0.1", p)) for name, p in ports.items()}
        for s in socks.values():
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(200):  # warm: connections to the upstream made, code paths run
                first_byte_s(s, data)
        times: dict[str, list[float]] = {name: [] for name in socks}
        per = max(1, args.requests // args.rounds)
        for i in range(args.rounds):
            for name in list(socks)[i % 3:] + list(socks)[:i % 3]:
                times[name] += [first_byte_s(socks[name], data) for _ in range(per)]
        us = {name: sorted(x * 1e6 for x in t) for name, t in times.items()}
        p50 = {n: statistics.median(v) for n, v in us.items()}
        p90 = {n: v[int(0.9 * len(v))] for n, v in us.items()}
        print(f"hop bench: {per * args.rounds} requests per target, one client, kept alive, {os.cpu_count()} cores")
        print("| | direct | bare relay | gateway | relay - direct | gateway - relay |")
        print("| --- | --- | --- | --- | --- | --- |")
        for label, q in (("first byte p50 (µs)", p50), ("first byte p90 (µs)", p90)):
            print(f"| {label} | {q['direct']:.0f} | {q['relay']:.0f} | {q['gateway']:.0f} | {q['relay'] - q['direct']:.0f} | "
                  f"{q['gateway'] - q['relay']:.0f} |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


if __name__ == "__main__":
    main()
