"""Which group a request goes to (spark_cluster.routing): pure rules, table-tested."""

from __future__ import annotations

import json

import pytest

from spark_cluster.routing import Prompt, PrefixTable, choose, prefix_keys, prompt_of


@pytest.mark.parametrize("load, preferred, credits, expected", [
    ({"a": 0, "b": 0}, None, {}, ("a", "least")),
    ({"a": 0, "b": 0}, None, {"a": -1.0, "b": 1.0}, ("b", "least")),  # equal loads: in turn (a took the last)
    ({"a": 3, "b": 1}, None, {}, ("b", "least")),
    ({"a": 3, "b": 1}, "a", {}, ("a", "affinity")),  # 4 of 5 allowed: 1.25 x (5 / 2) -> 4
    ({"a": 4, "b": 1}, "a", {}, ("b", "overflow")),  # a fifth on a is past the bound
    ({"a": 0, "b": 0}, "b", {}, ("b", "affinity")),
    ({"a": 0}, "b", {}, ("a", "least")),  # the preferred group does not serve now
    ({"a": 0, "b": 5, "c": 5}, "b", {}, ("a", "overflow")),
    ({"a": 2, "b": 2, "c": 2}, "c", {}, ("c", "affinity")),  # 3 of 7: ceil(1.25 x 7 / 3) = 3
])
def test_choose(load, preferred, credits, expected):
    assert choose(load, preferred, 1.25, credits) == expected


@pytest.mark.parametrize("load, preferred, credits, weights, expected", [
    ({"a": 0, "b": 0}, None, {}, {"b": 0.5}, ("a", "least")),  # b at half its speed: given one for a's two
    ({"a": 0, "b": 0}, None, {"a": -0.5, "b": 0.5}, {"b": 0.5}, ("b", "least")),
    ({"a": 0, "b": 0}, None, {"a": 0.5, "b": -0.5}, {"b": 0.5}, ("a", "least")),
    ({"a": 1, "b": 0}, None, {"a": 9.0}, {"b": 0.5}, ("b", "least")),  # the least loaded first, whatever its weight
    ({"a": 1, "b": 2}, "b", {}, {"b": 0.5}, ("a", "overflow")),  # b's bound: ceil(1.25 x 4 x 0.5 / 1.5) = 2
    ({"a": 1, "b": 2}, "b", {}, {}, ("b", "affinity")),  # at full speed: ceil(1.25 x 4 / 2) = 3
])
def test_a_slow_groups_weight_shrinks_its_bound_and_its_turn(load, preferred, credits, weights, expected):
    assert choose(load, preferred, 1.25, credits, weights) == expected


def test_ties_give_each_group_its_weights_share_and_no_group_is_owed_its_missed_turns():
    credits: dict[str, float] = {}
    given = {"a": 0, "b": 0}
    for _ in range(300):
        group, _ = choose({"a": 0, "b": 0}, None, 1.25, credits, {"a": 1.0, "b": 0.5})
        given[group] += 1
    assert given == {"a": 200, "b": 100} and all(abs(c) <= 1.5 for c in credits.values())
    for _ in range(1000):  # b away (restarting): a takes everything, and b's credit does not grow
        choose({"a": 0}, None, 1.25, credits)
    back = [choose({"a": 0, "b": 0}, None, 1.25, credits)[0] for _ in range(6)]
    assert back.count("b") == 3, back  # in turn again at once, not six to b


def test_affinity_never_leaves_a_group_idle_while_another_queues():
    """Every request of one long conversation prefers a; with requests piling up, b takes its share."""
    load = {"a": 0, "b": 0}
    for _ in range(20):
        group, _ = choose(load, "a", 1.25)
        load[group] += 1
    assert load["b"] >= 7 and load["a"] - load["b"] <= 6


CHAT = "/v1/chat/completions"


def chat(*turns: str) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "system", "content": "You are terse. " * 20}] +
                       [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]}).encode()


def test_a_conversations_next_turn_shares_its_prefix_and_another_conversation_does_not():
    turn1 = prefix_keys(prompt_of(CHAT, chat("What is RoCE? " * 10)))
    turn2 = prefix_keys(prompt_of(CHAT, chat("What is RoCE? " * 10, "RDMA over Converged Ethernet. " * 15, "And NCCL?")))
    other = prefix_keys(prompt_of(CHAT, chat("Tell me about Ray. " * 10)))
    assert len(turn2) > len(turn1) >= 1 and turn2[:len(turn1)] == turn1
    assert not set(other) & set(turn2)  # the same system prompt, another conversation: no prefix in common counts
    table = PrefixTable()
    table.remember(turn1, "b")
    table.remember(other, "a")
    assert table.longest(turn2) == "b" and table.longest(other) == "a"
    table.forget("b")
    assert table.longest(turn2) is None


def test_the_table_forgets_the_least_recently_used():
    table = PrefixTable(kept=3)
    table.remember([b"1", b"2"], "a")
    table.remember([b"3"], "b")
    table.remember([b"1"], "b")  # used again
    table.remember([b"4"], "a")
    assert set(table.groups) == {b"3", b"1", b"4"} and table.groups[b"1"] == "b"


@pytest.mark.parametrize("path, body, text", [
    ("/v1/completions", b'{"prompt": "abc"}', Prompt("abc")),
    ("/v1/completions", b'{"prompt": ["abc", "def"]}', Prompt("abc")),
    ("/v1/completions", b'{"prompt": [1, 2, 3]}', Prompt("[1, 2, 3]")),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}', Prompt("user\x00hi\x00")),
    (CHAT, b'{"messages": [{"role": "system", "content": "be"}, {"role": "user", "content": "hi"}]}',
     Prompt("system\x00be\x00user\x00hi\x00", 10)),
    (CHAT, b'{"messages": "x"}', None),
    ("/v1/models", b"", None),
    ("/v1/completions", b"not json", None),
    ("/v1/completions", b"[]", None),
    ("/v1/embeddings", b'{"input": "abc"}', None),
    (CHAT, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),  # nested past Python's recursion limit
])
def test_prompt_of(path, body, text):
    assert prompt_of(path, body) == text


def test_prefix_keys_are_whole_blocks_past_the_shared_part_and_bounded():
    assert prefix_keys(Prompt("x" * 127)) == [] and len(prefix_keys(Prompt("x" * 256))) == 2
    assert len(prefix_keys(Prompt("x" * 640, shared=256))) == 3 and len(prefix_keys(Prompt("x" * 640, shared=255))) == 4
    assert prefix_keys(Prompt("x" * 640, shared=256))[0] == prefix_keys(Prompt("x" * 640))[2]  # hashes of the whole prefix
    assert len(prefix_keys(Prompt("x" * 100_000))) == 64
    assert prefix_keys(Prompt("\ud800 lone surrogate" * 20))  # any text a JSON body can carry
