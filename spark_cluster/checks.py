"""Typed checks: what a step's result must show, as data in the plan, evaluated here in one place.

Each check is one variant of a discriminated union (its `kind`), carrying everything its message
needs, so evaluating is a pure function of the check and the command's result (table-tested
without nodes). Nothing dispatches on step ids: renaming a step cannot turn a check into "exit
code 0", and a check step without a check is refused when the plan is built.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .facts import parse_clock, parse_df_free_gib, parse_file_listing, parse_gpu_smoke, parse_meminfo, parse_platforms, same_platform

from . import box_checks
from .box_checks import BOX_CHECKS, ClockCapped, CmaSane, DriverSame, GdrCapable, GpuHeatOk, KernelKnown, MemoryCeiling
from .memory_back import parse_memory
from .link_facts import parse_nccl_tests, parse_rdma_bandwidth, parse_link, parse_reach
from .link import LinkPick, pick_link, reach_problem


class _Check(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    same_on_all_nodes: bool = Field(False, description="The output must be the same on every node (compared after each passed).")


class DockerAnswers(_Check):
    kind: Literal["docker-answers"] = "docker-answers"


class ImagePresent(_Check):
    """The image is on the node (its ID printed); a node without it gets it pulled or streamed first."""

    kind: Literal["image-present"] = "image-present"
    image: str
    same_on_all_nodes: bool = True


class ModelFiles(_Check):
    """The model folder lists its files with sizes: present, not empty, the same everywhere. mapped_warn_gb:
    the weights are memory-mapped on unified memory; a model larger than this is said to load slowly (`doctor`)."""

    kind: Literal["model-files"] = "model-files"
    path: str
    same_on_all_nodes: bool = True
    mapped_warn_gb: Optional[float] = None


class ImagePlatform(_Check):
    """The image is built for the node's platform (an amd64 image on an arm64 Spark fails with `exec format error`)."""

    kind: Literal["image-platform"] = "image-platform"
    image: str


class GpuWorks(_Check):
    """A throwaway container of the image asking for every GPU lists them (`--gpus all` for real:
    `docker info` naming an nvidia runtime proves less, and a Spark using CDI names none)."""

    kind: Literal["gpu-works"] = "gpu-works"
    image: str
    unified: bool = Field(True, description="memory.unified: a GB10 seen with it off is refused (its memory guard and 0.85 cap would be off).")


class SudoWorks(_Check):
    """`sudo -n` works (ssh.sudo: the sysctls and the page cache need root)."""

    kind: Literal["sudo-works"] = "sudo-works"


class DiskFree(_Check):
    """Free space where Docker keeps images and container logs."""

    kind: Literal["disk-free"] = "disk-free"
    min_gib: float


class ClockInSync(_Check):
    """The nodes' clocks agree within max_skew_s (read at once on every node; compared across nodes)."""

    kind: Literal["clock"] = "clock"
    max_skew_s: float
    same_on_all_nodes: bool = True


class ClusterLink(_Check):
    """`nccl: auto`: the interface holding the node's cluster address, and its RDMA devices (link.pick_link)."""

    kind: Literal["cluster-link"] = "cluster-link"
    address: str


class PeerReachable(_Check):
    """The node reaches a peer's cluster address, with packets of the link's MTU that may not be
    fragmented, leaving by the cluster link's interface when that is known (link.reach_problem)."""

    kind: Literal["peer-reachable"] = "peer-reachable"
    node: str
    peer: str
    address: str
    mtu: Optional[int] = Field(None, description="link.mtu; None: the node's own MTU on the route's interface")
    via: Optional[str] = Field(None, description="The cluster link's interface on this node (nccl.socket_ifname or detected), when known.")


class LinkBandwidth(_Check):
    """A short all-reduce across every node (rank 0 reports the bus bandwidth) meets link.min_gbits."""

    kind: Literal["link-bandwidth"] = "link-bandwidth"
    rank: int
    backend: Literal["nccl", "gloo"]
    min_gbits: float


class RdmaBandwidth(_Check):
    """ib_write_bw per rail between the head (client) and each worker (server): every rail meets link.min_gbits."""

    kind: Literal["rdma-bandwidth"] = "rdma-bandwidth"
    serves: bool = Field(description="This node runs the servers (a worker); the head runs the clients and judges.")
    min_gbits: float


class PerftestPresent(_Check):
    """Whether ib_write_bw is installed (never a problem: without it the bandwidth test is an all-reduce)."""

    kind: Literal["perftest"] = "perftest"


