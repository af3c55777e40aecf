"""Memory back before an engine starts (pure: one command, its parser, the rule).

On unified memory (GB10) a killed engine can leave tens of GB held in the driver, invisible to
nvidia-smi and to `free`'s used column; an engine started into it fails, or starts with less KV
cache than the last one. So each node's available memory is read right before an engine starts
(MemAvailable, and the GPUs' own free memory where they have their own), kept as the node's
baseline when it is there, and a start waits, bounded, until each node is back within a slack of
its baseline: a restart that keeps the containers falls back to removing them, and what even that
does not bring back is refused with the figures (errors.MemoryNotBack).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

from pydantic import BaseModel

from .facts import GPU_COMMAND, MEMINFO_COMMAND, parse_gpu, parse_meminfo

GPU_MARK = "@@gpu"
MEMORY_COMMAND = f"{MEMINFO_COMMAND}; echo {GPU_MARK}; {GPU_COMMAND}"

# the least slack a node gets below its baseline (other processes come and go), else this share of its memory
MIN_SLACK_GIB = 2.0
SLACK_SHARE = 0.05


class MemoryReading(BaseModel):
    """One node's memory as an engine would find it."""

    available_gib: float
    total_gib: float
    gpu_free_gib: Optional[float] = None
    at: str = ""

    def describe(self) -> str:
        gpu = f", GPU {self.gpu_free_gib:.1f} GiB free" if self.gpu_free_gib is not None else ""
        return f"{self.available_gib:.1f} of {self.total_gib:.1f} GiB available{gpu}"


def parse_memory(text: str) -> Optional[MemoryReading]:
    """MEMORY_COMMAND's output (None: /proc/meminfo could not be read)."""
    mem_part, _, gpu_part = text.partition(GPU_MARK)
    mem = parse_meminfo(mem_part)
    if not mem.known:
        return None
    assert mem.available_gib is not None and mem.total_gib is not None
    return MemoryReading(available_gib=mem.available_gib, total_gib=mem.total_gib, gpu_free_gib=parse_gpu(gpu_part).free_gib,
                         at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def slack_gib(total_gib: float, setting: Optional[float]) -> float:
    """How far below its baseline a node may be and still count as back."""
    return setting if setting is not None else round(max(MIN_SLACK_GIB, SLACK_SHARE * total_gib), 2)


def shortfall(baseline: Optional[MemoryReading], now: MemoryReading, slack: float) -> Optional[str]:
    """What has not come back since the baseline (None: back, or nothing to compare with)."""
    if baseline is None:
        return None
    short = []
    if now.available_gib < baseline.available_gib - slack:
        short.append(f"{now.available_gib:.1f} GiB available, {baseline.available_gib:.1f} GiB before the last engine start")
    if now.gpu_free_gib is not None and baseline.gpu_free_gib is not None and now.gpu_free_gib < baseline.gpu_free_gib - slack:
        short.append(f"GPU {now.gpu_free_gib:.1f} GiB free, {baseline.gpu_free_gib:.1f} GiB before the last engine start")
    if not short:
        return None
    when = f" ({baseline.at})" if baseline.at else ""
    return "; ".join(short) + f"{when}, {slack:g} GiB allowed below it"
