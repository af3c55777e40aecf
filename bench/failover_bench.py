#!/usr/bin/env python3
"""Benchmark: failover on the local simulated cluster, on both executors, default watchdog settings.

For each executor:
1. Engine start: a fresh `up` of the same config on a clean cluster (what a restart cannot avoid).
2. Loaded hang: under continuous streaming load, freeze the worker (`docker pause` of the worker
   node's container: its vLLM rank, or its Ray node holding the rank). MTTD (freeze -> hang
   confirmed), the restart with its parts, MTTR (freeze -> a new completion succeeds).
3. Idle hang: no load; the worker freezes just after an idle canary passed (the worst moment).
   Before the hangs, under the same load, three ways to be slow that are not hung (the simulated
   image's request markers, templates/sim/sim_faults.py): a 120 s step with every rank working, a
   60 s compile on the last rank while its peer waits in the collective, and the worker's
   containers starved to 1 % of a core for 4 minutes under long prompts: restarts and decisions
   counted, the watchdog's busy time shown.
4. Overhead = restart time - engine start time, loaded and idle: what the restart adds.
5. Optionally a soak with no fault (--soak-minutes, 0 to skip): 8 long streams with fresh long
   prompts near max_model_len (long prefills) plus short non-streamed requests; suspect states,
   canaries and restarts counted, and the longest gap between two engine steps seen.

Prints the figures of each executor side by side, then the restart's parts.
Usage (root, simulated cluster up with the image: `spark-cluster sim up`):
    python -m bench.failover_bench [--executors ray,native] [--soak-minutes 20] [--soak-streams 8]

With --restarts, instead: the kept restart against the full one, a rank stopped under load through the
controller's gateway (bench/restart_kinds.py): decision -> serving of each, their parts, their ratio.

With --groups (four simulated nodes: `spark-cluster sim up --nodes 4`), instead: the failover of
one group under load through the controller's gateway, one group alone beside two groups of TP=2
(bench/groups_failover.py): failed requests, the longest wait, time to first byte during the
failover against steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import yaml


from spark_cluster.config import parse_config
from spark_cluster.executor import Executor
from spark_cluster.facts import parse_metrics
from tests.loadgen import mixed_load, random_prompt, stream_load
from spark_cluster.sim import cluster
from spark_cluster.transport import Nodes
from spark_cluster.watchdog import Watchdog

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = {"ray": ROOT / "configs" / "local-sim.yaml", "native": ROOT / "configs" / "local-sim-native.yaml"}


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


class Step:
    """The longest time between two engine steps (vLLM's step counter), sampled every 0.25 s."""

    def __init__(self, url: str):
        self.url, self.longest, self.stop = url, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        last, changed = None, time.monotonic()
        with httpx.Client(timeout=5) as http:
            while not self.stop.wait(0.25):
                try:
                    steps = parse_metrics(http.get(f"{self.url}/metrics").text).get("steps_total")
                except httpx.HTTPError:
                    continue
                now = time.monotonic()
                if steps != last:
                    if last is not None:
                        self.longest = max(self.longest, now - changed)
                    last, changed = steps, now


def fault(executor: str, cfg, events, worker: str, *, idle: bool, after: float) -> dict:
    url, model = cfg.endpoint(), cfg.model.name
    if idle:  # the worst moment: an idle canary has just passed
        wait(events, lambda e: e["event"] == "canary" and e["ok"] and ts(e) > after, cfg.watchdog.idle_canary_s + 120)
    t_freeze = time.time()
    cluster.node_exec("sim-2", "docker", "pause", worker)
    d = wait(events, lambda e: e["event"] == "decision" and e["action"] == "restart" and ts(e) > t_freeze, 300)
    r = wait(events, lambda e: e["event"] in ("restart-done", "restart-failed") and ts(e) > ts(d), 900)
    while not completion_ok(url, model):
        time.sleep(0.2)
    out = {"mttd": ts(d) - t_freeze, "mttr": time.time() - t_freeze, "restart": r["seconds"], "phases": r["phases"], "ok": r["event"] == "restart-done"}
    print(f"{executor} {'idle' if idle else 'loaded'} hang: confirmed {out['mttd']:.1f}s after the freeze ({d['reason']}); "
          f"restart {out['restart']:.1f}s; serving again {out['mttr']:.1f}s after the freeze", flush=True)
    return out


def kept_fault(executor: str, cfg, events) -> dict:
    """The worker's rank stopped under load (SIGSTOP: its container and Ray stay sound): the watchdog's
    restart, the kept one, until a completion is served again."""
    from bench.restart_kinds import stop_rank

    t_freeze = time.time()
    stop_rank(cfg)
    d = wait(events, lambda e: e["event"] == "decision" and e["action"] == "restart" and ts(e) > t_freeze, 300)
    r = wait(events, lambda e: e["event"] in ("restart-done", "restart-failed") and ts(e) > ts(d), 900)
    while not completion_ok(cfg.endpoint(), cfg.model.name):
        time.sleep(0.2)
    kind = r.get("restart", "?")
    print(f"{executor} rank stopped under load: confirmed {ts(d) - t_freeze:.1f}s after, the {kind} restart {r['seconds']:.1f}s", flush=True)
    return {"restart": kind, "ok": r["event"] == "restart-done", "seconds": r["seconds"]}


def prompt_words(cfg, tokens: int) -> int:
    """Words of loadgen's random prompts that make about this many tokens (measured with vLLM's tokenizer)."""
    sample = random_prompt(200, random.Random(1))
    counted = httpx.post(f"{cfg.endpoint()}/tokenize", json={"model": cfg.model.name, "prompt": sample}, timeout=30).json()["count"]
    return int(tokens * 200 / counted)


def slow(executor: str, cfg, events, worker: str, kind: str, seconds: float) -> dict:
    """A way to be slow that is not hung, under the load already running: what the watchdog decided."""
    url, model = cfg.endpoint(), cfg.model.name
    t0 = time.time()
    if kind == "starved":
        words = prompt_words(cfg, 1600)  # long prompts (as in the trial): long prefills on a starved rank
        stop = threading.Event()
        threads, results = mixed_load(url, model, stop, streams=2, plain=0, stream_tokens=32, plain_tokens=1, stream_prompt_words=words)
        cluster.node_exec("sim-2", "docker", "update", "--cpus", "0.01", worker)
        try:
            time.sleep(seconds)
        finally:
            # `--cpus 0` leaves the limit in place (docker keeps NanoCpus): give it the machine's cores back
            cluster.node_exec("sim-2", "docker", "update", "--cpus", str(os.cpu_count() or 2), worker)
            stop.set()
            for t in threads:
                t.join(timeout=120)
        done = len([r for r in results if r.outcome == "ok"])
    else:
        mark = f"sim-{kind}-{seconds:g}-{time.monotonic_ns()}"
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4},
                       headers={"X-Request-Id": mark}, timeout=seconds + 300)
        done = int(r.status_code == 200)
    wait(events, lambda e: e["event"] == "state" and e["state"] == "healthy" and ts(e) > t0, 300)
    late = [e for e in events if ts(e) >= t0]
    busy = [e for e in late if e["event"] == "state" and e["state"] == "busy"]
    out = {"restarts": len([e for e in late if e["event"] == "restart-start"]),
           "decisions": len([e for e in late if e["event"] == "decision"]),
           "busy": len(busy), "completed": done, "seconds": time.time() - t0}
    print(f"{executor} {kind} {seconds:g}s: {out['restarts']} restart(s), {out['decisions']} decision(s), busy {out['busy']} time(s)"
          + (f" ({busy[0]['reason']})" if busy else "") + f", {done} completed", flush=True)
    return out


