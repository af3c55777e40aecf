"""What the gateway keeps of a stream to continue it after a cut, and the request that continues it
(pure: bytes and dicts in, bytes and dicts out; table-tested).

A stream cut by a hang or a restart can be continued exactly only from the engine's own token ids:
vLLM's `return_token_ids` puts the prompt's ids in a stream's first event and each event's
generated ids beside its text. So the gateway asks for them on every stream it may have to continue
(and takes them out again for a client that did not ask), keeps the prompt's ids and every id that
went to the client, and, on a cut, sends `prompt: <prompt ids + the ids the client has>` with the
tokens left and the same sampling settings. The continuation's events are rewritten into the
client's stream: its `id`, `created` and `model`, the ids only where asked, and the usage counting
the whole answer.

A chat stream is kept the same way (its prompt's ids come in its first chunk, each chunk's ids
beside its deltas) plus the chunks the ids came in and the ids of the tool calls sent; its
continuation is a completion too, whose pieces vLLM's derender turns into chat chunks
(spark_cluster.chat_continuation).

What cannot be continued exactly is never continued (the stream ends with the error event as
before, the reason counted): several choices (`n`, `best_of`: the answer would differ), a batch of
prompts, `echo`, stop strings (the engine holds back text that may begin one: the client's text
lags its ids), a stream whose ids the engine did not give; for chats also what
chat_continuation.why_not_chat lists. Every reason begins with its code (the metric's label:
`reason_code`).
"""

from __future__ import annotations

import json
import re
from array import array
from dataclasses import dataclass, field
from typing import Any, Optional

from .chat_continuation import CHAT, chat_limit, generation, why_not_chat

COMPLETIONS = "/v1/completions"
# why a cut stream was not continued: each reason's code (the words of the reasons begin with them)
REASONS = ("request", "path", "choices", "batch", "echo", "stop", "ids", "long", "json", "ended", "attempts", "wait", "refused",
           "logprobs", "grammar", "budget", "usage", "derender")
MAX_KEPT_IDS = 1 << 18  # ids kept per stream (4 bytes each: 1 MiB); a longer stream is not continued
# fields of a completion request that concern the prompt as sent: not carried into a continuation
PROMPT_ONLY = ("prompt", "prompt_logprobs", "echo", "suffix")


@dataclass
class Kept:
    """One stream the gateway may continue: the request as the client sent it, and what went out."""

    path: str
    request: dict[str, Any]
    ids_asked: bool  # the client asked for the token ids itself: they stay in its events
    watched: bool = True  # its events are read (False: it cannot be continued, why_not says why, and they pass untouched)
    prompt_ids: Optional[array] = None
    sent: array = field(default_factory=lambda: array("i"))
    head: Optional[dict[str, Any]] = None  # the first event's id, created and model: the client's stream keeps them
    finished: bool = False  # a finish_reason went out
    continued: int = 0  # continuations so far
    why_not: Optional[str] = None  # set once something makes it impossible to continue exactly
    chat: bool = False  # a chat stream: its continuation goes through derender (chat_continuation)
    chunk_lens: array = field(default_factory=lambda: array("i"))  # a chat's ids, chunk by chunk as they came
    tool_ids: list[str] = field(default_factory=list)  # a chat's tool calls sent: their ids, by index

    def max_tokens(self) -> Optional[int]:
        if self.chat:
            return chat_limit(self.request)
        value = self.request.get("max_tokens")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


def why_not_kept(path: str, request: Any) -> Optional[str]:
    """Why a streamed request cannot be continued exactly (None: it can). Pure."""
    if not isinstance(request, dict):
        return "request: not a JSON object"
    path = path.split("?", 1)[0]
    if path == CHAT:
        return why_not_chat(request)
    if path != COMPLETIONS:
        return "path: only completions and chats are continued"
    for name in ("n", "best_of"):
        value = request.get(name)
        if value not in (None, 1):
            return f"choices: {name} {value!r}, several choices would differ"
    prompt = request.get("prompt")
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt))):
        return "batch: a batch of prompts"
    if request.get("echo"):
        return "echo: the prompt echoed"
    if request.get("stop"):
        return "stop: stop strings, the engine holds back text that may begin one"
    return None