class PortsFree(_Check):
    """Nothing listens on the ports (`ss` prints nothing); ignored while the cluster itself runs."""

    kind: Literal["ports-free"] = "ports-free"
    ports: list[int]


class MemoryAvailable(_Check):
    """/proc/meminfo shows enough available memory; ignored while the cluster itself runs."""

    kind: Literal["memory-available"] = "memory-available"
    min_available_fraction: float = Field(description="Of total memory (unified memory: vLLM's share must be free).")
    min_available_gib: float
    gpu_memory_utilization: float
    drop_page_cache: bool


class MemoryBack(_Check):
    """Right before an engine starts: each node's memory is read (memory_back.MEMORY_COMMAND), and the
    start waits until it is back within slack_gib of the node's baseline (Waits.memory)."""

    kind: Literal["memory-back"] = "memory-back"
    slack_gib: Optional[float] = Field(description="memory.back_slack_gib (None: memory_back.slack_gib's default).")


class ReadBack(_Check):
    """The command reads back what was written: its output must be exactly this."""

    kind: Literal["read-back"] = "read-back"
    stdout: str


class VllmFlags(_Check):
    """The image's own vLLM accepts the rendered flags (evaluated by vllm_check.parse_output)."""

    kind: Literal["vllm-flags"] = "vllm-flags"
    container: str = Field(description="The throwaway container's name (removed if the check times out).")


class RayMembers(_Check):
    """Ray shows every node alive and the resources the engine will ask for, and no placement group
    of an earlier engine holds them (Ray removes an engine's when it ends: vLLM would wait for it)."""

    kind: Literal["ray-members"] = "ray-members"
    alive_ips: list[str]
    resources: dict[str, float] = Field(default_factory=dict)


class ProcessRuns(_Check):
    kind: Literal["process-runs"] = "process-runs"
    name: str


class HttpAnswer(_Check):
    kind: Literal["http"] = "http"
    status: int = 200
    model: Optional[str] = Field(None, description="/v1/models must list it.")
    choices: bool = Field(False, description="A completion must return choices.")


Check = Annotated[Union[DockerAnswers, ImagePresent, ModelFiles, ImagePlatform, GpuWorks, SudoWorks, DiskFree, ClockInSync, ClusterLink, PeerReachable, LinkBandwidth, RdmaBandwidth, PerftestPresent, PortsFree, MemoryAvailable, MemoryBack,
                        ReadBack, VllmFlags, RayMembers, ProcessRuns, HttpAnswer, KernelKnown, CmaSane, DriverSame, GpuHeatOk, GdrCapable,
                        MemoryCeiling, ClockCapped], Field(discriminator="kind")]


def evaluate(check: Check, exit_code: int, stdout: str, stderr: str = "", *, cluster_running: bool = False) -> Optional[str]:
    """The problem (with its fix) a node command's result shows, or None. cluster_running: this
    cluster's own containers run on the node (their ports and memory are not a problem). For an
    HttpAnswer (readiness) the result is the HTTP answer: exit_code its status, stdout its body."""
    if isinstance(check, HttpAnswer):
        return http_problem(check, exit_code, stdout)
    if isinstance(check, BOX_CHECKS):
        return box_checks.problem(check, exit_code, stdout, stderr, cluster_running)
    ok = exit_code == 0
    tail = "\n".join((stderr.strip() or stdout.strip()).splitlines()[-3:])
    if isinstance(check, (DockerAnswers, ImagePresent, ModelFiles, ImagePlatform, GpuWorks)):
        return _docker_problem(check, exit_code, stdout, stderr, tail)
    if isinstance(check, SudoWorks):
        return None if ok else (f"`sudo -n` does not work ({tail or f'exit code {exit_code}'}): ssh.sudo is true (sysctls and the page cache "
                                "need root); allow the SSH user passwordless sudo (a file in /etc/sudoers.d/), or connect as root with ssh.sudo false")
    if isinstance(check, DiskFree):
        free = parse_df_free_gib(stdout)
        if free is None:
            return f"cannot read the free space of Docker's data root: {tail or 'no output'}"
        if free >= check.min_gib:
            return None
        return (f"only {free:.1f} GiB free where Docker keeps images and container logs, {check.min_gib:g} GiB needed: "
                "`docker system prune` removes unused images and stopped containers")
    if isinstance(check, ClockInSync):
        return None if parse_clock(stdout) is not None else f"cannot read the clock: {tail or 'no output'}"
    if isinstance(check, ClusterLink):
        pick = link_of(check, stdout)
        return pick if isinstance(pick, str) else None
    if isinstance(check, PeerReachable):
        return peer_problem(check, stdout)
    if isinstance(check, LinkBandwidth):
        return bandwidth_problem(check, exit_code, stdout, stderr)
    if isinstance(check, RdmaBandwidth):
        return rdma_problem(check, exit_code, stdout, tail)
    if isinstance(check, PerftestPresent):
        return None
    if isinstance(check, PortsFree):
        if cluster_running or not stdout.strip():
            return None
        return f"port(s) {', '.join(map(str, check.ports))} already in use by something else: {stdout.strip().splitlines()[0]}"
    if isinstance(check, MemoryAvailable):
        if cluster_running:
            return None
        mem = parse_meminfo(stdout)
        if not ok or not mem.known:
            return f"cannot read memory information: {tail or 'no output'}"
        need = max(mem.total_gib * check.min_available_fraction, check.min_available_gib)
        if mem.available_gib >= need:
            return None
        hint = "" if check.drop_page_cache else " (memory.drop_page_cache: true may free page cache)"
        return (f"only {mem.available_gib:.1f} GiB of {mem.total_gib:.1f} GiB available, {need:.1f} GiB needed "
                f"for gpu_memory_utilization {check.gpu_memory_utilization}{hint}")
    if isinstance(check, MemoryBack):
        return None if ok and parse_memory(stdout) is not None else f"cannot read memory information: {tail or 'no output'}"
    if isinstance(check, ReadBack):
        if not ok:
            return f"exit code {exit_code}: {tail}"
        return None if stdout == check.stdout else "the value did not stick"
    return None if ok else f"exit code {exit_code}: {tail}"


