"""`spark-cluster status`: observe every node, Ray and vLLM in parallel, then one verdict.

Observing never raises: each probe has its own timeout and returns what it saw (or the error).
The verdict is one pure function of the observation, so it is tested on recorded data.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, Optional

import httpx
from pydantic import BaseModel, Field, PrivateAttr

from . import kept, timeouts
from .config import ClusterConfig
from .errors import ENGINE_KEY_FIX, SparkClusterError
from .facts import (GPU_COMMAND, MEMINFO_COMMAND, ContainerFact, RayNode, RayPlacementGroup, containers_command, counters, marked_sections,
                    parse_containers, parse_gpu, parse_meminfo, parse_metrics, parse_process, parse_sysctl, process_command,
                    progressed, read_ray_state, sysctl_command)
from .plan import LABEL_PREFIX, Plan, build_plan
from .ranks import (GPU_ACTIVITY_COMMAND, GpuBaseline, GpuReading, NodeActivity, ProcessesReading, group_activity, node_activity,
                    parse_gpu_activity, parse_processes, processes_command)

if TYPE_CHECKING:  # paramiko is imported by whoever makes the Nodes, while vLLM is being sampled
    from .transport import Nodes, SSHTransport

Verdict = Literal["serving", "degraded", "busy", "stalled", "down", "starting"]
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
    steps_total: Optional[float] = Field(None, description="vllm:iteration_tokens_total count: one per engine step")
    generation_tokens_total: Optional[float] = None
    prompt_tokens_total: Optional[float] = None
    window_s: Optional[float] = None
    steps_in_window: Optional[float] = None
    generation_tok_s: Optional[float] = Field(None, description="generation throughput over the sampling window")
    progress_age_s: Optional[float] = Field(None, description="seconds since the step/token counters last moved (across status runs)")
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


class StatusReport(BaseModel):
    verdict: Verdict
    reason: str
    observation: Observation


# ---- probes (never raise) ----------------------------------------------------------------------

def node_script(cfg: ClusterConfig, procs: list, containers: list[str] = (), twice_s: float = 0) -> str:
    """One command per node for everything status and the watchdog read there, in sections; each
    hosted process: its fact command, then its exit code on a line of its own. containers: the
    group's containers on the node, whose processes are read (twice, twice_s apart, when given:
    status has no earlier reading to compare with)."""
    parts = [("sysctl", sysctl_command(list(cfg.sysctl))), ("meminfo", MEMINFO_COMMAND), ("gpu", GPU_COMMAND),
             ("containers", containers_command(cfg.name) + ' 2>&1; echo "##rc $?"')]
    parts += [(f"process {i}", f'{process_command(p.container, p.pid_file)} 2>&1; echo "##rc $?"') for i, p in enumerate(procs)]
    if containers:
        if twice_s:
            parts.append(("procs-before", f"{processes_command(list(containers))}; sleep {twice_s:g}"))
        parts += [("gpu-activity", GPU_ACTIVITY_COMMAND), ("procs", processes_command(list(containers)))]
    return "".join(f'echo "@@{name}"; {{ {cmd}; }}\n' for name, cmd in parts) + 'echo "@@end"\n'


def group_containers(plan: Plan, node: str) -> list[str]:
    """The group's containers on a node: where its ranks run."""
    return [s.container.name for s in plan.steps if s.container is not None and s.node == node]


_NODE_SECTION = re.compile(r"^@@(.+)$", re.M)  # node_script's marks


def _sections(text: str) -> dict[str, list[str]]:
    """The node script's output by section: its non-blank lines."""
    return {m.group(1): [line for line in body.splitlines() if line.strip()] for m, body in marked_sections(_NODE_SECTION, text)}


