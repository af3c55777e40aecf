"""The failover controller: observe every period, decide (spark_cluster.decide), act.

Each job has a room: observing (watch_observe.Eyes), deciding (decide, a pure function),
restarting (restart_choice picks a kind, watch_restart carries it out: the kept or the full
restart), recording (watch_record.Record). This loop
sequences them and takes commands from the controller's API. Actions: a 1-token canary
completion; an incident bundle then a restart of the whole group; an alert when the circuit
breaker trips. Every change, decision and action is a JSON line in state_dir/events.jsonl; the
decision state lives in state_dir/watchdog.json, so the controller can be restarted at any time
without losing its history or touching a healthy cluster.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

from .config import ClusterConfig
from .decide import Action, Sample, State, breaker_reset, decide, fresh_budget, hour_restarts, requested_restart, restarted, resumed
from .errors import WatchdogFailed
from .facts import progressed
from .observe import answers, host_snapshot
from .state_dir import read_private, write_private
from .transport import Nodes
from .watch_observe import Eyes
from .watch_record import EventSink, Record
from .restart_choice import choose_restart
from .watch_restart import FullRestart, KeptRestart
from .watch_state import gpu_baselines, load_decision, read_watchdog_state


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
        write_private(wd.dir / RESET_MARK, why + "\n", wd.rec.secrets)
        return reset
    finally:
        wd.close()


class Watchdog:
    def __init__(self, cfg: ClusterConfig, nodes: Nodes, *, on_event: EventSink | None = None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] | None = None,
                 in_flight: Callable[[], int] = lambda: 0, http: Optional[httpx.Client] = None):
        """http: the client for the engine's API (probes, the canary, readiness after a restart); by
        default one with the engine's API key, when it has one. Tests give one on a fake transport.
        in_flight: requests the controller's gateway has with the engine, their clients reading."""
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
        self.rec = Record(cfg, clock, on_event or (lambda e: None))
        self.dir = self.rec.dir
        # a state file of another shape is set aside with an alert: the watchdog starts afresh
        saved = read_watchdog_state(cfg, alert=lambda why: self.event("alert", reason=why))
        self.state = load_decision(saved, self.clock())
        self.eyes = Eyes(cfg, nodes, gpu_baselines(saved), in_flight, http)
        self.full_restart = FullRestart(cfg, nodes, self.eyes.engine.http, self.event)
        self.kept_restart = KeptRestart(cfg, nodes, self.eyes.engine.http, self.event, self.full_restart)
        self.last_good: Optional[float] = None  # when the cluster was last seen healthy (time to detect)
        self.decided_at: Optional[float] = None  # when the running restart was decided (time to recover)

    # what the controller, its metrics and tests read of the rooms
    @property
    def samples(self):
        return self.eyes.samples

    @property
    def engine(self):
        return self.eyes.engine

    @property
    def canary_result(self):
        return self.eyes.canary_result

    @canary_result.setter
    def canary_result(self, value) -> None:
        self.eyes.canary_result = value

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

    # ---- recording ------------------------------------------------------------------------------
    def save_state(self) -> None:
        self.rec.save(self.state, self.eyes.gpu_baseline)

    def event(self, kind: str, **data: Any) -> None:
        self.rec.event(kind, **data)

    def observe(self) -> Sample:
        return self.eyes.observe(self.clock())

    # ---- actions ----------------------------------------------------------------------------
    def incident_bundle(self, reason: str) -> Path:
        """What the watchdog knew (decision trail, observations, the last metrics, Ray's state as its
        last probe saw it, its own state) plus each node's host facts now, asked in parallel within
        timeouts.INCIDENT_S (a node the last observation found silent is not asked: its file says
        so): the restart waits for the bundle. The containers' logs are added by the kill. (Ray is
        not asked afresh: importing Ray on the head costs seconds of the restart, and a probe at most
        timeouts.RAY_PROBE_INTERVAL_S old says which nodes Ray had and what the engine held.)"""
        files = {**self.eyes.known(), "state.json": json.dumps(dataclasses.asdict(self.state), indent=1, default=list)}
        silent = {n.name: n.error for n in self.eyes.last_nodes if not n.reachable}  # not waited for: asked, they would cost a timeout
        asked = [n.name for n in self.cfg.nodes if n.name not in silent]
        with ThreadPoolExecutor(max_workers=max(1, len(asked)), thread_name_prefix="incident") as pool:
            for name, text in zip(asked, pool.map(lambda name: host_snapshot(self.nodes[name]), asked)):
                files[f"{name}-host.txt"] = text
        for name, error in silent.items():
            files[f"{name}-host.txt"] = f"not asked: the node did not answer the last observation ({error or 'no reason given'})\n"
        return self.rec.bundle(reason, files)

    def restart(self, action: Action) -> None:
        """The restart, timed by part: the incident bundle, then the restarter's own parts (the kill, up's).
        The parts go into restart-done and the bundle."""
        if action.delay_s:
            self.event("backoff", seconds=action.delay_s, reason=action.reason)
            self.sleep(action.delay_s)
        t0 = time.monotonic()
        bundle = self.incident_bundle(action.reason)
        phases: dict[str, float] = {"incident-bundle": round(time.monotonic() - t0, 2)}
        self.event("incident", reason=action.reason, bundle=str(bundle))
        t = time.monotonic()
        if self.members_answer():
            phases["member-wait"] = round(time.monotonic() - t, 2)
        choice = choose_restart(self.s.restart, self.cfg.executor, self.eyes.last_nodes, self.eyes.last_ray,
                                {n.name: n.address for n in self.cfg.nodes})
        self.event("restart-start", reason=action.reason, attempt=self.state.consecutive + 1, restart=choice.kind, why=choice.why)
        error, parts = (self.kept_restart if choice.kind == "kept" else self.full_restart).run(bundle)
        phases.update(parts)
        took = round(time.monotonic() - t0, 1)
        self.eyes.new_generation()
        self.state = restarted(self.state, self.clock(), error or "")
        recover = round(self.clock() - self.decided_at, 1) if self.decided_at is not None else None
        done = {"seconds": took, "recover_s": recover, "restart": choice.kind, "phases": phases, "error": error}
        kind = "restart-failed" if error else "restart-done"
        self.rec.write(bundle / "restart.json", json.dumps({"event": kind, **done}, indent=1) + "\n")
        self.event(kind, **done)

    def members_answer(self) -> bool:
        """Nodes the last observation found silent are waited for (watchdog.member_wait_s, asked every
        period): a restart without them would fail at once and count against the breaker. False when
        there was nothing to wait for."""
        silent = [n.name for n in self.eyes.last_nodes if not n.reachable]
        if not silent:
            return False
        self.event("restart-waiting", nodes=silent, up_to_s=self.s.member_wait_s)
        deadline = self.clock() + self.s.member_wait_s
        while silent and self.clock() < deadline:
            self.sleep(self.s.period_s)
            silent = [name for name in silent if not answers(self.nodes[name], self.cfg.health.probe_timeout_s)]
        self.event("members-answer" if not silent else "members-silent", nodes=silent)
        return True

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
        if self.state.phase == "healthy":  # what a stalled, starting or failed engine draws teaches nothing
            self.eyes.learn(sample, moved=before_counters is not None and progressed(before_counters, sample.counters))
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
        self.eyes.close()
