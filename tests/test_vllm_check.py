"""The pure parts of the vLLM flag check: reading the check's output and wording the errors.
vLLM itself is exercised in test_vllm_contract.py (pinned releases) and test_up.py (the image)."""

from __future__ import annotations

import json

import pytest

from spark_cluster.config import load_config
from spark_cluster.plan import build_plan
from spark_cluster.vllm_check import MARKER, VllmArgsError, VllmCheckError, parse_output

from .conftest import CONFIGS, SIM_CONFIG


def output(**data) -> str:
    return "INFO 11-26 some vLLM log line on stdout\n" + MARKER + json.dumps(data) + "\n"


def test_result_is_read_past_log_lines():
    check = parse_output(output(vllm_version="0.17.1", problems=[]), "", 0, "image x on a")
    assert check.ok and check.vllm_version == "0.17.1"


def test_no_result_line_is_a_check_error_with_the_output_tail():
    with pytest.raises(VllmCheckError) as info:
        parse_output("", "python3: can't open file\nModuleNotFoundError: No module named 'vllm'", 1, "image x on a")
    text = str(info.value)
    assert "No module named 'vllm'" in text and "exit 1" in text and "vllm.check_flags" in text
    assert info.value.exit_code == 14


def test_problems_name_flag_value_suggestion_and_config_key():
    cfg = load_config(SIM_CONFIG)
    check = parse_output(output(vllm_version="0.32.0", problems=[
        {"flag": "--tool-call-parser", "value": "qwen3xml", "message": "'qwen3xml' is not a registered tool call parser",
         "suggestion": "qwen3_xml"},
        {"flag": "--enable-auto-tool-choice", "value": None, "message": "--enable-auto-tool-choice requires --tool-call-parser",
         "suggestion": None},
    ]), "", 0, "image x on sim-1")
    assert not check.ok
    msgs = check.messages(cfg)
    assert msgs[0] == ("--tool-call-parser qwen3xml: 'qwen3xml' is not a registered tool call parser (vLLM 0.32.0); "
                       "did you mean qwen3_xml? [cluster.yaml: vllm.tool_call_parser]")
    assert msgs[1].endswith("[cluster.yaml: vllm.enable_auto_tool_choice]")
    with pytest.raises(VllmArgsError) as info:
        check.raise_for_problems(cfg)
    assert info.value.exit_code == 15 and "0.32.0, image x on sim-1" in str(info.value)


def test_a_flag_from_extra_args_points_at_extra_args():
    cfg = load_config(SIM_CONFIG)
    cfg = cfg.model_copy(update={"vllm": cfg.vllm.model_copy(update={"extra_args": ["--tensor-paralel-size=2"]})})
    check = parse_output(output(vllm_version="0.32.0", problems=[
        {"flag": "--tensor-paralel-size", "message": "vLLM does not know the flag --tensor-paralel-size", "suggestion": "--tensor-parallel-size"}]),
        "", 0, "x")
    assert check.messages(cfg)[0].endswith("did you mean --tensor-parallel-size? [cluster.yaml: vllm.extra_args]")


def test_plan_checks_every_distinct_vllm_command_line_in_a_throwaway_container():
    assert len(build_plan(load_config(SIM_CONFIG)).vllm_argvs) == 1  # Ray: one vllm serve, on the head
    plan = build_plan(load_config(CONFIGS / "local-sim-native.yaml"))
    step = next(s for s in plan.steps if s.id == "preflight/sim-1/vllm-flags")
    assert [s.id for s in plan.steps_in("preflight")][-1] == step.id  # after the image checks
    assert step.stdin == "node-scripts/vllm-check.py"
    assert "docker run --rm -i --name spark-check-vllm-flags --network none" in step.command
    assert "--gpus" not in step.command  # works on a node without a GPU
    assert len(plan.vllm_argvs) == 2 and "--headless" in plan.vllm_argvs[1]
    assert json.dumps(plan.vllm_argvs, separators=(",", ":")) in step.command.replace("'", "")


FAKE_DOCKER = """#!/bin/sh
# a daemon still removing the previous run's --rm container: `rm -f` says so, the name stays held
# for three more `inspect`s, and a `run` while it is held is refused as dockerd refuses it
echo "$*" >> "$LOG"
case "$1 $2" in
  "rm -f") echo "Error response from daemon: removal of container x is already in progress" >&2; exit 1 ;;
  "container inspect") n=$(grep -c '^container inspect' "$LOG"); [ "$n" -le 3 ] && exit 0; exit 1 ;;
  "run --rm") n=$(grep -c '^container inspect' "$LOG"); [ "$n" -le 3 ] && { echo 'docker: Error response from daemon: Conflict. The container name "/spark-check-vllm-flags" is already in use' >&2; exit 125; }; echo checked ;;
esac
"""


