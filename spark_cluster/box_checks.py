"""What Spark owners learned the hard way, checked before it bites: a kernel known to break RDMA or
wedge the host, the tell of its cause in /proc/meminfo, drivers that differ between nodes, the GPU's
heat and power, GPUDirect RDMA off, and the memory CUDA will really hand out.

Each check is a typed preflight check (its facts: spark_cluster.box_facts) with pure verdicts: a
problem refuses `up` (it would fail to start or wedge the box), a warning is said and `up` goes on,
a note says what was found (or "not applicable" and why: a check that needs a GPU never passes
silently without one). Every verdict names its public source. docs/field.md has them as a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from .box_facts import HEAT_REASONS, NO_DRIVER, HeatFact, parse_ceiling, parse_clock_lock, parse_cma, parse_driver, parse_gdr, parse_heat, parse_kernel


class _BoxCheck(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    same_on_all_nodes: bool = False


class KernelKnown(_BoxCheck):
    """The kernel release is not one known to break a Spark cluster, or its fix is on the command line."""

    kind: Literal["kernel"] = "kernel"


class CmaSane(_BoxCheck):
    """/proc/meminfo's CmaFree is not larger than CmaTotal (the tell of KHO's scratch area)."""

    kind: Literal["cma"] = "cma"


class DriverSame(_BoxCheck):
    """The NVIDIA driver's version, the same on every node."""

    kind: Literal["driver"] = "driver"
    same_on_all_nodes: bool = True


class GpuHeatOk(_BoxCheck):
    """The GPU is not throttled by heat or power, nor capped at a low power limit (warnings only)."""

    kind: Literal["gpu-heat"] = "gpu-heat"


class GdrCapable(_BoxCheck):
    """NCCL in the image can use GPUDirect RDMA on the cluster link (a warning when it cannot)."""

    kind: Literal["gdr"] = "gdr"
    rdma: bool = Field(description="The cluster link has RDMA devices (nccl.ib_hca, or found by nccl: auto)")


class MemoryCeiling(_BoxCheck):
    """gpu_memory_utilization is within what CUDA can allocate now (a throwaway container of the image)."""

    kind: Literal["memory-ceiling"] = "memory-ceiling"
    gpu_memory_utilization: float
    page_cache_counted: bool = Field(False, description="`doctor` with memory.drop_page_cache: the page cache `up` drops first is "
                                                        "still counted as used (CUDA's free on a GB10 is MemFree): a warning then")


class ClockCapped(_BoxCheck):
    """gpu.max_clock_mhz: the driver confirms the SM clock's cap (its own answer to `nvidia-smi -lgc`)."""

    kind: Literal["clock-capped"] = "clock-capped"
    max_clock_mhz: int


BOX_CHECKS = (KernelKnown, CmaSane, DriverSame, GpuHeatOk, GdrCapable, MemoryCeiling, ClockCapped)


@dataclass(frozen=True)
class KernelRule:
    prefix: str  # of `uname -r`
    what: str
    fix_param: str  # on the kernel command line, it makes the release safe
    sources: str


KHO_FIX = ("add kho=off to the kernel command line (GRUB_CMDLINE_LINUX_DEFAULT in /etc/default/grub, then `sudo update-grub` "
           "and a reboot; it also gave back about 9 GiB of idle memory), or boot the 6.17 kernel (6.17.0-1032-nvidia worked)")
KNOWN_BAD_KERNELS = (
    KernelRule("7.0.0-1019-nvidia", "NVIDIA's 7.0 kernel for DGX OS (a routine `apt upgrade`): RDMA memory registration fails "
               "(`ibv_reg_mr` ENOMEM) and hosts wedged with NV_ERR_NO_MEMORY seconds after NCCL's rendezvous, 7 boots in 5 hours; "
               "its Kexec HandOver scratch area (~9 GiB) is handed to the page allocator as CMA pageblocks that cannot be pinned",
               "kho=off", "NVIDIA/open-gpu-kernel-modules#1358, NVIDIA/NV-Kernels#591, MiaAI-Lab/DeepSeek-v4.1-Flash-DGX-Sparks#14"),
    KernelRule("7.0.0-31-", "the HWE kernel 7.0.0-31: RDMA memory registration fails (`ibv_reg_mr_iova2` ENOMEM) and NCCL's "
               "init dies (7.0.0-30 works); Kexec HandOver's scratch area is handed out as CMA pageblocks that cannot be pinned",
               "kho=off", "MiaAI-Lab/DeepSeek-v4-Flash-DSpark-2x-DGX-Spark#259"),
)
HEAT_WARN_C = 82.0  # where some GB10 makes throttle to 70-80 % speed (dredyson.com, ?p=99773)
POWER_LIMIT_WARN_W = 60.0  # a GX10 with a power-delivery defect is capped at ~30 W (ai-muninn.com); a healthy GB10 draws ~45 W busy
MIXED_DRIVERS_SOURCE = "NVIDIA developer forum, thread 362368"
GDR_SOURCE = "vllm-project/vllm RFC #48720, section 3 L2"
CEILING_SOURCE = "MiaAI-Lab/GLM-5.3-Flash-EXL3-2x-DGX-Sparks#47"


