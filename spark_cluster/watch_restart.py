"""The watchdog's kinds of restart, each a room of its own. Today one: the full restart, the whole
group killed in order and started again with the same code as `up` (executor.down then
executor.up), timed by part. (A restart that keeps what is still good, the containers and what
they cached, goes beside it.)"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import httpx

from .config import ClusterConfig
from .errors import SparkClusterError
from .executor import Executor
from .transport import Nodes

Event = Callable[..., None]


class Restart(Protocol):
    def run(self, bundle: Path) -> tuple[Optional[str], dict[str, float]]:
        """Carry the restart out (the containers' logs saved into the incident bundle first): the
        error that stopped it (None: it serves again), and the seconds of each part."""
        ...


class FullRestart:
    """The kill (vLLM, the head, the workers; their logs into the bundle), then `up`'s parts (executor.phases)."""

    def __init__(self, cfg: ClusterConfig, nodes: Nodes, http: Optional[httpx.Client], event: Event):
        self.cfg, self.nodes, self.http, self.event = cfg, nodes, http, event

    def run(self, bundle: Path) -> tuple[Optional[str], dict[str, float]]:
        phases: dict[str, float] = {}

        def report(e: dict[str, Any]) -> None:
            self.event("executor", step_event=e.get("event"), **{k: v for k, v in e.items() if k not in ("ts", "event")})

        ex = Executor(self.cfg, self.nodes, report=report, http=self.http)
        error = None
        try:
            t = time.monotonic()
            try:
                ex.down(graceful=False, logs_to=bundle / "logs")
            finally:
                phases["kill"] = round(time.monotonic() - t, 2)
            ex.up()
        except SparkClusterError as exc:
            error = str(exc)
        phases.update(ex.phases)
        return error, phases
