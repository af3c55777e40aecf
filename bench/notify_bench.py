#!/usr/bin/env python3
"""Benchmark: does a notification target that hangs or refuses change the time to detect a hang or to restart?

On the local simulated cluster (`spark-cluster sim up`), one executor (default ray), the controller in this process
(tests/cluster_helpers.Controlled), streaming load on the engine: the worker frozen (`docker pause`) until the
restart is done, twice: without notification targets, then with two that misbehave (a webhook that never answers,
one that answers 500, tests/webhook.py) plus one that works. Prints, side by side: freeze -> hang confirmed,
the restart's own time, freeze -> serving again, their ratios (with / without), and when the working target got
the hang's message.

Usage (root): python -m bench.notify_bench [--executor ray|native]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--executor", default="ray", choices=sorted(SIM_CONFIGS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="notify-bench-") as tmp:
        folder = Path(tmp)
        data = yaml.safe_load(SIM_CONFIGS[args.executor].read_text())
        data["state_dir"] = str(folder / "state")
        cfg = parse_config(yaml.safe_dump(data))
        rows = {}
        print(f"{args.executor}: a frozen worker under load, without notification targets ...", flush=True)
        rows["without"] = run(cfg, [], folder)
        with Receiver("hang") as hangs, Receiver("refuse") as refuses, Receiver() as works:
            print(f"{args.executor}: ... and with a target that never answers, one that answers 500, one that works", flush=True)
            rows["with"] = run(cfg, [hangs, refuses, works], folder)
        with Nodes(cfg) as nodes:
            Executor(cfg, nodes).down()
    a, b = rows["without"], rows["with"]
    print(f"\n{'':28}{'without':>10}{'with':>10}{'ratio':>8}")
    for key, label in (("detect", "freeze -> hang confirmed"), ("restart", "restart"), ("serving", "freeze -> serving again")):
        print(f"{label:28}{a[key]:>9.1f}s{b[key]:>9.1f}s{b[key] / a[key]:>8.2f}")
    told = b["told"]
    print(f"the working target got the hang's message {told:.2f}s after the decision" if told is not None else "the working target got nothing")
    if not (a["ok"] and b["ok"]):
        raise SystemExit("a restart failed")


if __name__ == "__main__":
    main()
