"""What keeping a stream for its continuation costs the gateway per event (no cluster): the time
spark_cluster.continuation.pass_events takes on vLLM-shaped completion and chat events, against
passing them untouched, side by side in one run.

    python -m bench.continuation_bench [--events 20000]
"""

from __future__ import annotations

import argparse
import json
import time

from spark_cluster.continuation import keep, pass_events


def event(i: int, *, first: bool = False) -> bytes:
    choice = {"index": 0, "text": f" word{i}", "logprobs": None, "finish_reason": None, "stop_reason": None,
              "prompt_token_ids": list(range(200)) if first else None, "token_ids": [1000 + i]}
    return b"data: " + json.dumps({"id": "cmpl-bench", "object": "text_completion", "created": 1, "model": "m",
                                   "choices": [choice]}, separators=(",", ":")).encode() + b"\n\n"


def chat_event(i: int, *, first: bool = False) -> bytes:
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""} if first else {"reasoning": f" word{i}"},
                         "logprobs": None, "finish_reason": None, "token_ids": None if first else [1000 + i]}]}
    if first:
        body["prompt_token_ids"] = list(range(200))
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def per_event_us(kept, events: list[bytes], json_path: bool = False, first: bytes = b"") -> float:
    if kept is not None:
        pass_events(kept, first or event(0, first=True))
        if json_path:
            kept.continued = 1  # a continued stream's events are rewritten from their JSON
    t = time.perf_counter()
    for e in events:
        if kept is not None:
            pass_events(kept, e)
    return (time.perf_counter() - t) / len(events) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20000)
    n = ap.parse_args().events
    events = [event(i) for i in range(1, n + 1)]
    body = json.dumps({"prompt": "p", "stream": True, "max_tokens": 10 * n}).encode()
    asked = json.dumps({"prompt": "p", "stream": True, "max_tokens": 10 * n, "return_token_ids": True}).encode()
    rows = [("passed untouched (no stream kept)", per_event_us(None, events)),
            ("kept, ids taken out (the client did not ask)", per_event_us(keep("/v1/completions", body)[0], events)),
            ("kept, ids left (the client asked)", per_event_us(keep("/v1/completions", asked)[0], events)),
            ("after a continuation (JSON rewritten)", per_event_us(keep("/v1/completions", body)[0], events, json_path=True))]
    chats = [chat_event(i) for i in range(1, n + 1)]
    chat = json.dumps({"messages": [{"role": "user", "content": "p"}], "stream": True, "max_tokens": 10 * n}).encode()
    rows += [("chat, kept, ids taken out (JSON per event)", per_event_us(keep("/v1/chat/completions", chat)[0], chats,
                                                                         first=chat_event(0, first=True)))]
    base = rows[1][1]
    print(f"{n} events of ~{len(events[0])} bytes each")
    for label, us in rows:
        print(f"{label:48}{us:8.2f} us/event{us / base if base else 0:8.2f}x")


if __name__ == "__main__":
    main()
