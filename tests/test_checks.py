"""Typed checks: each kind evaluated on the outputs a node gives, without any node."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from spark_cluster.checks import (ClockInSync, DiskFree, LinkBandwidth, DockerAnswers, GpuWorks, SudoWorks, ImagePlatform, ImagePresent, MemoryAvailable, ModelFiles, PortsFree, ReadBack,
                                  differs, evaluate, note, state_dir_problem)
from spark_cluster.steps import Step

MEM = MemoryAvailable(min_available_fraction=0.8, min_available_gib=0, gpu_memory_utilization=0.8, drop_page_cache=False)
SPARK_IDLE = "MemTotal:       127600816 kB\nMemAvailable:   40174336 kB\n"  # a real Spark (tests/data/facts)
SPARK_FREE = "MemTotal:       127600816 kB\nMemAvailable:   118566368 kB\n"

ALLREDUCE = "# all-reduce backend=nccl world=2 bytes=268435456 seconds=0.025000\n# Avg bus bandwidth    : {} \n"  # GB/s, as nccl-tests
DF = "Filesystem     1024-blocks     Used Available Capacity Mounted on\n/dev/vda         264212084 46646764  59744148      44% /var/lib/docker\n"

# check, exit code, stdout, stderr, cluster running, problem (a part of it) or None
CASES = [
    ("docker answers", DockerAnswers(), 0, "27.5.1\n", "", False, None),
    ("docker down", DockerAnswers(), 1, "", "Cannot connect to the Docker daemon", False, "docker does not answer (Cannot connect"),
    ("image there", ImagePresent(image="img:1"), 0, "sha256:ab\n", "", False, None),
    ("image absent", ImagePresent(image="img:1"), 1, "", "Error: No such image: img:1", False, "`docker pull img:1`"),
    ("model there", ModelFiles(path="/m"), 0, "config.json\t10\n", "", False, None),
    ("model empty", ModelFiles(path="/m"), 0, "", "", False, "model folder /m is empty"),
    ("model missing", ModelFiles(path="/m"), 1, "", "cd: /m: No such file", False, "model folder /m is missing"),
    # the node's platform, then the image's (platforms_command); a real Spark's daemon is linux/arm64 (tests/data/facts)
    ("image for the node", ImagePlatform(image="img:1"), 0, "linux/arm64\n=== image\nlinux/arm64/v8\n", "", False, None),
    ("amd64 image on a Spark", ImagePlatform(image="img:1"), 0, "linux/arm64\n=== image\nlinux/amd64\n", "", False,
     "image img:1 is built for linux/amd64, this node runs linux/arm64: containers would fail with `exec format error`"),
    ("image absent: its own check says so", ImagePlatform(image="img:1"), 0, "linux/arm64\n=== image\n", "", False, None),
    ("docker silent", ImagePlatform(image="img:1"), 1, "=== image\nlinux/arm64\n", "Cannot connect", False, "cannot read the Docker daemon's platform"),
    # a `--gpus all` smoke run (recorded outputs in tests/data/facts/gpu-smoke-*)
    ("GPU seen", GpuWorks(image="img:1"), 0, "GPU 0: NVIDIA GB10 (UUID: GPU-b0ec33a0-2589-53de-953c-0713d37d0794)\n", "", False, None),
    ("GB10 with memory.unified off", GpuWorks(image="img:1", unified=False), 0, "GPU 0: NVIDIA GB10 (UUID: GPU-b0ec33a0-2589-53de-953c-0713d37d0794)\n",
     "", False, "the GPU is NVIDIA GB10, whose memory is unified with the CPU's, but memory.unified is false"),
    ("a discrete GPU with memory.unified off", GpuWorks(image="img:1", unified=False), 0, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n", "", False, None),
    ("no toolkit", GpuWorks(image="img:1"), 125, "", 'docker: Error response from daemon: could not select device driver "" with capabilities: [[gpu]].\n',
     False, "a container of img:1 cannot use the GPU (docker: Error response from daemon: could not select device driver"),
    ("amd64 image", GpuWorks(image="img:1"), 255, "", "exec /usr/bin/nvidia-smi: exec format error\n", False, "use an arm64 or multi-arch image"),
    ("smoke without the image", GpuWorks(image="img:1"), 125, "", "docker: Error response from daemon: No such image: img:1\n", False, None),
    ("sudo works", SudoWorks(), 0, "", "", False, None),
    ("sudo asks for a password", SudoWorks(), 1, "", "sudo: a password is required\n", False, "allow the SSH user passwordless sudo"),
    # df -Pk of Docker's data root, as the simulated node printed it
    ("disk room", DiskFree(min_gib=10), 0, DF, "", False, None),
    ("disk full", DiskFree(min_gib=100), 0, DF, "", False, "only 57.0 GiB free where Docker keeps images and container logs, 100 GiB needed"),
    ("disk unreadable", DiskFree(min_gib=10), 1, "", "df: '/x': No such file or directory", False, "cannot read the free space"),
    ("clock read", ClockInSync(max_skew_s=5), 0, "1796002773.803765185\n", "", False, None),
    ("clock unreadable", ClockInSync(max_skew_s=5), 127, "", "sh: date: not found", False, "cannot read the clock"),
    # the all-reduce test: rank 0 prints the bus bandwidth (templates/node-scripts/allreduce.py)
    ("bandwidth enough", LinkBandwidth(rank=0, backend="nccl", min_gbits=80), 0, ALLREDUCE.format(21.4), "", False, None),
    ("bandwidth degraded", LinkBandwidth(rank=0, backend="nccl", min_gbits=80), 0, ALLREDUCE.format(2.925), "", False,
     "reached 23.4 Gb/s, below link.min_gbits 80: a link that came up degraded"),
    ("bandwidth test broke", LinkBandwidth(rank=0, backend="nccl", min_gbits=80), 1, "", "RuntimeError: NCCL error: unhandled system error\n", False,
     "gave no figure (RuntimeError: NCCL error: unhandled system error)"),
    ("bandwidth, another rank fine", LinkBandwidth(rank=1, backend="nccl", min_gbits=80), 0, "", "", False, None),
    ("bandwidth, another rank broke", LinkBandwidth(rank=1, backend="nccl", min_gbits=80), 1, "", "torch.distributed.DistNetworkError: timed out\n",
     False, "the bandwidth test failed here: torch.distributed.DistNetworkError: timed out"),
    ("bandwidth without the image", LinkBandwidth(rank=0, backend="nccl", min_gbits=80), 125, "", "docker: Error response from daemon: No such image: i",
     False, None),
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


def test_what_a_passed_check_found_is_shown():
    assert note(GpuWorks(image="i"), "GPU 0: NVIDIA GB10 (UUID: GPU-b0ec33a0-2589-53de-953c-0713d37d0794)\n") == "NVIDIA GB10"
    assert note(ImagePlatform(image="i"), "linux/arm64\n=== image\nlinux/arm64\n") == "node linux/arm64, image linux/arm64"
    assert note(DockerAnswers(), "27.5.1\n") is None


def test_clocks_are_compared_across_nodes():
    clock = ClockInSync(max_skew_s=5)
    assert differs(clock, {"a": "1000.0\n", "b": "1004.9\n"}, "a") is None
    why = differs(clock, {"a": "1000.0\n", "b": "993.5\n", "c": "1001.0\n"}, "a")
    assert why is not None and "differ by 7.5s (against a: b -6.5s, c +1.0s), more than 5s" in why and "timedatectl set-ntp true" in why


def test_the_controller_needs_room_for_its_state_dir():
    assert state_dir_problem("/var/lib/x", 20.0) is None
    assert "only 0.25 GiB free for state_dir /var/lib/x (1 GiB needed" in state_dir_problem("/var/lib/x", 0.25)
    assert "cannot be created or read here" in state_dir_problem("/nope", None)


def test_a_large_model_memory_mapped_on_unified_memory_is_a_warning_with_the_fix():
    listing = "model-00001-of-00002.safetensors\t40000000000\nmodel-00002-of-00002.safetensors\t23000000000\nconfig.json\t1200\n"
    warned = note(ModelFiles(path="/m", mapped_warn_gb=30), listing)
    assert warned.startswith("63.0 GB, memory-mapped (vLLM's default) on unified memory: warning") and "model.load_strategy: eager" in warned
    assert note(ModelFiles(path="/m", mapped_warn_gb=30), "config.json\t1200\nw.safetensors\t20000000000\n") == "20.0 GB"
    assert note(ModelFiles(path="/m"), listing) == "63.0 GB"  # read eagerly, by a fast loader, or on a GPU of its own
    assert note(ModelFiles(path="/m"), "") is None


@pytest.mark.parametrize("model, unified, warned", [
    ({}, True, True),
    ({"load_strategy": "lazy"}, True, True),
    ({"load_format": "safetensors"}, True, True),
    ({"load_strategy": "eager"}, True, False),
    ({"load_format": "fastsafetensors"}, True, False),
    ({"load_format": "instanttensor", "load_strategy": "lazy"}, True, False),
    ({}, False, False),
])
def test_the_weights_are_warned_about_only_when_mapped_on_unified_memory(model, unified, warned):
    import yaml

    from spark_cluster.config import parse_config
    from spark_cluster.plan import build_plan

    from .conftest import CONFIGS

    data = yaml.safe_load((CONFIGS / "dgx-spark-2node.yaml").read_text())
    data["model"] = {k: v for k, v in data["model"].items() if k not in ("load_format", "load_strategy")} | model
    data["memory"] = {**data.get("memory", {}), "unified": unified}
    plan = build_plan(parse_config(yaml.safe_dump(data)))
    check = next(s.check for s in plan.steps if isinstance(s.check, ModelFiles))
    assert (check.mapped_warn_gb == 30) is warned
    argv = " ".join(plan.vllm_argv)
    assert ("--load-format " + model["load_format"] in argv) if "load_format" in model else "--load-format" not in argv
    assert ("--safetensors-load-strategy " + model["load_strategy"] in argv) if "load_strategy" in model else "--safetensors" not in argv