def _docker_problem(check: Check, exit_code: int, stdout: str, stderr: str, tail: str) -> Optional[str]:
    """Docker, the image, the model files and the GPU in a container."""
    ok = exit_code == 0
    if isinstance(check, DockerAnswers):
        return None if ok else f"docker does not answer ({tail}): install Docker and let the SSH user use it (docker group)"
    if isinstance(check, ImagePresent):
        return None if ok else (f"image {check.image} is not on this node and could not be pulled or copied from "
                                f"another node: `docker pull {check.image}` there, or load it by hand")
    if isinstance(check, ModelFiles):
        if not ok:
            return f"model folder {check.path} is missing or unreadable: copy the model there (same files on every node)"
        return None if stdout.strip() else f"model folder {check.path} is empty"
    if isinstance(check, ImagePlatform):
        node, image = parse_platforms(stdout)
        if image is None:
            return None  # the image is not on the node: its own check says so
        if node is None:
            return f"cannot read the Docker daemon's platform: {tail or 'no output'}"
        if same_platform(node, image):
            return None
        return (f"image {check.image} is built for {image}, this node runs {node}: containers would fail with `exec format error`; "
                f"use an image built for {node} (DGX Spark and GX10 are arm64: pick the arm64 tag or a multi-arch image)")
    if isinstance(check, GpuWorks):
        smoke = parse_gpu_smoke(exit_code, stdout, stderr)
        if "No such image" in (stderr + stdout):  # an absent image: its own check says so
            return None
        if smoke.gpus:
            unified = [g for g in smoke.gpus if "GB10" in g]
            if unified and not check.unified:
                return (f"the GPU is {unified[0]}, whose memory is unified with the CPU's, but memory.unified is false: the 0.85 cap "
                        "and the free-memory guard are off, and a model load can freeze the box; set memory.unified: true")
            return None
        return f"a container of {check.image} cannot use the GPU ({smoke.error})" + (f": {smoke.fix}" if smoke.fix else "")
    return None


def http_problem(check: HttpAnswer, status: int, body: str) -> Optional[str]:
    """What a readiness answer lacks: the status, the model listed, a completion's choices."""
    if status != check.status:
        return f"HTTP {status}: {body[:200]}"
    if not (check.model or check.choices):
        return None
    try:
        data = json.loads(body)
        if check.model is not None:
            ids = [m["id"] for m in data.get("data", [])]
            if check.model not in ids:
                return f"served models are {ids}, not {check.model}"
        if check.choices and not data.get("choices"):
            return "no choices in the completion"
    except (ValueError, AttributeError, KeyError, TypeError):
        return f"not the expected JSON: {body[:200]}"
    return None


