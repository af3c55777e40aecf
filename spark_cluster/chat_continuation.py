"""Chat streams continued with vLLM's own parsers (pure: dicts and bytes in and out; table-tested).

A chat stream's events are the engine's parse of its tokens: reasoning, content and tool calls, by
the reasoning and tool parsers vLLM was started with. The gateway cannot redo that parse, and a
chat request cannot be given token ids as its prompt. But vLLM (0.30 on, `vllm serve
--enable-scale-out`) turns token ids into chat chunks for a caller that carries the state:
`/v1/chat/completions/derender` takes one piece of a generation and the stream's state (every id
so far, in the pieces it came in) and answers the chunk its own `/v1/chat/completions` would have
sent, replaying the earlier ids through a fresh parser.

So a cut chat stream is continued as a completion from its token ids (the prompt's ids, then every
id the client has: `continuation.continuation`), and each piece of that completion goes through
derender with a state that begins as the ids the client got, in the chunks they came in: the parser
stands exactly where the client's stream stopped, in reasoning, in content, or in a tool call's
arguments; the tool calls already sent keep their ids. The chunks derender answers are written in
the shape of vLLM's own stream (its `model_dump_json(exclude_unset=True)`), with the client's id,
created and model.

What cannot be continued exactly is never continued (reasons as in continuation.REASONS): several
choices, stop strings, log probabilities (not carried), an output held to a grammar (a response
format, structured outputs, tool_choice required or a named tool: the grammar would start again
inside the answer), a thinking budget (counted again from the seam), reasoning hidden from the
client (the engine then gives no ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .continuation import Kept

CHAT = "/v1/chat/completions"
DERENDER = "/v1/chat/completions/derender"

# a chat request's fields that carry over into the completion continuing it: its sampling (vLLM's
# ChatCompletionRequest.to_sampling_params and CompletionRequest's read the same fields)
SAMPLING = ("model", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
            "seed", "stop_token_ids", "ignore_eos", "min_tokens", "logit_bias", "allowed_token_ids", "bad_words",
            "watermarking", "repetition_detection", "vllm_xargs", "priority", "user", "stream_interval")
# grammars: the output is held to one from its first token
GRAMMAR = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structural_tag")


def why_not_chat(request: dict[str, Any]) -> Optional[str]:
    """Why a chat stream cannot be continued exactly (None: it can). Pure."""
    if not isinstance(request.get("messages"), list):
        return "request: a chat without messages"
    for name in ("n", "best_of"):
        value = request.get(name)
        if value not in (None, 1):
            return f"choices: {name} {value!r}, several choices would differ"
    if request.get("echo"):
        return "echo: the last message echoed"
    if request.get("stop"):
        return "stop: stop strings, the engine holds back text that may begin one"
    if request.get("logprobs") or request.get("top_logprobs") or request.get("logprob_token_ids") or request.get("prompt_logprobs"):
        return "logprobs: log probabilities are not carried into a continuation"
    fmt = request.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        return f"grammar: response_format {fmt.get('type')!r} holds the output to a grammar from its start"
    for name in GRAMMAR:
        if request.get(name):
            return f"grammar: {name} holds the output to a grammar from its start"
    choice = request.get("tool_choice")
    if request.get("tools") and (choice == "required" or isinstance(choice, dict)):
        return "grammar: tool_choice required or a named tool holds the output to a grammar from its start"
    if request.get("thinking_token_budget") is not None:
        return "budget: a thinking budget would be counted again from the seam"
    if request.get("include_reasoning") is False:
        return "ids: reasoning hidden, the engine gives no token ids"
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("continuous_usage_stats"):
        return "usage: usage in every chunk, counted afresh by a continuation"
    return None


def generation(kept: "Kept", prompt: list[int], left: Optional[int]) -> dict[str, Any]:
    """The completion request that continues a cut chat: the chat's sampling, the ids as its prompt."""
    request = {k: kept.request[k] for k in SAMPLING if k in kept.request}
    request.update(prompt=prompt, stream=True, return_token_ids=True, stream_options={"include_usage": True})
    if left is not None:
        request["max_tokens"] = left
    least = request.get("min_tokens")
    if isinstance(least, int) and not isinstance(least, bool):
        request["min_tokens"] = max(0, least - len(kept.sent))
    return request


