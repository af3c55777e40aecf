"""`up` and `down` sequencing on a scripted fake transport (tests/fakes.py): milliseconds, no node.
What the simulated cluster proves for real (tests/test_up.py), these prove for every branch."""

from __future__ import annotations

import pytest

from spark_cluster.checks import BANDWIDTH_REMEDIES
from spark_cluster.config import load_config
from spark_cluster.errors import LockedError, MemoryNotBack, PreflightError, RemoveFailed, StepError
from spark_cluster.executor import Executor
from spark_cluster import lock
from spark_cluster.kept import links as kept_links, memory_baselines

from .conftest import SIM_CONFIGS, recorded_log, recording
from .fakes import MADE, FakeCluster, FakeEngineApi, Unscripted, fake_nodes, removed, started
from .fakes import sim_links


def fake_cfg(executor: str, tmp_path):
    """The simulated cluster's config for a fake run: its state in tmp_path, no flag check, Ray polled at once."""
    c = load_config(SIM_CONFIGS[executor])
    return c.model_copy(update={"state_dir": str(tmp_path), "vllm": c.vllm.model_copy(update={"check_flags": False}),
                               "health": c.health.model_copy(update={"poll_interval_s": 0.01})})


@pytest.fixture(params=sorted(SIM_CONFIGS))
def cfg(request, tmp_path):
    return fake_cfg(request.param, tmp_path)


def up(cluster: FakeCluster, events=None):
    """The whole `up`, readiness included (a fake vLLM API answers it)."""
    return Executor(cluster.cfg, fake_nodes(cluster), (events.append if events is not None else None),
                    http=FakeEngineApi(cluster).client()).up()


def test_a_serving_cluster_is_kept_whole(cfg):
    fake = FakeCluster(cfg).serving()
    res = up(fake)
    assert not res.changed and res.recreated == [] and len(res.kept) == len(fake.plan.containers()) + len(fake.plan.processes())
    assert started(fake) == [] and removed(fake) == []
    assert fake.commands(containing=lock.release_command("spark"))  # the lock was released


def test_an_empty_cluster_starts_workers_first_and_is_ready_only_once_the_engine_answers(cfg):
    fake = FakeCluster(cfg)
    engine = FakeEngineApi(fake)
    res = Executor(cfg, fake_nodes(fake), http=engine.client()).up()
    want = {"ray": ["sim-2:spark-ray-worker", "sim-1:spark-ray-head", "sim-1:spark-ray-head/vllm"],
            "native": ["sim-2:spark-vllm-worker", "sim-1:spark-vllm"]}[cfg.executor]
    assert started(fake) == want and removed(fake) == [] and res.changed
    assert engine.requests == ["GET /health", "GET /v1/models", "POST /v1/completions"]
    assert {"ready/health", "ready/models", "ready/completion"} <= set(res.phases)


def test_a_dead_worker_restarts_the_group_api_first_down_workers_first_up(cfg):
    fake = FakeCluster(cfg).serving()
    worker = next(c for c in fake.plan.containers() if c.node == "sim-2")
    fake.containers["sim-2"][worker.name].state = "exited"
    events: list[dict] = []
    res = up(fake, events)
    head = next(c for c in fake.plan.containers() if c.node == "sim-1")
    assert removed(fake) == [f"sim-1:{head.name}", f"sim-2:{worker.name}"]
    assert started(fake)[:2] == [f"sim-2:{worker.name}", f"sim-1:{head.name}"] and res.changed
    reasons = {e["reason"] for e in events if e["event"] == "container-remove"}
    assert reasons == {f"{worker.name} on sim-2 exited"}
    if cfg.executor == "ray":  # vLLM is asked to stop first (SIGTERM while Ray still runs)
        log = [c for _, c in fake.log]
        sigterm = next(i for i, c in enumerate(log) if "kill -TERM" in c)
        assert sigterm < next(i for i, c in enumerate(log) if f"docker rm -f {head.name}" in c)


