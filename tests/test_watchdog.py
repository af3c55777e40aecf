"""Failover on the simulated cluster: real hangs, real kills, real restarts of the whole group."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from datetime import datetime

import httpx
import pytest
import yaml

from spark_cluster.config import parse_config
from spark_cluster.executor import Executor, list_containers
from spark_cluster.transport import Nodes
from spark_cluster.watchdog import Watchdog, WatchdogFailed

from .conftest import SIM_CONFIGS, assert_nothing_of, generation, kill_vllm_api, sim_docker, worker_container
from .test_status import stream_load

pytestmark = pytest.mark.cluster


def cfg_with(tmp_path, executor="ray", **watchdog):
    data = yaml.safe_load(SIM_CONFIGS[executor].read_text())
    data["watchdog"] = {**data.get("watchdog", {}), **watchdog}
    data["state_dir"] = str(tmp_path / "state")
    return parse_config(yaml.safe_dump(data))


class Running:
    """A watchdog in a background thread, stopped and joined at the end."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.events: list[dict] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.nodes = Nodes(cfg)
        self.wd = Watchdog(cfg, self.nodes, on_event=self.events.append)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.wd.run(stop=self.stop.is_set)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=300)
        self.nodes.close()

    def wait_for(self, pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((e for e in self.events if pred(e)), None)
            if hit is not None:
                return hit
            if self.error is not None:
                raise AssertionError(f"watchdog stopped: {self.error!r}")
            time.sleep(0.5)
        raise AssertionError(f"no {what} within {timeout}s; events: {[e['event'] for e in self.events][-30:]}")

    def kinds(self, kind):
        return [e for e in self.events if e["event"] == kind]

    def restart_succeeded(self):
        done = self.wait_for(lambda e: e["event"] in ("restart-done", "restart-failed"), 400, "restart end")
        assert done["event"] == "restart-done", done


@contextmanager
def streaming(cfg, n: int, **kw):
    """n streaming completions in flight while the block runs; stopped and joined after it."""
    stop = threading.Event()
    threads = stream_load(cfg.endpoint(), n, stop, max_tokens=1800, **kw)
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)


def ids(cfg) -> dict[str, str]:
    with Nodes(cfg) as nodes:
        return {c.name: c.id for n in nodes.by_name for c in list_containers(nodes[n], cfg.name)}


def serving(cfg):
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).up()


def completion_works(cfg) -> bool:
    r = httpx.post(f"{cfg.endpoint()}/v1/completions", json={"model": "tiny-qwen3", "prompt": "Hi", "max_tokens": 2}, timeout=60)
    return r.status_code == 200 and bool(r.json()["choices"])


def ts(e) -> float:
    return datetime.fromisoformat(e["ts"]).timestamp()


def test_frozen_worker_under_load_is_detected_and_the_group_restarted(engine_cfg, tmp_path):
    cfg = cfg_with(tmp_path, engine_cfg.executor)  # default watchdog settings
    worker = worker_container(cfg)
    serving(cfg)
    before = generation(cfg)
    with streaming(cfg, 4):
        with Running(cfg) as w:
            w.wait_for(lambda e: e["event"] == "state" and e["state"] == "healthy", 60, "healthy state")
            deadline = time.monotonic() + 60
            while not (w.wd.samples and w.wd.samples[-1]["running"] >= 4):
                assert time.monotonic() < deadline, "the streaming load never showed in the metrics"
                time.sleep(0.5)
            frozen_at = time.time()
            sim_docker("sim-2", "pause", worker)
            decision = w.wait_for(lambda e: e["event"] == "decision" and e["action"] == "restart", 120, "restart decision")
            detect_s = ts(decision) - frozen_at
            print(f"{cfg.executor}: hang confirmed {detect_s:.1f}s after the freeze: {decision['reason']}")
            assert "hang confirmed" in decision["reason"]
            assert w.kinds("canary") and not w.kinds("canary")[-1]["ok"]
            # on Ray, before Ray's own heartbeat timeout (~65-80 s) ends the engine
            assert detect_s < 45
            incident = w.wait_for(lambda e: e["event"] == "incident", 60, "incident bundle")
            w.restart_succeeded()
    assert completion_works(cfg)
    assert_nothing_of(before, generation(cfg), cfg)
    from pathlib import Path

    bundle = Path(incident["bundle"])
    assert (bundle / "decision-trail.jsonl").read_text() and (bundle / "metrics.txt").read_text().count("vllm:") > 5
    assert sorted(p.name for p in (bundle / "logs").iterdir()) == sorted(f"{n}--{c}.log" for n, c in before_names(cfg))
    if cfg.executor == "ray":
        assert "SPARK_CLUSTER_RAY_NODES" in (bundle / "ray-status.txt").read_text()
    events = (tmp_path / "state" / "events.jsonl").read_text()
    assert '"event": "restart-done"' in events
    # stop order of the gang restart: vLLM (API, or the Ray head holding it) first, then the worker;
    # start order: worker first
    ex = [e for e in w.events if e["event"] == "executor"]
    removed = [e["container"] for e in ex if e.get("step_event") == "container-remove"]
    started = [e["step"] for e in ex if e.get("step_event") == "step-ok" and e["phase"] in ("start-workers", "start-head", "serve")]
    if cfg.executor == "ray":
        assert removed == ["spark-ray-head", "spark-ray-worker"]
        assert started == ["start-workers/sim-2/ray-worker", "start-head/sim-1/ray-head", "serve/sim-1/vllm"]
    else:
        assert removed == ["spark-vllm", "spark-vllm-worker"]
        assert started == ["start-workers/sim-2/vllm-worker", "serve/sim-1/vllm"]


