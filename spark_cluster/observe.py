"""Every read of a cluster: one module for what is asked of the nodes and of the engine.

Nodes: one script per node (node_script: sysctls, memory, GPUs, the cluster's containers, the
hosted processes, the ranks' CPU and GPU activity), the cluster's containers, a hosted process,
a container's log, Ray's state on the head. The engine: every HTTP question asked of vLLM
(Engine: /health, /metrics, /v1/models, /version, the canary, readiness). `status`, the watchdog
and `up` all read through here; what the readings mean is spark_cluster.judge's (pure).

Observing never raises for what a node or the engine does: each read has its own timeout and
returns what it saw, or the error, as data (spark_cluster.observation).
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Optional, Sequence

import httpx

from . import kept, lifecycle, timeouts
from .box_checks import heat_summary
from .box_facts import HEAT_COMMAND, parse_heat
from .config import ClusterConfig
from .errors import CommandFailed, SparkClusterError
from .facts import (
    GPU_COMMAND,
    LABEL_PREFIX,
    MEMINFO_COMMAND,
    ContainerFact,
    ProcessFact,
    RayState,
    containers_command,
    counters,
    marked_sections,
    parse_containers,
    parse_gpu,
    parse_meminfo,
    parse_metrics,
    parse_process,
    parse_ray_state,
    parse_sysctl,
    process_command,
    progressed,
    sysctl_command,
)
from .judge import key_refused
from .masking import mask
from .observation import ContainerObs, NodeObs, Observation, ProcessObs, RayObs, VLLMObs
from .ranks import GPU_ACTIVITY_COMMAND, GpuBaseline, parse_gpu_activity, parse_processes, processes_command
from .steps import HttpRequest, Plan, ProcessSpec
from .watch_state import WatchdogFile, gpu_baselines, read_watchdog_state

if TYPE_CHECKING:  # paramiko is imported by whoever makes the Nodes, while vLLM is being sampled
    from .transport import Nodes, SSHTransport


# ---- the nodes ---------------------------------------------------------------------------------

def node_script(cfg: ClusterConfig, procs: list, containers: list[str] = (), twice_s: float = 0) -> str:
    """One command per node for everything status and the watchdog read there, in sections; each
    hosted process: its fact command, then its exit code on a line of its own. containers: the
    group's containers on the node, whose processes are read (twice, twice_s apart, when given:
    status has no earlier reading to compare with)."""
    parts = [("sysctl", sysctl_command(list(cfg.sysctl))), ("meminfo", MEMINFO_COMMAND), ("gpu", GPU_COMMAND), ("heat", HEAT_COMMAND),
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
    obs.gpu_heat = heat_summary(parse_heat("\n".join(sec.get("heat", []))), cfg.gpu.max_clock_mhz)
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


def read_ray_state(t: "SSHTransport", command: str, timeout: float) -> RayState:
    """Run the Ray state command (the plan's wait-ray step) on the head and parse it; a node that
    does not answer becomes the fact's error."""
    try:
        r = t.run(command, timeout=timeout)
    except SparkClusterError as exc:
        return RayState(error=exc.message)
    return parse_ray_state(r.stdout, r.stderr)


def list_containers(t: "SSHTransport", cluster: str, timeout: float = timeouts.QUICK_S) -> list[ContainerFact]:
    """The cluster's containers on the node; raises when docker cannot be asked."""
    r = t.run(containers_command(cluster), timeout=timeout)
    fact = parse_containers(t.node, r.exit_code, r.stdout, r.stderr)
    if fact.error is not None:
        raise CommandFailed(r, "listing cluster containers")
    return fact.containers


def read_process(t: "SSHTransport", p: ProcessSpec) -> ProcessFact:
    """A process hosted in a container (vLLM in the Ray head): running, not started, gone."""
    r = t.run(process_command(p.container, p.pid_file), timeout=timeouts.QUICK_S)
    return parse_process(p.argv, r.exit_code, r.stdout, r.stderr)


def tail_logs(t: "SSHTransport", name: str, secrets: Sequence[str], lines: int = 20) -> str:
    """A container's last log lines, secrets masked (or why they could not be read)."""
    try:
        r = t.run(lifecycle.tail_command(name, lines), timeout=timeouts.QUICK_S)
        return mask(r.stdout.strip(), secrets) or "(no output)"
    except SparkClusterError as exc:
        return f"(could not read logs: {exc})"


def answers(t: "SSHTransport", timeout: float) -> bool:
    """Whether the node runs a command again (a member the watchdog waits for)."""
    try:
        return t.run("true", timeout=timeout).ok
    except SparkClusterError:
        return False


def host_snapshot(t: "SSHTransport") -> str:
    """Every container, memory and load on a node as a person reads them (an incident bundle's)."""
    try:
        r = t.run("docker ps -a; echo; free -m; echo; uptime", timeout=timeouts.INCIDENT_S)
        return r.stdout + r.stderr
    except SparkClusterError as exc:
        return f"unavailable: {exc}\n"


def observe_nodes(cfg: ClusterConfig, nodes: "Nodes", plan: Plan, timeout: float, *, twice_s: float = 0,
                  connected: "Optional[dict[str, Future[float]]]" = None) -> list[NodeObs]:
    """Every node's script at once, in the config's node order."""
    with ThreadPoolExecutor(max_workers=len(cfg.nodes), thread_name_prefix="observe") as pool:
        futs = [pool.submit(observe_node, nodes[n.name], cfg, plan, timeout, (connected or {}).get(n.name), twice_s)
                for n in cfg.nodes]
        return [f.result() for f in futs]


# ---- the engine --------------------------------------------------------------------------------


def _model_ids(resp: httpx.Response) -> list[str]:
    try:
        data = resp.json().get("data", [])
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]
    except (ValueError, AttributeError, TypeError):
        return []


