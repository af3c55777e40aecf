"""What an observation means: pure rules over spark_cluster.observation's data, no I/O.

One rule per question, shared by `status`, the watchdog and `up`: which members are gone
(members_gone: the group needs a restart), which nodes Ray lacks, what the ranks are doing, and
the status verdict. Table-tested on recorded and constructed observations (tests/test_verdict.py).
Readiness is judged like every other check, by spark_cluster.checks.evaluate.
"""

from __future__ import annotations

from typing import Literal, Optional

from .decide import Sample
from .errors import ENGINE_KEY_FIX
from .observation import NodeObs, Observation, RayObs, VLLMObs
from .ranks import NodeActivity, group_activity

Verdict = Literal["serving", "degraded", "busy", "stalled", "down", "starting"]


def key_refused(status: Optional[int]) -> bool:
    """The engine refused the API key spark-cluster sent (or sent none): a configuration error, never a hang."""
    return status in (401, 403)


def container_gone(name: str, node: str, state: str) -> Optional[str]:
    """A member container that has ended or is missing: definitively gone. A paused one is not (a
    frozen member: progress and the canary reveal it)."""
    return None if state in ("running", "paused") else f"{name} on {node} is {state}"


def process_gone(name: str, container: str, node: str, state: str, detail: str) -> Optional[str]:
    """A hosted process (vLLM in the Ray head) that has exited; not yet started is not gone."""
    return f"{name} in {container} on {node} has exited ({detail})" if state == "gone" else None


def members_gone(nodes: list[NodeObs]) -> list[str]:
    """Containers of the plan exited or missing, and hosted processes that have exited, on the
    nodes that answered: the group needs a restart. The rule of `status` (down), the watchdog
    (member gone) and `up`'s waits (fail fast)."""
    gone = [container_gone(c.name, n.name, c.state) for n in nodes if n.reachable for c in n.containers]
    gone += [process_gone(p.name, p.container, n.name, p.state, p.detail) for n in nodes if n.reachable for p in n.processes]
    return [g for g in gone if g]


def ranks_of(nodes: list[NodeObs]) -> tuple[str, str]:
    """The group's activity from each node's (ranks.group_activity): `status` (busy or stalled) and
    the watchdog (busy, or a wedge confirmed without a canary)."""
    return group_activity(tuple(NodeActivity(n.name, n.activity, n.activity_evidence,  # type: ignore[arg-type]
                                             "gpu" if n.gpu_power_w is not None else "cpu")
                                for n in nodes if n.activity is not None))


def ray_missing(ray: RayObs, expected_nodes: dict[str, str]) -> list[str]:
    """Nodes Ray does not list alive (only when Ray could be asked). expected_nodes: name -> address."""
    if not ray.checked or ray.error is not None:
        return []
    return [name for name, ip in expected_nodes.items() if ip not in ray.alive]


def sample_of(nodes: list[NodeObs], ray: RayObs, vllm: VLLMObs, expected_nodes: dict[str, str], t: float,
              canary: Optional[tuple[Optional[bool], float, Optional[int]]] = None, gateway_in_flight: int = 0) -> Sample:
    """What the watchdog's decision needs from one observation: the same rules as `status`
    (members_gone, ray_missing, ranks_of) over the same facts. canary: (ok, seconds, refused status)."""
    ranks = ranks_of(nodes)
    gone = members_gone(nodes) + [f"Ray lists node {name} ({expected_nodes[name]}) {'dead' if expected_nodes[name] in ray.dead else 'missing'}"
                                  for name in ray_missing(ray, expected_nodes)]
    return Sample(
        t=t, health=vllm.health, steps_total=vllm.steps_total, generation_tokens_total=vllm.generation_tokens_total,
        prompt_tokens_total=vllm.prompt_tokens_total, running=vllm.running or 0, waiting=vllm.waiting or 0,
        kv_cache_usage=vllm.kv_cache_usage, itl_sum=vllm.itl_sum, itl_count=vllm.itl_count,
        gateway_in_flight=gateway_in_flight, gone=tuple(gone), unreachable=tuple(n.name for n in nodes if not n.reachable),
        canary_ok=canary[0] if canary else None, canary_s=canary[1] if canary else None,
        canary_refused=canary[2] if canary else None, ranks=ranks[0], rank_evidence=ranks[1],
    )


