"""The failover controller: observe every period, decide (spark_cluster.decide), act.

Actions: a 1-token canary completion; an incident bundle then an ordered gang restart of the
whole group with the same code as `up` (executor.down then executor.up); an alert when the
circuit breaker trips. Every change, decision and action is a JSON line in
state_dir/events.jsonl; the decision state lives in state_dir/watchdog.json, so the controller
can be restarted at any time without losing its history or touching a healthy cluster.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

from . import kept, timeouts
from .config import ClusterConfig
from .decide import Action, Sample, State, breaker_reset, decide, fresh_budget, hour_restarts, requested_restart, restarted, resumed
from .errors import SparkClusterError, WatchdogFailed  # noqa: F401 - re-exported
from .executor import Executor
from .facts import progressed
from .judge import sample_of
from .masking import mask_data
from .observation import NodeObs, RayObs
from .observe import Engine, group_containers, host_snapshot, observe_nodes, observe_ray
from .plan import build_plan
from .ranks import GpuBaseline, ProcessesReading, learn_baseline
from .state_dir import DIR_MODE, EVENTS_FILE, INCIDENTS_KEPT, append_private, private_dir, prune, read_private, write_private
from .transport import Nodes
from .watch_state import STATE_FILE, gpu_baselines, iso, load_decision, read_watchdog_state, save_watchdog_state

EventSink = Callable[[dict[str, Any]], None]


RESET_HINT = ("the watchdog stays stopped until told otherwise: fix the cause, then `spark-cluster up CONFIG` "
              "(a successful up resets it) or `spark-cluster watch --reset CONFIG`")


RESET_MARK = "breaker-reset"  # in state_dir: a reset asked for while a controller runs (it holds its state in memory)


def reset_breaker(cfg: ClusterConfig, why: str, *, recreated: bool = False) -> bool:
    """Take the watchdog out of `failed` (recorded in events.jsonl); False when it was not failed.
    recreated: a deliberate `up` recreated the group, which starts a new restart budget whatever the
    state (earlier restarts stay in the history, not counted). A running controller sees the mark
    this leaves and does the same on its next period."""
    wd = Watchdog(cfg, None)  # type: ignore[arg-type] - no node is contacted
    try:
        if wd.state.phase != "failed" and not recreated:
            return False
        reset = wd.deliberate_start(why)
        wd.save_state()
        write_private(wd.dir / RESET_MARK, why + "\n", wd.secrets)
        return reset
    finally:
        wd.close()


class Watchdog:
    def __init__(self, cfg: ClusterConfig, nodes: Nodes, *, on_event: EventSink | None = None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] | None = None,
                 in_flight: Callable[[], int] = lambda: 0, http: Optional[httpx.Client] = None):
        """http: the client for the engine's API (probes, the canary, readiness after a restart); by
        default one with the engine's API key, when it has one. Tests give one on a fake transport."""
        self.cfg = cfg
        self.nodes = nodes
        self.s = cfg.watchdog.model_copy(update={"busy_budget_s": cfg.busy_budget_s()})
        self.clock = clock
        # commands from another thread (the controller's API): carried out by the loop at once
        self.woken = threading.Event()
        self.sleep = sleep or self._nap
        self.restart_requested: Optional[str] = None
        self.paused = False
        self._pause_wanted: Optional[bool] = None
        self.on_event = on_event or (lambda e: None)
        self.in_flight = in_flight  # requests the controller's gateway has sent the engine and not seen finish
        self.dir = private_dir(cfg.resolved_state_dir())
        self.secrets = cfg.secret_values()  # masked in every event and every file of a bundle
        self.events_path = self.dir / EVENTS_FILE
        self.state_path = self.dir / STATE_FILE
        self.plan = build_plan(cfg, links=kept.links(cfg))
        self.expected_nodes = {n.name: n.address for n in cfg.nodes}
        self.ray_step = next((s for s in self.plan.steps if s.kind == "wait-ray"), None)
        # Ray's membership is asked in the background (importing Ray costs a second or two of CPU on
        # the head): at most one probe in flight, started at most every timeouts.RAY_PROBE_INTERVAL_S
        self.ray_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-probe")
        self.ray_probe: Optional[Future[RayObs]] = None
        self.ray_probe_started = float("-inf")
        self.last_ray: Optional[RayObs] = None  # the last answer of a Ray probe (for incident bundles)
        self.trail: deque[dict[str, Any]] = deque(maxlen=200)
        # a state file of another shape is set aside with an alert: the watchdog starts afresh
        saved = read_watchdog_state(cfg, alert=lambda why: self.event("alert", reason=why))
        self.state = load_decision(saved, self.clock())
        self.gpu_baseline: dict[str, GpuBaseline] = gpu_baselines(saved)
        self.samples: deque[dict[str, Any]] = deque(maxlen=60)
        self.canary_result: Optional[tuple[Optional[bool], float, Optional[int]]] = None
        self.containers = {n.name: group_containers(self.plan, n.name) for n in cfg.nodes}
        self.last_nodes: list[NodeObs] = []
        self.last_procs: dict[str, ProcessesReading] = {}  # each node's last reading of its processes (CPU between two)
        self.last_good: Optional[float] = None  # when the cluster was last seen healthy (time to detect)
        self.decided_at: Optional[float] = None  # when the running restart was decided (time to recover)
        self.engine = Engine(cfg, http)

    # ---- commands (thread-safe: they only set a flag and wake the loop) ------------------------
    def _nap(self, seconds: float) -> None:
        self.woken.wait(seconds)
        self.woken.clear()

    def request_restart(self, reason: str) -> None:
        self.restart_requested = reason
        self.woken.set()

    def pause(self, paused: bool = True) -> None:
        self._pause_wanted = paused
        self.woken.set()

    @property
    def busy_restarting(self) -> bool:
        return self.state.phase in ("backoff", "restarting") or self.restart_requested is not None

    # ---- persistence ----------------------------------------------------------------------
    def save_state(self) -> None:
        save_watchdog_state(self.state_path, self.state, self.clock(), self.gpu_baseline)

    def event(self, kind: str, **data: Any) -> None:
        e = mask_data(json.loads(json.dumps({"ts": iso(self.clock()), "event": kind, "cluster": self.cfg.name, **data}, default=str)),
                      self.secrets)
        self.trail.append(e)
        append_private(self.events_path, json.dumps(e) + "\n")
        self.on_event(e)

    # ---- observation (never raises) ---------------------------------------------------------
    def observe(self) -> Sample:
        now = self.clock()
        cfg = self.cfg
        t_probe = cfg.health.probe_timeout_s
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nodes") as pool:  # the engine is asked meanwhile
            reading = pool.submit(observe_nodes, cfg, self.nodes, self.plan, t_probe + timeouts.NODE_PROBE_EXTRA_S)
            vllm = self.engine.sample(t_probe)
            nodes = reading.result()
        canary = self.canary_result
        self.canary_result = None
        self.last_nodes = nodes
        self._ranks(nodes)
        sample = sample_of(nodes, self._ray_obs(), vllm, self.expected_nodes, now, canary, self.in_flight())
        self.samples.append(dataclasses.asdict(sample))
        return sample

    def _ranks(self, nodes: list[NodeObs]) -> None:
        """Each node's rank activity, from its processes against their last reading and its GPUs."""
        for n in nodes:
            n.judge_ranks(self.containers[n.name], self.last_procs.get(n.name), self.gpu_baseline.get(n.name, GpuBaseline()))
            if n._procs is not None:
                self.last_procs[n.name] = n._procs
            else:
                self.last_procs.pop(n.name, None)

    def _learn(self, sample: Sample, moved: bool) -> None:
        """The GPUs' idle power while the engine is ready with nothing to do, their busy power while it progresses."""
        if self.state.phase != "healthy":  # what a stalled, starting or failed engine draws teaches nothing
            return
        idle = sample.health == 200 and not sample.pending and not moved
        working = moved and sample.pending > 0
        for n in self.last_nodes:
            self.gpu_baseline[n.name] = learn_baseline(self.gpu_baseline.get(n.name, GpuBaseline()), n.gpu_power_w,
                                                       idle=idle, working=working)

    def _ray_obs(self) -> RayObs:
        """The answer of the last finished Ray probe (then a new one starts), or not checked yet."""
        if self.ray_step is None:
            return RayObs()
        ray = RayObs()
        if self.ray_probe is not None and self.ray_probe.done():
            ray = self.last_ray = self.ray_probe.result()
            self.ray_probe = None
        if self.ray_probe is None and time.monotonic() - self.ray_probe_started >= timeouts.RAY_PROBE_INTERVAL_S:
            self.ray_probe_started = time.monotonic()
            self.ray_probe = self.ray_pool.submit(observe_ray, self.nodes[self.cfg.head.name], self.cfg, self.plan,
                                                  max(self.cfg.health.probe_timeout_s, timeouts.QUICK_S))
        return ray

    # ---- actions ----------------------------------------------------------------------------
    def incident_bundle(self, reason: str) -> Path:
        """What the watchdog knew (decision trail, observations, the last metrics, Ray's state as its
        last probe saw it, its own state) plus each node's host facts now, asked in parallel within
        timeouts.INCIDENT_S: the restart waits for the bundle. The containers' logs are added by the
        kill. (Ray is not asked afresh: importing Ray on the head costs seconds of the restart, and a
        probe at most timeouts.RAY_PROBE_INTERVAL_S old says which nodes Ray had and what the engine held.)"""
        slug = re.sub(r"[^a-z0-9]+", "-", reason.lower())[:40].strip("-")
        name = f"{datetime.fromtimestamp(self.clock()).strftime('%Y%m%d-%H%M%S')}-{slug}"
        prune(private_dir(self.dir / "incidents"), INCIDENTS_KEPT - 1)  # the newest kept, this one among them
        d = self.dir / "incidents" / name
        n = 1
        while True:  # two incidents within one second keep two bundles
            try:
                d.mkdir(mode=DIR_MODE)
                break
            except FileExistsError:
                n += 1
                d = d.with_name(f"{name}-{n}")
        files = {"reason.txt": reason + "\n",
                 "decision-trail.jsonl": "".join(json.dumps(e, default=str) + "\n" for e in self.trail),
                 "observations.jsonl": "".join(json.dumps(x) + "\n" for x in self.samples),
                 "metrics.txt": self.engine.last_metrics_text,
                 "state.json": json.dumps(dataclasses.asdict(self.state), indent=1, default=list)}
        if self.last_ray is not None:
            files["ray-state.json"] = self.last_ray.model_dump_json(indent=1) + "\n"
        ranks = {n.name: {"activity": n.activity, "evidence": n.activity_evidence, "gpu_power_w": n.gpu_power_w,
                          "gpu_memory_util": n.gpu_memory_util, "gpu_baseline": dataclasses.asdict(self.gpu_baseline.get(n.name, GpuBaseline()))}
                 for n in self.last_nodes}
        files["ranks.json"] = json.dumps(ranks, indent=1) + "\n"

        with ThreadPoolExecutor(max_workers=len(self.cfg.nodes), thread_name_prefix="incident") as pool:
            for n, text in zip(self.cfg.nodes, pool.map(lambda n: host_snapshot(self.nodes[n.name]), self.cfg.nodes)):
                files[f"{n.name}-host.txt"] = text
        for file, text in files.items():
            write_private(d / file, text, self.secrets)
        return d

    def restart(self, action: Action) -> None:
        """The ordered gang restart, timed by part: the incident bundle, the kill (logs saved into the
        bundle), then `up`'s parts (executor.phases). The parts go into restart-done and the bundle."""
        if action.delay_s:
            self.event("backoff", seconds=action.delay_s, reason=action.reason)
            self.sleep(action.delay_s)
        phases: dict[str, float] = {}
        t0 = time.monotonic()
        bundle = self.incident_bundle(action.reason)
        phases["incident-bundle"] = round(time.monotonic() - t0, 2)
        self.event("incident", reason=action.reason, bundle=str(bundle))
        self.event("restart-start", reason=action.reason, attempt=self.state.consecutive + 1)
        ex = Executor(self.cfg, self.nodes, report=lambda e: self.event(
            "executor", step_event=e.get("event"), **{k: v for k, v in e.items() if k not in ("ts", "event")}), http=self.engine.http)
        ok, error = True, None
        try:
            t = time.monotonic()
            try:
                ex.down(graceful=False, logs_to=bundle / "logs")
            finally:
                phases["kill"] = round(time.monotonic() - t, 2)
            ex.up()
        except SparkClusterError as exc:
            ok, error = False, str(exc)
        phases.update(ex.phases)
        took = round(time.monotonic() - t0, 1)
        self.ray_probe = None  # an answer about the previous generation is no news about this one
        self.last_ray = None
        self.state = restarted(self.state, self.clock(), error or "")
        recover = round(self.clock() - self.decided_at, 1) if self.decided_at is not None else None
        done = {"seconds": took, "recover_s": recover, "phases": phases, "error": error}
        write_private(bundle / "restart.json", json.dumps({"event": "restart-done" if ok else "restart-failed", **done}, indent=1) + "\n",
                      self.secrets)
        self.event("restart-done" if ok else "restart-failed", **done)

    # ---- the loop ---------------------------------------------------------------------------
    def _commands(self) -> None:
        mark = self.dir / RESET_MARK
        if mark.exists():
            why = read_private(mark).decode("utf-8", "replace").strip()
            mark.unlink(missing_ok=True)
            self.deliberate_start(why)  # `up` or `watch --reset` ran while this loop held its state
        wanted, self._pause_wanted = self._pause_wanted, None
        if wanted and not self.paused:
            self.paused = True
            self.event("watch-paused", state=self.state.phase)
        elif wanted is False and (self.paused or self.state.phase == "failed"):  # resume also takes a tripped breaker back
            self.paused = False
            self.deliberate_start("resumed through the controller's API", recreated=False)  # a person has looked
            self.state = resumed(self.state, self.clock())
            self.event("watch-resumed", state=self.state.phase)

    def deliberate_start(self, why: str, *, recreated: bool = True) -> bool:
        """Someone took a deliberate step: a failed watchdog has its breaker reset (True); one that was not
        failed starts a new restart budget when the group was recreated (`up`). Recorded as an event."""
        if self.state.phase == "failed":
            previous = self.state.last_reason
            self.state = breaker_reset(self.state, self.clock())
            self.event("breaker-reset", why=why, previous=previous)
            return True
        if recreated:
            self.state = fresh_budget(self.state, self.clock())
            self.event("restart-budget", why=why, not_counted=len(hour_restarts(self.state, self.clock())))
        return False

    def step(self) -> Optional[Action]:
        """One period: observe, decide, act. Returns the action taken (for tests and logs).
        Paused: observe only. A restart asked for (the API) is carried out whatever the phase."""
        self._commands()
        sample = self.observe()
        before, before_counters = self.state.phase, self.state.last_counters
        now = self.clock()
        requested, self.restart_requested = self.restart_requested, None
        if requested is not None:
            self.state, action = requested_restart(self.state, now, requested, self.s)
        elif self.paused:
            return None
        else:
            self.state, action = decide(self.state, sample, now, self.s)
        self._learn(sample, moved=before_counters is not None and progressed(before_counters, sample.counters))
        if self.state.phase != before:
            self.event("state", state=self.state.phase, previous=before, reason=self.state.suspect_reason or self.state.last_reason,
                       running=sample.running, waiting=sample.waiting, health=sample.health)
        if self.state.phase == "healthy":
            self.last_good = now
        if action is not None:
            extra = {}
            if action.kind == "restart":
                self.decided_at = now
                # from the last observation that found it healthy (when a busy engine stalled; an idle engine's
                # last progress can be long before its failure, so it is no measure)
                extra["detect_s"] = round(now - self.last_good, 1) if self.last_good is not None else None
            self.event("decision", action=action.kind, reason=action.reason, delay_s=action.delay_s, **extra)
            if action.kind == "canary":
                self.canary_result = ok, took, refused = self.engine.canary(self.s.canary_timeout_s)
                self.event("canary", ok=ok, seconds=took, **({"refused": refused} if refused else {}))
            elif action.kind == "restart":
                self.save_state()
                self.restart(action)
            elif action.kind == "alert":
                self.event("alert", reason=action.reason)
        self.save_state()
        return action

    def run(self, *, max_seconds: float | None = None, stop: Callable[[], bool] | None = None, stop_when_failed: bool = True) -> State:
        """The loop. stop_when_failed: raise WatchdogFailed when the breaker trips (the CLI's `watch`);
        the controller keeps observing instead (its page, metrics and gateway need the facts)."""
        t_end = None if max_seconds is None else time.monotonic() + max_seconds
        self.event("watch-start", state=self.state.phase, period_s=self.s.period_s)
        try:
            while True:
                t0 = time.monotonic()
                self.step()
                if self.state.phase == "failed" and stop_when_failed:
                    raise WatchdogFailed(self.state.last_reason, hint=RESET_HINT)
                if (stop and stop()) or (t_end is not None and time.monotonic() >= t_end):
                    return self.state
                rest = self.s.period_s - (time.monotonic() - t0)
                if self.canary_result is not None:
                    rest = 0  # feed the canary's result back at once
                if rest > 0:
                    self.sleep(rest)
        finally:
            self.event("watch-stop", state=self.state.phase)
            self.save_state()
            self.close()

    def close(self) -> None:
        self.engine.close()
        self.ray_pool.shutdown(wait=False, cancel_futures=True)
