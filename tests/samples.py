"""Observations made up for the verdict's table tests: two healthy simulated nodes and a serving
engine, changed where a case says."""

from __future__ import annotations

from spark_cluster.observation import ContainerObs, NodeObs, Observation, RayObs, VLLMObs


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
                steps_total=100, generation_tokens_total=1000, window_s=1.0, steps_in_window=0, generation_tok_s=0.0, progress_age_s=30,
                progressed=False)
    v = v.model_copy(update=vllm or {})
    return Observation(ts="t", cluster="spark", executor="native", plan_hash="h", nodes=base_nodes, ray=ray or RayObs(),
                       vllm=v, watchdog=watchdog)
