"""The status verdict: one pure function, table-driven over observations.

Recorded observations from the simulated cluster live in tests/data/observations/ (written by
tests/test_status.py with RECORD_OBSERVATIONS=1); the constructed rows cover what the cluster
cannot easily be made to show.
"""

from __future__ import annotations

import json

import pytest

from spark_cluster.status import ContainerObs, NodeObs, Observation, RayObs, VLLMObs, verdict

from .conftest import ROOT

EXPECTED = {"sim-1": "10.99.0.11", "sim-2": "10.99.0.12"}


def obs(nodes=None, vllm=None, ray=None, watchdog=None) -> Observation:
    base_nodes = [
        NodeObs(name="sim-1", role="head", reachable=True, latency_ms=3, sysctl={"vm.swappiness": {"expected": "1", "actual": "1"}},
                mem_total_gib=100, mem_available_gib=50,
                containers=[ContainerObs(name="spark-vllm", component="vllm", state="running", spec_current=True)]),
        NodeObs(name="sim-2", role="worker", reachable=True, latency_ms=3, sysctl={"vm.swappiness": {"expected": "1", "actual": "1"}},
                mem_total_gib=100, mem_available_gib=50,
                containers=[ContainerObs(name="spark-vllm-worker", component="vllm-worker", state="running", spec_current=True)]),
    ]
    for i, changes in (nodes or {}).items():
        base_nodes[i] = base_nodes[i].model_copy(update=changes)
    v = VLLMObs(endpoint="http://x:8000", health=200, models=["tiny-qwen3"], running=0, waiting=0, kv_cache_usage=0,
                steps_total=100, generation_tokens_total=1000, window_s=1.0, steps_in_window=0, generation_tok_s=0.0, progress_age_s=30)
    v = v.model_copy(update=vllm or {})
    return Observation(ts="t", cluster="spark", executor="native", plan_hash="h", nodes=base_nodes, ray=ray or RayObs(),
                       vllm=v, watchdog=watchdog)


def container(state, **kw):
    name = kw.pop("name", "spark-vllm-worker")
    return [ContainerObs(name=name, component="vllm-worker", state=state, spec_current=kw.pop("spec_current", True))]


CASES = [
    ("idle and healthy", obs(), "serving", ""),
    ("busy, slow but moving", obs(vllm={"running": 8, "waiting": 20, "steps_in_window": 1, "generation_tok_s": 0.5}), "serving", ""),
    ("tokens moving, step counter missing (older vLLM)", obs(vllm={"running": 2, "steps_in_window": None, "generation_tok_s": 3.0}), "serving", ""),
    ("work in flight, no step", obs(vllm={"running": 4, "steps_in_window": 0, "generation_tok_s": 0.0}), "stalled", "4 request(s)"),
    ("only waiting, no step", obs(vllm={"running": 0, "waiting": 3, "steps_in_window": 0}), "stalled", "no engine step"),
    ("paused worker, idle", obs(nodes={1: {"containers": container("paused")}}), "stalled", "spark-vllm-worker on sim-2 is paused"),
    ("worker container exited", obs(nodes={1: {"containers": container("exited")}}), "down", "spark-vllm-worker on sim-2 is exited"),
    ("worker container missing", obs(nodes={1: {"containers": container("missing")}}), "down", "sim-2 is missing"),
    ("worker unreachable", obs(nodes={1: {"reachable": False, "error": "timeout", "containers": []}}), "down", "unreachable: sim-2"),
    ("API not answering yet", obs(vllm={"health": None, "error": "ConnectError", "models": []}), "starting", "does not answer"),
    ("API 503", obs(vllm={"health": 503, "models": []}), "starting", "503"),
    ("API 500", obs(vllm={"health": 500, "models": []}), "down", "500"),
    ("model not listed yet", obs(vllm={"models": []}), "starting", "does not list tiny-qwen3"),
    ("ray lost a node", obs(ray=RayObs(checked=True, alive=["10.99.0.11"], dead=["10.99.0.12"])), "down", "Ray does not see node(s) sim-2"),
    ("ray all alive", obs(ray=RayObs(checked=True, alive=["10.99.0.11", "10.99.0.12"])), "serving", ""),
    ("sysctl drifted", obs(nodes={0: {"sysctl": {"vm.swappiness": {"expected": "1", "actual": "60"}}}}), "degraded", "vm.swappiness=60"),
    ("container from an older config", obs(nodes={1: {"containers": container("running", spec_current=False)}}), "degraded", "another config"),
    ("memory nearly exhausted", obs(nodes={0: {"mem_available_gib": 2}}), "degraded", "only 2.0 GiB"),
    ("watchdog gave up", obs(watchdog={"state": "failed", "reason": "breaker"}), "degraded", "watchdog failed"),
]


@pytest.mark.parametrize("name,observation,want,reason_part", CASES, ids=[c[0] for c in CASES])
def test_verdict_table(name, observation, want, reason_part):
    got, reason = verdict(observation, served_model="tiny-qwen3", expected_nodes=EXPECTED)
    assert got == want, reason
    assert reason_part in reason


RECORDED = sorted((ROOT / "tests" / "data" / "observations").glob("*.json"))


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
def test_verdict_on_recorded_observations(path):
    data = json.loads(path.read_text())
    got, reason = verdict(Observation.model_validate(data["observation"]), served_model="tiny-qwen3", expected_nodes=EXPECTED)
    assert got == data["verdict"], reason
