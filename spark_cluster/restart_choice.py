"""Which restart a wedged group gets: one pure function of what the watchdog last saw.

The kept restart stops only the engine (vLLM's processes, with its ranks as Ray tears the job
down) and starts `vllm serve` again in the head container, on the Ray cluster that still stands:
the containers, Ray, and whatever the containers hold (the page cache of the image and the model,
caches written inside them) are not paid for again. It is chosen only when everything but the
engine is seen sound; on any doubt the full restart runs (every container removed and created again,
as `up` does), and the choice says why. The native executor's containers are its ranks: nothing of
its group can be kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .observation import NodeObs, RayObs

KEPT_WHY = "every container runs as planned and Ray shows every node alive: only the engine restarts"


@dataclass(frozen=True)
class Choice:
    kind: Literal["kept", "full"]
    why: str


def full(why: str) -> Choice:
    return Choice("full", why)


def always_full(wanted: str, executor: str) -> Optional[str]:
    """Why every hang of this config gets the full restart (None: the kept one when all else is sound)."""
    if wanted == "full":
        return "watchdog.restart is full"
    if executor != "ray":
        return "the native executor's containers are its ranks: none can be kept"
    return None


def choose_restart(wanted: str, executor: str, nodes: list[NodeObs], ray: Optional[RayObs], addresses: dict[str, str]) -> Choice:
    """wanted: watchdog.restart ("auto" or "full"). nodes: the watchdog's last look at each node (its
    containers by the plan). ray: the last answer of its Ray probe. addresses: each node's cluster address."""
    why = always_full(wanted, executor)
    if why is not None:
        return full(why)
    for n in nodes:
        if not n.reachable:
            return full(f"{n.name} did not answer ({n.error or 'no reason given'})")
        for c in n.containers:
            if c.state != "running":
                return full(f"{c.name} on {n.name} is {c.state}")
            if c.spec_current is False:
                return full(f"{c.name} on {n.name} differs from cluster.yaml")
    if ray is None or not ray.checked:
        return full("Ray has not been asked yet")
    if ray.error:
        return full(f"Ray's view could not be read: {ray.error}")
    gone = [name for name, ip in addresses.items() if ip not in ray.alive]
    if gone:
        return full(f"Ray does not show {', '.join(gone)} alive")
    return Choice("kept", KEPT_WHY)
