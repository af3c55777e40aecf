"""The local simulated cluster is real in every part but the GPU: these tests prove it.

Needs root, docker.io, openssh-server, mmdebstrap, iproute2, iptables (`.ci/run` installs them).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from spark_cluster.errors import CommandTimeout, SparkClusterError
from spark_cluster.executor import Executor
from spark_cluster.sim import cluster
from spark_cluster.transport import Nodes

from .conftest import freeze, sim_docker, sim_variant

pytestmark = pytest.mark.cluster




def test_each_node_has_its_own_address_sshd_and_docker(sim, sim_cfg):
    with Nodes(sim_cfg) as nodes:
        res = nodes.map(lambda t: t.run("hostname; ip -4 -o addr show eth0; docker info --format '{{.Name}} {{.ID}}'").check()).values_or_raise()
    seen_ids = set()
    for node in sim[:2]:  # the config's two (the session's cluster may have four)
        out = res[node.name].stdout
        assert out.splitlines()[0] == node.name
        assert f"inet {node.ip}/24" in out
        name, daemon_id = out.splitlines()[-1].split()
        assert name == node.name
        seen_ids.add(daemon_id)
    assert len(seen_ids) == 2  # one Docker daemon per node


def test_same_image_id_on_every_node(sim, sim_image):
    ids = {n.name: sim_docker(n.name, "image", "inspect", "--format", "{{.Id}}", sim_image.tag).stdout.strip() for n in sim}
    assert set(ids.values()) == {sim_image.image_id}


def test_swappiness_is_node_private(sim, sim_cfg):
    host_before = Path("/proc/sys/vm/swappiness").read_text()
    with Nodes(sim_cfg) as nodes:
        before = nodes["sim-2"].run("cat /proc/sys/vm/swappiness").stdout
        nodes["sim-1"].run("sysctl -q -w vm.swappiness=7").check()
        try:
            assert nodes["sim-1"].run("sysctl -n vm.swappiness").stdout.strip() == "7"
            assert nodes["sim-2"].run("cat /proc/sys/vm/swappiness").stdout == before
            assert Path("/proc/sys/vm/swappiness").read_text() == host_before
        finally:
            nodes["sim-1"].run("sysctl -q -w vm.swappiness=1").check()


def test_traffic_is_confined_to_the_simulated_subnet(sim):
    # checked on the rules, not by sending traffic anywhere else
    for node in sim:
        rules = subprocess.run(["ip", "netns", "exec", node.netns, "iptables", "-S", "OUTPUT"],
                               capture_output=True, text=True, check=True).stdout
        assert f"-A OUTPUT ! -d {cluster.SUBNET} -o eth0 -j REJECT" in rules
        routes = subprocess.run(["ip", "netns", "exec", node.netns, "ip", "route"], capture_output=True, text=True, check=True).stdout
        assert f"default via {cluster.GATEWAY_IP}" in routes


def test_host_keys_are_checked_strictly(sim, sim_cfg, tmp_path):
    """A known_hosts without the node's key is refused: the controller never trusts silently."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    cfg = sim_variant(**{"ssh.known_hosts": str(empty)})
    with Nodes(cfg) as nodes, pytest.raises(SparkClusterError, match="not in .*known_hosts. Refusing"):
        nodes["sim-1"].run("true")


def test_ray_path_forms_a_cluster_worker_first(sim):
    """The card's Ray path up to Ray itself: worker container first, then the head; Ray then shows
    every node alive with the resource vLLM will place its ranks on."""
    cfg = sim_variant(**{"health.ray_join_timeout_s": 120})
    events = []
    with Nodes(cfg) as nodes:
        ex = Executor(cfg, nodes, events.append)
        ex.down()  # from nothing (an earlier test may leave its group running)
        try:
            ex.up(stop_after="wait-ray")
            started = [e["step"] for e in events if e["event"] == "step-ok" and e["phase"] in ("start-workers", "start-head")]
            assert started == ["start-workers/sim-2/ray-worker", "start-head/sim-1/ray-head"]
            done = next(e for e in events if e["event"] == "step-ok" and e["phase"] == "wait-ray")
            assert done["alive"] == ["10.99.0.11", "10.99.0.12"] and done["resources"] == {"vllm_cpu": 2.0}
        finally:
            ex.down()
        left = nodes.map(lambda t: t.run("docker ps -aq; pgrep -f '[r]aylet|[g]cs_server' || true").stdout.strip()).values_or_raise()
        assert left == {"sim-1": "", "sim-2": ""}


@pytest.mark.remakes_sim
def test_down_leaves_nothing_even_without_state_then_comes_back(sim, sim_image):
    """Teardown works from the fixed names alone (as after a crashed run), then the sim returns."""
    from spark_cluster.sim import provision

    # a frozen container, as a run killed in the middle of a fault injection leaves it: its
    # processes ignore SIGKILL until thawed
    sim_docker("sim-2", "run", "-d", "--name", "frozen-leftover", "--network=host", "--entrypoint", "sleep", sim_image.tag, "600")
    freeze("sim-2", "frozen-leftover")
    cluster.state_file().unlink()  # as if the run that created it had been killed
    try:
        _check_down_leaves_nothing()
    finally:  # the other tests share this cluster: bring it back whatever happened
        nodes = cluster.up(len(sim))  # also removes containers the kept docker state remembers
        provision.provision(nodes, sim_image)
        sim[:] = nodes


def _check_down_leaves_nothing():
    cluster.down()
    assert [ns for ns in cluster.list_netns() if ns.startswith(cluster.NS_PREFIX)] == []
    procs = subprocess.run(["pgrep", "-af", "dockerd|containerd|sshd -D -e -f /var/lib/spark-cluster-sim"],
                           capture_output=True, text=True).stdout
    assert "spark-cluster-sim" not in procs and "dockerd --host unix:///run/docker.sock" not in procs
    assert "scsim" not in Path("/proc/mounts").read_text()
    assert not any(Path("/sys/fs/cgroup").glob(f"*/{cluster.NS_PREFIX}*"))
    assert subprocess.run(["ip", "link", "show", cluster.HOST_VETH], capture_output=True).returncode != 0


def test_a_command_past_its_timeout_keeps_its_output_and_is_ended_on_the_node(sim, sim_cfg):
    with Nodes(sim_cfg) as nodes:
        t = nodes["sim-2"]
        t0 = time.monotonic()
        with pytest.raises(CommandTimeout) as info:
            t.run("echo started; sleep 300; echo never", timeout=2)
        took = time.monotonic() - t0
        assert info.value.partial is not None and info.value.partial.stdout == "started\n"
        assert "did not finish within 2s" in str(info.value) and "started" in str(info.value)
        assert took < 30, f"the node should have ended it after 2 s (+5 s to SIGKILL): {took:.1f}s"
        # nothing of it lingers on the node
        assert t.run("pgrep -af '[s]leep 300' || true").stdout.strip() == ""
        # the connection is still good for the next command
        assert t.run("echo ok", timeout=10).stdout == "ok\n"
