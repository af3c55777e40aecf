#!/usr/bin/env python3
"""Benchmark: does a notification target that hangs or refuses change the time to detect a hang or to restart?

On the local simulated cluster (`spark-cluster sim up`), each executor (Ray, native) in turn, the controller in this process
(tests/cluster_helpers.Controlled), streaming load on the engine: the worker frozen (`docker pause`) until the
restart is done, twice: without notification targets, then with two that misbehave (a webhook that never answers,
one that answers 500, tests/webhook.py) plus one that works. Prints, side by side: freeze -> hang confirmed,
the restart's own time, freeze -> serving again, their ratios (with / without), and when the working target got
the hang's message.

Usage (root): python -m bench.notify_bench [--executors ray,native]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import yaml

from spark_cluster.config import parse_config
from spark_cluster.executor import Executor
from spark_cluster.serving_settings import NotifySettings
from spark_cluster.transport import Nodes
from tests.cluster_helpers import Controlled, completion_works, ts
from tests.conftest import SIM_CONFIGS, freeze, worker_container
from tests.loadgen import stream_load
from tests.webhook import Receiver


def run(cfg, receivers: list[Receiver], folder: Path) -> dict:
    targets = []
    for i, r in enumerate(receivers):
        (folder / f"url-{i}").write_text(r.url + "\n")
        targets.append({"url_file": str(folder / f"url-{i}")})
    # a state folder of its own: a controller shows the events its folder kept (the other run's decision among them)
    cfg = cfg.model_copy(update={"notify": NotifySettings(targets=targets), "state_dir": str(folder / f"state-{len(receivers)}")})
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).up()
    stop = threading.Event()
    with Controlled(cfg) as c:
        c.wait_for(lambda e: e["event"] == "state" and e["state"] == "healthy", 120, "healthy state")
        threads = stream_load(cfg.endpoint(), cfg.model.name, 3, stop, max_tokens=1500, repeat=True)
        try:
            time.sleep(10)
            t_freeze = time.time()
            freeze("sim-2", worker_container(cfg))
            decision = c.wait_for(lambda e: e["event"] == "decision" and e["action"] == "restart", 180, "restart decision")
            done = c.wait_for(lambda e: e["event"] in ("restart-done", "restart-failed"), 900, "restart end")
            while not completion_works(cfg):
                time.sleep(0.5)
            serving = time.time()
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
    told = [at for r in receivers for at, body in r.received if "hang confirmed" in body.get("title", "")]
    return {"detect": ts(decision) - t_freeze, "restart": done["seconds"], "serving": serving - t_freeze, "ok": done["event"] == "restart-done",
            "told": (min(told) - ts(decision)) if told else None}


def pair(executor: str, folder: Path) -> dict:
    """Without targets, then with three that misbehave or work, on one executor."""
    data = yaml.safe_load(SIM_CONFIGS[executor].read_text())
    data["state_dir"] = str(folder / "state")
    cfg = parse_config(yaml.safe_dump(data))
    rows = {}
    print(f"{executor}: a frozen worker under load, without notification targets ...", flush=True)
    rows["without"] = run(cfg, [], folder)
    with Receiver("hang") as hangs, Receiver("refuse") as refuses, Receiver() as works:
        print(f"{executor}: ... and with a target that never answers, one that answers 500, one that works", flush=True)
        rows["with"] = run(cfg, [hangs, refuses, works], folder)
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).down()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--executors", default="ray,native", help="Comma-separated: ray, native.")
    args = ap.parse_args()
    executors = [x for x in args.executors.split(",") if x]
    if not executors or set(executors) - set(SIM_CONFIGS):
        ap.error(f"--executors: {', '.join(sorted(SIM_CONFIGS))} or both, not {args.executors!r}")
    results = {}
    for x in executors:
        with tempfile.TemporaryDirectory(prefix="notify-bench-") as tmp:
            results[x] = pair(x, Path(tmp))
    print(f"\n{'':28}" + "".join(f"{x + ' without':>16}{x + ' with':>13}{'ratio':>7}" for x in executors))
    for key, label in (("detect", "freeze -> hang confirmed"), ("restart", "restart"), ("serving", "freeze -> serving again")):
        print(f"{label:28}" + "".join(f"{r['without'][key]:>15.1f}s{r['with'][key]:>12.1f}s{r['with'][key] / r['without'][key]:>7.2f}"
                                      for r in results.values()))
    for x, r in results.items():
        told = r["with"]["told"]
        print(f"{x}: the working target got the hang's message {told:.2f}s after the decision" if told is not None
              else f"{x}: the working target got nothing")
    if not all(r[k]["ok"] for r in results.values() for k in r):
        raise SystemExit("a restart failed")


if __name__ == "__main__":
    main()
