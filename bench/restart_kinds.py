"""The kept restart against the full one, side by side (`bench/failover_bench.py --restarts`), on two
simulated nodes (`spark-cluster sim up`).

For each run: the controller as a user runs it (its own process), a mixed load through its gateway
(streams and short non-streamed requests), steady state for a while, then the worker's rank process
stopped (SIGSTOP: a wedge with every container running and Ray showing every node, the case the
kept restart is for), until the restart is done and a completion passes the gateway again. Runs:
Ray with `watchdog.restart: auto` (the kept restart), Ray with `full`, and the native executor (its
containers are its ranks: always the full restart).

Figures per run: freeze -> hang confirmed, decision -> serving again, the restart's parts (the
engine's own start read from its log among them), non-streamed requests failed, streams ended with
the error event or failed; then the kept restart's decision -> serving as a share of the full one's.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from bench.groups_failover import down_all, events, start_controller, ts, up_all, wait_event
from spark_cluster.config import parse_config
from spark_cluster.ranks import parse_processes, processes_command
from spark_cluster.sim import cluster
from spark_cluster.transport import Nodes
from tests.fake_engine import free_ports
from tests.loadgen import mixed_load

ROOT = Path(__file__).resolve().parent.parent
RUNS = (("ray", "auto"), ("ray", "full"), ("native", "full"))
CONFIGS = {"ray": "local-sim.yaml", "native": "local-sim-native.yaml"}


def run_cfg(executor: str, restart: str, tmp: Path):
    data = yaml.safe_load((ROOT / "configs" / CONFIGS[executor]).read_text())
    gateway, control = free_ports(2)
    data.update(state_dir=str(tmp / "state"), gateway={"host": "127.0.0.1", "port": gateway, "hold_s": 600},
                controller={"port": control}, api={"token_env": "SPARK_CLUSTER_BENCH_TOKEN"})
    data["watchdog"] = {**data.get("watchdog", {}), "restart": restart}
    path = tmp / f"{executor}-{restart}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, parse_config(path.read_text())


def stop_rank(cfg) -> None:
    """SIGSTOP the tensor-parallel rank in the worker's container (as its node sees its PID)."""
    worker = f"{cfg.name}-ray-worker" if cfg.executor == "ray" else f"{cfg.name}-vllm-worker"
    with Nodes(cfg) as nodes:
        reading = parse_processes(nodes["sim-2"].run(processes_command([worker]), timeout=30).stdout)
    [pid] = [p.pid for p in reading.procs(worker) if p.name.startswith(("ray::RayWorker", "VLLM::Worker"))]
    cluster.node_exec("sim-2", "kill", "-STOP", str(pid), check=True, timeout=30)


def serves(cfg) -> bool:
    try:
        r = httpx.post(f"{cfg.gateway_url()}/v1/completions", json={"model": cfg.model.name, "prompt": "Hi", "max_tokens": 1}, timeout=30)
        return r.status_code == 200
    except httpx.HTTPError:
        return False


def measure(executor: str, restart: str, steady_s: float, streams: int, plain: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="restart-kinds-"))
    path, cfg = run_cfg(executor, restart, tmp)
    up_all(cfg)
    proc = start_controller(path, tmp / "controller.log")
    try:
        wait_event(cfg, lambda e: e["event"] == "state" and e["state"] == "healthy", 180)
        stop = threading.Event()
        threads, results = mixed_load(cfg.gateway_url(), cfg.model.name, stop, streams=streams, plain=plain, stream_tokens=300, plain_tokens=8)
        time.sleep(steady_s)
        t_freeze = time.time()
        stop_rank(cfg)
        decision = wait_event(cfg, lambda e: e["event"] == "decision" and e["action"] == "restart" and ts(e) > t_freeze, 300)
        done = wait_event(cfg, lambda e: e["event"] in ("restart-done", "restart-failed") and ts(e) > ts(decision), 1200)
        while not serves(cfg):
            time.sleep(0.2)
        t_serving = time.time()
        stop.set()
        for t in threads:
            t.join(timeout=60)
        start = next(e for e in events(cfg) if e["event"] == "restart-start" and ts(e) >= ts(decision))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        down_all(cfg)
    plain_rs = [r for r in results if r.kind == "plain"]
    stream_rs = [r for r in results if r.kind == "stream"]
    return {"kind": start.get("restart", "?"), "why": start.get("why", ""), "ok": done["event"] == "restart-done",
            "detect_s": ts(decision) - t_freeze, "decision_to_serving_s": t_serving - ts(decision),
            "phases": done.get("phases", {}),
            "plain failed": sum(r.outcome == "failed" for r in plain_rs), "plain": len(plain_rs),
            "streams interrupted": sum(r.outcome == "interrupted" for r in stream_rs),
            "streams failed": sum(r.outcome in ("failed", "cut") for r in stream_rs), "streams": len(stream_rs)}


def compare(steady_s: float = 20, streams: int = 2, plain: int = 3) -> None:
    res: dict[str, dict] = {}
    for executor, restart in RUNS:
        name = f"{executor} {restart}"
        res[name] = measure(executor, restart, steady_s, streams, plain)
        print(f"{name}: the {res[name]['kind']} restart ({res[name]['why']}), serving again "
              f"{res[name]['decision_to_serving_s']:.1f}s after the decision", flush=True)
    cols = list(res)
    print(f"\na rank stopped under load ({streams} streams, {plain} non-streamed clients) through the gateway, simulated nodes")
    print(f"{'':46}" + "".join(f"{c:>14}" for c in cols))
    rows = [("restart", lambda r: f"{r['kind']:>14}"), ("freeze -> hang confirmed (s)", lambda r: f"{r['detect_s']:14.1f}"),
            ("decision -> serving through the gateway (s)", lambda r: f"{r['decision_to_serving_s']:14.1f}"),
            ("non-streamed requests failed", lambda r: f"{r['plain failed']:14d}"), ("  of non-streamed requests", lambda r: f"{r['plain']:14d}"),
            ("streams ended with the error event", lambda r: f"{r['streams interrupted']:14d}"),
            ("streams failed or cut", lambda r: f"{r['streams failed']:14d}")]
    for label, cell in rows:
        print(f"{label:46}" + "".join(cell(res[c]) for c in cols))
    kept, full = res.get("ray auto"), res.get("ray full")
    if kept and full and kept["kind"] == "kept":
        print(f"{'kept / full, decision -> serving (Ray)':46}{kept['decision_to_serving_s'] / full['decision_to_serving_s']:14.2f}")
    names = list(dict.fromkeys(k for c in cols for k in res[c]["phases"]))
    print(f"\nwhere the restart's time goes (s)\n{'part':46}" + "".join(f"{c:>14}" for c in cols))
    for n in names:
        print(f"{n:46}" + "".join(f"{res[c]['phases'][n]:14.2f}" if n in res[c]["phases"] else f"{'-':>14}" for c in cols))
