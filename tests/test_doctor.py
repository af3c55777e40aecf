"""`doctor`, the link gate and `nccl: auto` on the simulated cluster: real SSH, real pings over the
simulated nodes' links, a real MTU lowered on a node's interface."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from spark_cluster.config import load_config, parse_config
from spark_cluster.errors import PreflightError
from spark_cluster.executor import Executor
from spark_cluster.kept import links as kept_links
from spark_cluster.plan import build_plan
from spark_cluster.transport import Nodes

from .conftest import SIM_CONFIG, SIM_CONFIGS, own_state, run_cli
from .cluster_helpers import containers

pytestmark = pytest.mark.cluster


def write(tmp_path, data: dict, *, check_flags: bool = False) -> str:
    """data as tmp_path/cluster.yaml with its own state_dir; the image's vLLM flag check only where asked
    (the first test's, one per executor)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(own_state(data, tmp_path / "state", check_flags=check_flags)))
    return str(path)


def sim_data() -> dict:
    return yaml.safe_load(SIM_CONFIG.read_text())


def test_doctor_passes_and_nccl_auto_finds_the_sims_own_environment(sim, sim_cfg, tmp_path):
    for executor, config in SIM_CONFIGS.items():  # both executors' plans (their ports and flags differ)
        r = run_cli("doctor", write(tmp_path / executor, yaml.safe_load(config.read_text()), check_flags=True))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "reaches sim-2 at 10.99.0.12" in r.stdout and "over eth0, MTU 1500 unfragmented" in r.stdout and "`up` would pass" in r.stdout

    data = sim_data()
    data["nccl"] = "auto"  # in place of the hand-written interface names
    del data["container"]["env"]["GLOO_SOCKET_IFNAME"]
    path = write(tmp_path, data)
    r = run_cli("doctor", path, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    found = {f["check"]: f for f in json.loads(r.stdout)}
    assert found["preflight/sim-2/link"]["note"] == "eth0 (MTU 1500); no RDMA devices: NCCL over TCP"
    auto = load_config(path)
    links = kept_links(auto)
    assert set(links) == {"sim-1", "sim-2"}
    # the containers `up` would start are the hand-written config's, to the spec hash
    assert [(c.env, c.labels) for c in build_plan(auto, links=links).containers()] == \
           [(c.env, c.labels) for c in build_plan(sim_cfg).containers()]
    shown = run_cli("plan", path)
    assert shown.returncode == 0 and "NCCL_SOCKET_IFNAME=eth0" in shown.stdout and "<auto" not in shown.stdout


def refused_before_anything_starts(cfg, path: str, words: list[str]) -> None:
    """doctor exits 8 and up raises PreflightError, both naming what is wrong, and no container runs."""
    r = run_cli("doctor", path, "--json")
    assert r.returncode == 8, r.stdout + r.stderr
    problems = " | ".join(f"{f['node']}: {f['problem']}" for f in json.loads(r.stdout) if f["problem"])
    with Nodes(cfg) as nodes, pytest.raises(PreflightError) as info:
        Executor(cfg, nodes).up()
    for w in words:
        assert w in str(info.value), str(info.value)
        assert w in problems, problems
    assert containers(cfg) == {"sim-1": {}, "sim-2": {}}


def test_a_lowered_mtu_on_the_worker_stops_doctor_and_up_before_anything_starts(sim, sim_cfg, tmp_path):
    with Nodes(sim_cfg) as nodes:
        Executor(sim_cfg, nodes).down()
    mtu = ["ip", "netns", "exec", "scsim-sim-2", "ip", "link", "set", "eth0", "mtu"]
    subprocess.run([*mtu, "1400"], check=True)
    try:
        path = write(tmp_path, sim_data())
        refused_before_anything_starts(load_config(path), path, [
            "sim-1: link eth0 to sim-2: sim-1 reaches sim-2 (10.99.0.12) with small packets but not with 1500-byte packets",
            "set the same MTU on every end of the link"])
        # told the link's MTU, the worker's own side is refused by its kernel: named from sim-2 too
        data = sim_data()
        data["link"] = {"mtu": 1500}
        path = write(tmp_path, data)
        refused_before_anything_starts(load_config(path), path, ["sim-2: link eth0 to sim-1: the path from sim-2 to sim-1 (10.99.0.11) has MTU 1400"])
    finally:
        subprocess.run([*mtu, "1500"], check=True)


def test_an_unreachable_cluster_address_stops_doctor_and_up_before_anything_starts(sim, sim_cfg, tmp_path):
    with Nodes(sim_cfg) as nodes:
        Executor(sim_cfg, nodes).down()
    data = sim_data()
    data["nodes"][1]["address"] = "10.99.0.99"  # SSH still reaches sim-2 (its host); nothing holds this address
    path = write(tmp_path, data)
    cfg = parse_config(yaml.safe_dump({**data, "state_dir": str(tmp_path / "state")}))
    refused_before_anything_starts(cfg, path, ["sim-1: link eth0 to sim-2: sim-1 cannot reach sim-2 at 10.99.0.99 over the cluster link"])


def test_the_bandwidth_test_runs_across_the_nodes_and_prints_a_figure(sim, sim_cfg, tmp_path):
    data = sim_data()
    data["link"] = {"check": "bandwidth", "min_gbits": 0.01}  # Gloo on 2 shared cores: a figure, not a RoCE one
    r = run_cli("doctor", write(tmp_path, data), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    found = {f["check"]: f for f in json.loads(r.stdout)}
    note = found["preflight/sim-1/bandwidth"]["note"]
    assert note.startswith("all-reduce bus bandwidth ") and "Gloo on CPU" in note, note
    gbits = float(note.split()[3])
    print(f"\nsimulated link, all-reduce over Gloo: {gbits} Gb/s")
    assert gbits > 0.01 and found["preflight/sim-2/bandwidth"]["ok"]


def test_the_spark_checks_run_on_every_node_and_say_why_they_do_not_apply_without_a_gpu(sim, sim_cfg, tmp_path):
    r = run_cli("doctor", write(tmp_path, sim_data()), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    found = {f["check"]: f for f in json.loads(r.stdout)}
    for node in ("sim-1", "sim-2"):
        said = {what: found[f"preflight/{node}/{what}"] for what in ("kernel", "cma", "driver", "heat", "gdr", "memory-ceiling")}
        assert all(f["ok"] and not f["warning"] for f in said.values()), said
        assert said["driver"]["note"] == "not applicable: no GPU (no NVIDIA driver)"
        assert said["heat"]["note"] == "not applicable: no GPU (no nvidia-smi)"
        assert said["gdr"]["note"] == "not applicable: no GPU"
        assert said["memory-ceiling"]["note"].startswith("no GPU: the CPU build's figure, ")
        assert said["kernel"]["note"] and said["cma"]["note"]


def test_a_node_with_another_driver_or_a_utilization_above_the_ceiling_stops_up_before_anything_starts(sim, sim_cfg, tmp_path):
    from spark_cluster.sim.cluster import set_driver

    with Nodes(sim_cfg) as nodes:
        Executor(sim_cfg, nodes).down()
    set_driver("sim-1", "580.142")  # versions of recorded Sparks (tests/data/facts/driver-*)
    set_driver("sim-2", "580.126.09")
    try:
        path = write(tmp_path / "drivers", sim_data())
        refused_before_anything_starts(load_config(path), path, ["the NVIDIA driver differs between nodes (sim-1 580.142, sim-2 580.126.09)"])
        set_driver("sim-2", "580.142")
        r = run_cli("doctor", path, "--json")
        found = {f["check"]: f for f in json.loads(r.stdout)}
        assert found["preflight/sim-2/driver"]["note"] == "580.142 (open kernel module)" and r.returncode == 0, r.stdout + r.stderr
    finally:
        set_driver("sim-1", None)
        set_driver("sim-2", None)
    # what the CPU build of vLLM can allocate on this machine now, then a utilization above it
    r = run_cli("doctor", write(tmp_path / "measure", sim_data()), "--json")
    note = {f["check"]: f for f in json.loads(r.stdout)}["preflight/sim-1/memory-ceiling"]["note"]
    highest = float(note.rsplit("up to ", 1)[1].split()[0])
    data = sim_data()
    data["vllm"]["gpu_memory_utilization"] = min(0.99, round(highest + 0.1, 2))
    data["memory"]["override_cap"] = True  # above the 0.85 cap for unified memory, on purpose
    path = write(tmp_path / "greedy", data)
    refused_before_anything_starts(load_config(path), path, [f"gpu_memory_utilization {data['vllm']['gpu_memory_utilization']:g} asks for",
                                                             "The highest value that would start is 0."])
