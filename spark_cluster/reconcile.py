"""What `up` must do to the group, as one pure function of the plan and what the nodes show.

The group restarts whole, in order: a vLLM rank 0 (or Ray head) restarted alone would leave the
workers' ranks (or raylets) orphaned. So: when every member runs as planned, keep them all; when
every container runs as planned and only a process hosted in one does not (vLLM in the Ray head:
its ranks are Ray's actors, which Ray ends with the engine that owned them, and `up` waits until Ray
has released them), start only that process, in its kept container; otherwise remove every member
found (and any cluster container the plan does not have) in stop order, and start every member in
plan order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .facts import LABEL_PREFIX, ContainerFact, ProcessFact
from .lifecycle import stop_rank
from .steps import Step

@dataclass(frozen=True)
class Reconciliation:
    why: str  # why members start (the whole group, or a process in its kept container); "" when every member runs as planned
    start: list[Step] = field(default_factory=list)  # in plan order
    remove: list[ContainerFact] = field(default_factory=list)  # in stop order
    kept: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.start or self.remove)


def member_name(s: Step) -> str:
    """How a container or hosted process of the group is named in results and events."""
    if s.process is not None:
        return f"{s.process.container}/{s.process.name}@{s.node}"
    return f"{s.container.name}@{s.node}"


def why_recreate(members: list[Step], found: dict[tuple[str, str], ContainerFact], processes: dict[str, ProcessFact]) -> str:
    """The first member that does not run as planned, said plainly; "" when all do."""
    for s in members:
        if s.container is not None:
            c = found.get((s.node, s.container.name))
            if c is None:
                return f"{s.container.name} on {s.node} missing"
            if not c.running:
                return f"{s.container.name} on {s.node} {c.state}"
            if c.spec_hash != s.container.labels[f"{LABEL_PREFIX}.spec-hash"]:
                return f"{s.container.name} on {s.node} changed"
        elif s.process is not None:
            fact = processes.get(member_name(s), ProcessFact(state="unknown", detail="not read"))
            if fact.state != "running":
                return f"{s.process.name} in {s.process.container} on {s.node} not running ({fact.detail})"
    return ""


def reconcile(members: list[Step], found: list[ContainerFact], processes: dict[str, ProcessFact]) -> Reconciliation:
    """members: the plan's start/exec steps (of the phases `up` runs), in plan order. found: the
    cluster's containers on every node. processes: the fact of each hosted process (by
    member_name) whose container runs."""
    by_key = {(c.node, c.name): c for c in found}
    wanted = {(s.node, s.container.name) for s in members if s.container is not None}
    stale = sorted((c for c in found if (c.node, c.name) not in wanted), key=lambda c: stop_rank(c.component))
    why = why_recreate([s for s in members if s.container is not None], by_key, processes)
    if why:
        ours = [by_key[k] for k in sorted(wanted) if k in by_key]
        return Reconciliation(why=why, start=list(members), remove=sorted(ours + stale, key=lambda c: stop_rank(c.component)))
    # every container runs as planned: the hosted processes that do not run start again in them
    stopped = [s for s in members if s.process is not None and why_recreate([s], by_key, processes)]
    return Reconciliation(why=why_recreate(stopped, by_key, processes), start=stopped, remove=stale,
                          kept=[member_name(s) for s in members if s not in stopped])
