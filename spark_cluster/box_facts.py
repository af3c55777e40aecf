"""What a Spark's own software and hardware say about it, read before a start: the kernel and its
command line, the CMA lines of /proc/meminfo, the NVIDIA driver, the GPU's heat and clocks, whether
NCCL can use GPUDirect RDMA from the image, and the memory CUDA will really hand out.

Each fact is one command plus one pure parser (pyinfra's facts), tested on outputs recorded on real
machines (tests/data/facts/*.json name where each came from; tests/test_facts.py, tests/test_box_checks.py). What the facts mean, and what a
Spark owner should do about them, is spark_cluster.box_checks. Nothing here does I/O.
"""

from __future__ import annotations

import re
from typing import Optional

from pydantic import BaseModel, Field

from .ranks import smi_number
from .render import quote

# ---- the kernel: its release and its command line ----------------------------------------------

KERNEL_COMMAND = "uname -r; cat /proc/cmdline"


class KernelFact(BaseModel):
    release: Optional[str] = None
    cmdline: list[str] = Field(default_factory=list, description="The kernel command line's words (kho=off, cma=..., ...)")

    def param(self, key: str) -> Optional[str]:
        """The last value given to key on the command line ("" for a bare flag), or None when absent."""
        found = None
        for word in self.cmdline:
            if word == "--":
                break  # the rest is the init program's, not the kernel's
            k, sep, v = word.partition("=")
            if k == key:
                found = v if sep else ""
        return found


def parse_kernel(text: str) -> KernelFact:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if not lines:
        return KernelFact()
    return KernelFact(release=lines[0].split()[0], cmdline=" ".join(lines[1:]).split())


# ---- CMA: memory the kernel keeps movable for contiguous allocations ----------------------------

CMA_COMMAND = "grep -E '^Cma(Total|Free):' /proc/meminfo || true"  # no lines: a kernel without CMA


class CmaFact(BaseModel):
    """CmaTotal and CmaFree in KiB (None: the kernel has no CMA, the lines are absent)."""

    total_kib: Optional[int] = None
    free_kib: Optional[int] = None

    @property
    def more_free_than_total(self) -> bool:
        """The tell of Kexec HandOver's scratch area given to the page allocator as CMA pageblocks."""
        return self.total_kib is not None and self.free_kib is not None and self.free_kib > self.total_kib


def parse_cma(text: str) -> CmaFact:
    kib = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s*(\w+):\s+(\d+)\s*kB", text, re.M)}
    return CmaFact(total_kib=kib.get("CmaTotal"), free_kib=kib.get("CmaFree"))


# ---- the NVIDIA driver: the kernel module's version ----------------------------------------------

NO_DRIVER = "no NVIDIA driver"
# the kernel module's own line first (what NCCL and CUDA in every container talk to), nvidia-smi where it is not readable
DRIVER_COMMAND = ("if [ -r /proc/driver/nvidia/version ]; then head -n 1 /proc/driver/nvidia/version; "
                  "elif command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -n 8; "
                  f"else echo {quote(NO_DRIVER)}; fi")


class DriverFact(BaseModel):
    version: Optional[str] = None
    open_module: Optional[bool] = Field(None, description="NVIDIA's open kernel module (GB10 needs it); None when not said")
    error: Optional[str] = Field(None, description="Why no version: no driver, or what nvidia-smi said")


_NVRM = re.compile(r"NVRM version:.*?Kernel Module\s*(?:for \S+\s+)?\s*(\d+\.\d+(?:\.\d+)?)")
_CSV_VERSION = re.compile(r",\s*(\d+\.\d+(?:\.\d+)?)\s*$")


def parse_driver(text: str) -> DriverFact:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if not lines or lines[0] == NO_DRIVER:
        return DriverFact(error=NO_DRIVER)
    m = _NVRM.search(lines[0])
    if m:
        return DriverFact(version=m.group(1), open_module="Open Kernel Module" in lines[0])
    versions = {v.group(1) for v in map(_CSV_VERSION.search, lines) if v}
    if len(versions) == 1:
        return DriverFact(version=versions.pop())
    return DriverFact(error=lines[0][:200])


# ---- the GPU's heat, clocks and power ------------------------------------------------------------

