"""A chat stream kept and continued through vLLM's derender (spark_cluster.chat_continuation, and
the chat side of spark_cluster.continuation). Events shaped as vLLM 0.32's chat stream writes them
(ChatCompletionStreamResponse, model_dump_json(exclude_unset=True)); the recorded ones are in
tests/data/streams/."""

from __future__ import annotations

import json

import pytest

from spark_cluster.chat_continuation import (client_event, derender_body, first_state, generation, pieces, usage_event,
                                             why_not_chat)
from spark_cluster.continuation import continuation, keep, pass_events, why_not_kept

CHAT = "/v1/chat/completions"
PROMPT_IDS = [1, 518, 88, 205, 46, 79, 2, 205, 1, 71, 341, 725, 1447, 205]


def chat_request(**fields) -> bytes:
    return json.dumps({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10,
                       "stream": True, **fields}).encode()


def chunk(delta: dict, ids: list[int] | None, *, finish: str | None = None, prompt: list[int] | None = None, **top) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = None
    choice["token_ids"] = ids
    body = {"id": "chatcmpl-a", "object": "chat.completion.chunk", "created": 100, "model": "tiny-qwen3", "choices": [choice], **top}
    if prompt is not None:
        body["prompt_token_ids"] = prompt
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def events_of(raw: bytes) -> list[dict]:
    return [json.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]


@pytest.mark.parametrize("fields, why", [
    ({}, None),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, None),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"stream_options": {"include_usage": True}}, None),
    ({"n": 2}, "choices: n 2, several choices would differ"),
    ({"stop": ["</answer>"]}, "stop: stop strings, the engine holds back text that may begin one"),
    ({"logprobs": True, "top_logprobs": 2}, "logprobs: log probabilities are not carried into a continuation"),
    ({"response_format": {"type": "json_object"}}, "grammar: response_format 'json_object' holds the output to a grammar from its start"),
    ({"structured_outputs": {"regex": "a+"}}, "grammar: structured_outputs holds the output to a grammar from its start"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
     "grammar: tool_choice required or a named tool holds the output to a grammar from its start"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "f"}}},
     "grammar: tool_choice required or a named tool holds the output to a grammar from its start"),
    ({"thinking_token_budget": 100}, "budget: a thinking budget would be counted again from the seam"),
    ({"include_reasoning": False}, "ids: reasoning hidden, the engine gives no token ids"),
    ({"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "usage: usage in every chunk, counted afresh by a continuation"),
    ({"echo": True}, "echo: the last message echoed"),
    ({"messages": "Hi"}, "request: a chat without messages"),
])
def test_what_a_chat_stream_must_not_be_to_be_continued(fields, why):
    assert why_not_chat(json.loads(chat_request(**fields))) == why
    assert why_not_kept(CHAT, json.loads(chat_request(**fields))) == why


def test_a_chat_stream_is_kept_with_its_ids_in_the_chunks_they_came_in_and_its_tool_calls():
    kept, body = keep(CHAT, chat_request())
    assert kept is not None and kept.chat and kept.watched and json.loads(body)["return_token_ids"] is True
    call = {"index": 0, "id": "chatcmpl-tool-1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    raw = (chunk({"role": "assistant", "content": ""}, None, prompt=PROMPT_IDS) + chunk({"reasoning": "Let"}, [10])
           + chunk({}, [11, 12]) + chunk({"tool_calls": [call]}, [13]) + chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"c"}}]}, [14]))
    out = pass_events(kept, raw)
    assert list(kept.prompt_ids) == PROMPT_IDS and list(kept.sent) == [10, 11, 12, 13, 14]
    assert list(kept.chunk_lens) == [1, 2, 1, 1] and kept.tool_ids == ["chatcmpl-tool-1"] and not kept.finished
    sent = events_of(out)
    # what vLLM sends a client that did not ask: no ids, and no chunk that carried only ids
    assert len(sent) == 4 and sent[0]["prompt_token_ids"] is None
    assert [c["choices"][0]["delta"] for c in sent[1:]] == [{"reasoning": "Let"}, {"tool_calls": [call]},
                                                           {"tool_calls": [{"index": 0, "function": {"arguments": "{\"c"}}]}]
    assert all(c["choices"][0]["token_ids"] is None for c in sent)
    pass_events(kept, chunk({"content": "."}, [15], finish="length"))
    assert kept.finished and continuation(kept) == (None, "ended: the answer had ended")


def test_a_client_that_asked_for_the_ids_gets_the_chat_events_unchanged():
    kept, body = keep(CHAT, chat_request(return_token_ids=True))
    assert body == chat_request(return_token_ids=True)
    raw = chunk({"role": "assistant", "content": ""}, None, prompt=PROMPT_IDS) + chunk({}, [11, 12]) + chunk({"content": "a"}, [13])
    assert pass_events(kept, raw) == raw and list(kept.sent) == [11, 12, 13]


