"""The sections of cluster.yaml (ssh, nccl, nodes, container, ray, model, vllm, memory, health,
watchdog, gateway, link, controller, api): one strict model each. spark_cluster.config puts them
together into ClusterConfig and loads the file.

Every model forbids unknown keys and describes every field; `spark-cluster schema` prints the
JSON Schema generated from these classes.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)


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


def size_text(value: Any) -> str:
    text = str(value).strip()
    if not SIZE_RE.match(text):
        raise ValueError(
            f"{value!r} is not a size: use a number with an optional unit b, k, m, g or t (e.g. 10.24g)"
        )
    return text


def parse_size(text: str) -> int:
    """docker-style size ("10.24g") to bytes."""
    text = text.strip().lower()
    mult = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    if text[-1] in mult:
        return int(float(text[:-1]) * mult[text[-1]])
    return int(float(text))


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


class Group(Strict):
    """One tensor-parallel group: nodes that serve one copy of the model (its own Ray cluster, or its
    own native group). Several groups of one model stand behind one gateway."""

    name: str = Field(..., pattern=NAME_RE, description="Short name of the group (its containers are named <cluster>-<group>-...).")
    nodes: list[str] = Field(..., min_length=1, description="The names of its nodes; the one with role head runs its Ray head "
                                                            "and API server.")


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
        return size_text(value)

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
    def _sized(cls, value: Any) -> Any:
        return None if value is None else size_text(value)

    def object_store_bytes(self) -> Optional[int]:
        return None if self.object_store_memory is None else parse_size(self.object_store_memory)


class ModelSettings(Strict):
    """The model every node serves from its local disk."""

    path: str = Field(..., description="Absolute path of the model folder on every node. It is mounted read-only into the containers.")
    container_path: Optional[str] = Field(None, description="Where the model appears inside the container. Default: the same path.")
    served_name: Optional[str] = Field(None, description="--served-model-name. Default: the folder's name.")
    sync: bool = Field(False, description="`up` first makes the folder identical on every node (as `spark-cluster sync`: node to node over "
                                          "the cluster link, from a node that has the whole model).")
    load_format: Optional[str] = Field(
        None, description="--load-format: how the weights are read (fastsafetensors, instanttensor, runai_streamer, ...: the names the "
                          "image's vLLM accepts, checked by the flag check). Default: vLLM's (auto).")
    load_strategy: Optional[str] = Field(
        None, description="--safetensors-load-strategy (eager: each file read whole first; lazy: memory-mapped, vLLM's default). On a "
                          "Spark an 80 GB model took 8 min 41 s mapped against 1 min 28 s eager (NVIDIA developer forum, thread 349886).")

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

    @field_validator("served_name", "load_format", "load_strategy")
    @classmethod
    def _name(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else _no_nul(value)

    def maps_weights(self) -> bool:
        """The weights are memory-mapped (vLLM's default for safetensors): no fast loader, no eager read."""
        return (self.load_format or "auto") in ("auto", "safetensors") and (self.load_strategy or "lazy") == "lazy"

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
    keep_kv_cache: bool = Field(
        True,
        description="Pass the KV cache size an engine of the same flags got (state_dir/kv.json) to every later start "
        "(--kv-cache-memory-bytes, vLLM 0.11 and later; GPUs only) so that capacity does not change from start to start. "
        "Not when extra_args set the KV cache size themselves.")
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


class CacheSettings(Strict):
    """Compiled kernels and compile caches (vLLM's torch.compile, FlashInfer, Triton, TorchInductor,
    TileLang, CUDA's) on each node's own disk instead of inside the container, so that a container
    started again finds them (a cold FlashInfer JIT alone took ~120 s of a 264 s start, vllm#47456)."""

    enabled: bool = Field(True, description="Mount the node's cache folder into the containers and point the caches there.")
    path: str = Field("/var/cache/spark-cluster", description="Absolute host folder on every node (the same path); each cluster and "
                                                              "image gets its own folder below it (created by Docker as root).")

    @field_validator("path")
    @classmethod
    def _abs(cls, value: str) -> str:
        _no_nul(value)
        if not value.startswith("/") or len(value.rstrip("/")) == 0 or ".." in value.split("/"):
            raise ValueError(f"{value!r} is not an absolute folder below / (without ..)")
        return value.rstrip("/")


class GpuSettings(Strict):
    """The GPU of every node."""

    max_clock_mhz: Optional[int] = Field(
        None, ge=300, le=4000,
        description="Cap the GPU's SM clock (`nvidia-smi -lgc 0,N` in prepare, read back from the driver, undone by `down`): a GB10 that "
                    "runs hot throttles to 70-80 % speed at 82 °C; capping at 2100 MHz took one unit from 91 to 65 °C. Default: no cap.")


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
    back_slack_gib: Optional[float] = Field(
        None, ge=0, description="How far below its baseline (its available memory right before the last engine start) a node may be when an "
                                "engine starts again. Default: 5 % of its memory, at least 2 GiB.")
    back_timeout_s: float = Field(
        60, ge=0, description="How long an engine start waits for every node's memory to come back to its baseline (a killed engine can "
                              "leave unified memory held for a while, or for good). Then a restart that kept the containers removes them "
                              "and starts again; a start that still finds memory missing is refused with the figures.")


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
