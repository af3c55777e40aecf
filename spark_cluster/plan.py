"""The plan: everything `up` will run, as data, built from the config alone.

Pure: no network, no files besides the templates. One executor (spark_cluster.executor)
later runs it step by step; `spark-cluster plan` prints it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from . import lifecycle, timeouts
from .cache_seal import SCRIPT as CACHE_SCRIPT
from .cache_seal import Mode, script_args, script_options
from .caches import cache_mount
from .box_checks import ClockCapped
from .box_facts import clock_lock_command
from .checks import HttpAnswer, MemoryBack, ProcessRuns, RayMembers, ReadBack
from .config import ClusterConfig
from .engine_log import KV_PIN_FLAG, KvCapacity, kv_pin
from .facts import LABEL_PREFIX
from .link import LinkPick
from .masking import MASK, mask_data
from .memory_back import MEMORY_COMMAND
from .plan_checks import PreflightSteps, StepList
from .render import quote, read_template, render, render_argv
from .settings import Mount, Node
from .steps import ContainerSpec, HttpRequest, Plan, ProcessSpec, container_name, node_env

# where the vLLM process started in the Ray head container writes its PID
VLLM_PID_FILE = "/tmp/spark-cluster-vllm.pid"


def ray_state_command(cfg: ClusterConfig) -> str:
    """Ray's node table and placement groups, asked from inside the head container (facts.parse_ray_state reads it)."""
    code = "\n".join(line for line in read_template("node-scripts/ray-state.py").splitlines() if not line.startswith("#"))
    return f"docker exec {quote(container_name(cfg, 'ray-head'))} python3 -c {quote(code.strip())}"


