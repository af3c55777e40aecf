"""What the ranks are doing: the two facts' parsers on recorded outputs, and the pure rules that tell
a long step or a compile from a wedge."""

from __future__ import annotations

import subprocess

import pytest

from spark_cluster.ranks import (GPU_ACTIVITY_COMMAND, GpuBaseline, NodeActivity, ProcessesReading, group_activity,
                                 learn_baseline, node_activity, parse_gpu_activity, parse_processes, parse_stat_line,
                                 processes_command)

from .conftest import recording


def readings(case: str):
    """A recording's lines, each one reading of the one GPU (sampled every 0.5 s)."""
    rec = recording(case)
    assert rec["command"] == GPU_ACTIVITY_COMMAND  # recorded in the columns our command asks for
    out = []
    for line in rec["stdout"].splitlines():
        gpus, error = parse_gpu_activity(line)
        assert error is None and len(gpus) == 1
        out.append(gpus[0])
    return out


def learned(case: str, *, idle: bool) -> GpuBaseline:
    b = GpuBaseline()
    for g in readings(case):
        b = learn_baseline(b, g.power_w, idle=idle, working=not idle)
    return b


def test_utilization_cannot_tell_work_from_a_spin_wait_but_power_and_memory_traffic_can():
    work, spin, idle = readings("gpu-activity-h200-work"), readings("gpu-activity-h200-spin"), readings("gpu-activity-h200-idle")
    assert min(g.util_gpu for g in spin) >= max(g.util_gpu for g in work)  # 100 vs 99 %: useless
    assert min(g.power_w for g in work) > 600 and max(g.power_w for g in spin) < 150 and max(g.power_w for g in idle) < 130
    assert all(g.util_memory == 0 for g in spin) and all(g.util_memory >= 20 for g in work)


@pytest.mark.parametrize("busy_level", [False, True])
def test_an_h200_spinning_in_a_collective_is_waiting_and_one_at_work_is_working(busy_level):
    """Against the idle baseline alone, and once the busy level was learned too."""
    baseline = learned("gpu-activity-h200-idle", idle=True)
    assert 124 < baseline.idle_w < 127
    if busy_level:
        baseline = GpuBaseline(baseline.idle_w, learned("gpu-activity-h200-work", idle=False).busy_w)
    for g in readings("gpu-activity-h200-spin"):
        act = node_activity("n", [], None, ProcessesReading(), [g], baseline)
        assert (act.activity, act.kind) == ("waiting", "gpu"), act
    for g in readings("gpu-activity-h200-work"):
        # power alone: the memory traffic of real work is left out to show power decides by itself
        g = type(g)(g.power_w, g.util_gpu, None, g.sm_mhz, g.temperature_c)
        assert node_activity("n", [], None, ProcessesReading(), [g], baseline).activity == "working"


def test_a_gb10_reads_na_where_it_has_no_memory_of_its_own_and_its_deadlock_power_is_below_the_line():
    [gpu] = readings("gpu-activity-gb10-idle")
    assert (gpu.power_w, gpu.util_gpu, gpu.util_memory, gpu.sm_mhz, gpu.temperature_c) == (11.17, 0, 0, None, 35)
    idle = learn_baseline(GpuBaseline(), gpu.power_w, idle=True, working=False)
    # eugr/spark-vllm-docker#260: ~45 W healthy, 16-27 W deadlocked (user-reported figures)
    baseline = learn_baseline(idle, 45.0, idle=False, working=True)
    for watts, want in [(16, "waiting"), (27, "waiting"), (45, "working")]:
        reading = type(gpu)(power_w=watts, util_gpu=95, util_memory=None)
        assert node_activity("spark-2", [], None, ProcessesReading(), [reading], baseline).activity == want, watts
    # before any busy level was learned the line sits higher (idle + 15 W): a 27 W deadlock then reads as
    # working, and the busy budget, not the power, ends it (the safe side: no false restart)
    reading = type(gpu)(power_w=27, util_gpu=95, util_memory=None)
    assert node_activity("spark-2", [], None, ProcessesReading(), [reading], idle).activity == "working"