def test_a_check_waits_for_the_previous_runs_container_to_be_removed(tmp_path):
    """moby/moby#37698: the daemon removes a --rm container after its client returned; a check started
    at once finds the name held. The command waits for docker to no longer know the name."""
    import os
    import subprocess

    (tmp_path / "docker").write_text(FAKE_DOCKER)
    (tmp_path / "docker").chmod(0o755)
    step = next(s for s in build_plan(load_config(SIM_CONFIG)).steps if s.id == "preflight/sim-1/vllm-flags")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "LOG": str(tmp_path / "log")}
    r = subprocess.run(["sh", "-c", step.command], env=env, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, "checked\n"), r.stderr
    calls = (tmp_path / "log").read_text().splitlines()
    assert [c.split()[:2] for c in calls] == [["rm", "-f"], *[["container", "inspect"]] * 4, ["run", "--rm"]]


def test_check_can_be_switched_off():
    text = (CONFIGS / "dgx-spark-2node.yaml").read_text().replace("vllm:\n", "vllm:\n  check_flags: false\n", 1)
    from spark_cluster.config import parse_config

    plan = build_plan(parse_config(text))
    assert not any(s.id.endswith("/vllm-flags") for s in plan.steps)


def test_a_parser_environment_step_past_its_time_is_a_clear_error():
    """A pip install that hangs (no index reachable) ends as VllmEnvError with its last output,
    not a subprocess traceback."""
    import sys

    from spark_cluster.vllm_env import VllmEnvError, _run

    with pytest.raises(VllmEnvError) as info:
        _run([sys.executable, "-c", "import time; print('Collecting vllm', flush=True); time.sleep(30)"], None, 1)
    assert "did not finish within 1s" in str(info.value) and "Collecting vllm" in str(info.value)
    with pytest.raises(VllmEnvError, match="cannot run"):
        _run(["/nonexistent/python3", "-V"], None, 5)


def test_checks_of_both_executors_are_remembered(tmp_path):
    """Switching executor (other flags, same image) and back must not check the image's vLLM again."""
    from spark_cluster.kept import last_check, passed_before, save_check
    from spark_cluster.vllm_check import argv_hash

    cfg = load_config(SIM_CONFIG).model_copy(update={"state_dir": str(tmp_path)})
    (tmp_path / "vllm.json").write_text(json.dumps({"image": cfg.container.image, "image_id": "sha256:1", "argv_hash": "old",
                                                    "vllm_version": "0.31.0", "ok": True}))  # an earlier version's one record
    assert passed_before(cfg, "sha256:1", "old")["vllm_version"] == "0.31.0"
    ray, native = argv_hash([["serve", "--a"]]), argv_hash([["serve", "--b"]])
    for h in (ray, native):
        save_check(cfg, {"image": cfg.container.image, "image_id": "sha256:1", "argv_hash": h, "vllm_version": "0.32.0", "ok": True})
    assert passed_before(cfg, "sha256:1", ray) and passed_before(cfg, "sha256:1", native) and passed_before(cfg, "sha256:1", "old")
    assert passed_before(cfg, "sha256:2", ray) is None  # another image
    save_check(cfg, {"image": cfg.container.image, "image_id": "sha256:1", "argv_hash": ray, "vllm_version": "0.32.0", "ok": False})
    assert passed_before(cfg, "sha256:1", ray) is None and last_check(cfg)["ok"] is False


def test_a_parser_only_environment_gets_vllms_requirements_for_its_platform_without_the_gpu_ones():
    from spark_cluster.vllm_env import install_specs

    arm = {"python_version": "3.11", "python_full_version": "3.11.2", "sys_platform": "linux", "platform_machine": "aarch64",
           "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "implementation_version": "3.11.2", "platform_release": "6.1.0", "platform_version": "#1 SMP"}
    requires = ["regex", "torch==2.9.0", 'numba==0.61.2; python_version > "3.9"',
                'xgrammar==0.1.25; platform_machine == "x86_64" or platform_machine == "aarch64"',
                'intel-openmp; platform_machine == "x86_64"', "fastapi[standard]>=0.115.0", 'tensorizer==2.10.1; extra == "tensorizer"',
                'nvidia-cutlass-dsl>=4.2; python_version < "3.10"', "flashinfer-python==0.4.1", "ray[cgraph]>=2.48.0"]
    assert install_specs(requires, arm) == ["regex", "numba==0.61.2", "xgrammar==0.1.25", "fastapi[standard]>=0.115.0"]
    assert "intel-openmp" in install_specs(requires, {**arm, "platform_machine": "x86_64"})
