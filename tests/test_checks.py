"""Typed checks: each kind evaluated on the outputs a node gives, without any node."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from spark_cluster.checks import (DockerAnswers, ImagePresent, MemoryAvailable, ModelFiles, PortsFree, ReadBack, RuntimeListed,
                                  differs, evaluate)
from spark_cluster.plan import Step

MEM = MemoryAvailable(min_available_fraction=0.8, min_available_gib=0, gpu_memory_utilization=0.8, drop_page_cache=False)
SPARK_IDLE = "MemTotal:       127600816 kB\nMemAvailable:   40174336 kB\n"  # a real Spark (tests/data/facts)
SPARK_FREE = "MemTotal:       127600816 kB\nMemAvailable:   118566368 kB\n"

# check, exit code, stdout, stderr, cluster running, problem (a part of it) or None
CASES = [
    ("docker answers", DockerAnswers(), 0, "27.5.1\n", "", False, None),
    ("docker down", DockerAnswers(), 1, "", "Cannot connect to the Docker daemon", False, "docker does not answer (Cannot connect"),
    ("image there", ImagePresent(image="img:1"), 0, "sha256:ab\n", "", False, None),
    ("image absent", ImagePresent(image="img:1"), 1, "", "Error: No such image: img:1", False, "`docker pull img:1`"),
    ("model there", ModelFiles(path="/m"), 0, "config.json\t10\n", "", False, None),
    ("model empty", ModelFiles(path="/m"), 0, "", "", False, "model folder /m is empty"),
    ("model missing", ModelFiles(path="/m"), 1, "", "cd: /m: No such file", False, "model folder /m is missing"),
    ("nvidia runtime", RuntimeListed(), 0, '{"io.containerd.runc.v2":{},"nvidia":{}}', "", False, None),
    ("no nvidia runtime", RuntimeListed(), 0, '{"io.containerd.runc.v2":{},"runc":{}}', "", False, "install nvidia-container-toolkit"),
    ("ports free", PortsFree(ports=[8000]), 0, "", "", False, None),
    ("port taken", PortsFree(ports=[8000]), 0, "LISTEN 0 4096 0.0.0.0:8000 0.0.0.0:*\n", "", False, "already in use"),
    ("port taken by our own cluster", PortsFree(ports=[8000]), 0, "LISTEN 0 4096 0.0.0.0:8000\n", "", True, None),
    ("memory enough", MEM, 0, SPARK_FREE, "", False, None),
    ("memory short (a real Spark with page cache)", MEM, 0, SPARK_IDLE, "", False, "only 38.3 GiB of 121.7 GiB available, 97.4 GiB needed"),
    ("memory short, our cluster runs", MEM, 0, SPARK_IDLE, "", True, None),
    ("memory unreadable", MEM, 0, "", "", False, "cannot read memory information"),
    ("read back the same", ReadBack(stdout="1\n"), 0, "1\n", "", False, None),
    ("read back differs", ReadBack(stdout="1\n"), 0, "60\n", "", False, "did not stick"),
]


@pytest.mark.parametrize("name,check,code,out,err,running,problem", CASES, ids=[c[0] for c in CASES])
def test_evaluate(name, check, code, out, err, running, problem):
    got = evaluate(check, code, out, err, cluster_running=running)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


def test_memory_hint_names_the_page_cache_setting_only_when_off():
    short = evaluate(MEM, 0, SPARK_IDLE)
    assert "memory.drop_page_cache: true" in short
    assert "drop_page_cache" not in evaluate(MEM.model_copy(update={"drop_page_cache": True}), 0, SPARK_IDLE)


def test_differs_names_the_nodes_and_files():
    image = ImagePresent(image="img:1")
    assert differs(image, {"a": "sha256:1\n", "b": "sha256:1\n"}, "a") is None
    assert "img:1 differs between nodes (a=sha256:1, b=sha256:2)" in differs(image, {"a": "sha256:1\n", "b": "sha256:2\n"}, "a")
    model = ModelFiles(path="/m")
    text = differs(model, {"a": "config.json\t10\nw.safetensors\t99\n", "b": "config.json\t10\nw.safetensors\t50\n"}, "a")
    assert text == "model folder /m differs from a's: b: missing or different ['w.safetensors'], extra ['w.safetensors']"
    assert differs(DockerAnswers(), {"a": "27\n", "b": "28\n"}, "a") is None  # not a same-everywhere check


def test_a_check_step_without_a_check_is_refused():
    with pytest.raises(ValidationError, match="has no check"):
        Step(id="preflight/a/x", phase="preflight", node="a", kind="check", description="x", command="true", timeout_s=1)
