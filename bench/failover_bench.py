#!/usr/bin/env python3
"""Benchmark: failover on the local simulated cluster, on both executors.

1. Under continuous streaming load, freeze the worker (`docker pause` of the worker node's
   container: its vLLM rank, or its Ray node holding the rank) and measure MTTD (freeze -> hang
   confirmed), MTTR (freeze -> a new completion succeeds again) and the restart-overhead part of
   MTTR (the ordered gang restart itself, mostly model load).
2. A loaded soak with no fault (default 20 minutes), counting false restarts.

Default watchdog settings. Prints the figures of each executor side by side.
Usage (root, simulated cluster up with the image: `spark-cluster sim up`):
    python bench/failover_bench.py [--executors ray,native] [--faults 1] [--soak-minutes 20] [--streams 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spark_cluster.config import parse_config  # noqa: E402
from spark_cluster.executor import Executor  # noqa: E402
from spark_cluster.loadgen import stream_load  # noqa: E402
from spark_cluster.sim import cluster  # noqa: E402
from spark_cluster.transport import Nodes  # noqa: E402
from spark_cluster.watchdog import Watchdog  # noqa: E402


def ts(e) -> float:
    return datetime.fromisoformat(e["ts"]).timestamp()


def wait(events, pred, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for e in list(events):
            if pred(e):
                return e
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting; last events: {[e['event'] for e in events][-15:]}")


def completion_ok(url: str, model: str) -> bool:
    try:
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1}, timeout=5)
        return r.status_code == 200
    except httpx.HTTPError:
        return False


CONFIGS = {"ray": ROOT / "configs" / "local-sim.yaml", "native": ROOT / "configs" / "local-sim-native.yaml"}


def measure(executor: str, args) -> dict:
    data = yaml.safe_load(CONFIGS[executor].read_text())
    data["state_dir"] = tempfile.mkdtemp(prefix=f"spark-cluster-failover-bench-{executor}-")
    cfg = parse_config(yaml.safe_dump(data))
    worker = f"{cfg.name}-ray-worker" if executor == "ray" else f"{cfg.name}-vllm-worker"
    url, model = cfg.endpoint(), cfg.model.name
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).up()
    mttd, mttr, overhead = [], [], []
    events: list[dict] = []
    stop_load, stop_wd = threading.Event(), threading.Event()
    stream_load(url, model, args.streams, stop_load, max_tokens=1500, repeat=True, read_timeout_s=120)
    nodes = Nodes(cfg)
    wd = Watchdog(cfg, nodes, on_event=events.append)
    runner = threading.Thread(target=lambda: wd.run(stop=stop_wd.is_set), daemon=True)
    runner.start()
    try:
        for i in range(args.faults):
            wait(events, lambda e: e["event"] == "state" and e["state"] == "healthy" and (not mttr or ts(e) > t_back), 600)
            time.sleep(10)
            t_freeze = time.time()
            cluster.node_exec("sim-2", "docker", "pause", worker)
            d = wait(events, lambda e: e["event"] == "decision" and e["action"] == "restart" and ts(e) > t_freeze, 300)
            s = wait(events, lambda e: e["event"] == "restart-start" and ts(e) >= ts(d), 300)
            r = wait(events, lambda e: e["event"] in ("restart-done", "restart-failed") and ts(e) > ts(s), 900)
            while not completion_ok(url, model):
                time.sleep(0.2)
            t_back = time.time()
            mttd.append(ts(d) - t_freeze)
            mttr.append(t_back - t_freeze)
            overhead.append(ts(r) - ts(s))
            print(f"{executor} fault {i + 1}: detected {mttd[-1]:.1f}s, serving again {mttr[-1]:.1f}s, "
                  f"restart itself {overhead[-1]:.1f}s ({r['event']})", flush=True)
        restarts_before = len([e for e in events if e["event"] == "restart-start"])
        t_soak = time.monotonic()
        print(f"{executor} soak: {args.soak_minutes:g} min under {args.streams} streams, no fault ...", flush=True)
        while time.monotonic() - t_soak < args.soak_minutes * 60:
            time.sleep(5)
        false_restarts = len([e for e in events if e["event"] == "restart-start"]) - restarts_before
        canaries = len([e for e in events if e["event"] == "canary" and ts(e) > time.time() - args.soak_minutes * 60])
    finally:
        stop_load.set()
        stop_wd.set()
        runner.join(timeout=120)
        nodes.close()
        with Nodes(cfg) as n:
            Executor(cfg, n).down()
    return {"MTTD freeze -> hang confirmed (s)": statistics.median(mttd),
            "MTTR freeze -> completion OK (s)": statistics.median(mttr),
            "  of which the gang restart (s)": statistics.median(overhead),
            f"false restarts, {args.soak_minutes:g} min soak": false_restarts,
            "  canaries sent in the soak": canaries}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--executors", default="ray,native", help="Comma-separated: ray (configs/local-sim.yaml), native (local-sim-native.yaml).")
    ap.add_argument("--faults", type=int, default=1)
    ap.add_argument("--soak-minutes", type=float, default=20)
    ap.add_argument("--streams", type=int, default=4)
    args = ap.parse_args()
    executors = args.executors.split(",")
    results = {x: measure(x, args) for x in executors}
    print(f"medians over {args.faults} fault(s) each, default watchdog settings, {args.streams} streams")
    print(f"{'':36}" + "".join(f"{x:>10}" for x in executors))
    for k in results[executors[0]]:
        print(f"{k:36}" + "".join(f"{results[x][k]:10.1f}" for x in executors))


if __name__ == "__main__":
    main()
