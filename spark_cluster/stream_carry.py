"""A stream cut after its first byte, continued instead of ended (the gateway's part of #38).

When a group hangs, restarts or is drained while a stream is under way, the client has the head and
some events. What it has is known to the token (spark_cluster.continuation keeps the engine's ids
as they pass), so the stream is continued from exactly there: at once on another group that
serves, else on the same group once it serves again, the client's connection kept open meanwhile
by SSE comment lines (proxies and clients keep a stream that speaks), up to
`gateway.continue_within_s`. The client sees one stream with a pause at the seam. What cannot be
continued exactly ends as before, with the error event and a clean end, the reason counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Optional

from .chat_continuation import CHAT, DERENDER, client_event, derender_body, first_state, pieces, usage_event, wants_usage
from .continuation import COMPLETIONS, Kept, keep, reason_code
from .continuation import continuation as next_request
from .upstream import UpstreamError

if TYPE_CHECKING:
    from .gateway import Gateway
    from .members import Flight, Member, Send, Signal, Writer
    from .upstream import Response

log = logging.getLogger("spark_cluster.gateway")

HOWS = ("other_group", "same_group")  # where a cut stream was continued
HOLD_COMMENT_S = 5.0  # a held stream hears from the gateway this often (an SSE comment line)
HOLD_COMMENT = b": the engine is not answering; this stream continues where it stopped once it does\n\n"
RETRY_PAUSE_S = 1.0  # a continuation that reached no engine (the door still open over a dead one) is tried again after this


class CarryOn:
    """The gateway's continuation of cut streams (mixed into Gateway)."""

    def keep(self: "Gateway", method: str, target: str, body: bytes) -> tuple[Optional[Kept], bytes]:
        """A stream the gateway may have to continue: what to keep of it, and its body as it goes to
        the engine (asking for the token ids). Anything else: nothing kept, the body unchanged."""
        if not self.s.continue_streams or method != "POST" or b'"stream"' not in body:
            return None, body
        if not self.s.continue_chat and target.split("?", 1)[0] == CHAT:
            return None, body
        return keep(target, body)

    async def carry_on(self: "Gateway", cut_on: "Member", flight: "Flight", headers: list[tuple[bytes, bytes]], send: "Send",
                       gone: "Signal", t0: float, writer: Optional["Writer"]) -> str:
        """A started answer was cut (flight.why_cut): continued until it ends whole (`continued`), or
        ended with the error event (`interrupted`), or the client left (`cancelled`)."""
        from .members import Flight

        kept, tried, cut_at = flight.kept, {cut_on.name}, time.monotonic()
        if kept is None:  # not a stream (a cut answer is left without its end), or continue_streams is off
            await self._end_stream(send, flight, flight.why_cut)
            return "interrupted"
        deadline = cut_at + self.s.continue_within_s
        while True:
            body, why = next_request(kept)
            if body is not None and kept.continued >= self.s.continue_attempts:
                body, why = None, f"attempts: continued {kept.continued} time(s) already (gateway.continue_attempts)"
            if body is not None and time.monotonic() >= deadline:  # tried again and again on an engine that takes nothing
                body, why = None, "wait: no group served within gateway.continue_within_s"
            member = await self._continue_on(tried, deadline, gone, send) if body is not None else None
            if gone.is_set():
                return "cancelled"
            if member is None:
                return await self._not_continued(send, flight, cut_on, why or "wait: no group served within gateway.continue_within_s")
            kept.continued += 1
            from_token = len(kept.sent)
            nxt = Flight(started=True, event_stream=True, kept=kept, tried=frozenset(tried))
            result = await self._attempt(member, nxt, "POST", COMPLETIONS, headers, body, send, gone, t0, writer, continuing=True)
            tried.add(member.name)
            if result == "ok":
                how = "same_group" if member.name == cut_on.name else "other_group"
                self.obs.continued(member.name, how, nxt.first_at - cut_at)
                self.on_carried({"event": "stream-continued", "group": cut_on.name, "on": member.name, "how": how, "path": flight_path(kept),
                                 "from_token": from_token, "pause_s": round(nxt.first_at - cut_at, 2), "why_cut": flight.why_cut})
                log.info("a stream cut on %s (%s) continued on %s after %.1fs, from token %d",
                         cut_on.name or "the engine", flight.why_cut, member.name or "the engine", nxt.first_at - cut_at, from_token)
                return "continued"
            if result == "cancelled":
                return "cancelled"
            if result == "retry":  # nothing of it reached the client: not a continuation yet
                kept.continued -= 1
                await _pause(gone, RETRY_PAUSE_S)
                continue
            if result == "failed":
                return await self._not_continued(send, nxt, cut_on, nxt.why_cut or "refused: the continuation failed")
            flight, cut_on, cut_at = nxt, member, time.monotonic()  # cut again: from where this one stopped

    async def relay_chat(self: "Gateway", m: "Member", flight: "Flight", resp: "Response", headers: list[tuple[bytes, bytes]],
                         send: "Send") -> str:
        """A chat's continuation (a completion from its token ids) on its way to the client: each
        piece turned into chat chunks by the engine's derender (chat_continuation), the pieces that
        came while one was being turned taken together. `ok` once the answer ended whole; `cut` when
        the engine's connection ended after some of it went out (`retry` before); `failed` when
        derender is refused (flight.why_cut says why)."""
        kept = flight.kept
        assert kept is not None
        rest, sent = b"", False

        async def out(body: bytes) -> None:
            nonlocal sent
            if not sent:
                sent, flight.first_at = True, time.monotonic()
            await send({"type": "http.response.body", "body": body, "more_body": True})

        while True:
            try:
                chunk = await resp.next_chunk()
            except UpstreamError:
                chunk = None
            if chunk is None:  # the engine's answer ended, or its connection, before its last token
                if not sent:
                    return "retry"
                flight.why_cut = "the engine's connection ended before the answer was complete"
                return "cut"
            got, rest = pieces(rest + b"".join([chunk, *resp.ready()]))
            if got.ids or got.finish is not None:
                chat, why = await self._derender(m, kept, headers, got.ids, got.finish, got.stop)
                if chat is None:
                    flight.why_cut = why
                    return "failed"
                event = client_event(kept, chat)
                kept.sent.extend(got.ids)
                if got.ids:
                    kept.chunk_lens.append(len(got.ids))
                if event is not None:
                    await out(event)
            if got.done and got.finish is None:  # an error event, then the end
                flight.why_cut = "refused: the engine ended the continuation without its last token"
                return "failed"
            if got.finish is not None:
                kept.finished = True
                await out((usage_event(kept) if wants_usage(kept.request) else b"") + b"data: [DONE]\n\n")
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                flight.finished = flight.done_sent = True
                return "ok"

    async def _derender(self: "Gateway", m: "Member", kept: Kept, headers: list[tuple[bytes, bytes]], ids: list[int],
                        finish: Optional[str], stop: object) -> tuple[Optional[dict], str]:
        """The chat chunk of a piece of a continuation, from the engine's derender; or why not."""
        body = derender_body(kept, first_state(kept), ids, finish, stop)
        hdrs = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"accept")] + [(b"content-type", b"application/json")]
        try:
            resp = await m.engine.send("POST", DERENDER, hdrs, body)
            try:
                raw = await resp.read()
            finally:
                resp.close()
        except UpstreamError as exc:
            return None, f"derender: no answer from the engine ({exc})"
        if resp.status != 200:
            hint = " (vLLM 0.30 or later, started with --enable-scale-out: gateway.continue_chat)" if resp.status in (403, 404) else ""
            return None, f"derender: the engine answered {resp.status}{hint}"
        try:
            answer = json.loads(raw)
            chunk, state = answer["chunk"], answer["stream_state"]
        except (ValueError, KeyError, TypeError):
            return None, "derender: an answer that is not a chunk and its state"
        kept.tool_ids = [str(t) for t in state.get("last_tool_call_ids") or ()]
        return chunk, ""

    async def _continue_on(self: "Gateway", tried: set[str], deadline: float, gone: "Signal", send: "Send") -> Optional["Member"]:
        """The group to continue on: one that serves, another than those tried first; else waiting for
        one, the client hearing an SSE comment every HOLD_COMMENT_S. None past the deadline or when no
        group will serve (every breaker open)."""
        while not gone.is_set():
            member = self.pick(tried, [])
            if member is not None:
                return member
            left = deadline - time.monotonic()
            if left <= 0 or self.door.mode == "closed":
                return None
            changed = await _first_of(self.changed, gone, min(left, HOLD_COMMENT_S))
            if not changed and not gone.is_set():
                try:
                    await send({"type": "http.response.body", "body": HOLD_COMMENT, "more_body": True})
                except OSError:
                    return None  # the client is gone
        return None

    async def _not_continued(self: "Gateway", send: "Send", flight: "Flight", cut_on: "Member", why: str) -> str:
        self.obs.not_continued(reason_code(why))
        self.on_carried({"event": "stream-not-continued", "group": cut_on.name, "reason": why, "why_cut": flight.why_cut,
                         "path": flight_path(flight.kept)})
        log.info("a cut stream was not continued: %s", why)
        await self._end_stream(send, flight, flight.why_cut or "the engine stopped answering")
        return "interrupted"


def flight_path(kept: Optional[Kept]) -> str:
    return kept.path if kept is not None else ""


async def _first_of(changed: asyncio.Event, gone: "Signal", timeout: float) -> bool:
    """Wait for a door's change or the client's leaving, at most timeout: True when either came."""
    waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(gone.wait())]
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    return bool(done)


async def _pause(gone: "Signal", seconds: float) -> None:
    try:
        await asyncio.wait_for(gone.wait(), seconds)
    except asyncio.TimeoutError:
        pass
