"""The watchdog's kinds of restart, each a room of its own: the full restart, the whole group killed
in order and started again with the same code as `up` (executor.down then executor.up); and the
kept restart, only the engine killed and started again in the containers that still run (which
restart a hang gets: restart_choice). Both timed by part.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import httpx

from . import timeouts
from .config import ClusterConfig
from .container_logs import save_logs
from .errors import SparkClusterError
from .executor import Executor
from .observe import read_ray_state
from .transport import Nodes

Event = Callable[..., None]


class Restart(Protocol):
    def run(self, bundle: Path) -> tuple[Optional[str], dict[str, float]]:
        """Carry the restart out (the containers' logs saved into the incident bundle first): the
        error that stopped it (None: it serves again), and the seconds of each part."""
        ...


def reporting_executor(cfg: ClusterConfig, nodes: Nodes, http: Optional[httpx.Client], event: Event) -> Executor:
    """The executor a restart runs, each of its steps an `executor` event of the watchdog."""
    def report(e: dict[str, Any]) -> None:
        event("executor", step_event=e.get("event"), **{k: v for k, v in e.items() if k not in ("ts", "event")})

    return Executor(cfg, nodes, report=report, http=http, restart=True)


class FullRestart:
    """The kill (vLLM, the head, the workers; their logs into the bundle), then `up`'s parts (executor.phases)."""

    def __init__(self, cfg: ClusterConfig, nodes: Nodes, http: Optional[httpx.Client], event: Event):
        self.cfg, self.nodes, self.http, self.event = cfg, nodes, http, event

    def run(self, bundle: Path) -> tuple[Optional[str], dict[str, float]]:
        phases: dict[str, float] = {}
        ex = reporting_executor(self.cfg, self.nodes, self.http, self.event)
        error = None
        try:
            t = time.monotonic()
            try:
                ex.down(graceful=False, logs_to=bundle / "logs", restore=False)
            finally:
                phases["kill"] = round(time.monotonic() - t, 2)
            ex.up()
        except SparkClusterError as exc:
            error = str(exc)
        phases.update(ex.phases)
        return error, phases


class KeptRestart:
    """Only the engine: each container's log so far into the bundle (the containers stay), what is
    left of the engine killed in the head container (the plan's clear step: the API server, its
    EngineCore), Ray waited for until it has released the engine's ranks (its placement group
    removed, within timeouts.RAY_RELEASE_S), then `up`, which starts vLLM alone in the kept head
    container. When a part fails: the full restart, the reason in a `restart-fallback` event."""

    def __init__(self, cfg: ClusterConfig, nodes: Nodes, http: Optional[httpx.Client], event: Event, full: FullRestart):
        self.cfg, self.nodes, self.http, self.event, self.full = cfg, nodes, http, event, full

    def run(self, bundle: Path) -> tuple[Optional[str], dict[str, float]]:
        phases: dict[str, float] = {}
        ex = reporting_executor(self.cfg, self.nodes, self.http, self.event)
        try:
            self._timed(phases, "logs", lambda: self._save_logs(ex, bundle / "logs"))
            self._timed(phases, "kill", lambda: self._kill(ex))
            self._timed(phases, "ray-release", lambda: self._released(ex))
            ex.up()
            phases.update(ex.phases)
            return None, phases
        except SparkClusterError as exc:
            phases.update(ex.phases)
            self.event("restart-fallback", why=f"the kept restart failed: {exc.message}", to="full")
            error, more = self.full.run(bundle)
            return error, {**phases, **{f"full/{k}": v for k, v in more.items()}}

    @staticmethod
    def _timed(phases: dict[str, float], name: str, part: Callable[[], None]) -> None:
        t = time.monotonic()
        try:
            part()
        finally:
            phases[name] = round(time.monotonic() - t, 2)

    def _save_logs(self, ex: Executor, folder: Path) -> None:
        for c in ex.plan.containers():
            save_logs(self.nodes[c.node], c.name, folder, ex.secrets)

    def _kill(self, ex: Executor) -> None:
        [step] = ex.plan.steps_in("clear")
        r = self.nodes[step.node].run(step.command, timeout=step.timeout_s)
        if not r.ok:
            raise SparkClusterError(f"what is left of the engine did not go: {r.stdout.strip() or r.exit_code}")

    def _released(self, ex: Executor) -> None:
        step = next(s for s in ex.plan.steps if s.kind == "wait-ray")
        deadline = time.monotonic() + timeouts.RAY_RELEASE_S
        while True:
            ray = read_ray_state(self.nodes[step.node], step.command, step.timeout_s)
            if ray.error is None and not ray.engine_placement_groups():
                return
            if time.monotonic() > deadline:
                held = ray.error or ", ".join(pg.id for pg in ray.engine_placement_groups())
                raise SparkClusterError(f"Ray did not release the engine's ranks in {timeouts.RAY_RELEASE_S} s ({held})")
            time.sleep(self.cfg.health.poll_interval_s)
