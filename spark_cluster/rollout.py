"""A rolling change, the controller's part of it (`up`'s part, which sends the change, is
spark_cluster.controller_client): `up` with a changed cluster.yaml while the controller serves. One group at a
time, and only the groups `up` would recreate: the gateway stops sending the group new requests
(they go to the other groups; with one group they wait at the door), its requests in flight finish
(up to gateway.drain_s; streams still open then end with the gateway's error event), its watchdog
stops, `up` recreates it and proves it ready with a real completion, a watchdog of the new config
takes over and the group takes requests again; then the next group. A group that fails stops the
change: the groups after it keep what they run.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional, Protocol

from .config import ClusterConfig
from .door import OPEN, Door
from .errors import SparkClusterError
from .executor import Executor
from .transport import Nodes

Report = Callable[[dict[str, Any]], None]
LIVE_SETTINGS = ("gateway", "controller", "api", "notify", "slow")  # read when the controller starts: a change waits for its restart


class Fleet(Protocol):
    """What a rolling change needs of the controller: each group's config, its watchdog stopped and
    started again, and its share of the gateway drained and opened again."""

    drain_s: float

    def current(self, label: str) -> ClusterConfig: ...
    async def stop_watch(self, label: str) -> None: ...
    def start_watch(self, label: str, group: ClusterConfig, nodes: Nodes) -> None: ...
    def drain(self, label: str, reason: str) -> int: ...
    async def drained(self, label: str, timeout_s: float) -> int: ...
    async def undrain(self, label: str, door: Door, url: str) -> None: ...


def refusal(old: ClusterConfig, new: ClusterConfig) -> Optional[str]:
    """Why a change cannot roll through the running groups (None: it can). Pure."""
    if new.name != old.name:
        return f"the config is of cluster {new.name!r}; this controller serves {old.name!r}"
    before = {label: [n.name for n in g.nodes] for label, g in old.group_configs()}
    after = {label: [n.name for n in g.nodes] for label, g in new.group_configs()}
    if before != after:
        return (f"the groups changed ({before} -> {after}): a rolling change keeps them; run `down`, then `up` "
                "(or restart the controller)")
    return None


def needs_restart(old: ClusterConfig, new: ClusterConfig) -> list[str]:
    """The changed settings the controller reads only when it starts. Pure."""
    return [key for key in LIVE_SETTINGS if getattr(old, key) != getattr(new, key)]


async def roll_out(fleet: Fleet, new: ClusterConfig, report: Report) -> bool:
    """Each group of `new` in turn; True when every group serves the new config."""
    for label, group in new.group_configs():
        report({"event": "roll-group", "group": label})
        ok = await _roll_group(fleet, label, group, report)
        if not ok:
            return False
    return True


async def _roll_group(fleet: Fleet, label: str, group: ClusterConfig, report: Report) -> bool:
    nodes = Nodes(group)
    executor = Executor(group, nodes, report)
    try:
        todo = await asyncio.to_thread(executor.pending)
    except SparkClusterError as exc:
        nodes.close()
        report({"event": "roll-failed", "group": label, "error": str(exc)})
        return False
    if not todo.changed:
        if group == fleet.current(label):
            nodes.close()
        else:  # the watchdog's settings, say: its watchdog takes the new config, the containers stay
            await fleet.stop_watch(label)
            fleet.start_watch(label, group, nodes)
        report({"event": "roll-skip", "group": label, "reason": "every member runs as the new config says"})
        return True
    in_flight = fleet.drain(label, f"a rolling change recreates group {label}: {todo.why}")
    report({"event": "roll-drain", "group": label, "why": todo.why, "in_flight": in_flight})
    cut = await fleet.drained(label, fleet.drain_s)
    report({"event": "roll-drained", "group": label, "cut": cut})
    await fleet.stop_watch(label)
    try:
        result = await asyncio.to_thread(executor.up)
    except Exception as exc:  # noqa: BLE001 - a node's doing or a bug: either way the group gets its watchdog back
        report({"event": "roll-failed", "group": label, "error": str(exc) if isinstance(exc, SparkClusterError) else
                f"{type(exc).__name__}: {exc}"})
        fleet.start_watch(label, group, nodes)  # the new config's watchdog takes the group from here
        await fleet.undrain(label, Door("hold", f"the rolling change failed on group {label}", public="a rolling change failed"),
                            group.endpoint())
        return False
    from .watchdog import reset_breaker

    reset_breaker(group, "a rolling change", recreated=True)
    fleet.start_watch(label, group, nodes)
    await fleet.undrain(label, OPEN, group.endpoint())  # up ended with a real completion: it serves
    report({"event": "roll-done", "group": label, "seconds": result.total_s, "recreated": result.recreated})
    return True
