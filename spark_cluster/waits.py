"""`up`'s waits: the nodes' memory back before an engine starts, Ray's members, then the engine's
readiness. Each of the last two fails fast, with the last log
lines of what ended, when a member of the group it waits for has gone (judge's rule)."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Callable, Optional

import httpx

from . import kept, timeouts
from .checks import MemoryBack, evaluate
from .config import ClusterConfig
from .errors import EngineKeyRefused, MemoryNotBack, StepError, indent
from .judge import container_gone, key_refused, process_gone
from .memory_back import MemoryReading, parse_memory, shortfall, slack_gib
from .observe import Engine, list_containers, read_process, read_ray_state, tail_logs
from .steps import Plan, Step
from .transport import Nodes, SSHTransport


class Waits:
    def __init__(self, cfg: ClusterConfig, nodes: Nodes, plan: Plan, emit: Callable[..., None],
                 timed: Callable[[str], AbstractContextManager[None]], http: Optional[httpx.Client] = None):
        """emit: Executor.emit; timed: Executor.timed (where up's time went, by step); http: the
        client readiness asks the engine with (default: one of its own, with the engine's key)."""
        self.cfg = cfg
        self.nodes = nodes
        self.plan = plan
        self.emit = emit
        self.timed = timed
        self.http = http
        self.secrets = cfg.secret_values()

    def ray(self, step: Step) -> None:
        t0 = time.monotonic()
        self.emit("step-start", step)
        deadline = t0 + (step.deadline_s or 300)
        want = set(step.check.alive_ips)
        want_resources = dict(step.check.resources)
        while True:
            asked = time.monotonic()
            ray = read_ray_state(self.nodes[step.node], step.command, step.timeout_s)
            took = time.monotonic() - asked
            alive = set(ray.alive)
            short = {k: ray.total(k) for k, v in want_resources.items() if ray.total(k) < v}
            held = ray.engine_placement_groups()  # an earlier engine's, not yet released
            if want <= alive and not short and not held:
                self.emit("step-ok", step, duration_s=round(time.monotonic() - t0, 3), alive=sorted(alive), resources={k: ray.total(k) for k in want_resources})
                return
            self.members_alive(step)
            if time.monotonic() > deadline:
                missing = [n for n in self.cfg.nodes if n.address not in alive]
                details = []
                for n in missing:
                    name = next(s.container.name for s in self.plan.steps if s.container and s.node == n.name)
                    details.append(f"  {n.name} ({n.address}) has not joined; last lines of {name}:\n" + indent(tail_logs(self.nodes[n.name], name, self.secrets)))
                msg = f"Ray shows {len(alive)} of {len(want)} nodes after {step.deadline_s:g}s"
                msg += "".join(f", {ray.total(k):g} of {want_resources[k]:g} {k}" for k in short)
                if missing:
                    msg += "; missing: " + ", ".join(n.name for n in missing)
                if held:
                    msg += f"; {len(held)} placement group(s) of an earlier engine not released: " + ", ".join(pg.id for pg in held)
                raise StepError(step, msg, "\n".join(details))
            # each probe imports Ray in the head container: on a busy node (Ray's own start and the
            # probe compete for its cores) a probe that took longer than the interval is waited out
            # once more, so that the probes never take most of the node's time from the start they wait for
            time.sleep(max(self.cfg.health.poll_interval_s, took))

    def members_alive(self, step: Step) -> None:
        """Fail fast when a container or process the wait depends on has ended."""
        upto = self.plan.steps.index(step)
        members = [s for s in self.plan.steps[:upto + 1] if s.container is not None or s.process is not None]
        found = {(c.node, c.name): c for n in {s.node for s in members} for c in list_containers(self.nodes[n], self.cfg.name)}
        for s in members:
            if s.container is not None:
                c = found.get((s.node, s.container.name))
                name = s.container.name
                gone = container_gone(name, s.node, "missing" if c is None else c.state)
                if gone and c is not None:
                    gone += f" (exit code {c.exit_code})"
            else:
                fact = read_process(self.nodes[s.process.node], s.process)
                gone = process_gone(s.process.name, s.process.container, s.node, fact.state, fact.detail)
                name = s.process.container
            if gone:
                raise StepError(step, gone, indent(tail_logs(self.nodes[s.node], name, self.secrets)))

    def memory(self, steps: list[Step], *, accept: bool = False) -> None:
        """Right before an engine starts: each node's memory back within its slack of the baseline kept
        from the last start (kept.memory_baselines), polled until the step's deadline; the readings are
        then the nodes' new baselines. accept: taken as they are (`up --accept-memory`)."""
        baselines = kept.memory_baselines(self.cfg)
        by_node = {s.node: s for s in steps}

        def one(t: SSHTransport) -> MemoryReading | str:
            step = by_node[t.node]
            assert isinstance(step.check, MemoryBack)
            t0 = time.monotonic()
            self.emit("step-start", step)
            told = False
            while True:
                r = t.run(step.command, timeout=step.timeout_s)
                problem = evaluate(step.check, r.exit_code, r.stdout, r.stderr)
                reading = parse_memory(r.stdout)
                if problem or reading is None:
                    raise StepError(step, problem or "no memory figures")
                slack = slack_gib(reading.total_gib, step.check.slack_gib)
                short = None if accept else shortfall(baselines.get(t.node), reading, slack)
                waited = round(time.monotonic() - t0, 3)
                if short is None:
                    self.emit("step-ok", step, duration_s=waited, available_gib=reading.available_gib, gpu_free_gib=reading.gpu_free_gib)
                    return reading
                if waited >= (step.deadline_s or 0):
                    self.emit("step-failed", step, duration_s=waited, error=short)
                    return short
                if not told:  # once: what the start waits for
                    self.emit("memory-short", step, short=short)
                    told = True
                time.sleep(self.cfg.health.poll_interval_s)

        got = self.nodes.map(one, list(by_node)).values_or_raise()
        short = {node: v for node, v in got.items() if isinstance(v, str)}
        if short:
            raise MemoryNotBack(short, max(s.deadline_s or 0 for s in steps))
        kept.save_memory_baselines(self.cfg, {node: v for node, v in got.items() if isinstance(v, MemoryReading)})

    def ready(self, steps: list[Step]) -> None:
        """Poll each readiness check in turn (cheap HTTP: every timeouts.READY_POLL_S, so a ready engine
        is seen at once), checking every 10 s that the members still run (fail fast when one died)."""
        deadline_start = time.monotonic()
        last_alive_check = time.monotonic()
        engine = Engine(self.cfg, self.http)
        try:
            for step in steps:
                with self.timed(step.id):
                    t0 = time.monotonic()
                    self.emit("step-start", step)
                    deadline = deadline_start + (step.deadline_s or 600)
                    while True:
                        last_err = self._ready_problem(engine, step)
                        if last_err is None:
                            self.emit("step-ok", step, duration_s=round(time.monotonic() - t0, 3))
                            break
                        if time.monotonic() - last_alive_check > 10:
                            last_alive_check = time.monotonic()
                            self.members_alive(self.plan.steps[-1])
                        if time.monotonic() > deadline:
                            raise StepError(step, f"not ready after {step.deadline_s:g}s: {last_err}",
                                            indent(tail_logs(self.nodes[self.cfg.head.name], self.plan.api_container, self.secrets)))
                        time.sleep(timeouts.READY_POLL_S)
        finally:
            engine.close()

    @staticmethod
    def _ready_problem(engine: Engine, step: Step) -> Optional[str]:
        """What a readiness step's answer lacks (checks.evaluate), None when ready. A refused API key
        raises: waiting longer will not change the engine's mind."""
        status, body = engine.answer(step.request, step.timeout_s)
        if status is None:
            return body
        if key_refused(status):
            raise EngineKeyRefused(status, f"{step.request.method} {httpx.URL(step.request.url).path}")
        return evaluate(step.check, status, body)
