"""`status` on the simulated cluster: serving, down (node named), stalled (paused worker, /health 200)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from spark_cluster.executor import Executor
from spark_cluster.status import status
from spark_cluster.transport import Nodes

from .conftest import ROOT, freeze, group_containers, sim_docker, worker_container
from .cluster_helpers import stream_load

pytestmark = pytest.mark.cluster
RECORD = ROOT / "tests" / "data" / "observations"


def record(name: str, rep) -> None:
    """Keep real observations for the verdict's table-driven tests (RECORD_OBSERVATIONS=1)."""
    import os

    if rep.observation.executor != "native":
        name = f"{name}-{rep.observation.executor}"
    if os.environ.get("RECORD_OBSERVATIONS"):
        RECORD.mkdir(parents=True, exist_ok=True)
        # no verdict kept: the case's name says what the cluster was made to show (its first word)
        (RECORD / f"{name}.json").write_text(json.dumps({"case": name, "observation": rep.observation.model_dump()}, indent=1) + "\n")


def test_status_serving_down_stalled(sim, engine_cfg):
    cfg = engine_cfg
    url = cfg.endpoint()
    worker = worker_container(cfg)
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).up()
        rep = status(cfg, nodes)
        record("serving-idle", rep)
        assert rep.verdict == "serving", rep.reason
        assert {c.name for n in rep.observation.nodes for c in n.containers} == group_containers(cfg)
        assert rep.observation.nodes[0].sysctl == {"vm.swappiness": {"expected": "1", "actual": "1"}}
        if cfg.executor == "ray":  # Ray with both nodes alive, and the engine's placement group across them
            ray = rep.observation.ray
            assert ray.alive == ["10.99.0.11", "10.99.0.12"] and ray.error is None and ray.actors == 2
            assert [n.resources.get("vllm_cpu") for n in ray.nodes] == [1.0, 1.0]
            assert [sorted(b.ip for b in pg.bundles) for pg in ray.placement_groups] == [["10.99.0.11", "10.99.0.12"]]
            assert [(p.name, p.state) for p in rep.observation.nodes[0].processes] == [("vllm", "running")]

        stop = threading.Event()
        threads = stream_load(url, 4, stop)
        try:
            deadline = time.monotonic() + 60
            while True:
                rep = status(cfg, nodes)
                if (rep.observation.vllm.running or 0) > 0 and rep.observation.vllm.generation_tok_s:
                    break
                assert time.monotonic() < deadline, "load never showed up in the metrics"
            record("serving-busy", rep)
            assert rep.verdict == "serving", rep.reason

            freeze("sim-2", worker)
            try:
                rep = status(cfg, nodes)
                record("stalled-paused-worker", rep)
                assert rep.verdict == "stalled", rep.reason
                assert rep.observation.vllm.health == 200
                assert rep.observation.vllm.steps_in_window == 0 and rep.observation.vllm.running > 0
                assert "sim-2" in rep.reason
            finally:
                sim_docker("sim-2", "unpause", worker)
            rep = status(cfg, nodes)
            assert rep.verdict == "serving", rep.reason
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)

        sim_docker("sim-2", "stop", "-t", "1", worker)
        rep = status(cfg, nodes)
        record("down-worker-stopped", rep)
        assert rep.verdict == "down"
        assert f"{worker} on sim-2 is exited" in rep.reason
        Executor(cfg, nodes).down()
        rep = status(cfg, nodes)
        assert rep.verdict == "down" and "missing" in rep.reason


def test_logs_command_shows_every_container(sim, sim_cfg):
    from typer.testing import CliRunner

    from spark_cluster.cli import app

    from .conftest import SIM_CONFIG

    import subprocess
    import sys

    from .conftest import ROOT

    with Nodes(sim_cfg) as nodes:
        Executor(sim_cfg, nodes).up(stop_after="start-head")
    try:
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
    finally:
        with Nodes(sim_cfg) as nodes:
            Executor(sim_cfg, nodes).down()
