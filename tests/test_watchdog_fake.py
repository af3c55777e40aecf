"""The watchdog's whole path on fakes, on both executors, in milliseconds: the real Watchdog (observe, decide, incident
bundle, the ordered gang restart through the real Executor, backoff, breaker) over the scripted fake
transport (tests/fakes.py) and a fake vLLM API on httpx's MockTransport, with a fake clock."""

from __future__ import annotations

import json

import pytest

from spark_cluster.config import load_config
from spark_cluster.watchdog import Watchdog

from .conftest import SIM_CONFIGS
from .fakes import Clock, FakeCluster, FakeEngineApi, fake_nodes, periods, removed, started


@pytest.fixture(params=sorted(SIM_CONFIGS))
def loop(tmp_path, request):
    cfg = load_config(SIM_CONFIGS[request.param]).model_copy(update={"state_dir": str(tmp_path)})
    cluster = FakeCluster(cfg).serving()
    cluster.generation = 1
    engine = FakeEngineApi(cluster)
    clock = Clock()
    events: list[dict] = []
    wd = Watchdog(cfg, fake_nodes(cluster), on_event=events.append, clock=clock, sleep=clock.sleep, http=engine.client())
    yield wd, cluster, engine, clock, events
    wd.close()


def test_a_wedged_engine_is_restarted_in_order_then_backed_off_then_the_breaker_stops_it(loop, tmp_path):
    wd, cluster, engine, clock, events = loop
    periods(wd, clock, 40)  # ready, past the grace period, progressing
    assert wd.state.phase == "healthy" and not [e for e in events if e["event"] == "decision"]
    before = len(cluster.log)

    engine.wedge()  # counters still with requests running; the canary times out
    for _ in range(20):
        periods(wd, clock, 1)
        if any(e["event"] == "restart-done" for e in events):
            break
    [decision] = [e for e in events if e["event"] == "decision" and e["action"] == "restart"]
    assert decision["reason"].startswith("hang confirmed: no progress") and "canary" in decision["reason"]
    done = next(e for e in events if e["event"] == "restart-done")
    # the kill, in order: vLLM's head container first, then the worker; their logs saved into the bundle,
    # the containers removed
    ray = wd.cfg.executor == "ray"
    head, worker = ("spark-ray-head", "spark-ray-worker") if ray else ("spark-vllm", "spark-vllm-worker")
    log = cluster.log[before:]
    kills = [c.split()[2] for _, c in log if c.startswith("docker kill ")]
    assert kills == [head, worker], kills
    assert sorted(r for r in removed(cluster) if "-check-" not in r) == [f"sim-1:{head}", f"sim-2:{worker}"]  # at once, after
    # the start, in the card's order: the worker, the head, then (Ray) vLLM inside it
    want = [f"sim-2:{worker}", f"sim-1:{head}"] + ([f"sim-1:{head}/vllm"] if ray else [])
    assert started(cluster)[-len(want):] == want
    assert {"incident-bundle", "kill", "preflight", "ready/health", "ready/completion"} <= set(done["phases"])
    assert ("wait-ray/sim-1/nodes" in done["phases"]) is ray
    bundle = tmp_path / "incidents" / next(p.name for p in (tmp_path / "incidents").iterdir())
    files = {p.name for p in bundle.rglob("*") if p.is_file()}
    assert {"reason.txt", "decision-trail.jsonl", "observations.jsonl", "metrics.txt", "ranks.json", "restart.json",
            "sim-1-host.txt", "sim-2-host.txt", f"sim-1--{head}.log", f"sim-2--{worker}.log"} <= files, files
    assert json.loads((bundle / "restart.json").read_text())["event"] == "restart-done"
    assert "vllm:num_requests_running" in (bundle / "metrics.txt").read_text()

    # wedged again after each restart: the second waits out the backoff, the fourth in the hour trips the breaker
    for _ in range(3):
        periods(wd, clock, 35)  # past the grace period after the restart
        engine.wedge()
        periods(wd, clock, 15)
    assert [e["seconds"] for e in events if e["event"] == "backoff"] == [10, 20]
    assert len([e for e in events if e["event"] == "restart-done"]) == 3
    assert wd.state.phase == "failed" and any(e["event"] == "alert" and "circuit breaker" in e["reason"] for e in events)
    assert len({p.name for p in (tmp_path / "incidents").iterdir()}) == 3  # one bundle per restart, none overwritten


def test_resume_takes_a_tripped_breaker_back_as_the_docs_say_without_a_pause_before(loop):
    """docs/controller.md and failover.md: POST /api/watchdog/resume resets a tripped breaker. The code
    acted only when the pause flag changed, so a failed watchdog that was never paused stayed failed."""
    from dataclasses import replace

    wd, cluster, engine, clock, events = loop
    periods(wd, clock, 3)
    wd.state = replace(wd.state, phase="failed", last_reason="circuit breaker: 3 restarts in the last hour (limit 3)",
                       restarts=(clock.t - 30, clock.t - 20, clock.t - 10))
    periods(wd, clock, 2)
    assert wd.state.phase == "failed"  # it stays failed until told otherwise
    wd.pause(False)  # the API's resume
    periods(wd, clock, 2)
    [reset] = [e for e in events if e["event"] == "breaker-reset"]
    assert reset["previous"].startswith("circuit breaker") and "resumed" in reset["why"]
    assert wd.state.phase == "healthy" and [e["event"] for e in events].count("watch-resumed") == 1
    assert len(wd.state.restarts) == 3 and wd.state.budget_since is not None  # the history kept, not counted
    wd.pause(False)  # resuming a watchdog that runs changes nothing
    periods(wd, clock, 1)
    assert [e["event"] for e in events].count("watch-resumed") == 1
