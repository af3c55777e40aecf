"""The plan: everything `up` will run, as data, built from the config alone.

Pure: no network, no files besides the templates. One executor (spark_cluster.executor)
later runs it step by step; `spark-cluster plan` prints it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from . import lifecycle, timeouts
from .checks import (ClockInSync, ClusterLink, DiskFree, DockerAnswers, GpuWorks, LinkBandwidth, PerftestPresent, RdmaBandwidth, SudoWorks, HttpAnswer, ImagePlatform, ImagePresent, MemoryAvailable, ModelFiles,
                     PeerReachable, PortsFree, ProcessRuns, RayMembers, ReadBack, VllmFlags)
from .config import ClusterConfig
from .settings import Mount, Node
from .facts import CLOCK_COMMAND, DOCKER_DISK_COMMAND, LABEL_PREFIX, MEMINFO_COMMAND, gpu_smoke_command, model_files_command, platforms_command
from .link_facts import LINK_COMMAND, PERFTEST_COMMAND, ib_write_bw_client_command, ib_write_bw_server_command, reach_command
from .link import LinkPick
from .render import MASK, quote, read_template, render, render_argv
from .steps import PHASES, ContainerSpec, DownPlan, HttpRequest, Phase, Plan, ProcessSpec, Step  # noqa: F401 - re-exported

__all__ = ["LABEL_PREFIX", "Plan", "DownPlan", "Step", "ProcessSpec", "ContainerSpec", "build_plan"]
# where the vLLM process started in the Ray head container writes its PID
VLLM_PID_FILE = "/tmp/spark-cluster-vllm.pid"
CLOCK_MAX_SKEW_S = 5.0  # clocks further apart make logs, events and metrics of the nodes disagree
BANDWIDTH_PORT = 29517  # the all-reduce's rendezvous on the head (link.check bandwidth)
BANDWIDTH_MB = {"nccl": 256, "gloo": 64}  # per all-reduce: long enough to fill a 200 Gb/s link, short on CPU
BANDWIDTH_ITERS = 10
DISK_MIN_GIB = 10.0  # where Docker keeps images and container logs (a model load logs little; an image pull needs more)
def container_name(cfg: ClusterConfig, component: str) -> str:
    return f"{cfg.name}-{component}"


def ray_state_command(cfg: ClusterConfig) -> str:
    """Ray's node table and placement groups, asked from inside the head container (facts.parse_ray_state reads it)."""
    code = "\n".join(line for line in read_template("node-scripts/ray-state.py").splitlines() if not line.startswith("#"))
    return f"docker exec {quote(container_name(cfg, 'ray-head'))} python3 -c {quote(code.strip())}"


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# the value of a variable `nccl: auto` has not detected yet (shown by `plan`; `up` detects before it starts anything)
NOT_DETECTED = "<auto: detected by preflight>"


def node_env(cfg: ClusterConfig, node: Node, link: Optional[LinkPick] = None) -> dict[str, str]:
    """Environment of a node's containers: NCCL (per node; with `nccl: auto` what was detected for
    the variables not given), vLLM's host IP, then user env."""
    nccl = cfg.node_nccl(node)
    env: dict[str, str] = {}
    if nccl.auto:
        detected = link.env() if link is not None else {"NCCL_SOCKET_IFNAME": NOT_DETECTED, "GLOO_SOCKET_IFNAME": NOT_DETECTED,
                                                        "NCCL_IB_HCA": NOT_DETECTED}
        env.update(detected)
    env.update(nccl.env())
    env["VLLM_HOST_IP"] = node.address
    env.update(cfg.container.env)
    env.update(node.env)
    return env


def _masked(env: dict[str, str], secrets: set[str], reveal: bool) -> dict[str, str]:
    if reveal:
        return dict(env)
    return {k: (MASK if k in secrets else v) for k, v in env.items()}


