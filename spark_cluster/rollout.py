"""A rolling change: `up` with a changed cluster.yaml while the controller serves. One group at a
time, and only the groups `up` would recreate: the gateway stops sending the group new requests
(they go to the other groups; with one group they wait at the door), its requests in flight finish
(up to gateway.drain_s; streams still open then end with the gateway's error event), its watchdog
stops, `up` recreates it and proves it ready with a real completion, a watchdog of the new config
takes over and the group takes requests again; then the next group. A group that fails stops the
change: the groups after it keep what they run.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import timeouts
from .config import ClusterConfig
from .door import OPEN, Door
from .errors import RolloutFailed, SparkClusterError
from .executor import Executor
from .transport import Nodes

if TYPE_CHECKING:
    from .controller import Controller

Report = Callable[[dict[str, Any]], None]
LIVE_SETTINGS = ("gateway", "controller", "api")  # read when the controller starts: a change waits for its restart


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


async def roll_out(ctl: "Controller", new: ClusterConfig, report: Report) -> bool:
    """Each group of `new` in turn; True when every group serves the new config."""
    async with ctl.rolling:
        for label, group in new.group_configs():
            report({"event": "roll-group", "group": label})
            ok = await _roll_group(ctl, label, group, report)
            if not ok:
                return False
        ctl.cfg = new
        return True


async def _roll_group(ctl: "Controller", label: str, group: ClusterConfig, report: Report) -> bool:
    nodes = Nodes(group)
    executor = Executor(group, nodes, report)
    try:
        todo = await asyncio.to_thread(executor.pending)
    except SparkClusterError as exc:
        nodes.close()
        report({"event": "roll-failed", "group": label, "error": str(exc)})
        return False
    if not todo.changed:
        if group == ctl.groups[label]:
            nodes.close()
        else:  # the watchdog's settings, say: its watchdog takes the new config, the containers stay
            await ctl.stop_watch(label)
            ctl.start_watch(label, group, nodes)
        report({"event": "roll-skip", "group": label, "reason": "every member runs as the new config says"})
        return True
    gateway = ctl.gateway
    assert gateway is not None
    gateway.drain(label, f"a rolling change recreates group {label}: {todo.why}")
    report({"event": "roll-drain", "group": label, "why": todo.why, "in_flight": len(gateway.members[label].flights)})
    cut = await gateway.drained(label, ctl.cfg.gateway.drain_s)
    report({"event": "roll-drained", "group": label, "cut": cut})
    await ctl.stop_watch(label)
    try:
        result = await asyncio.to_thread(executor.up)
    except Exception as exc:  # noqa: BLE001 - a node's doing or a bug: either way the group gets its watchdog back
        report({"event": "roll-failed", "group": label, "error": str(exc) if isinstance(exc, SparkClusterError) else
                f"{type(exc).__name__}: {exc}"})
        ctl.start_watch(label, group, nodes)  # the new config's watchdog takes the group from here
        await gateway.undrain(label, Door("hold", f"the rolling change failed on group {label}", public="a rolling change failed"), group.endpoint())
        return False
    from .watchdog import reset_breaker

    reset_breaker(group, "a rolling change", recreated=True)
    ctl.start_watch(label, group, nodes)
    await gateway.undrain(label, OPEN, group.endpoint())  # up ended with a real completion: it serves
    report({"event": "roll-done", "group": label, "seconds": result.total_s, "recreated": result.recreated})
    return True


def through_controller(cfg: ClusterConfig, text: str, report: Report) -> Optional[bool]:
    """`up` while this cluster's controller serves: the change sent to it (POST /api/rollout) and its
    events reported as they come. None when no controller of this cluster answers."""
    import httpx

    from .controller import load_token

    url = cfg.controller_url()
    try:
        seen = httpx.get(f"{url}/healthz", timeout=timeouts.CONTROLLER_PROBE_S)
        if seen.json().get("cluster") != cfg.name:
            return None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    headers = {"Authorization": f"Bearer {load_token(cfg)}", "Content-Type": "application/yaml"}
    try:
        with httpx.stream("POST", f"{url}/api/rollout", content=text.encode(), headers=headers,
                          timeout=httpx.Timeout(timeouts.QUICK_S, read=None)) as r:
            if r.status_code != 200:
                r.read()
                raise RolloutFailed(f"the controller at {url} refuses the change: {_detail(r)}")
            for line in r.iter_lines():
                e = _event(line, url)
                if e is None:
                    continue
                if e.get("event") == "rollout-done":
                    return _done(e)
                report(e)
    except httpx.HTTPError as exc:
        raise RolloutFailed(f"the controller at {url} stopped answering during the change ({type(exc).__name__}); "
                            "its events say how far it went") from None
    raise RolloutFailed(f"the controller at {url} ended the change without saying how it went")


def _event(line: str, url: str) -> Optional[dict[str, Any]]:
    """One line of the controller's answer: an event; None for a blank line or JSON that is no event."""
    if not line.strip():
        return None
    try:
        e = json.loads(line)
    except ValueError:
        raise RolloutFailed(f"the controller at {url} sent a line that is not an event during the change; "
                            "its events say how far it went") from None
    return e if isinstance(e, dict) else None


def _detail(r: Any) -> str:
    try:
        return str(r.json().get("detail"))
    except ValueError:
        return f"HTTP {r.status_code}"


def _done(e: dict[str, Any]) -> bool:
    if not e.get("ok"):
        raise RolloutFailed("the rolling change stopped at a group that did not come back with the new config "
                            "(its events above say why); the groups after it keep what they run")
    return True
