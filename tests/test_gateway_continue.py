"""Streams cut by a hang, continued from the exact token (spark_cluster.stream_carry), through the
controller's gateway in front of the fake engine (tests/fake_engine.py), whose token-id streams come
from a "model" deterministic in its context: a stream continued from its prompt and the ids already
sent goes on with exactly the ids an uncut stream gives."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from spark_cluster import stream_carry

from .fake_engine import id_text, next_id
from .gateway_rig import TOKEN

BODY = {"model": "tiny-qwen3", "prompt": "Hello", "max_tokens": 40, "stream": True, "stream_options": {"include_usage": True}}


def uncut(prompt: str, n: int) -> list[int]:
    context = list(prompt.encode())
    for _ in range(n):
        context.append(next_id(context))
    return context[len(prompt.encode()):]


def read_stream(url: str, body: dict, lines: list[str]) -> None:
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as s:
        for line in s.iter_lines():
            lines.append(line)


@pytest.fixture
def quick_hold(monkeypatch):
    monkeypatch.setattr(stream_carry, "HOLD_COMMENT_S", 0.2)


def cut_while_streaming(rig, body: dict, lines: list[str], after: int = 5, read=None) -> threading.Thread:
    """A stream under way (`after` events read), then the engine frozen and the hang confirmed: the
    stream is cut. The reading thread (lines: what the client read; read: read_stream, or read_chat)."""
    rig.script.chunk_delay_s = 0.05
    t = threading.Thread(target=read or read_stream, args=(rig.url, body, lines))
    t.start()
    deadline = time.monotonic() + 10
    while len([line for line in lines if line.startswith("data: {")]) < after:
        assert time.monotonic() < deadline, lines
        time.sleep(0.02)
    rig.script.hang = True  # the engine freezes mid-stream
    time.sleep(0.2)
    rig.emit("state", state="restarting", previous="suspect", reason="hang confirmed")
    return t


def test_a_stream_cut_by_a_confirmed_hang_is_held_open_and_continued_from_the_exact_token_after_the_restart(rig, quick_hold, tmp_path):
    bundle = tmp_path / "incidents" / "20261206T000000Z-hang"
    bundle.mkdir(parents=True)
    lines: list[str] = []
    t = cut_while_streaming(rig, BODY, lines, after=10)
    rig.emit("incident", reason="hang confirmed", bundle=str(bundle))
    time.sleep(1.0)  # held: the client hears comment lines
    assert any(line.startswith(": ") for line in lines), lines[-5:]
    rig.script.hang = False
    rig.emit("restart-done", seconds=1.0)
    t.join(timeout=30)
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    texts = "".join(c["text"] for e in events for c in e["choices"])
    want = uncut("Hello", 40)
    assert texts == "".join(id_text(i) for i in want)  # no token repeated, none missing at the seam
    assert {(e["id"], e["created"]) for e in events} == {(events[0]["id"], events[0]["created"])}  # one stream
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]
    assert all(c.get("token_ids") is None and c.get("prompt_token_ids") is None for e in events for c in e["choices"])  # not asked
    assert events[-1]["usage"] == {"prompt_tokens": 5, "total_tokens": 45, "completion_tokens": 40}
    assert [line for line in lines if line][-1] == "data: [DONE]"
    first, then = rig.script.prompts[-2:]
    assert first == list(b"Hello") and then == first + want[:len(then) - len(first)] and len(then) > len(first)
    sent = [json.loads(r["body"]) for r in rig.script.received][-2:]
    assert sent[0]["return_token_ids"] is True and sent[1]["max_tokens"] == 40 - (len(then) - len(first))
    assert rig.metric("spark_cluster_gateway_streams_continued_total", how="same_group") == 1
    assert rig.metric("spark_cluster_gateway_requests_total", outcome="continued") == 1
    assert rig.metric("spark_cluster_gateway_requests_total", outcome="interrupted") == 0
    # what became of it: an event of its group, and a line of the incident's bundle
    [line] = (bundle / "streams.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert {k: record[k] for k in ("event", "how", "path", "from_token")} == \
        {"event": "stream-continued", "how": "same_group", "path": "/v1/completions", "from_token": len(then) - len(first)}
    assert record["pause_s"] >= 0.8 and "restarting" in record["why_cut"]
    events = httpx.get(f"{rig.api}/api/events", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert [e["from_token"] for e in events if e["event"] == "stream-continued"] == [record["from_token"]]


def test_a_stream_that_cannot_be_continued_ends_with_the_error_event_and_its_reason_is_counted(rig):
    rig.script.chunks, rig.script.chunk_delay_s = 50, 0.05
    lines: list[str] = []
    t = threading.Thread(target=read_stream, args=(rig.url, {**BODY, "n": 2}, lines))
    t.start()
    time.sleep(0.5)
    rig.script.hang = True
    rig.emit("state", state="restarting", previous="suspect", reason="hang confirmed")
    t.join(timeout=10)
    assert json.loads([line for line in lines if line][-1][6:])["error"]["type"] == "engine_unavailable"
    assert rig.metric("spark_cluster_gateway_streams_not_continued_total", reason="choices") == 1
    rig.script.hang = False
    events = httpx.get(f"{rig.api}/api/events", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert [e["reason"] for e in events if e["event"] == "stream-not-continued"] == ["choices: n 2, several choices would differ"]




def test_a_client_that_leaves_while_its_cut_stream_is_held_gets_nothing_continued(rig, quick_hold):
    calls = rig.script.calls
    with httpx.stream("POST", f"{rig.url}/v1/completions", json=BODY, timeout=30) as s:
        lines = s.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        rig.script.hang = True
        rig.emit("state", state="restarting", previous="suspect", reason="hang confirmed")
        while not next(lines).startswith(": "):  # held: its comment lines
            pass
    rig.script.hang = False
    rig.emit("restart-done", seconds=1.0)
    time.sleep(0.5)
    assert rig.script.calls == calls + 1  # the stream's own request, no continuation
    assert rig.metric("spark_cluster_gateway_requests_total", outcome="cancelled") == 1
    assert rig.metric("spark_cluster_gateway_streams_continued_total", how="same_group") == 0


@pytest.mark.parametrize("rig", [{"continue_within_s": 0.6}], indirect=True)
def test_a_cut_stream_no_group_takes_within_continue_within_s_ends_with_the_error_event(rig, quick_hold):
    lines: list[str] = []
    t = cut_while_streaming(rig, BODY, lines)
    t.join(timeout=10)
    assert not t.is_alive()
    assert json.loads([line for line in lines if line][-1][6:])["error"]["type"] == "engine_unavailable"
    assert any(line.startswith(": ") for line in lines)  # held first
    assert rig.metric("spark_cluster_gateway_streams_not_continued_total", reason="wait") == 1
    rig.script.hang = False


@pytest.mark.fuzz
@pytest.mark.parametrize("rig", [{"continue_attempts": 5}], indirect=True)
def test_streams_cut_at_random_points_join_without_a_repeated_or_missing_token(rig, monkeypatch):
    """The engine's connection breaks at random points of a stream, up to four times: the client's
    stream is continued each time and is the uncut stream, to the token (ids where asked, texts, one
    end, the usage of the whole)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    monkeypatch.setattr(stream_carry, "RETRY_PAUSE_S", 0.01)
    rig.script.chunk_delay_s = 0

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(max_tokens=st.integers(1, 24), cuts=st.lists(st.integers(0, 24), max_size=4), ids=st.booleans(), usage=st.booleans(),
           prompt=st.text("abcdefgh ", min_size=1, max_size=12))
    def one(max_tokens, cuts, ids, usage, prompt):
        rig.script.cut_after = list(cuts)
        body = {"model": "tiny-qwen3", "prompt": prompt, "max_tokens": max_tokens, "stream": True}
        if ids:
            body["return_token_ids"] = True
        if usage:
            body["stream_options"] = {"include_usage": True}
        lines: list[str] = []
        read_stream(rig.url, body, lines)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        want = uncut(prompt, max_tokens)
        choices = [c for e in events for c in e["choices"]]
        assert not any("error" in e for e in events), events[-1]
        assert "".join(c["text"] for c in choices) == "".join(id_text(i) for i in want)
        if ids:
            assert [t for c in choices for t in c["token_ids"]] == want
            assert choices[0]["prompt_token_ids"] == list(prompt.encode()) and all(c["prompt_token_ids"] is None for c in choices[1:])
        else:
            assert all(c["token_ids"] is None and c["prompt_token_ids"] is None for c in choices)
        assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["length"]
        assert len({(e["id"], e["created"]) for e in events}) == 1
        if usage:
            assert events[-1]["usage"] == {"prompt_tokens": len(prompt.encode()), "total_tokens": len(prompt.encode()) + max_tokens,
                                           "completion_tokens": max_tokens}
        assert [line for line in lines if line][-1] == "data: [DONE]"
        rig.script.cut_after = []

    one()