def test_vllm_gone_from_its_kept_head_starts_alone_once_what_it_left_is_cleared_and_ray_released_it(tmp_path):
    """Ray's ranks are actors Ray ends with the engine that owned them: the containers and Ray are kept,
    what the earlier engine left in the head container is killed, Ray is waited for until it has
    released the earlier engine's placement group, then vLLM starts again."""
    fake = FakeCluster(fake_cfg("ray", tmp_path)).serving()
    fake.vllm_running, fake.earlier_pg_reads = False, 2
    res = up(fake)
    assert started(fake) == ["sim-1:spark-ray-head/vllm"] and removed(fake) == []
    assert res.recreated == ["spark-ray-head/vllm@sim-1"] and res.kept == ["spark-ray-worker@sim-2", "spark-ray-head@sim-1"]
    steps = [fake.by_node_command[(n, cmd)].id for n, cmd in fake.log
             if (n, cmd) in fake.by_node_command and fake.by_node_command[(n, cmd)].phase in ("clear", "memory", "wait-ray", "serve")]
    assert steps[:1] == ["clear/sim-1/vllm"] and sorted(steps[1:3]) == ["memory/sim-1", "memory/sim-2"]
    assert steps[3:] == ["wait-ray/sim-1/nodes", "wait-ray/sim-1/nodes", "wait-ray/sim-1/nodes", "serve/sim-1/vllm"]


def test_what_an_earlier_engine_left_that_will_not_go_stops_up_before_vllm_starts(tmp_path):
    fake = FakeCluster(fake_cfg("ray", tmp_path)).serving()
    fake.vllm_running = False
    fake.script(fake.plan.steps_in("clear")[0].command, (1, "engine processes still there: 4711\n", ""))
    with pytest.raises(StepError, match="what is left of the earlier engine did not go: engine processes still there: 4711"):
        up(fake)
    assert started(fake) == [] and removed(fake) == []


def test_a_fresh_group_has_nothing_to_clear(cfg):
    fake = FakeCluster(cfg)
    up(fake)
    assert not [cmd for _, cmd in fake.log if cmd in fake.by_command and fake.by_command[cmd].phase == "clear"]


def test_a_node_that_fails_a_check_changes_nothing(cfg):
    fake = FakeCluster(cfg)
    fake.script("docker image inspect", (1, "", "Error: No such image"), node="sim-2")
    fake.script("docker pull", (1, "", "no registry"), node="sim-2")
    fake.script("docker save", (1, "", "cannot save"))
    fake.script("receive-pipe", (1, "", "the sender never connected"), node="sim-2")  # the copy node to node
    with pytest.raises(PreflightError, match="sim-2: image .* is not on this node"):
        up(fake)
    assert started(fake) == [] and removed(fake) == []


def test_a_bug_in_a_node_probe_is_not_reported_as_a_node_problem(cfg):
    fake = FakeCluster(cfg)

    def broken():
        raise KeyError("MemTotal")

    fake.script("/proc/meminfo", broken)
    with pytest.raises(KeyError):  # not PreflightError("nothing was changed"): a bug is a bug
        up(fake)


def test_down_reports_a_container_it_could_not_remove_and_removes_the_rest(cfg):
    fake = FakeCluster(cfg).serving()
    worker = next(c for c in fake.plan.containers() if c.node == "sim-2")
    fake.script(f"docker rm -f {worker.name}", (1, "Error response from daemon: device or resource busy\n", ""), node="sim-2")
    with pytest.raises(RemoveFailed, match=f"sim-2: container {worker.name} could not be removed: Error response from daemon"):
        Executor(cfg, fake_nodes(fake)).down()
    assert list(fake.containers["sim-1"]) == [] and list(fake.containers["sim-2"]) == [worker.name]
    assert fake.commands(containing=lock.release_command("spark"))


