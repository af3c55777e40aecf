"""`down`'s half of the executor, and the watchdog's kill: every cluster container stopped and removed
in stop order (vLLM, the head, then the workers; a wedged group SIGKILLed first), each one's log
saved first. A part of Executor (it runs on the executor's nodes, plan, events and lock)."""

from __future__ import annotations

import datetime as _dt
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Optional

from . import lifecycle, timeouts
from .config import ClusterConfig
from .container_logs import save_logs
from .errors import RemoveFailed, SparkClusterError
from .facts import ContainerFact
from .lifecycle import COMPONENT_ORDER, stop_rank
from .observe import list_containers
from .state_dir import private_dir
from .steps import Plan

if TYPE_CHECKING:
    from .transport import Nodes


class Teardown:
    cfg: ClusterConfig
    nodes: "Nodes"
    plan: Plan
    secrets: list[str]

    if TYPE_CHECKING:  # the executor's own, declared for the type checker only: no silent stand-in at run time
        def emit(self, event: str, step: Any = None, **data: Any) -> None: ...
        def connect_all(self) -> None: ...
        def locked(self, what: str) -> ContextManager[None]: ...

    def _remove(self, node: str, name: str, *, save_logs_to: Optional[Path], graceful: bool = True, component: str = "") -> None:
        """One container stopped and removed as lifecycle.remove_step shows it: a process hosted in it
        first (vLLM in the Ray head, while Ray still runs), its log saved, then the container."""
        t = self.nodes[node]
        stop = lifecycle.stop_timeout_s(self.cfg, component, graceful)
        for p in lifecycle.hosted(self.plan.processes(), node, name) if graceful else []:
            self.emit("process-stop", node=node, container=name, process=p.name)
            t.run(lifecycle.stop_process_command(p, stop), timeout=stop + timeouts.PROCESS_STOP_EXTRA_S)
        if save_logs_to is not None:
            save_logs(t, name, save_logs_to, self.secrets)
        r = t.run(lifecycle.remove_command(name, stop), timeout=stop + timeouts.REMOVE_EXTRA_S)
        if not r.ok:
            raise RemoveFailed(f"{node}: container {name} could not be removed: {r.tail(3).strip() or 'docker still lists it'}",
                               hint=f"remove it by hand on {node}: docker rm -f {name}")

    def logs_dir(self, what: str) -> Path:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        d = private_dir(self.cfg.resolved_state_dir()) / "logs" / f"{stamp}-{what}"
        private_dir(d)
        return d

    def down(self, *, lock: bool = True, graceful: bool = True, logs_to: Optional[Path] = None, restore: bool = True) -> Path | None:
        """Stop and remove every cluster container: vLLM, the head, then the workers. graceful=False
        kills at once (a wedged engine does not shut down cleanly anyway). The containers' logs are
        saved under state_dir/logs, or in logs_to; restore: then what prepare changed is given back (the
        GPU's clock cap; not on the watchdog's restart, whose `up` sets it again). Raises RemoveFailed
        naming what is left when a node could not be listed or a container could not be removed."""
        if lock:
            self.connect_all()
            with self.locked("down"):
                return self._down(graceful, logs_to, restore)
        return self._down(graceful, logs_to, restore)

    def _each(self, batch: list[ContainerFact], act: Callable[[ContainerFact], None]) -> list[str]:
        """act on every container of a batch at once; what could not be done, as messages."""
        failed: list[str] = []
        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            for fut in [pool.submit(act, c) for c in batch]:
                try:
                    fut.result()
                except SparkClusterError as exc:
                    failed.append(exc.message)
        return failed

    def _kill(self, c: ContainerFact) -> None:
        """SIGKILL (also reaches a paused container); failures are left to the removal that follows."""
        self.emit("container-kill", node=c.node, container=c.name)
        self.nodes[c.node].run(lifecycle.kill_command(c.name), timeout=timeouts.QUICK_S)

    def _restore(self) -> list[str]:
        """lifecycle.restore_steps on every node at once; what could not be given back, as messages."""
        steps = {s.node: s for s in lifecycle.restore_steps(self.cfg)}
        if not steps:
            return []
        for s in steps.values():
            self.emit("step-start", s)
        done = self.nodes.map(lambda t: t.run(steps[t.node].command, timeout=steps[t.node].timeout_s), steps.keys())
        left = [f"{node}: {steps[node].description}: {exc}" for node, exc in done.failed.items()]
        for node, r in done.succeeded.items():
            self.emit("step-ok" if r.ok else "step-failed", steps[node], duration_s=round(r.duration_s, 3))
            if not r.ok:
                left.append(f"{node}: {steps[node].description}: {r.tail()}")
        return left

    def _down(self, graceful: bool, logs_to: Optional[Path] = None, restore: bool = True) -> Path | None:
        existing = self.nodes.map(lambda t: list_containers(t, self.cfg.name))
        found = [c for cs in existing.succeeded.values() for c in cs]
        left: list[str] = []
        for node, exc in existing.failed.items():
            self.emit("node-unreachable", node=node, error=str(exc))
            left.append(f"{node}: not listed ({exc.message.splitlines()[0]})")
        logs = (logs_to or self.logs_dir("down")) if found else None
        ranks = [[c for c in found if stop_rank(c.component) == rank] for rank in range(len(COMPONENT_ORDER) + 1)]
        ranks = [batch for batch in ranks if batch]
        if not graceful and ranks:
            # a wedged group: SIGKILL in stop order (vLLM, the head, then the workers; a fraction of a
            # second each), then save the logs and remove everything at once (seconds per container)
            for batch in ranks:
                self._each(batch, self._kill)
            ranks = [[c for batch in ranks for c in batch]]
        removed: list[str] = []

        def remove(c: ContainerFact) -> None:
            self.emit("container-remove", node=c.node, container=c.name, reason="down")
            self._remove(c.node, c.name, save_logs_to=logs, graceful=graceful, component=c.component)
            removed.append(f"{c.name}@{c.node}")

        for batch in ranks:
            left += self._each(batch, remove)
        if restore:
            left += self._restore()
        self.emit("down-done", removed=removed, left=left, logs=str(logs) if logs else None)
        if left:
            raise RemoveFailed("down did not remove everything:\n" + "\n".join(f"  - {x}" for x in left),
                               hint="run down again once the node answers, or remove what is left by hand")
        return logs