def differs(check: Check, values: dict[str, str], head: str) -> Optional[str]:
    """For checks whose output must be the same on every node: what differs, or None."""
    if not check.same_on_all_nodes or len(set(values.values())) <= 1:
        return None
    if isinstance(check, DriverSame):
        return box_checks.drivers_differ(values, head)
    ref = values.get(head, next(iter(values.values())))
    bad = [n for n, v in values.items() if v != ref]
    if isinstance(check, ImagePresent):
        ids = ", ".join(f"{n}={v.strip()[:19]}" for n, v in values.items())
        return f"image {check.image} differs between nodes ({ids}): load the same image everywhere"
    if isinstance(check, ClockInSync):
        clocks = {n: parse_clock(v) for n, v in values.items()}
        known = {n: t for n, t in clocks.items() if t is not None}
        if len(known) < 2 or max(known.values()) - min(known.values()) <= check.max_skew_s:
            return None
        base = known.get(head, min(known.values()))
        ahead = ", ".join(f"{n} {t - base:+.1f}s" for n, t in known.items() if n != head)
        return (f"the nodes' clocks differ by {max(known.values()) - min(known.values()):.1f}s (against {head}: {ahead}), more than "
                f"{check.max_skew_s:g}s: turn on time sync on every node (timedatectl set-ntp true; chrony or systemd-timesyncd)")
    if isinstance(check, ModelFiles):
        want = parse_file_listing(ref)
        details = []
        for n in bad:
            have = parse_file_listing(values[n])
            missing = sorted(p for p, size in want.items() if have.get(p) != size)[:5]
            extra = sorted(p for p, size in have.items() if want.get(p) != size)[:5]
            details.append(f"{n}: missing or different {missing}, extra {extra}")
        return f"model folder {check.path} differs from {head}'s: " + "; ".join(details)
    return f"{check.kind} differs between nodes: {', '.join(bad)}"


STATE_MIN_GIB = 1.0  # the controller's state_dir: container logs saved by down and restarts, incident bundles, events


def state_dir_problem(path: str, free_gib: Optional[float]) -> Optional[str]:
    """The machine running spark-cluster has room for its state_dir (free_gib None: nothing of the path is readable)."""
    if free_gib is None:
        return f"state_dir {path} cannot be created or read here: set state_dir in cluster.yaml to a writable folder"
    if free_gib >= STATE_MIN_GIB:
        return None
    return (f"only {free_gib:.2f} GiB free for state_dir {path} ({STATE_MIN_GIB:g} GiB needed: the logs `down` and restarts save, "
            "incident bundles): free some space or set state_dir elsewhere")


def link_of(check: ClusterLink, stdout: str) -> LinkPick | str:
    """The link a ClusterLink step's output shows, or why none can be picked."""
    ports, ifaces = parse_link(stdout)
    return pick_link(check.address, ports, ifaces)


def peer_problem(check: PeerReachable, stdout: str) -> Optional[str]:
    reach = parse_reach(stdout)
    where = f"link {reach.route_dev or '?'} to {check.peer}"
    if check.via and reach.route_dev and reach.route_dev != check.via:
        return (f"{where}: the traffic to {check.peer}'s cluster address {check.address} leaves by {reach.route_dev}, not by the cluster "
                f"link {check.via} (route: {reach.route}): give both nodes their cluster addresses in one subnet on the ConnectX-7 link")
    if not reach.mtu and reach.small.answered:
        return f"{where}: cannot read the MTU of {reach.route_dev or 'the route to ' + check.address}: set link.mtu in cluster.yaml"
    problem = reach_problem(check.node, check.peer, check.address, check.mtu or reach.mtu, reach.small, reach.full)
    return f"{where}: {problem}" if problem else None


BANDWIDTH_REMEDIES = ("a link that came up degraded after a bad initialisation (8-25 Gb/s instead of 80 or more per rail) comes back "
                      "after a reboot of both nodes, or 60 s without AC power; check that NCCL_IB_HCA names both halves of the cable "
                      "(nccl: auto does), the same MTU on both ends, the cable seated")


def bandwidth_problem(check: LinkBandwidth, exit_code: int, stdout: str, stderr: str) -> Optional[str]:
    if "No such image" in stderr + stdout:
        return None  # the image check says so
    if check.rank:  # rank 0 reports the figure; another rank only its own failure
        return None if exit_code == 0 else f"the bandwidth test failed here: {parse_nccl_tests(stderr + stdout).error}"
    fact = parse_nccl_tests(stdout)
    if fact.gbits is None:
        return f"the bandwidth test gave no figure ({parse_nccl_tests(stderr + stdout).error})"
    if fact.gbits >= check.min_gbits:
        return None
    where = "NCCL over the cluster link" if check.backend == "nccl" else "Gloo on CPU"
    return f"the all-reduce across the nodes ({where}) reached {fact.gbits:.1f} Gb/s, below link.min_gbits {check.min_gbits:g}: {BANDWIDTH_REMEDIES}"


