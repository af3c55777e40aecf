"""What the gateway keeps of a stream and the request that continues it (spark_cluster.continuation).

The events are shaped as vLLM's completion stream writes them (CompletionStreamResponse,
model_dump_json(exclude_unset=True): the ids null unless asked)."""

from __future__ import annotations

import json

import pytest

from spark_cluster.continuation import MAX_KEPT_IDS, continuation, keep, pass_events, why_not_kept

PROMPT_IDS = [9707, 11, 1879, 0]


def event(text: str, ids: list[int] | None, *, prompt: list[int] | None = None, finish: str | None = None,
          rid: str = "cmpl-a", created: int = 100) -> bytes:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None,
              "prompt_token_ids": prompt, "token_ids": ids}
    body = {"id": rid, "object": "text_completion", "created": created, "model": "tiny-qwen3", "choices": [choice]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt: int, completion: int, rid: str = "cmpl-a", created: int = 100) -> bytes:
    body = {"id": rid, "object": "text_completion", "created": created, "model": "tiny-qwen3", "choices": [],
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def request(**fields) -> bytes:
    return json.dumps({"model": "tiny-qwen3", "prompt": "Hello, world!", "max_tokens": 10, "stream": True, **fields}).encode()


def events_of(raw: bytes) -> list[dict]:
    return [json.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]


@pytest.mark.parametrize("fields, why", [
    ({}, None),
    ({"prompt": PROMPT_IDS}, None),  # a prompt of token ids
    ({"n": 1, "best_of": 1}, None),
    ({"n": 2}, "choices: n 2, several choices would differ"),
    ({"best_of": 3}, "choices: best_of 3, several choices would differ"),
    ({"prompt": ["a", "b"]}, "batch: a batch of prompts"),
    ({"prompt": [[1, 2], [3]]}, "batch: a batch of prompts"),
    ({"prompt": [1, True]}, "batch: a batch of prompts"),
    ({"echo": True}, "echo: the prompt echoed"),
    ({"stop": ["\n\n"]}, "stop: stop strings, the engine holds back text that may begin one"),
    ({"stop": []}, None),
])
def test_what_a_completion_stream_must_not_be_to_be_continued(fields, why):
    assert why_not_kept("/v1/completions", json.loads(request(**fields))) == why


def test_only_completions_and_chats_are_continued():
    assert why_not_kept("/v1/chat/completions", {"messages": []}) is None
    assert why_not_kept("/v1/responses", {"input": "Hi"}) == "path: only completions and chats are continued"
    assert why_not_kept("/v1/completions?x=1", json.loads(request())) is None


def test_a_stream_is_sent_asking_for_its_ids_and_anything_else_goes_unchanged():
    kept, body = keep("/v1/completions", request())
    assert kept is not None and kept.why_not is None and kept.watched and not kept.ids_asked
    assert json.loads(body) == {**json.loads(request()), "return_token_ids": True}
    asked = request(return_token_ids=True)
    kept, body = keep("/v1/completions", asked)
    assert kept.ids_asked and body == asked  # unchanged: the client asked for them itself
    for raw in (request(stream=False), b"", b"not json", b"[1, 2]", json.dumps({"stream": "yes"}).encode()):
        assert keep("/v1/completions", raw) == (None, raw)
    kept, body = keep("/v1/completions", request(n=2))  # a stream that cannot be continued: why, and its events untouched
    assert body == request(n=2) and kept.why_not == "choices: n 2, several choices would differ" and not kept.watched
    raw = event(" Hi", None, prompt=None)
    assert pass_events(kept, raw) is raw and continuation(kept) == (None, "choices: n 2, several choices would differ")


def test_the_ids_are_kept_and_taken_out_of_the_events_of_a_client_that_did_not_ask():
    kept, _ = keep("/v1/completions", request())
    first = event(" Hi", [21927], prompt=PROMPT_IDS) + event(" there", [1052])
    out = pass_events(kept, first)
    assert list(kept.prompt_ids) == PROMPT_IDS and list(kept.sent) == [21927, 1052]
    assert [(e["choices"][0]["text"], e["choices"][0]["token_ids"], e["choices"][0]["prompt_token_ids"]) for e in events_of(out)] == [
        (" Hi", None, None), (" there", None, None)]  # as vLLM sends them unasked
    assert kept.head == {"id": "cmpl-a", "created": 100, "model": "tiny-qwen3"}
    assert out.endswith(b"\n\n") and out.count(b"\n\n") == 2
    assert pass_events(kept, b"data: [DONE]\n\n") == b"data: [DONE]\n\n"


def test_a_client_that_asked_for_the_ids_gets_the_events_unchanged():
    kept, _ = keep("/v1/completions", request(return_token_ids=True))
    raw = event(" Hi", [21927], prompt=PROMPT_IDS) + event(" there", [1052], finish="length")
    assert pass_events(kept, raw) is raw
    assert list(kept.sent) == [21927, 1052] and kept.finished


def test_a_cut_stream_is_continued_from_the_prompt_and_every_id_the_client_has_with_the_tokens_left():
    kept, _ = keep("/v1/completions", request(temperature=0.7, seed=4, min_tokens=5, logprobs=2, prompt_logprobs=1,
                                                 stream_options={"include_usage": True}))
    pass_events(kept, event(" Hi", [21927], prompt=PROMPT_IDS) + event(" there", [1052, 13]))
    body, why = continuation(kept)
    assert why is None
    assert json.loads(body) == {"model": "tiny-qwen3", "prompt": [*PROMPT_IDS, 21927, 1052, 13], "max_tokens": 7, "stream": True,
                                "temperature": 0.7, "seed": 4, "min_tokens": 2, "logprobs": 2, "return_token_ids": True,
                                "stream_options": {"include_usage": True}}  # prompt_logprobs: of the prompt as sent, not carried


def test_the_continuations_events_join_the_clients_stream():
    """Its head is the first stream's, its prompt ids never reach the client, the usage counts the
    whole answer, and a second cut continues from every id both streams gave."""
    kept, _ = keep("/v1/completions", request(return_token_ids=True, stream_options={"include_usage": True}))
    pass_events(kept, event(" Hi", [21927], prompt=PROMPT_IDS) + event(" there", [1052]))
    kept.continued += 1
    seam = continuation(kept)[0]
    assert json.loads(seam)["prompt"] == [*PROMPT_IDS, 21927, 1052]
    out = pass_events(kept, event(",", [11], prompt=[*PROMPT_IDS, 21927, 1052], rid="cmpl-b", created=200))
    [e] = events_of(out)
    assert (e["id"], e["created"], e["choices"][0]["prompt_token_ids"], e["choices"][0]["token_ids"]) == ("cmpl-a", 100, None, [11])
    assert list(kept.prompt_ids) == PROMPT_IDS  # the client's prompt, not the continuation's
    kept.continued += 1
    assert json.loads(continuation(kept)[0])["prompt"] == [*PROMPT_IDS, 21927, 1052, 11] and json.loads(continuation(kept)[0])["max_tokens"] == 7
    out = pass_events(kept, event(" you", [498], finish="length", rid="cmpl-c", created=300) + usage(6, 1, rid="cmpl-c", created=300))
    tail = events_of(out)
    assert [(e["id"], e["created"]) for e in tail] == [("cmpl-a", 100)] * 2
    assert tail[1]["usage"] == {"prompt_tokens": 4, "total_tokens": 8, "completion_tokens": 4}
    assert continuation(kept) == (None, "ended: the answer had ended")


@pytest.mark.parametrize("events, why", [
    (lambda: event(" Hi", [1], prompt=PROMPT_IDS) + event(" x", [2], finish="stop"), "ended: the answer had ended"),
    (lambda: event(" Hi", [1]), "ids: the engine did not give the prompt's token ids"),
    (lambda: event(" Hi", [1], prompt=PROMPT_IDS) + event(" x", None), "ids: the engine did not give the token ids"),
    (lambda: b"data: {not json\n\n" + event(" Hi", [1], prompt=PROMPT_IDS), "json: an event that is not JSON"),
    (lambda: event(" Hi", list(range(10)), prompt=PROMPT_IDS), "ended: the answer had ended"),  # max_tokens 10 reached
])
def test_what_cannot_be_continued_exactly_says_why(events, why):
    kept, _ = keep("/v1/completions", request())
    pass_events(kept, events())
    assert continuation(kept) == (None, why)


def test_a_stream_longer_than_the_ids_kept_is_not_continued():
    kept, _ = keep("/v1/completions", request(max_tokens=None))
    pass_events(kept, event(" Hi", [1] * (MAX_KEPT_IDS - 1), prompt=PROMPT_IDS))
    assert continuation(kept)[1] is None and json.loads(continuation(kept)[0])["max_tokens"] is None  # none given: the engine's limit
    pass_events(kept, event(" x", [2, 3]))
    assert continuation(kept) == (None, f"long: longer than the {MAX_KEPT_IDS} ids kept per stream")


def test_every_reason_a_stream_is_not_continued_for_is_counted_under_a_known_code():
    """Each reason's text begins with its code (the metric's label): every one the modules write."""
    import re
    from pathlib import Path

    from spark_cluster import continuation as c, stream_carry

    written = {"refused"}  # the gateway's, for a continuation the engine refused
    for module in (c, stream_carry):
        written |= set(re.findall(r'(?:^|[^\w])f?"([a-z_]+): ', Path(module.__file__).read_text(), re.M))
    written.discard("data")  # an event's field, not a reason
    assert len(written) >= 10 and written <= set(c.REASONS), written - set(c.REASONS)
    assert c.reason_code("stop: stop strings") == "stop"


def test_the_events_after_the_first_are_read_from_their_bytes_as_json_would_read_them():
    """Every token passes the fast path: a text that quotes the field's name, spaces, an empty list."""
    kept, _ = keep("/v1/completions", request())
    pass_events(kept, event(" Hi", [1], prompt=PROMPT_IDS))
    tricky = event(' "token_ids":[7] ', [2])
    spaced = b'data: {"id": "cmpl-a", "choices": [{"index": 0, "text": "x", "finish_reason": null, "token_ids": [3, 4]}]}\n\n'
    empty = event("", [])
    out = pass_events(kept, tricky + spaced + empty)
    assert list(kept.sent) == [1, 2, 3, 4] and not kept.finished and kept.why_not is None
    got = events_of(out)
    assert got[0]["choices"][0]["text"] == ' "token_ids":[7] ' and [e["choices"][0]["token_ids"] for e in got] == [None, None, None]
    pass_events(kept, event(" end", [5], finish="length"))
    assert kept.finished and list(kept.sent) == [1, 2, 3, 4, 5]


def recorded_streams() -> dict[str, str]:
    from pathlib import Path

    return json.loads((Path(__file__).parent / "data" / "streams" / "vllm-0.32-streams.json").read_text())["streams"]


def test_a_client_that_did_not_ask_for_ids_gets_what_vllm_sends_unasked_recorded():
    """Recorded on the simulated cluster: the same completion (temperature 0) streamed with and without
    return_token_ids. Kept and passed, the stream with ids is, event for event, the one without (but
    its request id), while the prompt's ids and every generated id are kept."""
    streams = recorded_streams()
    kept, _ = keep("/v1/completions", request(prompt="Hello, my name is", max_tokens=6))
    out = pass_events(kept, streams["ids"].encode())
    plain, passed = events_of(streams["plain"].encode()), events_of(out)
    usage = passed.pop()  # asked for by the recorded request alone
    assert usage["usage"] == {"prompt_tokens": 8, "total_tokens": 14, "completion_tokens": 6}
    for e in plain + passed:
        e.pop("id"), e.pop("created"), e.pop("system_fingerprint", None)
    assert passed == plain
    assert list(kept.prompt_ids) == [1455, 82, 347, 18, 352, 95, 519, 334] and list(kept.sent) == [334] * 6 and kept.finished


def test_a_recorded_continuation_joins_the_stream_it_continues():
    """vLLM took the prompt's ids and 3 generated ones as the prompt and gave the last 3: joined into
    the first stream, it says the first stream's head and the usage of the whole answer."""
    streams = recorded_streams()
    kept, _ = keep("/v1/completions", request(prompt="Hello, my name is", max_tokens=6, stream_options={"include_usage": True}))
    first = streams["ids"].encode().split(b"\n\n")
    pass_events(kept, b"\n\n".join(first[:3]) + b"\n\n")  # 3 events went out, then the cut
    body, why = continuation(kept)
    assert why is None and json.loads(body)["prompt"] == [1455, 82, 347, 18, 352, 95, 519, 334, 334, 334, 334]  # what vLLM was sent
    kept.continued += 1
    joined = events_of(pass_events(kept, streams["continued"].encode()))
    head = events_of(first[0] + b"\n\n")[0]
    assert {(e["id"], e["created"]) for e in joined} == {(head["id"], head["created"])}
    assert joined[-1]["usage"] == {"prompt_tokens": 8, "total_tokens": 14, "completion_tokens": 6}
    assert all(c["prompt_token_ids"] is None and c["token_ids"] is None for e in joined for c in e["choices"])
