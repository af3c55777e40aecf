"""The two-group failover beside the one-group one (`bench/failover_bench.py --groups`), on four
simulated nodes (`spark-cluster sim up --nodes 4`).

For each layout, the controller as a user runs it (its own process) and a mixed load through its
gateway (streams and short non-streamed requests): steady state for a while, then group a's worker
frozen (`docker pause`), until a's restart is done and a little after. One group: configs/local-sim.yaml
(sim-1, sim-2; the other two nodes idle). Two groups: configs/local-sim-2groups.yaml.

Figures per layout: non-streamed requests failed, streams completed whole, continued after a cut
(the gateway's count) and interrupted (the error event) or failed, the longest pause at a seam,
the longest time to first byte of a request waiting while group a was down (sent then, or sent
before and still unanswered at the freeze), the median time to first byte in steady state and
during the failover; the gateway's own counts of requests held at its door and retried (its
metrics), and its log line of the slowest request that did not pass at once (with the groups it
went to).
"""

from __future__ import annotations

import os
import re
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


from spark_cluster.config import parse_config
from spark_cluster.executor import Executor
from spark_cluster.groups import for_each_group
from spark_cluster.metrics import sample_value
from spark_cluster.sim import cluster
from spark_cluster.transport import Nodes
from tests.fake_engine import free_ports
from tests.loadgen import mixed_load

ROOT = Path(__file__).resolve().parent.parent

TOKEN = "groups-failover-bench"
LAYOUTS = {"one group": "local-sim.yaml", "two groups": "local-sim-2groups.yaml"}


def ts(e) -> float:
    return datetime.fromisoformat(e["ts"]).timestamp()


def layout_cfg(name: str, executor: str, tmp: Path):
    data = yaml.safe_load((ROOT / "configs" / LAYOUTS[name]).read_text())
    data["executor"] = executor
    if executor == "native":
        data["ray"].pop("resources", None)
    data["state_dir"] = str(tmp / "state")
    gateway, control = free_ports(2)
    data["gateway"] = {"host": "127.0.0.1", "port": gateway, "hold_s": 600}
    data["controller"] = {"port": control}
    data["api"] = {"token_env": "SPARK_CLUSTER_BENCH_TOKEN"}
    path = tmp / f"{name.replace(' ', '-')}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, parse_config(path.read_text())


def up_all(cfg) -> None:
    """`up` of every group at once, as the CLI does it."""
    def up(label, group):
        with Nodes(group) as nodes:
            Executor(group, nodes).up()
    for_each_group(cfg, up)


def down_all(cfg) -> None:
    def down(label, group):
        with Nodes(group) as nodes:
            Executor(group, nodes).down()
    for_each_group(cfg, down)


def start_controller(path: Path, log: Path) -> subprocess.Popen:
    """The controller as a user runs it (its own process, its output into log)."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "spark_cluster", "controller", str(path)], cwd=ROOT,
                                env={**os.environ, "SPARK_CLUSTER_BENCH_TOKEN": TOKEN}, stdout=out, stderr=subprocess.STDOUT)


def events(cfg) -> list[dict]:
    r = httpx.get(f"{cfg.controller_url()}/api/events?n=500", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    return r.json()


def wait_event(cfg, pred, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            hit = next((e for e in events(cfg) if pred(e)), None)
        except (httpx.HTTPError, ValueError):
            hit = None
        if hit is not None:
            return hit
        time.sleep(1)
    raise SystemExit("timed out waiting for the controller's event")


def gateway_counts(cfg) -> dict[str, float]:
    text = httpx.get(f"{cfg.controller_url()}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
    return {o: sample_value(text, "spark_cluster_gateway_requests_total", outcome=o) for o in ("held", "retried", "rejected", "continued")}


SLOW = re.compile(r": (held|retried|rejected|failed|interrupted) after ([0-9.]+)s \((.*)\)$")


def slowest_logged(log: Path) -> str:
    """The gateway's line of the slowest request that did not pass at once ('' when none)."""
    hits = [(float(m.group(2)), f"{m.group(1)} after {m.group(2)} s ({m.group(3)})")
            for line in log.read_text(errors="replace").splitlines() if (m := SLOW.search(line))]
    return max(hits)[1] if hits else ""