def test_gpu_activity_without_nvidia_smi_or_a_baseline():
    assert parse_gpu_activity("no nvidia-smi\n") == ([], "no nvidia-smi")
    failed = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    assert parse_gpu_activity(failed) == ([], failed)
    gpus, _ = parse_gpu_activity("130.0, 100, 0, 1980, 41\n")
    act = node_activity("n", [], None, ProcessesReading(), gpus, GpuBaseline())
    assert act.activity == "unknown" and "no idle baseline" in act.evidence


def test_proc_stat_lines_with_odd_process_names():
    line = "4242 (VLLM::Worker (TP) 1) R 4200 4200 1 0 -1 4194560 100 0 0 0 1500 250 7 3 20 0 12 0 999 0 0"
    p = parse_stat_line(line)
    assert (p.pid, p.name, p.state, p.ppid, p.cpu_ticks) == (4242, "VLLM::Worker (TP) 1", "R", 4200, 1500 + 250 + 7 + 3)
    assert parse_stat_line("garbage") is None and parse_stat_line("12 (x) R") is None


def stat(pid: int, name: str, state: str, ticks: int, ppid: int = 1) -> str:
    return f"{pid} ({name}) {state} {ppid} 1 1 0 -1 0 0 0 0 0 {ticks} 0 0 0 20 0 1 0 1 0 0"


def reading(uptime: float, *procs: str, container: str = "spark-ray-worker", workers: tuple[int, ...] = ()) -> ProcessesReading:
    text = f"##procs {uptime} 100\n== {container}\n" + "".join(p + "\n" for p in procs) + "".join(f"compile-worker {w}\n" for w in workers)
    return parse_processes(text)


C = ["spark-ray-worker"]


@pytest.mark.parametrize("before, after, paused, want", [
    # a CPU rank computing: a core for the whole interval
    ([stat(10, "ray::RayWorkerP", "S", 1000)], [stat(10, "ray::RayWorkerP", "R", 1200)], (), "working"),
    # starved to 1 % of a core: one tick in two seconds is still work
    ([stat(10, "ray::RayWorkerP", "R", 1000)], [stat(10, "ray::RayWorkerP", "R", 1001)], (), "working"),
    # waiting in the collective: asleep, no CPU
    ([stat(10, "ray::RayWorkerP", "S", 1000)], [stat(10, "ray::RayWorkerP", "S", 1000)], (), "waiting"),
    # SIGSTOP of the rank
    ([stat(10, "ray::RayWorkerP", "R", 1000)], [stat(10, "ray::RayWorkerP", "T", 1000)], (), "stopped"),
    # docker pause of its container
    ([stat(10, "ray::RayWorkerP", "S", 1000)], [stat(10, "ray::RayWorkerP", "S", 1000)], ("spark-ray-worker",), "stopped"),
    # a compiler started under the rank since the last reading, using CPU; the rank waits for it
    ([stat(10, "ray::RayWorkerP", "S", 1000)], [stat(10, "ray::RayWorkerP", "S", 1000), stat(11, "cc1plus", "R", 150, 10)], (), "compiling"),
    # the API server answering our own probes is no rank: the rank itself sleeps
    ([stat(9, "vllm", "S", 10), stat(10, "ray::RayWorkerP", "S", 1000)], [stat(9, "vllm", "R", 90), stat(10, "ray::RayWorkerP", "S", 1000)], (),
     "waiting"),
    # a compiler that stopped using CPU is not a compile
    ([stat(11, "cc1plus", "S", 150, 10)], [stat(11, "cc1plus", "S", 150, 10)], (), "waiting"),
])
def test_a_cpu_ranks_activity_from_two_readings(before, after, paused, want):
    act = node_activity("sim-2", C, reading(100.0, *before), reading(102.0, *after), [], GpuBaseline(), paused)
    assert act.activity == want, act
    assert act.kind == "cpu"


def test_an_inductor_compile_worker_is_a_compiler_and_a_process_new_since_the_last_reading_counts_whole():
    act = node_activity("n", C, reading(10.0, stat(10, "python3", "S", 5)), reading(12.0, stat(10, "python3", "S", 5), stat(20, "python3", "R", 80),
                                                                                     workers=(20,)), [], GpuBaseline())
    assert act.activity == "compiling" and "pid 20" in act.evidence


