"""`spark-cluster status`: one observation of every node, Ray and vLLM (spark_cluster.observe),
then one verdict (spark_cluster.judge.verdict, a pure function tested on recorded data)."""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import BaseModel, Field

from . import kept
from .cache_seal import cache_line
from .config import ClusterConfig
from .groups import for_each_group, overall_verdict
from .judge import Verdict, verdict
from .masking import mask_data
from .observation import Observation, VLLMObs
from .observe import observe
from .plan import build_plan
from .restart_choice import choose_restart
from .errors import SparkClusterError
from .state_dir import EVENTS_FILE, read_private, rotated

if TYPE_CHECKING:
    from .transport import Nodes


class StatusReport(BaseModel):
    verdict: Verdict
    reason: str
    observation: Observation
    restart: Literal["kept", "full", ""] = Field("", description="The restart a hang would get now (restart_choice).")
    restart_why: str = ""
    kv: str = Field("", description="The most KV cache an engine of these flags got (kv.json), or of earlier flags.")
    caches: list[str] = Field(default_factory=list, description="Each node's cache folder as its last check or seal found it (caches.json).")
    slow: str = Field("", description="The controller's slow verdict while it holds (its last `slow` event, when no `slow-over` came "
                                      "after it): since when, and why (spark_cluster.speed).")


def status(cfg: ClusterConfig, nodes: "Nodes", *, window_s: float = 0.5, vllm: "Optional[Future[VLLMObs]]" = None) -> StatusReport:
    plan = build_plan(cfg, links=kept.links(cfg, repair=False), kv=kept.kv_capacity(cfg, repair=False))
    obs = observe(cfg, nodes, plan, window_s=window_s, probe_timeout_s=cfg.health.probe_timeout_s, vllm=vllm)
    addresses = {n.name: n.address for n in cfg.nodes}
    word, reason = verdict(obs, served_model=cfg.model.name, expected_nodes=addresses)
    choice = choose_restart(cfg.watchdog.restart, cfg.executor, obs.nodes, obs.ray, addresses)
    report = StatusReport(verdict=word, reason=reason, observation=obs, restart=choice.kind, restart_why=choice.why, kv=kv_line(cfg, plan),
                          caches=cache_lines(cfg), slow=slow_line(event_lines(cfg.resolved_state_dir() / EVENTS_FILE)))
    values = cfg.secret_values()  # a node's or the engine's error text may quote a command line
    return StatusReport.model_validate(mask_data(report.model_dump(), values)) if values else report


def event_lines(path: Path) -> list[bytes]:
    """The lines of events.jsonl and of its older half (events.jsonl.1, state_dir's rotation), oldest first, that may be
    a slow verdict's (the substring first: the file holds up to 16 MB); none when they cannot be read (status goes on)."""
    lines: list[bytes] = []
    for one in (rotated(path), path):
        try:
            lines += [line for line in read_private(one).splitlines() if b'"slow' in line]
        except (OSError, SparkClusterError):
            pass  # none yet, or a file not the user's own (what reads state files says so)
    return lines


def slow_line(lines: list[bytes]) -> str:
    """'since <ts>: <reason>' when the last slow verdict among these events.jsonl lines is `slow`, else ''. Pure."""
    for line in reversed(lines):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("event") in ("slow", "slow-over"):
            return f"since {e.get('ts', '?')}: {e.get('reason', '')}" if e["event"] == "slow" else ""
    return ""


def kv_line(cfg: ClusterConfig, plan) -> str:
    kv = kept.kv_capacity(cfg, repair=False)
    if kv is None:
        return ""
    got = f"{kv.tokens:,} tokens ({kv.device}" + (f", {kv.gib:g} GiB" if kv.gib is not None else "") + ")"
    if kv.flags_hash != plan.flags_hash:
        return f"{got} for earlier flags ({kv.at})"
    return f"{got}: the most an engine of these flags got ({kv.at})"


def cache_lines(cfg: ClusterConfig) -> list[str]:
    """Each node's cache (warm, cold, unsealed; its size; what was set aside) as the last start found it."""
    if not cfg.cache.enabled:
        return []
    found = kept.caches(cfg, repair=False)
    return [cache_line(n.name, found[n.name]) if n.name in found else f"{n.name} not checked yet" for n in cfg.nodes]


class GroupsReport(BaseModel):
    """`status` of a cluster of several groups: each group's report and the overall verdict."""

    verdict: Verdict
    reason: str
    groups: dict[str, StatusReport]


def groups_status(cfg: ClusterConfig, nodes: "dict[str, Nodes]", *, window_s: float = 0.5,
                  vllm: "Optional[dict[str, Future[VLLMObs]]]" = None) -> GroupsReport:
    """Every group observed at once (groups.for_each_group), then the overall verdict."""
    reports = for_each_group(cfg, lambda label, group: status(group, nodes[label], window_s=window_s,
                                                              vllm=(vllm or {}).get(label)))
    word, reason = overall_verdict({label: r.verdict for label, r in reports.items()})
    return GroupsReport(verdict=word, reason=reason, groups=reports)