def keep(path: str, body: bytes) -> tuple[Optional[Kept], bytes]:
    """For a request about to go to the engine: (what to keep, the body to send). A stream that can be
    continued is sent asking for its token ids; one that cannot is kept with why_not (its events pass
    untouched); anything else is not a stream: nothing kept. Pure."""
    try:
        request = json.loads(body) if body else None
    except (ValueError, RecursionError):
        return None, body
    if not isinstance(request, dict) or request.get("stream") is not True:
        return None, body
    why = why_not_kept(path, request)
    kept = Kept(path=path.split("?", 1)[0], request=request, ids_asked=request.get("return_token_ids") is True,
                watched=why is None, why_not=why, chat=path.split("?", 1)[0] == CHAT)
    if why is not None or kept.ids_asked:
        return kept, body
    return kept, json.dumps({**request, "return_token_ids": True}).encode()


def pass_events(kept: Kept, out: bytes) -> bytes:
    """Whole events of the engine's answer on their way to the client (Flight.passing gives them):
    what they say is kept (the prompt's ids, the ids sent, the head, the end), and they are
    rewritten where the client must not see the difference: the ids where it did not ask, and, after
    a continuation, the head and the usage of the stream it began with. Pure but for `kept`."""
    if not out or not kept.watched:
        return out
    rewritten = False
    parts = out.split(b"\n\n")
    for i, event in enumerate(parts):
        if not event.startswith(b"data: {"):
            continue
        if kept.chat:
            parts[i], changed = _take_chat(kept, event)
            rewritten = rewritten or changed
            continue
        if kept.head is not None and not kept.continued:  # every token of a stream passes here: no JSON parsed
            fast = _take_fast(kept, event)
            if fast is not event:
                parts[i], rewritten = fast, True
            continue
        try:
            data = json.loads(event[6:])
        except (ValueError, RecursionError):
            kept.why_not = kept.why_not or "json: an event that is not JSON"
            continue
        if _take(kept, data):
            parts[i] = b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
            rewritten = True
    if not rewritten:
        return out
    return b"\n\n".join(p for p in parts if p is not None)


# an event's fields as vLLM writes them (pydantic's compact JSON); inside a string value every quote is
# escaped, so a field's quoted name is never found in a text
_TOKEN_IDS = re.compile(rb'"token_ids"\s*:\s*(\[[\d,\s]*\]|null)')
_TEXT = re.compile(rb'"text"\s*:\s*"(?!")')  # a text that is not empty
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')


def _take_fast(kept: Kept, event: bytes) -> bytes:
    """An event after the first of a stream not continued: its ids kept (and taken out where not
    asked for), its end noted, read from its bytes. The event, or its rewritten copy."""
    m = _TOKEN_IDS.search(event)
    if m is not None and m.group(1) != b"null":
        listed = m.group(1)[1:-1]
        ids = [int(t) for t in listed.split(b",")] if listed.strip() else []
        if len(kept.sent) + len(ids) > MAX_KEPT_IDS:
            kept.why_not = kept.why_not or f"long: longer than the {MAX_KEPT_IDS} ids kept per stream"
        else:
            kept.sent.extend(ids)
        if not kept.ids_asked:
            event = event[:m.start(1)] + b"null" + event[m.end(1):]  # as vLLM sends it unasked
    elif _TEXT.search(event):
        kept.why_not = kept.why_not or "ids: the engine did not give the token ids"
    if _FINISHED.search(event):
        kept.finished = True
    return event


def _take(kept: Kept, data: dict[str, Any]) -> bool:
    """One event: kept, and changed in place where the client must see it otherwise. True when changed."""
    changed = False
    if kept.head is None:
        kept.head = {k: data.get(k) for k in ("id", "created", "model")}
    elif kept.continued:
        for k, v in kept.head.items():
            if data.get(k) != v:
                data[k] = v
                changed = True
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        prompt = choice.get("prompt_token_ids")
        if prompt is not None:
            if kept.prompt_ids is None and not kept.continued:
                kept.prompt_ids = array("i", prompt)
            if kept.continued or not kept.ids_asked:
                choice["prompt_token_ids"] = None  # as vLLM sends it unasked; a continuation's prompt is not the client's
                changed = True
        ids = choice.get("token_ids")
        if ids is not None:
            if len(kept.sent) + len(ids) > MAX_KEPT_IDS:
                kept.why_not = kept.why_not or f"long: longer than the {MAX_KEPT_IDS} ids kept per stream"
            else:
                kept.sent.extend(ids)
            if not kept.ids_asked:
                choice["token_ids"] = None  # as vLLM sends it unasked
                changed = True
        elif choice.get("text"):
            kept.why_not = kept.why_not or "ids: the engine did not give the token ids"
        if choice.get("finish_reason") is not None:
            kept.finished = True
    usage = data.get("usage")
    if kept.continued and isinstance(usage, dict) and kept.prompt_ids is not None:
        whole = {"prompt_tokens": len(kept.prompt_ids), "completion_tokens": len(kept.sent)}
        whole["total_tokens"] = whole["prompt_tokens"] + whole["completion_tokens"]
        if any(usage.get(k) != v for k, v in whole.items()):
            usage.update(whole)
            usage.pop("prompt_tokens_details", None)  # the continuation's cache hits are not the client's prompt's
            changed = True
    return changed


