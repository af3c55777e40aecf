"""`up`'s decision of what to keep, remove and start: a pure function, table-tested without nodes."""

from __future__ import annotations

import pytest

from spark_cluster.config import load_config
from spark_cluster.facts import ContainerFact, ProcessFact
from spark_cluster.facts import LABEL_PREFIX
from spark_cluster.plan import build_plan
from spark_cluster.reconcile import member_name, reconcile

from .conftest import SIM_CONFIGS


def plan_of(executor: str, **vllm_changes):
    cfg = load_config(SIM_CONFIGS[executor])
    if vllm_changes:
        cfg = cfg.model_copy(update={"vllm": cfg.vllm.model_copy(update=vllm_changes)})
    return build_plan(cfg)


def members(plan):
    return [s for s in plan.steps if s.kind in ("start", "exec")]


def as_found(plan, **override) -> list[ContainerFact]:
    """Every container of the plan, running with its spec hash; override: name -> changes (None: absent)."""
    out = []
    for c in plan.containers():
        changes = override.get(c.name, {})
        if changes is None:
            continue
        fact = ContainerFact(node=c.node, name=c.name, component=c.component, state="running",
                             spec_hash=c.labels[f"{LABEL_PREFIX}.spec-hash"])
        out.append(fact.model_copy(update=changes))
    return out


def vllm_running(plan, state="running"):
    return {member_name(s): ProcessFact(state=state, pid=309 if state == "running" else None, detail="pid 309")
            for s in members(plan) if s.process is not None}


RAY = plan_of("ray")
NATIVE = plan_of("native")
RAY_FLAG_CHANGED = plan_of("ray", max_model_len=1024)
NATIVE_FLAG_CHANGED = plan_of("native", max_model_len=1024)
STRANGER = ContainerFact(node="sim-2", name="spark-old-worker", component="vllm-worker", state="running", spec_hash="x")

# name, plan, found, processes, why (part), removed (in order), started
CASES = [
    ("ray: unchanged", RAY, as_found(RAY), vllm_running(RAY), "", [], []),
    ("native: unchanged", NATIVE, as_found(NATIVE), {}, "", [], []),
    ("ray: a changed vLLM flag (in the head's spec)", RAY_FLAG_CHANGED, as_found(RAY), vllm_running(RAY), "spark-ray-head on sim-1 changed",
     ["spark-ray-head@sim-1", "spark-ray-worker@sim-2"], "all"),
    ("native: a changed flag recreates both ranks", NATIVE_FLAG_CHANGED, as_found(NATIVE), {}, "changed",
     ["spark-vllm@sim-1", "spark-vllm-worker@sim-2"], "all"),
    ("ray: changed image (worker's hash)", RAY, as_found(RAY, **{"spark-ray-worker": {"spec_hash": "old"}}), vllm_running(RAY),
     "spark-ray-worker on sim-2 changed", ["spark-ray-head@sim-1", "spark-ray-worker@sim-2"], "all"),
    ("ray: the worker missing", RAY, as_found(RAY, **{"spark-ray-worker": None}), vllm_running(RAY), "spark-ray-worker on sim-2 missing",
     ["spark-ray-head@sim-1"], "all"),
    ("native: the worker exited", NATIVE, as_found(NATIVE, **{"spark-vllm-worker": {"state": "exited"}}), {},
     "spark-vllm-worker on sim-2 exited", ["spark-vllm@sim-1", "spark-vllm-worker@sim-2"], "all"),
    # its containers kept: vLLM alone starts again in the head container (Ray ends the ranks of the engine that died)
    ("ray: vLLM gone from the head", RAY, as_found(RAY), vllm_running(RAY, "gone"), "vllm in spark-ray-head on sim-1 not running",
     [], ["spark-ray-head/vllm@sim-1"]),
    ("ray: vLLM gone and a stale container", RAY, as_found(RAY) + [STRANGER], vllm_running(RAY, "gone"), "vllm in spark-ray-head",
     ["spark-old-worker@sim-2"], ["spark-ray-head/vllm@sim-1"]),
    ("ray: vLLM gone and the worker changed: all again", RAY, as_found(RAY, **{"spark-ray-worker": {"spec_hash": "old"}}),
     vllm_running(RAY, "gone"), "spark-ray-worker on sim-2 changed", ["spark-ray-head@sim-1", "spark-ray-worker@sim-2"], "all"),
    ("ray: vLLM never read (its container not running)", RAY, as_found(RAY, **{"spark-ray-head": {"state": "paused"}}), {},
     "spark-ray-head on sim-1 paused", ["spark-ray-head@sim-1", "spark-ray-worker@sim-2"], "all"),
    ("native: a stale container of another spec, group kept", NATIVE, as_found(NATIVE) + [STRANGER], {}, "",
     ["spark-old-worker@sim-2"], []),
    ("ray: nothing there yet", RAY, [], {}, "spark-ray-worker on sim-2 missing", [], "all"),
]


@pytest.mark.parametrize("name,plan,found,processes,why,removed,started", CASES, ids=[c[0] for c in CASES])
def test_reconcile(name, plan, found, processes, why, removed, started):
    todo = reconcile(members(plan), found, processes)
    assert why in todo.why and bool(todo.why) == bool(why)
    assert [f"{c.name}@{c.node}" for c in todo.remove] == removed
    want_started = [member_name(s) for s in members(plan)] if started == "all" else started
    assert [member_name(s) for s in todo.start] == want_started
    assert todo.kept == ([] if started == "all" else [member_name(s) for s in members(plan) if member_name(s) not in want_started])
    assert todo.changed == bool(removed or want_started)


def test_the_group_starts_workers_first_and_stops_the_api_first():
    todo = reconcile(members(RAY), as_found(RAY, **{"spark-ray-worker": {"state": "exited"}}), vllm_running(RAY))
    assert [member_name(s) for s in todo.start] == ["spark-ray-worker@sim-2", "spark-ray-head@sim-1", "spark-ray-head/vllm@sim-1"]
    assert [c.component for c in todo.remove] == ["ray-head", "ray-worker"]
