"""The one executor with side effects: runs the plan over SSH, step by step.

`up` = preflight (all nodes in parallel, nothing changed) -> prepare -> containers in the
plan's order (unchanged ones kept) -> wait for Ray -> readiness. `down` = stop and remove in
reverse order, saving logs first. Progress is reported as events (a callback), so the CLI
can print a live view or JSON lines.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import httpx

from . import kept, lock, timeouts
from .checks import ReadBack, evaluate, note
from .cache_sync import CacheSync
from .config import ClusterConfig
from .errors import CommandTimeout, LockedError, PreflightError, SparkClusterError, StepError, TransportError, indent
from .engine_gate import EngineGate
from .facts import ContainerFact, ProcessFact
from .masking import mask_data
from .model_sync import ModelSync
from .observe import list_containers, read_process, tail_logs
from .plan import build_plan
from .preflight import Finding, Preflight
from .reconcile import Reconciliation, member_name, reconcile
from .steps import NOT_DETECTED, Plan, Step
from .transport import Nodes, Result, SSHTransport
from .vllm_check import VllmCheck
from .teardown import Teardown
from .waits import Waits

Reporter = Callable[[dict[str, Any]], None]


@dataclass
class UpResult:
    changed: bool
    recreated: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Executor(Teardown):
    def __init__(self, cfg: ClusterConfig, nodes: Nodes, report: Reporter | None = None, *, http: Optional[httpx.Client] = None,
                 accept_memory: bool = False, restart: bool = False):
        """http: the client readiness asks the engine with (its API key in its headers); default a
        client of its own per wait. accept_memory: an engine starts whatever memory the nodes have
        (their readings kept as the new baselines; `up --accept-memory`). restart: the watchdog's `up`
        after its kill: the preflight's probes of the image on the GPU (the memory CUDA can allocate,
        GPUDirect RDMA) are left out: measured at `up`, and memory just freed by the kill is waited for
        before the start instead (memory_back), never refused."""
        self.cfg = cfg
        self.accept_memory = accept_memory
        self.restart = restart
        self.nodes = nodes
        self.http = http
        self.report = report or (lambda e: None)
        self.secrets = cfg.secret_values()  # masked in every event and every log kept
        links = kept.links(cfg)  # `nccl: auto`: as last detected, until preflight detects again
        self.plan: Plan = build_plan(cfg, reveal_secrets=True, links=links, kv=kept.kv_capacity(cfg))
        self.phases: dict[str, float] = {}  # where the last up's time went, by part (see up)
        self.engine_started: Optional[_dt.datetime] = None  # when this up started the API's engine

    # ---- events -------------------------------------------------------------------------
    def emit(self, event: str, step: Step | None = None, **data: Any) -> None:
        e: dict[str, Any] = {"ts": _now(), "event": event}
        if step is not None:
            e.update(step=step.id, phase=step.phase, node=step.node, description=step.description)
        e.update(data)
        self.report(mask_data(e, self.secrets))

    def connect_all(self) -> None:
        """Open (and so verify the host key of) every node's SSH connection before anything runs."""
        failed = list(self.nodes.map(lambda t: t.connect()).failed.values())
        if failed:
            if len(failed) == 1:
                raise failed[0]
            raise TransportError("cannot reach every node:\n" + "\n".join(f"  - {e}" for e in failed))

    # ---- lock (spark_cluster.lock) ------------------------------------------------------
    def acquire_lock(self, what: str) -> None:
        step = self.plan.steps_in("lock")[0]
        head = self.nodes[step.node]
        holder = lock.holder_record(what, socket.gethostname(), os.getpid(), _now())
        if head.run(step.command, input=holder.encode(), timeout=step.timeout_s).ok:
            return
        held_by = head.run(lock.holder_command(self.cfg.name), timeout=step.timeout_s).stdout.strip()
        if lock.stale(held_by, socket.gethostname(), _pid_alive):
            head.run(lock.release_command(self.cfg.name), timeout=step.timeout_s)
            return self.acquire_lock(what)
        raise LockedError(
            f"another spark-cluster operation holds the lock of cluster {self.cfg.name}: {lock.who(held_by)}",
            hint=f"wait for it; if it is gone, remove {lock.lock_dir(self.cfg.name)} on {self.cfg.head.name}",
        )

    def release_lock(self) -> None:
        """Remove the lock; a failure is reported (the next operation from this host reclaims a
        lock whose process is gone, another host would be refused until it is removed)."""
        step = self.plan.steps_in("unlock")[0]
        try:
            r = self.nodes[step.node].run(step.command, timeout=step.timeout_s)
            problem = None if r.ok else r.tail(3).strip()
        except SparkClusterError as exc:
            problem = exc.message
        if problem:
            d = lock.lock_dir(self.cfg.name)
            self.emit("warning", node=step.node,
                      message=f"could not release the lock {d} on {step.node} ({problem}): remove it by hand if another host runs spark-cluster")

    @contextmanager
    def locked(self, what: str) -> Iterator[None]:
        """The cluster's lock on the head for the duration of one operation."""
        self.acquire_lock(what)
        try:
            yield
        finally:
            self.release_lock()

    # ---- generic step running -----------------------------------------------------------
    def _run_step(self, step: Step) -> Result:
        t = self.nodes[step.node]
        self.emit("step-start", step)
        t0 = time.monotonic()
        try:
            res = t.run(step.command, timeout=step.timeout_s)
        except CommandTimeout as exc:
            self.emit("step-failed", step, duration_s=round(time.monotonic() - t0, 3), error=str(exc))
            raise StepError(step, str(exc)) from None
        return res

    def _done(self, step: Step, t0: float, **data: Any) -> None:
        self.emit("step-ok", step, duration_s=round(time.monotonic() - t0, 3), **data)

    # ---- preflight ----------------------------------------------------------------------
    def preflight(self, existing: dict[str, list[ContainerFact]]) -> None:
        t0 = time.monotonic()
        checks = Preflight(self.cfg, self.nodes, self.plan, self.emit)
        findings = checks.inspect(existing, probes=not self.restart)
        problems = [f.message for f in findings if f.problem]
        self.plan = checks.plan  # as detected (`nccl: auto`)
        for f in findings:
            if f.warning and not problems:
                self.emit("preflight-warning", node=f.node, check=f.check, warning=f.warning)
        if problems:
            raise PreflightError(problems)
        self.emit("phase-done", phase="preflight", duration_s=round(time.monotonic() - t0, 3))

    def doctor(self) -> list[Finding]:
        """Every preflight check, changing nothing (Preflight.doctor)."""
        return Preflight(self.cfg, self.nodes, self.plan, self.emit).doctor()

    def check_vllm_flags(self) -> VllmCheck:
        """The image's vLLM parser over the rendered flags (Preflight.check_vllm_flags)."""
        return Preflight(self.cfg, self.nodes, self.plan, self.emit).check_vllm_flags()

    # ---- prepare ------------------------------------------------------------------------
    def prepare(self) -> None:
        steps = self.plan.steps_in("prepare")
        by_node: dict[str, list[Step]] = {}
        for s in steps:
            by_node.setdefault(s.node, []).append(s)

        def run_node(t: SSHTransport) -> None:
            for s in by_node[t.node]:
                t0 = time.monotonic()
                r = self._run_step(s)
                problem = evaluate(s.check, r.exit_code, r.stdout, r.stderr) if s.check is not None else None
                if not r.ok and (problem is None or isinstance(s.check, ReadBack)):  # a read-back's own exit code says it
                    raise StepError(s, f"exit code {r.exit_code}", r.tail())
                if problem:
                    shown = f"    expected:\n{indent(s.check.stdout)}\n    read back:\n{indent(r.stdout)}" if isinstance(s.check, ReadBack) else ""
                    raise StepError(s, problem, shown)
                found = note(s.check, r.stdout, r.exit_code, r.stderr) if s.check is not None else None
                self._done(s, t0, **({"note": found} if found else {}))

        self.nodes.map(run_node, by_node.keys()).values_or_raise()

    # ---- containers ---------------------------------------------------------------------
    def existing(self) -> dict[str, list[ContainerFact]]:
        return self.nodes.map(lambda t: list_containers(t, self.cfg.name)).values_or_raise()

    def _start(self, step: Step) -> None:
        if step.container is not None and NOT_DETECTED in step.container.env.values():
            raise StepError(step, "nccl: auto has not detected this node's link: preflight must run first")
        t0 = time.monotonic()
        if step.process is not None or step.container.component == "vllm":  # the API's engine: its start read from its log once ready
            self.engine_started = _dt.datetime.now(_dt.timezone.utc)
        r = self._run_step(step)
        if not r.ok:
            raise StepError(step, f"docker {'exec' if step.process else 'run'} exited {r.exit_code}", r.tail())
        if step.process is None:
            self._done(step, t0, container=step.container.name, id=r.stdout.strip()[:12])
            return
        # `docker exec -d` returns before the process runs: wait until it has written its PID
        fact = ProcessFact(state="unknown")
        for _ in range(round(timeouts.PROCESS_START_S / timeouts.PROCESS_POLL_S)):
            fact = read_process(self.nodes[step.process.node], step.process)
            if fact.state == "running":
                self._done(step, t0, container=step.process.container, pid=fact.pid)
                return
            time.sleep(timeouts.PROCESS_POLL_S)
        raise StepError(step, f"{step.process.name} did not start in {step.process.container}: {fact.detail}",
                        indent(tail_logs(self.nodes[step.node], step.process.container, self.secrets)))

    def _clear(self, step: Step, todo: Reconciliation) -> None:
        """What an earlier engine left in a kept container goes before its process starts there again."""
        target = next(s for s in self.plan.steps if s.id == step.clears)
        if target not in todo.start or any(s.container is not None for s in todo.start):
            self.emit("step-skip", step, reason="nothing starts again in a kept container")
            return
        with self.timed(step.id):
            t0 = time.monotonic()
            r = self._run_step(step)
            if not r.ok:
                raise StepError(step, f"what is left of the earlier engine did not go: {r.stdout.strip() or r.exit_code}", r.tail())
            self._done(step, t0)

    def _gate(self) -> EngineGate:
        return EngineGate(self.cfg, self.nodes, self.plan, self.emit, self.timed, self._waits)

    def _waits(self) -> Waits:
        return Waits(self.cfg, self.nodes, self.plan, self.emit, self.timed, self.http)

    # ---- up / down ----------------------------------------------------------------------
    def up(self, *, stop_after: str | None = None) -> UpResult:
        """Run the plan. stop_after: a phase name to stop after (e.g. "wait-ray"), for partial bring-up.
        Where the time went is kept in `self.phases` as it goes (in order, by step id), so a caller
        still has it when up fails."""
        from .steps import PHASES

        allowed = set(PHASES[: PHASES.index(stop_after) + 1]) if stop_after else set(PHASES)
        t_start = time.monotonic()
        self.phases = {}
        with self.timed("lock"):
            self.connect_all()
            self.acquire_lock("up")
        try:
            if self.cfg.model.sync:
                with self.timed("sync"):
                    ModelSync(self.cfg, self.nodes, self.report).run()
            with self.timed("preflight"):
                existing = self.existing()
                self.preflight(existing)
            if self.cfg.model.sync:  # the sealed caches with the model, once the image is there
                with self.timed("cache-sync"):
                    CacheSync(self.cfg, self.nodes, self.report).run()
            with self.timed("prepare"):
                self.prepare()
            members = [s for s in self.plan.steps if s.kind in ("start", "exec") and s.phase in allowed]
            todo = _reconcile(self.nodes, members, existing)
            if todo.remove:
                with self.timed("remove"):
                    logs = self.logs_dir("replaced")
                    for c in todo.remove:
                        self.emit("container-remove", node=c.node, container=c.name, reason=todo.why or "not in the plan")
                        self._remove(c.node, c.name, save_logs_to=logs, component=c.component)
            for s in members:
                if s not in todo.start:
                    self.emit("step-skip", s, reason="unchanged and running")
            self._members(allowed, todo)
            if "ready" in allowed:
                self._waits().ready(self.plan.steps_in("ready"))
                started, self.engine_started = self.engine_started, None
                if started is not None:
                    self.phases.update(self._gate().ready(started, [s for s in self.plan.steps_in("seal") if s.phase in allowed]))
        finally:
            self.release_lock()
        result = UpResult(changed=todo.changed, recreated=[member_name(s) for s in todo.start], kept=todo.kept,
                          phases=dict(self.phases), total_s=round(time.monotonic() - t_start, 2))
        self.emit("up-done", changed=result.changed, recreated=result.recreated, kept=result.kept, phases=result.phases,
                  total_s=result.total_s)
        return result

    def _members(self, allowed: set[str], todo: Reconciliation) -> None:
        """The plan's steps up to readiness, in order: what must start, and what comes before it."""
        memory = [s for s in self.plan.steps_in("memory") if s.phase in allowed]
        cache = [s for s in self.plan.steps_in("cache") if s.phase in allowed]
        for s in self.plan.steps:
            if s.phase not in allowed:
                continue
            if s.kind in ("start", "exec") and s in todo.start:
                with self.timed(s.id):
                    self._start(s)
            elif s.phase == "clear":
                self._clear(s, todo)
            elif s.phase == "memory" and s is memory[0]:  # the nodes' together
                self._gate().before("memory", memory, todo, accept_memory=self.accept_memory)
            elif s.phase == "cache" and s is cache[0]:
                self._gate().before("cache", cache, todo)
            elif s.kind == "wait-ray":
                if todo.start:
                    with self.timed(s.id):
                        self._waits().ray(s)
                else:
                    self.emit("step-skip", s, reason="Ray unchanged")

    def pending(self) -> Reconciliation:
        """What `up` would do to the group's containers now (nothing started, nothing locked): a
        rolling change drains a group only when it will be recreated."""
        self.connect_all()
        return _reconcile(self.nodes, [s for s in self.plan.steps if s.kind in ("start", "exec")], self.existing())

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Record how long a part of up took in self.phases (also when it fails)."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = round(time.monotonic() - t0, 2)


def _reconcile(nodes: Nodes, members: list[Step], existing: dict[str, list[ContainerFact]]) -> Reconciliation:
    """What up must do, from the containers found and the hosted processes read in the running ones."""
    found = [c for cs in existing.values() for c in cs]
    running = {(c.node, c.name) for c in found if c.running}
    processes = {member_name(s): read_process(nodes[s.process.node], s.process) for s in members
                 if s.process is not None and (s.node, s.process.container) in running}
    return reconcile(members, found, processes)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
