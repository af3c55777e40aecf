"""The real `spark-cluster` entry point, run as a user runs it."""

from __future__ import annotations

import json
import re
import socket

import pytest
import yaml
from typer.testing import CliRunner

from spark_cluster.cli import app

from .conftest import CONFIGS, ROOT, run_cli


def in_process(*args: str) -> str:
    """A command's output run in this process: for tests that run several commands whose process adds nothing
    (each subprocess costs ~0.5 s of CPU in `make check`)."""
    res = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return res.stdout


def test_plan_card_config_shows_worker_before_head(tmp_path):
    # the card's config names no interface (nccl: auto): before any detection `plan` says so ...
    res = run_cli("plan", "configs/dgx-spark-2node.yaml", env={"HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "auto: not detected yet" in res.stdout and "-e 'NCCL_SOCKET_IFNAME=<auto: detected by preflight>'" in res.stdout
    # ... and after one, it shows what was found (state_dir/link.json, as a real Spark's cable reads)
    from spark_cluster.config import load_config
    from spark_cluster.kept import save_links
    from spark_cluster.link import LinkPick

    cfg = load_config(CONFIGS / "dgx-spark-2node.yaml").model_copy(update={"state_dir": str(tmp_path / "state")})
    save_links(cfg, {n.name: LinkPick("enp1s0f0np0", ("rocep1s0f0", "roceP2p1s0f0"), 9000) for n in cfg.nodes})
    path = tmp_path / "cluster.yaml"
    path.write_text((CONFIGS / "dgx-spark-2node.yaml").read_text() + f"\nstate_dir: {tmp_path / 'state'}\n")
    res = run_cli("plan", str(path))
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "auto, as last detected: spark-1 enp1s0f0np0 + RDMA rocep1s0f0,roceP2p1s0f0" in text and "<auto" not in text
    for needle in ["--shm-size 10.24g", "--network=host", "--ipc=host", "--privileged", "--gpus all",
                   "NCCL_P2P_DISABLE=1", "NCCL_IB_HCA=rocep1s0f0,roceP2p1s0f0", "NCCL_SOCKET_IFNAME=enp1s0f0np0",
                   "GLOO_SOCKET_IFNAME=enp1s0f0np0",
                   "--tensor-parallel-size 2", "--distributed-executor-backend ray", "--gpu-memory-utilization 0.5",
                   "vm.swappiness=1"]:
        assert needle in text, needle
    assert text.index("--name spark-ray-worker") < text.index("--name spark-ray-head") < text.index("spark-ray-head \\\n  sh -c")
    assert "cluster.yaml vllm.gpu_memory_utilization" in text


def test_plan_json_is_the_same_plan():
    res = run_cli("plan", "--json", "configs/dgx-spark-2node.yaml")
    assert res.returncode == 0, res.stderr
    from spark_cluster.config import load_config
    from spark_cluster.plan import build_plan
    from spark_cluster.steps import Plan

    assert Plan.model_validate_json(res.stdout) == build_plan(load_config(CONFIGS / "dgx-spark-2node.yaml"))


def test_memory_cap_exit_2_without_contacting_anything(tmp_path, monkeypatch):
    data = yaml.safe_load((CONFIGS / "dgx-spark-2node.yaml").read_text())
    data["vllm"]["gpu_memory_utilization"] = 0.9
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(data))
    contacted = []

    def refuse(self, *a, **k):
        contacted.append(a)
        raise AssertionError("network contacted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for command in ("plan", "validate"):
        res = CliRunner().invoke(app, [command, str(cfg)])
        assert res.exit_code == 2, res.output
        assert "0.85" in res.output and str(cfg) in res.output and "vllm.gpu_memory_utilization" in res.output
    assert contacted == []


def test_validate_ok():
    res = run_cli("validate", "configs/dgx-spark-2node.yaml")
    assert res.returncode == 0 and "ok" in res.stdout


def test_unknown_key_exit_2_with_suggestion(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text((CONFIGS / "dgx-spark-2node.yaml").read_text().replace("  tool_call_parser:", "  tool_call_parsr:"))
    res = run_cli("validate", str(cfg))
    assert res.returncode == 2
    assert "did you mean 'tool_call_parser'" in res.stderr


def test_missing_file_exit_2(tmp_path):
    res = run_cli("plan", str(tmp_path / "none.yaml"))
    assert res.returncode == 2 and "no such file" in res.stderr


def test_schema_is_json_schema():
    res = run_cli("schema")
    schema = json.loads(res.stdout)
    assert schema["additionalProperties"] is False
    assert "nodes" in schema["properties"] and "description" in schema["properties"]["executor"]


def test_secret_masked_in_cli_output(tmp_path):
    data = yaml.safe_load((CONFIGS / "dgx-spark-2node.yaml").read_text())
    data["container"]["env"]["HF_TOKEN"] = "hf_do_not_print_me"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    for args in (["plan", str(cfg)], ["plan", "--json", str(cfg)], ["validate", str(cfg)]):
        res = run_cli(*args)
        assert res.returncode == 0
        assert "hf_do_not_print_me" not in res.stdout + res.stderr


def test_the_configuration_reference_is_current():
    from spark_cluster.reference import update_reference

    from .conftest import ROOT

    text = (ROOT / "docs" / "configuration.md").read_text()
    assert update_reference(text) == text, "docs/configuration.md is stale: run `make docs`"


def test_error_values_are_shown_literally(tmp_path):
    """Values in messages are not interpreted as terminal markup."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text((CONFIGS / "dgx-spark-2node.yaml").read_text().replace("shm_size: 10.24g", 'shm_size: "[bold]1g[/]"'))
    res = run_cli("validate", str(cfg))
    assert res.returncode == 2 and "container.shm_size = '[bold]1g[/]'" in res.stderr


@pytest.mark.parametrize("name", ["serving-busy", "stalled-paused-worker"])
def test_status_reads_at_80_columns(name):
    """Each container on one line, with its age (`up 2d`), not a wrapped ISO start time."""
    from rich.console import Console

    from spark_cluster.views import render_status
    from spark_cluster.observation import Observation
    from spark_cluster.status import StatusReport

    obs = Observation.model_validate(json.loads((ROOT / "tests" / "data" / "observations" / f"{name}.json").read_text())["observation"])
    console = Console(width=80, record=True, color_system=None)
    console.print(render_status(StatusReport(verdict="serving", reason="", observation=obs, restart="kept",
                                             restart_why="every container runs as planned and Ray shows every node alive")))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert any(line.startswith("on a hang") and "the kept restart: every container" in line for line in lines), lines
    for n in obs.nodes:
        for c in n.containers:
            [line] = [line for line in lines if f" {c.name} " in line]
            assert n.name in line and c.state in line
            if c.state == "running":
                assert re.search(r"running up \d+[smhd]\b", line), line
    assert not any(re.search(r"\d{4}-\d\d-\d\dT\d\d", line) for line in lines[:-1])  # no ISO times but the footer's


def test_container_age():
    from datetime import datetime, timezone

    from spark_cluster.views import age

    now = datetime(2026, 11, 29, 12, 4, 30, tzinfo=timezone.utc)
    assert age("2026-11-29T12:00:00.123456789Z", now) == "up 4m"
    assert age("2026-11-29T12:04:00Z", now) == "up 30s"
    assert age("2026-11-27T11:00:00Z", now) == "up 2d"
    assert age("garbage", now) == ""


def test_the_documented_exit_codes_are_the_code():
    from spark_cluster.errors import exit_codes

    text = (ROOT / "docs" / "design.md").read_text()
    table = text.split("## Exit codes", 1)[1].split("\n\n")[1]
    rows = [line.split(" | ", 1) for line in table.splitlines()[2:]]
    assert {int(code.strip("| ")): meaning.rstrip(" |") for code, meaning in rows} == exit_codes()


def test_every_error_class_lives_in_errors_with_its_own_exit_code():
    import inspect

    from spark_cluster import errors

    found = _subclasses(errors.SparkClusterError)  # after importing every module of the package
    assert len(found) >= 15
    for cls in found:
        assert inspect.getmodule(cls) is errors, f"{cls.__name__} is defined in {cls.__module__}, not spark_cluster.errors"


def _subclasses(cls):
    import importlib
    import pkgutil

    import spark_cluster

    for m in pkgutil.walk_packages(spark_cluster.__path__, "spark_cluster."):
        if m.name.endswith("__main__"):
            continue
        importlib.import_module(m.name)
    out, todo = [], [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


@pytest.mark.parametrize("command, stays_up", [("controller", True), ("watch", False)])
def test_systemd_unit_runs_the_command(command, stays_up):
    r = run_cli(command, str(CONFIGS / "dgx-spark-2node.yaml"), "--print-unit")
    assert r.returncode == 0, r.stderr
    exec_line = next(line for line in r.stdout.splitlines() if line.startswith("ExecStart="))
    assert exec_line.endswith(f" {command} {CONFIGS / 'dgx-spark-2node.yaml'}")
    assert f"spark-cluster-{command}-spark.service" in r.stdout and "RestartPreventExitStatus=12" in r.stdout
    assert ("the controller stays up" in r.stdout) is stays_up
    # the controller's clients and its connections to vLLM fit under its file limit (gateway.max_clients)
    assert ("LimitNOFILE=65536" in r.stdout) is stays_up


def test_a_config_of_groups_plans_each_group_and_says_so():
    path = str(CONFIGS / "local-sim-2groups.yaml")
    valid = run_cli("validate", path)
    assert valid.returncode == 0 and "4 node(s) as 2 groups (a: sim-1 sim-2, b: sim-3 sim-4)" in valid.stdout
    plans = json.loads(in_process("plan", "--json", path))["groups"]
    assert {g: (p["cluster"], p["endpoint"]) for g, p in plans.items()} == {"a": ("spark-a", "http://10.99.0.11:8000"),
                                                                           "b": ("spark-b", "http://10.99.0.13:8000")}
    text = in_process("plan", path)
    assert text.count("spark-cluster plan") == 2 and "spark-b-ray-worker" in text
    down = json.loads(in_process("plan", "--down", "--json", path))["groups"]
    assert set(down) == {"a", "b"}
    restart = json.loads(in_process("plan", "--restart", "--json", path))["groups"]
    assert {g: r["kept"][2]["id"] for g, r in restart.items()} == {"a": "clear/sim-1/vllm", "b": "clear/sim-3/vllm"}
    text = in_process("plan", "--restart", path)
    assert text.count("spark-cluster plan --restart") == 2 and text.count("the kept restart") == 4  # each group: what a hang gets, the steps