HEAT_FIELDS = ("temperature.gpu", "clocks.sm", "clocks.max.sm", "power.draw", "power.limit", "clocks_throttle_reasons.active")
# a field a driver does not know fails the whole query: without the throttle reasons, the rest still answers
HEAT_COMMAND = ("if command -v nvidia-smi >/dev/null 2>&1; then "
                + "out=$(nvidia-smi --query-gpu=" + ",".join(HEAT_FIELDS) + " --format=csv,noheader 2>&1) && printf '%s\\n' \"$out\" | head -n 8 "
                + "|| nvidia-smi --query-gpu=" + ",".join(HEAT_FIELDS[:-1]) + " --format=csv,noheader 2>&1 | head -n 8; "
                + "else echo 'no nvidia-smi'; fi")

# nvidia-smi's clock event (throttle) reasons, by bit (nvml.h: nvmlClocksEventReason*)
THROTTLE_REASONS = {
    0x1: "idle",
    0x2: "application clocks setting",
    0x4: "software power cap",
    0x8: "hardware slowdown",
    0x10: "sync boost",
    0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown",
    0x80: "hardware power brake",
    0x100: "display clocks setting",
}
HEAT_REASONS = frozenset({"hardware slowdown", "software thermal slowdown", "hardware thermal slowdown", "hardware power brake"})


class GpuHeat(BaseModel):
    temperature_c: Optional[float] = None
    sm_mhz: Optional[float] = None
    max_sm_mhz: Optional[float] = None
    power_w: Optional[float] = None
    power_limit_w: Optional[float] = Field(None, description="None where nvidia-smi says [N/A] (GB10)")
    reasons: list[str] = Field(default_factory=list, description="Why the clocks are held back now (idle is one)")


class HeatFact(BaseModel):
    gpus: list[GpuHeat] = Field(default_factory=list)
    error: Optional[str] = Field(None, description="no nvidia-smi, or what it said instead")


def throttle_reasons(text: str) -> list[str]:
    try:
        bits = int(text.strip(), 16)
    except ValueError:
        return []
    return [name for bit, name in THROTTLE_REASONS.items() if bits & bit]


def parse_heat(text: str) -> HeatFact:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if not lines:
        return HeatFact(error="no output")
    if lines[0] == "no nvidia-smi":
        return HeatFact(error="no nvidia-smi")
    gpus = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) not in (len(HEAT_FIELDS), len(HEAT_FIELDS) - 1):
            return HeatFact(error=line[:200])
        temp, sm, max_sm, power, limit, reasons = (parts + [""])[:len(HEAT_FIELDS)]
        gpus.append(GpuHeat(temperature_c=smi_number(temp), sm_mhz=smi_number(sm), max_sm_mhz=smi_number(max_sm), power_w=smi_number(power),
                            power_limit_w=smi_number(limit), reasons=throttle_reasons(reasons)))
    return HeatFact(gpus=gpus)


# ---- run in a throwaway container of the image on the GPU (plan_checks.python_in_image) -----------

# GPUDirect RDMA: NCCL registers GPU memory with the NIC through DMA-BUF when the image's rdma-core
# has mlx5dv_reg_dmabuf_mr (stock DGX OS's does not: GDR 0), or through the nvidia_peermem module.
GDR_SCRIPT = ('import ctypes, ctypes.util, glob; lib = ctypes.util.find_library("mlx5"); '
              'print("no GPU" if not glob.glob("/dev/nvidia[0-9]*") else "no libmlx5" if not lib else '
              '"mlx5dv_reg_dmabuf_mr " + ("yes" if hasattr(ctypes.CDLL(lib), "mlx5dv_reg_dmabuf_mr") else "no"))')
PEERMEM_LINE = "nvidia_peermem loaded"
PEERMEM_COMMAND = f"if [ -d /sys/module/nvidia_peermem ]; then echo {quote(PEERMEM_LINE)}; fi"  # on the host, after the container


class GdrFact(BaseModel):
    gpu: bool = False
    libmlx5: bool = False
    dmabuf: bool = Field(False, description="the image's libmlx5 has mlx5dv_reg_dmabuf_mr")
    peermem: bool = Field(False, description="the host has the nvidia_peermem module loaded")
    error: Optional[str] = None


