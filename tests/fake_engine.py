"""A fake vLLM (named as a fake): an OpenAI-style HTTP server on loopback whose behaviour a test
scripts (answer, stream slowly, hang, fail with a status, refuse connections), recording what it
received and when its streams were abandoned. Served by a real uvicorn in a thread, so the
gateway in front of it is exercised over real sockets. Also the real-server helper for the
controller's app (`Served`)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports: bound all at once (one bound and closed after another can be
    handed out twice, and a config whose gateway and controller got the same port is refused)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Served:
    """A real uvicorn server for an ASGI app, in a thread, on a free loopback port."""

    def __init__(self, app: Any, port: Optional[int] = None, host: str = "127.0.0.1", **options: Any):
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        # a test's server stops within a second, open connections or not (uvicorn's default waits for them)
        options.setdefault("timeout_graceful_shutdown", 1)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="on", **options))
        self.thread: Optional[threading.Thread] = None

    def start(self) -> "Served":
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)

    def __enter__(self) -> "Served":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Script:
    """What the fake engine does with the next requests (tests change it while it runs)."""

    chunks: int = 5  # events per stream
    chunk_delay_s: float = 0.05
    hang: bool = False  # requests wait (without answering) until hang is cleared
    status: int = 200  # an error status answered instead of a completion
    health: int = 200
    linger_s: float = 0.0  # how long a stream stays open after its `data: [DONE]`
    pad: int = 0  # bytes of padding in each event (large streams)
    calls: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    running: int = 0
    abandoned: int = 0  # streams whose client went away before their end
    abandoned_at: list[float] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)  # each token-id stream's prompt, as ids
    max_model_len: int = 0  # token-id streams without max_tokens end where the context is full (0: after `chunks`)
    cut_after: list[int] = field(default_factory=list)  # the next token-id streams' connections break after this many events each
    error_after: list[int] = field(default_factory=list)  # the next token-id completion streams end with vLLM's error event and [DONE] after this many events each
    derender_status: int = 200  # what /v1/chat/completions/derender answers (vLLM without --enable-scale-out: 403)
    derendered: int = 0  # derender calls


class FakeEngine:
    def __init__(self, port: Optional[int] = None, host: str = "127.0.0.1"):
        self.script = Script()
        app = Starlette(routes=[
            Route("/health", self.health),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models),
            Route("/v1/chat/completions/derender", self.derender, methods=["POST"]),
        ])
        self.served = Served(app, port, host)
        self.url = self.served.url
        self.port = self.served.port

    def start(self) -> "FakeEngine":
        self.served.start()
        return self

    def stop(self) -> None:
        self.served.stop()

    async def health(self, request: Request) -> Response:
        return Response(status_code=self.script.health)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "tiny-qwen3", "object": "model"}]})

    async def completions(self, request: Request) -> Response:
        sc = self.script
        body = await request.body()
        sc.calls += 1
        target = request.scope["raw_path"] + (b"?" + request.scope["query_string"] if request.scope["query_string"] else b"")
        sc.received.append({"headers": dict(request.headers), "body": body.decode(errors="replace"), "peer": tuple(request.client or ()),
                            "target": target.decode("latin-1")})
        while sc.hang:
            await asyncio.sleep(0.02)
        if sc.status != 200:
            return JSONResponse({"error": {"message": f"fake error {sc.status}", "type": "BadRequestError" if sc.status < 500 else "InternalServerError",
                                           "code": sc.status}}, status_code=sc.status)
        try:
            req = json.loads(body or b"{}")
            assert isinstance(req, dict)
        except (ValueError, AssertionError, RecursionError):  # as vLLM answers a body that is not a JSON object
            return JSONResponse({"error": {"message": "invalid JSON body", "type": "BadRequestError", "code": 400}}, status_code=400)
        if not req.get("stream"):
            sc.running += 1
            try:
                await asyncio.sleep(sc.chunk_delay_s * sc.chunks)
            finally:
                sc.running -= 1
            return JSONResponse({"id": "cmpl-fake", "object": "text_completion", "model": req.get("model"),
                                 "choices": [{"index": 0, "text": "x" * sc.chunks, "finish_reason": "length"}]},
                                headers={"x-fake": "1"})

        if req.get("return_token_ids") is True and "messages" in req:
            return StreamingResponse(self._chat_id_events(req), media_type="text/event-stream")
        if req.get("return_token_ids") is True:
            return StreamingResponse(self._id_events(req), media_type="text/event-stream")

        async def events():
            sc.running += 1
            finished = False
            try:
                for i in range(sc.chunks):
                    event: dict[str, Any] = {"id": "cmpl-fake", "choices": [{"index": 0, "text": f"t{i}"}]}
                    if sc.pad:
                        event["pad"] = "p" * sc.pad
                    yield b"data: " + json.dumps(event).encode() + b"\n\n"
                    if sc.chunk_delay_s:
                        await asyncio.sleep(sc.chunk_delay_s)
                    while sc.hang:
                        await asyncio.sleep(0.02)
                yield b"data: [DONE]\n\n"
                finished = True
                await asyncio.sleep(sc.linger_s)
            finally:
                sc.running -= 1
                if not finished:
                    sc.abandoned += 1
                    sc.abandoned_at.append(time.monotonic())

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _id_events(self, req: dict[str, Any]):
        """A stream with token ids, as vLLM gives it with `return_token_ids`: the prompt's ids in the
        first event, each event's generated id beside its text, the usage last when asked. The fake's
        "model" is deterministic in its context (next_id), so a stream continued from its prompt and
        the ids already sent goes on with exactly the ids the uncut stream would have given."""
        sc = self.script
        prompt = req.get("prompt")
        context = list(prompt) if isinstance(prompt, list) else list(str(prompt or "").encode())
        sc.prompts.append(list(context))
        # as vLLM: max_tokens, else what the context has left (the fake's context: max_model_len, else chunks more than the prompt)
        n = req["max_tokens"] if isinstance(req.get("max_tokens"), int) else \
            sc.max_model_len - len(context) if sc.max_model_len else sc.chunks
        rid, created, model = f"cmpl-fake-{sc.calls}", 1_700_000_000 + sc.calls, req.get("model")
        cut = sc.cut_after.pop(0) if sc.cut_after else None
        error = sc.error_after.pop(0) if sc.error_after else None
        with self._running():
            for i in range(n):
                if i == cut:
                    raise ConnectionAbortedError("the fake engine's connection breaks mid-stream (Script.cut_after)")
                if i == error:  # as vLLM ends a stream whose request failed in the engine
                    yield b'data: {"error": {"object": "error", "message": "fake engine error", "type": "InternalServerError", "code": 500}}\n\n'
                    yield b"data: [DONE]\n\n"
                    return
                t = next_id(context)
                context.append(t)
                choice = {"index": 0, "text": id_text(t), "logprobs": None, "finish_reason": "length" if i == n - 1 else None,
                          "stop_reason": None, "prompt_token_ids": context[:len(context) - i - 1] if i == 0 else None, "token_ids": [t]}
                event = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
                if sc.pad:
                    event["pad"] = "p" * sc.pad
                yield b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
                await self._paced()
            yield self._end(req, {"id": rid, "object": "text_completion", "created": created, "model": model}, len(context) - n, n)


    async def _chat_id_events(self, req: dict[str, Any]):
        """A chat stream with token ids, as vLLM gives it with `return_token_ids`: the prompt's ids in
        the first chunk (the role's), then each id's delta by the fake parser (FakeParser), a chunk with
        an empty delta where the parser holds its output (vLLM sends those only when asked for ids)."""
        sc = self.script
        context = chat_prompt(req)
        prompt = list(context)
        sc.prompts.append(list(context))
        limit = req.get("max_completion_tokens", req.get("max_tokens"))
        n = limit if isinstance(limit, int) else sc.chunks
        rid, created, model = f"chatcmpl-fake-{sc.calls}", 1_700_000_000 + sc.calls, req.get("model")
        cut = sc.cut_after.pop(0) if sc.cut_after else None
        parser = FakeParser()

        def chunk(choice: dict[str, Any], **top: Any) -> bytes:
            event = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice], **top}
            return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"

        with self._running():
            yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
                        prompt_token_ids=prompt)
            for i in range(n):
                if i == cut:
                    raise ConnectionAbortedError("the fake engine's connection breaks mid-stream (Script.cut_after)")
                t = next_id(context)
                context.append(t)
                choice = {"index": 0, "delta": parser.feed(t), "logprobs": None, "finish_reason": "length" if i == n - 1 else None}
                if i == n - 1:
                    choice["stop_reason"] = None
                choice["token_ids"] = [t]
                yield chunk(choice)
                await self._paced()
            yield self._end(req, {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}, len(prompt), n)

    @contextmanager
    def _running(self) -> Iterator[None]:
        """A stream under way (Script.running); one its client left before its end is counted abandoned."""
        sc = self.script
        sc.running += 1
        try:
            yield
        except BaseException:
            sc.abandoned += 1
            sc.abandoned_at.append(time.monotonic())
            raise
        finally:
            sc.running -= 1

    async def _paced(self) -> None:
        """After each event: the script's pace, and its hang."""
        if self.script.chunk_delay_s:
            await asyncio.sleep(self.script.chunk_delay_s)
        while self.script.hang:
            await asyncio.sleep(0.02)

    @staticmethod
    def _end(req: dict[str, Any], head: dict[str, Any], prompt: int, n: int) -> bytes:
        """A token-id stream's end: its usage when asked, then [DONE]."""
        out = b""
        if (req.get("stream_options") or {}).get("include_usage"):
            used = {"prompt_tokens": prompt, "total_tokens": prompt + n, "completion_tokens": n}
            out = b"data: " + json.dumps({**head, "choices": [], "usage": used}, separators=(",", ":")).encode() + b"\n\n"
        return out + b"data: [DONE]\n\n"

    async def derender(self, request: Request) -> Response:
        """vLLM's streaming chat derender (0.30 on, --enable-scale-out), for the fake parser: a fresh
        parser replays the state's ids, then turns the chunk's; the tool calls' ids are pinned by the
        state's last_tool_call_ids, as vLLM's are."""
        sc = self.script
        sc.derendered += 1
        if sc.derender_status != 200:
            return JSONResponse({"error": {"message": "Scale-out endpoints are disabled.", "type": "PermissionDeniedError",
                                           "code": sc.derender_status}}, status_code=sc.derender_status)
        req = json.loads(await request.body())
        state, gen = req["stream_state"], req["generate_chunk"]
        parser = FakeParser()
        for t in state["output_token_ids"]:
            parser.feed(t)
        [choice] = gen["choices"]
        delta: dict[str, Any] = {}
        for t in choice["token_ids"]:
            merge(delta, parser.feed(t))
        ids = list(state["last_tool_call_ids"])
        for call in delta.get("tool_calls") or ():
            if "id" in call:
                if call["index"] < len(ids):
                    call["id"] = ids[call["index"]]
                else:
                    ids.append(call["id"])
        out = {"index": 0, "delta": {"role": None, "content": None, "reasoning": None, "tool_calls": [], **delta},
               "logprobs": None, "finish_reason": choice.get("finish_reason"), "stop_reason": choice.get("stop_reason"),
               "token_ids": choice["token_ids"] if (req.get("chat_request") or {}).get("return_token_ids") else None}
        new_state = {**state, "output_token_ids": state["output_token_ids"] + choice["token_ids"],
                     "output_chunk_lens": state["output_chunk_lens"] + ([len(choice["token_ids"])] if choice["token_ids"] else []),
                     "tools_streamed": state["tools_streamed"] or bool(delta.get("tool_calls")), "last_tool_call_ids": ids}
        return JSONResponse({"chunk": {"id": gen.get("request_id"), "object": "chat.completion.chunk", "created": 1, "model": req.get("model"),
                                       "choices": [out], "usage": None, "prompt_token_ids": None}, "stream_state": new_state})


def chat_prompt(req: dict[str, Any]) -> list[int]:
    """The fake chat template: the messages' bytes."""
    return list(json.dumps(req.get("messages"), separators=(",", ":")).encode())


class FakeParser:
    """A reasoning and tool parser for the fake model's ids, whose output depends on what came before
    (as vLLM's do): reasoning until an id divisible by 13 (held: no output), then content; in content
    an id divisible by 11 opens a tool call (a new id, its name), whose argument pieces follow until
    an id divisible by 5 closes it (held)."""

    def __init__(self) -> None:
        self.phase, self.calls = "reasoning", 0

    def feed(self, t: int) -> dict[str, Any]:
        if self.phase == "reasoning":
            if t % 13 == 0:
                self.phase = "content"
                return {}
            return {"reasoning": id_text(t)}
        if self.phase == "content":
            if t % 11 == 0:
                self.phase, self.calls = "tool", self.calls + 1
                return {"tool_calls": [{"index": self.calls - 1, "id": f"call-{os.urandom(4).hex()}", "type": "function",
                                        "function": {"name": "f", "arguments": ""}}]}
            return {"content": id_text(t)}
        if t % 5 == 0:
            self.phase = "content"
            return {}
        return {"tool_calls": [{"index": self.calls - 1, "function": {"arguments": id_text(t)}}]}


def merge(delta: dict[str, Any], more: dict[str, Any]) -> None:
    """Deltas of several ids as one (vLLM's parser, given them in one piece, answers one delta)."""
    for k, v in more.items():
        if k == "tool_calls":
            calls = delta.setdefault("tool_calls", [])
            for call in v:
                same = next((c for c in calls if c["index"] == call["index"]), None)
                if same is None:
                    calls.append(json.loads(json.dumps(call)))
                else:
                    args = call.get("function", {}).get("arguments")
                    if args:
                        same.setdefault("function", {})["arguments"] = same.get("function", {}).get("arguments", "") + args
        else:
            delta[k] = delta.get(k, "") + v


def next_id(context: list[int]) -> int:
    """The fake model's next token: a function of the last ids and the length (deterministic)."""
    a, b = (context[-1], context[-2]) if len(context) >= 2 else (context[-1] if context else 0, 0)
    return (a * 31 + b * 17 + len(context)) % 4096 + 256


def id_text(t: int) -> str:
    return f" w{t}"
