"""FakeTransport / fake_nodes: a scripted stand-in for the SSH transport (as httpx's MockTransport
is for HTTP), so `up` and `down` sequencing runs in milliseconds without any node.

A FakeCluster keeps what a node would: its containers (created by `docker run`, removed by
`docker rm`) and whether vLLM runs in the Ray head; every command is recorded in order, and a
test can script any command's answer (by a substring of it) to inject a failure. A command that
neither the plan, the fake's own node model nor the test scripted is refused (as httpx's
MockTransport or Invoke's MockContext do): it raises `Unscripted`, and since the code under test
may catch that, every FakeCluster made during a test is also checked when the test ends
(conftest's `fakes_refuse_the_unexpected`).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Callable, Optional

import httpx

import yaml

from spark_cluster.config import ClusterConfig, parse_config
from spark_cluster.checks import ClusterLink, link_of
from spark_cluster.errors import TransportError
from spark_cluster.facts import LABEL_PREFIX
from spark_cluster.plan import build_plan
from spark_cluster.steps import Plan, Step
from spark_cluster.transport import Nodes, Result

from .conftest import SIM_CONFIG, recording

Answer = tuple[int, str, str]  # exit code, stdout, stderr
MADE: list["FakeCluster"] = []  # every FakeCluster of the running test (checked at its end)


# templates/node-scripts/cache.py's answers: a cold folder checked, then sealed once the engine is ready
CACHE_ANSWERS = {"check": '{"mode": "check", "files": 0, "bytes": 0, "sealed_at": null, "suspect": 0, "suspect_bytes": 0, "examples": []}',
                 "seal": '{"mode": "seal", "sealed_at": "20261206T120000Z", "files": 3, "bytes": 52000}'}


class Unscripted(AssertionError):
    """A node command nobody scripted."""


@dataclass
class FakeContainer:
    name: str
    component: str
    spec_hash: str
    state: str = "running"
    id: str = ""


@dataclass
class FakeCluster:
    cfg: ClusterConfig
    containers: dict[str, dict[str, FakeContainer]] = field(default_factory=dict)  # node -> name -> container
    vllm_running: bool = False
    log: list[tuple[str, str]] = field(default_factory=list)  # (node, command) in order
    scripted: list[tuple[str, str, Callable[[], Answer]]] = field(default_factory=list)  # (node or "*", substring, answer)
    counter: int = 0

    links: Optional[dict] = None  # `nccl: auto`: what the plan is built with (as detected by a preflight)
    locked: bool = False  # the cluster's lock directory on the head
    generation: int = 0  # vLLM starts so far (FakeEngineApi: a wedge ends with the engine that had it)
    earlier_pg_reads: int = 0  # reads of Ray's state that still show an earlier engine's placement group (Ray releasing it)
    available_kb: list[int] = field(default_factory=lambda: [120000000])  # MemAvailable read right before an engine start, in turn (the last stays)
    silent: dict[str, int] = field(default_factory=dict)  # node -> how many times `true` fails before it answers again (a cut link)
    cache_answers: dict[str, str] = field(default_factory=lambda: dict(CACHE_ANSWERS))  # what a node's cache script prints, by mode

    def __post_init__(self) -> None:
        MADE.append(self)
        self.unscripted: list[tuple[str, str]] = []
        self.plan: Plan = build_plan(self.cfg, reveal_secrets=True, links=self.links)
        self.by_command = {s.command: s for s in self.plan.steps if s.command}
        self.by_node_command = {(s.node, s.command): s for s in self.plan.steps if s.command}  # the same command differs in its check by node
        for n in self.cfg.nodes:
            self.containers.setdefault(n.name, {})

    def script(self, substring: str, answer: "Answer | Callable[[], Answer]", node: str = "*") -> None:
        """Answer commands containing substring (on node, or any) with this, or call it (it may raise)."""
        self.scripted.append((node, substring, answer if callable(answer) else (lambda: answer)))

    def serving(self) -> "FakeCluster":
        """Every container of the plan running as planned, vLLM running: what a good `up` leaves."""
        for c in self.plan.containers():
            self.containers[c.node][c.name] = FakeContainer(c.name, c.component, c.labels[f"{LABEL_PREFIX}.spec-hash"])
        self.vllm_running = True
        return self

    def commands(self, node: Optional[str] = None, containing: str = "") -> list[str]:
        return [c for n, c in self.log if (node is None or n == node) and containing in c]

    def _pinned_step(self, node: str, command: str) -> Optional[Step]:
        """A step of the plan as the executor builds it once a KV cache size is kept (kv.json)."""
        from spark_cluster.kept import kv_capacity

        kv = kv_capacity(self.cfg)
        if kv is None:  # nothing kept: the plan is the fake's own
            return None
        plan = build_plan(self.cfg, reveal_secrets=True, links=self.links, kv=kv)
        return next((s for s in sorted(plan.steps, key=lambda s: s.node != node) if s.command == command), None)

    # ---- what a node answers ------------------------------------------------------------------
    def answer(self, node: str, command: str) -> Answer:
        self.log.append((node, command))
        if self.silent.get(node, 0) > 0:  # nothing gets through; each `true` asked (is it back?) brings the link nearer to returning
            if command == "true":
                self.silent[node] -= 1
            raise TransportError(f"{node}: SSH to the node failed: timed out")
        if command == "true":  # does the node answer?
            return 0, "", ""
        for where, part, fn in self.scripted:
            if where in ("*", node) and part in command:
                return fn()
        step = self.by_node_command.get((node, command)) or self.by_command.get(command) or self._pinned_step(node, command)
        if command.startswith("mkdir ") and ".lock" in command:
            if self.locked:
                return 1, "", ""
            self.locked = True
            return 0, "", ""
        if command.startswith("cat ") and ".lock/holder" in command:
            return (0, '{"host": "elsewhere", "pid": 1, "command": "up", "since": "2026-11-29T12:00:00Z"}', "") if self.locked else (1, "", "")
        if command.startswith("rm -rf ") and command.endswith(".lock"):
            self.locked = False
            return 0, "", ""
        if command.startswith("docker logs "):
            return 0, f"2026-11-29T12:00:00Z log of {shlex.split(command)[-2]}\n", ""
        if command.startswith("docker kill "):
            name = shlex.split(command)[2]
            if name in self.containers[node]:
                self.containers[node][name].state = "exited"
            return 0, "", ""
        if command.startswith("docker exec ") and "kill -TERM" in command:  # the hosted process stopped
            self.vllm_running = False
            return 0, "", ""
        if command.startswith("docker save ") or command == "docker load":
            return 0, "", ""
        if command == "docker ps -a; echo; free -m; echo; uptime":  # an incident bundle's host facts
            return 0, f"{len(self.containers[node])} containers\n\nMem: 124000 4000\n\n up 3 days\n", ""
        if command.startswith('echo "@@sysctl"'):  # status's and the watchdog's node script
            return 0, self._node_script(node, command), ""
        if "ids=$(docker ps -aq" in command:
            return 0, self._docker_ps(node), ""
        if step is not None and step.kind == "check":
            return self._check(node, step)
        if step is not None and step.kind == "start":
            self.counter += 1
            c = step.container
            self.containers[node][c.name] = FakeContainer(c.name, c.component, c.labels[f"{LABEL_PREFIX}.spec-hash"], id=f"c{self.counter}")
            if c.component == "vllm":  # executor: native, rank 0 with the API is the head's container
                self.vllm_running = True
                self.generation += 1
            return 0, f"c{self.counter}\n", ""
        if step is not None and step.kind == "exec":
            self.vllm_running = True
            self.generation += 1
            return 0, "", ""
        if step is not None and step.kind == "wait-ray":
            nodes = [{"ip": n.address, "alive": True, "resources": {k: float(v) for k, v in self.cfg.ray.resources.items()}}
                     for n in self.cfg.nodes]
            pgs = [{"id": "pg-earlier", "state": "CREATED"}] if self.earlier_pg_reads > 0 else []
            self.earlier_pg_reads -= 1
            return 0, f"SPARK_CLUSTER_RAY_NODES {json.dumps(nodes)}\nSPARK_CLUSTER_RAY_PGS {json.dumps(pgs)}\n", ""
        if "/proc/$p/cmdline" in command:  # the hosted process fact
            p = self.plan.processes()[0]
            return (0, f"309 {' '.join(p.argv)}\n", "") if self.vllm_running else (4, "pid 309 gone\n", "")
        if step is not None and step.phase in ("cache", "seal"):  # templates/node-scripts/cache.py in a throwaway container
            return 0, self.cache_answers["check" if step.phase == "cache" else "seal"] + "\n", ""
        if "docker rm -f" in command:
            name = shlex.split(command.split("docker rm -f", 1)[1])[0]
            self.containers[node].pop(name, None)
            if any(c.component in ("ray-head", "vllm") and c.name == name for c in self.plan.containers()):
                self.vllm_running = False
            return 0, "", ""
        if step is not None and step.phase == "clear":  # what is left of the engine in the head container killed
            self.vllm_running = False
            return 0, "", ""
        if step is not None:  # a step of the plan whose answer is its exit code alone (sysctl apply, ...)
            return 0, "", ""
        self.unscripted.append((node, command))
        raise Unscripted(f"{node}: nothing scripted answers {command!r}")

    def _docker_ps(self, node: str) -> str:
        return "".join(f"{c.id}|/{c.name}|{c.component}|{c.state}|sha256:img|2026-11-29T12:00:00Z|0|0|{c.spec_hash}\n"
                       for c in self.containers[node].values())

    def _node_script(self, node: str, script: str) -> str:
        """Each section of the node script as a healthy node prints it; the ranks' processes are not
        shown (their activity reads unknown: the stall window and the canary decide)."""
        out = []
        for name in re.findall(r'echo "@@([^"]+)"', script):
            out.append(f"@@{name}")
            if name == "sysctl":
                out += [str(v) for v in self.cfg.sysctl.values()]
            elif name == "meminfo":
                out += ["MemTotal:       127600816 kB", "MemAvailable:   120000000 kB"]
            elif name == "gpu":
                out.append("no nvidia-smi")
            elif name == "containers":
                out += [self._docker_ps(node).rstrip("\n"), "##rc 0"]
            elif name.startswith("process "):
                p = [p for p in self.plan.processes() if p.node == node][int(name.split()[1])]
                out += [f"309 {' '.join(p.argv)}", "##rc 0"] if self.vllm_running else ["pid 309 gone", "##rc 4"]
        return "\n".join(out) + "\n"

    def _check(self, node: str, step) -> Answer:
        """What a healthy node answers to each kind of check."""
        kind = step.check.kind
        if kind == "image-present":
            return 0, "sha256:img\n", ""
        if kind == "model-files":
            return 0, "config.json\t100\nmodel.safetensors\t1000\n", ""
        if kind == "memory-available":
            return 0, "MemTotal:       127600816 kB\nMemAvailable:   120000000 kB\n", ""
        if kind == "memory-back":
            kb = self.available_kb.pop(0) if len(self.available_kb) > 1 else self.available_kb[0]
            return 0, f"MemTotal:       127600816 kB\nMemAvailable:   {kb} kB\n@@gpu\nNVIDIA GB10, [N/A], [N/A]\n", ""
        if kind == "read-back":
            return 0, step.check.stdout, ""
        if kind == "clock":
            return 0, "1796000000.5\n", ""
        if kind == "disk-free":
            return 0, "Filesystem     1024-blocks     Used Available Capacity Mounted on\n/dev/vda 264212084 46646764 59744148 44% /var/lib/docker\n", ""
        if kind == "link-bandwidth":  # as allreduce.py prints it on rank 0 (4.474 Gb/s)
            return 0, "# all-reduce backend=gloo world=2 bytes=67108864 seconds=0.120000\n# Avg bus bandwidth    : 0.5593 \n" if step.check.rank == 0 else "", ""
        if kind == "rdma-bandwidth":  # the head's clients print each rail's output after its mark (two recorded rails of a real Spark)
            if step.check.serves:
                return 0, "", ""
            return 0, "".join(f"== {w.name} {hca}\n" + recording(f"ib-write-bw-real-spark-rail{i}")["stdout"]
                              for w in self.cfg.workers for i, hca in enumerate(["rocep1s0f0", "roceP2p1s0f0"])), ""
        if kind == "image-platform":
            return 0, "linux/amd64\n=== image\nlinux/amd64\n", ""
        if kind == "gpu-works":
            return 0, recording("gpu-smoke-real-spark")["stdout"], ""
        if kind == "peer-reachable":  # recorded between two simulated nodes (the check reads no address from it)
            return 0, recording("reach-sim-ok")["stdout"], ""
        if kind == "cluster-link":  # a simulated node's link, holding this node's address
            return 0, recording("link-sim")["stdout"].replace("10.99.0.11/24", f"{step.check.address}/24"), ""
        if kind == "vllm-flags":  # the image's vLLM accepts the flags (templates/node-scripts/vllm-check.py's report)
            return 0, 'SPARK-CLUSTER-VLLM-CHECK {"vllm_version": "0.32.0", "problems": []}\n', ""
        if kind in ("kernel", "cma", "driver", "gpu-heat"):  # a real Spark's (tests/data/facts), no nvidia-smi
            return 0, recording({"kernel": "kernel-real-spark-6.17", "cma": "cma-real-spark-idle", "driver": "driver-real-spark-580.142",
                                 "gpu-heat": "heat-sim-node"}[kind])["stdout"], ""
        if kind == "clock-capped":  # the driver's answer to `nvidia-smi -lgc 0,2100` on a server that tops out at 1860 MHz
            return 0, recording("clock-lock-real-clamped")["stdout"], ""
        if kind == "gdr":  # box_facts.GDR_SCRIPT in a container without a GPU
            return 0, "no GPU\n", ""
        if kind == "memory-ceiling":  # box_facts.CEILING_SCRIPT on a GB10: 110.34 of 121.69 GiB free (MiaAI-Lab/GLM-5.3-Flash-EXL3-2x-DGX-Sparks#47)
            return 0, f"cuda {int(110.34 * 2**30)} {int(121.69 * 2**30)}\n", ""
        if kind in ("ports-free", "docker-answers", "sudo-works", "perftest"):  # their exit code says it
            return 0, "", ""
        self.unscripted.append((node, step.command))
        raise Unscripted(f"{node}: no healthy answer for a {kind} check: {step.command!r}")


class FakeTransport:
    """The SSHTransport interface, answered by a FakeCluster."""

    def __init__(self, node: str, cluster: FakeCluster):
        self.node = node
        self.cluster = cluster

    def connect(self) -> None:
        return None

    def run(self, command: str, *, timeout: float | None = None, input: bytes | None = None, on_output=None) -> Result:
        code, out, err = self.cluster.answer(self.node, command)
        return Result(self.node, command, code, out, err, 0.001)

    def stream_to(self, command: str, target: "FakeTransport", target_command: str, *, timeout: float) -> tuple[Result, Result]:
        code, out, err = self.cluster.answer(self.node, command)
        code2, out2, err2 = self.cluster.answer(target.node, target_command)
        return Result(self.node, command, code, "", err, 0.001), Result(target.node, target_command, code2, out2, err2, 0.001)

    def close(self) -> None:
        return None


class FakeEngineApi:
    """vLLM's HTTP API as the watchdog, `status` and readiness ask it, for httpx.MockTransport
    (`client()`): answering while the fake cluster runs vLLM, its progress counters moving at every
    /metrics read. `wedge()` freezes the engine running now: counters still, requests running, a
    completion times out; the next vLLM the cluster starts is healthy. Anything else is refused."""

    def __init__(self, cluster: FakeCluster):
        self.cluster = cluster
        self.steps = 0
        self.wedged_generation: Optional[int] = None
        self.requests: list[str] = []

    def wedge(self) -> None:
        self.wedged_generation = self.cluster.generation

    @property
    def wedged(self) -> bool:
        return self.wedged_generation == self.cluster.generation

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self.handle))

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append(f"{request.method} {path}")
        if not self.cluster.vllm_running:
            raise httpx.ConnectError("connection refused", request=request)
        if path == "/health":
            return httpx.Response(200)
        if path == "/metrics":
            if not self.wedged:
                self.steps += 1
            running = 2 if self.wedged else 0
            return httpx.Response(200, text=f"vllm:num_requests_running{{model_name=\"m\"}} {running}\n"
                                            f"vllm:num_requests_waiting{{model_name=\"m\"}} 0\n"
                                            f"vllm:iteration_tokens_total_count{{model_name=\"m\"}} {self.steps}\n"
                                            f"vllm:generation_tokens_total{{model_name=\"m\"}} {self.steps * 4}\n"
                                            f"vllm:prompt_tokens_total{{model_name=\"m\"}} 10\n")
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": self.cluster.cfg.model.name, "object": "model"}]})
        if path == "/v1/completions" and request.method == "POST":
            if self.wedged:
                raise httpx.ReadTimeout("the engine is wedged", request=request)
            return httpx.Response(200, json={"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": "x"}]})
        raise Unscripted(f"nothing scripted answers {request.method} {request.url}")


def fake_nodes(cluster: FakeCluster) -> Nodes:
    return Nodes(cluster.cfg, factory=lambda ep: FakeTransport(ep.node, cluster))


def started(cluster: FakeCluster) -> list[str]:
    """Containers created and processes started, in order, as `node:name`."""
    out = []
    for node, cmd in cluster.log:
        step = cluster.by_command.get(cmd)
        if step is not None and step.kind in ("start", "exec"):
            out.append(f"{node}:{step.container.name if step.container else step.process.container + '/' + step.process.name}")
    return out


def removed(cluster: FakeCluster) -> list[str]:
    """The group's containers removed, in order, as `node:name` (not a throwaway's leftover removed before it runs)."""
    out = []
    for node, cmd in cluster.log:
        m = re.search(r"docker rm -f (\S+)", cmd)
        if "docker run --rm" in cmd:
            continue
        if m:
            out.append(f"{node}:{shlex.split(m.group(1))[0]}")
    return out


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds

def periods(wd, clock: Clock, n: int) -> None:
    for _ in range(n):
        clock.sleep(wd.s.period_s)
        wd.step()


def auto_sim(**nccl):
    """The simulated cluster's config with `nccl: auto` in place of its hand-written interface names."""
    data = yaml.safe_load(SIM_CONFIG.read_text())
    data["nccl"] = {"auto": True, "p2p_disable": True, **nccl}
    del data["container"]["env"]["GLOO_SOCKET_IFNAME"]
    return parse_config(yaml.safe_dump(data))

def sim_links(cfg):
    """What the detection reads on each simulated node (link-sim recorded on sim-1, with the node's address)."""
    out = recording("link-sim")["stdout"]
    return {n.name: link_of(ClusterLink(address=n.address), out.replace("10.99.0.11/", f"{n.address}/")) for n in cfg.nodes}