def test_on_a_gpu_node_a_compile_wins_over_an_idle_gpu_and_host_cpu_proves_nothing():
    idle_gpu = parse_gpu_activity("126.0, 0, 0, 1980, 40\n")[0]
    b = GpuBaseline(idle_w=126.0)
    before = reading(10.0, stat(10, "VLLM::Worker_TP", "R", 1000))
    spinning_host = reading(12.0, stat(10, "VLLM::Worker_TP", "R", 1200))  # a core of CUDA's sync spin
    assert node_activity("n", C, before, spinning_host, idle_gpu, b).activity == "waiting"
    compiling = reading(12.0, stat(10, "VLLM::Worker_TP", "S", 1000), stat(30, "ptxas", "R", 100, 10))
    assert node_activity("n", C, before, compiling, idle_gpu, b).activity == "compiling"


def test_no_earlier_reading_or_no_process_is_unknown():
    assert node_activity("n", C, None, reading(1.0, stat(1, "x", "S", 1)), [], GpuBaseline()).activity == "unknown"
    assert node_activity("n", C, reading(1.0), reading(3.0), [], GpuBaseline()).activity == "unknown"


def A(node: str, activity: str, kind: str = "cpu") -> NodeActivity:
    return NodeActivity(node, activity, f"{activity} evidence", kind)  # type: ignore[arg-type]


@pytest.mark.parametrize("nodes, want, words", [
    # a long step: every rank computes
    ((A("a", "working"), A("b", "working")), "busy", ""),
    # a starved or slower CPU rank computes while its peer waits for it in the collective
    ((A("a", "waiting"), A("b", "working")), "busy", ""),
    # a compile on one rank, the other waits (on GPUs at near-idle power: the compile still wins)
    ((A("a", "waiting", "gpu"), A("b", "compiling", "gpu")), "busy", ""),
    ((A("a", "working", "gpu"), A("b", "working", "gpu")), "busy", ""),
    # one rank frozen, whatever its peer does
    ((A("a", "working"), A("b", "stopped")), "wedged", "rank stopped: b"),
    ((A("a", "compiling"), A("b", "stopped")), "wedged", "rank stopped"),
    # NCCL ranks spinning in a collective: near-idle power
    ((A("a", "waiting", "gpu"), A("b", "waiting", "gpu")), "wedged", "near-idle power"),
    ((A("a", "working", "gpu"), A("b", "waiting", "gpu")), "wedged", "b: waiting evidence"),
    # every CPU rank asleep while work is pending
    ((A("a", "waiting"), A("b", "waiting")), "wedged", "no rank uses any CPU"),
    # a node not read: no verdict from the ranks
    ((A("a", "working"), A("b", "unknown")), "unknown", ""),
    ((), "unknown", ""),
])
def test_the_groups_activity(nodes, want, words):
    got, evidence = group_activity(nodes)
    assert got == want, evidence
    assert words in evidence


def test_the_baseline_follows_readings_slowly_and_only_when_the_engine_says_what_it_does():
    b = learn_baseline(GpuBaseline(), 100.0, idle=True, working=False)
    assert b == GpuBaseline(100.0, None)
    b = learn_baseline(b, 200.0, idle=True, working=False)  # a spike moves it 30 %
    assert b.idle_w == 130.0
    assert learn_baseline(b, 500.0, idle=False, working=False) == b  # neither idle nor progressing: learn nothing
    assert learn_baseline(b, None, idle=True, working=False) == b
    assert learn_baseline(b, 600.0, idle=False, working=True).busy_w == 600.0


def test_the_processes_command_in_a_real_shell_reads_a_containers_processes(tmp_path):
    """The command as a node runs it, with `docker` stubbed to name a process of this test as the
    container's: its cgroup's members (cgroup v2) or what docker top lists (elsewhere) are read from /proc."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        stub = tmp_path / "docker"
        stub.write_text(f'#!/bin/sh\nif [ "$1" = inspect ]; then echo "/spark-vllm {sleeper.pid}"; else echo PID; echo {sleeper.pid}; fi\n')
        stub.chmod(0o755)
        res = subprocess.run(["sh", "-c", processes_command(["spark-vllm"])], capture_output=True, text=True,
                             env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, timeout=30)
    finally:
        sleeper.kill()
        sleeper.wait()
    got = parse_processes(res.stdout)
    assert got.uptime_s and got.uptime_s > 0 and got.tick_hz > 0
    procs = {p.pid: p for p in got.procs("spark-vllm")}
    assert procs[sleeper.pid].name == "sleep" and procs[sleeper.pid].state == "S", res.stdout
    assert processes_command([]) == "true"
