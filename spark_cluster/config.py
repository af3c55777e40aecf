"""cluster.yaml: the one file that describes a spark-cluster (its sections: spark_cluster.settings).

ClusterConfig puts the sections together, checks them against each other and answers what the
rest of the code asks of the whole (the head, each node's NCCL, the engine's key and headers, the
secrets to mask); load_config and parse_config read the file with errors that name the line.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from .errors import ConfigError
from .serving_settings import (VLLM_STEP_TIMEOUT_S, ApiSettings, ControllerSettings, GatewaySettings, HealthSettings, NotifySettings,
                               SlowSettings, WatchdogSettings)
from .settings import (
    DEFAULT_UTILIZATION_MULTI_NODE,
    DEFAULT_UTILIZATION_SINGLE_NODE,
    NAME_RE,
    SECRET_ENV_RE,
    SSH_DEFAULTS,
    SYSCTL_KEY_RE,
    UNIFIED_MEMORY_CAP,
    CacheSettings,
    ContainerSettings,
    Group,
    LinkSettings,
    GpuSettings,
    MemoryGuard,
    ModelSettings,
    NCCLSettings,
    Node,
    RaySettings,
    SSHSettings,
    Strict,
    VLLMSettings,
)

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
    nodes: list[Node] = Field(..., min_length=1, description="The boxes. Exactly one has role head (one per group).")
    groups: list[Group] = Field(default_factory=list, description=(
        "Several groups of the same model behind one gateway (e.g. four Sparks as two groups of TP=2): every node in "
        "exactly one group, each group with one head and the model's whole parallel layout. Empty: one group of all nodes."))
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
    gpu: GpuSettings = Field(default_factory=GpuSettings, description="The GPU of every node (a clock cap against heat).")
    cache: CacheSettings = Field(default_factory=CacheSettings, description="Compile and kernel caches kept on each node's disk.")
    health: HealthSettings = Field(default_factory=HealthSettings, description="Deadlines.")
    watchdog: WatchdogSettings = Field(default_factory=WatchdogSettings, description="Failover controller.")
    gateway: GatewaySettings = Field(default_factory=GatewaySettings, description="The controller's gateway: what clients use instead of vLLM's port.")
    controller: ControllerSettings = Field(default_factory=ControllerSettings, description="The controller's API, status page and metrics.")
    api: ApiSettings = Field(default_factory=ApiSettings, description="The controller API's bearer token.")
    slow: SlowSettings = Field(default_factory=SlowSettings, description="The slow-but-alive verdict of each group.")
    notify: NotifySettings = Field(default_factory=NotifySettings, description="Notifications to the operator (Apprise targets).")
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
        if self.groups:
            out += self._group_problems()
        else:
            out += _head_problems(self.nodes, ("nodes",), "")
        for attr in ("name", "host", "address"):
            seen: dict[str, str] = {}
            for i, node in enumerate(self.nodes):
                val = getattr(node, attr)
                if val in seen:
                    out.append((("nodes", i, attr), val, f"nodes {seen[val]} and {node.name} have the same {attr} {val!r}"))
                seen[val] = node.name
        tp, pp = self.tensor_parallel_size, self.vllm.pipeline_parallel_size
        for label, cfg in self.group_configs():
            if tp * pp != cfg.total_gpus:
                whose = f"group {label}'s nodes have" if self.groups else "the nodes have"
                out.append((
                    ("vllm", "tensor_parallel_size"), tp,
                    f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} = {tp * pp}, but {whose} {cfg.total_gpus} GPU(s) in all: "
                    "they must match",
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

    def _group_problems(self) -> list[tuple[tuple[Any, ...], Any, str]]:
        out: list[tuple[tuple[Any, ...], Any, str]] = []
        if self.vllm.endpoint:
            out.append((("vllm", "endpoint"), self.vllm.endpoint, "names one engine, but each group has its own: leave it out with groups"))
        known = {n.name for n in self.nodes}
        owner: dict[str, str] = {}
        names: set[str] = set()
        for gi, group in enumerate(self.groups):
            if group.name in names:
                out.append((("groups", gi, "name"), group.name, f"two groups are named {group.name!r}"))
            names.add(group.name)
            for ni, name in enumerate(group.nodes):
                if name not in known:
                    out.append((("groups", gi, "nodes", ni), name, f"no node is named {name!r} (nodes: {', '.join(sorted(known))})"))
                elif name in owner:
                    out.append((("groups", gi, "nodes", ni), name, f"{name} is in group {owner[name]} already: a node serves one group"))
                else:
                    owner[name] = group.name
            members = [n for n in self.nodes if n.name in group.nodes]
            out += _head_problems(members, ("groups", gi, "nodes"), f" of group {group.name}")
        for i, node in enumerate(self.nodes):
            if node.name not in owner:
                out.append((("nodes", i, "name"), node.name, "in no group: with groups, every node is in one"))
        return out

    def group_configs(self) -> list[tuple[str, "ClusterConfig"]]:
        """Each group as a cluster of its own, with its label: its nodes only, named <name>-<group>,
        its state in state_dir/<group>. Without groups: the cluster itself, labelled by its name."""
        if not self.groups:
            return [(self.name, self)]
        base = self.resolved_state_dir()
        return [(g.name, self.model_copy(update={
            "name": f"{self.name}-{g.name}", "groups": [], "state_dir": str(base / g.name),
            "nodes": [n for n in self.nodes if n.name in g.nodes]})) for g in self.groups]

    # ---- derived values -------------------------------------------------------------------
    def gateway_url(self) -> str:
        """Where this machine reaches the controller's gateway (clients elsewhere use the machine's address)."""
        return _local_url(self.gateway.host, self.gateway.port)

    def controller_url(self) -> str:
        """Where this machine reaches the controller's API, status page and metrics."""
        return _local_url(self.controller.host, self.controller.port)

    @property
    def head(self) -> Node:
        if len(self.groups) > 1:
            raise RuntimeError("a cluster of several groups has one head per group: ask its group_configs()")
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
        keys = flag_values(self.vllm.extra_args, "--api-key")
        return keys[0] if keys else self._head_env().get("VLLM_API_KEY") or None

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
        """The values of every secret: secret variables, the value of a secret flag (`--api-key sk-..`,
        `--hf-token=..`) in vllm.extra_args, ray.extra_args or container.extra_args, and a secret
        variable given there with `-e NAME=value`. Longest first (to mask them in anything written)."""
        names = self.secret_names()
        envs = [self.container.env] + [n.env for n in self.nodes]
        values = {str(v) for env in envs for k, v in env.items() if k in names}
        for args in (self.vllm.extra_args, self.ray.extra_args, self.container.extra_args):
            values.update(secret_arguments(args, names))
        values.update(key for _, group in self.group_configs() if (key := group.engine_api_key()))  # each group's head
        return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)

    def resolved_state_dir(self) -> Path:
        return Path(self.state_dir or f"~/.local/state/spark-cluster/{self.name}").expanduser()