def test_a_kill_stops_the_group_in_order_then_removes_it_all_at_once(cfg, tmp_path):
    """The watchdog's restart of a wedged group: SIGKILL, API side first, then the workers; only then
    the (slow) removals; no graceful stop; the logs kept where the incident bundle wants them."""
    fake = FakeCluster(cfg).serving()
    names = {c.node: c.name for c in fake.plan.containers()}
    Executor(cfg, fake_nodes(fake)).down(graceful=False, logs_to=tmp_path / "bundle-logs")
    log = [c for _, c in fake.log]
    kills = [i for i, c in enumerate(log) if c.startswith("docker kill")]
    assert [log[i].split()[2] for i in kills] == [names["sim-1"], names["sim-2"]]
    assert max(kills) < min(i for i, c in enumerate(log) if "docker rm -f" in c)
    assert not [c for c in log if "kill -TERM" in c] and all("docker stop -t 0" in c for c in log if "docker rm -f" in c)
    assert sorted(p.name for p in (tmp_path / "bundle-logs").iterdir()) == sorted(f"{n}--{c}.log" for n, c in names.items())
    assert fake.containers == {"sim-1": {}, "sim-2": {}}


def test_a_lock_that_cannot_be_released_is_reported(cfg):
    fake = FakeCluster(cfg).serving()
    fake.script(lock.release_command("spark"), (1, "", "rm: cannot remove: Read-only file system"))
    events: list[dict] = []
    up(fake, events)
    [warning] = [e for e in events if e["event"] == "warning"]
    assert "could not release the lock ~/.spark-cluster/locks/spark.lock on sim-1" in warning["message"]
    assert "Read-only file system" in warning["message"]


def auto(cfg):
    """The config with `nccl: auto` in place of its hand-written interface names."""
    env = {k: v for k, v in cfg.container.env.items() if k != "GLOO_SOCKET_IFNAME"}
    return cfg.model_copy(update={"nccl": cfg.nccl.model_copy(update={"auto": True, "socket_ifname": None}),
                                  "container": cfg.container.model_copy(update={"env": env})})


def test_nccl_auto_detects_before_anything_starts_remembers_and_starts_with_what_it_found(cfg):
    cfg = auto(cfg)
    fake = FakeCluster(cfg, links=sim_links(cfg))  # the plan `up` must arrive at
    events: list[dict] = []
    up(fake, events)
    assert started(fake) == {"ray": ["sim-2:spark-ray-worker", "sim-1:spark-ray-head", "sim-1:spark-ray-head/vllm"],
                             "native": ["sim-2:spark-vllm-worker", "sim-1:spark-vllm"]}[cfg.executor]
    runs = fake.commands(containing="docker run -d")
    assert runs and all("NCCL_SOCKET_IFNAME=eth0" in c and "GLOO_SOCKET_IFNAME=eth0" in c and "NCCL_IB_HCA" not in c for c in runs)
    detected = next(e for e in events if e["event"] == "link-detected")
    assert detected["nodes"]["sim-2"] == {"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0", "note": "no RDMA devices: NCCL over TCP"}
    # remembered: the next plan (status, the watchdog, `plan`) is the one that runs
    assert kept_links(cfg) == sim_links(cfg)
    assert Executor(cfg, fake_nodes(fake)).plan == fake.plan


def test_nccl_auto_that_finds_no_link_starts_nothing_and_says_what_it_found(cfg):
    cfg = auto(cfg)
    fake = FakeCluster(cfg)
    fake.script("ibdev2netdev", (0, recording("link-sim")["stdout"].replace("10.99.0.11/24", "192.168.1.5/24"), ""), node="sim-2")
    with pytest.raises(PreflightError, match=r"sim-2: no interface holds the node's address 10.99.0.12: interfaces with an IPv4 "
                                             r"address: eth0 192.168.1.5/24; RDMA devices: none"):
        up(fake)
    assert started(fake) == [] and not fake.commands(containing="sysctl") and kept_links(cfg) == {}


def test_the_link_gate_stops_up_before_anything_changes(cfg):
    fake = FakeCluster(cfg)
    fake.script("ip -o route get 10.99.0.12", (0, recording("reach-sim-peer-mtu-smaller")["stdout"], ""), node="sim-1")
    with pytest.raises(PreflightError) as info:
        up(fake)
    assert "sim-1: link eth0 to sim-2: sim-1 reaches sim-2 (10.99.0.12) with small packets but not with 1500-byte packets" in str(info.value)
    assert "ip link set" in str(info.value) and "sim-2: link" not in str(info.value)
    assert started(fake) == [] and not fake.commands(containing="sysctl")