def kernel_problem(stdout: str) -> Optional[str]:
    fact = parse_kernel(stdout)
    if fact.release is None:
        return None  # nothing to judge; the note says so
    for rule in KNOWN_BAD_KERNELS:
        if fact.release.startswith(rule.prefix) and fact.param(rule.fix_param.partition("=")[0]) != rule.fix_param.partition("=")[2]:
            return f"kernel {fact.release}, without {rule.fix_param}: {rule.what}. Fix: {KHO_FIX} ({rule.sources})"
    return None


def cma_problem(stdout: str) -> Optional[str]:
    fact = parse_cma(stdout)
    if not fact.more_free_than_total:
        return None
    return (f"CmaFree ({fact.free_kib / 2**20:.1f} GiB) is larger than CmaTotal ({(fact.total_kib or 0) / 2**20:.1f} GiB): the kernel's "
            "Kexec HandOver scratch area was handed to the page allocator as CMA pageblocks, RDMA memory registration fails with "
            f"ENOMEM under load and NCCL's init dies. Fix: {KHO_FIX} (MiaAI-Lab/DeepSeek-v4-Flash-DSpark-2x-DGX-Spark#259, NVIDIA/NV-Kernels#591)")


def drivers_differ(values: dict[str, str], head: str) -> Optional[str]:
    """The driver versions of the nodes (their DriverSame outputs), when they are not all the same."""
    versions = {n: parse_driver(v).version or NO_DRIVER for n, v in values.items()}
    if len(set(versions.values())) <= 1:
        return None
    listed = ", ".join(f"{n} {v}" for n, v in sorted(versions.items(), key=lambda kv: (kv[0] != head, kv[0])))
    return (f"the NVIDIA driver differs between nodes ({listed}): a four-Spark group with 580.95.05 and 580.142 loaded weights to "
            f"layer 57 of 96, then hung in futex_wait, 23 attempts ({MIXED_DRIVERS_SOURCE}). Install the same driver on every node "
            "(the same nvidia-driver-*-open package version) and reboot")


def heat_warning(fact: HeatFact) -> Optional[str]:
    found = []
    for i, g in enumerate(fact.gpus):
        hot = [r for r in g.reasons if r in HEAT_REASONS]
        if g.temperature_c is not None and g.temperature_c >= HEAT_WARN_C:
            found.append(f"GPU {i} at {g.temperature_c:g} °C (some GB10 makes throttle to 70-80 % speed at {HEAT_WARN_C:g} °C, dredyson.com ?p=99773)")
        if hot:
            found.append(f"GPU {i} held back now: {', '.join(hot)}")
        if g.power_limit_w is not None and g.power_limit_w < POWER_LIMIT_WARN_W:
            found.append(f"GPU {i} power limit {g.power_limit_w:g} W (a GX10 with a power-delivery defect is capped at ~30 W, ai-muninn.com)")
    if not found:
        return None
    return ("; ".join(found) + ": check the airflow around the box (nothing stacked on it, vents free), cap the SM clock with gpu.max_clock_mhz "
            "(`nvidia-smi -lgc 0,2100` took one unit from 91 to 65 °C), and for a low power limit ask the maker's support")


def heat_summary(fact: HeatFact, cap_mhz: Optional[int]) -> Optional[str]:
    """For status and the watchdog's rank facts: each GPU's temperature, clock, power and what holds it back; None without a GPU."""
    if not fact.gpus:
        return None
    said = []
    for g in fact.gpus:
        parts = [f"{g.temperature_c:g} °C" if g.temperature_c is not None else None,
                 f"SM {g.sm_mhz:g} of {g.max_sm_mhz:g} MHz" if g.sm_mhz is not None and g.max_sm_mhz is not None else None,
                 f"capped at {cap_mhz} MHz" if cap_mhz else None,
                 f"{g.power_w:g} W" if g.power_w is not None else None,
                 "held back: " + ", ".join(r for r in g.reasons if r != "idle") if [r for r in g.reasons if r != "idle"] else None]
        said.append(", ".join(p for p in parts if p))
    return "; ".join(said)


