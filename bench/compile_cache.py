"""What the compile cache saves a restart, on two simulated nodes (`spark-cluster sim up`) with
torch.compile on (configs/local-sim-compile.yaml): vLLM's CPU build traces the model and TorchInductor
compiles it (C++ by g++), into each node's cache folder.

In one run, for each executor: a first start with every node's cache folder empty (the cold
compile), then the watchdog's own restart (Ray: the kept one, the containers and Ray stay; native:
the full one, its containers are its ranks) twice, once finding the cache the first start sealed and
once with the cache taken away just before (as when an interrupted start's
files are set aside, or on a node that never had one). Printed side by side: each start's compile
(the ranks' warm-up for the compilation, vLLM's own lines), its whole engine start, and the
restarts' time from the decision (the call) to a completion served, with the ratios: compile warm /
cold (goal <= 0.25), restart warm / restart without its cache (goal <= 0.6).

    python -m bench.compile_cache [--executors ray,native] [--repeat N] [--env VLLM_USE_AOT_COMPILE=1]   (the config turns vLLM's AOT off)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from spark_cluster.caches import host_folder
from spark_cluster.config import parse_config
from spark_cluster.executor import Executor
from spark_cluster.sim import cluster
from spark_cluster.transport import Nodes
from spark_cluster.watch_restart import FullRestart, KeptRestart
from tests.cluster_helpers import compile_data, completion_works


def compile_cfg(tmp: Path, executor: str, env: dict[str, str]):
    data = compile_data(executor)
    data["state_dir"] = str(tmp / "state")
    data["container"]["env"].update(env)
    return parse_config(json.dumps(data))


def empty_caches(cfg) -> None:
    """Every node's cache folder emptied (the folder itself stays: running containers mount it)."""
    folder = host_folder(cfg)
    for n in cfg.nodes:
        cluster.node_exec(n.name, "sh", "-c", f"mkdir -p {folder} && find {folder} -mindepth 1 -delete", check=True, timeout=120)


def engine_figures(events: list[dict]) -> dict:
    [start] = [e for e in events if e["event"] == "engine-start"][-1:]
    return {"compile": start["figures"].get("compile"), "engine": round(sum(start["parts"].values()), 1)}


def first_start(cfg) -> dict:
    events: list[dict] = []
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).down(graceful=False)
        empty_caches(cfg)
        t = time.monotonic()
        Executor(cfg, nodes, events.append).up()
    return {**engine_figures(events), "seconds": round(time.monotonic() - t, 1)}


def restart(cfg, bundle: Path) -> dict:
    events: list[dict] = []

    def event(kind: str, **data) -> None:  # the restart's executor steps come as `executor` events: as `up` gives them
        if kind == "executor":
            kind = data.pop("step_event")
        events.append({"event": kind, **data})

    t = time.monotonic()
    with Nodes(cfg) as nodes:
        full = FullRestart(cfg, nodes, None, event)
        error, _ = (KeptRestart(cfg, nodes, None, event, full) if cfg.executor == "ray" else full).run(bundle)
    assert error is None, error
    while not completion_works(cfg):
        time.sleep(0.2)
    kind = "full" if cfg.executor != "ray" or any(e["event"] == "restart-fallback" for e in events) else "kept"
    return {**engine_figures(events), "seconds": round(time.monotonic() - t, 1), "kind": kind,
            "set aside": sum(e.get("files", 0) for e in events if e["event"] == "cache-set-aside")}


def median_run(runs: list[dict]) -> dict:
    """Each figure's median over the repeated restarts (the kind and the files set aside: every run's)."""
    out = {k: statistics.median(r[k] for r in runs) if all(r[k] is not None for r in runs) else None
           for k in ("compile", "engine", "seconds")}
    return {**out, "kind": "/".join(sorted({r["kind"] for r in runs})), "set aside": sum(r["set aside"] for r in runs)}


def measure(executor: str, env: dict[str, str], repeat: int) -> dict[str, dict]:
    tmp = Path(tempfile.mkdtemp(prefix=f"compile-cache-{executor}-"))
    cfg = compile_cfg(tmp, executor, env)
    runs = {"first start, cold": first_start(cfg)}
    print(f"{executor} first start: {runs['first start, cold']}", flush=True)
    warm, cold = [], []
    for i in range(repeat):  # the cache taken away is sealed again by the start without it: the next warm one finds it
        warm.append(restart(cfg, tmp / f"warm-{i}"))
        print(f"{executor} restart with the cache: {warm[-1]}", flush=True)
        empty_caches(cfg)
        cold.append(restart(cfg, tmp / f"cold-{i}"))
        print(f"{executor} restart without it: {cold[-1]}", flush=True)
    runs["restart, cache kept"], runs["restart, cache taken away"] = median_run(warm), median_run(cold)
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).down(graceful=False)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--executors", default="ray,native", help="Comma-separated: ray, native.")
    ap.add_argument("--repeat", type=int, default=1, help="Restarts of each kind (their medians printed): one run is noisy on 2 cores.")
    ap.add_argument("--env", action="append", default=[], help="K=V added to the containers' env (e.g. VLLM_USE_AOT_COMPILE=1)")
    args = ap.parse_args()
    env = dict(kv.split("=", 1) for kv in args.env)
    res = {x: measure(x, env, args.repeat) for x in args.executors.split(",")}
    print(f"\ntorch.compile on, two simulated nodes{' (' + ', '.join(args.env) + ')' if args.env else ''}"
          f"{f', the medians of {args.repeat} restarts of each kind' if args.repeat > 1 else ''}")
    for executor, runs in res.items():
        cols = list(runs)
        print(f"\n{executor:40}" + "".join(f"{c:>28}" for c in cols))
        for label, key in (("compile (s, the ranks' own lines)", "compile"), ("engine start (s, its log)", "engine"),
                           ("call -> a completion served (s)", "seconds")):
            print(f"{label:40}" + "".join(f"{runs[c][key]!s:>28}" for c in cols))
        warm, cold, first = runs["restart, cache kept"], runs["restart, cache taken away"], runs["first start, cold"]
        print(f"{'restart kind':40}{'-':>28}{warm['kind']:>28}{cold['kind']:>28}")
        if warm["compile"] and first["compile"]:
            print(f"compile with the cache / the first start's: {warm['compile'] / first['compile']:.2f} (goal <= 0.25)")
        print(f"restart with the cache / without it: {warm['seconds'] / cold['seconds']:.2f} (goal <= 0.6)")


if __name__ == "__main__":
    main()