def test_doctor_reports_every_check_and_changes_nothing(cfg):
    fake = FakeCluster(cfg)
    fake.script("docker image inspect", (1, "", "Error: No such image"), node="sim-2")
    findings = Executor(cfg, fake_nodes(fake)).doctor()
    bad = [f for f in findings if f.problem]
    assert [(f.node, f.check) for f in bad] == [("sim-2", "preflight/sim-2/image")]
    assert {f.check for f in findings} >= {"preflight/sim-1/reach-sim-2", "preflight/sim-2/reach-sim-1", "preflight/sim-1/memory"}
    assert next(f for f in findings if f.check == "preflight/sim-1/reach-sim-2").note == "over eth0, MTU 1500 unfragmented, 0.061 ms"
    assert not fake.commands(containing="docker pull") and not fake.commands(containing="docker save")
    assert not fake.commands(containing="mkdir -p -m 700") and not fake.commands(containing="drop_caches")


def test_mixed_drivers_a_bad_kernel_or_a_utilization_above_cudas_ceiling_stop_up_before_anything_starts(cfg):
    fake = FakeCluster(cfg)
    fake.script("/proc/driver/nvidia/version", (0, recording("driver-real-gb10-580.126.09")["stdout"], ""), node="sim-2")
    with pytest.raises(PreflightError) as info:
        up(fake)
    assert "the NVIDIA driver differs between nodes (sim-1 580.142, sim-2 580.126.09)" in str(info.value)
    assert started(fake) == [] and not fake.commands(containing="sysctl -w")
    fake = FakeCluster(cfg)
    fake.script("uname -r", (0, recording("kernel-real-spark-7.0-1019")["stdout"], ""), node="sim-1")
    fake.script("/proc/meminfo || true", (0, recording("cma-real-spark-kho")["stdout"], ""), node="sim-1")
    with pytest.raises(PreflightError) as info:
        up(fake)
    assert [line.split(":")[0] for line in str(info.value).splitlines() if "kho=off" in line] == ["  - sim-1", "  - sim-1"]
    assert started(fake) == []
    greedy = cfg.model_copy(update={"vllm": cfg.vllm.model_copy(update={"gpu_memory_utilization": 0.85})})
    fake = FakeCluster(greedy)
    fake.script("check-memory", (0, f"cuda {int(102.2 * 2**30)} {int(121.69 * 2**30)}\n", ""))  # MiaAI-Lab/GLM-5.3-Flash-EXL3-2x-DGX-Sparks#47
    with pytest.raises(PreflightError, match="gpu_memory_utilization 0.85 asks for 103.4 GiB .* The highest value that would start is 0.83"):
        up(fake)
    assert started(fake) == []


