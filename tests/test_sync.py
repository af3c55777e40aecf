"""Which node the model is copied from and what each other node lacks (spark_cluster/sync.py):
table tests over folder listings as the model check reads them (facts.parse_file_listing)."""

from __future__ import annotations

import pytest

from spark_cluster.facts import parse_file_listing
from spark_cluster.sync import SyncPlan, plan_sync

GB = 1 << 30
MODEL = {"config.json": 1_500, "tokenizer.json": 11_000_000, "model-00001-of-00002.safetensors": 5 * GB,
         "model-00002-of-00002.safetensors": 3 * GB, "model.safetensors.index.json": 60_000}


def without(files: dict, *paths: str) -> dict:
    return {p: s for p, s in files.items() if p not in paths}


HALF = {"model-00002-of-00002.safetensors": GB}  # a copy cut off at 1 GiB of 3


@pytest.mark.parametrize("listings, prefer, source, expected", [
    # the head has it, the worker nothing: everything goes to the worker
    ({"spark-1": MODEL, "spark-2": None}, "spark-1", None,
     SyncPlan("spark-1", {"spark-2": tuple(sorted(MODEL))}, {"spark-2": sum(MODEL.values())}, {"spark-2": ()})),
    # the worker downloaded it, not the head: copy from the worker
    ({"spark-1": {}, "spark-2": MODEL}, "spark-1", None,
     SyncPlan("spark-2", {"spark-1": tuple(sorted(MODEL))}, {"spark-1": sum(MODEL.values())}, {"spark-1": ()})),
    # a half-copied shard is shorter: only it is copied again
    ({"spark-1": MODEL, "spark-2": {**MODEL, **HALF}}, "spark-1", None,
     SyncPlan("spark-1", {"spark-2": ("model-00002-of-00002.safetensors",)}, {"spark-2": 3 * GB}, {"spark-2": ()})),
    # identical everywhere: nothing to copy (a second sync copies nothing)
    ({"spark-1": MODEL, "spark-2": dict(MODEL), "spark-3": dict(MODEL)}, "spark-1", None,
     SyncPlan("spark-1", {"spark-2": (), "spark-3": ()}, {"spark-2": 0, "spark-3": 0}, {"spark-2": (), "spark-3": ()})),
    # a file only one node has is part of the whole: that node is the source (every node ends up the same)
    ({"spark-1": MODEL, "spark-2": {**MODEL, "notes.txt": 10}}, "spark-1", None,
     SyncPlan("spark-2", {"spark-1": ("notes.txt",)}, {"spark-1": 10}, {"spark-1": ()})),
    # ... unless the source is named: then it is left alone on the target and reported
    ({"spark-1": MODEL, "spark-2": {**MODEL, "notes.txt": 10}}, "spark-1", "spark-1",
     SyncPlan("spark-1", {"spark-2": ()}, {"spark-2": 0}, {"spark-2": ("notes.txt",)})),
    # named by the user: wins even over a node with more
    ({"spark-1": {**MODEL, **HALF}, "spark-2": MODEL}, "spark-1", "spark-1",
     SyncPlan("spark-1", {"spark-2": ("model-00002-of-00002.safetensors",)}, {"spark-2": GB}, {"spark-2": ()})),
])
def test_the_model_is_copied_from_a_node_that_has_all_of_it_to_what_each_other_lacks(listings, prefer, source, expected):
    assert plan_sync(listings, prefer=prefer, source=source) == expected


def test_a_second_sync_has_nothing_to_do():
    assert plan_sync({"spark-1": MODEL, "spark-2": dict(MODEL)}, prefer="spark-1").nothing_to_do
    assert not plan_sync({"spark-1": MODEL, "spark-2": {}}, prefer="spark-1").nothing_to_do


@pytest.mark.parametrize("listings, source, words", [
    ({"spark-1": None, "spark-2": {}}, None, ["missing or empty on every node"]),
    # each has what the other lacks: neither is whole
    ({"spark-1": without(MODEL, "config.json"), "spark-2": {**MODEL, **HALF}}, None,
     ["no node has the whole model", "spark-1 lacks 1 file(s)", "e.g. config.json", "spark-2 lacks 1", "name the node to copy from"]),
    ({"spark-1": MODEL, "spark-2": None}, "spark-3", ["spark-3 is not a node of this cluster"]),
    ({"spark-1": MODEL, "spark-2": None}, "spark-2", ["missing or empty on spark-2"]),
])
def test_nothing_is_copied_when_the_source_is_not_clear(listings, source, words):
    plan = plan_sync(listings, prefer="spark-1", source=source)
    assert plan.source is None and plan.error and not plan.nothing_to_do
    for w in words:
        assert w in plan.error, plan.error


def test_the_listing_as_the_model_check_prints_it():
    text = "config.json\t1500\nsub dir/weights.safetensors\t5368709120\nodd line\n\tnot-a-path\n"
    assert parse_file_listing(text) == {"config.json": 1500, "sub dir/weights.safetensors": 5 * GB}
