"""The watchdog's decision: a pure function of recorded samples and the clock.

No threads, no I/O: `decide(state, sample, now, settings)` returns the new state and at most
one action. The runner (spark_cluster.watchdog) observes, calls it, and carries actions out.

The rules, from what the field knows (docs/field.md):
- Busy is not dead. Any movement of the progress counters (engine steps, generated or prompt
  tokens) means healthy, however slow. Latency alone never restarts anything.
- Suspect: no progress while requests are running or waiting; or the API stops answering.
- Confirmed hang: suspect for the whole stall window AND a 1-token canary completion does not
  finish within its deadline.
- What the ranks are doing decides before the canary (spark_cluster.ranks): no progress while every
  rank works (GPU power above its idle baseline, CPU ranks using CPU, a compile running) is `busy`:
  no canary, no restart, up to the busy budget (the engine's own step timeout: past it vLLM would have
  failed the step itself). No progress with a rank stopped, or spinning at near-idle power, is a
  wedge: confirmed once the stall window has passed, without a canary. Where no rank could be read,
  the stall window and the canary decide.
- A canary the engine refuses (401/403: the controller's API key is missing or wrong) proves nothing
  either way: an alert names the configuration error, and no canary confirms a hang until a restart.
- Do not trust the engine's own gauges alone: they freeze with the engine (a hang that starts as
  requests arrive reads 0 running). Work in flight is what the engine reports or, where the
  controller's gateway runs, what the gateway has sent it and not seen finish (its clients reading),
  whichever is more. But the gateway's count alone never confirms a hang: an engine that reports
  nothing pending may simply have finished (a client that stopped reading keeps its request open at
  the gateway, and the ranks then idle). On that count the watchdog only looks: the canary decides.
  And an idle engine gets a canary every `idle_canary_s`, since nothing else would reveal a
  wedge that nobody is waiting on yet.
- Definitively gone: a cluster container exited or vanished, or a node unreachable for several
  periods in a row. That needs no canary.
- After a (re)start became ready: a grace period without hang verdicts.
- Restart the whole group, with backoff (0 s, then min(base * 2^(n-1), max)) and a circuit
  breaker (more than N restarts in an hour: state failed, no more restarts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Optional

from .serving_settings import VLLM_STEP_TIMEOUT_S, WatchdogSettings
from .errors import ENGINE_KEY_FIX
from .facts import progressed

WatchState = Literal["starting", "healthy", "busy", "suspect", "backoff", "restarting", "failed"]
ActionKind = Literal["canary", "restart", "alert"]

# Consecutive unreachable samples before a node counts as gone (a blip of SSH is not a failure).
UNREACHABLE_SAMPLES = 3
# A restart that has not become ready after this long is a failed attempt (the executor's own
# readiness deadline ends it first; this is the backstop of the state machine).
STARTING_LIMIT_S = 3600.0


@dataclass(frozen=True)
class Sample:
    """One observation, reduced to what the decision needs."""

    t: float
    health: Optional[int] = None  # /health status; None: no answer
    steps_total: Optional[float] = None
    generation_tokens_total: Optional[float] = None
    prompt_tokens_total: Optional[float] = None
    running: float = 0
    waiting: float = 0
    kv_cache_usage: Optional[float] = None  # shown (metrics), not decided on
    itl_sum: Optional[float] = None  # the engine's inter-token latency histogram: the slow verdict's (spark_cluster.speed)
    itl_count: Optional[float] = None
    gateway_in_flight: float = 0  # requests the controller's gateway has sent the engine and not seen finish
    gone: tuple[str, ...] = ()  # containers exited/missing, the vLLM process gone, Ray nodes dead or missing: definitive
    unreachable: tuple[str, ...] = ()  # nodes that did not answer SSH this time
    canary_ok: Optional[bool] = None  # result of a canary performed since the last sample
    canary_s: Optional[float] = None
    canary_refused: Optional[int] = None  # 401/403: the engine refused the canary's API key (no verdict either way)
    ranks: str = "unknown"  # ranks.group_activity: busy, wedged or unknown
    rank_evidence: str = ""

    @property
    def counters(self) -> tuple:
        """In the order of facts.PROGRESS_COUNTERS."""
        return (self.steps_total, self.generation_tokens_total, self.prompt_tokens_total)

    @property
    def engine_pending(self) -> float:
        """Requests the engine itself reports running or waiting."""
        return (self.running or 0) + (self.waiting or 0)

    @property
    def pending(self) -> float:
        """Requests in flight or waiting: the engine's gauges freeze with it, the gateway's count does not."""
        return max(self.engine_pending, self.gateway_in_flight or 0)


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    reason: str
    delay_s: float = 0.0


@dataclass(frozen=True)
class State:
    phase: WatchState = "starting"
    since: float = 0.0  # when the current phase began
    ready_at: Optional[float] = None  # when the current generation last became ready
    last_counters: Optional[tuple] = None
    last_progress: Optional[float] = None
    suspect_since: Optional[float] = None
    suspect_reason: str = ""
    canary_pending: bool = False
    last_canary: Optional[float] = None
    unreachable_count: dict = field(default_factory=dict)
    restarts: tuple[float, ...] = ()  # times of restarts (for the breaker)
    consecutive: int = 0  # restarts since the last long-enough healthy period
    healthy_since: Optional[float] = None
    backoff_until: Optional[float] = None
    last_restart: Optional[float] = None
    last_reason: str = ""
    # grace applies when the engine was seen coming up (after our restart, or loading when the
    # watchdog started); a watchdog (re)started next to a serving engine needs none
    grace_on_ready: bool = False
    # why the last restart failed (it may have changed nothing: the old, wedged engine can still
    # answer /health, which must not count as the new generation being ready)
    failed_restart: str = ""
    key_refused: bool = False  # the engine refused the canary's key: no canary confirms anything until a restart
    # a deliberate start (`up` that recreated the group, `watch --reset`) begins a new restart budget:
    # earlier restarts stay in the history, shown, and the breaker no longer counts them
    budget_since: Optional[float] = None


def backoff_s(consecutive: int, s: WatchdogSettings) -> float:
    """Delay before restart number consecutive+1: 0 for the first, then base*2^(n-1) capped."""
    if consecutive <= 0:
        return 0.0
    return float(min(s.backoff_base_s * math.pow(2, consecutive - 1), s.backoff_max_s))


BREAKER_WINDOW_S = 3600.0  # the circuit breaker counts restarts over the last hour


def recent_restarts(state: State, now: float) -> tuple[float, ...]:
    """The restarts the breaker counts: the last hour's since the last deliberate start (shown by the
    watchdog's state file and the controller too)."""
    return tuple(t for t in state.restarts if now - t < BREAKER_WINDOW_S and (state.budget_since is None or t >= state.budget_since))


