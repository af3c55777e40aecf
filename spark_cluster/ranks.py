"""What each rank of the group is doing: is a stalled engine working on a long step, compiling, or wedged?

Two facts per node, each one command plus one pure parser (read in the node script that status and the
watchdog already run):
- the GPU: power, utilization, memory traffic, SM clock, temperature (nvidia-smi). Utilization cannot
  tell work from a spin-wait deadlock (99 vs 100 % on an H200); power can (690 W vs 145 W, 126 W idle),
  and memory traffic (24 vs 0 %). GB10: ~45 W healthy, 16-27 W deadlocked (docs/field.md, "What the ranks are doing").
- the processes of the group's containers on the node: state and CPU time from /proc/<pid>/stat,
  and compilers among them. On CPU ranks (the simulated cluster) CPU time tells a working rank from a
  stopped one; on a GPU node host CPU proves nothing (CUDA's synchronisation spins a core), but a
  compiler process using CPU is a compile.

Then pure rules: one node's activity from two readings (`node_activity`), the group's from its nodes
(`group_activity`). Nothing here does I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from shlex import quote
from typing import Literal, Optional

# ---- the GPU ------------------------------------------------------------------------------------

GPU_FIELDS = ("power.draw", "utilization.gpu", "utilization.memory", "clocks.sm", "temperature.gpu")
GPU_ACTIVITY_COMMAND = ("if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --query-gpu=" + ",".join(GPU_FIELDS)
                        + " --format=csv,noheader,nounits 2>&1 | head -n 16; else echo 'no nvidia-smi'; fi")


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment; None where nvidia-smi answers [N/A] (GB10 has no memory of its own)."""

    power_w: Optional[float] = None
    util_gpu: Optional[float] = None
    util_memory: Optional[float] = None
    sm_mhz: Optional[float] = None
    temperature_c: Optional[float] = None


def smi_number(text: str) -> Optional[float]:
    """A figure nvidia-smi printed, with or without its unit (`45 %`, `11.17 W`, `35`), or None for
    its words in brackets ([N/A], [Not Supported], [Unknown Error])."""
    m = re.match(r"\s*(-?\d+(?:\.\d+)?)", text)
    return float(m.group(1)) if m else None