def observe_node(t: "SSHTransport", cfg: ClusterConfig, plan: Plan, timeout: float,
                 connected: "Optional[Future[float]]" = None, twice_s: float = 0) -> NodeObs:
    node = next(n for n in cfg.nodes if n.name == t.node)
    obs = NodeObs(name=node.name, role=node.role, reachable=False)
    procs = [p for p in plan.processes() if p.node == node.name]
    try:
        took = connected.result() if connected is not None else _connect(t)
        obs.latency_ms = round(took * 1000, 1)
        r = t.run(node_script(cfg, procs, group_containers(plan, node.name), twice_s), timeout=timeout + twice_s)
    except SparkClusterError as exc:
        obs.error = exc.message
        return obs
    return parse_node_output(cfg, plan, obs.model_copy(update={"reachable": True}), r.stdout)


def _rc(lines: list[str]) -> tuple[int, str]:
    """A section's exit code (its `##rc N` line) and the rest of its output."""
    rc = next((int(x.split()[1]) for x in lines if x.startswith("##rc ")), 1)
    return rc, "\n".join(x for x in lines if not x.startswith("##rc "))


def parse_node_output(cfg: ClusterConfig, plan: Plan, obs: NodeObs, stdout: str) -> NodeObs:
    """What the node script printed, as the node's observation (pure: tested on stubbed nodes)."""
    node = obs.name
    procs = [p for p in plan.processes() if p.node == node]
    sec = _sections(stdout)
    actual = parse_sysctl(list(cfg.sysctl), "\n".join(sec.get("sysctl", [])))
    obs.sysctl = {k: {"expected": str(v), "actual": actual[k]} for k, v in cfg.sysctl.items()}
    mem = parse_meminfo("\n".join(sec.get("meminfo", [])))
    obs.mem_total_gib, obs.mem_available_gib = mem.total_gib, mem.available_gib
    obs.gpu = parse_gpu("\n".join(sec.get("gpu", []))).summary()
    wanted = {s.container.name: s.container for s in plan.steps if s.container is not None and s.node == node}
    found = parse_containers(node, *_rc(sec.get("containers", [])))
    if found.error is not None:
        obs.error = f"docker does not answer: {found.error}"
    for c in found.containers:
        spec = wanted.get(c.name)
        obs.containers.append(ContainerObs(**c.model_dump(), spec_current=spec is not None
                                           and spec.labels[f"{LABEL_PREFIX}.spec-hash"] == c.spec_hash))
    seen = {c.name for c in found.containers}
    for name, spec in wanted.items():
        if name not in seen:
            obs.containers.append(ContainerObs(node=node, name=name, component=spec.component, state="missing"))
    for i, p in enumerate(procs):
        rc, out = _rc(sec.get(f"process {i}", []))
        fact = parse_process(p.argv, rc, out)
        obs.processes.append(ProcessObs(name=p.name, container=p.container, component=p.component, state=fact.state,
                                        pid=fact.pid, detail=fact.detail))
    if "procs" in sec:
        obs._gpus, _ = parse_gpu_activity("\n".join(sec.get("gpu-activity", [])))
        obs.gpu_power_w = max((g.power_w for g in obs._gpus if g.power_w is not None), default=None)
        obs.gpu_memory_util = max((g.util_memory for g in obs._gpus if g.util_memory is not None), default=None)
        obs._procs = parse_processes("\n".join(sec["procs"]))
        if "procs-before" in sec:
            obs._procs_before = parse_processes("\n".join(sec["procs-before"]))
    return obs




def observe_ray(t: "SSHTransport", cfg: ClusterConfig, plan: Plan, timeout: float) -> RayObs:
    step = next((s for s in plan.steps if s.kind == "wait-ray"), None)
    if step is None:
        return RayObs()
    ray = read_ray_state(t, step.command, timeout)
    return RayObs(checked=True, alive=ray.alive, dead=ray.dead, gpus=ray.total("GPU"), nodes=ray.nodes,
                  placement_groups=ray.engine_placement_groups(), actors=len(ray.actors), error=ray.error)