SLOW = (("long-step", 120.0), ("compile", 60.0), ("starved", 240.0))


def soak(executor: str, cfg, events, args) -> dict:
    url, model = cfg.endpoint(), cfg.model.name
    # prompts near max_model_len, leaving room for the answer
    answer = 128
    tokens = cfg.vllm.max_model_len - answer - 64
    words = prompt_words(cfg, tokens)
    stop = threading.Event()
    steps = Step(url)
    t0 = time.time()
    threads, results = mixed_load(url, model, stop, streams=args.soak_streams, plain=2, stream_tokens=answer, plain_tokens=16,
                                  stream_prompt_words=words)
    print(f"{executor} soak: {args.soak_minutes:g} min, {args.soak_streams} streams with fresh prompts of ~{tokens} tokens "
          f"(max_model_len {cfg.vllm.max_model_len}) + 2 short non-streamed clients ...", flush=True)
    time.sleep(args.soak_minutes * 60)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    steps.stop.set()
    late = [e for e in events if ts(e) >= t0]
    return {"restarts": len([e for e in late if e["event"] == "restart-start"]),
            "suspect": len([e for e in late if e["event"] == "state" and e["state"] == "suspect"]),
            "canaries": len([e for e in late if e["event"] == "canary"]),
            "failed canaries": len([e for e in late if e["event"] == "canary" and not e["ok"]]),
            "requests": len([r for r in results if r.outcome == "ok"]),
            "longest step": steps.longest}


