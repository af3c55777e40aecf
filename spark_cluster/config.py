"""cluster.yaml: the one file that describes a spark-cluster.

Every model forbids unknown keys and describes every field; `spark-cluster schema`
prints the JSON Schema generated from these classes.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError

# On GB10 the GPU and the CPU share one 128 GB pool. vLLM pre-allocates
# gpu_memory_utilization x total of it; above ~0.85 the OS, Ray and the page cache
# are starved and the box freezes or resets instead of failing with an OOM
# (docs/field.md, "What breaks" 3).
UNIFIED_MEMORY_CAP = 0.85
# Safe defaults when the file gives none: the card uses 0.50 for TP=2 over two Sparks.
DEFAULT_UTILIZATION_SINGLE_NODE = 0.75
DEFAULT_UTILIZATION_MULTI_NODE = 0.50

NAME_RE = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"
SIZE_RE = re.compile(r"^[0-9]+(\.[0-9]+)?[bkmgt]?$", re.IGNORECASE)
SYSCTL_KEY_RE = re.compile(r"^[a-z0-9_]+(\.[A-Za-z0-9_-]+)+$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SECRET_ENV_RE = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _size(value: Any) -> str:
    text = str(value).strip()
    if not SIZE_RE.match(text):
        raise ValueError(
            f"{value!r} is not a size: use a number with an optional unit b, k, m, g or t (e.g. 10.24g)"
        )
    return text


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)

    @field_validator("*")
    @classmethod
    def _no_nul_anywhere(cls, value: Any) -> Any:
        """No string of cluster.yaml may hold a NUL byte: no shell argument or environment can carry one."""
        stack = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                _no_nul(v)
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
            elif isinstance(v, dict):
                stack.extend(v.keys())
                stack.extend(v.values())
        return value


class SSHSettings(Strict):
    """How the controller reaches a node over SSH (paramiko). Values here are the
    defaults for every node; a node's own `ssh:` block overrides them."""

    user: Optional[str] = Field(None, description="SSH user. Default: from ~/.ssh/config, else the local user.")
    port: Optional[int] = Field(None, ge=1, le=65535, description="SSH port. Default: from ~/.ssh/config, else 22.")
    key: Optional[str] = Field(None, description="Private key file. Default: from ~/.ssh/config, else the SSH agent and ~/.ssh/id_*.")
    known_hosts: Optional[str] = Field(
        None, description="known_hosts file used to verify host keys (strict). Default: ~/.ssh/known_hosts."
    )
    config_file: Optional[str] = Field(
        None, description="OpenSSH client config honoured for Host aliases, User, Port, IdentityFile. Default: ~/.ssh/config."
    )
    trust_on_first_use: Optional[bool] = Field(
        None, description="Accept and record an unknown host key on first contact. Off by default: unknown keys stop the run."
    )
    sudo: Optional[bool] = Field(
        None, description="Prefix privileged node commands (sysctl, page-cache drop) with `sudo -n`. Set true when the user is not root."
    )
    connect_timeout_s: Optional[float] = Field(None, gt=0, description="TCP+SSH handshake deadline per connection. Default 10.")
    command_timeout_s: Optional[float] = Field(None, gt=0, description="Default deadline of one remote command. Default 120.")

    def merged(self, override: "SSHSettings | None") -> "SSHSettings":
        if override is None:
            return self
        data = self.model_dump()
        data.update({k: v for k, v in override.model_dump().items() if v is not None})
        return SSHSettings(**data)


SSH_DEFAULTS = {"trust_on_first_use": False, "sudo": False, "connect_timeout_s": 10.0, "command_timeout_s": 120.0}


