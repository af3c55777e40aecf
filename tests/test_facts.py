"""The facts read from nodes: each parser on outputs recorded from the simulated cluster and from
real Sparks (tests/data/facts/*.json: where it was recorded, the command, its exit code and output,
and the fact it must give), and on the odd outputs a node can produce."""

from __future__ import annotations

import dataclasses
import json
import subprocess

import pytest

from spark_cluster.box_facts import parse_clock_lock, parse_cma, parse_driver, parse_heat, parse_kernel
from spark_cluster.config import load_config
from spark_cluster.memory_back import parse_memory
from spark_cluster.facts import containers_command, gpu_smoke_command, image_platform_command, model_files_command, parse_containers, parse_file_listing, parse_gpu, parse_gpu_smoke, parse_meminfo, parse_metrics, parse_platform, parse_process, parse_ray_state, parse_sysctl, platforms_command, process_command, progressed, same_platform, sysctl_command
from spark_cluster.link_facts import SYSFS_IBDEV2NETDEV, parse_link, parse_rdma_bandwidth, parse_reach, parse_ib_write_bw, parse_ibdev2netdev, parse_ip_addr, parse_nccl_tests, parse_ping, reach_command
from spark_cluster.plan import build_plan
from spark_cluster.ranks import parse_gpu_activity

from .conftest import FACTS, SIM_CONFIG, recording

RECORDED = sorted(FACTS.glob("*.json"))


def vllm_process():
    return build_plan(load_config(SIM_CONFIG)).processes()[0]


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
def test_recorded_output_gives_the_recorded_fact(path):
    rec = json.loads(path.read_text())
    parse = {
        "ray-state": lambda: parse_ray_state(rec["stdout"], rec["stderr"]).model_dump(by_alias=True),
        "process": lambda: parse_process(vllm_process().argv, rec["exit_code"], rec["stdout"], rec["stderr"]).model_dump(),
        "containers": lambda: parse_containers("sim-1", rec["exit_code"], rec["stdout"], rec["stderr"]).model_dump(),
        "meminfo": lambda: parse_meminfo(rec["stdout"]).model_dump(),
        "memory": lambda: parse_memory(rec["stdout"]).model_dump(exclude={"at"}),
        "gpu": lambda: parse_gpu(rec["stdout"]).model_dump(),
        "ibdev2netdev": lambda: [x.model_dump() for x in parse_ibdev2netdev(rec["stdout"])],
        "ip-addr": lambda: [x.model_dump() for x in parse_ip_addr(rec["stdout"])],
        "platform": lambda: parse_platform(rec["stdout"]),
        "ping": lambda: parse_ping(rec["exit_code"], rec["stdout"], rec["stderr"]).model_dump(),
        "ib_write_bw": lambda: parse_ib_write_bw(rec["stdout"]).model_dump(),
        "nccl-tests": lambda: parse_nccl_tests(rec["stdout"]).model_dump(),
        "gpu-smoke": lambda: parse_gpu_smoke(rec["exit_code"], rec["stdout"], rec["stderr"]).model_dump(),
        "reach": lambda: parse_reach(rec["stdout"]).model_dump(),
        "link": lambda: [[x.model_dump() for x in part] for part in parse_link(rec["stdout"])],
        "kernel": lambda: parse_kernel(rec["stdout"]).model_dump(),
        "cma": lambda: parse_cma(rec["stdout"]).model_dump(),
        "driver": lambda: parse_driver(rec["stdout"]).model_dump(),
        "heat": lambda: parse_heat(rec["stdout"]).model_dump(),
        "clock-lock": lambda: parse_clock_lock(rec["exit_code"], rec["stdout"]).model_dump(),
        "gpu-activity": lambda: (lambda gpus, error: {"gpus": [dataclasses.asdict(g) for g in gpus], "error": error})(
            *parse_gpu_activity(rec["stdout"])),
    }[rec["fact"]]
    assert parse() == rec["parsed"]


def test_the_recordings_cover_serving_and_dead_ray_and_every_process_state():
    kinds = {json.loads(p.read_text())["case"] for p in RECORDED}
    assert {"ray-serving", "ray-worker-dead", "vllm-running", "vllm-gone", "vllm-not-started"} <= kinds