def measure(executor: str, args) -> dict:
    data = yaml.safe_load(CONFIGS[executor].read_text())
    data["state_dir"] = tempfile.mkdtemp(prefix=f"spark-cluster-failover-bench-{executor}-")
    cfg = parse_config(yaml.safe_dump(data))
    worker = f"{cfg.name}-ray-worker" if executor == "ray" else f"{cfg.name}-vllm-worker"
    url, model = cfg.endpoint(), cfg.model.name
    with Nodes(cfg) as nodes:
        ex = Executor(cfg, nodes)
        ex.down()
        ex.up(stop_after="preflight")  # the image's vLLM checks the flags once; a restart finds them checked
        fresh = ex.up()
    print(f"{executor} engine start (fresh up on a clean cluster): {fresh.total_s:.1f}s {fresh.phases}", flush=True)
    events: list[dict] = []
    stop_wd = threading.Event()
    nodes = Nodes(cfg)
    wd = Watchdog(cfg, nodes, on_event=events.append)
    runner = threading.Thread(target=lambda: wd.run(stop=stop_wd.is_set), daemon=True)
    runner.start()
    out: dict = {"start": fresh.total_s, "start phases": fresh.phases}
    try:
        wait(events, lambda e: e["event"] == "state" and e["state"] == "healthy", 600)
        stop_load = threading.Event()
        stream_load(url, model, args.streams, stop_load, max_tokens=1500, repeat=True, read_timeout_s=120)
        time.sleep(15)
        if args.kept_soak:  # the soak on an engine the kept restart brought back
            out["kept"] = kept_fault(executor, cfg, events)
            stop_load.set()
            out["soak"] = soak(executor, cfg, events, args)
            return out
        for kind, seconds in SLOW:
            out[kind] = slow(executor, cfg, events, worker, kind, seconds)
        out["loaded"] = fault(executor, cfg, events, worker, idle=False, after=0)
        stop_load.set()
        time.sleep(5)
        out["idle"] = fault(executor, cfg, events, worker, idle=True, after=time.time())
        if args.soak_minutes > 0 and executor in args.soak_executors.split(","):
            out["soak"] = soak(executor, cfg, events, args)
    finally:
        stop_wd.set()
        runner.join(timeout=120)
        nodes.close()
        with Nodes(cfg) as n:
            Executor(cfg, n).down()
    return out


# The engine's own start inside `up`: Ray's start (until both nodes show) and vLLM's load (until
# /health answers). On 2 shared cores they vary by +-15 s from one start to the next, which swamps
# the restart's own overhead in a plain difference: hence also the difference without them.
ENGINE_PARTS = ("wait-ray/", "ready/health", "engine/")  # engine/: the engine's own start read from its log, within the others