def test_heat_and_gdr_off_are_said_and_up_goes_on(cfg):
    cfg = cfg.model_copy(update={"nccl": cfg.nccl.model_copy(update={"ib_hca": "rocep1s0f0,roceP2p1s0f0"})})
    fake = FakeCluster(cfg)
    fake.script("clocks_throttle_reasons", (0, "83, 2418 MHz, 3003 MHz, 44.70 W, [N/A], 0x0000000000000040\n", ""), node="sim-2")
    fake.script("check-gdr", (0, "mlx5dv_reg_dmabuf_mr no\n", ""))
    events: list[dict] = []
    up(fake, events)
    warned = {(e["node"], e["check"]): e["warning"] for e in events if e["event"] == "preflight-warning"}
    assert set(warned) == {("sim-1", "preflight/sim-1/gdr"), ("sim-2", "preflight/sim-2/gdr"), ("sim-2", "preflight/sim-2/heat")}
    assert "GPU 0 at 83 °C" in warned["sim-2", "preflight/sim-2/heat"] and "hardware thermal slowdown" in warned["sim-2", "preflight/sim-2/heat"]
    assert "GDR 0" in warned["sim-1", "preflight/sim-1/gdr"]
    assert started(fake)  # and up went on
    findings = {f.check: f for f in Executor(cfg, fake_nodes(FakeCluster(cfg))).doctor()}
    assert findings["preflight/sim-1/driver"].note == "580.142 (open kernel module)"
    # doctor with memory.drop_page_cache measures with the page cache up drops first: a warning, not a refusal
    dropping = cfg.model_copy(update={"memory": cfg.memory.model_copy(update={"drop_page_cache": True}),
                                      "vllm": cfg.vllm.model_copy(update={"gpu_memory_utilization": 0.85})})
    fake = FakeCluster(dropping)
    fake.script("check-memory", (0, f"cuda {int(102.2 * 2**30)} {int(121.69 * 2**30)}\n", ""))
    fake.script("MemAvailable):' /proc/meminfo", (0, "MemTotal:       127600816 kB\nMemAvailable:   120000000 kB\n", ""))  # doctor drops nothing
    ceiling = {f.check: f for f in Executor(dropping, fake_nodes(fake)).doctor()}["preflight/sim-1/memory-ceiling"]
    assert not ceiling.problem and "`up` drops it first" in ceiling.warning
    assert findings["preflight/sim-1/heat"].note == "not applicable: no GPU (no nvidia-smi)"
    assert findings["preflight/sim-1/memory-ceiling"].note == "CUDA 110.3 of 121.69 GiB free to allocate: gpu_memory_utilization up to 0.90 starts"


def test_the_clock_cap_is_set_by_up_given_back_by_down_and_kept_by_the_watchdogs_kill(cfg):
    cfg = cfg.model_copy(update={"gpu": cfg.gpu.model_copy(update={"max_clock_mhz": 2100})})
    fake = FakeCluster(cfg)
    events: list[dict] = []
    up(fake, events)
    capped = [e for e in events if e["event"] == "step-ok" and e["step"].endswith("/gpu-clock")]
    assert sorted(e["node"] for e in capped) == ["sim-1", "sim-2"] and capped[0]["note"] == "SM clock capped at 1860 MHz (the GPU's own maximum is lower)"
    fake.script("nvidia-smi -rgc", (0, "All done.\n", ""))
    Executor(cfg, fake_nodes(fake)).down(graceful=False, restore=False)  # the watchdog's kill: its `up` caps it again
    assert not fake.commands(containing="nvidia-smi -rgc")
    fake.serving()
    Executor(cfg, fake_nodes(fake)).down()
    log = [c for _, c in fake.log]
    resets = [i for i, c in enumerate(log) if "nvidia-smi -rgc" in c]
    assert len(resets) == 2 and all(i > max(j for j, c in enumerate(log) if c.startswith("docker rm")) for i in resets)  # after the removals


def test_model_sync_runs_before_the_preflight(cfg):
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"sync": True})})
    fake = FakeCluster(cfg)
    events: list[dict] = []
    up(fake, events)
    kinds = [e["event"] for e in events]
    assert kinds.index("sync-plan") < kinds.index("step-start")
    assert next(e for e in events if e["event"] == "sync-plan")["copies"] == {"sim-2": 0}  # the same files everywhere: nothing to copy


def test_the_bandwidth_test_runs_on_every_node_after_the_other_checks(cfg):
    cfg = cfg.model_copy(update={"link": cfg.link.model_copy(update={"check": "bandwidth", "min_gbits": 1})})
    fake = FakeCluster(cfg)
    findings = Executor(cfg, fake_nodes(fake)).doctor()
    assert next(f for f in findings if f.check == "preflight/sim-1/bandwidth").note == \
        "all-reduce bus bandwidth 4.47 Gb/s (Gloo on CPU: no GPU requested, so not a RoCE figure)"
    log = [c for _, c in fake.log]
    first_allreduce = next(i for i, c in enumerate(log) if "check-bandwidth" in c)
    assert all(i < first_allreduce for i, c in enumerate(log) if "ip -o route get" in c)  # after the link gate
    low = cfg.model_copy(update={"link": cfg.link.model_copy(update={"check": "bandwidth", "min_gbits": 80})})
    with pytest.raises(PreflightError, match="sim-1: the all-reduce across the nodes \\(Gloo on CPU\\) reached 4.5 Gb/s, below link.min_gbits 80"):
        up(FakeCluster(low))


