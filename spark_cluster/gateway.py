"""The gateway: the OpenAI API clients use instead of vLLM's port, hiding failover.

What routers in front of vLLM learned (docs/field.md, "Routers in front of vLLM"), as rules:
- Hold, don't fail: while the cluster is not serving (starting, backing off, restarting, a hang
  confirmed) new requests wait, bounded by `gateway.hold_s` and `gateway.max_held`, then 503
  with Retry-After. When the watchdog has given up (circuit breaker), 503 at once.
- Retry only before the first byte: a request that failed on the engine before anything reached
  its client is sent again once the engine serves; a stream that already sent bytes is never
  replayed: it ends with an error event and a clean close.
- When the watchdog confirms a hang, what is in flight is acted on at once (streams get their
  error event, requests that received nothing go back to waiting).
- A client that goes away cancels its request upstream (the connection to vLLM is closed, and
  vLLM aborts a request whose client is gone).
- Bytes pass through unchanged and unbuffered, chunk by chunk; the engine's 4xx reach the client
  unchanged and are never retried.

Several groups of one model (cluster.yaml `groups`) stand behind one gateway as its members
(spark_cluster.members keeps them): each has its door; a new request goes to one whose door is open (spark_cluster.routing: the fewest in
flight, a conversation kept where its prefix is cached), and a request that failed on one before
its first byte is sent to another, as is one still unanswered on a group the watchdog starts to
doubt (suspect) while another serves. A hang in one group cuts only that group's streams.

The door's rules are pure functions (spark_cluster.door), table-tested; the proxy itself is one
coroutine per request (`Gateway.serve`), in the request's own task, called by the gateway's own
server (spark_cluster.front) straight from the parser.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable, Literal, Optional

from . import timeouts
from .door import Admission, admit, retry_status
from .members import Flight, Member, Members, Observer, Send, Signal, Writer, to_move
from .routing import prefix_keys, prompt_of
from .stream_carry import CarryOn
from .serving_settings import GatewaySettings
from .upstream import ConnectFailed, ConnectionLost, ReadTimeout, UpstreamError

__all__ = ["Flight", "Gateway", "Member", "Observer", "Send", "Signal", "Writer", "to_move"]  # what the others import from here

PATHS = "/v1/"  # what the gateway passes to vLLM (its OpenAI API)
Outcome = Literal["ok", "held", "retried", "continued", "interrupted", "rejected", "failed", "cancelled"]
OUTCOMES: tuple[str, ...] = ("ok", "held", "retried", "continued", "interrupted", "rejected", "failed", "cancelled")
log = logging.getLogger("spark_cluster.gateway")  # one line per request that did not simply pass (ok ones are counted only)

# Headers that belong to one hop (RFC 9110 7.6.1), and those the gateway's client or server set themselves;
# `expect`: the gateway's own server answers a client's 100-continue.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect"})
# Who the client is, as proxies say it: set by the gateway, never taken from the client.
FORWARDED = frozenset({b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip"})
# Pause between two attempts while the door stays open (the watchdog may not know yet that the engine
# is gone). The first retry is at once: a kept-alive connection the engine had just closed fails that way.
RETRY_PAUSES_S = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def end_to_end(headers: list[tuple[bytes, bytes]], drop: frozenset[bytes] = HOP_BY_HOP) -> list[tuple[bytes, bytes]]:
    """The headers that go on to the next hop: without the hop-by-hop ones, those a `Connection`
    header names (RFC 9110 7.6.1) and those in `drop`. Pure."""
    named = {t.strip().lower() for k, v in headers if k.lower() == b"connection" for t in v.split(b",")}
    return [(k, v) for k, v in headers if k.lower() not in drop and k.lower() not in named]


def forwarded_for(client: str) -> list[tuple[bytes, bytes]]:
    """The headers that tell the engine who the client is (its address as the gateway saw it). Pure."""
    if not client:
        return []
    node = f'"[{client}]"' if ":" in client else client
    return [(b"x-forwarded-for", client.encode()), (b"forwarded", f"for={node}".encode())]


def error_body(message: str, kind: str = "service_unavailable", code: int = 503) -> bytes:
    """OpenAI's error shape (clients raise it as an APIError)."""
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