def rdma_problem(check: RdmaBandwidth, exit_code: int, stdout: str, tail: str) -> Optional[str]:
    if check.serves:  # the head's clients report the figures
        return None if exit_code == 0 else f"the ib_write_bw server failed here: {tail or f'exit code {exit_code}'}"
    rails = parse_rdma_bandwidth(stdout)
    if not rails:
        return f"ib_write_bw gave no figure: {tail or f'exit code {exit_code}'}"
    bad = [f"{rail}: {f.gbits:.1f} Gb/s" if f.gbits is not None else f"{rail}: no figure ({f.error})" for rail, f in rails.items()
           if f.gbits is None or f.gbits < check.min_gbits]
    if not bad:
        return None
    return f"ib_write_bw per rail below link.min_gbits {check.min_gbits:g} ({'; '.join(bad)}): {BANDWIDTH_REMEDIES}"


def mapped_weights_note(check: ModelFiles, size_bytes: int) -> Optional[str]:
    """The model's size, and a warning when it is large and memory-mapped on unified memory."""
    gb = size_bytes / 1e9
    if check.mapped_warn_gb is None or gb <= check.mapped_warn_gb:
        return f"{gb:.1f} GB" if size_bytes else None
    return (f"{gb:.1f} GB, memory-mapped (vLLM's default) on unified memory: warning, a large model loads slowly that way (on a Spark "
            f"80 GB took 8 min 41 s mapped against 1 min 28 s eager, NVIDIA developer forum 349886): set model.load_strategy: eager, "
            f"or model.load_format to a fast loader the image has (fastsafetensors, instanttensor)")


def warning(check: Check, exit_code: int, stdout: str, stderr: str = "") -> Optional[str]:
    """What a passed check found that `up` says and goes on with (heat, GPUDirect RDMA off)."""
    if isinstance(check, BOX_CHECKS):
        return box_checks.warning(check, exit_code, stdout, stderr)
    return None


def note(check: Check, stdout: str, exit_code: int = 0, stderr: str = "") -> Optional[str]:
    """What a passed check found that is worth showing (`doctor`): the link picked, a half-speed cable, the round trip."""
    if isinstance(check, BOX_CHECKS):
        return box_checks.note(check, exit_code, stdout, stderr)
    if isinstance(check, ClusterLink):
        pick = link_of(check, stdout)
        if isinstance(pick, LinkPick):
            hcas = f", RDMA {'+'.join(pick.hcas)}" if pick.hcas else ""
            return f"{pick.netdev} (MTU {pick.mtu}{hcas})" + (f"; {pick.note}" if pick.note else "")
    if isinstance(check, ImagePlatform):
        node, image = parse_platforms(stdout)
        return f"node {node}, image {image}" if node and image else None
    if isinstance(check, DiskFree):
        free = parse_df_free_gib(stdout)
        return f"{free:.0f} GiB free" if free is not None else None
    if isinstance(check, GpuWorks):
        return ", ".join(parse_gpu_smoke(0, stdout).gpus) or None
    if isinstance(check, RdmaBandwidth) and not check.serves:
        return "ib_write_bw per rail: " + ", ".join(f"{rail} {f.gbits:.1f} Gb/s" for rail, f in parse_rdma_bandwidth(stdout).items())
    if isinstance(check, ModelFiles):
        return mapped_weights_note(check, sum(parse_file_listing(stdout).values()))
    if isinstance(check, PerftestPresent):
        return "ib_write_bw installed" if stdout.strip() else "no ib_write_bw (perftest): the bandwidth test is an all-reduce"
    if isinstance(check, LinkBandwidth) and check.rank == 0:
        gbits = parse_nccl_tests(stdout).gbits
        how = "NCCL" if check.backend == "nccl" else "Gloo on CPU: no GPU requested, so not a RoCE figure"
        return f"all-reduce bus bandwidth {gbits:.2f} Gb/s ({how})" if gbits is not None else None
    if isinstance(check, PeerReachable):
        reach = parse_reach(stdout)
        if reach.full.answered:
            return f"over {reach.route_dev}, MTU {check.mtu or reach.mtu} unfragmented, {reach.full.rtt_avg_ms} ms"
    return None
