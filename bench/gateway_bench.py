#!/usr/bin/env python3
"""Benchmark: the controller's gateway on the local simulated cluster (Ray executor).

1. Overhead: streamed completions sent alternately straight to vLLM and through the gateway, in
   the same run, idle and under a background streaming load: time to first token (p50, p90) and
   generation tokens/s, with the ratios gateway / direct.
2. Footprint of the controller process (`spark-cluster controller`, its own process): resident
   memory and CPU share while idle (the watchdog observing every period), and its CPU time per
   request under the load of the failover run.
3. Failover: a steady mix of streamed and non-streamed clients of the gateway while the worker is
   frozen (`docker pause`) and the group restarts: requests by outcome as the clients saw them.

Usage (root, simulated cluster up: `spark-cluster sim up`):
    python bench/gateway_bench.py [--requests 30] [--load 3] [--idle-seconds 30] [--no-failover]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
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
from spark_cluster.loadgen import mixed_load, one_request, stream_load  # noqa: E402
from spark_cluster.sim import cluster  # noqa: E402
from spark_cluster.transport import Nodes  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(direct: str, gateway: str, model: str, n: int) -> dict[str, dict[str, list[float]]]:
    """n streamed completions to each, alternating (the order swapped every pair)."""
    out = {"direct": {"ttft": [], "tps": []}, "gateway": {"ttft": [], "tps": []}}
    for i in range(n):
        pair = [("direct", direct), ("gateway", gateway)]
        for name, url in (pair if i % 2 == 0 else pair[::-1]):
            r = one_request(url, model, "stream", 48)
            if not r.complete or r.first_byte is None:
                raise SystemExit(f"{name}: request failed: {r.error}")
            out[name]["ttft"].append(r.first_byte - r.start)
            if r.end > r.first_byte and r.tokens > 1:
                out[name]["tps"].append((r.tokens - 1) / (r.end - r.first_byte))
    return out


def overhead_rows(label: str, m: dict) -> list[str]:
    d, g = m["direct"], m["gateway"]
    rows = []
    for q in (0.5, 0.9):
        a, b = pct(d["ttft"], q) * 1000, pct(g["ttft"], q) * 1000
        rows.append(f"| {label}: time to first token p{int(q * 100)} | {a:.1f} ms | {b:.1f} ms | {b / a:.3f} |")
    a, b = statistics.median(d["tps"]), statistics.median(g["tps"])
    rows.append(f"| {label}: generation tokens/s per stream (median) | {a:.1f} | {b:.1f} | {b / a:.3f} |")
    return rows


def wait_event(url: str, pred, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for e in httpx.get(f"{url}/api/events?n=500", timeout=10).json():
            if pred(e):
                return e
        time.sleep(1)
    raise SystemExit("timed out waiting for the controller's event")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=30, help="streamed completions per side and condition")
    ap.add_argument("--load", type=int, default=3, help="background streams for the loaded condition")
    ap.add_argument("--idle-seconds", type=float, default=30)
    ap.add_argument("--no-failover", action="store_true")
    args = ap.parse_args()
    if not any(n["running"] for n in cluster.status()["nodes"]):
        raise SystemExit("the simulated cluster is not up: spark-cluster sim up")

    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    data = yaml.safe_load((ROOT / "configs/local-sim.yaml").read_text())
    data["state_dir"] = str(tmp / "state")
    data["gateway"] = {"host": "127.0.0.1", "port": 8089}
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = parse_config(path.read_text())
    model, direct, gateway = cfg.model.name, cfg.endpoint(), f"http://127.0.0.1:{cfg.gateway.port}"
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).up()
    log = open(tmp / "controller.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "spark_cluster", "controller", str(path)], stdout=log, stderr=subprocess.STDOUT)
    rows: list[str] = []
    try:
        end = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{gateway}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise SystemExit("the controller did not open its door: " + (tmp / "controller.log").read_text()[-2000:])
            time.sleep(0.5)

        # footprint while idle
        time.sleep(5)
        c0, t0 = proc_cpu_s(proc.pid), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_cpu = (proc_cpu_s(proc.pid) - c0) / (time.monotonic() - t0) * 100
        idle_rss = proc_rss_mb(proc.pid)

        one_request(direct, model, "stream", 8)  # warm both paths
        one_request(gateway, model, "stream", 8)
        idle = measure(direct, gateway, model, args.requests)
        stop = threading.Event()
        threads = stream_load(direct, model, args.load, stop, max_tokens=400, repeat=True)
        time.sleep(3)
        loaded = measure(direct, gateway, model, args.requests)
        stop.set()
        for t in threads:
            t.join(timeout=120)

        rows += ["| | direct to vLLM | through the gateway | gateway / direct |", "| --- | --- | --- | --- |"]
        rows += overhead_rows("idle", idle) + overhead_rows(f"{args.load} streams of load", loaded)
        rows += ["", "| controller process | |", "| --- | --- |",
                 f"| resident memory, idle | {idle_rss:.0f} MB |", f"| CPU, idle (watchdog observing every {cfg.watchdog.period_s:g} s) | {idle_cpu:.2f} % of a core |"]

        if not args.no_failover:
            stop = threading.Event()
            c0 = proc_cpu_s(proc.pid)
            threads, results = mixed_load(gateway, model, stop, streams=3, plain=2, stream_tokens=1500, plain_tokens=24)
            time.sleep(15)
            frozen = time.time()
            cluster.node_exec("sim-2", "docker", "pause", f"{cfg.name}-ray-worker", check=True, timeout=60)
            decision = wait_event(gateway, lambda e: e["event"] == "decision" and e["action"] == "restart", 180)
            done = wait_event(gateway, lambda e: e["event"] in ("restart-done", "restart-failed"), 600)
            time.sleep(20)  # clients keep going after the restart
            stop.set()
            for t in threads:
                t.join(timeout=120)
            cpu = proc_cpu_s(proc.pid) - c0
            rss = proc_rss_mb(proc.pid)
            counts = {o: sum(1 for r in results if r.outcome == o) for o in ("ok", "interrupted", "cut", "failed")}
            plain_failed = sum(1 for r in results if r.kind == "plain" and not r.complete)
            t_conf = datetime.fromisoformat(decision["ts"]).timestamp()
            lags = [r.error_event - t_conf for r in results if r.outcome == "interrupted"]
            rows += [f"| CPU time per request, failover run ({len(results)} requests) | {cpu / max(1, len(results)) * 1000:.1f} ms |",
                     f"| resident memory after the failover run | {rss:.0f} MB |",
                     "", f"Failover through the gateway ({done['event']}; hang confirmed {t_conf - frozen:.1f} s after the freeze):", "",
                     "| client outcome | requests |", "| --- | --- |"]
            rows += [f"| {k} | {v} |" for k, v in counts.items()]
            rows += [f"| non-streamed requests failed | {plain_failed} |",
                     f"| interrupted streams: error event after the hang was confirmed (max) | {max(lags):.2f} s |" if lags else
                     "| interrupted streams | none |"]
            by_gateway = {}
            text = httpx.get(f"{gateway}/metrics", timeout=10).text
            for line in text.splitlines():
                if line.startswith("spark_cluster_gateway_requests_total{"):
                    by_gateway[line.split('"')[1]] = float(line.split()[-1])
            rows += ["", "The gateway's own count (spark_cluster_gateway_requests_total): " +
                     ", ".join(f"{k} {v:g}" for k, v in by_gateway.items())]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