def test_with_perftest_on_every_node_the_bandwidth_test_is_ib_write_bw_per_rail(cfg):
    cfg = cfg.model_copy(update={"link": cfg.link.model_copy(update={"check": "bandwidth", "min_gbits": 80}),
                                 "nccl": cfg.nccl.model_copy(update={"ib_hca": "rocep1s0f0,roceP2p1s0f0"})})
    fake = FakeCluster(cfg)
    fake.script("command -v ib_write_bw", (0, "/usr/bin/ib_write_bw\n", ""))
    findings = Executor(cfg, fake_nodes(fake)).doctor()
    assert next(f for f in findings if f.check == "preflight/sim-1/bandwidth-rdma").note == \
        "ib_write_bw per rail: sim-2 rocep1s0f0 92.6 Gb/s, sim-2 roceP2p1s0f0 97.3 Gb/s"
    assert not [f for f in findings if f.problem] and not fake.commands(containing="check-bandwidth")  # no all-reduce
    server = fake.commands(node="sim-2", containing="ib_write_bw -q 4 -D 5")
    assert server and "-d rocep1s0f0 -p 18515" in server[0] and "-d roceP2p1s0f0 -p 18516" in server[0]
    # one node without perftest: the all-reduce instead
    fake = FakeCluster(cfg)
    fake.script("command -v ib_write_bw", (0, "/usr/bin/ib_write_bw\n", ""), node="sim-1")
    Executor(cfg, fake_nodes(fake)).doctor()
    assert fake.commands(containing="check-bandwidth") and not fake.commands(containing="ib_write_bw -q 4")
    # a rail below the threshold is named with the remedies
    slow = cfg.model_copy(update={"link": cfg.link.model_copy(update={"check": "bandwidth", "min_gbits": 95})})
    fake = FakeCluster(slow)
    fake.script("command -v ib_write_bw", (0, "/usr/bin/ib_write_bw\n", ""))
    bad = [f.problem for f in Executor(slow, fake_nodes(fake)).doctor() if f.problem]
    assert bad == ["ib_write_bw per rail below link.min_gbits 95 (sim-2 rocep1s0f0: 92.6 Gb/s): " + BANDWIDTH_REMEDIES]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the refusal ends the receiver's thread: the point
def test_a_fake_node_refuses_what_nobody_scripted_even_when_the_code_under_test_catches_it(cfg):
    fake = FakeCluster(cfg)
    with pytest.raises(Unscripted, match="sim-1: nothing scripted answers 'uname -a'"):
        fake.answer("sim-1", "uname -a")
    # a node to node image copy whose receiver nobody scripted: `up` catches the refusal as a failed
    # copy, the test's end does not (conftest's fakes_refuse_the_unexpected)
    fake = FakeCluster(cfg)
    fake.script("docker image inspect", (1, "", "Error: No such image"), node="sim-2")
    fake.script("docker pull", (1, "", "no registry"), node="sim-2")
    fake.script("docker save", (1, "", "cannot save"))
    with pytest.raises(PreflightError):
        up(fake)
    assert [node for node, command in fake.unscripted if "receive-pipe" in command] == ["sim-2"]
    MADE.clear()  # both refusals were this test's point


def allowed_commands(*plans) -> set[tuple[str, str]]:
    """(node, command) pairs the plans show: each step's command and what it may also run, on its
    node or on the one an `on <node>:` prefix names (`<port>` stands for the one chosen then,
    `<since>` for the moment vLLM was started)."""
    out = set()
    for plan in plans:
        for s in plan.steps:
            if s.command:
                out.add((s.node, s.command))
            for other in s.also:
                node, _, command = other.partition(": ") if other.startswith("on ") else (f"on {s.node}", "", other)
                out.add((node[3:], command))
    return out