def hour_restarts(state: State, now: float) -> tuple[float, ...]:
    """Every restart of the last hour, those before a deliberate start included (the history shown)."""
    return tuple(t for t in state.restarts if now - t < BREAKER_WINDOW_S)


def _restart(state: State, now: float, reason: str, s: WatchdogSettings) -> tuple[State, Action]:
    recent = recent_restarts(state, now)
    if len(recent) >= s.max_restarts_per_hour:
        msg = f"circuit breaker: {len(recent)} restarts in the last hour (limit {s.max_restarts_per_hour}); not restarting: {reason}"
        return replace(state, phase="failed", since=now, restarts=recent, last_reason=msg, suspect_since=None, suspect_reason=""), \
            Action("alert", msg)
    if not s.enabled:
        msg = f"restart needed but the watchdog only observes (watchdog.enabled: false): {reason}"
        return replace(state, phase="failed", since=now, last_reason=msg, suspect_since=None, suspect_reason=""), Action("alert", msg)
    delay = backoff_s(state.consecutive, s)
    new = replace(state, phase="backoff" if delay else "restarting", since=now, backoff_until=now + delay,
                  suspect_since=None, suspect_reason="", canary_pending=False, last_reason=reason)
    return new, Action("restart", reason, delay_s=delay)


def restarted(state: State, now: float, error: str = "") -> State:
    """The runner calls this when a restart has been carried out (ready or not); error: why it failed."""
    return replace(state, phase="starting", since=now, ready_at=None, restarts=hour_restarts(state, now) + (now,),
                   consecutive=state.consecutive + 1, last_restart=now, last_counters=None, last_progress=None,
                   suspect_since=None, canary_pending=False, healthy_since=None, backoff_until=None, unreachable_count={},
                   grace_on_ready=True, failed_restart=error, key_refused=False)


def request_refused(state: State, now: float, s: WatchdogSettings) -> Optional[str]:
    """Why a restart asked for through the API is refused (None: it is carried out): it counts against the
    circuit breaker like any other, so a script calling it in a loop cannot restart-loop the group (restart
    loops leak unified memory). Resume resets a tripped breaker. Pure."""
    recent = recent_restarts(state, now)
    if len(recent) >= s.max_restarts_per_hour:
        return (f"{len(recent)} restarts in the last hour reach the circuit breaker's limit (watchdog.max_restarts_per_hour "
                f"{s.max_restarts_per_hour}): resume the watchdog (POST /api/watchdog/resume) to reset it, then restart")
    return None