def parse_gpu_activity(text: str) -> tuple[list[GpuReading], Optional[str]]:
    """The GPUs of a node in nvidia-smi's order, or why there are none (no nvidia-smi, a driver error)."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if not lines:
        return [], None
    if lines[0] == "no nvidia-smi":
        return [], "no nvidia-smi"
    gpus = []
    for line in lines:
        parts = line.split(",")
        if len(parts) != len(GPU_FIELDS):
            return [], line[:200]
        gpus.append(GpuReading(*(smi_number(p) for p in parts)))
    return gpus, None


# ---- the processes of the group's containers ---------------------------------------------------

# Programs whose running means a compile (Triton launches the C compiler and ptxas; inductor, its
# compile workers; vLLM's CUDA graphs and kernels too).
COMPILERS = frozenset({"cc", "c++", "gcc", "g++", "cc1", "cc1plus", "as", "ld", "ld.bfd", "ld.gold", "collect2", "clang", "clang++",
                       "ptxas", "nvcc", "cicc", "nvlink", "fatbinary", "nvdisasm", "ninja", "make"})
# Process names (comm, 15 characters) of the processes that hold the ranks and drive them: Ray's actor
# holding a rank (RayWorkerProc, RayWorkerWrapper), vLLM's workers and engine core. The rest of a
# container (the API server answering our own probes, Ray's daemons) is not a rank.
RANK_PREFIXES = ("ray::RayWorker", "VLLM::Worker", "VLLM::EngineCor")
_PROCS_MARK = "##procs"


def processes_command(containers: list[str]) -> str:
    """The node's uptime and clock tick, then for each container a `== name` line and /proc/<pid>/stat
    of every process in it (its cgroup's members; `docker top` where the cgroup cannot be read), and a
    `compile-worker PID` line for each inductor compile worker (its command line never leaves the node:
    it may carry a secret)."""
    if not containers:
        return "true"
    names = " ".join(quote(c) for c in containers)
    return (
        f'echo "{_PROCS_MARK} $(cut -d" " -f1 /proc/uptime) $(getconf CLK_TCK)"; '
        f"docker inspect --format '{{{{.Name}}}} {{{{.State.Pid}}}}' {names} 2>/dev/null | while read -r n p; do "
        'echo "== ${n#/}"; [ "${p:-0}" -gt 0 ] 2>/dev/null || continue; '
        'cg=$(sed -n "s/^0:://p" "/proc/$p/cgroup" 2>/dev/null); '
        'if [ -n "$cg" ] && [ -r "/sys/fs/cgroup$cg/cgroup.procs" ]; then pids=$(cat "/sys/fs/cgroup$cg/cgroup.procs"); '
        'else pids=$(docker top "${n#/}" -o pid 2>/dev/null | tail -n +2); fi; '
        'for q in $pids; do cat "/proc/$q/stat" 2>/dev/null; '
        'grep -qs compile_worker "/proc/$q/cmdline" && echo "compile-worker $q"; done; done'
    )


@dataclass(frozen=True)
class Proc:
    pid: int
    name: str  # comm: 15 characters at most (vLLM's and Ray's process titles: VLLM::Worker_TP, ray::RayWorkerW)
    state: str  # R running, S sleeping, D disk, T stopped, t traced, Z zombie
    ppid: int
    cpu_ticks: int  # utime + stime + cutime + cstime: its own CPU and that of its children it has reaped
    compiler: bool = False


@dataclass(frozen=True)
class ProcessesReading:
    uptime_s: Optional[float] = None
    tick_hz: float = 100.0
    containers: tuple[tuple[str, tuple[Proc, ...]], ...] = ()  # (container, its processes)

    def procs(self, container: str) -> tuple[Proc, ...]:
        return next((ps for name, ps in self.containers if name == container), ())


def parse_stat_line(line: str) -> Optional[Proc]:
    """/proc/<pid>/stat: `pid (comm) state ppid ...`; comm may hold spaces and parentheses."""
    open_, close = line.find("("), line.rfind(")")
    if open_ < 0 or close < open_:
        return None
    fields = line[close + 1:].split()
    try:
        pid = int(line[:open_])
        ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
        return Proc(pid=pid, name=line[open_ + 1:close], state=fields[0], ppid=int(fields[1]), cpu_ticks=ticks)
    except (ValueError, IndexError):
        return None


def parse_processes(text: str) -> ProcessesReading:
    uptime, tick = None, 100.0
    groups: list[tuple[str, list[Proc]]] = []
    workers: set[int] = set()
    for line in text.splitlines():
        if line.startswith(_PROCS_MARK):
            parts = line.split()
            uptime = smi_number(parts[1]) if len(parts) > 1 else None
            tick = (smi_number(parts[2]) if len(parts) > 2 else None) or 100.0
        elif line.startswith("== "):
            groups.append((line[3:].strip(), []))
        elif line.startswith("compile-worker ") and line.split()[1].isdigit():
            workers.add(int(line.split()[1]))
        elif groups:
            proc = parse_stat_line(line)
            if proc is not None:
                groups[-1][1].append(proc)
    return ProcessesReading(uptime_s=uptime, tick_hz=tick, containers=tuple(
        (name, tuple(replace(p, compiler=p.name in COMPILERS or p.pid in workers) for p in procs))
        for name, procs in groups))


# ---- one node's activity ------------------------------------------------------------------------

Activity = Literal["working", "compiling", "waiting", "stopped", "unknown"]

# A CPU rank that used at least this share of a core since the last reading is working (a throttled
# one still gets its slice). Measured on the simulated cluster: Ray's and vLLM's ranks poll at 0.01-0.03
# core while they wait, so a waiting CPU rank reads as working too (docs/failover.md: blind spots).
CPU_WORKING_CORES = 0.005
# A compiler process that used this share of a core is compiling.
COMPILER_WORKING_CORES = 0.05
# Memory traffic this high is a GPU doing work (spin-waiting kernels read 0 %).
GPU_MEMORY_WORKING_PCT = 5.0
# Without a learned busy level: working when the power is this far above the idle baseline, at least
# GPU_MIN_MARGIN_W (H200: idle 126 W, spin 145 W, work 690 W; GB10: spin 16-27 W, work ~45 W).
GPU_IDLE_MARGIN = 0.25
GPU_MIN_MARGIN_W = 15.0


@dataclass(frozen=True)
class GpuBaseline:
    """What a node's GPUs draw idle with the engine loaded, and at work (learned by the watchdog)."""

    idle_w: Optional[float] = None
    busy_w: Optional[float] = None

    def working_above_w(self) -> Optional[float]:
        if self.idle_w is None:
            return None
        if self.busy_w is not None and self.busy_w > self.idle_w + GPU_MIN_MARGIN_W:
            return (self.idle_w + self.busy_w) / 2  # half-way between idle and work
        return self.idle_w + max(GPU_IDLE_MARGIN * self.idle_w, GPU_MIN_MARGIN_W)


@dataclass(frozen=True)
class NodeActivity:
    node: str
    activity: Activity
    evidence: str
    kind: Literal["gpu", "cpu"] = "cpu"


def _cpu_cores(before: ProcessesReading, after: ProcessesReading, procs: list[Proc]) -> Optional[float]:
    """Cores these processes used between the two readings (a process new since the first counts whole)."""
    if before.uptime_s is None or after.uptime_s is None or after.uptime_s <= before.uptime_s:
        return None
    earlier = {p.pid: p.cpu_ticks for _, ps in before.containers for p in ps}
    ticks = sum(max(p.cpu_ticks - earlier.get(p.pid, 0), 0) for p in procs)
    return ticks / after.tick_hz / (after.uptime_s - before.uptime_s)


def node_activity(node: str, containers: list[str], before: Optional[ProcessesReading], after: ProcessesReading,
                  gpus: list[GpuReading], baseline: GpuBaseline = GpuBaseline(), paused: tuple[str, ...] = ()) -> NodeActivity:
    """One node's rank(s), from two readings of its processes and one of its GPUs. Pure.

    stopped: a container of the group is paused, or one of its processes is stopped (SIGSTOP);
    compiling: a compiler process used CPU since the last reading;
    working / waiting: on a GPU node by power and memory traffic against the idle baseline; on a CPU
    node by the CPU its processes used. unknown where nothing could be read."""
    if paused:
        return NodeActivity(node, "stopped", f"container {', '.join(paused)} paused")
    procs = [p for c in containers for p in after.procs(c)]
    # the ranks where they can be named; every process of the group's containers otherwise
    procs = [p for p in procs if p.name.startswith(RANK_PREFIXES)] or procs
    compilers = [p for c in containers for p in after.procs(c) if p.compiler]
    stopped = [p for p in procs if p.state in ("T", "t")]
    if stopped:
        return NodeActivity(node, "stopped", "stopped: " + ", ".join(f"{p.name} (pid {p.pid})" for p in stopped[:3]))
    if before is not None:
        busy = [p for p in compilers if (_cpu_cores(before, after, [p]) or 0) >= COMPILER_WORKING_CORES]
        if busy:
            return NodeActivity(node, "compiling", "compiling: " + ", ".join(f"{p.name} (pid {p.pid})" for p in busy[:3]),
                                "gpu" if gpus else "cpu")
    powers = [g.power_w for g in gpus if g.power_w is not None]
    if powers:
        power = max(powers)
        traffic = max((g.util_memory for g in gpus if g.util_memory is not None), default=None)
        threshold = baseline.working_above_w()
        seen = f"GPU {power:.0f} W" + (f", memory {traffic:.0f} %" if traffic is not None else "")
        if traffic is not None and traffic >= GPU_MEMORY_WORKING_PCT:
            return NodeActivity(node, "working", seen, "gpu")
        if threshold is None:
            return NodeActivity(node, "unknown", seen + " (no idle baseline learned yet)", "gpu")
        where = f" (idle {baseline.idle_w:.0f} W, work above {threshold:.0f} W)"
        return NodeActivity(node, "working" if power >= threshold else "waiting", seen + where, "gpu")
    if before is None or not procs:
        return NodeActivity(node, "unknown", "no process reading yet" if procs else "no process of the group found")
    cores = _cpu_cores(before, after, procs)
    if cores is None:
        return NodeActivity(node, "unknown", "no process reading over an interval")
    running = sum(1 for p in procs if p.state == "R")  # a rank throttled by its CPU quota is runnable, not asleep
    seen = f"CPU {cores:.2f} core(s) in {len(procs)} rank process(es), {running} running"
    return NodeActivity(node, "working" if cores >= CPU_WORKING_CORES or running else "waiting", seen)


# ---- the group ----------------------------------------------------------------------------------

GroupActivity = Literal["busy", "wedged", "unknown"]


def group_activity(nodes: tuple[NodeActivity, ...]) -> tuple[GroupActivity, str]:
    """Whether a group that makes no progress is working (busy) or wedged, and the evidence. Pure.

    wedged: a rank stopped; or, with no compile anywhere, a GPU rank at near-idle power (its kernels
    spin in a collective nobody completes), or no CPU rank using any CPU.
    busy: a compile anywhere; every GPU rank working; or, on CPU ranks, one working while its peers
    wait for it in the collective (slow is not hung).
    unknown: a node's ranks could not be read: the stall window and the canary decide, as without."""
    if not nodes:
        return "unknown", "no rank activity read"
    said = "; ".join(f"{n.node}: {n.activity} ({n.evidence})" for n in nodes)
    stopped = [n for n in nodes if n.activity == "stopped"]
    if stopped:
        return "wedged", "rank stopped: " + "; ".join(f"{n.node}: {n.evidence}" for n in stopped)
    if any(n.activity == "compiling" for n in nodes):
        return "busy", said
    if any(n.activity == "unknown" for n in nodes):
        return "unknown", said
    gpu_waiting = [n for n in nodes if n.kind == "gpu" and n.activity == "waiting"]
    if gpu_waiting:
        return "wedged", "GPU rank at near-idle power: " + "; ".join(f"{n.node}: {n.evidence}" for n in gpu_waiting)
    if any(n.activity == "working" for n in nodes):
        return "busy", said
    return "wedged", "no rank uses any CPU: " + said


# How fast a learned power level follows new readings (an exponential average: a spike moves it little).
BASELINE_WEIGHT = 0.3


def learn_baseline(b: GpuBaseline, power_w: Optional[float], *, idle: bool, working: bool) -> GpuBaseline:
    """The node's GPU power levels after one more reading: idle while the engine is ready with nothing
    to do, busy while it progresses with work in flight. Pure."""
    if power_w is None or not (idle or working):
        return b

    def toward(level: Optional[float]) -> float:
        return power_w if level is None else round(level + BASELINE_WEIGHT * (power_w - level), 2)

    return GpuBaseline(toward(b.idle_w), b.busy_w) if idle else GpuBaseline(b.idle_w, toward(b.busy_w))