def heat_note(stdout: str) -> str:
    fact = parse_heat(stdout)
    if fact.error == "no nvidia-smi":
        return "not applicable: no GPU (no nvidia-smi)"
    if fact.error:
        return f"cannot read the GPU's heat: {fact.error}"
    return "; ".join(
        ", ".join(x for x in (f"{g.temperature_c:g} °C" if g.temperature_c is not None else None,
                              f"SM {g.sm_mhz:g} of {g.max_sm_mhz:g} MHz" if g.sm_mhz is not None and g.max_sm_mhz is not None else None,
                              f"{g.power_w:g} W" if g.power_w is not None else None) if x) or "no figures"
        for g in fact.gpus)


def gdr_warning(check: GdrCapable, exit_code: int, stdout: str, stderr: str) -> Optional[str]:
    if not check.rdma or "No such image" in stderr + stdout:
        return None
    fact = parse_gdr(exit_code, stdout, stderr)
    if fact.error:
        return f"cannot tell whether NCCL can use GPUDirect RDMA: {fact.error}"
    if not fact.gpu or fact.dmabuf or fact.peermem:
        return None
    if not fact.libmlx5:
        return ("the image has no rdma-core (libmlx5.so.1): NCCL cannot use RoCE from it and falls back to sockets over the cluster link, "
                "several times slower: use an image with rdma-core (vLLM's own images and the community Spark images have it)")
    return ("NCCL will run with GPUDirect RDMA off (GDR 0): the image's rdma-core lacks mlx5dv_reg_dmabuf_mr and the host has no "
            "nvidia_peermem, so every cross-node collective is staged through host memory, slower, and invisible unless NCCL's own "
            f"log is read (NET/IB: GPU Direct RDMA Disabled) ({GDR_SOURCE}). Fix: an image whose rdma-core has "
            "mlx5dv_reg_dmabuf_mr (NCCL's log then says `GPU Direct RDMA (DMABUF) enabled`)")


def gdr_note(check: GdrCapable, exit_code: int, stdout: str, stderr: str = "") -> Optional[str]:
    fact = parse_gdr(exit_code, stdout, stderr)
    if fact.error:
        return None
    if not fact.gpu:
        return "not applicable: no GPU"
    if not check.rdma:
        return "not applicable: no RDMA devices on the cluster link"
    if fact.dmabuf:
        return "GPUDirect RDMA through DMA-BUF (the image's libmlx5 has mlx5dv_reg_dmabuf_mr)"
    if fact.peermem:
        return "GPUDirect RDMA through nvidia_peermem"
    return None


def ceiling_problem(check: MemoryCeiling, exit_code: int, stdout: str, stderr: str, cluster_running: bool) -> Optional[str]:
    if cluster_running or check.page_cache_counted or "No such image" in stderr + stdout:
        return None  # its own engine holds the memory; an absent image: its own check says so
    fact = parse_ceiling(exit_code, stdout, stderr)
    highest = fact.highest_utilization
    if highest is None or check.gpu_memory_utilization <= highest:
        return None
    total, free = fact.total_bytes / 2**30, fact.free_bytes / 2**30
    whose = "CUDA" if fact.source == "cuda" else "the CPU build of vLLM (no GPU)"
    return (f"gpu_memory_utilization {check.gpu_memory_utilization:g} asks for {check.gpu_memory_utilization * total:.1f} GiB of the "
            f"{total:.2f} GiB {whose} sees, but {free:.1f} GiB is free to allocate now: vLLM would refuse to start (`Free memory on device "
            f"... is less than desired GPU memory utilization`). The highest value that would start is {highest:.2f}: set "
            f"vllm.gpu_memory_utilization to it or lower (a GB10 tops out at 101-110 of 121.69 GiB even headless with the page cache "
            f"dropped, {CEILING_SOURCE}); memory.drop_page_cache: true frees the page cache first")