def test_ray_state_on_a_serving_recording_names_nodes_group_and_ranks():
    rec = recording("ray-serving")
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
    fact = parse_process(vllm_process().argv, 0, "301 sleep 600 \n")
    assert fact.state == "gone" and "another process" in fact.detail


def test_process_in_a_container_that_does_not_run_is_unknown():
    fact = parse_process(vllm_process().argv, 1, "", "Error response from daemon: Container abc is paused, unpause the container before exec\n")
    assert fact.state == "unknown" and "paused" in fact.detail


def test_process_command_quotes_the_container_and_pid_file():
    cmd = process_command(vllm_process().container, vllm_process().pid_file)
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
    from spark_cluster.observe import read_ray_state

    rec = recording("ray-serving")
    assert read_ray_state(FakeHeadWithRecording(rec), rec["command"], 30).alive == ["10.99.0.11", "10.99.0.12"]
    ray = read_ray_state(FakeHeadThatDoesNotAnswer(), "docker exec ...", 30)
    assert ray.error == "sim-1: SSH to 10.99.0.11 failed: timed out" and ray.nodes == []


def test_meminfo_of_a_real_spark_is_its_121_gib():
    rec = recording("meminfo-real-spark-idle")
    mem = parse_meminfo(rec["stdout"])
    assert (mem.total_gib, mem.available_gib) == (121.69, 38.31) and mem.known  # 127600816 kB, 40174336 kB
    assert not parse_meminfo("grep: /proc/meminfo: No such file or directory").known
    assert parse_meminfo("MemTotal:       1000 kB\n").available_gib is None


def test_gpu_of_a_real_spark_is_unified_memory():
    gpu = parse_gpu(recording("gpu-real-spark")["stdout"])
    assert gpu.names == ["NVIDIA GB10"] and gpu.unified_memory and gpu.summary() == "NVIDIA GB10: unified memory (see memory)"
    discrete = parse_gpu("NVIDIA H100 80GB HBM3, 1024 MiB, 81559 MiB\n")
    assert not discrete.unified_memory and discrete.summary() == "NVIDIA H100 80GB HBM3: 1024 MiB / 81559 MiB"
    assert parse_gpu("no nvidia-smi").summary() == "no nvidia-smi"
    failed = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    assert parse_gpu(failed).error == failed and parse_gpu("").summary() is None


@pytest.mark.parametrize("case, up", [
    # one cable in cage 0: both of its twins are up, cage 1's are down
    ("ibdev-real-spark-direct-cable", {"rocep1s0f0": "enp1s0f0np0", "roceP2p1s0f0": "enP2p1s0f0np0"}),
    # cage 1, listed roceP2 first
    ("ibdev-real-spark-cage1-p2-first", {"roceP2p1s0f1": "enP2p1s0f1np1", "rocep1s0f1": "enp1s0f1np1"}),
    # both cages cabled (a ring of three)
    ("ibdev-real-spark-both-cages", {"rocep1s0f0": "enp1s0f0np0", "rocep1s0f1": "enp1s0f1np1",
                                     "roceP2p1s0f0": "enP2p1s0f0np0", "roceP2p1s0f1": "enP2p1s0f1np1"}),
    # the capture's trailing shell prompt is no device
    ("ibdev-real-spark-trailing-prompt", {"roceP2p1s0f0": "enP2p1s0f0np0", "rocep1s0f0": "enp1s0f0np0"}),
])
def test_ibdev2netdev_of_real_sparks_maps_every_device_and_says_which_are_up(case, up):
    ports = parse_ibdev2netdev(recording(case)["stdout"])
    assert len(ports) == 4 and {p.port for p in ports} == {1}
    assert {p.device: p.netdev for p in ports if p.up} == up


def test_ip_addr_of_a_real_spark_without_a_cable_shows_every_cx7_netdev_without_carrier():
    ifaces = {i.name: i for i in parse_ip_addr(recording("ip-addr-real-spark-no-cable")["stdout"])}
    assert list(ifaces) == ["lo", "enP7s7", "enp1s0f0np0", "enp1s0f1np1", "enP2p1s0f0np0", "enP2p1s0f1np1", "wlP9s9", "docker0"]
    for name in ("enp1s0f0np0", "enp1s0f1np1", "enP2p1s0f0np0", "enP2p1s0f1np1"):
        assert (ifaces[name].carrier, ifaces[name].state, ifaces[name].mtu, ifaces[name].addresses) == (False, "DOWN", 1500, [])
    assert ifaces["wlP9s9"].carrier and ifaces["wlP9s9"].addresses == ["192.168.111.87/24"]  # the Wi-Fi: IPv4 only
    assert ifaces["enP7s7"].altnames == ["enP7p1s0"] and ifaces["enP7s7"].addresses == []  # IPv6 link-local is not kept
    assert not ifaces["docker0"].carrier and ifaces["docker0"].addresses == ["172.17.0.1/16"]


