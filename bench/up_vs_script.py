#!/usr/bin/env python3
"""Benchmark: wall time of `spark-cluster up` vs. a bare sequential shell script doing the same,
on both executors.

The script is what people paste today: the card's commands run one after another over ssh
(sysctl, worker container, head container, vllm serve, then polling /health and one completion
with curl), with the same waits. Both run on the local simulated cluster, in the same run, from a
clean state each time. Prints, per executor side by side: both wall times, the ratio, the
per-phase times of `up` and the memory the cluster's containers use on every node once serving.

Usage (root, simulated cluster up: `spark-cluster sim up`):
    python -m bench.up_vs_script [--configs configs/local-sim.yaml,configs/local-sim-native.yaml] [--rounds 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path


from spark_cluster.config import load_config
from spark_cluster.executor import Executor
from spark_cluster.plan import build_plan
from spark_cluster.render import quote
from spark_cluster.transport import Nodes, resolve_endpoint

ROOT = Path(__file__).resolve().parent.parent


def bare_script(cfg) -> str:
    """The same steps as a person's sequential script: ssh, one command after another."""
    plan = build_plan(cfg, reveal_secrets=True)
    lines = ["set -e"]
    for step in plan.steps:
        if step.kind in ("run", "start", "exec"):
            node = next(n for n in cfg.nodes if n.name == step.node)
            ep = resolve_endpoint(node, cfg.node_ssh(node))
            ssh = (f"ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={quote(ep.known_hosts)} "
                   f"-i {quote(ep.key_files[0])} -p {ep.port} {quote(ep.user + '@' + ep.hostname)}")
            lines.append(f"{ssh} {quote(step.command)} >/dev/null")
        elif step.kind == "wait-ray":
            node = next(n for n in cfg.nodes if n.name == step.node)
            ep = resolve_endpoint(node, cfg.node_ssh(node))
            ssh = f"ssh -o BatchMode=yes -o UserKnownHostsFile={quote(ep.known_hosts)} -i {quote(ep.key_files[0])} {quote(ep.user + '@' + ep.hostname)}"
            n = len(cfg.nodes)
            lines.append(f"until {ssh} {quote(step.command)} | grep -o '\"alive\": true' | wc -l | grep -qx {n}; do sleep 2; done")
    url = cfg.endpoint()
    lines.append(f"until curl -fsS -m 5 {url}/health >/dev/null 2>&1; do sleep 2; done")
    body = '{"model": "%s", "prompt": "Hello", "max_tokens": 1}' % cfg.model.name
    lines.append(f"until curl -fsS -m 60 -H 'content-type: application/json' -d {quote(body)} {url}/v1/completions >/dev/null 2>&1; do sleep 2; done")
    return "\n".join(lines) + "\n"


def memory_gib(cfg, nodes) -> dict[str, float]:
    """Memory the cluster's containers use on each node (docker stats), in GiB."""
    units = {"B": 1 / 2**30, "KiB": 1 / 2**20, "MiB": 1 / 2**10, "GiB": 1.0}
    out = {}
    for n in cfg.nodes:
        r = nodes[n.name].run(f"docker stats --no-stream --format '{{{{.MemUsage}}}}' $(docker ps -q --filter label=spark-cluster.cluster={cfg.name})",
                              timeout=60)
        total = 0.0
        for line in r.stdout.splitlines():
            used = line.split("/")[0].strip()
            num = used.rstrip("KMGiB")
            total += float(num) * units[used[len(num):]]
        out[n.name] = total
    return out


def measure(config: str, rounds: int) -> dict:
    cfg = load_config(config)
    ups, scripts, phases, mems = [], [], [], []
    for _ in range(rounds):
        with Nodes(cfg) as nodes:
            Executor(cfg, nodes).down()
            t0 = time.monotonic()
            res = Executor(cfg, nodes).up()
            ups.append(time.monotonic() - t0)
            phases.append(res.phases)
            mems.append(memory_gib(cfg, nodes))
            Executor(cfg, nodes).down()
        script = bare_script(cfg)
        t0 = time.monotonic()
        subprocess.run(["bash", "-c", script], check=True, timeout=3600)
        scripts.append(time.monotonic() - t0)
        with Nodes(cfg) as nodes:
            Executor(cfg, nodes).down()
    rows = {"spark-cluster up (s)": statistics.median(ups), "bare sequential ssh (s)": statistics.median(scripts)}
    rows["ratio up / script"] = rows["spark-cluster up (s)"] / rows["bare sequential ssh (s)"]
    for k in phases[0]:
        rows[f"  up phase {k} (s)"] = statistics.median(p[k] for p in phases if k in p)
    for node in mems[0]:
        rows[f"memory on {node}, serving (GiB)"] = statistics.median(m[node] for m in mems)
    return {"executor": cfg.executor, "nodes": len(cfg.nodes), "rows": rows, "runs": (ups, scripts)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=f"{ROOT / 'configs' / 'local-sim.yaml'},{ROOT / 'configs' / 'local-sim-native.yaml'}",
                    help="Comma-separated cluster files, measured one after the other (default: both executors).")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    results = [measure(c, args.rounds) for c in args.configs.split(",")]
    keys = list(dict.fromkeys(k for r in results for k in r["rows"]))
    print(f"rounds: {args.rounds}; medians")
    print(f"{'':34}" + "".join(f"{r['executor']:>12}" for r in results))
    for k in keys:
        print(f"{k:34}" + "".join(f"{r['rows'][k]:12.2f}" if k in r["rows"] else f"{'-':>12}" for r in results))


if __name__ == "__main__":
    main()
