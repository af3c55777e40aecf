"""Where an engine start's time went, from the engine's own log (pure: one command, one parser).

The API container's log (`docker logs --timestamps`) from the moment vLLM was started: the lines of
the API server and its EngineCore are written at once (the ranks' lines may come late through Ray's
log forwarding, so only their own figures are used). The parts, in order, each up to a line vLLM
prints:
- import: from the start to the EngineCore's "Initializing a V1 LLM engine" (Python, vLLM, the
  config, the EngineCore process);
- load: to "<device> KV cache size: N tokens" (the ranks started, imported and joined, the weights
  read, the memory profiled);
- warmup: to "init engine (profile, create kv cache, warmup model) took" (the KV cache created,
  torch.compile, CUDA graphs captured, the model warmed up);
- api: to uvicorn's "Application startup complete." (the API server's own start).
And vLLM's own figures, parts of the above: weights ("Model loading took … and S seconds", else
"Loading weights took S seconds", the slowest rank), compile ("(compilation: S s)" of the init
line, else "torch.compile took S s in total"; the CPU build prints neither: from the first rank's
"Warming up model for the compilation..." to the last rank's "Warming up done." by vLLM's own clock
in the lines), graph capture ("Graph capturing finished in S secs"). The KV cache the engine got ("… KV cache size: N tokens"; on GPUs also "Available KV
cache memory: G GiB") comes with them.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Optional

from pydantic import BaseModel

from .render import quote

# the parts an engine start is cut into, in order (restart phases are named engine/<part>)
PARTS = ("import", "load", "warmup", "api")
FIGURES = ("weights", "compile", "graph-capture")
FIGURE_PART = {"weights": "load", "compile": "warmup", "graph-capture": "warmup"}  # the part each figure is within

_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z) ")
_ENGINE = re.compile(r"Initializing a V1 LLM engine")
_KV_TOKENS = re.compile(r"\b(\w+) KV cache size: ([\d,]+) tokens")
_KV_GIB = re.compile(r"Available KV cache memory: ([\d.]+) GiB")
_INIT = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s(?: \(compilation: ([\d.]+) s)?")
_API = re.compile(r"Application startup complete\.")
_MODEL_LOADING = re.compile(r"Model loading took [\d.]+ GiB memory and ([\d.]+) seconds")
_WEIGHTS = re.compile(r"Loading weights took ([\d.]+) seconds")
_COMPILE = re.compile(r"torch\.compile took ([\d.]+) s in total")
_GRAPHS = re.compile(r"Graph capturing finished in ([\d.]+) secs")
# the CPU build's compile: a rank's warm-up for the compilation, by vLLM's own time in the line
_CPU_WARM = re.compile(r"\((Worker_TP\d+ pid=\d+)\) INFO (\d\d-\d\d \d\d:\d\d:\d\d) \[cpu_model_runner\.py:\d+\] "
                       r"Warming up (model for the compilation|done)")


# what the plan shows for the moment vLLM was started (the executor knows it once it has started it)
SINCE = "<since>"


def log_command(container: str, since: str) -> str:
    """The container's log with timestamps from `since` (RFC 3339, the node's clock)."""
    return f"docker logs --timestamps --since {quote(since)} {quote(container)} 2>&1"


class EngineStart(BaseModel):
    """One engine start as its log tells it."""

    parts: dict[str, float] = {}
    figures: dict[str, float] = {}
    kv_tokens: Optional[int] = None
    kv_device: Optional[str] = None
    kv_gib: Optional[float] = None


class KvCapacity(BaseModel):
    """The most KV cache an engine of these `vllm serve` flags got (kv.json): a start that gets less
    than the last one did is said out loud (a cold first boot can get ~5 % to tens of GiB less than
    a warm one of the same command, vllm#54383, #54122; memory another process holds, too)."""

    flags_hash: str
    device: str
    tokens: int
    gib: Optional[float] = None
    at: str = ""


# vLLM's flag for a KV cache of a given size per GPU (0.11 and later: CacheConfig.kv_cache_memory_bytes)
KV_PIN_FLAG = "--kv-cache-memory-bytes"
# flags by which a user sizes the KV cache themselves (then nothing is passed)
USER_KV_FLAGS = (KV_PIN_FLAG, "--num-gpu-blocks-override")


def kv_pin(kept: Optional[KvCapacity], flags_hash: str, extra_args: list[str]) -> Optional[int]:
    """The KV cache size in bytes to pass to an engine of these flags: what an engine of the same
    flags got, on a GPU (the CPU build sizes its cache from VLLM_CPU_KVCACHE_SPACE), unless the
    user's extra_args size it (any spelling vLLM's parser accepts: -- and _, =value)."""
    if kept is None or kept.gib is None or kept.flags_hash != flags_hash:
        return None
    given = {a.split("=", 1)[0].replace("_", "-") for a in extra_args if a.startswith("--")}
    if given & set(USER_KV_FLAGS):
        return None
    return int(kept.gib * 2**30)


def kv_less(kept: Optional[KvCapacity], flags_hash: str, start: EngineStart) -> Optional[str]:
    """What the engine just started lacks against the most an engine of the same flags got (None: as much or more, or nothing to compare)."""
    if kept is None or kept.flags_hash != flags_hash or start.kv_tokens is None or start.kv_tokens >= kept.tokens:
        return None
    share = 100 * (kept.tokens - start.kv_tokens) / kept.tokens
    return (f"the engine got a KV cache of {start.kv_tokens:,} tokens, {share:.1f} % less than the {kept.tokens:,} an engine of the "
            f"same flags got ({kept.at}): memory another process holds, or a colder start")


def _when(line: str) -> Optional[datetime]:
    m = _TS.match(line)
    if m is None:
        return None
    stamp = m.group(1).rstrip("Z")
    whole, _, frac = stamp.partition(".")
    return datetime.fromisoformat(f"{whole}.{(frac + '000000')[:6]}+00:00" if frac else f"{whole}+00:00")


def _cpu_compile(lines: list[str]) -> Optional[float]:
    """The CPU build's warm-up for the compilation, from the first rank's start to the last rank's end
    (vLLM's clock: whole seconds). The ranks compile in step (their collectives wait for each other),
    and Ray's log forwarding reorders ranks' lines and drops some: any rank's start and end will do."""
    began: list[datetime] = []
    done: list[datetime] = []
    for line in lines:
        if m := _CPU_WARM.search(line):
            (done if m.group(3) == "done" else began).append(datetime.strptime(m.group(2), "%m-%d %H:%M:%S"))
    if not began or not done:
        return None
    took = (max(done) - min(began)).total_seconds()
    return took if took >= 0 else None


def engine_start(log: str, started: datetime) -> EngineStart:
    """The last engine start in log (docker logs --timestamps), begun at started (aware UTC)."""
    lines = log.splitlines()
    first = max((i for i, line in enumerate(lines) if _ENGINE.search(line)), default=None)
    if first is None:
        return EngineStart()
    marks: dict[str, datetime] = {}
    figures: dict[str, float] = {}
    out = EngineStart()
    for i, line in enumerate(lines[first:]):
        when = _when(line)
        if i == 0 and when is not None:
            marks["import"] = when
        if (m := _KV_TOKENS.search(line)) and "load" not in marks:
            out.kv_device, out.kv_tokens = m.group(1), int(m.group(2).replace(",", ""))
            if when is not None:
                marks["load"] = when
        if (m := _KV_GIB.search(line)) and out.kv_gib is None:
            out.kv_gib = float(m.group(1))
        if (m := _INIT.search(line)) and "warmup" not in marks:
            if when is not None:
                marks["warmup"] = when
            if m.group(2) is not None:
                figures["compile"] = float(m.group(2))
        if _API.search(line) and "api" not in marks and when is not None:
            marks["api"] = when
        for pattern, name in ((_MODEL_LOADING, "model-loading"), (_WEIGHTS, "weights"), (_COMPILE, "torch-compile"), (_GRAPHS, "graph-capture")):
            if m := pattern.search(line):
                figures[name] = max(figures.get(name, 0.0), float(m.group(1)))
    if "compile" not in figures and (cpu := _cpu_compile(lines[first:])) is not None:
        figures["compile"] = cpu
    # the GPU runner's figure holds the model's whole load; a CPU or other loader says only its weights
    if "model-loading" in figures:
        figures["weights"] = figures.pop("model-loading")
    if "torch-compile" in figures:
        figures.setdefault("compile", figures.pop("torch-compile"))
    previous = started
    for part in PARTS:
        if part in marks:
            out.parts[part] = round(max(0.0, (marks[part] - previous).total_seconds()), 2)
            previous = marks[part]
    out.figures = {k: round(figures[k], 2) for k in FIGURES if k in figures}
    return out