def unplanned(fake: FakeCluster, *plans) -> list[str]:
    import re

    from spark_cluster.engine_log import SINCE
    from spark_cluster.render import quote

    allowed = allowed_commands(*plans)
    patterns = {(n, re.compile(re.escape(c).replace(re.escape("<port>"), r"\d+").replace(re.escape(quote(SINCE)), r"\S+")))
                for n, c in allowed if "<port>" in c or SINCE in c}
    return [f"{n}: {c}" for n, c in fake.log
            if (n, c) not in allowed and not any(n == pn and p.fullmatch(c) for pn, p in patterns)]


@pytest.mark.parametrize("scenario", ["empty", "serving", "worker-exited", "image-missing"])
def test_up_runs_nothing_its_plan_does_not_show(cfg, scenario):
    from spark_cluster.plan import build_plan

    fake = FakeCluster(cfg)
    if scenario in ("serving", "worker-exited"):
        fake.serving()
    if scenario == "worker-exited":
        worker = next(c for c in fake.plan.containers() if c.node == "sim-2")
        fake.containers["sim-2"][worker.name].state = "exited"
    if scenario == "image-missing":  # no registry: copied node to node
        fake.script("docker image inspect", (1, "", "Error: No such image"), node="sim-2")
        fake.script("docker pull", (1, "", "no registry"), node="sim-2")
        fake.script("receive-pipe", (1, "", "no sender"), node="sim-2")
    if scenario == "image-missing":
        with pytest.raises(PreflightError):
            up(fake)
    else:
        up(fake)
    assert fake.log and unplanned(fake, build_plan(cfg)) == []


@pytest.mark.parametrize("graceful", [True, False], ids=["down", "killed"])
def test_down_runs_nothing_its_plan_does_not_show(cfg, graceful):
    from spark_cluster.lifecycle import build_down_plan
    from spark_cluster.plan import build_plan

    fake = FakeCluster(cfg).serving()
    Executor(cfg, fake_nodes(fake)).down(graceful=graceful)
    plan = build_down_plan(cfg, build_plan(cfg), graceful=graceful)
    assert removed(fake) and unplanned(fake, plan) == []
    # and the plan is what ran, in order: the kills, then each container's commands
    kills = [c for _, c in fake.log if c.startswith("docker kill")]
    assert kills == [s.command for s in plan.steps_in("kill")]


def test_a_lock_held_elsewhere_is_reported_and_nothing_runs(cfg):
    fake = FakeCluster(cfg)
    fake.locked = True
    with pytest.raises(LockedError, match="holds the lock of cluster spark: up by pid 1 on elsewhere"):
        up(fake)
    assert started(fake) == [] and fake.locked


def memory_steps(fake: FakeCluster) -> list[str]:
    return [fake.by_node_command[(n, cmd)].id for n, cmd in fake.log
            if (n, cmd) in fake.by_node_command and fake.by_node_command[(n, cmd)].phase == "memory"]


def test_an_engine_start_reads_every_nodes_memory_first_and_keeps_it_and_nothing_starting_reads_none(cfg):
    fake = FakeCluster(cfg)
    up(fake)
    first_start = next(i for i, (_, cmd) in enumerate(fake.log) if cmd in fake.by_command and fake.by_command[cmd].kind == "start")
    memory = [i for i, (n, cmd) in enumerate(fake.log) if (n, cmd) in fake.by_node_command and fake.by_node_command[(n, cmd)].phase == "memory"]
    assert len(memory) == 2 and max(memory) < first_start  # before the first container (native: its ranks)
    kept = memory_baselines(cfg)
    assert sorted(kept) == ["sim-1", "sim-2"] and kept["sim-1"].available_gib == 114.44 and kept["sim-1"].at
    fake.log.clear()
    up(fake)  # serving: nothing starts, nothing waits
    assert memory_steps(fake) == []


def test_a_restart_waits_for_memory_to_come_back_then_starts(tmp_path):
    fake = FakeCluster(fake_cfg("ray", tmp_path))
    up(fake)
    fake.vllm_running = False  # the engine gone from its kept head container: it starts again alone
    fake.available_kb = [80000000, 80000000, 80000000, 80000000, 119000000]  # ~38 GiB held, then back
    events: list[dict] = []
    up(fake, events)
    assert started(fake)[-1] == "sim-1:spark-ray-head/vllm"
    [short] = {e["short"].split(" (")[0] for e in events if e["event"] == "memory-short"}
    assert short == "76.3 GiB available, 114.4 GiB before the last engine start"
    assert memory_baselines(fake.cfg)["sim-1"].available_gib < 114.44  # the figure it started with