@pytest.mark.parametrize("case, addresses", [
    ("ip-addr-real-spark-static", ["10.0.1.1/24"]),
    ("ip-addr-real-spark-link-local", ["169.254.20.98/16", "169.254.201.68/16"]),  # two nodes' captures in one block
])
def test_ip_addr_of_a_cabled_cx7_netdev_has_carrier_and_its_address(case, addresses):
    ifaces = parse_ip_addr(recording(case)["stdout"])
    assert [i.name for i in ifaces] == ["enp1s0f0np0"] * len(addresses)
    assert all(i.carrier and i.state == "UP" and i.mtu == 1500 for i in ifaces)
    assert [a for i in ifaces for a in i.addresses] == addresses


def test_a_real_spark_runs_arm64_containers_and_an_amd64_image_is_another_platform():
    spark = parse_platform(recording("docker-version-real-spark")["stdout"])  # the Server section, not the client's
    assert spark == "linux/arm64"
    # what `image_platform_command` prints for an amd64-only image, and for a multi-arch image's arm64 variant
    assert not same_platform(spark, parse_platform("linux/amd64\n"))
    assert same_platform(spark, parse_platform("linux/arm64/v8\n"))
    assert same_platform("linux/aarch64", spark)
    assert "{{.Architecture}}" in image_platform_command("nvcr.io/nvidia/vllm:25.11-py3")


@pytest.mark.parametrize("text", ["", "Error response from daemon: No such image: x\n", "Cannot connect to the Docker daemon\n",
                                  "linux/arm64\nlinux/amd64\n"])
def test_no_platform_from_an_error_or_an_odd_answer(text):
    assert parse_platform(text) is None


def test_bandwidth_of_real_sparks_in_gbits():
    # one rail of a GB10 tops out near 92-112 Gb/s; the two twins of one cable together near 190
    rails = [parse_ib_write_bw(recording(f"ib-write-bw-real-spark-rail{i}")["stdout"]).gbits for i in (0, 1)]
    assert rails == [92.57, 97.28]
    assert parse_ib_write_bw(recording("ib-write-bw-real-gb10-4qp")["stdout"]).gbits == 111.61
    # nccl-tests report GB/s: the healthy pair at 21.4 GB/s, the same pair degraded to 2.8 GB/s
    healthy, degraded = (parse_nccl_tests(recording(f"nccl-tests-real-spark-{x}")["stdout"]).gbits for x in ("healthy", "degraded"))
    assert (healthy, degraded) == (171.23, 22.57)
    # an excerpt without nccl-tests' own average: the rows' bus bandwidth, out-of-place and in-place (18.94, 20.95 GB/s)
    assert parse_nccl_tests(recording("nccl-tests-real-spark-no-average")["stdout"]).gbits == 159.56


def test_bandwidth_in_mb_per_second_and_failed_runs():
    table = " #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]\n 65536      5000             11000.00            11500.00             0.18\n"
    assert parse_ib_write_bw(table).gbits == 92.0
    failed = parse_ib_write_bw(" Couldn't connect to 10.0.0.2:18515\nUnable to init the socket connection\n")
    assert failed.gbits is None and failed.error == "Unable to init the socket connection"
    assert parse_nccl_tests("").error == "no output"
    assert parse_nccl_tests("# nccl-tests version 2.18.3\nNCCL error: unhandled system error\n").error == "NCCL error: unhandled system error"


@pytest.mark.parametrize("case, words", [
    ("gpu-smoke-no-toolkit", ["install nvidia-container-toolkit", "nvidia-ctk runtime configure"]),
    ("gpu-smoke-no-nvidia-runtime", ["no `nvidia` runtime registered"]),
    ("gpu-smoke-amd64-image", ["another CPU architecture", "arm64"]),
])
def test_a_gpu_smoke_run_that_fails_says_why_and_the_fix(case, words):
    rec = recording(case)
    fact = parse_gpu_smoke(rec["exit_code"], rec["stdout"], rec["stderr"])
    assert fact.gpus == [] and fact.error and fact.error in rec["stderr"]
    for w in words:
        assert w in fact.fix