def observe_vllm(cfg: ClusterConfig, window_s: float, timeout: float) -> VLLMObs:
    base = cfg.endpoint()
    obs = VLLMObs(endpoint=base)
    with httpx.Client(timeout=timeout, headers=cfg.engine_headers()) as http:
        try:
            t0 = time.monotonic()
            h = http.get(f"{base}/health")
            obs.health, obs.health_ms = h.status_code, round((time.monotonic() - t0) * 1000, 1)
        except httpx.HTTPError as exc:
            obs.error = f"/health: {type(exc).__name__}: {exc}"
            return obs
        try:
            first = parse_metrics(http.get(f"{base}/metrics").text)
            t1 = time.monotonic()
            models = http.get(f"{base}/v1/models")
            if models.status_code == 200:
                obs.models = [m["id"] for m in models.json().get("data", [])]
            elif models.status_code in (401, 403):
                obs.key_refused = models.status_code
            try:  # inside the sampling window: costs no time
                version = http.get(f"{base}/version")
                if version.status_code == 200 and version.json().get("version"):
                    obs.version, obs.version_source = str(version.json()["version"]), "server"
            except (httpx.HTTPError, ValueError, AttributeError):
                pass
            rest = window_s - (time.monotonic() - t1)
            if rest > 0:
                time.sleep(rest)
            second = parse_metrics(http.get(f"{base}/metrics").text)
            window = time.monotonic() - t1
        except (httpx.HTTPError, ValueError) as exc:
            obs.error = f"/metrics: {type(exc).__name__}: {exc}"
            return obs
    for key, value in second.items():
        setattr(obs, key, value)
    obs.window_s = round(window, 2)
    obs.progressed = progressed(counters(first), counters(second))
    if "steps_total" in first and "steps_total" in second:
        obs.steps_in_window = second["steps_total"] - first["steps_total"]
    if "generation_tokens_total" in first and "generation_tokens_total" in second:
        obs.generation_tok_s = round((second["generation_tokens_total"] - first["generation_tokens_total"]) / max(window, 1e-3), 2)
    return obs


def _progress_age(cfg: ClusterConfig, v: VLLMObs, now: float) -> Optional[float]:
    """Seconds since the counters last moved, remembered across status runs in state_dir."""
    if v.steps_total is None and v.generation_tokens_total is None:
        return None
    path = cfg.resolved_state_dir() / "progress.json"
    counters = [v.steps_total, v.generation_tokens_total, v.prompt_tokens_total]
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        prev = None
    if v.steps_in_window or v.generation_tok_s:
        last = now
    elif prev is not None and prev.get("counters") == counters:
        last = float(prev.get("last_change", now))
    else:  # no earlier record of these values: flat for at least the window
        last = now - (v.window_s or 0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"counters": counters, "last_change": last}))
    except OSError:
        pass
    return round(now - last, 1)


def read_watchdog_state(cfg: ClusterConfig) -> Optional[dict[str, Any]]:
    path = cfg.resolved_state_dir() / "watchdog.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def gpu_baselines(watchdog: Optional[dict[str, Any]]) -> dict[str, GpuBaseline]:
    """The GPUs' idle and busy power per node as the watchdog learned them (its state file)."""
    saved = watchdog.get("gpu_baseline") if isinstance(watchdog, dict) else None
    out = {}
    for node, b in (saved.items() if isinstance(saved, dict) else ()):
        if isinstance(b, dict):
            idle, busy = b.get("idle_w"), b.get("busy_w")
            out[node] = GpuBaseline(idle if isinstance(idle, (int, float)) else None, busy if isinstance(busy, (int, float)) else None)
    return out


def begin_vllm(cfg: ClusterConfig, window_s: float, probe_timeout_s: float) -> "Future[VLLMObs]":
    """Start sampling vLLM now (in a thread): the window then overlaps whatever comes next
    (imports, SSH connections). Pass the result to observe()/status() as `vllm`."""
    fut: "Future[VLLMObs]" = Future()
    fut.t0 = time.monotonic()  # type: ignore[attr-defined]

    def run() -> None:
        try:
            fut.set_result(observe_vllm(cfg, window_s, probe_timeout_s))
        except BaseException as exc:  # pragma: no cover - observe_vllm does not raise
            fut.set_exception(exc)

    threading.Thread(target=run, name="vllm-sampler", daemon=True).start()
    return fut


