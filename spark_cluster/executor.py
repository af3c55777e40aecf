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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import httpx

from . import kept, lifecycle, lock, timeouts
from .config import ClusterConfig
from .errors import CommandFailed, CommandTimeout, EngineKeyRefused, LockedError, PreflightError, RemoveFailed, SparkClusterError, StepError, TransportError  # noqa: F401
from .facts import ContainerFact, ProcessFact
from .judge import container_gone, key_refused, process_gone
from .observe import Engine, list_containers, read_process, read_ray_state, save_logs, tail_logs
from .plan import NOT_DETECTED, Plan, Step, build_plan
from .checks import (Check, ClusterLink, GpuWorks, ImagePlatform, ImagePresent, LinkBandwidth, PerftestPresent, RdmaBandwidth, ReadBack,
                     STATE_MIN_GIB, VllmFlags, differs, evaluate, link_of, note, state_dir_problem)
from .link import LinkPick
from .model_sync import ModelSync, node_to_node
from .lifecycle import COMPONENT_ORDER, stop_rank
from .reconcile import member_name, reconcile
from .render import quote, read_template
from .transport import Nodes, Result, SSHTransport
from .vllm_check import VllmCheck, VllmCheckError, argv_hash, parse_output

Reporter = Callable[[dict[str, Any]], None]



@dataclass(frozen=True)
class Finding:
    """One preflight check's verdict on one node (node None: across nodes)."""

    node: Optional[str]
    check: str
    description: str
    problem: Optional[str] = None
    note: Optional[str] = None

    @property
    def message(self) -> str:
        return f"{self.node}: {self.problem}" if self.node else str(self.problem)