def test_a_gpu_smoke_run_on_a_spark_lists_the_gb10_and_an_empty_list_is_no_success():
    assert parse_gpu_smoke(0, recording("gpu-smoke-real-spark")["stdout"]) == parse_gpu_smoke(0, "GPU 0: NVIDIA GB10 (UUID: GPU-1)\n")
    assert parse_gpu_smoke(0, recording("gpu-smoke-real-spark")["stdout"]).gpus == ["NVIDIA GB10"]
    assert parse_gpu_smoke(0, "").error == "the container listed no GPU"
    odd = parse_gpu_smoke(1, "", "something else went wrong\n")
    assert odd.error == "something else went wrong" and odd.fix is None


def test_the_model_listing_follows_a_hugging_face_snapshots_symlinks(tmp_path):
    """The real command in a real shell, on the layout of the Hugging Face cache: a snapshot folder
    of symlinks into blobs/. A broken symlink (a copy that left it dangling) is not a file."""
    import subprocess

    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    (snap / "sub").mkdir(parents=True)
    (repo / "blobs" / "b1").write_bytes(b"x" * 1000)
    (repo / "blobs" / "b2").write_bytes(b"{}")
    (snap / "model.safetensors").symlink_to("../../blobs/b1")
    (snap / "sub" / "config.json").symlink_to("../../../blobs/b2")
    (snap / "tokenizer.json").symlink_to("../../blobs/missing")
    res = subprocess.run(["sh", "-c", model_files_command(str(snap))], capture_output=True, text=True)
    assert parse_file_listing(res.stdout) == {"model.safetensors": 1000, "sub/config.json": 2}


def test_sysctl_one_line_per_key_in_order():
    keys = ["vm.swappiness", "net.core.rmem_max", "vm.nope"]
    assert sysctl_command(keys).count("sysctl -n ") == 3
    got = parse_sysctl(keys, "1\n134217728\nsysctl: cannot stat /proc/sys/vm/nope: No such file or directory\n")
    assert got["vm.swappiness"] == "1" and got["net.core.rmem_max"] == "134217728" and got["vm.nope"].startswith("sysctl: cannot stat")
    assert parse_sysctl(keys, "1\n") == {"vm.swappiness": "1", "net.core.rmem_max": None, "vm.nope": None}


CONTAINER_LINE = ("3f2c|/spark-ray-head|ray-head|running|sha256:ab|2026-11-29T12:00:00.5Z|0|0|1234abcd\n"
                  "9e1d|/spark-ray-worker|ray-worker|exited|sha256:ab|2026-11-29T12:00:00.1Z|2|137|1234abcd\n")


def test_containers_from_docker_inspect():
    fact = parse_containers("sim-1", 0, CONTAINER_LINE)
    head, worker = fact.containers
    assert fact.error is None and head.name == "spark-ray-head" and head.running and head.spec_hash == "1234abcd"
    assert (worker.state, worker.exit_code, worker.restarts, worker.node) == ("exited", 137, 2, "sim-1")
    assert parse_containers("sim-1", 0, "").containers == []


def test_containers_when_docker_cannot_be_asked_or_one_vanished():
    down = parse_containers("sim-1", 1, "", "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?\n")
    assert down.error.startswith("Cannot connect to the Docker daemon") and down.containers == []
    # removed between `docker ps` and `docker inspect`: the others are still listed, and it is no error
    raced = parse_containers("sim-1", 1, CONTAINER_LINE.splitlines()[0] + "\n", "Error: No such object: 9e1d\n")
    assert raced.error is None and [c.name for c in raced.containers] == ["spark-ray-head"]
    assert "label=spark-cluster.cluster=my cluster" in containers_command("my cluster").replace("'", "")


