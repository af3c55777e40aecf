"""What comes around an engine start that `up` makes (the Executor's steps before and after it):
before it, every node's memory back (Waits.memory) and its caches checked (cache_keep); once the
engine is ready, where its start went and the KV cache it got (engine_record), and the caches it
used sealed. Nothing of this when no engine starts."""

from __future__ import annotations

import datetime as _dt
from contextlib import AbstractContextManager
from typing import Callable

from .cache_keep import run_cache_steps
from .config import ClusterConfig
from .engine_record import record_engine_start
from .reconcile import Reconciliation
from .steps import ENGINE_COMPONENTS, Plan, Step
from .transport import Nodes
from .waits import Waits


def engine_starts(todo: Reconciliation) -> bool:
    """Whether what `up` starts includes an engine (vLLM's process, or a rank's container)."""
    return any(s.process is not None or (s.container is not None and s.container.component in ENGINE_COMPONENTS) for s in todo.start)


class EngineGate:
    def __init__(self, cfg: ClusterConfig, nodes: Nodes, plan: Plan, emit: Callable[..., None],
                 timed: Callable[[str], AbstractContextManager[None]], waits: Callable[[], Waits]):
        self.cfg, self.nodes, self.plan, self.emit, self.timed, self.waits = cfg, nodes, plan, emit, timed, waits

    def before(self, phase: str, steps: list[Step], todo: Reconciliation, *, accept_memory: bool = False) -> None:
        """Phase memory (the nodes' memory back) or cache (their caches checked), when an engine starts."""
        if not engine_starts(todo):
            for s in steps:
                self.emit("step-skip", s, reason="no engine starts")
            return
        with self.timed(phase):
            if phase == "memory":
                self.waits().memory(steps, accept=accept_memory)
            else:
                run_cache_steps(self.cfg, self.nodes, steps, self.emit)

    def ready(self, started: _dt.datetime, seal: list[Step]) -> dict[str, float]:
        """Once the engine started at `started` is ready: its start's parts (as phases), its caches sealed."""
        phases = record_engine_start(self.cfg, self.nodes, self.plan, started, self.emit)
        if seal:
            with self.timed("seal"):
                run_cache_steps(self.cfg, self.nodes, seal, self.emit)
        return phases
