"""`logs` on the simulated cluster: one node's containers, an unknown node named, and --follow over every node."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from spark_cluster.cli import app
from spark_cluster.executor import Executor
from spark_cluster.transport import Nodes

from .conftest import ROOT, SIM_CONFIG

pytestmark = pytest.mark.cluster


def test_logs_command_shows_every_container(sim, sim_cfg):
    """Its containers are enough (Ray's, up to the head): an engine serving already is kept, and left
    serving for the next test."""
    with Nodes(sim_cfg) as nodes:
        Executor(sim_cfg, nodes).up(stop_after="start-head")
    res = CliRunner().invoke(app, ["logs", str(SIM_CONFIG), "sim-2", "--tail", "5"])
    assert res.exit_code == 0, res.output
    assert "== sim-2 spark-ray-worker (running)" in res.output
    res = CliRunner().invoke(app, ["logs", str(SIM_CONFIG), "sim-9"])
    assert res.exit_code == 2 and "no node 'sim-9'" in res.output
    # --follow follows every container of every node at once, each line saying where it is from
    proc = subprocess.Popen([sys.executable, "-m", "spark_cluster", "logs", str(SIM_CONFIG), "-f", "--tail", "3"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    try:
        while seen != {"sim-1/spark-ray-head", "sim-2/spark-ray-worker"} and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if " | " in line:
                seen.add(line.split(" | ", 1)[0])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert seen == {"sim-1/spark-ray-head", "sim-2/spark-ray-worker"}