@dataclass
class UpResult:
    changed: bool
    recreated: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Executor:
    def __init__(self, cfg: ClusterConfig, nodes: Nodes, report: Reporter | None = None, *, http: Optional[httpx.Client] = None):
        """http: the client readiness asks the engine with (its API key in its headers); default a
        client of its own per wait."""
        self.cfg = cfg
        self.nodes = nodes
        self.http = http
        self.report = report or (lambda e: None)
        links = kept.links(cfg)  # `nccl: auto`: as last detected, until preflight detects again
        self.plan: Plan = build_plan(cfg, reveal_secrets=True, links=links)
        self.phases: dict[str, float] = {}  # where the last up's time went, by part (see up)

    # ---- events -------------------------------------------------------------------------
    def emit(self, event: str, step: Step | None = None, **data: Any) -> None:
        e: dict[str, Any] = {"ts": _now(), "event": event}
        if step is not None:
            e.update(step=step.id, phase=step.phase, node=step.node, description=step.description)
        e.update(data)
        self.report(e)

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
        problems = [f.message for f in self.inspect(existing) if f.problem]
        if problems:
            raise PreflightError(problems)
        self.emit("phase-done", phase="preflight", duration_s=round(time.monotonic() - t0, 3))

    def inspect(self, existing: dict[str, list[ContainerFact]], *, fetch_images: bool = True) -> list[Finding]:
        """Every preflight check on every node (in parallel; nothing changed except, with fetch_images,
        the image pulled or streamed to a node that lacks it), as findings. With `nccl: auto` the link
        found is remembered and the plan rebuilt with it before the checks are judged."""
        steps = [s for s in self.plan.steps_in("preflight") if not isinstance(s.check, (VllmFlags, LinkBandwidth, RdmaBandwidth))]
        vllm_step = next((s for s in self.plan.steps_in("preflight") if isinstance(s.check, VllmFlags)), None)
        by_node: dict[str, list[Step]] = {}
        for s in steps:
            by_node.setdefault(s.node, []).append(s)
        for s in steps:
            self.emit("step-start", s)

        def run_node(t: SSHTransport) -> dict[str, Result]:
            return {s.id: t.run(s.command, timeout=s.timeout_s) for s in by_node[t.node]}

        results = self.nodes.map(run_node, by_node.keys())  # a bug raises: never "nothing was changed"
        outputs: dict[str, dict[str, Result]] = results.succeeded
        if fetch_images:
            self._fetch_missing_images(outputs, by_node)
        findings = [Finding(node, "ssh", "the node answers over SSH", str(exc)) for node, exc in results.failed.items()]
        state = self.cfg.resolved_state_dir()
        free = _free_gib(state)
        room = state_dir_problem(str(state), free)
        findings.append(Finding("controller", "state-dir", f"room for state_dir ({STATE_MIN_GIB:g} GiB)", room,
                                None if room else f"{free:.0f} GiB free"))
        self._detected_link(outputs)
        checks = {s.id: s.check for s in self.plan.steps_in("preflight")}  # judged by the plan as detected
        running_here = {n: any(c.running for c in cs) for n, cs in existing.items()}
        same: dict[str, tuple[Check, dict[str, str]]] = {}
        for node, res in outputs.items():
            for s in by_node[node]:
                r, check = res[s.id], checks[s.id]
                problem = evaluate(check, r.exit_code, r.stdout, r.stderr, cluster_running=running_here.get(node, False))
                findings.append(Finding(node, s.id, s.description, problem, None if problem else note(check, r.stdout)))
                if not problem and check.same_on_all_nodes:
                    same.setdefault(check.kind, (check, {}))[1][node] = r.stdout
        for check, values in same.values():
            problem = differs(check, values, self.cfg.head.name)
            if problem:
                findings.append(Finding(None, f"same/{check.kind}", f"{check.kind}: the same on every node", problem))
        bad = any(f.problem for f in findings)
        for s in steps:
            if s.node in outputs:
                self.emit("step-ok" if not bad else "step-checked", s, duration_s=round(outputs[s.node][s.id].duration_s, 3))
        if not bad:  # every node at once, with the plan as detected (its NCCL variables)
            perftest = [outputs[s.node][s.id].stdout.strip() for s in steps if isinstance(s.check, PerftestPresent) and s.node in outputs]
            rdma = perftest and all(perftest) and any(isinstance(s.check, RdmaBandwidth) for s in self.plan.steps_in("preflight"))
            findings += self._bandwidth_findings(RdmaBandwidth if rdma else LinkBandwidth)
        if vllm_step is not None:
            findings += self._vllm_findings(vllm_step, outputs, steps)
        return findings

    def _bandwidth_findings(self, kind: type) -> list[Finding]:
        """link.check bandwidth: ib_write_bw per rail when every node has it, else the all-reduce; every node at once."""
        steps = {s.node: s for s in self.plan.steps_in("preflight") if isinstance(s.check, kind)}
        if not steps:
            return []
        for s in steps.values():
            self.emit("step-start", s)
        results = self.nodes.map(lambda t: t.run(steps[t.node].command, timeout=steps[t.node].timeout_s,
                                                 input=read_template(steps[t.node].stdin).encode() if steps[t.node].stdin else None),
                                 steps.keys())
        findings = [Finding(node, steps[node].id, steps[node].description, str(exc)) for node, exc in results.failed.items()]
        for node, r in results.succeeded.items():
            s = steps[node]
            problem = evaluate(s.check, r.exit_code, r.stdout, r.stderr)
            found = None if problem else note(s.check, r.stdout)
            findings.append(Finding(node, s.id, s.description, problem, found))
            self.emit("step-failed" if problem else "step-ok", s, duration_s=round(r.duration_s, 3), note=found)
        return findings

    def doctor(self) -> list[Finding]:
        """Every preflight check, changing nothing (no image fetched, no page cache dropped, no lock
        taken): what `up` would find. A node that cannot be reached is a finding, not an error."""
        if self.cfg.memory.drop_page_cache:  # read memory as it is; up drops the page cache first
            cfg = self.cfg.model_copy(update={"memory": self.cfg.memory.model_copy(update={"drop_page_cache": False})})
            links = kept.links(cfg)
            self.plan = build_plan(cfg, reveal_secrets=True, links=links)
        existing = self.nodes.map(lambda t: list_containers(t, self.cfg.name)).succeeded
        return self.inspect(existing, fetch_images=False)

    def _detected_link(self, outputs: dict[str, dict[str, Result]]) -> None:
        """`nccl: auto`: the link each node's output shows; when every node has one, it is remembered
        (state_dir/link.json) and the plan rebuilt with it (its containers' NCCL/Gloo variables)."""
        picks: dict[str, LinkPick] = {}
        for s in self.plan.steps_in("preflight"):
            if isinstance(s.check, ClusterLink) and s.node in outputs:
                pick = link_of(s.check, outputs[s.node][s.id].stdout)
                if not isinstance(pick, LinkPick):
                    return  # judged with the other checks
                picks[s.node] = pick
        auto = [n.name for n in self.cfg.nodes if self.cfg.node_nccl(n).auto]
        if not auto or set(picks) != set(auto):
            return
        kept.save_links(self.cfg, picks)
        self.plan = build_plan(self.cfg, reveal_secrets=True, links=picks)
        self.emit("link-detected", nodes={n: p.env() | ({"note": p.note} if p.note else {}) for n, p in picks.items()})

    def _vllm_findings(self, vllm_step: Step, outputs: dict[str, dict[str, Result]], steps: list[Step]) -> list[Finding]:
        head_image = next((outputs[s.node][s.id] for s in steps
                           if s.node == self.cfg.head.name and isinstance(s.check, ImagePresent) and s.node in outputs), None)
        image_id = head_image.stdout.strip() if head_image is not None and head_image.ok else None
        if not image_id:
            return []  # the image check says why
        seen = kept.passed_before(self.cfg, image_id, argv_hash(self.plan.vllm_argvs))
        if seen:
            self.emit("step-skip", vllm_step, reason=f"checked before: vLLM {seen.get('vllm_version')}, same image ID and flags")
            return [Finding(vllm_step.node, vllm_step.id, vllm_step.description, None, f"checked before: vLLM {seen.get('vllm_version')}")]
        # needs the image on the head: runs after the image checks (and fetches)
        self.emit("step-start", vllm_step)
        t1 = time.monotonic()
        try:
            check = self.check_vllm_flags(vllm_step, image_id=image_id)
        except VllmCheckError as exc:
            self.emit("step-failed", vllm_step, duration_s=round(time.monotonic() - t1, 3), error=str(exc))
            return [Finding(vllm_step.node, vllm_step.id, vllm_step.description, str(exc))]
        self.emit("step-ok" if check.ok else "step-failed", vllm_step, duration_s=round(time.monotonic() - t1, 3),
                  vllm_version=check.vllm_version, problems=len(check.problems))
        messages = check.messages(self.cfg)
        if not messages:
            return [Finding(vllm_step.node, vllm_step.id, vllm_step.description, None, f"vLLM {check.vllm_version}")]
        return [Finding(vllm_step.node, vllm_step.id, vllm_step.description, m) for m in messages]

    def check_vllm_flags(self, step: Optional[Step] = None, *, image_id: Optional[str] = None) -> VllmCheck:
        """Run the image's vLLM parser over the rendered argv (throwaway container on the head)."""
        if step is None:
            plan = self.plan
            if not self.cfg.vllm.check_flags:  # asked for explicitly: check even when preflight would not
                cfg = self.cfg.model_copy(update={"vllm": self.cfg.vllm.model_copy(update={"check_flags": True})})
                plan = build_plan(cfg, reveal_secrets=True)
            step = next(s for s in plan.steps if isinstance(s.check, VllmFlags))
        t = self.nodes[step.node]
        where = f"image {self.cfg.container.image} on {step.node}"
        try:
            r = t.run(step.command, timeout=step.timeout_s, input=read_template(step.stdin).encode())
        except CommandTimeout:
            t.run(lifecycle.discard_command(step.check.container), timeout=timeouts.CLEANUP_S)
            raise VllmCheckError(f"checking the vllm serve flags with {where} took longer than {step.timeout_s:g} s "
                                 "(vllm.check_timeout_s)") from None
        check = parse_output(r.stdout, r.stderr, r.exit_code, where)
        self._remember_vllm(check, image_id)
        return check

    def _remember_vllm(self, check: VllmCheck, image_id: Optional[str]) -> None:
        """The vLLM version found in the image, for `status` and `plan`, and to skip the same check
        on the next `up` or watchdog restart (same image ID, same flags)."""
        kept.save_check(self.cfg, {"image": self.cfg.container.image, "image_id": image_id, "argv_hash": argv_hash(self.plan.vllm_argvs),
                            "vllm_version": check.vllm_version, "checked_at": _now(), "where": check.where, "ok": check.ok})

    def _fetch_missing_images(self, results: dict[str, dict[str, Result]], by_node: dict[str, list[Step]]) -> None:
        """Nodes without the image: `docker pull` it, or else copy it from a node that has it:
        node to node over the cluster link (docker save there, docker load here), or, when that
        fails, streamed through the controller (nodes that cannot open a port to each other)."""
        image = self.cfg.container.image
        have, missing = [], []
        for node, res in results.items():
            step = next(s for s in by_node[node] if isinstance(s.check, ImagePresent))
            (have if res[step.id].ok else missing).append(node)
        for node in missing:
            t = self.nodes[node]
            step = next(s for s in by_node[node] if isinstance(s.check, ImagePresent))
            self.emit("image-fetch", node=node, image=image, how="docker pull")
            pulled = t.run(f"docker pull --quiet {quote(image)}", timeout=timeouts.IMAGE_TRANSFER_S)
            if not pulled.ok and have:
                source = self.nodes[have[0]]
                self.emit("image-fetch", node=node, image=image, how=f"node to node from {source.node} over the cluster link")
                _, _, why = node_to_node(source, t, self.cfg.node(source.node).address, self.cfg.node(node).address,
                                         receive=f"receive-pipe {quote('docker load')}", send=f"send-pipe {quote('docker save ' + quote(image))}",
                                         timeout_s=timeouts.IMAGE_TRANSFER_S)
                if why:
                    self.emit("image-fetch", node=node, image=image, how=f"streamed from {source.node} through the controller ({why})")
                    save, load = source.stream_to(f"docker save {quote(image)}", t, "docker load", timeout=timeouts.IMAGE_TRANSFER_S)
                    if not (save.ok and load.ok):
                        self.emit("image-fetch-failed", node=node, error=(save.stderr + load.stderr)[-500:])
            for s in by_node[node]:  # read again what needs the image
                if isinstance(s.check, (ImagePresent, ImagePlatform, GpuWorks)):
                    results[node][s.id] = t.run(s.command, timeout=s.timeout_s)

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
                if not r.ok:
                    raise StepError(s, f"exit code {r.exit_code}", r.tail())
                problem = evaluate(s.check, r.exit_code, r.stdout, r.stderr) if s.check is not None else None
                if problem:
                    shown = f"    expected:\n{_indent(s.check.stdout)}\n    read back:\n{_indent(r.stdout)}" if isinstance(s.check, ReadBack) else ""
                    raise StepError(s, problem, shown)
                self._done(s, t0)

        self.nodes.map(run_node, by_node.keys()).values_or_raise()

    # ---- containers ---------------------------------------------------------------------
    def existing(self) -> dict[str, list[ContainerFact]]:
        return self.nodes.map(lambda t: list_containers(t, self.cfg.name)).values_or_raise()

    def _start(self, step: Step) -> None:
        if step.container is not None and NOT_DETECTED in step.container.env.values():
            raise StepError(step, "nccl: auto has not detected this node's link: preflight must run first")
        t0 = time.monotonic()
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
                        _indent(tail_logs(self.nodes[step.node], step.process.container)))

    def _remove(self, node: str, name: str, *, save_logs_to: Optional[Path], graceful: bool = True, component: str = "") -> None:
        """One container stopped and removed as lifecycle.remove_step shows it: a process hosted in it
        first (vLLM in the Ray head, while Ray still runs), its log saved, then the container."""
        t = self.nodes[node]
        stop = lifecycle.stop_timeout_s(self.cfg, component, graceful)
        for p in lifecycle.hosted(self.plan.processes(), node, name) if graceful else []:
            self.emit("process-stop", node=node, container=name, process=p.name)
            t.run(lifecycle.stop_process_command(p, stop), timeout=stop + timeouts.PROCESS_STOP_EXTRA_S)
        if save_logs_to is not None:
            save_logs(t, name, save_logs_to)
        r = t.run(lifecycle.remove_command(name, stop), timeout=stop + timeouts.REMOVE_EXTRA_S)
        if not r.ok:
            raise RemoveFailed(f"{node}: container {name} could not be removed: {r.tail(3).strip() or 'docker still lists it'}",
                               hint=f"remove it by hand on {node}: docker rm -f {name}")

    def logs_dir(self, what: str) -> Path:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        d = self.cfg.resolved_state_dir() / "logs" / f"{stamp}-{what}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ---- waits --------------------------------------------------------------------------
    def wait_ray(self, step: Step) -> None:
        t0 = time.monotonic()
        self.emit("step-start", step)
        deadline = t0 + (step.deadline_s or 300)
        want = set(step.check.alive_ips)
        want_resources = dict(step.check.resources)
        while True:
            ray = read_ray_state(self.nodes[step.node], step.command, step.timeout_s)
            alive = set(ray.alive)
            short = {k: ray.total(k) for k, v in want_resources.items() if ray.total(k) < v}
            if want <= alive and not short:
                self._done(step, t0, alive=sorted(alive), resources={k: ray.total(k) for k in want_resources})
                return
            self._check_members_alive(step)
            if time.monotonic() > deadline:
                missing = [n for n in self.cfg.nodes if n.address not in alive]
                details = []
                for n in missing:
                    name = next(s.container.name for s in self.plan.steps if s.container and s.node == n.name)
                    details.append(f"  {n.name} ({n.address}) has not joined; last lines of {name}:\n" + _indent(tail_logs(self.nodes[n.name], name)))
                msg = f"Ray shows {len(alive)} of {len(want)} nodes after {step.deadline_s:g}s"
                msg += "".join(f", {ray.total(k):g} of {want_resources[k]:g} {k}" for k in short)
                if missing:
                    msg += "; missing: " + ", ".join(n.name for n in missing)
                raise StepError(step, msg, "\n".join(details))
            time.sleep(self.cfg.health.poll_interval_s)

    def _check_members_alive(self, step: Step) -> None:
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
                raise StepError(step, gone, _indent(tail_logs(self.nodes[s.node], name)))

    def wait_ready(self, steps: list[Step]) -> None:
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
                            self._done(step, t0)
                            break
                        if time.monotonic() - last_alive_check > 10:
                            last_alive_check = time.monotonic()
                            self._check_members_alive(self.plan.steps[-1])
                        if time.monotonic() > deadline:
                            raise StepError(step, f"not ready after {step.deadline_s:g}s: {last_err}",
                                            _indent(tail_logs(self.nodes[self.cfg.head.name], self.plan.api_container)))
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

    # ---- up / down ----------------------------------------------------------------------
    def up(self, *, stop_after: str | None = None) -> UpResult:
        """Run the plan. stop_after: a phase name to stop after (e.g. "wait-ray"), for partial bring-up.
        Where the time went is kept in `self.phases` as it goes (in order, by step id), so a caller
        still has it when up fails."""
        from .plan import PHASES

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
            with self.timed("prepare"):
                self.prepare()
            found = [c for cs in existing.values() for c in cs]
            members = [s for s in self.plan.steps if s.kind in ("start", "exec") and s.phase in allowed]
            running = {(c.node, c.name) for c in found if c.running}
            processes = {member_name(s): read_process(self.nodes[s.process.node], s.process) for s in members
                         if s.process is not None and (s.node, s.process.container) in running}
            todo = reconcile(members, found, processes)
            if todo.remove:
                with self.timed("remove"):
                    logs = self.logs_dir("replaced")
                    for c in todo.remove:
                        self.emit("container-remove", node=c.node, container=c.name, reason=todo.why or "not in the plan")
                        self._remove(c.node, c.name, save_logs_to=logs, component=c.component)
            for s in members:
                if s not in todo.start:
                    self.emit("step-skip", s, reason="unchanged and running")
            for s in self.plan.steps:
                if s.phase not in allowed:
                    continue
                if s.kind in ("start", "exec") and s in todo.start:
                    with self.timed(s.id):
                        self._start(s)
                elif s.kind == "wait-ray":
                    if todo.start:
                        with self.timed(s.id):
                            self.wait_ray(s)
                    else:
                        self.emit("step-skip", s, reason="Ray unchanged")
            if "ready" in allowed:
                self.wait_ready(self.plan.steps_in("ready"))
        finally:
            self.release_lock()
        result = UpResult(changed=todo.changed, recreated=[member_name(s) for s in todo.start], kept=todo.kept,
                          phases=dict(self.phases), total_s=round(time.monotonic() - t_start, 2))
        self.emit("up-done", changed=result.changed, recreated=result.recreated, kept=result.kept, phases=result.phases,
                  total_s=result.total_s)
        return result

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Record how long a part of up took in self.phases (also when it fails)."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = round(time.monotonic() - t0, 2)

    def down(self, *, lock: bool = True, graceful: bool = True, logs_to: Optional[Path] = None) -> Path | None:
        """Stop and remove every cluster container: vLLM, the head, then the workers. graceful=False
        kills at once (a wedged engine does not shut down cleanly anyway). The containers' logs are
        saved under state_dir/logs, or in logs_to. Raises RemoveFailed
        naming what is left when a node could not be listed or a container could not be removed."""
        if lock:
            self.connect_all()
            with self.locked("down"):
                return self._down(graceful, logs_to)
        return self._down(graceful, logs_to)

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

    def _down(self, graceful: bool, logs_to: Optional[Path] = None) -> Path | None:
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
        self.emit("down-done", removed=removed, left=left, logs=str(logs) if logs else None)
        if left:
            raise RemoveFailed("down did not remove everything:\n" + "\n".join(f"  - {x}" for x in left),
                               hint="run down again once the node answers, or remove what is left by hand")
        return logs


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())


def _free_gib(path: Path) -> Optional[float]:
    """Free space where path is (or would be created: its nearest existing parent)."""
    import shutil

    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free / 2**30
            except OSError:
                return None
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
