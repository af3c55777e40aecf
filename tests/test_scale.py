"""Four simulated nodes (`sim up --nodes 4`), TP=2 x PP=2, on both executors: up, status, a frozen
worker under load restarted as a whole group in order, down; and two groups of TP=2 behind one
controller. Not in `make test` (10-25 minutes a test on 2 cores): `make test-scale`."""

from __future__ import annotations

import time

import pytest
import yaml

from spark_cluster.config import parse_config
from spark_cluster.executor import Executor
from spark_cluster.observe import list_containers
from spark_cluster.status import status
from spark_cluster.transport import Nodes

from .conftest import CONFIGS, assert_nothing_of, freeze, generation, leftovers
from .cluster_helpers import Running, completion_works, streaming, ts
from .two_groups import a_change_rolls_through, a_frozen_rank_costs_clients_nothing, a_slow_group_gets_its_share, two_groups_serving

pytestmark = [pytest.mark.cluster, pytest.mark.scale]

SCALE_CONFIGS = {"ray": CONFIGS / "local-sim-4node.yaml", "native": CONFIGS / "local-sim-4node-native.yaml"}


@pytest.mark.parametrize("executor", sorted(SCALE_CONFIGS))
def test_four_nodes_serve_fail_over_as_one_group_and_come_down(sim4, tmp_path, executor):
    data = yaml.safe_load(SCALE_CONFIGS[executor].read_text())
    data["state_dir"] = str(tmp_path / "state")
    cfg = parse_config(yaml.safe_dump(data))
    assert len(cfg.nodes) == 4 and cfg.tensor_parallel_size == 2 and cfg.vllm.pipeline_parallel_size == 2
    with Nodes(cfg) as nodes:
        res = Executor(cfg, nodes).up()
        print(f"{executor}: 4 nodes up in {res.total_s:.1f}s {res.phases}")
        rep = status(cfg, nodes, window_s=0.5)
    assert completion_works(cfg)
    assert rep.verdict == "serving", rep.verdict
    if executor == "ray":  # Ray shows the four nodes (and generation() below: one vLLM rank on each)
        assert sorted(rep.observation.ray.alive) == sorted(n.address for n in cfg.nodes)
    before = generation(cfg)

    worker = f"{cfg.name}-ray-worker" if executor == "ray" else f"{cfg.name}-vllm-worker"
    with streaming(cfg, 4, repeat=True):
        with Running(cfg) as w:
            w.wait_for(lambda e: e["event"] == "state" and e["state"] == "healthy", 120, "healthy state")
            t_freeze = time.time()
            freeze("sim-4", worker)  # the last pipeline stage's second rank
            decision = w.wait_for(lambda e: e["event"] == "decision" and e["action"] == "restart", 120, "restart decision")
            print(f"{executor}: hang confirmed {ts(decision) - t_freeze:.1f}s after the freeze: {decision['reason']}")
            assert "hang confirmed" in decision["reason"] and ts(decision) - t_freeze < 25
            w.restart_succeeded()
    done = w.kinds("restart-done")[-1]
    print(f"{executor}: restart {done['seconds']}s {done['phases']}")
    ex = [e for e in w.events if e["event"] == "executor"]
    killed = [(e["node"], e["container"]) for e in ex if e.get("step_event") == "container-kill"]
    started = [e["node"] for e in ex if e.get("step_event") == "step-ok" and e["phase"] in ("start-workers", "start-head", "serve")]
    # the whole group, in order: the API side first down, last up; every worker node in between
    assert killed[0][0] == "sim-1" and sorted(n for n, _ in killed[1:]) == ["sim-2", "sim-3", "sim-4"]
    assert sorted(started[:3]) == ["sim-2", "sim-3", "sim-4"] and set(started[3:]) == {"sim-1"}
    assert completion_works(cfg)
    assert_nothing_of(before, generation(cfg), cfg)

    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).down()
        assert {n: list_containers(nodes[n], cfg.name) for n in nodes.by_name} == {n.name: [] for n in cfg.nodes}
    if executor == "ray":
        assert not any(leftovers(cfg).values())


# ---- two groups of TP=2 behind one gateway ------------------------------------------------------


@pytest.mark.parametrize("executor", ["ray", "native"])
def test_two_groups_a_hang_in_one_costs_clients_nothing_a_slow_one_gets_its_share_and_a_change_rolls_through(sim4, tmp_path, executor):
    """Four simulated nodes as two groups of TP=2 behind one controller: a frozen rank in group a
    under load, then both of a's boxes limited to a quarter of a core (the slow verdict and a's share), then a rolling
    change of a vLLM flag under the same load (the frozen rank alone, on Ray, is in `make test`:
    tests/test_two_groups.py)."""
    with two_groups_serving(tmp_path, executor) as (path, cfg, c):
        a_frozen_rank_costs_clients_nothing(c, cfg)
        a_slow_group_gets_its_share(c, cfg)
        a_change_rolls_through(c, path, cfg)