def ours(phases: dict[str, float]) -> float:
    """Seconds of a restart's (or an up's) parts that are not the engine's own start."""
    return sum(v for k, v in phases.items() if not k.startswith(ENGINE_PARTS))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--executors", default="ray,native", help="Comma-separated: ray (configs/local-sim.yaml), native (local-sim-native.yaml).")
    ap.add_argument("--streams", type=int, default=4, help="Streams of the loaded hang.")
    ap.add_argument("--soak-minutes", type=float, default=20)
    ap.add_argument("--soak-streams", type=int, default=8)
    ap.add_argument("--soak-executors", default="ray,native", help="Executors that get the soak (20 minutes each by default).")
    ap.add_argument("--kept-soak", action="store_true", help="Instead of the slow cases and the hangs: a rank stopped under load, "
                    "the kept restart, then the soak on the engine it brought back.")
    ap.add_argument("--groups", action="store_true", help="One group beside two groups behind the gateway (four simulated nodes).")
    ap.add_argument("--restarts", action="store_true", help="The kept restart against the full one, a rank stopped under load (two nodes).")
    args = ap.parse_args()
    executors = args.executors.split(",")
    if args.restarts:
        from bench.restart_kinds import compare as kinds

        kinds()
        return
    if args.groups:
        from bench.groups_failover import compare

        compare(executors, streams=args.streams)
        return
    res = {x: measure(x, args) for x in executors}
    out = Path(tempfile.gettempdir()) / "failover_bench.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"raw figures: {out}")

    def row(label: str, fn, fmt: str = "{:10.1f}") -> None:
        print(f"{label:52}" + "".join(fmt.format(fn(res[x])) for x in executors))

    soaked = [x for x in executors if "soak" in res[x]]
    if args.kept_soak:
        print(f"\nthe rank stopped under {args.streams} streams: " + "; ".join(f"{x}: the {res[x]['kept']['restart']} restart "
              f"{res[x]['kept']['seconds']:.1f}s" for x in executors))
        print_soak(args, res, soaked)
        return
    print(f"\ndefault watchdog settings; loaded: {args.streams} streams; idle: frozen just after an idle canary")
    print(f"{'':52}" + "".join(f"{x:>10}" for x in executors))
    row("MTTD loaded: freeze -> hang confirmed (s)", lambda r: r["loaded"]["mttd"])
    row("MTTD idle (s)", lambda r: r["idle"]["mttd"])
    for kind, seconds in SLOW:
        what = {"long-step": "long step", "compile": "compile on one rank", "starved": "worker starved to 1 % of a core"}[kind]
        row(f"{what} {seconds:g}s under load: restarts", lambda r, k=kind: r[k]["restarts"], "{:10d}")
        row("  decisions (canary, restart, alert)", lambda r, k=kind: r[k]["decisions"], "{:10d}")
    row("engine start: fresh up on a clean cluster (s)", lambda r: r["start"])
    row("restart, loaded: decision -> restart done (s)", lambda r: r["loaded"]["restart"])
    row("restart, idle (s)", lambda r: r["idle"]["restart"])
    row("overhead loaded: restart - engine start (s)", lambda r: r["loaded"]["restart"] - r["start"])
    row("overhead idle (s)", lambda r: r["idle"]["restart"] - r["start"])
    row("overhead loaded, engine's own start taken out (s)", lambda r: ours(r["loaded"]["phases"]) - ours(r["start phases"]))
    row("overhead idle, engine's own start taken out (s)", lambda r: ours(r["idle"]["phases"]) - ours(r["start phases"]))
    row("MTTR loaded: freeze -> completion OK (s)", lambda r: r["loaded"]["mttr"])
    row("MTTR idle (s)", lambda r: r["idle"]["mttr"])
    print_soak(args, res, soaked)
    for x in executors:
        r = res[x]
        names = list(dict.fromkeys(["incident-bundle", "kill", *r["start phases"], *r["loaded"]["phases"]]))
        print(f"\n{x}: where the time goes (s)\n{'part':40}{'fresh up':>10}{'loaded':>10}{'idle':>10}")
        for n in names:
            cells = [r["start phases"].get(n), r["loaded"]["phases"].get(n), r["idle"]["phases"].get(n)]
            print(f"{n:40}" + "".join(f"{c:10.2f}" if c is not None else f"{'-':>10}" for c in cells))


def print_soak(args, res: dict, soaked: list[str]) -> None:
    if not soaked:
        return
    print(f"\nsoak: {args.soak_minutes:g} min, {args.soak_streams} long-prompt streams + 2 short clients, no fault")
    print(f"{'':52}" + "".join(f"{x:>10}" for x in soaked))
    for k in ("restarts", "suspect", "canaries", "failed canaries", "requests", "longest step"):
        print(f"{'  ' + k + (' gap between two engine steps (s)' if k == 'longest step' else ''):52}" +
              "".join(f"{res[x]['soak'][k]:10.1f}" if k == "longest step" else f"{res[x]['soak'][k]:10d}" for x in soaked))


if __name__ == "__main__":
    main()
