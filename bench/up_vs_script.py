#!/usr/bin/env python3
"""Benchmark: wall time of `spark-cluster up` vs. a bare sequential shell script doing the same.

The script is what people paste today: the card's commands run one after another over ssh
(sysctl, worker container, head container, then polling /health and one completion with curl),
with the same waits. Both run on the local simulated cluster, in the same run, from a clean
state each time. Prints both wall times, the ratio, and the per-phase times of `up`.

Usage (root, simulated cluster up: `spark-cluster sim up`):
    python bench/up_vs_script.py [--config configs/local-sim.yaml] [--rounds 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spark_cluster.config import load_config  # noqa: E402
from spark_cluster.executor import Executor  # noqa: E402
from spark_cluster.plan import build_plan  # noqa: E402
from spark_cluster.render import quote  # noqa: E402
from spark_cluster.transport import Nodes, resolve_endpoint  # noqa: E402


def bare_script(cfg) -> str:
    """The same steps as a person's sequential script: ssh, one command after another."""
    plan = build_plan(cfg, reveal_secrets=True)
    lines = ["set -e"]
    for step in plan.steps:
        if step.kind in ("run", "start"):
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "local-sim.yaml"))
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    cfg = load_config(args.config)
    ups, scripts, phases = [], [], []
    for _ in range(args.rounds):
        with Nodes(cfg) as nodes:
            Executor(cfg, nodes).down()
            t0 = time.monotonic()
            res = Executor(cfg, nodes).up()
            ups.append(time.monotonic() - t0)
            phases.append(res.phases)
            Executor(cfg, nodes).down()
        script = bare_script(cfg)
        t0 = time.monotonic()
        subprocess.run(["bash", "-c", script], check=True, timeout=3600)
        scripts.append(time.monotonic() - t0)
        with Nodes(cfg) as nodes:
            Executor(cfg, nodes).down()
    up_s, sh_s = statistics.median(ups), statistics.median(scripts)
    print(f"config: {args.config} ({len(cfg.nodes)} nodes, executor {cfg.executor}), rounds: {args.rounds}")
    print(f"spark-cluster up     : {up_s:8.1f} s  (runs: {', '.join(f'{x:.1f}' for x in ups)})")
    print(f"bare sequential ssh  : {sh_s:8.1f} s  (runs: {', '.join(f'{x:.1f}' for x in scripts)})")
    print(f"ratio up / script    : {up_s / sh_s:8.2f}")
    print("phases of up (median s): " + ", ".join(f"{k} {statistics.median(p[k] for p in phases if k in p):.1f}" for k in phases[0]))


if __name__ == "__main__":
    main()