def requested_restart(state: State, now: float, reason: str, s: WatchdogSettings) -> tuple[State, Action]:
    """A person asked for a restart (POST /api/restart): carried out at once whatever the phase, with no
    backoff, within the circuit breaker (request_refused: then an alert); it counts in the restart history
    like any other."""
    refused = request_refused(state, now, s)
    if refused is not None:
        return state, Action("alert", f"restart asked for through the API refused: {refused}")
    new = replace(state, phase="restarting", since=now, backoff_until=now, suspect_since=None, suspect_reason="",
                  canary_pending=False, last_reason=reason, failed_restart="")
    return new, Action("restart", reason)


def resumed(state: State, now: float) -> State:
    """The watchdog resumes after a pause: what it knew before the pause is stale, so it confirms afresh
    (as a new controller process does); a failed watchdog stays failed."""
    if state.phase == "failed":
        return state
    return replace(state, phase="starting", since=now, ready_at=None, suspect_since=None, suspect_reason="",
                   canary_pending=False, grace_on_ready=False, unreachable_count={}, last_counters=None, last_progress=None)


def breaker_reset(state: State, now: float) -> State:
    """A deliberate way out of `failed` (watch --reset, or a successful manual up): a new restart
    budget (the history is kept, not counted) and the next observation is confirmed afresh."""
    return replace(State(phase="starting", since=now, restarts=hour_restarts(state, now), budget_since=now),
                   last_reason=f"reset after: {state.last_reason}" if state.last_reason else "")


def fresh_budget(state: State, now: float) -> State:
    """A deliberate start that recreated the group (`up`): the restarts before it no longer count
    towards the breaker, and the backoff starts over; the watchdog confirms the new group afresh."""
    return replace(resumed(state, now), budget_since=now, consecutive=0, restarts=hour_restarts(state, now), failed_restart="")


Outcome = tuple[State, Optional[Action]]


def decide(state: State, x: Sample, now: float, s: WatchdogSettings) -> Outcome:
    if state.phase in ("failed", "backoff", "restarting"):
        # failed: until told otherwise; backoff, restarting: the runner is carrying the restart out
        return state, None
    if state.phase == "starting" and state.failed_restart:
        # nothing says the group was replaced: try again (with backoff, under the breaker)
        return _restart(replace(state, failed_restart=""), now, f"the last restart failed: {state.failed_restart}", s)
    state, done = _members(state, x, now, s)
    if done is None:
        done = _readiness(state, x, now, s)
    if done is not None:
        return done
    moved = state.last_counters is not None and progressed(state.last_counters, x.counters)
    if moved or state.last_progress is None:
        # stamped when the counters were read (the sample's start), not when its slowest node answered:
        # a node that takes its whole timeout would otherwise hide that long of a stall
        state = replace(state, last_progress=min(x.t, now))
    state = replace(state, last_counters=x.counters)
    in_grace = state.ready_at is not None and now - state.ready_at < s.grace_after_start_s
    state, done = _canary_result(state, x, now, s, in_grace)
    if done is not None:
        return done
    if moved or (x.health == 200 and x.pending == 0 and state.suspect_since is None):
        return _healthy(state, now, s, moved, in_grace)
    return _no_progress(state, x, now, s, in_grace)


def _members(state: State, x: Sample, now: float, s: WatchdogSettings) -> tuple[State, Optional[Outcome]]:
    """Who is gone, definitively: a member, or a node unreachable for UNREACHABLE_SAMPLES periods."""
    counts = {n: state.unreachable_count.get(n, 0) + 1 for n in x.unreachable}
    state = replace(state, unreachable_count=counts)
    lost = [n for n, c in counts.items() if c >= UNREACHABLE_SAMPLES]
    if not (x.gone or lost):
        return state, None
    parts = list(x.gone) + [f"node {n} unreachable for {counts[n]} periods" for n in lost]
    if state.phase == "starting" and state.ready_at is None and not lost and now - state.since < 5:
        return state, (state, None)  # containers being (re)created right now
    return state, _restart(state, now, "member gone: " + "; ".join(parts), s)


def _readiness(state: State, x: Sample, now: float, s: WatchdogSettings) -> Optional[Outcome]:
    """Waiting for the API after a (re)start (None once it answered before)."""
    if not (state.phase == "starting" and state.ready_at is None):
        return None
    if x.health == 200:
        ready_at = now if state.grace_on_ready else now - s.grace_after_start_s
        return replace(state, ready_at=ready_at, phase="healthy", since=now, healthy_since=now,
                       last_counters=x.counters, last_progress=now), None
    state = replace(state, grace_on_ready=True)
    if now - state.since > STARTING_LIMIT_S:
        return _restart(state, now, f"not ready {STARTING_LIMIT_S:g}s after start", s)
    return state, None


