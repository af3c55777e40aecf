"""Sealed caches on the simulated cluster with torch.compile on (configs/local-sim-compile.yaml): real
Docker on each node, vLLM's CPU build compiling the model with TorchInductor into each node's cache
folder, the cache script in throwaway containers of the image, root's files, the copier over the
cluster link."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import yaml

from spark_cluster.caches import host_folder
from spark_cluster.config import parse_config
from spark_cluster.errors import SparkClusterError
from spark_cluster.executor import Executor
from spark_cluster.sim import cluster
from spark_cluster.status import cache_lines
from spark_cluster.transport import Nodes

from .cluster_helpers import compile_data, completion_works
from .conftest import RAY_IN_SUITE, kill_vllm_api, own_state, run_cli

pytestmark = pytest.mark.cluster

SEAL = ".spark-cluster-seal.json"
COMPILED = ("./torchinductor/", "./vllm/torch_compile_cache/")  # what the compile writes


def sh(node: str, command: str) -> str:
    return cluster.node_exec(node, "sh", "-c", command, timeout=60).stdout


def cached(node: str, folder: str) -> list[str]:
    """The files in a node's cache folder (its seal aside), as ./relative paths, sorted."""
    return sh(node, f"cd {folder} && find . -type f ! -name {SEAL} | sort").split()


def up(cfg, events: list[dict]) -> dict:
    """`up`, its events into events; the engine start's figures (its `engine-start` event)."""
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes, events.append).up()
    [start] = [e for e in events if e["event"] == "engine-start"]
    return start["figures"]


def killed_while_compiling(cfg, folder: str) -> None:
    """`up` from nothing, its engine killed once the compile has begun writing on the head node (Inductor's
    own cache; with vLLM's AOT compile, its torch_compile_cache)."""
    failed: list[Exception] = []

    def start() -> None:
        try:
            with Nodes(cfg) as nodes:
                Executor(cfg, nodes).up()
        except SparkClusterError as exc:
            failed.append(exc)

    t = threading.Thread(target=start)
    t.start()
    try:
        deadline = time.monotonic() + 400
        while not sh("sim-1", f"find {folder}/torchinductor {folder}/vllm/torch_compile_cache -type f 2>/dev/null | head -1").strip():
            assert t.is_alive() and time.monotonic() < deadline, "the engine never began compiling"
            time.sleep(0.5)
        time.sleep(2)
        kill_vllm_api(cfg)
    finally:
        t.join(timeout=600)
    assert failed, "up went on after its engine was killed"


@pytest.mark.ends_engine
@pytest.mark.parametrize("executor", RAY_IN_SUITE)
def test_a_start_killed_in_its_compile_is_set_aside_the_next_serves_and_a_node_given_the_sealed_cache_compiles_from_it(sim, tmp_path, executor):
    data = own_state(compile_data(executor), tmp_path / "state")
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = parse_config(config.read_text())
    folder = host_folder(cfg)
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).down(graceful=False)  # a start from nothing
    for node in ("sim-1", "sim-2"):
        sh(node, f"mkdir -p {folder} && find {folder} -mindepth 1 -delete")

    killed_while_compiling(cfg, folder)
    left = cached("sim-1", folder)
    assert any(f.startswith(COMPILED) for f in left) and not sh("sim-1", f"ls -a {folder}").count(SEAL)

    events: list[dict] = []
    cold = up(cfg, events)  # finds what the killed start left, unsealed: every file of it set aside
    assert completion_works(cfg)
    aside = {e["node"]: e for e in events if e["event"] == "cache-set-aside"}
    print({n: (e["files"], e["message"]) for n, e in aside.items()}, cold)
    assert "sim-1" in aside and "kept, not deleted" in aside["sim-1"]["message"]
    moved = sh("sim-1", f"cd {cfg.cache.path}/{cfg.name}/{aside['sim-1']['to']} && find . -type f | sort").split()
    assert len(moved) == aside["sim-1"]["files"] and set(left) <= set(moved)  # moved, never deleted
    now = cached("sim-1", folder)
    sealed = json.loads(sh("sim-1", f"cat {folder}/{SEAL}"))["files"]
    assert sorted(f"./{p}" for p in sealed) == now and any(f.endswith(".so") for f in now)  # the compile sealed once ready

    sh("sim-2", f"find {folder} -mindepth 1 -delete")  # a fresh node: no cache at all
    synced = run_cli("sync", str(config), "--json", timeout=300)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    [done] = [json.loads(line) for line in synced.stdout.splitlines() if line.startswith("{") and '"cache-synced"' in line]
    assert (done["source"], done["target"], done["files"], done["set_aside"]) == ("sim-1", "sim-2", len(sealed), 0) and done["copied"] >= 1
    assert cached("sim-2", folder) == now
    biggest = sh("sim-1", f"cd {folder} && find . -type f ! -name {SEAL} -printf '%s %p\n' | sort -n | tail -1").split()[1]
    assert sh("sim-1", f"sha256sum {folder}/{biggest}").split()[0] == sh("sim-2", f"sha256sum {folder}/{biggest}").split()[0]
    assert cache_lines(cfg)[1].startswith("sim-2 warm ") and f" in {len(sealed)} file(s), sealed " in cache_lines(cfg)[1]
    again = run_cli("sync", str(config), "--json", timeout=300)  # nothing more to copy
    assert '"why": "every node has sim-1\'s sealed cache"' in again.stdout, again.stdout

    damaged = next(f for f in now if f.startswith(COMPILED) and f.endswith(".so"))
    sh("sim-1", f": > {folder}/{damaged}")  # an object emptied since the seal, as an interrupted write leaves it
    kill_vllm_api(cfg)  # the next engine start (Ray: in the kept head container)
    events.clear()
    warm = up(cfg, events)
    assert completion_works(cfg)
    [aside] = [e for e in events if e["event"] == "cache-set-aside"]  # the damaged object alone; sim-2's adopted cache is sealed
    assert (aside["node"], aside["files"]) == ("sim-1", 1) and damaged[2:] in aside["message"]
    assert {e["node"]: e["cache"] for e in events if e["event"] == "step-ok" and e.get("phase") == "cache"} == {"sim-1": "warm", "sim-2": "warm"}
    print(f"compile: cold {cold['compile']} s, after sync {warm['compile']} s")
    assert warm["compile"] <= 0.5 * cold["compile"], (cold, warm)  # sim-2's rank compiled from the cache it was given
    assert httpx.get(f"{cfg.endpoint()}/health", timeout=10).status_code == 200
