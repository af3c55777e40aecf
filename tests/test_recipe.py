"""`spark-cluster import RECIPE`: recipes written from eugr/spark-vllm-docker's and sparkrun's documented
formats (tests/data/recipes) become cluster.yaml files that validate and plan, and everything a recipe
says that cannot be carried over is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spark_cluster.config import parse_config
from spark_cluster.errors import ConfigError
from spark_cluster.plan import build_plan
from spark_cluster.recipe import import_recipe, nodes_from_list, render_command, to_yaml

from .conftest import ROOT, run_cli

RECIPES = Path(__file__).parent / "data" / "recipes"


def recipe(name: str) -> dict:
    return yaml.safe_load((RECIPES / name).read_text())


def converted(name: str, nodes: str, **kw):
    r = recipe(name)
    imported = import_recipe(r, nodes_from_list(nodes), **kw)
    cfg = parse_config(to_yaml(imported, r, name))
    return imported, cfg, build_plan(cfg)


def test_the_cards_two_node_recipe_becomes_its_cluster():
    imported, cfg, plan = converted("qwen3.5-122b-int4-tp2.yaml", "10.0.0.1/192.168.100.10,10.0.0.2/192.168.100.11")
    assert imported.source_format == "eugr" and cfg.name == "qwen3-5-122b-a10b-int4-2-nodes"
    assert [(n.name, n.host, n.address, n.role) for n in cfg.nodes] == [("spark-1", "10.0.0.1", "192.168.100.10", "head"),
                                                                       ("spark-2", "10.0.0.2", "192.168.100.11", "worker")]
    v = cfg.vllm
    assert (v.tensor_parallel_size, v.max_model_len, v.gpu_memory_utilization, v.enforce_eager, v.enable_prefix_caching) == (2, 225000, 0.5, True, True)
    assert (v.reasoning_parser, v.tool_call_parser, v.enable_auto_tool_choice, v.trust_remote_code, v.extra_args) == ("qwen3", "qwen3_xml", True, True, [])
    assert cfg.model.served_name == "Intel/Qwen3.5-122B-A10B-int4-AutoRound" and cfg.container.image == "vllm-node"
    assert cfg.container.env["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "3600" and cfg.node_nccl(cfg.nodes[0]).auto
    assert any(n.startswith("--distributed-executor-backend ray: set by spark-cluster itself") for n in imported.notes)
    argv = plan.vllm_argvs[0]
    assert "--tensor-parallel-size" in argv and argv[argv.index("--tensor-parallel-size") + 1] == "2"


def test_a_mod_and_build_args_are_named_as_not_carried_over():
    imported, cfg, _ = converted("glm-4.7-flash-awq-mod.yaml", "spark-a/10.0.0.1,spark-b/10.0.0.2", model_path="/data/glm")
    said = "\n".join(imported.notes)
    assert "mod mods/fix-glm-4.7-flash-AWQ: not carried over" in said and "build_args --pre-tf: not carried over" in said
    assert "env HF_TOKEN=${HF_TOKEN}: refers to the environment of the machine running the recipe" in said
    assert "tensor_parallel 1 of the recipe became 2" in said and cfg.vllm.tensor_parallel_size == 2
    assert cfg.vllm.extra_args == ["--max-num-batched-tokens", "4096", "--override-generation-config", '{"top_p":0.95}']
    assert cfg.model.served_name == "glm-4.7-flash" and cfg.model.path == "/data/glm" and "HF_TOKEN" not in cfg.container.env
    assert cfg.vllm.max_num_seqs == 64 and cfg.vllm.gpu_memory_utilization == 0.7


def test_a_sparkrun_recipe_with_pipeline_parallelism():
    imported, cfg, plan = converted("mimo-flash-pp3-sparkrun.yaml", "a/10.1.0.1,b/10.1.0.2,c/10.1.0.3")
    assert imported.source_format == "sparkrun"
    assert (cfg.vllm.tensor_parallel_size, cfg.vllm.pipeline_parallel_size, cfg.vllm.gpu_memory_utilization) == (1, 3, 0.85)
    said = "\n".join(imported.notes)
    assert "gpu_memory_utilization 0.87 of the recipe became 0.85" in said and "metadata (description, model_dtype, model_params)" in said
    assert cfg.vllm.extra_args == ["--moe-backend", "marlin", "--kv-cache-dtype", "fp8"]
    assert cfg.model.served_name == "XiaomiMiMo/MiMo-V2.6-Flash-RL" and cfg.container.env == {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    assert "--pipeline-parallel-size" in plan.vllm_argvs[0]


@pytest.mark.parametrize("change, nodes, words", [
    ({"solo_only": True, "cluster_only": False}, "a,b", "runs on one node only"),
    ({}, "a", "needs at least 2 nodes"),
    ({"defaults": {"tensor_parallel": 2, "port": 8000, "host": "h", "gpu_memory_utilization": 0.5, "max_model_len": 1}}, "a,b,c",
     "TP=2 x PP=1 = 2 ranks, one per GPU, but 3 GPU(s) are given"),
    ({"command": "vllm serve x --port {port} --max-num-seqs {seqs}"}, "a,b", "uses {seqs}, which neither its defaults nor its model give"),
    ({"command": "python -m sglang.launch_server --model x"}, "a,b", "not `vllm serve ...`"),
    ({"runtime": "sglang", "recipe_version": "2"}, "a,b", "runtime is sglang: spark-cluster serves vLLM only"),
    ({"command": None}, "a,b", "not a recipe"),
    ({"command": "vllm serve x --max-model-len lots"}, "a,b", "--max-model-len 'lots' is not a number"),
    ({"defaults": [1, 2]}, "a,b", "defaults is not a mapping"),
    ({"min_nodes": "two"}, "a,b", "min_nodes 'two' is not a number"),
])
def test_what_cannot_run_here_is_refused_with_why(change, nodes, words):
    r = {**recipe("qwen3.5-122b-int4-tp2.yaml"), **change}
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{").replace("}", r"\}")):
        import_recipe(r, nodes_from_list(nodes))


def test_placeholders_fill_each_other_and_doubled_braces_are_braces():
    assert render_command("serve {model} --url {base}/v1 '{{\"a\":1}}'", {"model": "m", "base": "http://h:{port}", "port": 8000}) == \
        "serve m --url http://h:8000/v1 '{\"a\":1}'"


def test_import_writes_a_cluster_yaml_that_validate_and_plan_accept_and_keeps_what_is_there(tmp_path):
    out = tmp_path / "cluster.yaml"
    r = run_cli("import", str(RECIPES / "glm-4.7-flash-awq-mod.yaml"), "--nodes", "10.0.0.1/192.168.100.10,10.0.0.2/192.168.100.11",
                "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mod mods/fix-glm-4.7-flash-AWQ: not carried over" in r.stderr and "# not carried over, or changed:" in out.read_text()
    assert run_cli("validate", str(out)).returncode == 0
    shown = run_cli("plan", str(out))
    assert shown.returncode == 0 and "--override-generation-config" in shown.stdout
    before = out.read_text()
    again = run_cli("import", str(RECIPES / "qwen3.5-122b-int4-tp2.yaml"), "--nodes", "10.0.0.1,10.0.0.2", "--out", str(out))
    assert again.returncode != 0 and "already has cluster.yaml with other content" in again.stderr and out.read_text() == before
    # the nodes and settings of an existing cluster.yaml, the recipe's model
    keep = tmp_path / "kept.yaml"
    r = run_cli("import", str(RECIPES / "qwen3.5-122b-int4-tp2.yaml"), "--config", str(ROOT / "configs" / "dgx-spark-2node.yaml"),
                "--out", str(keep))
    assert r.returncode == 0, r.stdout + r.stderr
    base, made = yaml.safe_load((ROOT / "configs" / "dgx-spark-2node.yaml").read_text()), yaml.safe_load(keep.read_text())
    assert made["nodes"] == base["nodes"] and made["name"] == base["name"] and made["model"]["path"] == base["model"]["path"]
    assert run_cli("validate", str(keep)).returncode == 0
    bad = run_cli("import", str(RECIPES / "qwen3.5-122b-int4-tp2.yaml"), "--out", str(tmp_path / "x.yaml"))
    assert bad.returncode != 0 and "give the nodes" in bad.stderr and "Traceback" not in bad.stderr
    named = run_cli("import", str(RECIPES / "qwen3.5-122b-int4-tp2.yaml"), "--nodes", "spark-a,spark-b", "--out", str(tmp_path / "y.yaml"))
    assert named.returncode != 0 and "'spark-a' is not an IP address" in named.stderr and not (tmp_path / "y.yaml").exists()
