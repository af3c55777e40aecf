#!/usr/bin/env python3
"""Soak: false slow verdicts (spark_cluster.speed) under steady load with nothing slowed.

Four simulated nodes as two groups of TP=2 (`spark-cluster sim up --nodes 4`), the controller in its own process
(tests/two_groups.py), clients streaming through its gateway one request after another for `--minutes` (20), with
the simulated groups' slow-verdict settings (configs/local-sim-2groups.yaml: `slower_by` 1.0, the groups sharing two
cores; the rest the defaults): slow verdicts counted (the goal: none), and each group's decode time per token as the
controller measured it every 10 s (min, median, max), and its spread against its own median.

Usage (root): python -m bench.slow_soak [--minutes 20] [--clients 6] [--executors ray,native]
(each executor in turn, 25 minutes each; their figures printed side by side at the end.)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from tests.loadgen import stream_load
from tests.two_groups import two_groups_serving


def soak(executor: str, minutes: float, clients: int) -> tuple[list[dict], dict[str, list[float]]]:
    """One executor's soak: its slow verdicts, and each group's decode time per token every 10 s."""
    with tempfile.TemporaryDirectory(prefix="slow-soak-") as tmp, two_groups_serving(Path(tmp), executor) as (_, cfg, c):
        stop = threading.Event()
        threads = stream_load(c.gateway, cfg.model.name, clients, stop, max_tokens=48, repeat=True)
        seen: dict[str, list[float]] = {"a": [], "b": []}
        t_end = time.monotonic() + minutes * 60
        try:
            while time.monotonic() < t_end:
                time.sleep(10)
                for g in seen:
                    try:
                        seen[g].append(c.metric("spark_cluster_group_decode_seconds_per_token", group=g))
                    except KeyError:
                        pass  # not measured yet
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        return [e for e in c.events if e["event"] in ("slow", "slow-over")], seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--executors", default="ray,native", help="Comma-separated: ray, native.")
    args = ap.parse_args()
    executors = [x for x in args.executors.split(",") if x]
    if not executors or set(executors) - {"ray", "native"}:
        ap.error(f"--executors: ray, native or both, not {args.executors!r}")
    results = {x: soak(x, args.minutes, args.clients) for x in executors}
    print(f"\ntwo groups, {args.clients} clients, {args.minutes:g} min each")
    for x, (verdicts, _) in results.items():
        print(f"{x}: {len(verdicts)} slow verdict(s)")
        for e in verdicts:
            print(f"  {e['ts']} group {e['group']} {e['event']}: {e['reason']}")
    print(f"{'executor':10}{'group':6}{'looks':>7}{'min ms':>9}{'median':>9}{'max ms':>9}{'max/median':>12}")
    for x, (_, seen) in results.items():
        for g, xs in seen.items():
            if xs:
                med = statistics.median(xs)
                print(f"{x:10}{g:6}{len(xs):>7}{min(xs) * 1000:>9.0f}{med * 1000:>9.0f}{max(xs) * 1000:>9.0f}{max(xs) / med:>12.2f}")


if __name__ == "__main__":
    main()