# ---- the proxy --------------------------------------------------------------------------------
class Gateway(CarryOn, Members):
    """The proxy: one coroutine per request (`serve`) over the groups Members keeps; a stream cut after
    its first byte is continued by CarryOn where it can be."""

    def __init__(self, upstreams: "str | dict[str, str]", settings: GatewaySettings, observer: Observer | None = None):
        """upstreams: each group's engine by its label (one URL: one group)."""
        super().__init__(upstreams, settings, observer)
        self.held = 0
        self.max_body = settings.max_body_bytes()
        self.on_carried: Callable[[dict[str, Any]], None] = lambda record: None  # a cut stream's fate (the controller's StreamLog)

    async def _wait_for_door(self, deadline: float, gone: Signal) -> Optional[Admission]:
        """None once the door is open; else why the request is refused. Counted as held while waiting."""
        while True:
            a = admit(self.door, self.held, self.s)
            if a.verdict != "hold":
                return None if a.verdict == "pass" else a
            left = deadline - time.monotonic()
            if left <= 0:
                return Admission("reject", f"not serving again within gateway.hold_s ({self.s.hold_s:g}s): {self.door.told}", retry_after=True)
            self.held += 1
            self.obs.held(self.held)
            try:
                await _first(self.changed.wait(), gone.wait(), timeout=left)
            finally:
                self.held -= 1
                self.obs.held(self.held)
            if gone.is_set():
                return Admission("reject", "the client went away")

    async def engine_answers(self, m: Member) -> bool:
        return await m.engine.get_status("/health", min(timeouts.ENGINE_HEALTH_S, self.s.connect_timeout_s)) == 200

    # ---- one request -------------------------------------------------------------------------
    async def serve(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes, send: Send,
                    gone: Signal, writer: Optional[Writer] = None, client: str = "") -> Outcome:
        """One request: `target` is the path and query as the client sent them, `send` takes the
        answer's messages, `gone` is set when the client goes away; with a `writer`, a body's pieces
        after the first go to it straight from the engine's connection. client: its address."""
        t0 = time.monotonic()
        deadline = t0 + self.s.hold_s
        held = attempts = 0
        headers = end_to_end(headers, HOP_BY_HOP | FORWARDED) + forwarded_for(client)
        keys = affinity_keys(target, body) if len(self.members) > 1 and self.s.prefix_affinity else []  # no cost with one group
        kept, body = self.keep(method, target, body)
        tried: set[str] = set()  # the groups this request failed on before its first byte
        flight = Flight(kept=kept)
        outcome: Outcome = "failed"
        try:
            while True:
                if self.door.mode != "open":
                    held = 1
                refusal = await self._wait_for_door(deadline, gone)
                if gone.is_set():
                    outcome = "cancelled"
                    return outcome
                if refusal is not None:
                    await self._refuse(send, refusal)
                    outcome = "rejected"
                    return outcome
                member = self.pick(tried, keys)
                if member is None:
                    continue  # no door open now: wait again
                attempts += 1
                result = await self._attempt(member, flight, method, target, headers, body, send, gone, t0, writer)
                tried.add(member.name)
                if result == "cut":
                    result = await self.carry_on(member, flight, headers, send, gone, t0, writer)
                if result != "retry":
                    outcome = result if result != "ok" else ("retried" if attempts > 1 else "held" if held else "ok")
                    return outcome
                # nothing reached the client: another group at once; else wait for the door (the watchdog is told of the
                # failure by its own probes), pausing a little between attempts while it stays open
                untried = any(m.door.mode == "open" and m.name not in tried for m in self.members.values())
                pause = 0.0 if untried else RETRY_PAUSES_S[min(attempts - 1, len(RETRY_PAUSES_S) - 1)]
                if attempts >= self.s.max_attempts:
                    await self._refuse(send, Admission("reject", f"the engine failed this request {attempts} times before answering "
                                                                 f"(gateway.max_attempts)", retry_after=True))
                    outcome = "rejected"
                    return outcome
                if time.monotonic() + pause >= deadline:
                    await self._refuse(send, Admission("reject", f"the engine did not answer within gateway.hold_s ({self.s.hold_s:g}s)",
                                                       retry_after=True))
                    outcome = "rejected"
                    return outcome
                if self.door.mode == "open" and pause:
                    await _first(gone.wait(), timeout=pause)
                flight = Flight(tried=frozenset(tried), kept=kept)
        finally:
            self._done(outcome, method, target, t0, attempts, held, tried)

    def _done(self, outcome: Outcome, method: str, target: str, t0: float, attempts: int, held: int, tried: set[str]) -> None:
        self.obs.outcome(outcome)
        if outcome != "ok":
            log.info("%s %s: %s after %.1fs (%d attempts%s%s)", method, target, outcome,
                     time.monotonic() - t0, attempts, ", waited at the door" if held else "",
                     f", tried {', '.join(sorted(tried))}" if tried and len(self.members) > 1 else "")

    async def refuse_too_large(self, send: Send) -> None:
        self.obs.outcome("rejected")
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": error_body(
            f"the request body is larger than gateway.max_body ({self.s.max_body})", "request_too_large", 413)})

    async def _refuse(self, send: Send, a: Admission) -> None:
        headers = [(b"content-type", b"application/json")]
        if a.retry_after:
            headers.append((b"retry-after", str(self.s.retry_after_s).encode()))
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": error_body(a.message)})

    async def _attempt(self, m: Member, flight: Flight, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
                       send: Send, gone: Signal, t0: float, writer: Optional[Writer], continuing: bool = False) -> str:
        """One try at the engine: ok | failed (an answer passed through) | retry (nothing reached the
        client) | cut (an answer cut after its first byte: flight.why_cut says why) | cancelled (the
        client went away). continuing: a continuation of a cut stream (its head went out already).
        The exchange runs in the request's own task; an interruption or the client's leaving cancels
        it (a task per exchange would be time on the hop)."""
        task = asyncio.current_task()
        assert task is not None

        def cut() -> None:
            if not flight.cut and not flight.finished:
                flight.cut = True
                task.cancel()  # closes the connection to vLLM, which aborts the request

        flight.client = writer
        self.flights.add(flight)
        m.flights.add(flight)
        flight.interrupt.callbacks.append(cut)
        gone.callbacks.append(cut)
        try:
            if flight.interrupt.is_set() or gone.is_set():
                flight.cut = True
            else:
                try:
                    return await self._exchange(m, flight, method, path, headers, body, send, t0, writer, continuing)
                except asyncio.CancelledError:
                    if not flight.cut or task.uncancel() > 0:
                        raise  # cancelled from outside (the server stops)
                except OSError:  # writing to a client that went away
                    return "cancelled"
            if gone.is_set():
                return "ok" if flight.done_sent else "cancelled"
            if not flight.started:
                return "retry"
            flight.why_cut = f"the watchdog is restarting the engine ({m.door.public or 'it stopped answering'})"
            return "cut"
        finally:
            flight.interrupt.callbacks.remove(cut)
            gone.callbacks.remove(cut)
            self.flights.discard(flight)
            m.flights.discard(flight)

    async def _exchange(self, m: Member, flight: Flight, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
                        send: Send, t0: float, writer: Optional[Writer], continuing: bool = False) -> str:
        try:
            resp = await m.engine.send(method, path, headers, body)
        except ConnectFailed:
            return "retry"  # refused, unreachable, no free connection: nothing was sent
        except ReadTimeout:
            await self._refuse_status(send, 504, f"the engine did not answer within gateway.read_timeout_s ({self.s.read_timeout_s:g}s)")
            return "failed"
        except ConnectionLost:
            return "retry"  # reset or closed before an answer: nothing reached the client
        try:
            if resp.status >= 500 and retry_status(resp.status, await self.engine_answers(m) if resp.status == 500 else None):
                return "retry"
            if continuing and resp.status != 200:
                flight.why_cut = f"refused: the engine answered the continuation with {resp.status}"
                return "failed"
            if continuing and flight.kept is not None and flight.kept.chat:
                return await self.relay_chat(m, flight, resp, headers, send)
            try:
                first = await resp.next_chunk()
            except UpstreamError:
                return "retry"
            flight.event_stream = resp.header(b"content-type").startswith(b"text/event-stream")
            out_headers = end_to_end(resp.headers)
            if flight.event_stream:
                out_headers.append((b"x-accel-buffering", b"no"))
                out_headers.append((b"cache-control", b"no-cache"))
            flight.started, flight.first_at = True, time.monotonic()
            if not continuing:
                self.obs.first_byte(flight.first_at - t0)
                await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
            if first is not None:  # None: the answer has no body (HEAD, 204, a length of 0) and has ended
                await self._send_chunk(send, flight, first)
                if writer is not None:  # no task woken per piece: under load every token of every stream passes here
                    resp.splice(lambda chunk: writer.write(flight.passing(chunk)))
                    writer.on_drain = resp.resume
                try:
                    while (chunk := await resp.next_chunk()) is not None:  # no async generator: a frame less per chunk
                        await self._send_chunk(send, flight, chunk)
                except UpstreamError:
                    flight.why_cut = "the engine's connection ended before the answer was complete"
                    return "cut"
            await send({"type": "http.response.body", "body": flight.rest(), "more_body": False})
            flight.finished = True
            return "failed" if resp.status >= 500 else "ok"
        finally:
            resp.close()
            if writer is not None:
                writer.on_drain = None

    async def _send_chunk(self, send: Send, flight: Flight, chunk: bytes) -> None:
        await send({"type": "http.response.body", "body": flight.passing(chunk), "more_body": True})

    async def _refuse_status(self, send: Send, status: int, message: str) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": error_body(message, "upstream_timeout", status)})

    async def _end_stream(self, send: Send, flight: Flight, message: str) -> None:
        """End a response that has started and cannot be completed. An event stream: an error event,
        then its clean end. Any other answer is left without its end (no last chunk; the server then
        closes the connection), so no client takes a cut answer for a whole one: every HTTP library
        raises on it."""
        if not flight.event_stream:
            return
        try:  # what went out ends with a whole event (Flight.passing): the error event follows it
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + error_body(message + "; the stream cannot be resumed: send the request again",
                                                             "engine_unavailable") + b"\n\n"})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client is gone as well


def affinity_keys(target: str, body: bytes) -> list[bytes]:
    """What prefix affinity knows a request by (routing.prefix_keys of its prompt, if it has one)."""
    prompt = prompt_of(target, body)
    return prefix_keys(prompt) if prompt else []


async def _first(*aws: Any, timeout: float | None = None) -> Any:
    """Wait for the first of several awaitables; the others are cancelled (tasks passed in are
    left running). Returns the finished task, or None on timeout."""
    tasks = [a if isinstance(a, asyncio.Task) else asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t, a in zip(tasks, aws):
            if t is not a and not t.done():
                t.cancel()
    return next(iter(done)) if done else None
