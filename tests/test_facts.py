"""The facts read from nodes: each parser on outputs recorded from the simulated cluster
(tests/data/facts/*.json: the command, its exit code and output, and the fact it must give), and on
the odd outputs a node can produce."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spark_cluster.config import load_config
from spark_cluster.facts import parse_process, parse_ray_state, process_command
from spark_cluster.plan import build_plan

from .conftest import SIM_CONFIG

DATA = Path(__file__).parent / "data" / "facts"
RECORDED = sorted(DATA.glob("*.json"))


def vllm_process():
    return build_plan(load_config(SIM_CONFIG)).processes()[0]


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
def test_recorded_output_gives_the_recorded_fact(path):
    rec = json.loads(path.read_text())
    if rec["fact"] == "ray-state":
        got = parse_ray_state(rec["stdout"], rec["stderr"]).model_dump(by_alias=True)
    else:
        got = parse_process(vllm_process(), rec["exit_code"], rec["stdout"], rec["stderr"]).model_dump()
    assert got == rec["parsed"]


def test_the_recordings_cover_serving_and_dead_ray_and_every_process_state():
    kinds = {json.loads(p.read_text())["case"] for p in RECORDED}
    assert {"ray-serving", "ray-worker-dead", "vllm-running", "vllm-gone", "vllm-not-started"} <= kinds


def test_ray_state_on_a_serving_recording_names_nodes_group_and_ranks():
    rec = json.loads((DATA / "ray-serving.json").read_text())
    ray = parse_ray_state(rec["stdout"], rec["stderr"])
    assert ray.alive == ["10.99.0.11", "10.99.0.12"] and ray.dead == [] and ray.total("vllm_cpu") == 2
    [pg] = ray.engine_placement_groups()
    assert pg.state == "CREATED" and sorted(b.ip for b in pg.bundles) == ["10.99.0.11", "10.99.0.12"]
    assert sorted(a.ip for a in ray.actors) == ["10.99.0.11", "10.99.0.12"]


def test_ray_state_when_ray_cannot_be_asked():
    ray = parse_ray_state("", "Error response from daemon: container abc is not running\n")
    assert ray.error == "Error response from daemon: container abc is not running" and ray.nodes == [] and ray.alive == []
    assert parse_ray_state("SPARK_CLUSTER_RAY_NODES {not json", "").error == "SPARK_CLUSTER_RAY_NODES {not json"
    assert parse_ray_state('SPARK_CLUSTER_RAY_NODES [{"alive": true}]').error.startswith("unreadable Ray state")


def test_ray_state_of_an_older_ray_without_placement_groups_still_has_nodes():
    out = 'SPARK_CLUSTER_RAY_NODES [{"ip": "10.0.0.1", "alive": true, "resources": {"GPU": 1.0}}]\nSPARK_CLUSTER_RAY_PGS_ERROR "ImportError()"\n'
    ray = parse_ray_state(out)
    assert ray.error is None and ray.total("GPU") == 1 and ray.placement_groups == []


def test_process_whose_pid_now_belongs_to_another_program_is_gone():
    fact = parse_process(vllm_process(), 0, "301 sleep 600 \n")
    assert fact.state == "gone" and "another process" in fact.detail


def test_process_in_a_container_that_does_not_run_is_unknown():
    fact = parse_process(vllm_process(), 1, "", "Error response from daemon: Container abc is paused, unpause the container before exec\n")
    assert fact.state == "unknown" and "paused" in fact.detail


def test_process_command_quotes_the_container_and_pid_file():
    cmd = process_command(vllm_process())
    assert cmd.startswith("docker exec spark-ray-head sh -c '") and cmd.endswith(" pid /tmp/spark-cluster-vllm.pid")


class FakeHeadThatDoesNotAnswer:
    """A scripted fake transport: the SSH command fails as an unreachable node's does."""

    def run(self, command, timeout):
        from spark_cluster.transport import TransportError

        raise TransportError("sim-1: SSH to 10.99.0.11 failed: timed out")


class FakeHeadWithRecording:
    def __init__(self, rec):
        self.rec = rec

    def run(self, command, timeout):
        from spark_cluster.transport import Result

        assert command == self.rec["command"]
        return Result(node="sim-1", command=command, exit_code=self.rec["exit_code"], stdout=self.rec["stdout"],
                      stderr=self.rec["stderr"], duration_s=0.1)


def test_read_ray_state_runs_the_command_and_keeps_a_failure_as_the_error():
    from spark_cluster.facts import read_ray_state

    rec = json.loads((DATA / "ray-serving.json").read_text())
    assert read_ray_state(FakeHeadWithRecording(rec), rec["command"], 30).alive == ["10.99.0.11", "10.99.0.12"]
    ray = read_ray_state(FakeHeadThatDoesNotAnswer(), "docker exec ...", 30)
    assert ray.error == "sim-1: SSH to 10.99.0.11 failed: timed out" and ray.nodes == []
