"""What one look at a cluster saw: nodes, containers, processes, rank activity, Ray, vLLM.

Data only (spark_cluster.observe reads it from the nodes and the engine; spark_cluster.judge
decides what it means), so the rules are table-tested on recorded observations.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, PrivateAttr

from .facts import ContainerFact, RayNode, RayPlacementGroup
from .ranks import GpuBaseline, GpuReading, ProcessesReading, node_activity

SCHEMA_VERSION = 1


class ContainerObs(ContainerFact):
    """A container of the plan as seen on its node (state missing: the plan has it, the node does not)."""

    spec_current: Optional[bool] = Field(None, description="Whether the container matches the current cluster.yaml (its spec hash).")


class ProcessObs(BaseModel):
    name: str
    container: str = Field(description="The container it runs in.")
    component: str
    state: str  # running, gone, unknown (its container is not running)
    pid: Optional[int] = None
    detail: str = ""


class NodeObs(BaseModel):
    name: str
    role: str
    reachable: bool
    latency_ms: Optional[float] = None
    error: Optional[str] = None
    sysctl: dict[str, dict[str, Optional[str]]] = Field(default_factory=dict, description="key -> {expected, actual}")
    mem_total_gib: Optional[float] = None
    mem_available_gib: Optional[float] = None
    gpu: Optional[str] = Field(None, description="nvidia-smi memory use, or why there is none (GB10 reports N/A: unified memory)")
    containers: list[ContainerObs] = Field(default_factory=list)
    processes: list[ProcessObs] = Field(default_factory=list, description="Processes started in containers (vLLM in the Ray head).")
    gpu_power_w: Optional[float] = Field(None, description="Highest power.draw of the node's GPUs (nvidia-smi)")
    gpu_memory_util: Optional[float] = Field(None, description="Highest utilization.memory of the node's GPUs (memory traffic)")
    gpu_heat: Optional[str] = Field(None, description="Each GPU's temperature, SM clock against its maximum (and gpu.max_clock_mhz), "
                                                      "power, and what holds its clock back (heat, power): nvidia-smi")
    activity: Optional[str] = Field(None, description="What the node's rank(s) do (spark_cluster.ranks): working, compiling, waiting, "
                                                      "stopped, unknown")
    activity_evidence: str = ""
    _gpus: list[GpuReading] = PrivateAttr(default_factory=list)
    _procs: Optional[ProcessesReading] = PrivateAttr(None)
    _procs_before: Optional[ProcessesReading] = PrivateAttr(None)

    def judge_ranks(self, containers: list[str], before: Optional[ProcessesReading], baseline: GpuBaseline) -> None:
        """Sets `activity` and its evidence: the node's ranks against an earlier reading of its processes
        (the watchdog's last), or the one this observation took itself a moment earlier (status)."""
        if self._procs is None:
            self.activity, self.activity_evidence = "unknown", self.error or "not read"
            return
        paused = tuple(c.name for c in self.containers if c.state == "paused")
        act = node_activity(self.name, containers, before or self._procs_before, self._procs, self._gpus, baseline, paused)
        self.activity, self.activity_evidence = act.activity, act.evidence


class RayObs(BaseModel):
    checked: bool = False
    alive: list[str] = Field(default_factory=list)
    dead: list[str] = Field(default_factory=list)
    gpus: float = 0
    nodes: list[RayNode] = Field(default_factory=list, description="Ray's node table: address, alive, resources.")
    placement_groups: list[RayPlacementGroup] = Field(default_factory=list, description="Placement groups not removed: the engine's.")
    actors: int = Field(0, description="Live Ray actors (vLLM's workers).")
    error: Optional[str] = None


class VLLMObs(BaseModel):
    endpoint: str
    health: Optional[int] = Field(None, description="HTTP status of /health, None when it did not answer")
    health_ms: Optional[float] = None
    error: Optional[str] = None
    models: list[str] = Field(default_factory=list)
    key_refused: Optional[int] = Field(None, description="401/403 when vLLM refused the API key spark-cluster sent to /v1/models "
                                                         "(a configuration error)")
    version: Optional[str] = Field(None, description="vLLM version: from the server's /version, else what the last preflight found in the image")
    version_source: Optional[Literal["server", "preflight"]] = None
    running: Optional[float] = None
    waiting: Optional[float] = None
    kv_cache_usage: Optional[float] = None
    itl_sum: Optional[float] = Field(None, description="vllm:inter_token_latency_seconds: the sum of the times between two tokens")
    itl_count: Optional[float] = Field(None, description="... and how many there were")
    steps_total: Optional[float] = Field(None, description="vllm:iteration_tokens_total count: one per engine step")
    generation_tokens_total: Optional[float] = None
    prompt_tokens_total: Optional[float] = None
    window_s: Optional[float] = None
    steps_in_window: Optional[float] = None
    generation_tok_s: Optional[float] = Field(None, description="generation throughput over the sampling window")
    progress_age_s: Optional[float] = Field(None, description="seconds since the step/token counters last moved: as the watchdog last saw "
                                                               "them move, else at least the sampling window")
    progressed: Optional[bool] = Field(None, description="whether any progress counter (steps, generated or prompt tokens) moved "
                                                         "over the window (facts.progressed: the watchdog's rule too)")


class Observation(BaseModel):
    schema_version: int = SCHEMA_VERSION
    ts: str
    cluster: str
    executor: str
    plan_hash: str
    nodes: list[NodeObs]
    ray: RayObs
    vllm: VLLMObs
    watchdog: Optional[dict[str, Any]] = None
    took_s: float = 0