def _connect(t: "SSHTransport") -> float:
    """Connect (or reuse the connection); returns the seconds it took."""
    t0 = time.monotonic()
    t.connect()
    return time.monotonic() - t0


def observe(cfg: ClusterConfig, nodes: "Nodes", *, window_s: float = 1.0, probe_timeout_s: float = 5.0,
            vllm: "Optional[Future[VLLMObs]]" = None) -> Observation:
    t0 = getattr(vllm, "t0", None) or time.monotonic()
    head = nodes[cfg.head.name]
    with ThreadPoolExecutor(max_workers=len(cfg.nodes) + 2) as pool:
        # the sampling window starts first
        vllm_fut = vllm if vllm is not None else pool.submit(observe_vllm, cfg, window_s, probe_timeout_s)
        # SSH handshakes go on while the plan is built
        connected = {n.name: pool.submit(_connect, nodes[n.name]) for n in cfg.nodes}
        plan = build_plan(cfg, links=kept.links(cfg))
        node_futs = {n.name: pool.submit(observe_node, nodes[n.name], cfg, plan, probe_timeout_s, connected[n.name], window_s)
                     for n in cfg.nodes}

        def ray_after_connect() -> RayObs:
            # an unreachable head costs one connect timeout, not a second one here
            if connected[cfg.head.name].exception() is not None:
                return RayObs(checked=bool(plan.steps_in("wait-ray")), error="head unreachable")
            return observe_ray(head, cfg, plan, timeouts.RAY_STATUS_S)

        ray_fut = pool.submit(ray_after_connect)
        node_obs = [f.result() for f in node_futs.values()]
        ray_obs = ray_fut.result()
        vllm_obs = vllm_fut.result()
    watchdog = read_watchdog_state(cfg)
    baselines = gpu_baselines(watchdog)
    for n in node_obs:
        n.judge_ranks(group_containers(plan, n.name), None, baselines.get(n.name, GpuBaseline()))
    vllm_obs.progress_age_s = _progress_age(cfg, vllm_obs, time.time())
    if vllm_obs.version is None:

        seen = kept.last_check(cfg)
        if seen and seen.get("vllm_version"):
            vllm_obs.version, vllm_obs.version_source = str(seen["vllm_version"]), "preflight"
    return Observation(
        ts=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        cluster=cfg.name, executor=cfg.executor, plan_hash=plan.plan_hash,
        nodes=node_obs, ray=ray_obs, vllm=vllm_obs, watchdog=watchdog,
        took_s=round(time.monotonic() - t0, 3),
    )


# ---- the verdict: one pure function ------------------------------------------------------------


def members_gone(nodes: list[NodeObs]) -> list[str]:
    """Containers of the plan exited or missing, and hosted processes that have exited: definitively
    gone, the group needs a restart. The one rule of `status` (down) and the watchdog (member gone).
    A paused container is not gone (a frozen member: progress and the canary reveal it)."""
    gone = [f"{c.name} on {n.name} is {c.state}" for n in nodes if n.reachable for c in n.containers
            if c.state not in ("running", "paused")]
    gone += [f"{p.name} in {p.container} on {n.name} has exited ({p.detail})" for n in nodes if n.reachable
             for p in n.processes if p.state == "gone"]
    return gone


def ranks_of(nodes: list[NodeObs]) -> tuple[str, str]:
    """The group's activity from each node's (ranks.group_activity): the one rule of `status` (busy or
    stalled) and the watchdog (busy, or a wedge confirmed without a canary)."""
    return group_activity(tuple(NodeActivity(n.name, n.activity, n.activity_evidence,  # type: ignore[arg-type]
                                             "gpu" if n.gpu_power_w is not None else "cpu")
                                for n in nodes if n.activity is not None))


def ray_missing(ray: RayObs, expected_nodes: dict[str, str]) -> list[str]:
    """Nodes Ray does not list alive (only when Ray could be asked)."""
    if not ray.checked or ray.error is not None:
        return []
    return [name for name, ip in expected_nodes.items() if ip not in ray.alive]