@pytest.mark.fuzz
@pytest.mark.parametrize("rig", [{"continue_attempts": 5}], indirect=True)
def test_chat_streams_cut_at_random_points_are_the_uncut_stream_in_every_field(rig, monkeypatch):
    """The same for chats: cut in reasoning, in content or in a tool call's arguments, up to four
    times, the client's stream says what the uncut stream says, field by field, each tool call with
    one id, and the ids (where asked) once each."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    monkeypatch.setattr(stream_carry, "RETRY_PAUSE_S", 0.01)
    rig.script.chunk_delay_s = 0

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(max_tokens=st.integers(1, 40), cuts=st.lists(st.integers(0, 40), max_size=4), ids=st.booleans(),
           content=st.text("abcdefgh ", min_size=1, max_size=12))
    def one(max_tokens, cuts, ids, content):
        body = {**CHAT_BODY, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        if ids:
            body["return_token_ids"] = True
        whole: list[str] = []
        read_chat(rig.url, body, whole)
        rig.script.cut_after = list(cuts)
        lines: list[str] = []
        read_chat(rig.url, body, lines)
        rig.script.cut_after = []
        got, want = chat_parts(lines), chat_parts(whole)
        assert not got["errors"], got["errors"]
        assert {k: got[k] for k in ("reasoning", "content", "calls", "ends", "usage", "ids", "unasked")} == \
               {k: want[k] for k in ("reasoning", "content", "calls", "ends", "usage", "ids", "unasked")}
        assert len(got["heads"]) == 1 and all(c["ids"] == 1 for c in got["calls"])
        assert ids or got["empty"] == []  # no chunk a client that did not ask for the ids would not get from vLLM

    one()


CHAT_BODY = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "What is the weather?"}], "max_tokens": 60,
             "stream": True, "stream_options": {"include_usage": True},
             "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}


def read_chat(url: str, body: dict, lines: list[str]) -> None:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as s:
        for line in s.iter_lines():
            lines.append(line)


def chat_parts(lines: list[str]) -> dict:
    """What a client makes of a chat stream: reasoning, content, each tool call (id, name, arguments), ends."""
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    choices = [c for e in events for c in e.get("choices", ())]
    calls: dict[int, dict] = {}
    for c in choices:
        for call in c["delta"].get("tool_calls") or ():
            mine = calls.setdefault(call["index"], {"ids": [], "name": "", "arguments": ""})
            if "id" in call:
                mine["ids"].append(call["id"])
            mine["name"] += (call.get("function") or {}).get("name") or ""
            mine["arguments"] += (call.get("function") or {}).get("arguments") or ""
    return {"reasoning": "".join(c["delta"].get("reasoning") or "" for c in choices),
            "content": "".join(c["delta"].get("content") or "" for c in choices),
            "calls": [{**v, "ids": len(v["ids"])} for _, v in sorted(calls.items())],
            "ends": [c["finish_reason"] for c in choices if c["finish_reason"]],
            "heads": {(e["id"], e["created"], e["model"]) for e in events if "error" not in e},
            "usage": events[-1].get("usage"), "errors": [e for e in events if "error" in e],
            "empty": [c for c in choices if not c["delta"] and not c["finish_reason"]],
            "ids": [t for c in choices for t in c.get("token_ids") or ()],  # the events' pieces may differ: their ids may not
            "unasked": all(c.get("token_ids") is None for c in choices)}


def test_a_chat_stream_cut_by_a_hang_is_continued_through_derender_in_its_reasoning_content_and_tool_calls(rig, quick_hold):
    rig.script.chunk_delay_s = 0
    whole: list[str] = []
    read_chat(rig.url, CHAT_BODY, whole)  # the uncut stream of the same ids (the fake model is deterministic in its context)
    want = chat_parts(whole)
    assert want["reasoning"] and want["content"] and want["calls"] and not want["errors"]  # the stream has every part
    lines: list[str] = []
    t = cut_while_streaming(rig, CHAT_BODY, lines, after=25, read=read_chat)
    time.sleep(0.6)
    rig.script.hang = False
    rig.emit("restart-done", seconds=1.0)
    t.join(timeout=30)
    got = chat_parts(lines)
    assert not got["errors"] and got["ends"] == ["length"] and len(got["heads"]) == 1
    assert (got["reasoning"], got["content"]) == (want["reasoning"], want["content"])
    assert [(c["name"], c["arguments"], c["ids"]) for c in got["calls"]] == [(c["name"], c["arguments"], 1) for c in want["calls"]]
    assert got["usage"] == want["usage"] and got["empty"] == [] and got["unasked"]
    assert any(line.startswith(": ") for line in lines)  # held open meanwhile
    first, then = rig.script.prompts[-2:]
    assert then[:len(first)] == first and len(then) > len(first)  # continued from the chat's ids and those the client had
    assert rig.script.derendered >= 1
    assert rig.metric("spark_cluster_gateway_streams_continued_total", how="same_group") == 1
    events = httpx.get(f"{rig.api}/api/events", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    [record] = [e for e in events if e["event"] == "stream-continued"]
    assert record["path"] == "/v1/chat/completions" and 0.6 <= record["pause_s"] < 10, record  # the seam: from the cut to the first piece after


def test_a_chat_whose_continuation_the_engine_ends_with_an_error_ends_with_the_error_event_not_as_if_whole(rig, quick_hold):
    rig.script.error_after = [3]  # the continuation: three pieces, then vLLM's error event and [DONE]
    lines: list[str] = []
    t = cut_while_streaming(rig, CHAT_BODY, lines, read=read_chat)
    rig.script.hang = False
    rig.emit("restart-done", seconds=1.0)
    t.join(timeout=30)
    got = chat_parts(lines)
    assert got["ends"] == [] and json.loads([line for line in lines if line][-1][6:])["error"]["type"] == "engine_unavailable"
    assert rig.metric("spark_cluster_gateway_streams_not_continued_total", reason="refused") == 1


def test_a_chat_stream_whose_engine_cannot_derender_ends_with_the_error_event_and_the_reason(rig, quick_hold):
    rig.script.derender_status = 403  # vLLM without --enable-scale-out
    lines: list[str] = []
    t = cut_while_streaming(rig, CHAT_BODY, lines, read=read_chat)
    rig.script.hang = False
    rig.emit("restart-done", seconds=1.0)
    t.join(timeout=30)
    assert json.loads([line for line in lines if line][-1][6:])["error"]["type"] == "engine_unavailable"
    assert rig.metric("spark_cluster_gateway_streams_not_continued_total", reason="derender") == 1
