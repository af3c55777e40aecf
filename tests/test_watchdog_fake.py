"""The watchdog's whole path on fakes, on both executors, in milliseconds: the real Watchdog (observe, decide, incident
bundle, the ordered gang restart through the real Executor, backoff, breaker) over the scripted fake
transport (tests/fakes.py) and a fake vLLM API on httpx's MockTransport, with a fake clock."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Optional

import pytest

from spark_cluster.config import load_config
from spark_cluster.watchdog import Watchdog

from spark_cluster.kept import memory_baselines, save_memory_baselines
from spark_cluster.memory_back import MemoryReading

from .conftest import SIM_CONFIGS
from .fakes import Clock, FakeCluster, FakeEngineApi, fake_nodes, periods, removed, started


@contextmanager
def watching(tmp_path, executor: str, memory: Optional[dict] = None, **watchdog):
    """The real watchdog over a fake serving group (watchdog and memory settings changed as given)."""
    cfg = load_config(SIM_CONFIGS[executor])
    cfg = cfg.model_copy(update={"state_dir": str(tmp_path), "watchdog": cfg.watchdog.model_copy(update=watchdog),
                                 "memory": cfg.memory.model_copy(update=memory or {}),
                                 "health": cfg.health.model_copy(update={"poll_interval_s": 0.01})})
    cluster = FakeCluster(cfg).serving()
    cluster.generation = 1
    engine = FakeEngineApi(cluster)
    clock = Clock()
    events: list[dict] = []
    wd = Watchdog(cfg, fake_nodes(cluster), on_event=events.append, clock=clock, sleep=clock.sleep, http=engine.client())
    try:
        yield wd, cluster, engine, clock, events
    finally:
        wd.close()


@pytest.fixture(params=sorted(SIM_CONFIGS))
def loop(tmp_path, request):
    with watching(tmp_path, request.param) as parts:
        yield parts


def group_removed(cluster) -> list[str]:
    """The group's containers removed (not the flag check's own, which `up` removes when done)."""
    return sorted(r for r in removed(cluster) if "-check-" not in r)


def restarted_once(wd, engine, clock, events, before_wedge=lambda: None) -> dict:
    """Wedge the engine of a healthy watchdog (before_wedge changes the cluster first): the restart's end event."""
    periods(wd, clock, 40)  # ready, past the grace period, progressing
    assert wd.state.phase == "healthy" and not [e for e in events if e["event"] == "decision"]
    before_wedge()
    engine.wedge()  # counters still with requests running; the canary times out
    for _ in range(20):
        periods(wd, clock, 1)
        if any(e["event"] in ("restart-done", "restart-failed") for e in events):
            break
    return next(e for e in events if e["event"] in ("restart-done", "restart-failed"))


@pytest.mark.parametrize("executor", sorted(SIM_CONFIGS))
def test_a_wedged_engine_is_restarted_in_order_then_backed_off_then_the_breaker_stops_it(tmp_path, executor):
    with watching(tmp_path, executor, restart="full") as loop:
        check_the_full_restart_backoff_and_breaker(loop, tmp_path)


def check_the_full_restart_backoff_and_breaker(loop, tmp_path):
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
    # the GPU probes (the memory CUDA can allocate, GPUDirect RDMA) are up's, not the restart's: memory the kill just
    # freed is waited for before the start (memory_back), never refused; the clock cap stays (the kill gives nothing back)
    assert not [c for _, c in log if "check-memory" in c or "check-gdr" in c or "nvidia-smi -rgc" in c]
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


def test_on_ray_a_wedged_engine_restarts_alone_in_its_kept_containers(tmp_path):
    """Everything but the engine sound: the containers and Ray stay, their logs go into the bundle, what
    is left of the engine is killed, Ray is asked until it has released the ranks, and vLLM starts again."""
    with watching(tmp_path, "ray") as (wd, cluster, engine, clock, events):
        before = len(cluster.log)
        done = restarted_once(wd, engine, clock, events)
        assert done["event"] == "restart-done", done
        [start] = [e for e in events if e["event"] == "restart-start"]
        assert start["restart"] == "kept" and "only the engine restarts" in start["why"]
        log = [c for _, c in cluster.log[before:]]
        assert not [c for c in log if c.startswith("docker kill ")] and group_removed(cluster) == []
        assert started(cluster)[-1:] == ["sim-1:spark-ray-head/vllm"] and len(started(cluster)) == 1
        clear = cluster.plan.steps_in("clear")[0].command
        serve = next(s.command for s in cluster.plan.steps if s.kind == "exec")
        assert log.index(clear) < log.index(serve)
        assert list(done["phases"])[:4] == ["incident-bundle", "logs", "kill", "ray-release"]
        assert {"serve/sim-1/vllm", "ready/completion"} <= set(done["phases"]) and "full/kill" not in done["phases"]
        bundle = next((tmp_path / "incidents").iterdir())
        assert {p.name for p in (bundle / "logs").iterdir()} == {"sim-1--spark-ray-head.log", "sim-2--spark-ray-worker.log"}
        assert cluster.generation == 2  # a new engine serves


def test_a_kept_restart_that_fails_becomes_the_full_one_and_says_why(tmp_path):
    with watching(tmp_path, "ray") as (wd, cluster, engine, clock, events):
        cluster.script(cluster.plan.steps_in("clear")[0].command, (1, "engine processes still there: 4711\n", ""))
        done = restarted_once(wd, engine, clock, events)
        assert done["event"] == "restart-done", done
        [fallback] = [e for e in events if e["event"] == "restart-fallback"]
        assert fallback["to"] == "full" and "engine processes still there: 4711" in fallback["why"]
        assert group_removed(cluster) == ["sim-1:spark-ray-head", "sim-2:spark-ray-worker"]
        assert started(cluster)[-3:] == ["sim-2:spark-ray-worker", "sim-1:spark-ray-head", "sim-1:spark-ray-head/vllm"]
        assert {"kill", "full/kill", "full/ready/completion"} <= set(done["phases"])


def test_memory_the_kept_containers_do_not_give_back_makes_it_the_full_restart_and_says_why(tmp_path):
    """A process left in the worker's container holds memory after the engine is killed: the kept
    restart waits (memory.back_timeout_s), then the containers are removed, which gives it back."""
    with watching(tmp_path, "ray", memory={"back_timeout_s": 0.05}) as (wd, cluster, engine, clock, events):
        cfg = wd.cfg
        save_memory_baselines(cfg, {n: MemoryReading(available_gib=114.44, total_gib=121.69) for n in ("sim-1", "sim-2")})

        def meminfo():
            held = "spark-ray-worker" in cluster.containers["sim-2"]
            return 0, f"MemTotal: 127600816 kB\nMemAvailable: {80000000 if held else 119000000} kB\n@@gpu\nno nvidia-smi\n", ""

        cluster.script("/proc/meminfo; echo @@gpu", meminfo)  # the memory step (the node script asks for "@@gpu" too)
        done = restarted_once(wd, engine, clock, events)
        assert done["event"] == "restart-done", done
        [start] = [e for e in events if e["event"] == "restart-start"]
        [fallback] = [e for e in events if e["event"] == "restart-fallback"]
        assert start["restart"] == "kept" and fallback["to"] == "full"
        assert "memory did not come back in 0.05s" in fallback["why"] and "sim-2: 76.3 GiB available, 114.4 GiB" in fallback["why"]
        assert group_removed(cluster) == ["sim-1:spark-ray-head", "sim-2:spark-ray-worker"]
        assert {"memory", "full/memory"} <= set(done["phases"]) and memory_baselines(cfg)["sim-2"].available_gib == 113.49


def test_a_member_that_does_not_answer_is_waited_for_and_the_restart_runs_once_it_does(tmp_path):
    """A cable pulled under load: the bundle does not wait on the silent node, the restart waits for it
    (not a failed attempt: no backoff, nothing counted against the breaker beyond the restart itself)."""
    with watching(tmp_path, "ray") as (wd, cluster, engine, clock, events):
        done = restarted_once(wd, engine, clock, events, before_wedge=lambda: cluster.silent.update({"sim-2": 3}))
        assert done["event"] == "restart-done", done
        [waiting] = [e for e in events if e["event"] == "restart-waiting"]
        assert waiting["nodes"] == ["sim-2"] and waiting["up_to_s"] == 300
        assert [e["nodes"] for e in events if e["event"] == "members-answer"] == [[]]
        assert not [e for e in events if e["event"] in ("restart-failed", "backoff")] and "member-wait" in done["phases"]
        [start] = [e for e in events if e["event"] == "restart-start"]
        assert start["restart"] == "full" and start["why"].startswith("sim-2 did not answer")
        bundle = next((tmp_path / "incidents").iterdir())
        assert (bundle / "sim-2-host.txt").read_text().startswith("not asked: the node did not answer the last observation")
        assert "containers" in (bundle / "sim-1-host.txt").read_text()


def test_a_member_still_silent_after_the_wait_is_a_failed_restart(tmp_path):
    with watching(tmp_path, "ray", member_wait_s=10) as (wd, cluster, engine, clock, events):
        done = restarted_once(wd, engine, clock, events, before_wedge=lambda: cluster.silent.update({"sim-2": 10**6}))
        assert done["event"] == "restart-failed" and "sim-2" in done["error"]
        assert [e["nodes"] for e in events if e["event"] == "members-silent"] == [["sim-2"]]
        asked = [c for n, c in cluster.log if n == "sim-2" and c == "true"]
        assert len(asked) == 10 / wd.s.period_s  # asked every period until member_wait_s had passed


def test_a_paused_container_gets_the_full_restart(tmp_path):
    with watching(tmp_path, "ray") as (wd, cluster, engine, clock, events):
        worker = cluster.containers["sim-2"]["spark-ray-worker"]
        restarted_once(wd, engine, clock, events, before_wedge=lambda: setattr(worker, "state", "paused"))
        [start] = [e for e in events if e["event"] == "restart-start"]
        assert start["restart"] == "full" and start["why"] == "spark-ray-worker on sim-2 is paused"
        assert group_removed(cluster) == ["sim-1:spark-ray-head", "sim-2:spark-ray-worker"]
