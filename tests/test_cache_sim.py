"""Sealed caches on the simulated cluster: real Docker on each node, the cache script in throwaway
containers of the image, root's files, the copier over the cluster link. The simulated image's
engine writes no compile cache of its own (torch.compile is off in it), so the cache is seeded as
kernels a ready engine left, then broken as an interrupted start leaves it."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml

from spark_cluster.caches import host_folder
from spark_cluster.config import parse_config
from spark_cluster.executor import Executor
from spark_cluster.plan import build_plan
from spark_cluster.render import read_template
from spark_cluster.sim import cluster
from spark_cluster.status import cache_lines
from spark_cluster.transport import Nodes

from .cluster_helpers import completion_works
from .conftest import SIM_CONFIGS, kill_vllm_api, run_cli

pytestmark = pytest.mark.cluster


def sh(node: str, command: str) -> str:
    return cluster.node_exec(node, "sh", "-c", command, timeout=60).stdout


def seal(cfg, node: str) -> None:
    """The plan's own seal step on one node (what `up` runs once an engine is ready)."""
    [step] = [s for s in build_plan(cfg).steps if s.id == f"seal/{node}"]
    with Nodes(cfg) as nodes:
        nodes[node].run(step.command, input=read_template(step.stdin).encode(), timeout=step.timeout_s).check()


def test_an_interrupted_starts_files_are_set_aside_the_engine_serves_and_sync_gives_a_fresh_node_the_sealed_cache(sim, tmp_path):
    data = yaml.safe_load(SIM_CONFIGS["ray"].read_text())
    data["state_dir"] = str(tmp_path / "state")
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = parse_config(config.read_text())
    folder = host_folder(cfg)
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).up()
    # emptied, not removed: the running containers have the folder itself mounted
    empty = f"mkdir -p {folder} && find {folder} -mindepth 1 -delete"
    sh("sim-1", f"{empty} && mkdir -p {folder}/triton/k1 {folder}/vllm/torch_compile_cache && "
                f"head -c 300000 /dev/urandom > {folder}/triton/k1/kernel.so && echo 'def f(): pass' > {folder}/vllm/torch_compile_cache/g.py")
    sh("sim-2", empty)  # a fresh node: no cache at all
    seal(cfg, "sim-1")
    # what a start killed during a compile leaves: an object emptied, one half-written and unknown to the seal
    sh("sim-1", f": > {folder}/vllm/torch_compile_cache/g.py && mkdir -p {folder}/torchinductor && "
                f"head -c 1000 /dev/urandom > {folder}/torchinductor/half.so")

    kill_vllm_api(cfg)  # the next engine start: in the kept head container
    events: list[dict] = []
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes, events.append).up()
    assert completion_works(cfg)  # the engine serves
    [aside] = [e for e in events if e["event"] == "cache-set-aside"]
    print(aside["message"])
    assert aside["node"] == "sim-1" and aside["files"] == 2 and "torchinductor/half.so" in aside["message"]
    assert "vllm/torch_compile_cache/g.py" in aside["message"] and "kept, not deleted" in aside["message"]
    moved = sh("sim-1", f"cd {cfg.cache.path}/{cfg.name}/{aside['to']} && find . -type f | sort").split()
    assert moved == ["./torchinductor/half.so", "./vllm/torch_compile_cache/g.py"]  # moved, never deleted
    kept = sh("sim-1", f"cd {folder} && find . -type f ! -name '.spark-cluster-seal.json' | sort").split()
    assert "./triton/k1/kernel.so" in kept and not {"./torchinductor/half.so", "./vllm/torch_compile_cache/g.py"} & set(kept)
    sealed = json.loads(sh("sim-1", f"cat {folder}/.spark-cluster-seal.json"))["files"]
    assert sorted(f"./{p}" for p in sealed) == kept  # sealed again once the engine was ready, with what it wrote (vLLM's modelinfos)

    synced = run_cli("sync", str(config), "--json", timeout=300)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    kinds = [json.loads(line) for line in synced.stdout.splitlines() if line.startswith("{")]
    [done] = [e for e in kinds if e["event"] == "cache-synced"]
    assert (done["source"], done["target"], done["files"], done["set_aside"]) == ("sim-1", "sim-2", len(sealed), 0) and done["copied"] >= 1
    assert sh("sim-1", f"sha256sum {folder}/triton/k1/kernel.so").split()[0] == sh("sim-2", f"sha256sum {folder}/triton/k1/kernel.so").split()[0]
    assert cache_lines(cfg)[1].startswith("sim-2 warm ") and f" in {len(sealed)} file(s), sealed " in cache_lines(cfg)[1]
    again = run_cli("sync", str(config), "--json", timeout=300)  # nothing more to copy
    assert '"why": "every node has sim-1\'s sealed cache"' in again.stdout, again.stdout

    kill_vllm_api(cfg)  # sim-2's next start finds its adopted cache sealed: nothing set aside
    events.clear()
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes, events.append).up()
    assert not [e for e in events if e["event"] == "cache-set-aside"]
    assert {e["node"]: e["cache"] for e in events if e["event"] == "step-ok" and e.get("phase") == "cache"} == {"sim-1": "warm", "sim-2": "warm"}
    assert httpx.get(f"{cfg.endpoint()}/health", timeout=10).status_code == 200
