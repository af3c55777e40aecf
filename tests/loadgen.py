"""A small, bounded streaming load for tests and benchmarks (traffic to the cluster's endpoint only)."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx


@dataclass
class Result:
    """One request of `mixed_load`, as its client saw it (times: time.time())."""

    kind: str  # stream | plain
    start: float
    end: float = 0.0
    status: Optional[int] = None
    first_byte: Optional[float] = None  # first event of a stream / the answer of a plain request
    error_event: Optional[float] = None  # a stream that ended with an error event
    error: str = ""
    complete: bool = False  # the whole answer arrived ([DONE], or a 200 with choices)
    tokens: int = 0
    stopped: bool = False  # the load ended while it was running (neither a success nor a failure)
    comments: int = 0  # SSE comment lines of a stream (the gateway holding a cut stream open)
    longest_gap: float = 0.0  # the longest wait between two events of a stream (a continuation's seam)
    usage_tokens: Optional[int] = None  # a stream's completion tokens, as its usage event says (asked for)
    api: str = "completions"  # completions | chat
    prompt_ids: Optional[list[int]] = None  # a stream's prompt's token ids, as its first event says (ids asked for)
    ids: list[int] = field(default_factory=list)  # the token ids a stream's events carried (ids asked for)
    finishes: list[str] = field(default_factory=list)  # the finish reasons a stream's events carried

    @property
    def outcome(self) -> str:
        if self.complete:
            return "ok"
        if self.stopped:
            return "stopped"
        if self.kind == "stream" and self.first_byte is not None:
            return "interrupted" if self.error_event is not None else "cut"  # cut: no error event, no [DONE]
        return "failed"  # nothing usable reached the client


def one_request(url: str, model: str, kind: str, max_tokens: int, read_timeout_s: float = 600,
                stop: Optional[threading.Event] = None, prompt: str = "Once upon a time", client: Optional[httpx.Client] = None,
                api: str = "completions", ids: bool = False) -> Result:
    """One completion (api chat: a chat completion of one user message) as a client sees it; a stream
    is left (and counted as stopped) once `stop` is set. ids: a stream asks for its token ids.
    client: a kept-alive client, as an application's OpenAI client is (else a new connection each time)."""
    body: dict = {"model": model, "max_tokens": max_tokens, "ignore_eos": True, "stream": kind == "stream"}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if kind == "stream":
        body["stream_options"] = {"include_usage": True}
        if ids:
            body["return_token_ids"] = True
    r = Result(kind, time.time(), api=api)
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    try:
        with (client or httpx).stream("POST", f"{url}{path}", json=body, timeout=httpx.Timeout(10, read=read_timeout_s)) as resp:
            r.status = resp.status_code
            if kind == "plain":
                data = json.loads(resp.read() or b"{}")
                r.first_byte = time.time()
                r.complete = resp.status_code == 200 and bool(data.get("choices"))
                r.tokens = (data.get("usage") or {}).get("completion_tokens", 0) if r.complete else 0
                if not r.complete:
                    r.error = str(data.get("error", {}).get("message", data))[:300]
            else:
                other: list[str] = []  # an error answer's body (a 503 of the gateway, say): read once, here
                last = None
                for line in resp.iter_lines():
                    if r.complete:
                        continue  # the body's end after [DONE], read so that the connection is used again (as openai-python does)
                    if stop is not None and stop.is_set():
                        r.stopped = True
                        break
                    if line.startswith(":"):
                        r.comments += 1
                        continue
                    if not line.startswith("data: "):
                        other.append(line)
                        continue
                    now = time.time()
                    if r.first_byte is None:
                        r.first_byte = now
                    if last is not None:
                        r.longest_gap = max(r.longest_gap, now - last)
                    last = now
                    if line == "data: [DONE]":
                        r.complete = resp.status_code == 200
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        r.error_event, r.error = time.time(), str(event["error"].get("message"))[:300]
                        break
                    if event.get("usage") and not event.get("choices"):
                        r.usage_tokens = event["usage"].get("completion_tokens")
                        continue
                    r.tokens += 1  # events: vLLM may put several tokens in one
                    if event.get("prompt_token_ids") and r.prompt_ids is None:  # a chat's, in its first event
                        r.prompt_ids = event["prompt_token_ids"]
                    for choice in event.get("choices") or ():
                        if choice.get("prompt_token_ids") and r.prompt_ids is None:  # a completion's
                            r.prompt_ids = choice["prompt_token_ids"]
                        r.ids.extend(choice.get("token_ids") or ())
                        if choice.get("finish_reason"):
                            r.finishes.append(choice["finish_reason"])
                if resp.status_code != 200 and not r.error:
                    r.error = "\n".join(other).strip()[:300] or f"HTTP {resp.status_code}"
    except (httpx.HTTPError, ValueError) as exc:
        r.error = f"{type(exc).__name__}: {exc}"[:300]
    r.end = time.time()
    return r