def before_names(cfg) -> list[tuple[str, str]]:
    from spark_cluster.plan import build_plan

    return [(c.node, c.name) for c in build_plan(cfg).containers()]


def test_killed_worker_container_leads_to_a_restart(engine_cfg, tmp_path):
    cfg = cfg_with(tmp_path, engine_cfg.executor)
    serving(cfg)
    before = generation(cfg)
    with Running(cfg) as w:
        w.wait_for(lambda e: e["event"] == "state" and e["state"] == "healthy", 60, "healthy state")
        sim_docker("sim-2", "kill", worker_container(cfg))
        decision = w.wait_for(lambda e: e["event"] == "decision" and e["action"] == "restart", 60, "restart decision")
        assert "member gone" in decision["reason"] and "sim-2" in decision["reason"]
        w.restart_succeeded()
    assert completion_works(cfg)
    assert_nothing_of(before, generation(cfg), cfg)


def test_killed_vllm_process_leads_to_a_restart(engine_cfg, tmp_path):
    cfg = cfg_with(tmp_path, engine_cfg.executor)
    serving(cfg)
    before = generation(cfg)
    with Running(cfg) as w:
        w.wait_for(lambda e: e["event"] == "state" and e["state"] == "healthy", 60, "healthy state")
        kill_vllm_api(cfg)
        decision = w.wait_for(lambda e: e["event"] == "decision" and e["action"] == "restart", 60, "restart decision")
        gone = "vllm in spark-ray-head on sim-1 has exited" if cfg.executor == "ray" else "spark-vllm on sim-1"
        assert "member gone" in decision["reason"] and gone in decision["reason"], decision["reason"]
        w.restart_succeeded()
    assert completion_works(cfg)
    assert_nothing_of(before, generation(cfg), cfg)


def test_engine_ended_by_rays_heartbeat_is_a_member_gone(sim, tmp_path):
    """The Ray path's own ending of a frozen worker: with a stall window too long to confirm the
    hang, Ray marks the frozen node dead after its heartbeat timeout, the engine dies and the API
    exits; the watchdog restarts on that (a member gone), with the worker still frozen."""
    cfg = cfg_with(tmp_path, "ray", stall_window_s=600)
    serving(cfg)
    before = generation(cfg)
    with streaming(cfg, 2, repeat=True):
        with Running(cfg) as w:
            w.wait_for(lambda e: e["event"] == "state" and e["state"] == "healthy", 60, "healthy state")
            frozen_at = time.time()
            sim_docker("sim-2", "pause", worker_container(cfg))
            decision = w.wait_for(lambda e: e["event"] == "decision" and e["action"] == "restart", 240, "restart decision")
            print(f"engine ended by Ray, restart decided {ts(decision) - frozen_at:.1f}s after the freeze: {decision['reason']}")
            assert "member gone" in decision["reason"]
            assert "vllm in spark-ray-head on sim-1 has exited" in decision["reason"] or "Ray lists node sim-2" in decision["reason"]
            assert not w.kinds("canary")  # no hang verdict: the stall window never ran out
            w.restart_succeeded()
    assert completion_works(cfg)
    assert_nothing_of(before, generation(cfg), cfg)


def test_slow_but_progressing_engine_is_not_restarted(engine_cfg, tmp_path):
    """Much heavier load than the 2 cores can serve quickly: slow, queued, but moving, for three
    stall windows and more (longer soaks: bench/failover_bench.py)."""
    cfg = cfg_with(tmp_path, engine_cfg.executor)
    serving(cfg)
    with streaming(cfg, 24, repeat=True):
        with Running(cfg) as w:
            time.sleep(3 * cfg.watchdog.stall_window_s + cfg.watchdog.canary_timeout_s)
            assert not [e for e in w.events if e["event"] == "decision" and e["action"] == "restart"], w.events[-10:]
            loaded = [x for x in w.wd.samples if x["running"] + x["waiting"] > 0]
            assert len(loaded) >= 0.8 * len(w.wd.samples) and max(x["running"] for x in loaded) >= 16  # it really was loaded


def test_circuit_breaker_trips_on_the_cluster(sim, tmp_path):
    cfg = cfg_with(tmp_path, max_restarts_per_hour=1)
    serving(cfg)
    with Running(cfg) as w:
        w.wait_for(lambda e: e["event"] == "state" and e["state"] == "healthy", 60, "healthy state")
        sim_docker("sim-2", "kill", worker_container(cfg))
        w.wait_for(lambda e: e["event"] == "restart-done", 400, "first restart")
        w.wait_for(lambda e: e["event"] == "state" and e["state"] == "healthy" and ts(e) > ts(w.kinds("restart-done")[0]), 200, "healthy again")
        sim_docker("sim-2", "kill", worker_container(cfg))
        alert = w.wait_for(lambda e: e["event"] == "alert", 60, "breaker alert")
        assert "circuit breaker" in alert["reason"]
        w.thread.join(timeout=30)
        assert isinstance(w.error, WatchdogFailed)
    assert len(w.kinds("restart-start")) == 1
    # a restarted watchdog remembers it failed, and does nothing
    with Nodes(cfg) as nodes:
        with pytest.raises(WatchdogFailed):
            Watchdog(cfg, nodes).run(max_seconds=5)
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).down()