# ---- the status verdict ----------------------------------------------------------------------


def verdict(obs: Observation, *, served_model: str, expected_nodes: dict[str, str]) -> tuple[Verdict, str]:
    """serving / degraded / busy / stalled / down / starting, and why, from one observation.
    expected_nodes: node name -> cluster address, for Ray membership."""
    return (_members(obs, expected_nodes) or _engine(obs.vllm, served_model) or _progress(obs)
            or (("degraded", "; ".join(problems)) if (problems := _problems(obs)) else ("serving", "")))


def _members(obs: Observation, expected_nodes: dict[str, str]) -> Optional[tuple[Verdict, str]]:
    """down: a node, docker, a member or Ray's membership missing; starting: a process not started yet."""
    unreachable = [n.name for n in obs.nodes if not n.reachable]
    if unreachable:
        return "down", f"node(s) unreachable: {', '.join(unreachable)}"
    no_docker = [f"{n.name}: {n.error}" for n in obs.nodes if n.reachable and n.error]
    if no_docker:
        return "down", "; ".join(no_docker)
    gone = members_gone(obs.nodes)
    if gone:
        return "down", "; ".join(gone)
    missing_in_ray = ray_missing(obs.ray, expected_nodes)
    if missing_in_ray:
        return "down", f"Ray does not see node(s) {', '.join(missing_in_ray)} alive"
    not_started = [f"{p.name} not started yet in {p.container} on {n.name}" for n in obs.nodes for p in n.processes
                   if p.state == "not-started"]
    if not_started:
        return "starting", "; ".join(not_started)
    return None


def _engine(v: VLLMObs, served_model: str) -> Optional[tuple[Verdict, str]]:
    """The API: not answering yet, refusing spark-cluster's key, not serving the model yet."""
    if v.health != 200:
        if v.health is not None:
            return "down" if v.health >= 500 and v.health != 503 else "starting", f"/health answers {v.health}"
        return "starting", f"containers run, the API does not answer yet ({v.error or 'no answer'})"
    if v.key_refused:
        return "degraded", (f"vLLM answers {v.key_refused} to /v1/models: it demands an API key spark-cluster does not have "
                            f"or has wrong (configuration: {ENGINE_KEY_FIX})")
    if served_model not in v.models:
        return "starting", f"/v1/models does not list {served_model} yet"
    return None


def _progress(obs: Observation) -> Optional[tuple[Verdict, str]]:
    """stalled: a frozen member, or work waiting and no step (unless every rank is working: busy)."""
    frozen = [f"{c.name} on {n.name} is paused" for n in obs.nodes for c in n.containers if c.state == "paused"]
    if frozen:
        return "stalled", "; ".join(frozen) + " (frozen: requests hang while /health answers)"
    v = obs.vllm
    pending = (v.running or 0) + (v.waiting or 0)
    if not (pending > 0 and v.progressed is False):
        return None
    age = v.progress_age_s if v.progress_age_s is not None else v.window_s
    stall = f"{pending:g} request(s) in flight or waiting and no engine step for {age:g}s"
    group, evidence = ranks_of(obs.nodes)
    if group == "busy":
        return "busy", f"{stall}: the current step has run {age:g}s, every rank working ({evidence})"
    if group == "wedged":
        return "stalled", f"{stall}, while /health answers 200: {evidence}"
    return "stalled", f"{stall}, while /health answers 200"


def _problems(obs: Observation) -> list[str]:
    """What makes a serving cluster degraded: sysctls, containers of another config, memory, Ray unread, the watchdog failed."""
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
        problems.append(f"watchdog failed: {obs.watchdog.get('last_reason', '')}")
    return problems
