#!/usr/bin/env python3
"""Benchmark: prefix affinity across two groups behind one gateway, on four simulated nodes.

configs/local-sim-2groups.yaml (two groups of TP=2), on each executor: both groups up, then for each routing
mode (prefix affinity on, then plain least-outstanding routing) a controller is started and a
multi-turn chat load goes through its gateway: `--clients` conversations at once, each `--turns`
turns, each turn resending the whole conversation so far (its earlier prompts and the model's
answers) plus a new question of fresh random words. Each mode gets conversations of its own (no
cache of the other mode's text helps it).

Both groups get a few requests of their own first (a fresh engine's first requests are slow, and
the first mode would pay for them alone). Printed side by side: vLLM's own prefix-cache counters of
both groups over the run (hits / queried tokens), the share of later turns' prompt tokens that came
from the cache (each answer's usage, `--enable-prompt-tokens-details`) and how many later turns
found nothing cached, the mean time to first token of turn 1 and of later turns, the requests each
group took (affinity must not leave a group idle while the other queues) and the gateway's routing
counts.

Usage (root; `spark-cluster sim up --nodes 4` first):
    python -m bench.affinity_bench [--clients 6] [--turns 6] [--executors ray,native]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml


from bench.groups_failover import TOKEN, down_all, layout_cfg, up_all
from spark_cluster.config import parse_config
from spark_cluster.metrics import samples
from tests.loadgen import random_prompt

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Turn:
    turn: int
    ttft: float
    prompt_tokens: int
    cached_tokens: int


def cache_counters(cfg) -> dict[str, tuple[float, float]]:
    """Each group's vLLM prefix-cache counters: (hit tokens, queried tokens)."""
    out = {}
    for label, group in cfg.group_configs():
        text = httpx.get(f"{group.endpoint()}/metrics", timeout=10).text
        total = {}
        for name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries"):
            total[name] = sum(v for n in (name, name + "_total") for _, v in samples(text, n))
        out[label] = (total["vllm:prefix_cache_hits"], total["vllm:prefix_cache_queries"])
    return out