def test_a_cut_chat_is_continued_as_a_completion_of_its_ids_with_its_sampling_and_the_tokens_left():
    kept, _ = keep(CHAT, chat_request(max_completion_tokens=8, max_tokens=99, temperature=0.7, seed=3, min_tokens=4,
                                      tools=[{"type": "function", "function": {"name": "f"}}], chat_template_kwargs={"enable_thinking": True},
                                      stream_options={"include_usage": True}))
    pass_events(kept, chunk({"role": "assistant", "content": ""}, None, prompt=PROMPT_IDS) + chunk({"reasoning": "a"}, [10, 11, 12]))
    body, why = continuation(kept)
    assert why is None
    assert json.loads(body) == {"model": "tiny-qwen3", "temperature": 0.7, "seed": 3, "min_tokens": 1, "max_tokens": 5,
                                "prompt": PROMPT_IDS + [10, 11, 12], "stream": True, "return_token_ids": True,
                                "stream_options": {"include_usage": True}}
    assert generation(kept, [1], None).get("max_tokens") is None  # no limit: what the context leaves, as the chat had


def test_derender_starts_from_the_stream_the_client_has():
    kept, _ = keep(CHAT, chat_request())
    call = {"index": 0, "id": "chatcmpl-tool-1", "type": "function", "function": {"name": "f", "arguments": ""}}
    pass_events(kept, chunk({"role": "assistant", "content": ""}, None, prompt=PROMPT_IDS) + chunk({"content": "a"}, [10, 11])
                + chunk({"tool_calls": [call]}, [12]))
    state = first_state(kept)
    assert state == {"output_token_ids": [10, 11, 12], "output_chunk_lens": [2, 1], "role_sent": True, "tools_streamed": True,
                     "last_tool_call_ids": ["chatcmpl-tool-1"]}
    body = json.loads(derender_body(kept, state, [13, 14], "length", None))
    assert body["stream"] is True and body["stream_state"] == state and body["prompt_token_ids"] == PROMPT_IDS
    assert body["generate_chunk"]["choices"] == [{"index": 0, "token_ids": [13, 14], "finish_reason": "length", "stop_reason": None}]
    assert body["chat_request"] == {**json.loads(chat_request()), "messages": []}  # the client's own settings, not its conversation


def test_a_derendered_chunk_goes_to_the_client_as_vllms_stream_writes_it():
    kept, _ = keep(CHAT, chat_request())
    pass_events(kept, chunk({"role": "assistant", "content": ""}, None, prompt=PROMPT_IDS))
    derendered = {"id": "continuation", "object": "chat.completion.chunk", "created": 999, "model": "tiny-qwen3", "usage": None,
                  "prompt_token_ids": None,
                  "choices": [{"index": 0, "delta": {"role": None, "content": None, "reasoning": "b", "tool_calls": []},
                               "logprobs": None, "finish_reason": None, "stop_reason": None, "token_ids": None}]}
    [event] = events_of(client_event(kept, derendered))
    assert event == {"id": "chatcmpl-a", "object": "chat.completion.chunk", "created": 100, "model": "tiny-qwen3",
                     "choices": [{"index": 0, "delta": {"reasoning": "b", "tool_calls": []}, "logprobs": None, "finish_reason": None,
                                  "token_ids": None}]}
    empty = {**derendered, "choices": [{**derendered["choices"][0], "delta": {"role": "assistant"}}]}
    assert client_event(kept, empty) is None  # nothing vLLM would have sent a client that did not ask for the ids
    end = {**derendered, "choices": [{**derendered["choices"][0], "delta": {}, "finish_reason": "length", "token_ids": [7]}]}
    [last] = events_of(client_event(kept, end))
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length", "stop_reason": None,
                                  "token_ids": None}


def test_the_usage_of_a_continued_chat_counts_the_whole_answer():
    kept, _ = keep(CHAT, chat_request(stream_options={"include_usage": True}))
    pass_events(kept, chunk({"role": "assistant", "content": ""}, None, prompt=PROMPT_IDS) + chunk({"content": "a"}, [10, 11]))
    [event] = events_of(usage_event(kept))
    assert event["choices"] == [] and event["id"] == "chatcmpl-a"
    assert event["usage"] == {"prompt_tokens": 14, "total_tokens": 16, "completion_tokens": 2}


def test_the_continuations_pieces_are_read_from_whole_events():
    def ev(ids, finish=None):
        return b"data: " + json.dumps({"choices": [{"index": 0, "text": "x", "token_ids": ids, "finish_reason": finish,
                                                     "stop_reason": None}]}).encode() + b"\n\n"
    raw = ev([1]) + ev([2, 3]) + ev([4], "length")[:20]
    got, rest = pieces(raw)
    assert got.ids == [1, 2, 3] and got.finish is None and not got.done and rest == ev([4], "length")[:20]
    got, rest = pieces(rest + ev([4], "length")[20:] + b'data: {"choices":[],"usage":{"completion_tokens":4}}\n\ndata: [DONE]\n\n')
    assert got.ids == [4] and got.finish == "length" and got.done and rest == b""