def continuation(kept: Kept) -> tuple[Optional[bytes], Optional[str]]:
    """The request that continues a cut stream from the token where it stopped, or why it cannot be. Pure."""
    if kept.why_not is not None:
        return None, kept.why_not
    if kept.finished:
        return None, "ended: the answer had ended"
    if kept.prompt_ids is None:
        return None, "ids: the engine did not give the prompt's token ids"
    prompt = [*kept.prompt_ids, *kept.sent]
    limit = kept.max_tokens()
    if limit is not None and limit - len(kept.sent) <= 0:
        return None, "ended: the answer had ended"
    if kept.chat:
        return json.dumps(generation(kept, prompt, None if limit is None else limit - len(kept.sent))).encode(), None
    request = {k: v for k, v in kept.request.items() if k not in PROMPT_ONLY}
    request.update(prompt=prompt, stream=True, return_token_ids=True)
    # without max_tokens vLLM stops where the context is full: the continuation's longer prompt leaves it
    # exactly what the cut stream had left (but for a model whose generation config sets max_new_tokens,
    # which vLLM would count afresh)
    if limit is not None:
        request["max_tokens"] = limit - len(kept.sent)
    least = request.get("min_tokens")
    if isinstance(least, int) and not isinstance(least, bool):
        request["min_tokens"] = max(0, least - len(kept.sent))
    return json.dumps(request).encode(), None


def _take_chat(kept: Kept, event: bytes) -> tuple[Optional[bytes], bool]:
    """One event of a chat stream from the engine: kept (its ids, the chunk they came in, the tool
    calls' ids, its end), and rewritten for a client that did not ask for the ids as vLLM writes it
    unasked: the ids null, and no chunk at all that only carried ids (an empty delta). (The event or
    None to drop it, changed or not.)"""
    try:
        data = json.loads(event[6:])
    except (ValueError, RecursionError):
        kept.why_not = kept.why_not or "json: an event that is not JSON"
        return event, False
    if not isinstance(data, dict):
        return event, False
    changed = False
    if kept.head is None:
        kept.head = {k: data.get(k) for k in ("id", "created", "model")}
    prompt = data.get("prompt_token_ids")
    if prompt is not None:
        if kept.prompt_ids is None:
            kept.prompt_ids = array("i", prompt)
        if not kept.ids_asked:
            data["prompt_token_ids"] = None
            changed = True
    choices = data.get("choices") or []
    keep_event = not choices
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        ids = choice.get("token_ids")
        if ids:
            if len(kept.sent) + len(ids) > MAX_KEPT_IDS:
                kept.why_not = kept.why_not or f"long: longer than the {MAX_KEPT_IDS} ids kept per stream"
            else:
                kept.sent.extend(ids)
                kept.chunk_lens.append(len(ids))
        delta = choice.get("delta") or {}
        if (delta.get("content") or delta.get("reasoning") or delta.get("tool_calls")) and ids is None:
            kept.why_not = kept.why_not or "ids: the engine did not give the token ids"
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict) and isinstance(call.get("id"), str):
                index = call.get("index", len(kept.tool_ids))
                kept.tool_ids.extend([""] * (index + 1 - len(kept.tool_ids)))
                kept.tool_ids[index] = call["id"]
        if choice.get("finish_reason") is not None:
            kept.finished = True
        if not kept.ids_asked:
            if ids is not None:
                choice["token_ids"] = None
                changed = True
            if delta or choice.get("finish_reason") is not None or choice.get("logprobs") is not None:
                keep_event = True
        else:
            keep_event = True
    if not keep_event:
        return None, True
    if not changed:
        return event, False
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode(), True


def reason_code(why: str) -> str:
    """The label a reason is counted under: the word before its colon."""
    return why.split(":", 1)[0]


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
