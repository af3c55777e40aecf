#!/usr/bin/env python3
"""Benchmark: wall time of `spark-cluster status` against 2, 4, 8 and 16 simulated nodes.

Nodes carry no engine (the API does not answer: one refused connection), so this measures
the fan-out over SSH and the probes. Also measures a healthy 2-node cluster with the engine when
one is serving (--with-engine). Prints medians and the ratio 16/2.

Usage (root): python -m bench.status_bench [--sizes 2,4,8,16] [--repeat 5]
Tears down the simulated cluster it made at the end.
       python -m bench.status_bench --engine
measures instead a serving cluster of configs/local-sim.yaml (up first): the library call and the
whole `spark-cluster status` command (new process, new SSH connections, 0.5 s sampling window).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import yaml


from spark_cluster.config import parse_config
from spark_cluster.sim import cluster
from spark_cluster.status import status
from spark_cluster.transport import Nodes

ROOT = Path(__file__).resolve().parent.parent


def config_for(n: int, ghost: bool = False, connect_timeout_s: float = 2):
    data = yaml.safe_load((ROOT / "configs" / "local-sim.yaml").read_text())
    data["nodes"] = [
        {"name": cluster.node_name(i), "host": cluster.node_ip(i), "address": cluster.node_ip(i), "role": "head" if i == 1 else "worker"}
        for i in range(1, n + 1)
    ]
    if ghost:  # an address of the simulated subnet where nothing answers
        data["nodes"].append({"name": "ghost", "host": "10.99.0.99", "address": "10.99.0.99", "role": "worker"})
        n += 1
    data["ssh"]["connect_timeout_s"] = connect_timeout_s
    data["vllm"]["tensor_parallel_size"] = n
    data["state_dir"] = "/tmp/spark-cluster-status-bench"
    return parse_config(yaml.safe_dump(data))


def measure(cfg, repeat: int) -> list[float]:
    times = []
    with Nodes(cfg) as nodes:
        for i in range(repeat + 1):
            t0 = time.monotonic()
            status(cfg, nodes)
            if i:  # the first run opens the SSH connections; `status --watch` reuses them
                times.append(time.monotonic() - t0)
    return times


def engine(repeat: int) -> None:
    import subprocess

    from spark_cluster.config import load_config

    path = ROOT / "configs" / "local-sim.yaml"
    cfg = load_config(path)
    lib = measure(cfg, repeat)
    cli, verdicts = [], []
    for _ in range(repeat):
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "spark_cluster", "status", "--json", str(path)], capture_output=True, text=True)
        cli.append(time.monotonic() - t0)
        import json

        verdicts.append(json.loads(res.stdout)["verdict"] if res.stdout.strip() else f"exit {res.returncode}")
    print("status of a serving 2-node simulated cluster (engine up), median of %d:" % repeat)
    print(f"  library call (connections reused): {statistics.median(lib):6.3f} s")
    print(f"  `spark-cluster status` command:    {statistics.median(cli):6.3f} s  (verdicts: {', '.join(sorted(set(verdicts)))})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2,4,8,16")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--engine", action="store_true", help="measure a serving configs/local-sim.yaml cluster instead")
    args = ap.parse_args()
    if args.engine:
        engine(args.repeat)
        return
    sizes = [int(x) for x in args.sizes.split(",")]
    results = {}
    first = {}
    dead = {}
    try:
        for n in sizes:
            cluster.up(n, log=lambda *_: None)
            cfg = config_for(n)
            t0 = time.monotonic()
            with Nodes(cfg) as nodes:
                status(cfg, nodes)
            first[n] = time.monotonic() - t0
            results[n] = measure(cfg, args.repeat)
            if n == sizes[0]:
                ghost = []
                for _ in range(3):  # fresh connections each time: the dead node is tried again
                    t0 = time.monotonic()
                    with Nodes(config_for(n, ghost=True)) as nodes:
                        status(config_for(n, ghost=True), nodes)
                    ghost.append(time.monotonic() - t0)
                dead[n] = (statistics.median(ghost), first[n])
    finally:
        cluster.down(log=lambda *_: None)
    print("status wall time, simulated nodes without engine (median of %d, connections reused; first = cold connect)" % args.repeat)
    for n in sizes:
        print(f"  {n:3d} nodes: {statistics.median(results[n]):6.3f} s   first: {first[n]:6.3f} s")
    for n, (with_ghost, cold) in dead.items():
        print(f"  {n} nodes + 1 that does not answer (SSH connect timeout 2 s): {with_ghost:6.3f} s, "
              f"{with_ghost - cold:+.3f} s over the cold {n}-node run")
    if 2 in results and 16 in results:
        print(f"  ratio 16/2: {statistics.median(results[16]) / statistics.median(results[2]):.2f}")


if __name__ == "__main__":
    main()