def verdict(obs: Observation, *, served_model: str, expected_nodes: dict[str, str]) -> tuple[Verdict, str]:
    """Decide serving / degraded / stalled / down / starting from one observation.

    expected_nodes: node name -> cluster address, for Ray membership.
    """
    v = obs.vllm
    unreachable = [n.name for n in obs.nodes if not n.reachable]
    not_running = members_gone(obs.nodes)
    not_started = [f"{p.name} not started yet in {p.container} on {n.name}" for n in obs.nodes for p in n.processes
                   if p.state == "not-started"]
    frozen = [f"{c.name} on {n.name} is paused" for n in obs.nodes for c in n.containers if c.state == "paused"]
    missing_in_ray = ray_missing(obs.ray, expected_nodes)
    pending = (v.running or 0) + (v.waiting or 0)
    answering = v.health == 200

    if unreachable:
        return "down", f"node(s) unreachable: {', '.join(unreachable)}"
    no_docker = [f"{n.name}: {n.error}" for n in obs.nodes if n.reachable and n.error]
    if no_docker:
        return "down", "; ".join(no_docker)
    if not_running:
        return "down", "; ".join(not_running)
    if missing_in_ray:
        return "down", f"Ray does not see node(s) {', '.join(missing_in_ray)} alive"
    if not_started:
        return "starting", "; ".join(not_started)
    if not answering:
        if v.health is not None:
            return "down" if v.health >= 500 and v.health != 503 else "starting", f"/health answers {v.health}"
        return "starting", f"containers run, the API does not answer yet ({v.error or 'no answer'})"
    if v.key_refused:
        return "degraded", (f"vLLM answers {v.key_refused} to /v1/models: it demands an API key spark-cluster does not have "
                            f"or has wrong (configuration: {ENGINE_KEY_FIX})")
    if served_model not in v.models:
        return "starting", f"/v1/models does not list {served_model} yet"
    if frozen:
        return "stalled", "; ".join(frozen) + " (frozen: requests hang while /health answers)"
    if pending > 0 and v.progressed is False:
        age = v.progress_age_s if v.progress_age_s is not None else v.window_s
        stall = f"{pending:g} request(s) in flight or waiting and no engine step for {age:g}s"
        group, evidence = ranks_of(obs.nodes)
        if group == "busy":
            return "busy", f"{stall}: the current step has run {age:g}s, every rank working ({evidence})"
        if group == "wedged":
            return "stalled", f"{stall}, while /health answers 200: {evidence}"
        return "stalled", f"{stall}, while /health answers 200"
    problems = []
    for n in obs.nodes:
        bad = [f"{k}={s['actual']} (want {s['expected']})" for k, s in n.sysctl.items() if s["actual"] != s["expected"]]
        if bad:
            problems.append(f"{n.name}: {', '.join(bad)}")
        stale = [c.name for c in n.containers if c.spec_current is False]
        if stale:
            problems.append(f"{n.name}: {', '.join(stale)} from another config (run up)")
        if n.mem_total_gib and n.mem_available_gib is not None and n.mem_available_gib < 0.05 * n.mem_total_gib:
            problems.append(f"{n.name}: only {n.mem_available_gib:.1f} GiB memory available")
    if obs.ray.checked and obs.ray.error:
        problems.append(f"Ray not observed: {obs.ray.error}")
    if obs.watchdog and obs.watchdog.get("state") == "failed":
        problems.append(f"watchdog failed: {obs.watchdog.get('reason', '')}")
    if problems:
        return "degraded", "; ".join(problems)
    return "serving", ""


def status(cfg: ClusterConfig, nodes: "Nodes", *, window_s: float = 0.5, vllm: "Optional[Future[VLLMObs]]" = None) -> StatusReport:
    obs = observe(cfg, nodes, window_s=window_s, probe_timeout_s=cfg.health.probe_timeout_s, vllm=vllm)
    word, reason = verdict(obs, served_model=cfg.model.name, expected_nodes={n.name: n.address for n in cfg.nodes})
    return StatusReport(verdict=word, reason=reason, observation=obs)
