"""Which group a request goes to, when several serve one model behind the gateway: pure rules.

- Only groups whose door is open take new requests; among them a group the watchdog holds
  suspect only when no other serves.
- Prefix affinity: chat clients resend the whole conversation each turn, and a turn that lands on
  the group that served the previous one skips its prefill (vLLM's prefix cache). A request's text
  is cut into blocks; the hash of each prefix (block 1, blocks 1-2, ...) is remembered with the
  group it was sent to, and a request goes to the group that holds its longest remembered prefix.
  Only prefixes that reach past a chat's system messages count: a system prompt shared by every
  conversation says nothing about where one conversation's cache is (and the whole conversation is
  cached where it was served, vLLM's reply included, though only the prompt is seen here)...
- ...while that group's load stays within a bound: at most `bound` times the mean of requests in
  flight (consistent hashing with bounded loads, Mirrokni et al. 2018). Past it, or without a
  known prefix, the group with the fewest requests in flight takes it (ties in turn).
- A group found slow (spark_cluster.speed) has a weight below 1, its speed against what it should be:
  its load bound shrinks with it, and ties go to it in proportion to it (a group that serves slower
  holds each request longer, so the least loaded already gets fewer to it under load).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from typing import Iterable, Literal, NamedTuple, Optional, Sequence

How = Literal["affinity", "overflow", "least"]
HOWS: tuple[str, ...] = ("affinity", "overflow", "least")

BLOCK_CHARS = 128  # a prefix is remembered every this many characters (vLLM caches 16-token blocks: about 64 characters)
MAX_BLOCKS = 64  # the first 8 KiB of a conversation say which one it is
PREFIXES_KEPT = 200_000  # remembered prefixes (about 30 MB); the least recently used are forgotten
TEXT_PATHS = ("/v1/chat/completions", "/v1/completions")


def choose(load: dict[str, int], preferred: Optional[str], bound: float, credits: Optional[dict[str, float]] = None,
           weights: Optional[dict[str, float]] = None) -> tuple[str, How]:
    """The group for one request: `load` holds the candidates (requests in flight on each, in the
    config's order), `preferred` the group holding the request's longest known prefix, `weights` each
    one's share (a slow group's speed against what it should be, 1 otherwise). A group's load bound is
    its share of `bound` times the load; among the least loaded, smooth weighted round robin (as nginx's)
    picks: each tied group's credit grows by its weight, the highest takes it and gives back their sum
    (equal weights: in turn). Pure but for `credits`, that round robin's running state, updated in
    place: bounded by the weights, it carries no older history (a group back from a restart gets its
    turn, not the turns it missed)."""
    credits = {} if credits is None else credits
    weights = weights or {}
    w = {g: max(weights.get(g, 1.0), 0.01) for g in load}
    if preferred in load:
        total = sum(load.values()) + 1  # this request counted
        if load[preferred] + 1 <= max(1, math.ceil(bound * total * w[preferred] / sum(w.values()))):
            return preferred, "affinity"
    least = min(load.values())
    tied = [g for g in load if load[g] == least]
    for g in tied:
        credits[g] = credits.get(g, 0.0) + w[g]
    best = max(tied, key=lambda g: (credits[g], -tied.index(g)))
    credits[best] -= sum(w[g] for g in tied)
    return best, "least" if preferred is None or preferred not in load else "overflow"


class Prompt(NamedTuple):
    text: str
    shared: int = 0  # how many of its first characters are a chat's system messages (shared by conversations)


def prompt_of(path: str, body: bytes) -> Optional[Prompt]:
    """The text a request's prefix is read from: a chat's messages in order (role and content), a
    completion's prompt; None for other paths and bodies that are not such JSON. Pure."""
    if not path.startswith(TEXT_PATHS) or not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to read: the engine judges it, unrouted
        return None
    if not isinstance(data, dict):
        return None
    if path.startswith("/v1/chat/completions"):
        messages = data.get("messages")
        if not isinstance(messages, list):
            return None
        parts = [(m.get("role"), f"{m.get('role', '')}\x00{_content(m.get('content'))}\x00") for m in messages if isinstance(m, dict)]
        shared = 0
        for role, part in parts:
            if role not in ("system", "developer"):
                break
            shared += len(part.encode("utf-8", "surrogatepass"))
        return Prompt("".join(part for _, part in parts), shared)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of prompts: the first (a list of lists: token ids)
    return Prompt(prompt) if isinstance(prompt, str) else Prompt(json.dumps(prompt)) if prompt is not None else None


def _content(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # parts: text, images (their URL or data stand for them)
        return "".join(str(p.get("text") or p.get("image_url") or "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def prefix_keys(prompt: Prompt, block: int = BLOCK_CHARS, most: int = MAX_BLOCKS) -> list[bytes]:
    """The hash of every whole-block prefix of a prompt that reaches past its shared part, shortest
    first (at most `most` blocks in all). Pure."""
    h = hashlib.blake2b(digest_size=12)
    keys = []
    data = prompt.text.encode("utf-8", "surrogatepass")
    for start in range(0, min(len(data) // block, most) * block, block):
        h.update(data[start:start + block])
        if start + block > prompt.shared:
            keys.append(h.copy().digest())
    return keys


class PrefixTable:
    """Remembered prefixes and the group each was last sent to (least recently used forgotten)."""

    def __init__(self, kept: int = PREFIXES_KEPT):
        self.kept = kept
        self.groups: OrderedDict[bytes, str] = OrderedDict()

    def longest(self, keys: Sequence[bytes]) -> Optional[str]:
        """The group of the longest remembered prefix among `keys` (shortest first)."""
        for key in reversed(keys):
            group = self.groups.get(key)
            if group is not None:
                return group
        return None

    def remember(self, keys: Iterable[bytes], group: str) -> None:
        for key in keys:
            self.groups[key] = group
            self.groups.move_to_end(key)
        while len(self.groups) > self.kept:
            self.groups.popitem(last=False)

    def forget(self, group: str) -> None:
        """A group restarted: its cache is empty, nothing of it is worth going back for."""
        for key in [k for k, g in self.groups.items() if g == group]:
            del self.groups[key]