def parse_gdr(exit_code: int, stdout: str, stderr: str = "") -> GdrFact:
    lines = [x.strip() for x in stdout.splitlines() if x.strip()]
    peermem = PEERMEM_LINE in lines
    if "no GPU" in lines:
        return GdrFact(peermem=peermem)
    if "no libmlx5" in lines:
        return GdrFact(gpu=True, peermem=peermem)
    found = next((x for x in lines if x.startswith("mlx5dv_reg_dmabuf_mr ")), None)
    if found is None:
        tail = (stderr.strip() or stdout.strip()).splitlines()
        return GdrFact(peermem=peermem, error=(tail[-1] if tail else f"exit code {exit_code}")[:300])
    return GdrFact(gpu=True, libmlx5=True, dmabuf=found.endswith(" yes"), peermem=peermem)


# The memory CUDA will hand out: vLLM refuses to start when what is free is less than
# gpu_memory_utilization of the total (`Free memory on device (x/121.69 GiB) on startup ...`). On a GB10
# CUDA's free is the kernel's MemFree (page cache counts as used), and tops out below the total even
# headless with the page cache dropped (101-110 of 121.69 GiB, by kit). Without a GPU (the simulated
# cluster's CPU build of vLLM) the figure is the CPU build's own: available of total memory.
CEILING_SCRIPT = ('import glob; g = glob.glob("/dev/nvidia[0-9]*"); '
                  'm = {} if g else dict((x.split(":")[0], int(x.split()[1]) * 1024) for x in open("/proc/meminfo")); '
                  'print("cuda" if g else "cpu", *(__import__("torch").cuda.mem_get_info() if g else (m["MemAvailable"], m["MemTotal"])))')


class CeilingFact(BaseModel):
    source: Optional[str] = Field(None, description="cuda: torch.cuda.mem_get_info on the GPU; cpu: the CPU build's figure")
    free_bytes: Optional[int] = None
    total_bytes: Optional[int] = None
    error: Optional[str] = None

    @property
    def highest_utilization(self) -> Optional[float]:
        """The highest gpu_memory_utilization (two decimals) whose share of the total is free now."""
        if not self.free_bytes or not self.total_bytes:
            return None
        return int(self.free_bytes / self.total_bytes * 100) / 100


def parse_ceiling(exit_code: int, stdout: str, stderr: str = "") -> CeilingFact:
    m = re.search(r"^(cuda|cpu) (\d+) (\d+)\s*$", stdout, re.M)
    if m:
        return CeilingFact(source=m.group(1), free_bytes=int(m.group(2)), total_bytes=int(m.group(3)))
    tail = [x for x in (stderr.strip() or stdout.strip()).splitlines() if x.strip()]
    return CeilingFact(error=(tail[-1] if tail else f"exit code {exit_code}")[:300])


# ---- the SM clock cap (gpu.max_clock_mhz): the driver's own answer is the read-back ---------------


def clock_lock_command(max_mhz: int, sudo: str) -> str:
    """`nvidia-smi -lgc 0,MAX` on every GPU of the node: it prints the range the driver set, clamped to
    what the GPU supports (`GPU clocks set to "(gpuClkMin 0, gpuClkMax 1860)" for GPU ...`)."""
    return f"if command -v nvidia-smi >/dev/null 2>&1; then {sudo}nvidia-smi -lgc 0,{int(max_mhz)} 2>&1; else echo 'no nvidia-smi'; fi"


def clock_reset_command(sudo: str) -> str:
    return f"if command -v nvidia-smi >/dev/null 2>&1; then {sudo}nvidia-smi -rgc 2>&1; else echo 'no nvidia-smi'; fi"


class ClockLockFact(BaseModel):
    max_mhz: list[int] = Field(default_factory=list, description="gpuClkMax the driver set, per GPU")
    error: Optional[str] = None


_CLOCKS_SET = re.compile(r'GPU clocks set to "\(gpuClkMin \S+, gpuClkMax (\d+)\)"')


def parse_clock_lock(exit_code: int, stdout: str) -> ClockLockFact:
    lines = [x.strip() for x in stdout.splitlines() if x.strip()]
    if lines == ["no nvidia-smi"]:
        return ClockLockFact(error="no nvidia-smi")
    found = [int(m.group(1)) for m in map(_CLOCKS_SET.search, lines) if m]
    if exit_code == 0 and found:
        return ClockLockFact(max_mhz=found)
    return ClockLockFact(max_mhz=found, error=next((x for x in lines if not _CLOCKS_SET.search(x)), f"exit code {exit_code}")[:300])