def test_memory_that_does_not_come_back_starts_no_engine_and_says_how_much_is_missing_unless_accepted(tmp_path):
    c = fake_cfg("native", tmp_path)
    c = c.model_copy(update={"memory": c.memory.model_copy(update={"back_timeout_s": 0.05})})
    fake = FakeCluster(c)
    up(fake)
    for name in list(fake.containers["sim-2"]):
        fake.containers["sim-2"][name].state = "exited"  # a rank died: the group starts again
    fake.available_kb = [60000000]
    before = started(fake)
    with pytest.raises(MemoryNotBack) as exc:
        up(fake)
    assert exc.value.exit_code == 20 and started(fake) == before  # removed, nothing started into the leak
    assert "sim-2: 57.2 GiB available, 114.4 GiB before the last engine start" in str(exc.value)
    assert "memory did not come back in 0.05s" in str(exc.value) and "--accept-memory" in str(exc.value)
    Executor(c, fake_nodes(fake), http=FakeEngineApi(fake).client(), accept_memory=True).up()
    assert started(fake)[len(before):] == ["sim-2:spark-vllm-worker", "sim-1:spark-vllm"]
    assert memory_baselines(c)["sim-2"].available_gib == 57.22  # the new figure


def test_once_ready_the_engines_own_log_says_where_its_start_went(cfg):
    fake = FakeCluster(cfg)
    fake.script("docker logs --timestamps --since", (0, recorded_log("vllm-0.32-cpu-ray-start-in-kept-head"), ""), node="sim-1")
    events: list[dict] = []
    res = up(fake, events)
    [asked] = fake.commands("sim-1", "docker logs --timestamps --since")
    assert asked.endswith(f" {fake.plan.api_container} 2>&1")
    # the recorded start's parts (its import ran before this run's clock: none)
    assert {k: v for k, v in res.phases.items() if k.startswith("engine/")} == {
        "engine/import": 0.0, "engine/load": 12.41, "engine/warmup": 0.55, "engine/api": 1.77, "engine/load/weights": 0.01}
    [e] = [e for e in events if e["event"] == "engine-start"]
    assert e["kv_tokens"] == 2097152 and e["kv_device"] == "CPU"
    fake.log.clear()
    up(fake)  # nothing started: no log read
    assert fake.commands(containing="docker logs --timestamps --since") == []


def test_the_most_kv_cache_an_engine_of_these_flags_got_is_kept_and_a_start_with_less_is_told(tmp_path):
    from spark_cluster.kept import kv_capacity
    from spark_cluster.plan import build_plan
    from spark_cluster.status import kv_line

    log = recorded_log("vllm-0.32-cpu-ray-start-in-kept-head")
    fake = FakeCluster(fake_cfg("ray", tmp_path))
    answers = [log, log.replace("2,097,152 tokens", "1,900,000 tokens")]
    fake.script("docker logs --timestamps --since", lambda: (0, answers.pop(0), ""), node="sim-1")
    up(fake)
    assert kv_capacity(fake.cfg).tokens == 2097152
    assert kv_line(fake.cfg, build_plan(fake.cfg)).startswith("2,097,152 tokens (CPU): the most an engine of these flags got (")
    fake.vllm_running = False  # the engine starts again in its kept head container, with less
    events: list[dict] = []
    up(fake, events)
    [less] = [e for e in events if e["event"] == "kv-less"]
    assert less["kv_tokens"] == 1900000 and less["most"] == 2097152 and "9.4 % less" in less["message"]
    assert kv_capacity(fake.cfg).tokens == 2097152  # the most is kept
    other = fake.cfg.model_copy(update={"vllm": fake.cfg.vllm.model_copy(update={"max_model_len": 1024})})
    assert " for earlier flags (" in kv_line(other, build_plan(other))