def chat_limit(request: dict[str, Any]) -> Optional[int]:
    """A chat's most completion tokens (max_completion_tokens wins over max_tokens, as in vLLM)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = request.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def first_state(kept: "Kept") -> dict[str, Any]:
    """The derender state of the stream as the client has it: the ids it got, in the chunks they came
    in (a fresh parser replaying them stands where the client's stream stopped), the ids of the tool
    calls it got (kept for those calls)."""
    return {"output_token_ids": list(kept.sent), "output_chunk_lens": list(kept.chunk_lens), "role_sent": True,
            "tools_streamed": bool(kept.tool_ids), "last_tool_call_ids": list(kept.tool_ids)}


def derender_body(kept: "Kept", state: dict[str, Any], ids: list[int], finish: Optional[str], stop: Any) -> bytes:
    """One derender call: a piece of the continuation (its ids; its end), the state so far."""
    choice: dict[str, Any] = {"index": 0, "token_ids": ids, "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = stop
    # the chat's own settings (tools, template settings, what it asked for) without its messages: the
    # prompt is in its ids, and a long conversation would be sent again with every piece
    body = {"stream": True, "model": kept.request.get("model"), "stream_state": state,
            "generate_chunk": {"request_id": "continuation", "choices": [choice]},
            "prompt_token_ids": list(kept.prompt_ids or ()), "chat_request": {**kept.request, "messages": []}}
    return json.dumps(body, separators=(",", ":")).encode()


def client_event(kept: "Kept", chunk: dict[str, Any]) -> Optional[bytes]:
    """A derender chunk as the client's stream event, in the shape vLLM's own stream writes it
    (exclude_unset: a delta has only the fields that are set), with the client's head. None when it
    says nothing the client would have been sent (vLLM sends no chunk with an empty delta unless the
    client asked for the ids). Pure."""
    head = kept.head or {}
    out = []
    for choice in chunk.get("choices") or ():
        delta = _pruned(choice.get("delta") or {})
        delta.pop("role", None)  # the role went out in the stream's first chunk
        finish = choice.get("finish_reason")
        ids = choice.get("token_ids")
        if not delta and finish is None and not kept.ids_asked:
            continue
        item: dict[str, Any] = {"index": choice.get("index", 0), "delta": delta, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            item["stop_reason"] = choice.get("stop_reason")
        item["token_ids"] = ids if kept.ids_asked else None
        out.append(item)
    if not out:
        return None
    event = {"id": head.get("id"), "object": "chat.completion.chunk", "created": head.get("created"), "model": head.get("model"),
             "choices": out}
    return b"data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage_event(kept: "Kept") -> bytes:
    """The stream's last chunk when the client asked for usage (vLLM's: no choices, the counts of the
    whole answer), after a continuation."""
    head = kept.head or {}
    prompt, completion = len(kept.prompt_ids or ()), len(kept.sent)
    event = {"id": head.get("id"), "object": "chat.completion.chunk", "created": head.get("created"), "model": head.get("model"),
             "choices": [], "usage": {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}}
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class Pieces:
    """What whole events of the continuing completion said: its new ids, its end."""

    ids: list[int] = field(default_factory=list)
    finish: Optional[str] = None
    stop: Any = None
    done: bool = False  # `data: [DONE]` came


def pieces(data: bytes) -> tuple[Pieces, bytes]:
    """The whole events in data (a completion stream with token ids), and what follows the last one. Pure."""
    end = data.rfind(b"\n\n")
    whole, rest = (data[:end], data[end + 2:]) if end >= 0 else (b"", data)
    out = Pieces()
    for event in whole.split(b"\n\n"):
        event = event.strip()
        if event == b"data: [DONE]":
            out.done = True
        if not event.startswith(b"data: {"):
            continue
        try:
            body = json.loads(event[6:])
        except (ValueError, RecursionError):
            continue
        for choice in body.get("choices") or () if isinstance(body, dict) else ():
            out.ids.extend(choice.get("token_ids") or ())
            if choice.get("finish_reason") is not None:
                out.finish, out.stop = choice["finish_reason"], choice.get("stop_reason")
    return out, rest


def wants_usage(request: dict[str, Any]) -> bool:
    options = request.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _pruned(value: Any) -> Any:
    """A derender chunk's part without its unset fields (None), as exclude_unset leaves vLLM's own."""
    if isinstance(value, dict):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value