def measure(name: str, executor: str, steady_s: float, streams: int, plain: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="groups-failover-"))
    path, cfg = layout_cfg(name, executor, tmp)
    several = bool(cfg.groups)

    up_all(cfg)
    log = tmp / "controller.log"
    proc = start_controller(path, log)
    try:
        of_a = (lambda e: e.get("group") == "a") if several else (lambda e: True)
        wait_event(cfg, lambda e: of_a(e) and e["event"] == "state" and e["state"] == "healthy", 180)
        stop = threading.Event()
        threads, results = mixed_load(cfg.gateway_url(), cfg.model.name, stop, streams=streams - streams // 2, chats=streams // 2, plain=plain,
                                      stream_tokens=300, plain_tokens=8)
        time.sleep(steady_s)
        worker = ("spark-a-" if several else "spark-") + ("ray-worker" if executor == "ray" else "vllm-worker")
        t_freeze = time.time()
        cluster.node_exec("sim-2", "docker", "pause", worker, check=True, timeout=60)
        done = wait_event(cfg, lambda e: of_a(e) and e["event"] in ("restart-done", "restart-failed"), 1200)
        time.sleep(10)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        counts = gateway_counts(cfg)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        down_all(cfg)
    t_done = ts(done)
    steady = [r.first_byte - r.start for r in results if r.first_byte and r.end < t_freeze]
    during = [r for r in results if r.start <= t_done and (r.first_byte is None or r.first_byte >= t_freeze)]
    waits = [r.first_byte - r.start for r in during if r.first_byte]
    slow = max((r for r in during if r.first_byte), key=lambda r: r.first_byte - r.start, default=None)
    plain_rs = [r for r in results if r.kind == "plain"]
    stream_rs = [r for r in results if r.kind == "stream"]
    return {
        "restart": done["event"], "failover_s": t_done - t_freeze,
        "plain failed": sum(r.outcome == "failed" for r in plain_rs), "plain": len(plain_rs),
        "streams completed": sum(r.outcome == "ok" for r in stream_rs),
        "streams continued": int(counts["continued"]),
        "seam pause": max((r.longest_gap for r in stream_rs if r.outcome == "ok" and r.first_byte and r.first_byte < t_freeze < r.end),
                          default=float("nan")),
        "streams interrupted": sum(r.outcome == "interrupted" for r in stream_rs),
        "streams failed": sum(r.outcome in ("failed", "cut") for r in stream_rs), "streams": len(stream_rs),
        "longest wait": max(waits) if waits else float("nan"),
        "ttfb steady": statistics.median(steady) if steady else float("nan"),
        "ttfb failover": statistics.median(waits) if waits else float("nan"),
        "served during failover": len(waits),
        "held": int(counts["held"]), "retried": int(counts["retried"]), "rejected": int(counts["rejected"]),
        "slowest": slowest_logged(log),
        "slowest seen": f"a {slow.kind} request sent {slow.start - t_freeze:+.1f} s from the freeze, first byte after "
                        f"{slow.first_byte - slow.start:.1f} s" if slow else "-",
    }


def compare(executors: list[str], steady_s: float = 30, streams: int = 4, plain: int = 4) -> None:
    """Both layouts on each executor, printed side by side: the table so far after each executor (a
    run takes about 20 minutes an executor; what one measured is not lost to trouble in the next)."""
    res: dict[tuple[str, str], dict] = {}
    for x in executors:
        for name in LAYOUTS:
            res[(x, name)] = measure(name, x, steady_s, streams, plain)
        table(res, streams, plain)


def table(res: dict[tuple[str, str], dict], streams: int, plain: int) -> None:
    cols = list(res)
    print(f"\nfailover of group a under load ({streams} streams, half of them chats, {plain} non-streamed clients), simulated nodes")
    print(f"{'':50}" + "".join(f"{x + ' ' + n:>22}" for x, n in cols))
    rows = [("freeze -> a's restart done (s)", "failover_s", "{:22.1f}"), ("non-streamed requests failed", "plain failed", "{:22d}"),
            ("  of non-streamed requests", "plain", "{:22d}"), ("streams completed whole", "streams completed", "{:22d}"),
            ("  of them continued after a cut", "streams continued", "{:22d}"),
            ("longest pause, a stream open at the freeze (s)", "seam pause", "{:22.1f}"),
            ("streams ended with the error event", "streams interrupted", "{:22d}"),
            ("streams failed or cut", "streams failed", "{:22d}"), ("requests answered during the failover", "served during failover", "{:22d}"),
            ("longest wait for a first byte then (s)", "longest wait", "{:22.1f}"), ("median first byte, steady (s)", "ttfb steady", "{:22.2f}"),
            ("median first byte, during the failover (s)", "ttfb failover", "{:22.2f}")]
    rows += [("gateway: held at its door, then answered", "held", "{:22d}"), ("gateway: retried, then answered", "retried", "{:22d}"),
             ("gateway: refused (503)", "rejected", "{:22d}")]
    for label, key, fmt in rows:
        print(f"{label:50}" + "".join(fmt.format(res[c][key]) for c in cols))
    for c in cols:
        print(f"{c[0]} {c[1]}: slowest first byte the clients saw: {res[c]['slowest seen']}; slowest request the gateway "
              f"logged (held, retried, refused, cut): {res[c]['slowest'] or '-'}")
