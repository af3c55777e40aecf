"""The preflight's steps: what `up` checks on every node before it changes anything (the clock,
Docker, the image, the model, the GPU in a container, the link and its bandwidth, ports, memory,
the vLLM flags), each with its typed check (spark_cluster.checks). Pure, as the rest of the plan.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from . import timeouts
from .box_checks import CmaSane, DriverSame, GdrCapable, GpuHeatOk, KernelKnown, MemoryCeiling
from .box_facts import CEILING_SCRIPT, CMA_COMMAND, DRIVER_COMMAND, GDR_SCRIPT, HEAT_COMMAND, KERNEL_COMMAND, PEERMEM_COMMAND
from .checks import (
    ClockInSync,
    ClusterLink,
    DiskFree,
    DockerAnswers,
    GpuWorks,
    ImagePlatform,
    ImagePresent,
    LinkBandwidth,
    MemoryAvailable,
    ModelFiles,
    PeerReachable,
    PerftestPresent,
    PortsFree,
    RdmaBandwidth,
    SudoWorks,
    VllmFlags,
)
from .config import ClusterConfig
from .facts import (
    CLOCK_COMMAND,
    DOCKER_DISK_COMMAND,
    LABEL_PREFIX,
    MEMINFO_COMMAND,
    gpu_smoke_command,
    model_files_command,
    platforms_command,
)
from .link import LinkPick
from .link_facts import LINK_COMMAND, PERFTEST_COMMAND, ib_write_bw_client_command, ib_write_bw_server_command, reach_command
from .render import quote
from .settings import Node
from .steps import ContainerSpec, Step, container_name, node_env

CLOCK_MAX_SKEW_S = 5.0  # clocks further apart make logs, events and metrics of the nodes disagree
BANDWIDTH_PORT = 29517  # the all-reduce's rendezvous on the head (link.check bandwidth)
BANDWIDTH_MB = {"nccl": 256, "gloo": 64}  # per all-reduce: long enough to fill a 200 Gb/s link, short on CPU
BANDWIDTH_ITERS = 10
DISK_MIN_GIB = 10.0  # where Docker keeps images and container logs (a model load logs little; an image pull needs more)
# a model above this many GB, memory-mapped on unified memory, gets a warning from `doctor` (issue #37: ~30 GB)
MAPPED_WARN_GB = 30.0
NAME_FREED_S = 10  # how long a throwaway check waits for its name to be free (a previous run's removal)


def python_in_image(cfg: ClusterConfig, name: str, options: list[str], env: dict[str, str], args: list[str],
                    code: Optional[str] = None) -> str:
    """A throwaway container of the cluster's image running python3 on its standard input (`-`, then
    args), or on code (`-c`); a leftover of the same name removed first, labelled as the cluster's check.
    The daemon removes a `--rm` container after its client has returned: the name can still be held
    when the next check starts ("Conflict. The container name ... is already in use", moby/moby#37698),
    so the command waits (up to NAME_FREED_S) for docker to no longer know it."""
    words = ["docker", "run", "--rm", "-i", "--name", name, *options, "--label", f"{LABEL_PREFIX}.check={cfg.name}"]
    words += [w for k, v in env.items() for w in ("-e", f"{k}={v}")]
    words += ["--entrypoint", "python3", cfg.container.image, *(["-c", code] if code is not None else ["-"]), *args]
    tries = round(NAME_FREED_S / 0.2)
    freed = (f"docker rm -f {quote(name)} >/dev/null 2>&1; "
             f"for _ in $(seq {tries}); do docker container inspect {quote(name)} >/dev/null 2>&1 || break; sleep 0.2; done; ")
    return freed + " ".join(quote(w) for w in words)


class StepList:
    """Steps being written for a cluster (the plan's builder and the preflight's), with what every
    node's commands need."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.steps: list[Step] = []

    def add(self, **kw: Any) -> None:
        self.steps.append(Step(**kw))

    def sudo(self, node: Node) -> str:
        """The prefix of privileged commands on this node (its own ssh.sudo, else the cluster's)."""
        return "sudo -n " if self.cfg.node_ssh(node).sudo else ""

    def ssh_timeout(self, node: Node) -> float:
        return float(self.cfg.node_ssh(node).command_timeout_s or 120)

    def python_in_image(self, name: str, options: list[str], env: dict[str, str], args: list[str], code: Optional[str] = None) -> str:
        return python_in_image(self.cfg, name, options, env, args, code)


class PreflightSteps(StepList):
    def __init__(self, cfg: ClusterConfig, links: dict[str, LinkPick], util: float, secrets: set[str]) -> None:
        """links: what `nccl: auto` detected; util: the guarded gpu_memory_utilization; secrets: the
        variables a check's container never gets."""
        super().__init__(cfg)
        self.links = links
        self.util = util
        self.secrets = secrets

    def preflight(self) -> list[Step]:
        """Every node's checks (clock first: the nodes run theirs in parallel), then the bandwidth test's."""
        for node in self.cfg.nodes:
            self.node_checks(node)
            self.link_checks(node)
            self.memory_checks(node)
            self.box_checks(node)
        self.link_bandwidth()
        return self.steps

    def node_checks(self, node: Node) -> None:
        """Docker, the image, the model, the GPU in a container."""
        cfg = self.cfg
        model = cfg.model.path
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
                 timeout_s=t, check=ModelFiles(path=model, mapped_warn_gb=MAPPED_WARN_GB if self.maps_on_unified() else None))
        self.add(id=f"preflight/{node.name}/platform", phase="preflight", node=node.name, kind="check",
                 description="the image is built for the node's CPU architecture",
                 command=platforms_command(cfg.container.image), timeout_s=t, check=ImagePlatform(image=cfg.container.image))
        if cfg.container.gpus:
            self.add(id=f"preflight/{node.name}/gpu", phase="preflight", node=node.name, kind="check",
                     description="a container of the image sees the GPU (`--gpus all`, throwaway)",
                     command=gpu_smoke_command(cfg.container.image), timeout_s=t,
                     check=GpuWorks(image=cfg.container.image, unified=cfg.memory.unified))

    def link_checks(self, node: Node) -> None:
        """The cluster link as `nccl: auto` detects it, and the peers reachable over it (link.check reach)."""
        cfg = self.cfg
        t = self.ssh_timeout(node)
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

    def memory_checks(self, node: Node) -> None:
        """The ports the head listens on, and the memory the guarded utilization needs."""
        cfg = self.cfg
        t = self.ssh_timeout(node)
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

    def box_checks(self, node: Node) -> None:
        """What Spark owners learned the hard way (spark_cluster.box_checks): the kernel and its CMA, the
        driver (the same on every node), the GPU's heat, GPUDirect RDMA from the image, and the memory
        CUDA really hands out (the last two in throwaway containers of the image)."""
        cfg, t = self.cfg, self.ssh_timeout(node)
        probe = ["--pull", "never", *(["--gpus", cfg.container.gpus] if cfg.container.gpus else []), "--network", "none"]
        for what, description, command, check in (
            ("kernel", "the kernel is not one known to break RDMA or wedge the host (or has its fix)", KERNEL_COMMAND, KernelKnown()),
            ("cma", "CmaFree is not above CmaTotal in /proc/meminfo (KHO's scratch area)", CMA_COMMAND, CmaSane()),
            ("driver", "the NVIDIA driver, the same version on every node", DRIVER_COMMAND, DriverSame()),
            ("heat", "the GPU is not held back by heat or power", HEAT_COMMAND, GpuHeatOk()),
            ("gdr", "NCCL in the image can use GPUDirect RDMA (throwaway container)",
             self.python_in_image(container_name(cfg, "check-gdr"), probe, {}, [], GDR_SCRIPT) + "; " + PEERMEM_COMMAND,
             GdrCapable(rdma=bool(self.hcas(node)))),
            ("memory-ceiling", f"gpu_memory_utilization {self.util:g} is within what CUDA can allocate (throwaway container)",
             self.python_in_image(container_name(cfg, "check-memory"), probe, {}, [], CEILING_SCRIPT),
             MemoryCeiling(gpu_memory_utilization=self.util)),
        ):
            self.add(id=f"preflight/{node.name}/{what}", phase="preflight", node=node.name, kind="check", description=description,
                     command=command, timeout_s=t, check=check)

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

    def maps_on_unified(self) -> bool:
        return self.cfg.memory.unified and self.cfg.model.maps_weights()

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

    def vllm_flags(self, api: ContainerSpec, argvs: list[list[str]]) -> Step:
        """Preflight on the head: the image's own vLLM parses every rendered `vllm serve` argv (argvs).
        Runs in a throwaway container: no GPU, no network, the mounts of the container vLLM runs in
        (api: its own, or the Ray head's) read-only."""
        cfg = self.cfg
        head = cfg.head
        name = container_name(cfg, "check-vllm-flags")
        mounts = [w for m in api.mounts for w in ("-v", f"{m.source}:{m.target}:ro")]
        env = {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        step = Step(id=f"preflight/{head.name}/vllm-flags", phase="preflight", node=head.name, kind="check",
                    description="the image's vLLM accepts every `vllm serve` flag (its parser and validate(), "
                    "tool/reasoning parser and executor names; throwaway container, no GPU)",
                    command=self.python_in_image(name, ["--network", "none", *mounts], env, [json.dumps(argvs, separators=(",", ":"))]),
                    stdin="node-scripts/vllm-check.py",
                    timeout_s=cfg.vllm.check_timeout_s, check=VllmFlags(container=name))
        return step