def warm_up(cfg, rng: random.Random, n: int = 4) -> None:
    """A few requests to each group's engine at once, before the first mode: a fresh engine's first
    requests are slow, which the first mode would pay alone (random words: no cache helps later)."""
    def one(url: str) -> None:
        httpx.post(f"{url}/v1/completions", json={"model": cfg.model.name, "prompt": random_prompt(60, rng), "max_tokens": 8},
                   timeout=httpx.Timeout(10, read=300)).raise_for_status()
    threads = [threading.Thread(target=one, args=(group.endpoint(),)) for _, group in cfg.group_configs() for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def conversation(url: str, model: str, turns: int, rng: random.Random, seen: list, errors: list) -> None:
    """One chat through the gateway: each turn sends everything so far plus a new question, streamed:
    its time to first token, and from the last chunk's usage how many of its prompt tokens came from
    the cache (vLLM's `--enable-prompt-tokens-details`)."""
    text = f"A conversation about {random_prompt(40, rng)}.\n"
    for turn in range(turns):
        text += f"\nUser: {random_prompt(60, rng)}?\nAssistant:"
        body = {"model": model, "prompt": text, "max_tokens": 24, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        t0 = time.monotonic()
        first, answer, usage = None, [], None
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=httpx.Timeout(10, read=300)) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    if chunk.get("choices"):
                        first = first or time.monotonic()
                        answer.append(chunk["choices"][0].get("text", ""))
        except httpx.HTTPError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            return
        if first is None:
            errors.append(f"turn {turn}: no token")
            return
        details = (usage or {}).get("prompt_tokens_details") or {}
        seen.append(Turn(turn, first - t0, (usage or {}).get("prompt_tokens", 0), details.get("cached_tokens") or 0))
        text += "".join(answer)


def run_mode(path: Path, cfg, affinity: bool, args, seed: int) -> dict:
    data = yaml.safe_load(path.read_text())
    data["gateway"]["prefix_affinity"] = affinity
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "SPARK_CLUSTER_BENCH_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "spark_cluster", "controller", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{cfg.controller_url()}/healthz", timeout=2).json().get("gateway", {}).get("door") == "open":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the controller did not open its door"
            time.sleep(0.5)
        before = cache_counters(cfg)
        seen: list[Turn] = []
        errors: list = []
        threads = [threading.Thread(target=conversation, args=(cfg.gateway_url(), cfg.model.name, args.turns, random.Random(seed + i),
                                                               seen, errors)) for i in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - t0
        after = cache_counters(cfg)
        metrics = httpx.get(f"{cfg.controller_url()}/metrics", timeout=10).text
        routed = {(s["group"], s["how"]): v for s, v in samples(metrics, "spark_cluster_gateway_routed_total")}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    hits = sum(after[g][0] - before[g][0] for g in after)
    queried = sum(after[g][1] - before[g][1] for g in after)
    later = [t for t in seen if t.turn > 0]
    return {
        "hit_rate": hits / queried if queried else float("nan"),
        "later_cached": sum(t.cached_tokens for t in later) / max(1, sum(t.prompt_tokens for t in later)),
        "later_cold": sum(t.cached_tokens == 0 for t in later), "later": len(later),
        "ttft_first": statistics.mean(t.ttft for t in seen if t.turn == 0),
        "ttft_later": statistics.mean(t.ttft for t in later),
        "per_group": {g: sum(v for (gg, _), v in routed.items() if gg == g) for g in after},
        "routed": {how: sum(v for (_, h), v in routed.items() if h == how) for how in ("affinity", "overflow", "least")},
        "errors": errors, "seconds": took,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=6, help="Conversations at once.")
    ap.add_argument("--turns", type=int, default=6, help="Turns per conversation.")
    ap.add_argument("--executors", default="ray,native", help="Comma-separated: ray, native.")
    args = ap.parse_args()
    results = {}
    for executor in args.executors.split(","):
        path, cfg = layout_cfg("two groups", executor, Path(tempfile.mkdtemp(prefix="affinity-bench-")))
        data = yaml.safe_load(path.read_text())  # each answer's usage says how many of its prompt tokens were cached
        data["vllm"]["extra_args"] = [*data["vllm"].get("extra_args", []), "--enable-prompt-tokens-details"]
        path.write_text(yaml.safe_dump(data))
        cfg = parse_config(path.read_text())
        print(f"up: two groups of TP=2 ({executor}) ...", flush=True)
        up_all(cfg)
        try:
            seed = 1000 * len(results)  # every run's conversations are its own: no cache of another run helps it
            warm_up(cfg, random.Random(seed + 900))
            results[(executor, "affinity")] = run_mode(path, cfg, True, args, seed + 1)
            results[(executor, "least outstanding")] = run_mode(path, cfg, False, args, seed + 500)
        finally:
            down_all(cfg)
    print(f"\n{args.clients} conversations x {args.turns} turns, two groups of TP=2, simulated nodes")
    print(f"{'':34}" + "".join(f"{x + ' ' + mode:>26}" for x, mode in results))
    rows = [("prefix cache hit rate (vLLM)", lambda r: f"{r['hit_rate']:.1%}"),
            ("later turns: prompt tokens cached", lambda r: f"{r['later_cached']:.1%}"),
            ("later turns with nothing cached", lambda r: f"{r['later_cold']} of {r['later']}"),
            ("mean TTFT, turn 1 (s)", lambda r: f"{r['ttft_first']:.3f}"),
            ("mean TTFT, later turns (s)", lambda r: f"{r['ttft_later']:.3f}"),
            ("requests per group", lambda r: " / ".join(f"{g} {int(v)}" for g, v in r["per_group"].items())),
            ("routed affinity/overflow/least", lambda r: "/".join(str(int(r["routed"][h])) for h in ("affinity", "overflow", "least"))),
            ("errors", lambda r: str(len(r["errors"]))),
            ("seconds", lambda r: f"{r['seconds']:.1f}")]
    for name, fmt in rows:
        print(f"{name:34}" + "".join(f"{fmt(r):>26}" for r in results.values()))
    for executor in args.executors.split(","):
        a, b = results[(executor, "affinity")], results[(executor, "least outstanding")]
        print(f"{executor}: later turns' TTFT, affinity / least outstanding: {a['ttft_later'] / b['ttft_later']:.2f}")


if __name__ == "__main__":
    main()
