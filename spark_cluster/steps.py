"""The plan as data: its steps and what they create (built by spark_cluster.plan, and for `down`
by spark_cluster.lifecycle; run by spark_cluster.executor)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .checks import Check
from .settings import Mount

if TYPE_CHECKING:
    from .config import ClusterConfig
    from .link import LinkPick
    from .settings import Node

# `up`'s phases in order, then those `down` adds
PHASES: tuple[str, ...] = ("lock", "list", "preflight", "prepare", "replace", "clear", "memory", "cache", "start-workers", "start-head",
                           "wait-ray", "serve", "ready", "seal", "unlock")
Phase = Literal["lock", "list", "preflight", "prepare", "replace", "clear", "memory", "cache", "start-workers", "start-head", "wait-ray",
                "serve", "ready", "seal", "unlock", "kill", "remove", "restore"]


# the containers that are the engine's ranks themselves (native executor); on Ray, the engine is the process in the head container
ENGINE_COMPONENTS = ("vllm", "vllm-worker")


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ContainerSpec(Frozen):
    """One cluster container, as `docker run` will create it."""

    name: str
    node: str
    component: Literal["ray-head", "ray-worker", "vllm", "vllm-worker"]
    image: str
    entrypoint: str
    command: list[str]
    env: dict[str, str]
    labels: dict[str, str]
    mounts: list[Mount]
    gpus: Optional[str]
    network: str
    ipc: str
    privileged: bool
    shm_size: str
    stop_timeout_s: int
    extra_args: list[str]


class ProcessSpec(Frozen):
    """A process started inside a running cluster container with `docker exec` (kind exec).

    On the Ray path vLLM runs inside the Ray head container, as the card does it: Ray's driver
    finds its own node's raylet by scanning the process table, which a container with its own PID
    namespace cannot see. Its output goes to the container's log (PID 1's stdout), its PID to
    pid_file, so `logs`, `status` and the watchdog find it."""

    name: str
    node: str
    container: str = Field(description="The container it runs in.")
    component: Literal["vllm"]
    argv: list[str]
    env: dict[str, str] = Field(description="Environment added to the container's for this process.")
    pid_file: str
    non_carry_over: list[str] = Field(
        description="Variables vLLM must not copy from its driver to the Ray workers (their values differ per node); "
        "written to vLLM's ray_non_carry_over_env_vars.json before it starts.")


class HttpRequest(Frozen):
    method: Literal["GET", "POST"]
    url: str
    json_body: Optional[dict[str, Any]] = None


class Step(Frozen):
    """One thing `up` or `down` does, on one node (or on the controller when node is None)."""

    id: str
    phase: Phase
    node: Optional[str]
    kind: Literal["check", "run", "start", "exec", "wait-ray", "http", "lock", "unlock", "list", "remove", "kill"]
    description: str
    command: Optional[str] = Field(None, description="Shell command run on the node over SSH (secrets masked unless revealed).")
    request: Optional[HttpRequest] = Field(None, description="HTTP request made by the controller (kind http).")
    container: Optional[ContainerSpec] = Field(None, description="The container this step creates (kind start).")
    process: Optional[ProcessSpec] = Field(None, description="The process this step starts in a container (kind exec).")
    clears: Optional[str] = Field(None, description="Phase clear: the exec step (its id) whose way this step clears; run only when that "
                                                    "process starts again in a container that was kept.")
    stdin: Optional[str] = Field(None, description="Template file (templates/) fed to the command on standard input.")
    timeout_s: float = Field(..., description="Deadline of one attempt.")
    deadline_s: Optional[float] = Field(None, description="For polls: keep trying until this many seconds have passed.")
    check: Optional[Check] = Field(None, description="What the result must show (spark_cluster.checks); without one: exit code 0.")
    also: list[str] = Field(default_factory=list, description=(
        "Other commands this step runs on its node: before its command (remove: the hosted process stopped, the log "
        "saved), or when what it finds asks for them (lock: who holds it, a stale lock removed; a start: the process "
        "polled, the last log lines on a failure; the image: pulled, or copied from another node)."))

    @model_validator(mode="after")
    def _checks_have_a_check(self) -> "Step":
        if self.kind in ("check", "wait-ray", "http") and self.check is None:
            raise ValueError(f"step {self.id} ({self.kind}) has no check: it would pass on any result")
        return self


class Plan(Frozen):
    cluster: str
    executor: Literal["ray", "native"]
    endpoint: str
    served_model: str
    gpu_memory_utilization: float
    gpu_memory_utilization_source: str
    vllm_argv: list[str] = Field(description="`vllm serve` argv of the API (rank 0) process, for validation against vLLM's parser.")
    vllm_argvs: list[list[str]] = Field(description="Every distinct `vllm serve` argv the plan runs (rank 0 first).")
    flags_hash: str = Field(description="Hash of those argvs (secrets masked) without a kept KV cache size: what kv.json is kept by.")
    kv_pin_bytes: Optional[int] = Field(None, description="The kept KV cache size passed to the engine (--kv-cache-memory-bytes).")
    plan_hash: str
    steps: list[Step]

    def containers(self) -> list[ContainerSpec]:
        return [s.container for s in self.steps if s.container is not None]

    def processes(self) -> list[ProcessSpec]:
        return [s.process for s in self.steps if s.process is not None]

    @property
    def api_container(self) -> str:
        """The container whose log holds the vLLM API server's output (on the head)."""
        proc = next(iter(self.processes()), None)
        if proc is not None:
            return proc.container
        return next(c.name for c in self.containers() if c.component == "vllm")

    def steps_in(self, phase: str) -> list[Step]:
        return [s for s in self.steps if s.phase == phase]




class DownPlan(Frozen):
    """`down`'s plan (spark_cluster.lifecycle.build_down_plan)."""

    cluster: str
    graceful: bool
    steps: list[Step]

    def steps_in(self, phase: str) -> list[Step]:
        return [s for s in self.steps if s.phase == phase]


class RestartPlan(Frozen):
    """What the watchdog runs on a hang (spark_cluster.lifecycle.build_restart_plan): which restart
    and when, the kept restart's steps (None when this config never gets it), the full one's."""

    cluster: str
    on_hang: str
    kept: Optional[list[Step]] = Field(description="Each container's log saved, the engine killed, Ray's release waited for, then `up` in "
                                                   "the kept containers (its start steps skipped).")
    full_kill: DownPlan
    full_up: Plan


# ---- what every step of a cluster shares ------------------------------------------------------


def container_name(cfg: ClusterConfig, component: str) -> str:
    return f"{cfg.name}-{component}"


# the value of a variable `nccl: auto` has not detected yet (shown by `plan`; `up` detects before it starts anything)
NOT_DETECTED = "<auto: detected by preflight>"


def node_env(cfg: ClusterConfig, node: Node, link: Optional[LinkPick] = None) -> dict[str, str]:
    """Environment of a node's containers: the caches' locations (caches.cache_env), NCCL (per node;
    with `nccl: auto` what was detected for the variables not given), vLLM's host IP, then user env."""
    from .caches import cache_env

    nccl = cfg.node_nccl(node)
    env: dict[str, str] = dict(cache_env(cfg))
    if nccl.auto:
        detected = link.env() if link is not None else {"NCCL_SOCKET_IFNAME": NOT_DETECTED, "GLOO_SOCKET_IFNAME": NOT_DETECTED,
                                                        "NCCL_IB_HCA": NOT_DETECTED}
        env.update(detected)
    env.update(nccl.env())
    env["VLLM_HOST_IP"] = node.address
    env.update(cfg.container.env)
    env.update(node.env)
    return env