def ceiling_warning(check: MemoryCeiling, exit_code: int, stdout: str, stderr: str) -> Optional[str]:
    if "No such image" in stderr + stdout:
        return None
    fact = parse_ceiling(exit_code, stdout, stderr)
    if fact.error:
        return f"cannot measure the memory CUDA can allocate: {fact.error}"
    said = ceiling_problem(check.model_copy(update={"page_cache_counted": False}), exit_code, stdout, stderr, False)
    if check.page_cache_counted and said:
        return said + " (measured with the page cache still held: `up` drops it first, memory.drop_page_cache, which may free enough)"
    return None


def ceiling_note(exit_code: int, stdout: str, stderr: str = "") -> Optional[str]:
    fact = parse_ceiling(exit_code, stdout, stderr)
    if fact.highest_utilization is None:
        return None
    whose = "CUDA" if fact.source == "cuda" else "no GPU: the CPU build's figure,"
    return (f"{whose} {fact.free_bytes / 2**30:.1f} of {fact.total_bytes / 2**30:.2f} GiB free to allocate: "
            f"gpu_memory_utilization up to {fact.highest_utilization:.2f} starts")


def clock_problem(check: ClockCapped, exit_code: int, stdout: str) -> Optional[str]:
    fact = parse_clock_lock(exit_code, stdout)
    if fact.error == "no nvidia-smi":
        return None
    if fact.error:
        return (f"the GPU's SM clock could not be capped at {check.max_clock_mhz} MHz (gpu.max_clock_mhz): {fact.error}; `nvidia-smi -lgc` "
                "needs root (ssh.sudo: true, or connect as root)")
    over = [m for m in fact.max_mhz if m > check.max_clock_mhz]
    return f"the driver set the SM clock's cap to {over[0]} MHz, above gpu.max_clock_mhz {check.max_clock_mhz}" if over else None


def clock_note(check: ClockCapped, exit_code: int, stdout: str) -> Optional[str]:
    fact = parse_clock_lock(exit_code, stdout)
    if fact.error == "no nvidia-smi":
        return "not applicable: no GPU (no nvidia-smi)"
    if fact.max_mhz and not fact.error:
        clamped = [m for m in fact.max_mhz if m < check.max_clock_mhz]
        return f"SM clock capped at {fact.max_mhz[0]} MHz" + (" (the GPU's own maximum is lower)" if clamped else "")
    return None


def problem(check: _BoxCheck, exit_code: int, stdout: str, stderr: str, cluster_running: bool) -> Optional[str]:
    """What refuses `up`."""
    if isinstance(check, ClockCapped):
        return clock_problem(check, exit_code, stdout)
    if isinstance(check, KernelKnown):
        return kernel_problem(stdout)
    if isinstance(check, CmaSane):
        return cma_problem(stdout)
    if isinstance(check, MemoryCeiling):
        return ceiling_problem(check, exit_code, stdout, stderr, cluster_running)
    return None


def warning(check: _BoxCheck, exit_code: int, stdout: str, stderr: str) -> Optional[str]:
    """What `up` says and goes on."""
    if isinstance(check, GpuHeatOk):
        return heat_warning(parse_heat(stdout))
    if isinstance(check, GdrCapable):
        return gdr_warning(check, exit_code, stdout, stderr)
    if isinstance(check, MemoryCeiling):
        return ceiling_warning(check, exit_code, stdout, stderr)
    return None


def note(check: _BoxCheck, exit_code: int, stdout: str, stderr: str = "") -> Optional[str]:
    """What was found, or why the check does not apply here."""
    if isinstance(check, KernelKnown):
        fact = parse_kernel(stdout)
        return f"{fact.release}" + (" (kho=off)" if fact.param("kho") == "off" else "") if fact.release else None
    if isinstance(check, CmaSane):
        fact = parse_cma(stdout)
        if fact.total_kib is None:
            return "not applicable: no CMA lines in /proc/meminfo"
        return f"CmaTotal {fact.total_kib / 1024:.0f} MiB, CmaFree {(fact.free_kib or 0) / 1024:.0f} MiB"
    if isinstance(check, DriverSame):
        fact = parse_driver(stdout)
        if fact.version:
            return fact.version + (" (open kernel module)" if fact.open_module else "")
        return "not applicable: no GPU (no NVIDIA driver)" if fact.error == NO_DRIVER else f"cannot read the driver: {fact.error}"
    if isinstance(check, GpuHeatOk):
        return heat_note(stdout)
    if isinstance(check, GdrCapable):
        return gdr_note(check, exit_code, stdout, stderr)
    if isinstance(check, MemoryCeiling):
        return ceiling_note(exit_code, stdout, stderr)
    if isinstance(check, ClockCapped):
        return clock_note(check, exit_code, stdout)
    return None