METRICS_TEXT = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_count{engine="0",model_name="m"} 41.0
vllm:iteration_tokens_total_sum{engine="0",model_name="m"} 500.0
vllm:generation_tokens_total{engine="0",model_name="m"} 400.0
vllm:generation_tokens_total{engine="1",model_name="m"} 100.0
vllm:prompt_tokens_total{engine="0",model_name="m"} 27.0
"""


def test_metrics_summed_over_label_sets():
    m = parse_metrics(METRICS_TEXT)
    assert m == {"running": 3.0, "waiting": 1.0, "steps_total": 41.0, "generation_tokens_total": 500.0, "prompt_tokens_total": 27.0}
    assert parse_metrics("<html>502 Bad Gateway</html>") == {}
    assert parse_metrics('vllm:num_requests_running{engine="0" 3.0\n') == {}


@pytest.mark.parametrize("before,after,moved", [
    ((10, 100, 5), (10, 100, 5), False),
    ((10, 100, 5), (11, 100, 5), True),  # one engine step
    ((10, 100, 5), (10, 100, 9), True),  # prompt tokens only: a long prefill is progress
    ((None, 100, 5), (None, 101, 5), True),  # an older vLLM without the step counter
    ((None, None, None), (10, 100, 5), False),  # a first reading is no movement
    ((10, 100, 5), (None, None, None), False),  # nothing read: no evidence of progress
    ((10, 100, 5), (0, 0, 0), True),  # counters reset (a new engine): they moved
])
def test_progress_is_any_counter_moving(before, after, moved):
    assert progressed(before, after) is moved


def test_every_node_command_is_valid_shell():
    """`sh -n` (parse only) over each fact command and the status/watchdog node script, as they reach a node."""
    import subprocess

    from spark_cluster.facts import CLOCK_COMMAND, DOCKER_DISK_COMMAND, DOCKER_PLATFORM_COMMAND, GPU_COMMAND, MEMINFO_COMMAND

    from spark_cluster.link_facts import IBDEV2NETDEV_COMMAND, IP_ADDR_COMMAND, LINK_COMMAND, PERFTEST_COMMAND, ib_write_bw_client_command, ib_write_bw_server_command
    from spark_cluster.observe import node_script

    cfg = load_config(SIM_CONFIG)
    cfg = cfg.model_copy(update={"sysctl": {"vm.swappiness": 1, "net.core.rmem_max": 1 << 27}})
    plan = build_plan(cfg)
    scripts = [containers_command("a b"), MEMINFO_COMMAND, GPU_COMMAND, sysctl_command(["vm.swappiness", "x.y"]), sysctl_command([]),
               process_command(vllm_process().container, vllm_process().pid_file), node_script(cfg, plan.processes()), node_script(cfg.model_copy(update={"sysctl": {}}), []),
               IBDEV2NETDEV_COMMAND, IP_ADDR_COMMAND, DOCKER_PLATFORM_COMMAND, image_platform_command("a b'c"),
               reach_command("10.0.0.2; x"), reach_command("10.0.0.2; x", 9000), platforms_command("a b'c"), LINK_COMMAND,
               DOCKER_DISK_COMMAND, CLOCK_COMMAND, gpu_smoke_command("img; rm -rf x"), PERFTEST_COMMAND,
               ib_write_bw_server_command(["a b", "c'd"]), ib_write_bw_client_command(["a b"], [("n 2", "10.0.0.2; x", 1)])]
    for script in scripts:
        res = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert res.returncode == 0, f"{res.stderr}\n{script}"


STUB_DOCKER = ("docker() { case \"$1\" in ps) echo abc;; inspect) printf '%s\\n' 'abc|/spark-ray-head|ray-head|running|sha256:1|2026-11-29T12:00:00Z|0|0|h';;"
               " exec) echo '309 vllm serve /models/tiny-qwen3';; esac; }\n")
STUB_NO_DOCKER = ("docker() { echo 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?' >&2;"
                  " return 1; }\n")


def on_stubbed_node(stubs: str):
    """The node script run by a real shell with docker and sysctl stubbed, read as status reads it."""
    import subprocess

    from spark_cluster.observation import NodeObs
    from spark_cluster.observe import node_script, parse_node_output

    cfg = load_config(SIM_CONFIG)
    plan = build_plan(cfg)
    res = subprocess.run(["sh", "-c", "sysctl() { echo 1; }\n" + stubs + node_script(cfg, plan.processes())], capture_output=True, text=True)
    return parse_node_output(cfg, plan, NodeObs(name="sim-1", role="head", reachable=True), res.stdout)


def test_node_script_read_on_a_stubbed_node():
    obs = on_stubbed_node(STUB_DOCKER)
    assert obs.error is None and obs.sysctl == {"vm.swappiness": {"expected": "1", "actual": "1"}}
    assert [(c.name, c.state, c.spec_current) for c in obs.containers] == [("spark-ray-head", "running", False)]  # hash "h"
    assert [(p.name, p.state, p.pid) for p in obs.processes] == [("vllm", "running", 309)]
    assert obs.mem_total_gib and obs.mem_total_gib > 0  # this machine's own /proc/meminfo


def test_a_node_whose_docker_does_not_answer_says_so():
    from spark_cluster.judge import verdict

    obs = on_stubbed_node(STUB_NO_DOCKER)
    assert obs.error.startswith("docker does not answer: Cannot connect to the Docker daemon")
    assert [c.state for c in obs.containers] == ["missing"] and obs.processes[0].state == "unknown"
    from .samples import EXPECTED, obs as observation

    seen = observation()
    seen.nodes[0] = obs
    word, reason = verdict(seen, served_model="tiny-qwen3", expected_nodes=EXPECTED)
    assert word == "down" and reason.startswith("sim-1: docker does not answer")


def test_a_process_fact_never_keeps_the_command_line():
    """`--api-key` in vllm.extra_args ends up in vLLM's argv: status, events and incident bundles
    show the process fact, so its command line must not be in it."""
    p = vllm_process()
    running = parse_process(p.argv, 0, "309 /opt/venv/bin/python3 /opt/venv/bin/vllm serve /m --api-key sk-very-secret\n")
    assert running.state == "running" and "sk-very-secret" not in running.model_dump_json()
    other = parse_process(p.argv, 0, "309 /usr/bin/python3 /srv/app.py --token sk-very-secret\n")
    assert other.state == "gone" and other.detail == "pid 309 is another process now (python3)"


def test_the_rails_of_the_heads_ib_write_bw_clients_each_give_their_figure():
    # the two rails of a real Spark (tests/data/facts/ib-write-bw-real-spark-rail*), as ib_write_bw_client_command marks them
    out = "".join(f"== spark-2 {hca}\n" + recording(f"ib-write-bw-real-spark-rail{i}")["stdout"]
                  for i, hca in enumerate(["rocep1s0f0", "roceP2p1s0f0"]))
    out += "== spark-3 rocep1s0f0\nCouldn't connect to 10.0.0.3:18515\n"
    rails = parse_rdma_bandwidth(out)
    assert {k: v.gbits for k, v in rails.items()} == {"spark-2 rocep1s0f0": 92.57, "spark-2 roceP2p1s0f0": 97.28, "spark-3 rocep1s0f0": None}
    assert rails["spark-3 rocep1s0f0"].error == "Couldn't connect to 10.0.0.3:18515"


def test_without_ibdev2netdev_the_same_lines_come_from_sysfs(tmp_path):
    # a Spark's sysfs as the kernel lays it out: /sys/class/infiniband/<dev>/ports/1/state, <dev>/device/net/<netdev>
    for dev, netdev, state in [("rocep1s0f0", "enp1s0f0np0", "4: ACTIVE"), ("roceP2p1s0f0", "enP2p1s0f0np0", "4: ACTIVE"),
                               ("rocep1s0f1", "enp1s0f1np1", "1: DOWN")]:
        (tmp_path / dev / "ports" / "1").mkdir(parents=True)
        (tmp_path / dev / "ports" / "1" / "state").write_text(state + "\n")
        (tmp_path / dev / "device" / "net" / netdev).mkdir(parents=True)
    out = subprocess.run(["sh", "-c", SYSFS_IBDEV2NETDEV.replace("/sys/class/infiniband", str(tmp_path))], capture_output=True, text=True).stdout
    assert sorted((p.device, p.netdev, p.up) for p in parse_ibdev2netdev(out)) == [
        ("roceP2p1s0f0", "enP2p1s0f0np0", True), ("rocep1s0f0", "enp1s0f0np0", True), ("rocep1s0f1", "enp1s0f1np1", False)]
    empty = subprocess.run(["sh", "-c", SYSFS_IBDEV2NETDEV.replace("/sys/class/infiniband", str(tmp_path / "none"))], capture_output=True, text=True)
    assert empty.stdout == ""  # no ConnectX (the simulated nodes): no lines