def _canary_result(state: State, x: Sample, now: float, s: WatchdogSettings, in_grace: bool) -> tuple[State, Optional[Outcome]]:
    """A canary's answer: the key refused (an alert, once), finished (healthy), or not (a hang confirmed)."""
    if x.canary_refused is not None:
        state = replace(state, canary_pending=False, last_canary=now)
        if not state.key_refused:
            state = replace(state, key_refused=True)
            return state, (state, Action(
                "alert", f"configuration error: vLLM answers {x.canary_refused} to the canary (the controller's API key is missing "
                         f"or wrong: {ENGINE_KEY_FIX}); no canary can confirm a hang"))
    if x.canary_ok is None:
        return state, None
    state = replace(state, canary_pending=False, last_canary=now)
    if x.canary_ok:
        return replace(state, phase="healthy", suspect_since=None, suspect_reason="", last_progress=now), None
    if state.suspect_since is not None and now - state.suspect_since >= s.stall_window_s:
        return state, _restart(state, now, f"hang confirmed: {state.suspect_reason}, and a 1-token canary did not finish within "
                                           f"{s.canary_timeout_s:g}s", s)
    if state.suspect_since is None and not x.pending and not in_grace:
        # idle engine whose canary did not finish: as good as a hang with work in flight
        return state, _restart(state, now, f"hang confirmed: idle engine did not finish a 1-token canary within {s.canary_timeout_s:g}s", s)
    return state, None


def _healthy(state: State, now: float, s: WatchdogSettings, moved: bool, in_grace: bool) -> Outcome:
    """Progress, or an idle engine that answers: healthy; an idle one is asked a canary now and then."""
    healthy_since = state.healthy_since if state.phase == "healthy" and state.healthy_since is not None else now
    consecutive = 0 if now - healthy_since >= s.backoff_reset_s else state.consecutive
    state = replace(state, phase="healthy", since=state.since if state.phase == "healthy" else now,
                    suspect_since=None, suspect_reason="", healthy_since=healthy_since, consecutive=consecutive)
    quiet = not moved and not in_grace and not state.canary_pending and not state.key_refused
    if quiet and (state.last_canary is None or now - state.last_canary >= s.idle_canary_s) \
            and now - (state.last_progress or now) >= s.idle_canary_s:
        return replace(state, canary_pending=True), Action("canary", "idle engine: periodic canary")
    return state, None


def _no_progress(state: State, x: Sample, now: float, s: WatchdogSettings, in_grace: bool) -> Outcome:
    """No progress: the API silent, or work waiting. Busy ranks are left alone within the budget, wedged
    ones restarted after the stall window; otherwise suspect, then a canary confirms."""
    if x.health != 200:
        reason = "the API does not answer" if x.health is None else f"/health answers {x.health}"
    elif x.pending > 0:
        engine = x.engine_pending
        stalled_s = now - (state.last_progress or now)
        reason = f"no progress for {stalled_s:.0f}s with {x.pending:g} request(s) in flight or waiting" + (
            f" (the gateway's count; the engine reports {engine:g})" if x.pending > engine else "")
        budget = s.busy_budget_s or VLLM_STEP_TIMEOUT_S
        if x.ranks == "busy" and stalled_s < budget:
            # one long step, a compile: the ranks work, nothing to confirm or restart
            return replace(state, phase="busy", since=state.since if state.phase == "busy" else now, suspect_since=None,
                           suspect_reason=f"{reason}; ranks working: {x.rank_evidence}"), None
        if x.ranks == "wedged" and engine > 0 and stalled_s >= s.stall_window_s and not in_grace:
            # idle ranks confirm a hang only with work the engine itself reports: an engine that finished its
            # requests idles too (the gateway's count alone then waits for the canary)
            return _restart(state, now, f"hang confirmed: {reason}, and {x.rank_evidence}", s)
        if x.unreachable and engine > 0 and stalled_s >= s.stall_window_s and not in_grace:
            # a member that does not answer while the engine's own work stands still: a cut link, a node gone
            # down; no canary can finish across it (UNREACHABLE_SAMPLES periods of a slow SSH timeout: 25 s)
            return _restart(state, now, f"hang confirmed: {reason}, and {', '.join(x.unreachable)} does not answer", s)
        if x.ranks == "busy":
            reason += f", past the busy budget of {budget:g}s (the engine's step timeout)"
    else:
        return state, None
    if state.suspect_since is None:
        state = replace(state, phase="suspect", since=now, suspect_since=state.last_progress or now, suspect_reason=reason)
    else:
        state = replace(state, suspect_reason=reason)
    if in_grace:
        return state, None
    if now - state.suspect_since >= s.stall_window_s and not state.canary_pending and not state.key_refused:
        return replace(state, canary_pending=True), Action("canary", f"suspect: {reason}")
    return state, None