def random_prompt(words: int, rng: random.Random) -> str:
    """A prompt no cache has seen (prefix caching would make a repeated long prompt cheap)."""
    return " ".join(rng.choice(WORDS) for _ in range(words))


WORDS = ("river", "stone", "lamp", "orbit", "copper", "meadow", "signal", "harbor", "violet", "engine", "winter", "paper",
         "falcon", "silver", "garden", "thunder", "candle", "marble", "forest", "anchor", "velvet", "planet", "ember", "glacier")


def mixed_load(url: str, model: str, stop: threading.Event, *, streams: int = 2, plain: int = 2, stream_tokens: int = 400,
               plain_tokens: int = 32, stream_prompt_words: int = 0, seed: int = 0, pace: threading.Event | None = None,
               pace_s: float = 2.0, chats: int = 0, ids: bool = False) -> tuple[list[threading.Thread], list[Result]]:
    """Clients sending streamed and non-streamed completions back to back until `stop`, each
    request's result kept (what a client of the gateway sees during a failover). stream_prompt_words:
    each stream gets a fresh random prompt of that many words (long prefills), else a short one.
    pace: once set, the streams end and the other clients wait pace_s after each request (a light load from then on).
    chats: streamed chat clients besides the `streams` streamed completions; ids: the streams ask for their token ids."""
    results: list[Result] = []
    lock = threading.Lock()
    rng = random.Random(seed)

    def client(kind: str, tokens: int, api: str = "completions") -> None:
        while not stop.is_set():
            with lock:
                prompt = random_prompt(stream_prompt_words, rng) if kind == "stream" and stream_prompt_words else "Once upon a time"
            r = one_request(url, model, kind, tokens, stop=stop, prompt=prompt, api=api, ids=ids)
            with lock:
                results.append(r)
            if r.outcome == "failed":
                time.sleep(0.5)
            if pace is not None and pace.is_set():
                if kind == "stream":
                    return
                stop.wait(pace_s)

    threads = [threading.Thread(target=client, args=("stream", stream_tokens), daemon=True) for _ in range(streams)]
    threads += [threading.Thread(target=client, args=("stream", stream_tokens, "chat"), daemon=True) for _ in range(chats)]
    threads += [threading.Thread(target=client, args=("plain", plain_tokens), daemon=True) for _ in range(plain)]
    for t in threads:
        t.start()
    return threads, results


def stream_load(url: str, model: str, n: int, stop: threading.Event, *, max_tokens: int = 1500,
                repeat: bool = False, read_timeout_s: float = 240) -> list[threading.Thread]:
    """Start n long streaming completions in daemon threads; they end on `stop`. With repeat, each
    stream is sent again when it ends (continuous load). Every request has a deadline."""

    def one() -> None:
        while not stop.is_set():
            r = one_request(url, model, "stream", max_tokens, read_timeout_s, stop=stop)
            if r.outcome == "failed":
                time.sleep(1)
            if not repeat:
                return

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads
