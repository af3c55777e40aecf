"""`sim up` refuses clearly, before touching anything, when it cannot work."""

from __future__ import annotations

from typer.testing import CliRunner

from spark_cluster.cli import app
from spark_cluster.sim import cluster


def test_refuses_when_not_root(monkeypatch):
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 1000)
    called = []
    monkeypatch.setattr(cluster, "_network", lambda *a: called.append(a))
    res = CliRunner().invoke(app, ["sim", "up", "--no-image"])
    assert res.exit_code == 4 and "needs root" in res.output and called == []


def test_names_the_packages_to_install(monkeypatch):
    """Only the missing tools are named (every other tool is there, whatever this machine has)."""
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(cluster.shutil, "which", lambda t: None if t in ("mmdebstrap", "dockerd") else f"/usr/bin/{t}")
    res = CliRunner().invoke(app, ["sim", "up", "--no-image"])
    assert res.exit_code == 4
    assert "missing tools for the simulated cluster: docker.io, mmdebstrap" in res.output
    assert "apt-get install -y docker.io mmdebstrap" in res.output


def test_down_never_signals_a_pid_reused_by_another_process(tmp_path):
    """The state file names the PIDs of a run that may be long gone: a PID now held by an
    unrelated process (here a `sleep`) is not the node's, and `sim down` must leave it alone."""
    import subprocess

    stranger = subprocess.Popen(["sleep", "60"])
    try:
        node = cluster.SimNode("sim-1", "10.99.0.11", "spark-sim-sim-1", str(tmp_path / "sim-1"), pid=stranger.pid)
        assert cluster.node_pids(node) == []
        # and the node's own init is recognised by its argv
        argv = ["python3", "/x/spark_cluster/sim/node_init.py", str(node.path), "sim-1", "10.99.0.11", "/spark-sim-sim-1"]
        assert cluster.is_node_cmdline(argv, node) and not cluster.is_node_cmdline(["sleep", "60"], node)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