class NCCLSettings(Strict):
    """NCCL environment for the cross-node link. Cluster-wide values; a node's
    own `nccl:` block overrides them (interface names can differ per box)."""

    socket_ifname: Optional[str] = Field(None, description="NCCL_SOCKET_IFNAME: the interface of the cluster (CX7/RoCE) link, e.g. enP2p1s0f0np0.")
    ib_hca: Optional[str] = Field(None, description="NCCL_IB_HCA: the RoCE device(s), e.g. roceP2p1s0f0.")
    p2p_disable: Optional[bool] = Field(None, description="NCCL_P2P_DISABLE=1 (the card's setting for GB10). Default true.")
    ib_gid_index: Optional[int] = Field(None, ge=0, description="NCCL_IB_GID_INDEX, when RoCE needs an explicit GID index.")
    auto: Optional[bool] = Field(None, description="Detect the link per node before anything starts: NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME "
                                 "(the interface holding the node's address), NCCL_IB_HCA (the RDMA devices of both halves of its "
                                 "ConnectX-7 cable). Values given here or in env win. `nccl: auto` is short for `nccl: {auto: true}`; "
                                 "`plan` shows what the last detection found (state_dir/link.json).")
    debug: Optional[str] = Field(None, description="NCCL_DEBUG level, e.g. INFO to see NET/IB vs NET/Socket in the logs.")
    extra: dict[str, str] = Field(default_factory=dict, description="Any other NCCL_* variables.")

    @model_validator(mode="before")
    @classmethod
    def _auto_shorthand(cls, data: Any) -> Any:
        return {"auto": True} if data == "auto" else data

    @field_validator("extra")
    @classmethod
    def _extra_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not ENV_KEY_RE.match(key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
        return {k: _no_nul(str(v)) for k, v in value.items()}

    def merged(self, override: "NCCLSettings | None") -> "NCCLSettings":
        if override is None:
            return self
        data = self.model_dump()
        for key, val in override.model_dump().items():
            if key == "extra":
                data["extra"] = {**data["extra"], **val}
            elif val is not None:
                data[key] = val
        return NCCLSettings(**data)

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.socket_ifname:
            out["NCCL_SOCKET_IFNAME"] = self.socket_ifname
        if self.ib_hca:
            out["NCCL_IB_HCA"] = self.ib_hca
        if self.p2p_disable is not False:
            out["NCCL_P2P_DISABLE"] = "1"
        if self.ib_gid_index is not None:
            out["NCCL_IB_GID_INDEX"] = str(self.ib_gid_index)
        if self.debug:
            out["NCCL_DEBUG"] = self.debug
        out.update(self.extra)
        return out


class Node(Strict):
    """One box of the cluster."""

    name: str = Field(..., pattern=NAME_RE, description="Short name of the node (lowercase letters, digits, dashes).")
    host: str = Field(..., min_length=1, description="SSH address: hostname, IP or a Host alias of ~/.ssh/config.")
    address: str = Field(..., description="Cluster (RoCE/CX7) IP address of this node, used by Ray, NCCL and vLLM between nodes.")
    role: Literal["head", "worker"] = Field(..., description="Exactly one node is the head: it runs the Ray head and the vLLM API server.")
    gpus: int = Field(1, ge=0, le=16, description="Accelerators (tensor-parallel ranks) this node contributes. A DGX Spark has one.")
    ssh: Optional[SSHSettings] = Field(None, description="Overrides of the cluster-wide ssh settings for this node.")
    nccl: Optional[NCCLSettings] = Field(None, description="Overrides of the cluster-wide NCCL settings for this node.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for this node's containers.")

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address (Ray's --node-ip-address needs one)") from None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9_.:%-]+$", value):
            raise ValueError(f"{value!r} is not a hostname, IP address or ssh alias")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_env(value)


def _check_env(value: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, val in value.items():
        if not ENV_KEY_RE.match(str(key)):
            raise ValueError(f"{key!r} is not a valid environment variable name")
        out[str(key)] = _no_nul(str(val))
    return out


class Mount(Strict):
    source: str = Field(..., description="Absolute path on the node.")
    target: str = Field(..., description="Absolute path inside the container.")
    read_only: bool = Field(False, description="Mount read-only.")


class ContainerSettings(Strict):
    """The container every node runs (the card's `docker run` line)."""

    image: str = Field(..., min_length=1, description="Image with vLLM and Ray, e.g. vllm/vllm-openai:v0.17.1. Pin a tag: :latest drifts between nodes.")
    shm_size: str = Field("10.24g", description="--shm-size (the card uses 10.24g).")
    network: Literal["host"] = Field("host", description="--network. Multi-node vLLM needs the host network.")
    ipc: Literal["host"] = Field("host", description="--ipc. The host IPC namespace, as in the card.")
    privileged: bool = Field(True, description="--privileged (the card's setting, needed for RoCE devices). Off only where the machine forbids it.")
    gpus: Optional[str] = Field("all", description="--gpus value (NVIDIA container runtime). null requests no GPU (simulated nodes).")
    mounts: list[Union[str, Mount]] = Field(
        default_factory=list, description="Bind mounts, as `source:target[:ro]` strings or {source, target, read_only}."
    )
    env: dict[str, str] = Field(
        default_factory=lambda: {"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600"},
        description="Environment of every container. Variables whose name looks like a secret (TOKEN, SECRET, PASSWORD, API_KEY...) are masked in every output.",
    )
    secret_env: list[str] = Field(default_factory=list, description="More environment variable names to mask in every output.")
    extra_args: list[str] = Field(default_factory=list, description="Extra `docker run` arguments, passed as separate words.")
    stop_timeout_s: int = Field(30, ge=0, description="Seconds docker waits after SIGTERM before SIGKILL when stopping a container.")

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$", value):
            raise ValueError(f"{value!r} is not a docker image reference")
        return value

    @field_validator("shm_size", mode="before")
    @classmethod
    def _shm(cls, value: Any) -> str:
        return _size(value)

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, value: Any) -> Any:
        if value is False:
            return None
        if value is True:
            return "all"
        return value

    @field_validator("mounts")
    @classmethod
    def _mounts(cls, value: list[Union[str, Mount]]) -> list[Union[str, Mount]]:
        out: list[Union[str, Mount]] = []
        for item in value:
            if isinstance(item, str):
                parts = item.split(":")
                if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                    raise ValueError(f"{item!r} is not `source:target[:ro]`")
                item = Mount(source=parts[0], target=parts[1], read_only=len(parts) == 3 and parts[2] == "ro")
            for p in (item.source, item.target):
                if not p.startswith("/"):
                    raise ValueError(f"mount path {p!r} is not absolute")
                _no_nul(p)
            out.append(item)
        return out

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_env(value)

    @field_validator("extra_args")
    @classmethod
    def _extra(cls, value: list[str]) -> list[str]:
        return [_no_nul(str(v)) for v in value]

    def mount_list(self) -> list[Mount]:
        return [m for m in self.mounts if isinstance(m, Mount)]


class RaySettings(Strict):
    """The Ray cluster (executor: ray)."""

    port: int = Field(6399, ge=1, le=65535, description="GCS port of the Ray head (the card uses 6399).")
    dashboard: bool = Field(False, description="Run Ray's dashboard on the head (about 400 MB more on unified memory).")
    object_store_memory: Optional[str] = Field(None, description="--object-store-memory for every Ray node, as a size (e.g. 2g). Default: Ray's.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources every node advertises (--resources).")
    extra_args: list[str] = Field(default_factory=list, description="Extra `ray start` arguments.")

    @field_validator("object_store_memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return None if value is None else _size(value)

    def object_store_bytes(self) -> Optional[int]:
        return None if self.object_store_memory is None else parse_size(self.object_store_memory)


class ModelSettings(Strict):
    """The model every node serves from its local disk."""

    path: str = Field(..., description="Absolute path of the model folder on every node. It is mounted read-only into the containers.")
    container_path: Optional[str] = Field(None, description="Where the model appears inside the container. Default: the same path.")
    served_name: Optional[str] = Field(None, description="--served-model-name. Default: the folder's name.")
    sync: bool = Field(False, description="`up` first makes the folder identical on every node (as `spark-cluster sync`: node to node over "
                                          "the cluster link, from a node that has the whole model).")

    @field_validator("path", "container_path")
    @classmethod
    def _abs(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return value
        _no_nul(value)
        if not value.startswith("/"):
            raise ValueError(f"{value!r} is not an absolute path")
        if len(value.rstrip("/")) == 0:
            raise ValueError("the model path cannot be /")
        return value

    @field_validator("served_name")
    @classmethod
    def _name(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else _no_nul(value)

    @property
    def in_container(self) -> str:
        return self.container_path or self.path

    @property
    def name(self) -> str:
        return self.served_name or self.path.rstrip("/").rsplit("/", 1)[-1]


class VLLMSettings(Strict):
    """`vllm serve` flags."""

    host: str = Field("0.0.0.0", description="--host the API server binds.")
    port: int = Field(8000, ge=1, le=65535, description="--port of the OpenAI-compatible API.")
    endpoint: Optional[str] = Field(
        None, description="URL the controller and clients use for the API. Default: http://<head host>:<port>."
    )
    tensor_parallel_size: Optional[int] = Field(None, ge=1, description="--tensor-parallel-size. Default: all GPUs of the cluster / pipeline_parallel_size.")
    pipeline_parallel_size: int = Field(1, ge=1, description="--pipeline-parallel-size.")
    max_model_len: Optional[int] = Field(None, ge=1, description="--max-model-len.")
    gpu_memory_utilization: Optional[float] = Field(
        None, gt=0, le=1, description="--gpu-memory-utilization. Default derived (0.75 one node, 0.50 over nodes); capped at 0.85 on unified memory."
    )
    max_num_seqs: Optional[int] = Field(None, ge=1, description="--max-num-seqs.")
    dtype: Optional[str] = Field(None, description="--dtype.")
    enforce_eager: bool = Field(False, description="--enforce-eager (no CUDA graphs).")
    enable_prefix_caching: Optional[bool] = Field(None, description="--enable-prefix-caching / --no-enable-prefix-caching. Default: vLLM's.")
    reasoning_parser: Optional[str] = Field(None, description="--reasoning-parser, e.g. qwen3.")
    enable_auto_tool_choice: bool = Field(False, description="--enable-auto-tool-choice (needs tool_call_parser).")
    tool_call_parser: Optional[str] = Field(None, description="--tool-call-parser, e.g. qwen3_xml.")
    trust_remote_code: bool = Field(False, description="--trust-remote-code.")
    master_port: int = Field(29501, ge=1, le=65535, description="--master-port of vLLM's native multi-node mode (executor: native).")
    extra_args: list[str] = Field(default_factory=list, description="Extra `vllm serve` arguments, passed as separate words.")
    check_flags: bool = Field(
        True,
        description="Preflight: check the rendered `vllm serve` flags with the image's own vLLM parser "
        "(a throwaway container on the head, no GPU, no network) before any container starts.",
    )
    check_timeout_s: float = Field(300, gt=0, description="Deadline of that check (importing vLLM takes 5-30 s).")

    @field_validator("extra_args")
    @classmethod
    def _extra(cls, value: list[str]) -> list[str]:
        return [_no_nul(str(v)) for v in value]

    @field_validator("reasoning_parser", "tool_call_parser", "dtype")
    @classmethod
    def _word(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else _no_nul(value)

    @model_validator(mode="after")
    def _tools(self) -> "VLLMSettings":
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser (vLLM refuses it otherwise)")
        return self


class MemoryGuard(Strict):
    """Protects unified-memory boxes from freezing."""

    unified: bool = Field(True, description="Nodes share one memory pool between CPU and GPU (GB10). Enables the 0.85 cap.")
    override_cap: bool = Field(
        False, description="Allow gpu_memory_utilization above 0.85 on unified memory. The box may freeze instead of failing."
    )
    drop_page_cache: bool = Field(False, description="Drop the page cache on every node before (re)starting (frees unified memory held by file cache).")
    min_free_gib: Optional[float] = Field(
        None, ge=0, description="Free memory every node needs before start. Default: derived from gpu_memory_utilization."
    )


class HealthSettings(Strict):
    """Deadlines of `up` and of the probes."""

    ray_join_timeout_s: float = Field(300, gt=0, description="How long to wait for every node to join Ray.")
    ready_timeout_s: float = Field(1800, gt=0, description="How long the model may take to load until a real completion succeeds (loads take minutes on Sparks).")
    probe_timeout_s: float = Field(5, gt=0, description="Deadline of one HTTP probe.")
    completion_timeout_s: float = Field(60, gt=0, description="Deadline of the readiness completion.")
    poll_interval_s: float = Field(2, gt=0, description="Interval between polls of Ray's membership while `up` waits for the nodes to join (each poll imports Ray in the head container; vLLM's readiness is polled every 0.25 s).")


# vLLM's own deadline of one engine step across ranks (VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS' default)
VLLM_STEP_TIMEOUT_S = 300.0


class WatchdogSettings(Strict):
    """The failover controller (`spark-cluster watch`). Defaults: docs/failover.md, from docs/field.md."""

    period_s: float = Field(2, gt=0, description="Seconds between observations (one SSH command per node and two local HTTP requests).")
    stall_window_s: float = Field(
        10, gt=0, description="No progress this long while work is pending: a hang when a rank is seen stopped or spinning at near-idle "
        "power (confirmed at once), busy when every rank is seen working (up to busy_budget_s), else suspect until a canary decides. "
        "A loaded hang is confirmed in about 12-20 s: well before Ray's ~65 s dead-node timeout.",
    )
    canary_timeout_s: float = Field(5, gt=0, description="A suspect cluster is confirmed hung when a 1-token completion does not finish within this.")
    idle_canary_s: float = Field(30, gt=0, description="An idle engine (nothing in flight, no progress) gets a 1-token canary this often: a hang "
                                                       "nobody is waiting on yet is found within about this plus the canary deadline.")
    grace_after_start_s: float = Field(60, ge=0, description="No hang verdict this long after a (re)start became ready.")
    backoff_base_s: float = Field(10, ge=0, description="First restart backoff; doubles each consecutive restart (Kubernetes/GPUStack).")
    backoff_max_s: float = Field(300, ge=0, description="Cap of the restart backoff.")
    backoff_reset_s: float = Field(600, ge=0, description="Healthy this long resets the backoff.")
    max_restarts_per_hour: int = Field(3, ge=0, description="Circuit breaker: more restarts than this in an hour stop the watchdog (state failed).")
    enabled: bool = Field(True, description="Restart automatically (false: only observe and report).")
    busy_budget_s: Optional[float] = Field(
        None, gt=0, description="How long a step may run without progress while every rank is seen working (GPU power above its idle "
        "baseline, CPU ranks using CPU, a compile running) before the canary may confirm a hang. Default: the engine's own step "
        "timeout, VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS of the head's container environment, else vLLM's 300 s: past it vLLM fails the "
        "step itself.")


class GatewaySettings(Strict):
    """The gateway (`spark-cluster controller`): the OpenAI API (/v1/*) clients use instead of vLLM's
    port, hiding failover. It answers nothing else but `/health` (200 while it lets requests through)."""

    host: str = Field("0.0.0.0", description="Address the gateway listens on (clients).")
    port: int = Field(8080, ge=1, le=65535, description="Port clients use instead of vLLM's.")
    hold_s: float = Field(600, ge=0, description="How long a request may wait while the cluster is not serving (restarting, "
                                                 "backing off, starting, hang confirmed) before it gets 503 with Retry-After. "
                                                 "A restart on Sparks reloads the model: minutes.")
    max_held: int = Field(256, ge=0, description="Most requests held at once; past it new ones get 503 with Retry-After.")
    max_body: str = Field("32m", description="Largest request body accepted (413 above it), as a size.")
    connect_timeout_s: float = Field(5, gt=0, description="Deadline to connect to vLLM (a refused or late connection is retried while held).")
    read_timeout_s: float = Field(900, gt=0, description="Longest silence from vLLM within one answer (between two chunks of a stream, "
                                                         "or before a non-streamed answer) before the request fails.")
    max_connections: int = Field(1024, ge=1, description="Connections to vLLM at once (httpx's default 100 is a known failure of routers "
                                                         "with many concurrent streams).")
    retry_after_s: int = Field(30, ge=1, description="Retry-After of a 503 past hold_s or max_held.")

    @field_validator("max_body", mode="before")
    @classmethod
    def _max_body(cls, value: Any) -> str:
        return _size(value)

    def max_body_bytes(self) -> int:
        return parse_size(self.max_body)


class LinkSettings(Strict):
    """The link gate: before anything starts, every node must reach every other over the cluster
    addresses with packets of the link's MTU that may not be fragmented."""

    check: Literal["reach", "bandwidth", "off"] = Field(
        "reach", description="reach: ping every other node at the MTU (small packets too, to tell an unreachable peer from an MTU that "
                             "differs on the path); bandwidth: that, then a bandwidth test refused below min_gbits: ib_write_bw per rail, "
                             "head to each worker, when every node has perftest and its RDMA devices are known, else a short all-reduce "
                             "across the nodes in the cluster's image with the containers' NCCL environment (Gloo on CPU without GPUs); "
                             "off: no gate.")
    min_gbits: float = Field(80, ge=0, description="link.check bandwidth: the least accepted, in Gb/s, per rail with ib_write_bw or as the "
                                                   "all-reduce's bus bandwidth (NVIDIA's playbook: 80 per rail; 8-25 means a link that came up "
                                                   "degraded).")
    mtu: Optional[int] = Field(None, ge=576, le=65536, description="The MTU to test; default each node's own MTU on the interface toward the "
                                                                   "peer (9000 where the ConnectX-7 link is set to jumbo frames).")


class ControllerSettings(Strict):
    """The controller's control plane: its API (/api), status page (/), Prometheus metrics (/metrics),
    incident bundles and API docs, on a port of their own, apart from the clients' gateway."""

    host: str = Field("127.0.0.1", description="Address the control plane listens on. The status page, events and incident bundles "
                                               "are readable by anyone who reaches it: from another machine use an SSH tunnel, or "
                                               "listen wider (0.0.0.0) only behind a firewall.")
    port: int = Field(8081, ge=1, le=65535, description="Port of the API, the status page and /metrics (what Prometheus scrapes).")


class ApiSettings(Strict):
    """Who may act through the controller's API (POST /api/restart, /api/watchdog/pause|resume)."""

    token_env: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                     description="Environment variable holding the API's bearer token.")
    token_file: Optional[str] = Field(None, description="File holding the API's bearer token (read at start). Default when neither is set: "
                                                        "state_dir/api-token, created with a random token (mode 600) on first start.")

    @model_validator(mode="after")
    def _one(self) -> "ApiSettings":
        if self.token_env and self.token_file:
            raise ValueError("give token_env or token_file, not both")
        return self


WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def _local_url(host: str, port: int) -> str:
    host = "127.0.0.1" if host in WILDCARD_HOSTS else f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


class ClusterConfig(Strict):
    """A spark-cluster: nodes, the container they run, and the vLLM engine across them."""

    name: str = Field(..., pattern=NAME_RE, description="Cluster name: container names and labels derive from it.")
    executor: Literal["ray", "native"] = Field(
        "ray", description="ray: the card's path (Ray workers, Ray head, vllm serve --distributed-executor-backend ray). native: vLLM's own multi-node mode (--nnodes/--node-rank, headless workers), no Ray."
    )
    nodes: list[Node] = Field(..., min_length=1, description="The boxes. Exactly one has role head.")
    ssh: SSHSettings = Field(default_factory=SSHSettings, description="SSH defaults for every node.")
    nccl: NCCLSettings = Field(default_factory=NCCLSettings, description="NCCL defaults for every node (`auto`: detected per node).")
    link: LinkSettings = Field(default_factory=LinkSettings, description="The link gate before anything starts.")
    sysctl: dict[str, Union[int, str]] = Field(
        default_factory=lambda: {"vm.swappiness": 1},
        description="Kernel settings applied on every node and persisted under /etc/sysctl.d/ (swap kills decode speed on Sparks).",
    )
    sysctl_file: str = Field("/etc/sysctl.d/90-spark-cluster.conf", description="Where the sysctls are persisted on every node.")
    container: ContainerSettings = Field(..., description="The container every node runs.")
    ray: RaySettings = Field(default_factory=RaySettings, description="Ray settings (executor: ray).")
    model: ModelSettings = Field(..., description="The model.")
    vllm: VLLMSettings = Field(default_factory=VLLMSettings, description="vllm serve settings.")
    memory: MemoryGuard = Field(default_factory=MemoryGuard, description="Unified-memory guard.")
    health: HealthSettings = Field(default_factory=HealthSettings, description="Deadlines.")
    watchdog: WatchdogSettings = Field(default_factory=WatchdogSettings, description="Failover controller.")
    gateway: GatewaySettings = Field(default_factory=GatewaySettings, description="The controller's gateway: what clients use instead of vLLM's port.")
    controller: ControllerSettings = Field(default_factory=ControllerSettings, description="The controller's API, status page and metrics.")
    api: ApiSettings = Field(default_factory=ApiSettings, description="The controller API's bearer token.")
    state_dir: Optional[str] = Field(None, description="Local folder for logs, events and incident bundles. Default: ~/.local/state/spark-cluster/<name>.")

    @field_validator("sysctl")
    @classmethod
    def _sysctl(cls, value: dict[str, Union[int, str]]) -> dict[str, Union[int, str]]:
        for key, val in value.items():
            if not SYSCTL_KEY_RE.match(key):
                raise ValueError(f"{key!r} is not a sysctl name like vm.swappiness")
            if not re.match(r"^[A-Za-z0-9 ._:/-]+$", str(val)):
                raise ValueError(f"{key}: {val!r} is not a plain sysctl value")
        return value

    @field_validator("sysctl_file")
    @classmethod
    def _sysctl_file(cls, value: str) -> str:
        if not re.match(r"^/etc/sysctl\.d/[A-Za-z0-9._-]+\.conf$", value):
            raise ValueError(f"{value!r} must be a .conf file directly under /etc/sysctl.d/")
        return value

    def problems(self) -> list[tuple[tuple[Any, ...], Any, str]]:
        """Checks across fields, as (key path, offending value, message). Empty when consistent."""
        out: list[tuple[tuple[Any, ...], Any, str]] = []
        heads = [i for i, n in enumerate(self.nodes) if n.role == "head"]
        if not heads:
            out.append((("nodes",), None, "no node has role head: exactly one must"))
        elif len(heads) > 1:
            names = ", ".join(self.nodes[i].name for i in heads)
            out.append((("nodes", heads[1], "role"), "head", f"{len(heads)} nodes have role head ({names}): exactly one must"))
        for attr in ("name", "host", "address"):
            seen: dict[str, str] = {}
            for i, node in enumerate(self.nodes):
                val = getattr(node, attr)
                if val in seen:
                    out.append((("nodes", i, attr), val, f"nodes {seen[val]} and {node.name} have the same {attr} {val!r}"))
                seen[val] = node.name
        gpus = self.total_gpus
        tp, pp = self.tensor_parallel_size, self.vllm.pipeline_parallel_size
        if tp * pp != gpus:
            out.append((
                ("vllm", "tensor_parallel_size"), tp,
                f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} = {tp * pp}, but the nodes have {gpus} GPU(s) in all: they must match",
            ))
        util = self.vllm.gpu_memory_utilization
        if util is not None and self.memory.unified and util > UNIFIED_MEMORY_CAP and not self.memory.override_cap:
            out.append((
                ("vllm", "gpu_memory_utilization"), util,
                f"above the {UNIFIED_MEMORY_CAP} cap for unified memory: on a GB10 the CPU and GPU share one pool, and above "
                f"{UNIFIED_MEMORY_CAP} the box freezes instead of failing cleanly. Use {UNIFIED_MEMORY_CAP} or less, or set "
                "memory.override_cap: true if you accept that risk",
            ))
        g, c = self.gateway, self.controller
        if g.port == c.port and (g.host == c.host or WILDCARD_HOSTS & {g.host, c.host}):
            out.append((("controller", "port"), c.port, f"the gateway listens on {g.host}:{g.port} already: give the controller "
                                                       "another port"))
        if self.executor == "native":
            for i, node in enumerate(self.nodes):
                if node.gpus > 1:
                    out.append((("nodes", i, "gpus"), node.gpus,
                                "the native executor runs one rank per node here; use executor: ray for several GPUs per node"))
        return out

    # ---- derived values -------------------------------------------------------------------
    def gateway_url(self) -> str:
        """Where this machine reaches the controller's gateway (clients elsewhere use the machine's address)."""
        return _local_url(self.gateway.host, self.gateway.port)

    def controller_url(self) -> str:
        """Where this machine reaches the controller's API, status page and metrics."""
        return _local_url(self.controller.host, self.controller.port)

    @property
    def head(self) -> Node:
        return next(n for n in self.nodes if n.role == "head")

    @property
    def workers(self) -> list[Node]:
        return [n for n in self.nodes if n.role == "worker"]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    @property
    def total_gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def tensor_parallel_size(self) -> int:
        if self.vllm.tensor_parallel_size is not None:
            return self.vllm.tensor_parallel_size
        return max(1, self.total_gpus // self.vllm.pipeline_parallel_size)

    @property
    def parallelism(self) -> str:
        """How the model is split, for people: "TP=2", "TP=2 x PP=2"."""
        pp = self.vllm.pipeline_parallel_size
        return f"TP={self.tensor_parallel_size}" + (f" x PP={pp}" if pp > 1 else "")

    def gpu_memory_utilization(self) -> tuple[float, str]:
        """The value passed to vLLM, and where it came from (shown by `plan`)."""
        util = self.vllm.gpu_memory_utilization
        if util is not None:
            src = "cluster.yaml vllm.gpu_memory_utilization"
            if self.memory.unified and util > UNIFIED_MEMORY_CAP:
                src += f" (above the {UNIFIED_MEMORY_CAP} unified-memory cap: allowed by memory.override_cap)"
            return util, src
        if len(self.nodes) == 1:
            return DEFAULT_UTILIZATION_SINGLE_NODE, "default for one node (leaves room for the OS on unified memory)"
        return (
            DEFAULT_UTILIZATION_MULTI_NODE,
            f"default for tensor parallel over {len(self.nodes)} nodes (the model card's 0.50: Ray, NCCL buffers and the OS share unified memory)",
        )

    def node_ssh(self, node: Node) -> SSHSettings:
        merged = SSHSettings(**SSH_DEFAULTS).merged(self.ssh).merged(node.ssh)
        return merged

    def node_nccl(self, node: Node) -> NCCLSettings:
        return self.nccl.merged(node.nccl)

    def endpoint(self) -> str:
        if self.vllm.endpoint:
            return self.vllm.endpoint.rstrip("/")
        host = self.head.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.vllm.port}"

    def engine_api_key(self) -> Optional[str]:
        """The key vLLM's API server demands on /v1/* (its `--api-key`, else VLLM_API_KEY in the head's
        container environment), or None. Readiness, the canary and status send it."""
        args = self.vllm.extra_args
        for i, arg in enumerate(args):
            if arg == "--api-key" and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith("--api-key="):
                return arg.split("=", 1)[1]
        return self._head_env().get("VLLM_API_KEY") or None

    def _head_env(self) -> dict[str, str]:
        """The environment the user gives the head's containers (vLLM's API server runs there)."""
        return {**self.container.env, **self.head.env}

    def busy_budget_s(self) -> float:
        """watchdog.busy_budget_s, else the engine's step timeout (VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS, vLLM's default 300 s)."""
        if self.watchdog.busy_budget_s is not None:
            return self.watchdog.busy_budget_s
        value = self._head_env().get("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "")
        try:
            return float(value) if float(value) > 0 else VLLM_STEP_TIMEOUT_S
        except ValueError:
            return VLLM_STEP_TIMEOUT_S

    def engine_headers(self) -> dict[str, str]:
        """Headers of every request the controller itself sends to vLLM's API."""
        key = self.engine_api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def secret_names(self) -> set[str]:
        names = set(self.container.secret_env)
        envs = [self.container.env] + [n.env for n in self.nodes]
        for env in envs:
            names.update(k for k in env if SECRET_ENV_RE.search(k))
        return names

    def secret_values(self) -> list[str]:
        """The values of every secret variable, longest first (to mask them in anything shown)."""
        names = self.secret_names()
        envs = [self.container.env] + [n.env for n in self.nodes]
        values = {str(v) for env in envs for k, v in env.items() if k in names and len(str(v)) >= 4}
        key = self.engine_api_key()
        if key and len(key) >= 4:
            values.add(key)
        return sorted(values, key=len, reverse=True)

    def resolved_state_dir(self) -> Path:
        return Path(self.state_dir or f"~/.local/state/spark-cluster/{self.name}").expanduser()


def parse_size(text: str) -> int:
    """docker-style size ("10.24g") to bytes."""
    text = text.strip().lower()
    mult = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    if text[-1] in mult:
        return int(float(text[:-1]) * mult[text[-1]])
    return int(float(text))


# ---- loading -------------------------------------------------------------------------------


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at a pydantic error location, as deep as it exists."""
    node, line = root, None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for key, val in node.value:
                if key.value == part:
                    nxt = val
                    line = key.start_mark.line + 1
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the model that sits at `loc` (for "did you mean")."""
    model: Any = ClusterConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        model = _model_in(ann)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _model_in(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _loc_text(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic inserts union member names ("str", "Mount") into locations: drop them
    return tuple(p for p in loc if isinstance(p, int) or p not in ("str", "Mount", "function-after[_mounts(), list[union[str,Mount]]]"))


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate cluster.yaml. Raises ConfigError naming the file, key path and value."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})") from None
    return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<string>") -> ClusterConfig:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level, found {type(data).__name__}")
    try:
        cfg = ClusterConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = _clean_loc(tuple(err["loc"]))
            line = _line_of(root, loc)
            where = f"{source}:{line}" if line else source
            value = err.get("input")
            if err["type"] == "extra_forbidden":
                key = loc[-1]
                choices = [f for f in _fields_at(loc[:-1]) if f != key]
                guess = difflib.get_close_matches(str(key), choices, n=1, cutoff=0.6)
                msg = f"{where}: {_loc_text(loc)}: unknown key"
                msg += f" (did you mean {guess[0]!r}?)" if guess else f" (known keys: {', '.join(choices)})"
            elif err["type"] == "missing":
                msg = f"{where}: {_loc_text(loc)}: required, but missing"
            else:
                reason = err["msg"].removeprefix("Value error, ")
                shown = "" if isinstance(value, (dict, list)) else f" = {value!r}"
                msg = f"{where}: {_loc_text(loc)}{shown}: {reason}"
            problems.append(msg)
        raise ConfigError(f"{source}: invalid cluster file", problems=problems) from None
    found = cfg.problems()
    if found:
        problems = []
        for loc, value, reason in found:
            line = _line_of(root, loc)
            where = f"{source}:{line}" if line else source
            shown = "" if value is None else f" = {value!r}"
            problems.append(f"{where}: {_loc_text(loc)}{shown}: {reason}")
        raise ConfigError(f"{source}: invalid cluster file", problems=problems)
    return cfg
