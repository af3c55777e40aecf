#!/usr/bin/env python3
"""Benchmark: the controller's gateway on the local simulated cluster, for each executor in turn.

1. Overhead: requests sent in turn straight to vLLM, through the gateway and through a bare relay
   (bytes copied both ways, nothing parsed or held back: the floor of any proxy on this machine,
   where the engine's CPU ranks share the 2 cores with every hop), in the same run: time to first
   token (p50 with its 95 % interval, p90) of one-token streamed probes, idle (one at a time) and
   under load (streams kept running through the same target); generation throughput of rounds of
   streams, one at a time and several at once; the ratios to direct. Each with the cores shared
   (as the simulated cluster runs: the engine computes on both) and with a spare core (the engine
   confined to one, the controller, the relay and the clients on the other, as on a Spark whose
   engine computes on its GPU).
2. Footprint of the controller process (`spark-cluster controller`, its own process): resident
   memory and CPU share while idle (the watchdog observing every period), and its CPU time per
   request under the load of the failover run.
3. Failover: a steady mix of streamed and non-streamed clients of the gateway while the worker is
   frozen (`docker pause`) and the group restarts: requests by outcome as the clients saw them.

Usage (root, simulated cluster up: `spark-cluster sim up`):
    python -m bench.gateway_bench [--executors ray,native] [--probes 1000] [--rounds 30] [--loaded-rounds 20] [--load 4] [--cores shared,spare] [--idle-seconds 30] [--no-failover]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx
import yaml


from spark_cluster.config import parse_config
from spark_cluster.executor import Executor
from tests.loadgen import mixed_load, one_request, stream_load
from spark_cluster.metrics import sample_value, samples
from spark_cluster.sim import cluster
from spark_cluster.transport import Nodes

ROOT = Path(__file__).resolve().parent.parent

CLK_TCK = os.sysconf("SC_CLK_TCK")
RELAY_PORT = 8091


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


def block(url: str, clients: list[httpx.Client], model: str, tokens: int) -> list:
    """One streamed completion per client, all sent at once; their results."""
    results: list = [None] * len(clients)

    def one(i: int) -> None:
        results[i] = one_request(url, model, "stream", tokens, client=clients[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def rotated(names: list[str], i: int) -> list[str]:
    """The targets in turn i's order: rotated by one each turn, so none always follows the same one."""
    return names[i % len(names):] + names[:i % len(names)]