def _head_problems(nodes: list[Node], where: tuple[Any, ...], of: str) -> list[tuple[tuple[Any, ...], Any, str]]:
    """Exactly one head among `nodes` (all of them, or a group's: `of` says which, `where` is its key)."""
    heads = [i for i, n in enumerate(nodes) if n.role == "head"]
    if not heads:
        return [(where, None, f"no node{of} has role head: exactly one must")]
    if len(heads) > 1:
        names = ", ".join(nodes[i].name for i in heads)
        at = ("nodes", heads[1], "role") if where == ("nodes",) else where  # the second head's line
        return [(at, "head", f"{len(heads)} nodes{of} have role head ({names}): exactly one must")]
    return []


SECRET_FLAG_RE = re.compile(r"^--?[a-z0-9-]*(key|token|secret|password|passwd|credential)s?$")
ENV_FLAGS = ("-e", "--env")
# flags whose value may be several words (vLLM's `--api-key k1 k2`: any of them is accepted)
MANY_VALUES = ("--api-key",)


def flag_name(word: str) -> str:
    """A command-line word's flag as vLLM's parser reads it: `--api_key=x` and `--API-KEY` are `--api-key`
    (vLLM's FlexibleArgumentParser turns underscores into dashes; the case is folded here so that no
    spelling of a secret escapes masking). Pure."""
    flag = word.partition("=")[0]
    return flag.lower().replace("_", "-") if flag.startswith("-") else flag


def flag_values(args: list[str], name: str) -> list[str]:
    """The values given to flag `name` in any spelling: `--name X`, `--name=X`, and for a flag of
    MANY_VALUES every word up to the next flag. Pure."""
    found = []
    for i, arg in enumerate(args):
        if not arg.startswith("-") or flag_name(arg) != name:
            continue
        if "=" in arg:
            found.append(arg.partition("=")[2])
            continue
        for value in args[i + 1:]:
            if value.startswith("-") and value != "-":
                break
            found.append(value)
            if name not in MANY_VALUES:
                break
    return found


def secret_arguments(args: list[str], names: set[str]) -> list[str]:
    """The secret values in a list of command-line words: after a secret flag (`--api-key X`,
    `--hf-token=X`), and in `-e NAME=X` / `--env NAME=X` / `--env=NAME=X` for a variable whose name is
    secret (in `names` or by its look). Pure."""
    found = []
    for i, arg in enumerate(args):
        following = args[i + 1] if i + 1 < len(args) else None
        flag, eq, value = arg.partition("=")
        if flag in ENV_FLAGS:
            name, assigned, secret = ((value if eq else following) or "").partition("=")
            if assigned and (name in names or SECRET_ENV_RE.search(name)):
                found.append(secret)
    flags = dict.fromkeys(flag_name(a) for a in args if a.startswith("-"))
    for flag in flags:
        if SECRET_FLAG_RE.match(flag):
            found += flag_values(args, flag)
    return found


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
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a cluster.yaml") from None
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