def data_hash(data: Any) -> str:
    """A short stable hash of JSON-able data (the plan's, the engine flags' in kv.json)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _masked(env: dict[str, str], secrets: set[str], reveal: bool) -> dict[str, str]:
    if reveal:
        return dict(env)
    return {k: (MASK if k in secrets else v) for k, v in env.items()}


class _Builder(StepList):
    def __init__(self, cfg: ClusterConfig, reveal: bool, links: dict[str, LinkPick], kv_pin: Optional[int] = None) -> None:
        super().__init__(cfg)
        self.reveal = reveal
        self.links = links
        self.kv_pin = kv_pin  # bytes of KV cache every `vllm serve` gets (engine_log.kv_pin), or None
        self.secrets = cfg.secret_names()
        self.util, self.util_source = cfg.gpu_memory_utilization()

    # ---- helpers ------------------------------------------------------------------------
    def vllm_argv(self, native: Optional[dict[str, Any]]) -> list[str]:
        cfg = self.cfg
        return render_argv(
            "vllm-serve.j2",
            model=cfg.model,
            vllm=cfg.vllm,
            tp=cfg.tensor_parallel_size,
            backend="ray" if cfg.executor == "ray" else "mp",
            native=native,
            gpu_memory_utilization=self.util,
            scale_out=cfg.gateway.continue_streams and cfg.gateway.continue_chat,  # derender, for chat continuations
        ) + ([KV_PIN_FLAG, str(self.kv_pin)] if self.kv_pin else [])

    def unpinned(self, argv: list[str]) -> list[str]:
        """argv without the kept KV cache size: a kept size never recreates an engine that runs without it."""
        return argv[:-2] if self.kv_pin and argv[-2:] == [KV_PIN_FLAG, str(self.kv_pin)] else argv

    def spec(self, node: Node, component: str, entrypoint: str, command: list[str], extra_env: dict[str, str], mounts: list[Mount],
             hosts: Optional[ProcessSpec] = None) -> ContainerSpec:
        cfg, c = self.cfg, self.cfg.container
        env = _masked({**node_env(cfg, node, self.links.get(node.name)), **extra_env}, self.secrets, self.reveal)
        all_mounts = [Mount(source=cfg.model.path, target=cfg.model.in_container, read_only=True), *cache_mount(cfg)] + c.mount_list() + mounts
        body = dict(
            name=container_name(cfg, component),
            node=node.name,
            component=component,
            image=c.image,
            entrypoint=entrypoint,
            command=command,
            env=env,
            mounts=all_mounts,
            gpus=c.gpus,
            network=c.network,
            ipc=c.ipc,
            privileged=c.privileged,
            shm_size=c.shm_size,
            stop_timeout_s=c.stop_timeout_s,
            extra_args=c.extra_args,
        )
        # the spec hash covers the masked spec: identical in shown and executed plans
        # a container hosting a process (the Ray head hosting vLLM) is recreated when the process changes
        hosted = None if hosts is None else {**hosts.model_dump(), "env": _masked(hosts.env, self.secrets, False),
                                             "argv": self.unpinned(hosts.argv)}
        spec_hash = data_hash({**body, "command": self.unpinned(command), "env": _masked(body["env"], self.secrets, False),
                               "mounts": [m.model_dump() for m in all_mounts], **({"hosts": hosted} if hosted else {})})
        labels = {
            f"{LABEL_PREFIX}.cluster": cfg.name,
            f"{LABEL_PREFIX}.node": node.name,
            f"{LABEL_PREFIX}.component": component,
            f"{LABEL_PREFIX}.spec-hash": spec_hash,
        }
        return ContainerSpec(labels=labels, **body)

    def start(self, phase: str, node: Node, spec: ContainerSpec, what: str) -> None:
        self.add(
            id=f"{phase}/{node.name}/{spec.component}",
            phase=phase,
            node=node.name,
            kind="start",
            description=what,
            command=render("docker-run.j2", c=spec),
            container=spec,
            timeout_s=self.ssh_timeout(node),
        )

    # ---- phases -------------------------------------------------------------------------
    def preflight(self) -> None:
        self.checks = PreflightSteps(self.cfg, self.links, self.util, self.secrets)
        self.steps += self.checks.preflight()

    def check_vllm_flags(self) -> None:
        """After the other checks: the vLLM flags, checked in a throwaway container of the image."""
        if not self.cfg.vllm.check_flags:
            return
        api = next(s.container for s in self.steps if s.container and s.container.component in ("vllm", "ray-head"))
        last = max(i for i, s in enumerate(self.steps) if s.phase == "preflight")
        self.steps.insert(last + 1, self.checks.vllm_flags(api, self.vllm_argvs()))

    def prepare(self) -> None:
        self.prepare_sysctl()
        cap = self.cfg.gpu.max_clock_mhz
        for node in self.cfg.nodes if cap else ():
            self.add(id=f"prepare/{node.name}/gpu-clock", phase="prepare", node=node.name, kind="check",
                     description=f"cap the GPU's SM clock at {cap} MHz (gpu.max_clock_mhz; the driver's answer is read back)",
                     command=clock_lock_command(cap, self.sudo(node)), timeout_s=self.ssh_timeout(node), check=ClockCapped(max_clock_mhz=cap))

    def prepare_sysctl(self) -> None:
        cfg = self.cfg
        if not cfg.sysctl:
            return
        content = render("sysctl.conf.j2", cluster=cfg.name, sysctl=cfg.sysctl)
        expected = "\n".join(str(v) for v in cfg.sysctl.values()) + "\n" + content + "\n"
        for node in cfg.nodes:
            t = self.ssh_timeout(node)
            self.add(id=f"prepare/{node.name}/sysctl", phase="prepare", node=node.name, kind="run",
                     description=f"apply and persist sysctls ({', '.join(f'{k}={v}' for k, v in cfg.sysctl.items())})",
                     command=render("sysctl-apply.j2", sysctl=cfg.sysctl, content=content, path=cfg.sysctl_file, sudo=self.sudo(node)),
                     timeout_s=t)
            self.add(id=f"prepare/{node.name}/sysctl-verify", phase="prepare", node=node.name, kind="check",
                     description="read the sysctls back (kernel and persisted file)",
                     command=render("sysctl-verify.j2", sysctl=cfg.sysctl, path=cfg.sysctl_file),
                     timeout_s=t, check=ReadBack(stdout=expected))

    def ray_argv(self, node: Node) -> list[str]:
        cfg = self.cfg
        return render_argv(
            "ray-start.j2",
            head=node.role == "head",
            head_address=cfg.head.address,
            ray=cfg.ray,
            node=node,
            gpus_requested=bool(cfg.container.gpus),
            resources_json=json.dumps(cfg.ray.resources, sort_keys=True),
        )

    def start_ray(self) -> None:
        cfg = self.cfg
        for node in cfg.workers:
            spec = self.spec(node, "ray-worker", "ray", self.ray_argv(node), {}, [])
            self.start("start-workers", node, spec, f"Ray worker joining {cfg.head.address}:{cfg.ray.port}")
        head = cfg.head
        argv = self.vllm_argv(None)
        self.vllm = argv
        serve = ProcessSpec(
            name="vllm", node=head.name, container=container_name(cfg, "ray-head"), component="vllm",
            argv=["vllm", *argv], env=_masked({"RAY_ADDRESS": f"{head.address}:{cfg.ray.port}"}, self.secrets, self.reveal),
            pid_file=VLLM_PID_FILE, non_carry_over=self.per_node_env_names(),
        )
        spec = self.spec(head, "ray-head", "ray", self.ray_argv(head), {}, [], hosts=serve)
        self.start("start-head", head, spec, f"Ray head on port {cfg.ray.port}")
        # vLLM started again in a kept head container (its containers run as planned, vLLM does not): what the
        # earlier engine left there goes first (its EngineCore outlives a killed API server, holding its memory
        # and Ray's placement group), before memory and Ray are waited for (phase clear comes before them)
        self.add(id=f"clear/{head.name}/vllm", phase="clear", node=head.name, kind="run", clears=f"serve/{head.name}/vllm",
                 description=f"end what is left of an earlier engine in {serve.container} (when vllm starts again in it)",
                 command=lifecycle.clear_engine_command(serve.container), timeout_s=self.ssh_timeout(head) + timeouts.ENGINE_GONE_S)
        resources = {"GPU": float(cfg.total_gpus)} if cfg.container.gpus else {}
        resources.update({key: float(amount * len(cfg.nodes)) for key, amount in cfg.ray.resources.items()})
        self.add(id=f"wait-ray/{head.name}/nodes", phase="wait-ray", node=head.name, kind="wait-ray",
                 description=f"wait until Ray shows all {len(cfg.nodes)} nodes alive",
                 command=ray_state_command(cfg), timeout_s=timeouts.RAY_STATE_S, deadline_s=cfg.health.ray_join_timeout_s,
                 check=RayMembers(alive_ips=sorted(n.address for n in cfg.nodes), resources=resources))
        # vLLM joins Ray as its driver from inside the head container, as the card runs it
        self.add(id=f"serve/{head.name}/vllm", phase="serve", node=head.name, kind="exec",
                 description=f"vllm serve over the Ray executor ({cfg.parallelism}), inside {serve.container}",
                 command=render("docker-exec.j2", p=serve), process=serve, timeout_s=self.ssh_timeout(head),
                 check=ProcessRuns(name=serve.name))

    def memory_back(self) -> None:
        """Every node's memory, right before an engine starts on it (Waits.memory)."""
        cfg = self.cfg
        for node in cfg.nodes:
            self.add(id=f"memory/{node.name}", phase="memory", node=node.name, kind="check",
                     description="memory back to what the node had before the last engine start (when an engine starts)",
                     command=MEMORY_COMMAND, timeout_s=self.ssh_timeout(node), deadline_s=cfg.memory.back_timeout_s,
                     check=MemoryBack(slack_gib=cfg.memory.back_slack_gib))

    def caches(self, mode: Mode, phase: str, timeout_s: float, description: str) -> None:
        """Each node's cache folder (cache_seal): checked before an engine starts, sealed once it is ready."""
        if not self.cfg.cache.enabled:
            return
        for node in self.cfg.nodes:
            name = container_name(self.cfg, f"cache-{mode}")
            self.add(id=f"{phase}/{node.name}", phase=phase, node=node.name, kind="run", description=description,
                     command=self.python_in_image(name, script_options(self.cfg), {}, script_args(self.cfg, mode)),
                     stdin=CACHE_SCRIPT, timeout_s=self.ssh_timeout(node) + timeout_s)

    def per_node_env_names(self) -> list[str]:
        """Variables whose values differ between nodes. vLLM's Ray executor copies VLLM_*, NCCL_* and
        other variables from its driver (the head) to every Ray worker, which would overwrite a
        worker's own NCCL interface or CPU binding with the head's."""
        envs = [node_env(self.cfg, n, self.links.get(n.name)) for n in self.cfg.nodes]
        keys = set().union(*envs) - {"VLLM_HOST_IP"}  # vLLM never copies this one
        return sorted(k for k in keys if len({e.get(k) for e in envs}) > 1)

    def start_native(self) -> None:
        cfg = self.cfg
        ranks = {cfg.head.name: 0}
        for i, node in enumerate(cfg.workers, start=1):
            ranks[node.name] = i

        def native(node: Node) -> dict[str, Any]:
            return {"nnodes": len(cfg.nodes), "rank": ranks[node.name], "master_addr": cfg.head.address,
                    "master_port": cfg.vllm.master_port}

        for node in cfg.workers:
            spec = self.spec(node, "vllm-worker", "vllm", self.vllm_argv(native(node)), {}, [])
            self.start("start-workers", node, spec, f"vLLM headless rank {ranks[node.name]} (native multi-node)")
        argv = self.vllm_argv(native(cfg.head))
        self.vllm = argv
        spec = self.spec(cfg.head, "vllm", "vllm", argv, {}, [])
        self.start("serve", cfg.head, spec, f"vllm serve rank 0 with the API (native multi-node, {cfg.parallelism})")

    def vllm_argvs(self) -> list[list[str]]:
        out: list[list[str]] = [self.vllm]
        for spec in (s.container for s in self.steps if s.container and s.container.entrypoint == "vllm"):
            if spec.command not in out:
                out.append(spec.command)
        return out

    def ready(self) -> None:
        cfg, h = self.cfg, self.cfg.health
        base = cfg.endpoint()
        name = cfg.model.name
        self.add(id="ready/health", phase="ready", node=None, kind="http", description="/health answers 200",
                 request=HttpRequest(method="GET", url=f"{base}/health"), command=f"GET {base}/health",
                 timeout_s=h.probe_timeout_s, deadline_s=h.ready_timeout_s, check=HttpAnswer())
        self.add(id="ready/models", phase="ready", node=None, kind="http", description=f"/v1/models lists {name}",
                 request=HttpRequest(method="GET", url=f"{base}/v1/models"), command=f"GET {base}/v1/models",
                 timeout_s=h.probe_timeout_s, deadline_s=h.ready_timeout_s, check=HttpAnswer(model=name))
        body = {"model": name, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        self.add(id="ready/completion", phase="ready", node=None, kind="http",
                 description="one real completion succeeds",
                 request=HttpRequest(method="POST", url=f"{base}/v1/completions", json_body=body),
                 command=f"POST {base}/v1/completions {json.dumps(body)}",
                 timeout_s=h.completion_timeout_s, deadline_s=h.ready_timeout_s, check=HttpAnswer(choices=True))

    def build(self) -> Plan:
        self.preflight()
        self.prepare()
        self.memory_back()
        self.caches("check", "cache", timeouts.CACHE_CHECK_S, "cache files changed or added since the last seal moved aside, "
                    "never deleted (when an engine starts)")
        if self.cfg.executor == "ray":
            self.start_ray()
        else:
            self.start_native()
        self.check_vllm_flags()
        self.ready()
        self.caches("seal", "seal", timeouts.CACHE_SEAL_S, "seal the cache folder (each file's size, time and SHA-256) "
                    "once an engine that used it is ready")
        cfg = self.cfg
        # containers count by their (masked) spec hash, other steps by their command: secrets never
        # enter the hash, so the shown and the executed plan have the same one (the lock and the
        # removals around the group's steps do not count)
        fingerprint = [(s.id, s.container.labels[f"{LABEL_PREFIX}.spec-hash"] if s.container else s.command) for s in self.steps]
        return lifecycle.with_lifecycle(cfg, Plan(
            cluster=cfg.name,
            executor=cfg.executor,
            endpoint=cfg.endpoint(),
            served_model=cfg.model.name,
            gpu_memory_utilization=self.util,
            gpu_memory_utilization_source=self.util_source,
            vllm_argv=self.vllm,
            vllm_argvs=self.vllm_argvs(),
            flags_hash=data_hash(mask_data([self.unpinned(a) for a in self.vllm_argvs()], cfg.secret_values())),
            kv_pin_bytes=self.kv_pin,
            plan_hash=data_hash(fingerprint),
            steps=self.steps,
        ))


def build_plan(cfg: ClusterConfig, *, reveal_secrets: bool = False, links: Optional[dict[str, LinkPick]] = None,
               kv: Optional[KvCapacity] = None) -> Plan:
    """The plan of `up`. Secrets are masked unless reveal_secrets (only the executor asks for that):
    secret variables show MASK, and so does any secret value anywhere else (a secret flag's value in
    extra_args); the plan's hashes are those of the executed plan. links: what `nccl: auto` detected
    per node (kept.links); without it those variables show NOT_DETECTED. kv: the KV cache an engine
    of these flags got (kept.kv_capacity): passed to every `vllm serve` (vllm.keep_kv_cache)."""
    plan = _Builder(cfg, reveal_secrets, links or {}).build()
    pin = kv_pin(kv, plan.flags_hash, cfg.vllm.extra_args) if cfg.vllm.keep_kv_cache else None
    if pin:
        plan = _Builder(cfg, reveal_secrets, links or {}, kv_pin=pin).build()
    values = cfg.secret_values()
    if reveal_secrets or not values:
        return plan
    return Plan.model_validate(mask_data(plan.model_dump(), values))