def probe_ttft(targets: dict[str, str], model: str, n: int, direct: str, load: int = 0, per_phase: int = 25) -> dict[str, list[float]]:
    """Time to first token (ms) of n one-token streamed completions per target, one at a time, the
    targets in turn (the order rotated every turn); each target's client keeps its connection alive,
    as an application's OpenAI client does (a new httpx client per request costs ~19 ms of the
    client's own CPU here, building its TLS context: noise on every side). The first token is the prefill's whatever max_tokens is,
    so a probe costs the engine ~20 ms instead of a whole stream: enough probes for the median to be
    known to about 1 % (100 48-token streams gave ratios that moved 5-10 % between runs).
    With load: in phases of per_phase probes, each with `load` long streams kept running through the
    same target as its probes (a deployment whose every client uses that door); the probes start
    once vLLM (`direct`) runs all of them."""
    out: dict[str, list[float]] = {name: [] for name in targets}
    clients = {name: httpx.Client() for name in targets}
    names, step = list(targets), per_phase if load else 1
    try:
        for i in range(-(-n // step)):
            for name in rotated(names, i):
                stop = threading.Event()
                background = stream_load(targets[name], model, load, stop) if load else []
                try:
                    if load:
                        wait_running(direct, load)
                    for _ in range(step):
                        r = one_request(targets[name], model, "stream", 1, client=clients[name])
                        if not r.complete:
                            raise SystemExit(f"{name}: request failed: {r.error}")
                        out[name].append((r.first_byte - r.start) * 1000)
                finally:
                    stop.set()
                    for t in background:
                        t.join()
    finally:
        for c in clients.values():
            c.close()
    return out


def wait_running(direct: str, k: int, timeout: float = 60) -> None:
    """Until vLLM runs exactly k requests (the load's streams started; an earlier phase's left ones gone)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sample_value(httpx.get(f"{direct}/metrics", timeout=10).text, "vllm:num_requests_running") == k:
            return
        time.sleep(0.1)
    raise SystemExit(f"vLLM did not come to {k} running requests in {timeout:g} s")


def throughput(targets: dict[str, str], model: str, rounds: int, k: int, tokens: int) -> dict[str, dict[str, list[float]]]:
    """Rounds of k streamed completions at once to each target in turn (the order rotated every
    round): each block's generation throughput (tokens of all k streams / the block's wall time),
    and every stream's time to first token (each block sent right after the previous one ended)."""
    out: dict[str, dict[str, list[float]]] = {name: {"ttft": [], "tps": []} for name in targets}
    clients = {name: [httpx.Client() for _ in range(k)] for name in targets}
    names = list(targets)
    try:
        for i in range(rounds):
            for name in rotated(names, i):
                rs = block(targets[name], clients[name], model, tokens)
                bad = [r.error for r in rs if not r.complete]
                if bad:
                    raise SystemExit(f"{name}: request failed: {bad[0]}")
                out[name]["ttft"] += [(r.first_byte - r.start) * 1000 for r in rs]
                out[name]["tps"].append(sum(r.tokens for r in rs) / (max(r.end for r in rs) - min(r.start for r in rs)))
    finally:
        for cs in clients.values():
            for c in cs:
                c.close()
    return out


def median_interval(values: list[float]) -> tuple[float, float]:
    """A 95 % interval of the median, free of any assumed distribution (order statistics n/2 ± 0.98 √n)."""
    v, n = sorted(values), len(values)
    half = 0.98 * n ** 0.5
    return v[max(0, int(n / 2 - half))], v[min(n - 1, int(n / 2 + half))]


def row(label: str, figures: list[float], unit: str, intervals: list[tuple[float, float]] | None = None) -> str:
    """A table row: the figure of each target (direct first), then each other one's ratio to direct."""
    cells = [f"{x:.1f} {unit}" for x in figures]
    if intervals:
        cells = [f"{c} [{lo:.1f}, {hi:.1f}]" for c, (lo, hi) in zip(cells, intervals)]
    return f"| {label} | " + " | ".join(cells) + " | " + " | ".join(f"{x / figures[0]:.3f}" for x in figures[1:]) + " |"


def overhead_rows(label: str, ttft: dict[str, list[float]], tput: dict[str, dict[str, list[float]]]) -> list[str]:
    """Rows for one condition: time to first token p50 (with its interval) and p90 of the probes,
    generation throughput, and the time to first token of the throughput rounds' streams."""
    names = list(ttft)
    rows = [row(f"{label}: time to first token p50 [95 % interval] ({len(ttft[names[0]])} probes each)",
                [pct(ttft[n], 0.5) for n in names], "ms", [median_interval(ttft[n]) for n in names]),
            row(f"{label}: time to first token p90", [pct(ttft[n], 0.9) for n in names], "ms"),
            row(f"{label}: generation throughput (mean of {len(tput[names[0]]['tps'])} rounds)",
                [sum(tput[n]["tps"]) / len(tput[n]["tps"]) for n in names], "tokens/s"),
            row(f"{label}: time to first token p50 of those rounds' streams ({len(tput[names[0]]['ttft'])} each, "
                "each round sent as the previous one ended)", [pct(tput[n]["ttft"], 0.5) for n in names], "ms")]
    return rows


def relay(upstream: str, port: int) -> None:
    """The floor of any proxy on this machine: bytes copied both ways between a client and vLLM
    (uvloop, no HTTP parsing, nothing held back, no failover), in a process of its own."""
    import asyncio

    import uvloop

    host, up_port = upstream.rsplit(":", 1)

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
        finally:
            w.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(host, int(up_port))
        await asyncio.gather(pipe(cr, uw), pipe(ur, cw), return_exceptions=True)

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of a process on these cores (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


@contextmanager
def cores(mode: str, pids: list[int]):
    """shared: as the simulated cluster runs, the engine's CPU ranks, the controller, the relay and
    the clients all on the machine's cores. spare: the nodes' containers (vLLM, Ray) confined to
    core 0, the controller, the relay and this process (the clients) to core 1: a hop with a core
    the engine does not use, as on a Spark (20 cores, the engine computing on its GPU). Restored
    afterwards."""
    if mode == "shared":
        yield
        return
    every = set(range(os.cpu_count() or 1))
    if len(every) < 2:
        raise SystemExit("--cores spare needs 2 cores at least")
    containers = {n["name"]: cluster.node_exec(n["name"], "docker", "ps", "-q", timeout=60).stdout.split()
                  for n in cluster.status()["nodes"]}
    try:
        for node, ids in containers.items():
            cluster.node_exec(node, "docker", "update", "--cpuset-cpus", "0", *ids, timeout=60)
        for pid in pids:
            pin(pid, every - {0})
        yield
    finally:
        for node, ids in containers.items():
            cluster.node_exec(node, "docker", "update", "--cpuset-cpus", f"0-{max(every)}", *ids, check=False, timeout=60)
        for pid in pids:
            pin(pid, every)


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
    ap.add_argument("--probes", type=int, default=1000, help="one-token probes per target and condition (time to first token)")
    ap.add_argument("--rounds", type=int, default=30, help="throughput rounds per target, idle (one 48-token stream: about a second)")
    ap.add_argument("--loaded-rounds", type=int, default=20, help="throughput rounds per target under load")
    ap.add_argument("--load", type=int, default=4, help="streams at once in the loaded condition")
    ap.add_argument("--cores", default="shared,spare", help="shared: the engine on every core, as the simulated cluster runs; "
                    "spare: the engine on core 0, the controller, the relay and the clients on core 1 (as on a Spark)")
    ap.add_argument("--idle-seconds", type=float, default=30)
    ap.add_argument("--no-failover", action="store_true")
    ap.add_argument("--executors", default="ray,native")
    ap.add_argument("--relay", nargs=2, metavar=("UPSTREAM", "PORT"), help=argparse.SUPPRESS)  # the bare relay's own process
    args = ap.parse_args()
    if args.relay:
        return relay(args.relay[0], int(args.relay[1]))
    if not set(args.cores.split(",")) <= {"shared", "spare"}:
        raise SystemExit(f"--cores: shared, spare or both, not {args.cores!r}")
    if not any(n["running"] for n in cluster.status()["nodes"]):
        raise SystemExit("the simulated cluster is not up: spark-cluster sim up")
    for executor in args.executors.split(","):
        print(f"\n## executor: {executor}\n")
        print("\n".join(run(executor, args)), flush=True)


def run(executor: str, args: argparse.Namespace) -> list[str]:
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    config = {"ray": "configs/local-sim.yaml", "native": "configs/local-sim-native.yaml"}[executor]
    data = yaml.safe_load((ROOT / config).read_text())
    data["state_dir"] = str(tmp / "state")
    data["gateway"] = {"host": "127.0.0.1", "port": 8089}
    data["controller"] = {"port": 8090}
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = parse_config(path.read_text())
    model, direct, gateway, control = cfg.model.name, cfg.endpoint(), cfg.gateway_url(), cfg.controller_url()
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).up()
    log = open(tmp / "controller.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "spark_cluster", "controller", str(path)], stdout=log, stderr=subprocess.STDOUT)
    bare = subprocess.Popen([sys.executable, __file__, "--relay", direct.split("//", 1)[1], str(RELAY_PORT)])
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

        targets = {"direct": direct, "gateway": gateway, "relay": f"http://127.0.0.1:{RELAY_PORT}"}
        for url in targets.values():  # warm every path
            one_request(url, model, "stream", 8)
        rows += ["| | direct to vLLM | through the gateway | through a bare relay | gateway / direct | relay / direct |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for mode in args.cores.split(","):
            with cores(mode, [os.getpid(), proc.pid, bare.pid]):
                idle = probe_ttft(targets, model, args.probes, direct)
                loaded = probe_ttft(targets, model, args.probes, direct, load=args.load)
                idle_tput = throughput(targets, model, args.rounds, 1, 48)
                loaded_tput = throughput(targets, model, args.loaded_rounds, args.load, 96)
            rows += overhead_rows(f"{mode} cores, idle", idle, idle_tput)
            rows += overhead_rows(f"{mode} cores, under load ({args.load} streams)", loaded, loaded_tput)
        rows += ["", "| controller process | |", "| --- | --- |",
                 f"| resident memory, idle | {idle_rss:.0f} MB |", f"| CPU, idle (watchdog observing every {cfg.watchdog.period_s:g} s) | {idle_cpu:.2f} % of a core |"]

        if not args.no_failover:
            stop = threading.Event()
            c0 = proc_cpu_s(proc.pid)
            t_run = time.monotonic()
            threads, results = mixed_load(gateway, model, stop, streams=2, chats=1, plain=2, stream_tokens=600, plain_tokens=24)
            time.sleep(15)
            frozen = time.time()
            worker = f"{cfg.name}-ray-worker" if executor == "ray" else f"{cfg.name}-vllm-worker"
            cluster.node_exec("sim-2", "docker", "pause", worker, check=True, timeout=60)
            decision = wait_event(control, lambda e: e["event"] == "decision" and e["action"] == "restart", 180)
            done = wait_event(control, lambda e: e["event"] in ("restart-done", "restart-failed"), 600)
            time.sleep(20)  # clients keep going after the restart
            stop.set()
            for t in threads:
                t.join(timeout=120)
            cpu = proc_cpu_s(proc.pid) - c0
            took = time.monotonic() - t_run
            rss = proc_rss_mb(proc.pid)
            counts = {o: sum(1 for r in results if r.outcome == o) for o in ("ok", "interrupted", "cut", "failed", "stopped")}
            plain_failed = sum(1 for r in results if r.kind == "plain" and not r.complete and not r.stopped)
            t_conf = datetime.fromisoformat(decision["ts"]).timestamp()
            lags = [r.error_event - t_conf for r in results if r.outcome == "interrupted"]
            above_idle = max(0.0, cpu - idle_cpu / 100 * took)  # the watchdog's own observing is in the idle figure
            rows += [f"| CPU time per request, failover run ({len(results)} requests in {took:.0f} s; the restart's own work included) | "
                     f"{cpu / max(1, len(results)) * 1000:.1f} ms ({above_idle / max(1, len(results)) * 1000:.1f} ms above the idle rate) |",
                     f"| resident memory after the failover run | {rss:.0f} MB |",
                     "", f"Failover through the gateway ({done['event']}; hang confirmed {t_conf - frozen:.1f} s after the freeze):", "",
                     "| client outcome | requests |", "| --- | --- |"]
            rows += [f"| {k} | {v} |" for k, v in counts.items()]
            open_at_freeze = [r for r in results if r.kind == "stream" and r.first_byte and r.first_byte < frozen < r.end]
            rows += [f"| non-streamed requests failed | {plain_failed} |",
                     f"| streams open at the freeze: completed whole / in all | {sum(r.complete for r in open_at_freeze)} / "
                     f"{len(open_at_freeze)} |",
                     f"| longest pause of a stream open at the freeze (the seam) | "
                     f"{max((r.longest_gap for r in open_at_freeze if r.complete), default=0):.1f} s |",
                     f"| interrupted streams: error event after the hang was confirmed (max) | {max(lags):.2f} s |" if lags else
                     "| interrupted streams | none |"]
            by_gateway = {labels["outcome"]: value for labels, value in
                          samples(httpx.get(f"{control}/metrics", timeout=10).text, "spark_cluster_gateway_requests_total")}
            rows += ["", "The gateway's own count (spark_cluster_gateway_requests_total): " +
                     ", ".join(f"{k} {v:g}" for k, v in by_gateway.items())]
    finally:
        bare.terminate()
        proc.terminate()
        proc.wait(timeout=60)
        bare.wait(timeout=60)
        log.close()
    return rows


if __name__ == "__main__":
    main()