class Engine:
    """Every HTTP question asked of the vLLM API server, on one client (the engine's API key in its
    headers when it has one; tests give one on a fake transport). A client given is the caller's
    to close."""

    def __init__(self, cfg: ClusterConfig, http: Optional[httpx.Client] = None):
        self.base = cfg.endpoint()
        self.model = cfg.model.name
        self._own = http is None
        self.http = http if http is not None else httpx.Client(headers=cfg.engine_headers())
        self.last_metrics_text = ""  # for incident bundles

    def close(self) -> None:
        if self._own:
            self.http.close()

    def _metrics(self, timeout: float) -> dict[str, float]:
        self.last_metrics_text = self.http.get(f"{self.base}/metrics", timeout=timeout).text
        return parse_metrics(self.last_metrics_text)

    def sample(self, timeout: float, window_s: float = 0) -> VLLMObs:
        """/health, then /metrics. With a window (status, which has no earlier sample): also
        /v1/models and /version, and /metrics again window_s after the first (progress over it)."""
        obs = VLLMObs(endpoint=self.base)
        try:
            t0 = time.monotonic()
            obs.health = self.http.get(f"{self.base}/health", timeout=timeout).status_code
            obs.health_ms = round((time.monotonic() - t0) * 1000, 1)
        except httpx.HTTPError as exc:
            obs.error = f"/health: {type(exc).__name__}: {exc}"
            return obs
        try:
            first = self._metrics(timeout)
            if not window_s:
                return obs.model_copy(update=first)
            t1 = time.monotonic()
            self._models_and_version(obs, timeout)  # inside the sampling window: costs no time
            rest = window_s - (time.monotonic() - t1)
            if rest > 0:
                time.sleep(rest)
            second = self._metrics(timeout)
            window = time.monotonic() - t1
        except (httpx.HTTPError, ValueError) as exc:
            obs.error = f"/metrics: {type(exc).__name__}: {exc}"
            return obs
        obs = obs.model_copy(update=second)
        obs.window_s = round(window, 2)
        obs.progressed = progressed(counters(first), counters(second))
        if "steps_total" in first and "steps_total" in second:
            obs.steps_in_window = second["steps_total"] - first["steps_total"]
        if "generation_tokens_total" in first and "generation_tokens_total" in second:
            obs.generation_tok_s = round((second["generation_tokens_total"] - first["generation_tokens_total"]) / max(window, 1e-3), 2)
        return obs

    def _models_and_version(self, obs: VLLMObs, timeout: float) -> None:
        models = self.http.get(f"{self.base}/v1/models", timeout=timeout)
        if models.status_code == 200:
            obs.models = _model_ids(models)
        elif key_refused(models.status_code):
            obs.key_refused = models.status_code
        try:
            version = self.http.get(f"{self.base}/version", timeout=timeout)
            found = version.json().get("version") if version.status_code == 200 else None
            if found:
                obs.version, obs.version_source = str(found), "server"
        except (httpx.HTTPError, ValueError, AttributeError):
            pass

    def canary(self, timeout: float) -> tuple[Optional[bool], float, Optional[int]]:
        """A 1-token completion: (finished, seconds, None), or (None, seconds, 401/403) when the engine
        refused the API key (that says nothing about a hang)."""
        body = {"model": self.model, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
        t0 = time.monotonic()
        try:
            r = self.http.post(f"{self.base}/v1/completions", json=body, timeout=timeout)
            if key_refused(r.status_code):
                return None, round(time.monotonic() - t0, 3), r.status_code
            ok = r.status_code == 200 and bool(r.json().get("choices"))
        except (httpx.HTTPError, ValueError, AttributeError):
            ok = False
        return ok, round(time.monotonic() - t0, 3), None

    def answer(self, req: HttpRequest, timeout: float) -> tuple[Optional[int], str]:
        """A readiness request (the plan's): its status and body, or (None, why there is no answer)."""
        try:
            resp = self.http.request(req.method, req.url, json=req.json_body, timeout=timeout)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        return resp.status_code, resp.text


# ---- the whole cluster -------------------------------------------------------------------------

def progress_age(v: VLLMObs, watchdog: Optional[WatchdogFile], now: float) -> Optional[float]:
    """Seconds since the counters last moved: 0 when they moved in the window; else since the watchdog
    (which observes every period) last saw them move, when it saw these same values; else the window
    (at least that long). Pure: `status` writes nothing."""
    if v.steps_total is None and v.generation_tokens_total is None:
        return None
    if v.steps_in_window or v.generation_tok_s:
        return 0.0
    d = watchdog.decision if watchdog is not None else None
    counters = (v.steps_total, v.generation_tokens_total, v.prompt_tokens_total)
    if d is not None and d.last_progress is not None and d.last_counters is not None and tuple(d.last_counters) == counters:
        return round(max(now - d.last_progress, v.window_s or 0), 1)
    return v.window_s or 0.0


def sample_engine(cfg: ClusterConfig, window_s: float, timeout: float) -> VLLMObs:
    """One sample of the engine over a window, on a client of its own (status)."""
    engine = Engine(cfg)
    try:
        return engine.sample(timeout, window_s)
    finally:
        engine.close()


def begin_vllm(cfg: ClusterConfig, window_s: float, probe_timeout_s: float) -> "Future[VLLMObs]":
    """Start sampling vLLM now (in a thread): the window then overlaps whatever comes next
    (imports, SSH connections). Pass the result to observe()/status() as `vllm`."""
    fut: "Future[VLLMObs]" = Future()
    fut.t0 = time.monotonic()  # type: ignore[attr-defined]

    def run() -> None:
        try:
            fut.set_result(sample_engine(cfg, window_s, probe_timeout_s))
        except BaseException as exc:  # pragma: no cover - sampling does not raise
            fut.set_exception(exc)

    threading.Thread(target=run, name="vllm-sampler", daemon=True).start()
    return fut


def _connect(t: "SSHTransport") -> float:
    """Connect (or reuse the connection); returns the seconds it took."""
    t0 = time.monotonic()
    t.connect()
    return time.monotonic() - t0


def observe(cfg: ClusterConfig, nodes: "Nodes", plan: Plan, *, window_s: float = 1.0, probe_timeout_s: float = 5.0,
            vllm: "Optional[Future[VLLMObs]]" = None) -> Observation:
    """Every read of a cluster at once, `status`'s: reads only (what was kept in state_dir included,
    a file that cannot be read left as it is)."""
    t0 = getattr(vllm, "t0", None) or time.monotonic()
    head = nodes[cfg.head.name]
    with ThreadPoolExecutor(max_workers=len(cfg.nodes) + 2) as pool:
        # the sampling window starts first
        vllm_fut = vllm if vllm is not None else pool.submit(sample_engine, cfg, window_s, probe_timeout_s)
        connected = {n.name: pool.submit(_connect, nodes[n.name]) for n in cfg.nodes}

        def ray_after_connect() -> RayObs:
            # an unreachable head costs one connect timeout, not a second one here
            if connected[cfg.head.name].exception() is not None:
                return RayObs(checked=bool(plan.steps_in("wait-ray")), error="head unreachable")
            return observe_ray(head, cfg, plan, timeouts.RAY_STATUS_S)

        ray_fut = pool.submit(ray_after_connect)
        node_obs = observe_nodes(cfg, nodes, plan, probe_timeout_s, twice_s=window_s, connected=connected)
        ray_obs = ray_fut.result()
        vllm_obs = vllm_fut.result()
    watchdog = read_watchdog_state(cfg, repair=False)
    baselines = gpu_baselines(watchdog)
    for n in node_obs:
        n.judge_ranks(group_containers(plan, n.name), None, baselines.get(n.name, GpuBaseline()))
    vllm_obs.progress_age_s = progress_age(vllm_obs, watchdog, time.time())
    if vllm_obs.version is None:
        seen = kept.last_check(cfg, repair=False)
        if seen and seen.get("vllm_version"):
            vllm_obs.version, vllm_obs.version_source = str(seen["vllm_version"]), "preflight"
    return Observation(
        ts=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        cluster=cfg.name, executor=cfg.executor, plan_hash=plan.plan_hash,
        nodes=node_obs, ray=ray_obs, vllm=vllm_obs, watchdog=watchdog.model_dump(mode="json") if watchdog else None,
        took_s=round(time.monotonic() - t0, 3),
    )