class _Builder:
    def __init__(self, cfg: ClusterConfig, reveal: bool, links: dict[str, LinkPick]) -> None:
        self.cfg = cfg
        self.reveal = reveal
        self.links = links
        self.secrets = cfg.secret_names()
        self.util, self.util_source = cfg.gpu_memory_utilization()
        self.steps: list[Step] = []

    # ---- helpers ------------------------------------------------------------------------
    def add(self, **kw: Any) -> None:
        self.steps.append(Step(**kw))

    def sudo(self, node: Node) -> str:
        """The prefix of privileged commands on this node (its own ssh.sudo, else the cluster's)."""
        return "sudo -n " if self.cfg.node_ssh(node).sudo else ""

    def ssh_timeout(self, node: Node) -> float:
        return float(self.cfg.node_ssh(node).command_timeout_s or 120)

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
        )

    def spec(self, node: Node, component: str, entrypoint: str, command: list[str], extra_env: dict[str, str], mounts: list[Mount],
             hosts: Optional[ProcessSpec] = None) -> ContainerSpec:
        cfg, c = self.cfg, self.cfg.container
        env = _masked({**node_env(cfg, node, self.links.get(node.name)), **extra_env}, self.secrets, self.reveal)
        all_mounts = [Mount(source=cfg.model.path, target=cfg.model.in_container, read_only=True)] + c.mount_list() + mounts
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
        hosted = None if hosts is None else {**hosts.model_dump(), "env": _masked(hosts.env, self.secrets, False)}
        spec_hash = _hash({**body, "env": _masked(body["env"], self.secrets, False), "mounts": [m.model_dump() for m in all_mounts],
                           **({"hosts": hosted} if hosted else {})})
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
        cfg = self.cfg
        model = cfg.model.path
        for node in cfg.nodes:
            t = self.ssh_timeout(node)
            # first on every node (the nodes run their checks in parallel): the clocks are read at about the same moment
            self.add(id=f"preflight/{node.name}/clock", phase="preflight", node=node.name, kind="check",
                     description=f"the clock agrees with the other nodes' within {CLOCK_MAX_SKEW_S:g}s", command=CLOCK_COMMAND,
                     timeout_s=t, check=ClockInSync(max_skew_s=CLOCK_MAX_SKEW_S))
            self.add(id=f"preflight/{node.name}/docker", phase="preflight", node=node.name, kind="check",
                     description="docker answers", command="docker version --format '{{.Server.Version}}'",
                     timeout_s=t, check=DockerAnswers())
            if cfg.node_ssh(node).sudo:
                self.add(id=f"preflight/{node.name}/sudo", phase="preflight", node=node.name, kind="check",
                         description="sudo -n works (ssh.sudo)", command="sudo -n true", timeout_s=t, check=SudoWorks())
            self.add(id=f"preflight/{node.name}/disk", phase="preflight", node=node.name, kind="check",
                     description=f"at least {DISK_MIN_GIB:g} GiB free where Docker keeps images and container logs",
                     command=DOCKER_DISK_COMMAND, timeout_s=t, check=DiskFree(min_gib=DISK_MIN_GIB))
            self.add(id=f"preflight/{node.name}/image", phase="preflight", node=node.name, kind="check",
                     description="image present, same ID on every node",
                     command=f"docker image inspect --format '{{{{.Id}}}}' {quote(cfg.container.image)}",
                     timeout_s=t, check=ImagePresent(image=cfg.container.image))
            self.add(id=f"preflight/{node.name}/model", phase="preflight", node=node.name, kind="check",
                     description="model folder present, same files and sizes on every node",
                     command=model_files_command(model),
                     timeout_s=t, check=ModelFiles(path=model))
            self.add(id=f"preflight/{node.name}/platform", phase="preflight", node=node.name, kind="check",
                     description="the image is built for the node's CPU architecture",
                     command=platforms_command(cfg.container.image), timeout_s=t, check=ImagePlatform(image=cfg.container.image))
            if cfg.container.gpus:
                self.add(id=f"preflight/{node.name}/gpu", phase="preflight", node=node.name, kind="check",
                         description="a container of the image sees the GPU (`--gpus all`, throwaway)",
                         command=gpu_smoke_command(cfg.container.image), timeout_s=t,
                         check=GpuWorks(image=cfg.container.image, unified=cfg.memory.unified))
            if cfg.node_nccl(node).auto:
                self.add(id=f"preflight/{node.name}/link", phase="preflight", node=node.name, kind="check",
                         description=f"the cluster link: the interface holding {node.address} and its RDMA devices (nccl: auto)",
                         command=LINK_COMMAND, timeout_s=t, check=ClusterLink(address=node.address))
            if cfg.link.check == "reach":
                via = cfg.node_nccl(node).socket_ifname or (self.links[node.name].netdev if node.name in self.links else None)
                for peer in cfg.nodes:
                    if peer.name == node.name:
                        continue
                    self.add(id=f"preflight/{node.name}/reach-{peer.name}", phase="preflight", node=node.name, kind="check",
                             description=f"reaches {peer.name} at {peer.address} with unfragmented packets of "
                                         + (f"MTU {cfg.link.mtu}" if cfg.link.mtu else "the link's MTU"),
                             command=reach_command(peer.address, cfg.link.mtu), timeout_s=t,
                             check=PeerReachable(node=node.name, peer=peer.name, address=peer.address, mtu=cfg.link.mtu, via=via))
            ports = self.node_ports(node)
            if ports:
                filt = " or ".join(f"sport = :{p}" for p in ports)
                self.add(id=f"preflight/{node.name}/ports", phase="preflight", node=node.name, kind="check",
                         description=f"ports {', '.join(map(str, ports))} free",
                         command=f"ss -Htln {quote('( ' + filt + ' )')}",
                         timeout_s=t, check=PortsFree(ports=ports))
            self.add(id=f"preflight/{node.name}/memory", phase="preflight", node=node.name, kind="check",
                     description="enough available memory for the guarded utilization"
                     + (" (page cache dropped first)" if cfg.memory.drop_page_cache else ""),
                     command=self.memory_command(node),
                     timeout_s=t, check=MemoryAvailable(min_available_fraction=self.min_free_fraction(),
                                                        min_available_gib=float(cfg.memory.min_free_gib or 0),
                                                        gpu_memory_utilization=self.util, drop_page_cache=cfg.memory.drop_page_cache))

    def link_bandwidth(self) -> None:
        """link.check bandwidth: a short all-reduce across every node at once, in the cluster's image with
        each node's own container environment (NCCL on GPUs; Gloo on CPU where no GPU is requested).
        The executor runs these steps together, after the other checks (and `nccl: auto`) passed."""
        cfg, c = self.cfg, self.cfg.container
        if cfg.link.check != "bandwidth" or len(cfg.nodes) < 2:
            return
        for node in cfg.nodes:
            self.add(id=f"preflight/{node.name}/perftest", phase="preflight", node=node.name, kind="check",
                     description="ib_write_bw (perftest) installed? (else the bandwidth test is an all-reduce)",
                     command=PERFTEST_COMMAND, timeout_s=self.ssh_timeout(node), check=PerftestPresent())
        self.rdma_bandwidth()
        backend = "nccl" if c.gpus else "gloo"
        ranks = [cfg.head, *cfg.workers]
        options = ["--network", "host", "--ipc", "host", "--shm-size", c.shm_size] + (["--gpus", c.gpus] if c.gpus else []) \
            + (["--privileged"] if c.privileged else []) + list(c.extra_args)
        for rank, node in enumerate(ranks):
            # the node's containers' environment (its NCCL/Gloo variables and tuning), its secrets left out: a collective needs none
            env = {k: v for k, v in node_env(cfg, node, self.links.get(node.name)).items() if k not in self.secrets}
            args = [str(rank), str(len(ranks)), cfg.head.address, str(BANDWIDTH_PORT), backend, str(BANDWIDTH_MB[backend]), str(BANDWIDTH_ITERS)]
            self.add(id=f"preflight/{node.name}/bandwidth", phase="preflight", node=node.name, kind="check",
                     description=f"all-reduce across the {len(ranks)} nodes ({backend}, rank {rank}): bus bandwidth at least "
                                 f"{cfg.link.min_gbits:g} Gb/s",
                     command=self.python_in_image(container_name(cfg, "check-bandwidth"), options, env, args),
                     stdin="node-scripts/allreduce.py", timeout_s=timeouts.BANDWIDTH_S,
                     check=LinkBandwidth(rank=rank, backend=backend, min_gbits=cfg.link.min_gbits))

    def python_in_image(self, name: str, options: list[str], env: dict[str, str], args: list[str]) -> str:
        """A throwaway container of the cluster's image running python3 on the step's standard input
        (a leftover of the same name removed first), labelled as the cluster's check."""
        words = ["docker", "run", "--rm", "-i", "--name", name, *options, "--label", f"{LABEL_PREFIX}.check={self.cfg.name}"]
        words += [w for k, v in env.items() for w in ("-e", f"{k}={v}")]
        words += ["--entrypoint", "python3", self.cfg.container.image, "-", *args]
        return f"docker rm -f {quote(name)} >/dev/null 2>&1; " + " ".join(quote(w) for w in words)

    def hcas(self, node: Node) -> list[str]:
        """The node's RDMA devices on the cluster link: nccl.ib_hca as given, else as `nccl: auto` detected."""
        given = self.cfg.node_nccl(node).ib_hca
        if given:
            return [h.strip() for h in given.split(",") if h.strip()]
        link = self.links.get(node.name)
        return list(link.hcas) if link is not None else []

    def rdma_bandwidth(self) -> None:
        """ib_write_bw per rail, head to each worker, when every node's RDMA devices are known: the
        executor runs these instead of the all-reduce when every node has ib_write_bw installed."""
        cfg = self.cfg
        rails = {n.name: self.hcas(n) for n in cfg.nodes}
        if not all(rails.values()):
            return
        for node in cfg.workers:
            self.add(id=f"preflight/{node.name}/bandwidth-rdma", phase="preflight", node=node.name, kind="check",
                     description=f"ib_write_bw servers, one per rail ({', '.join(rails[node.name])})",
                     command=ib_write_bw_server_command(rails[node.name]), timeout_s=timeouts.BANDWIDTH_S,
                     check=RdmaBandwidth(serves=True, min_gbits=cfg.link.min_gbits))
        head = cfg.head
        peers = [(n.name, n.address, len(rails[n.name])) for n in cfg.workers]
        self.add(id=f"preflight/{head.name}/bandwidth-rdma", phase="preflight", node=head.name, kind="check",
                 description=f"ib_write_bw to every worker, per rail: at least {cfg.link.min_gbits:g} Gb/s each (if perftest is everywhere)",
                 command=ib_write_bw_client_command(rails[head.name], peers), timeout_s=timeouts.BANDWIDTH_S,
                 check=RdmaBandwidth(serves=False, min_gbits=cfg.link.min_gbits))

    def memory_command(self, node: Node) -> str:
        if not self.cfg.memory.drop_page_cache:
            return MEMINFO_COMMAND
        # the page cache holds unified memory the model load needs (field notes, "What breaks" 2)
        return f"sync && echo 3 | {self.sudo(node)}tee /proc/sys/vm/drop_caches >/dev/null && {MEMINFO_COMMAND}"

    def min_free_fraction(self) -> float:
        # vLLM takes `util` of total memory on unified boxes; it must be available before start.
        return round(self.util, 3) if self.cfg.memory.unified else 0.0

    def node_ports(self, node: Node) -> list[int]:
        cfg = self.cfg
        ports: list[int] = []
        if node.role == "head":
            ports.append(cfg.vllm.port)
            ports.append(cfg.ray.port if cfg.executor == "ray" else cfg.vllm.master_port)
        return ports

    def prepare(self) -> None:
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

    def check_vllm_flags(self) -> None:
        """Preflight on the head: the image's own vLLM parses every rendered `vllm serve` argv.
        Runs in a throwaway container: no GPU, no network, the vLLM container's mounts read-only."""
        cfg = self.cfg
        if not cfg.vllm.check_flags:
            return
        head = cfg.head
        # the mounts of the container vLLM runs in (its own, or the Ray head's)
        api = next(s.container for s in self.steps if s.container and s.container.component in ("vllm", "ray-head"))
        name = container_name(cfg, "check-vllm-flags")
        mounts = [w for m in api.mounts for w in ("-v", f"{m.source}:{m.target}:ro")]
        env = {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        step = Step(id=f"preflight/{head.name}/vllm-flags", phase="preflight", node=head.name, kind="check",
                    description="the image's vLLM accepts every `vllm serve` flag (its parser and validate(), "
                    "tool/reasoning parser and executor names; throwaway container, no GPU)",
                    command=self.python_in_image(name, ["--network", "none", *mounts], env, [json.dumps(self.vllm_argvs(), separators=(",", ":"))]),
                    stdin="node-scripts/vllm-check.py",
                    timeout_s=cfg.vllm.check_timeout_s, check=VllmFlags(container=name))
        last = max(i for i, s in enumerate(self.steps) if s.phase == "preflight")
        self.steps.insert(last + 1, step)

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
        self.link_bandwidth()
        self.prepare()
        if self.cfg.executor == "ray":
            self.start_ray()
        else:
            self.start_native()
        self.check_vllm_flags()
        self.ready()
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
            plan_hash=_hash(fingerprint),
            steps=self.steps,
        ))


def build_plan(cfg: ClusterConfig, *, reveal_secrets: bool = False, links: Optional[dict[str, LinkPick]] = None) -> Plan:
    """The plan of `up`. Secrets are masked unless reveal_secrets (only the executor asks for that).
    links: what `nccl: auto` detected per node (kept.links); without it those variables show
    NOT_DETECTED."""
    return _Builder(cfg, reveal_secrets, links or {}).build()
