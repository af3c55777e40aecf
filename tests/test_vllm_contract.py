"""Contract tests: the rendered `vllm serve` command lines against real vLLM releases' own parsers.

Each release gets a parser-only environment (vLLM without its GPU dependencies, the CPU build of
PyTorch), built once into ~/.cache/spark-cluster/vllm-envs (about 3 min and 4-5 GB each) and reused.
No GPU is needed: the check forces vLLM's CPU platform when no device is found, as on a GPU-less
node with the CUDA build. Releases: SPARK_CLUSTER_VLLM_RELEASES (comma separated).
"""

from __future__ import annotations

import os

import pytest
import yaml

from spark_cluster.config import load_config, parse_config
from spark_cluster.plan import build_plan
from spark_cluster.vllm_check import check_local
from spark_cluster.vllm_env import ensure_env

from .conftest import CONFIGS, EXAMPLE_CONFIGS, run_cli

# 0.17.1: the release the card names; 0.33.0: the newest that installs here (2026-11)
RELEASES = os.environ.get("SPARK_CLUSTER_VLLM_RELEASES", "0.17.1,0.33.0").split(",")
CARD = CONFIGS / "dgx-spark-2node.yaml"

pytestmark = [pytest.mark.contract, pytest.mark.slow]


@pytest.fixture(scope="session", params=RELEASES)
def vllm_python(request):
    return request.param, ensure_env(request.param)


def card_argv() -> list[str]:
    return list(build_plan(load_config(CARD)).vllm_argv)


def replaced(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


SCALE_OUT_FROM = (0, 30)  # vLLM's --enable-scale-out (derender, for chat continuations: gateway.continue_chat)


def example_argvs(release: str) -> list[list[str]]:
    """Every example config's `vllm serve` argv, as a user of that release runs it: before vLLM 0.30,
    with gateway.continue_chat false (the dgx configs, on 0.17.1, set it so)."""
    old = tuple(int(x) for x in release.split(".")[:2]) < SCALE_OUT_FROM
    out = []
    for path in EXAMPLE_CONFIGS:
        data = yaml.safe_load(path.read_text())
        if old:
            data.setdefault("gateway", {})["continue_chat"] = False
        out += [argv for _, cfg in parse_config(yaml.safe_dump(data)).group_configs() for argv in build_plan(cfg).vllm_argvs]
    return out


def test_example_configs_pass(vllm_python):
    release, python = vllm_python
    check = check_local(python, example_argvs(release))
    assert check.vllm_version == release
    assert check.ok, check.messages()


def test_chat_continuation_needs_a_vllm_with_scale_out(vllm_python):
    """gateway.continue_chat adds --enable-scale-out: a release before 0.30 refuses it (the flag check
    says so before anything starts), a later one takes it."""
    release, python = vllm_python
    check = check_local(python, [card_argv() + ["--enable-scale-out"]])
    if tuple(int(x) for x in release.split(".")[:2]) < SCALE_OUT_FROM:
        said = " ".join(check.messages())
        assert not check.ok and "--enable-scale-out" in said and "[cluster.yaml: gateway.continue_chat" in said, said
    else:
        assert check.ok, check.messages()


@pytest.mark.parametrize("flag, typo, valid", [
    ("--tool-call-parser", "qwen3xml", "qwen3_xml"),
    ("--reasoning-parser", "qwen-3", "qwen3"),
    ("--distributed-executor-backend", "rey", "ray"),
])
def test_misspelt_free_string_flag_is_refused_with_the_closest_name(vllm_python, flag, typo, valid):
    check = check_local(vllm_python[1], replaced(card_argv(), flag, typo))
    assert [(p.flag, p.value, p.suggestion) for p in check.problems] == [(flag, typo, valid)]


def test_unknown_flag_is_refused_with_the_closest_flag(vllm_python):
    check = check_local(vllm_python[1], card_argv() + ["--tensor-paralel-size", "2"])
    assert [(p.flag, p.suggestion) for p in check.problems] == [("--tensor-paralel-size", "--tensor-parallel-size")]


def test_auto_tool_choice_without_a_parser_is_refused(vllm_python):
    argv = card_argv()
    i = argv.index("--tool-call-parser")
    check = check_local(vllm_python[1], argv[:i] + argv[i + 2:])
    assert [p.flag for p in check.problems] == ["--enable-auto-tool-choice"]
    assert "--tool-call-parser" in check.problems[0].message


def test_validate_command_with_a_release(vllm_python, tmp_path):
    release, python = vllm_python
    ok = run_cli("validate", str(CARD), "--vllm", str(python.parent.parent))
    assert ok.returncode == 0 and f"vLLM {release}" in ok.stdout, ok.stdout + ok.stderr
    bad = tmp_path / "cluster.yaml"
    bad.write_text(CARD.read_text().replace("reasoning_parser: qwen3", "reasoning_parser: qwen3-thinking"))
    parse_config(bad.read_text())  # a valid cluster.yaml: only vLLM knows the name is wrong
    res = run_cli("validate", str(bad), "--vllm", str(python.parent.parent))
    assert res.returncode == 15, res.stdout + res.stderr
    assert "--reasoning-parser qwen3-thinking" in res.stderr and "vllm.reasoning_parser" in res.stderr
