"""The watchdog's decision: a pure function, driven here by a fake clock (no threads, no sleeps)."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest

from spark_cluster.serving_settings import WatchdogSettings
from spark_cluster.decide import (
    UNREACHABLE_SAMPLES,
    Sample,
    State,
    backoff_s,
    breaker_reset,
    decide,
    recent_restarts,
    requested_restart,
    restarted,
    resumed,
)

S = WatchdogSettings()  # the defaults users get


class Clock:
    """Feeds samples every period; counts every action."""

    def __init__(self, s: WatchdogSettings = S, state: State | None = None):
        self.s = s
        self.t = 1000.0
        self.state = state or State(phase="starting", since=self.t)
        self.actions = []
        self.steps = 0.0

    def feed(self, seconds: float, *, progress: bool, running: float = 0, waiting: float = 0, health: int | None = 200,
             gone=(), unreachable=(), canary_ok=None, canary_result: bool | None = None, gateway: float = 0,
             ranks: str = "unknown", evidence: str = "", refused: int | None = None):
        """Advance `seconds` in periods; answer canaries with canary_result (None: leave them)."""
        end = self.t + seconds
        pending_canary, pending_refused = None, False
        while self.t < end:
            self.t += self.s.period_s
            if progress:
                self.steps += 3
            x = Sample(t=self.t, health=health, steps_total=self.steps, generation_tokens_total=self.steps * 2,
                       prompt_tokens_total=100, running=running, waiting=waiting, gateway_in_flight=gateway, gone=tuple(gone),
                       unreachable=tuple(unreachable), canary_ok=pending_canary if pending_canary is not None else canary_ok,
                       canary_refused=refused if pending_refused else None, ranks=ranks, rank_evidence=evidence)
            pending_canary, pending_refused = None, False
            self.state, action = decide(self.state, x, self.t, self.s)
            if action is not None:
                self.actions.append((self.t, action))
                if action.kind == "canary" and canary_result is not None:
                    pending_canary = canary_result
                if action.kind == "canary" and refused is not None:
                    pending_refused = True
                if action.kind == "restart":
                    self.state = restarted(self.state, self.t + action.delay_s)
                    self.t += action.delay_s
        return self

    def kinds(self):
        return [a.kind for _, a in self.actions]


def ready() -> Clock:
    c = Clock()
    c.feed(10, progress=False)  # the API answers: ready
    assert c.state.phase == "healthy" and c.state.ready_at is not None
    c.feed(S.grace_after_start_s, progress=True, running=1)  # past the grace period
    return c


def test_busy_but_slow_is_never_restarted():
    c = ready()
    # one step every third period: slow, but moving, for an hour, with a deep queue
    for _ in range(240):
        c.feed(S.period_s * 2, progress=False, running=16, waiting=40)
        c.feed(S.period_s, progress=True, running=16, waiting=40)
    assert "restart" not in c.kinds()


def test_hang_with_work_in_flight_is_confirmed_by_a_failing_canary():
    c = ready()
    t_freeze = c.t
    c.feed(60, progress=False, running=4, canary_result=False)
    restart = [(t, a) for t, a in c.actions if a.kind == "restart"]
    assert restart, c.actions
    t_detect, action = restart[0]
    assert "hang confirmed" in action.reason and "4 request(s)" in action.reason
    # a loaded hang is confirmed within 25 s at default settings (canary deadline included), with
    # 5 s left for the observations themselves (SSH and HTTP on a loaded node)
    assert t_detect - t_freeze + S.canary_timeout_s <= 20
    assert c.kinds().index("canary") < c.kinds().index("restart")


def test_hang_with_a_canary_that_succeeds_is_not_restarted():
    c = ready()
    c.feed(120, progress=False, running=4, canary_result=True)
    assert "restart" not in c.kinds() and "canary" in c.kinds()


def test_stall_shorter_than_the_window_is_ignored():
    c = ready()
    c.feed(S.stall_window_s - S.period_s, progress=False, running=4, canary_result=False)
    c.feed(60, progress=True, running=4)
    assert c.kinds() == []


def test_no_grace_for_an_engine_already_serving_when_the_watchdog_starts():
    c = Clock()
    c.feed(S.period_s, progress=False)  # answering at first sight: no grace
    c.feed(60, progress=False, running=4, canary_result=False)
    assert "restart" in c.kinds()


def test_no_verdict_during_the_grace_period():
    c = Clock()
    c.feed(10, progress=False, health=None)  # loading
    c.feed(S.period_s, progress=False)  # ready now
    c.feed(S.grace_after_start_s - 10, progress=False, running=3, canary_result=False)
    assert "restart" not in c.kinds()


def test_waiting_for_readiness_takes_as_long_as_it_takes():
    c = Clock()
    c.feed(1500, progress=False, health=None)  # a big model loading: the API does not answer for 25 min
    assert c.kinds() == [] and c.state.phase == "starting"


def test_member_gone_restarts_without_canary():
    c = ready()
    c.feed(S.period_s, progress=False, gone=["spark-vllm-worker on sim-2 exited"])
    assert c.kinds() == ["restart"] and "member gone" in c.actions[0][1].reason


def test_unreachable_node_needs_several_periods():
    c = ready()
    c.feed(S.period_s * (UNREACHABLE_SAMPLES - 1), progress=True, unreachable=["sim-2"])
    assert c.kinds() == []
    c.feed(S.period_s, progress=True, unreachable=["sim-2"])
    assert c.kinds() == ["restart"] and "sim-2 unreachable" in c.actions[0][1].reason


def test_idle_engine_gets_a_periodic_canary_and_a_failing_one_restarts():
    c = ready()
    c.feed(S.idle_canary_s + S.period_s * 2, progress=False, running=0, canary_result=True)
    assert "canary" in c.kinds() and "restart" not in c.kinds()
    c.actions.clear()
    c.feed(S.idle_canary_s + S.period_s * 2, progress=False, running=0, canary_result=False)
    assert c.kinds()[:2] == ["canary", "restart"]


def first_restart(c: Clock, since: float) -> float:
    """Seconds from `since` until the restart was decided, canary deadline included (the model's canary
    answers at the next period; the real one fails after canary_timeout_s)."""
    return next(t for t, a in c.actions if a.kind == "restart") - since + S.canary_timeout_s


def test_an_idle_hang_is_confirmed_within_45_s_even_just_after_a_canary():
    c = ready()
    c.feed(S.idle_canary_s + S.period_s * 2, progress=False, running=0, canary_result=True)  # a canary has just passed
    t_freeze = c.t
    c.feed(90, progress=False, running=0, canary_result=False)
    assert "idle engine" in c.actions[-1][1].reason
    assert first_restart(c, t_freeze) <= 40  # 5 s left for the observations


def test_a_hang_as_requests_arrive_is_confirmed_by_the_gateways_count_as_fast_as_a_loaded_one():
    """The engine's gauges froze at 0 running; the gateway knows 3 requests wait on it."""
    c = ready()
    c.feed(S.idle_canary_s - S.period_s * 3, progress=False, running=0)  # idle, nothing wrong
    assert c.kinds() == []
    t_freeze = c.t
    c.feed(60, progress=False, running=0, gateway=3, canary_result=False)
    assert "3 request(s)" in c.actions[-1][1].reason and "the gateway's count" in c.actions[-1][1].reason
    assert first_restart(c, t_freeze) <= 20


def test_without_the_gateway_a_hang_as_requests_arrive_is_found_by_the_idle_canary():
    c = ready()
    t_freeze = c.t
    c.feed(90, progress=False, running=0, canary_result=False)  # requests wait, the gauges say 0
    assert first_restart(c, t_freeze) <= 40


def test_requests_in_flight_at_the_gateway_while_the_engine_moves_are_busy_not_dead():
    c = ready()
    for _ in range(100):
        c.feed(S.period_s * 3, progress=False, running=0, gateway=8)  # a long prefill: 6 s without a step
        c.feed(S.period_s, progress=True, running=0, gateway=8)
    assert c.kinds() == []


def test_backoff_doubles_and_is_capped():
    assert [backoff_s(n, S) for n in range(7)] == [0, 10, 20, 40, 80, 160, 300]


def test_two_failures_back_off_and_the_breaker_trips():
    s = WatchdogSettings(max_restarts_per_hour=3)
    c = Clock(s)
    delays = []
    for _ in range(4):
        c.feed(10, progress=False)  # ready
        c.feed(s.grace_after_start_s, progress=True, running=1)
        c.feed(s.period_s, progress=False, gone=["spark-vllm on sim-1 exited"])
        delays.append(c.actions[-1][1])
    kinds = [a.kind for a in delays]
    assert kinds == ["restart", "restart", "restart", "alert"]
    assert [a.delay_s for a in delays[:3]] == [0, 10, 20]
    assert c.state.phase == "failed" and "circuit breaker" in c.state.last_reason
    c.feed(600, progress=False, gone=["x"])  # failed stays failed: no more actions
    assert len(c.actions) == 4


def test_backoff_resets_after_a_long_healthy_period():
    c = ready()
    c.feed(S.period_s, progress=False, gone=["a"])
    assert c.state.consecutive == 1
    c.feed(10, progress=False)
    c.feed(S.backoff_reset_s + S.grace_after_start_s + 10, progress=True, running=1)
    assert c.state.consecutive == 0
    c.feed(S.period_s, progress=False, gone=["a"])
    assert c.actions[-1][1].delay_s == 0


def test_restarts_older_than_an_hour_do_not_count():
    s = WatchdogSettings(max_restarts_per_hour=1)
    c = Clock(s)
    c.feed(10, progress=False)
    c.feed(s.period_s, progress=False, gone=["a"])
    c.feed(10, progress=False)
    c.feed(3700, progress=True, running=1)
    c.feed(s.period_s, progress=False, gone=["a"])
    assert [a.kind for _, a in c.actions] == ["restart", "restart"]


def test_observe_only_mode_alerts_instead_of_restarting():
    s = WatchdogSettings(enabled=False)
    c = Clock(s)
    c.feed(10, progress=False)
    c.feed(s.period_s, progress=False, gone=["a"])
    assert c.kinds() == ["alert"] and c.state.phase == "failed"


@pytest.mark.parametrize("health", [None, 500])
def test_api_gone_silent_is_suspect_then_confirmed(health):
    c = ready()
    c.feed(60, progress=False, health=health, canary_result=False)
    assert "restart" in c.kinds()


def test_a_restart_that_failed_is_not_taken_for_a_new_generation():
    """The restart failed before changing anything (a node unreachable): the old, wedged engine
    still answers /health. That is no reason to call it ready (with a grace period): try again,
    with backoff, under the breaker."""
    c = Clock(state=State(phase="healthy", since=900.0, ready_at=900.0, healthy_since=900.0))
    c.state = restarted(c.state, c.t, error="sim-2: did not answer within 10s")
    c.feed(S.period_s, progress=False, health=200)
    assert c.state.phase != "healthy" and [a.kind for _, a in c.actions] == ["restart"]
    assert "the last restart failed: sim-2: did not answer" in c.actions[0][1].reason
    assert c.actions[0][1].delay_s == backoff_s(1, S) > 0


def test_a_restart_that_worked_gets_its_grace():
    c = Clock(state=State(phase="healthy", since=900.0, ready_at=900.0, healthy_since=900.0))
    c.state = restarted(c.state, c.t)
    c.feed(S.period_s, progress=False, health=200)
    assert c.state.phase == "healthy" and c.actions == []


def test_the_breaker_is_left_only_by_a_deliberate_reset():
    c = Clock(s=WatchdogSettings(max_restarts_per_hour=1), state=State(phase="healthy", since=900.0, ready_at=900.0, healthy_since=900.0))
    c.feed(S.period_s, progress=False, gone=["spark-vllm-worker on sim-2 is exited"])
    c.state = restarted(c.state, c.t)
    c.feed(6, progress=False, gone=["spark-vllm-worker on sim-2 is exited"])  # past the first seconds of a start
    assert c.state.phase == "failed" and [a.kind for _, a in c.actions] == ["restart", "alert"]
    c.feed(120, progress=True, health=200)  # even a serving engine does not take it out
    assert c.state.phase == "failed"
    c.state = breaker_reset(c.state, c.t)
    assert c.state.phase == "starting" and "circuit breaker" in c.state.last_reason
    assert c.state.restarts and recent_restarts(c.state, c.t) == ()  # kept in the history, not counted
    c.feed(S.period_s, progress=True, health=200)
    assert c.state.phase == "healthy"


def test_watch_reset_takes_a_tripped_breaker_out_of_failed_and_says_so(tmp_path):
    """What `watch --reset` and a successful `up` do: no node is contacted."""
    import json

    from spark_cluster.config import load_config
    from spark_cluster.watchdog import RESET_HINT, Watchdog, reset_breaker

    from .conftest import SIM_CONFIG

    cfg = load_config(SIM_CONFIG).model_copy(update={"state_dir": str(tmp_path)})
    assert reset_breaker(cfg, "watch --reset") is False  # nothing to reset
    wd = Watchdog(cfg, None)
    wd.state = State(phase="failed", since=1.0, restarts=(1.0, 2.0, 3.0), last_reason="circuit breaker: 3 restarts")
    wd.save_state()
    wd.close()
    assert reset_breaker(cfg, "watch --reset") is True
    saved = json.loads((tmp_path / "watchdog.json").read_text())
    assert saved["state"] == "starting" and saved["restarts_last_hour"] == 0
    [event] = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines() if "breaker-reset" in line]
    assert event["why"] == "watch --reset" and event["previous"] == "circuit breaker: 3 restarts"
    assert "spark-cluster up" in RESET_HINT and "watch --reset" in RESET_HINT


def test_an_up_that_recreated_the_group_starts_a_new_restart_budget_also_for_a_running_loop(tmp_path):
    """Seen before: after `down` + `up`, the first genuine hang went straight to `failed` because
    three restarts of the earlier deployment were still counted."""
    import json

    from spark_cluster.watchdog import reset_breaker

    import time

    loop = ScriptedLoop(tmp_path)
    loop.t = time.time()  # `up` reads the state file with the real clock
    loop.step(0, progress=True)
    loop.wd.state = replace(loop.wd.state, restarts=(loop.t - 300, loop.t - 200, loop.t - 100), consecutive=3)
    loop.wd.save_state()
    assert reset_breaker(loop.wd.cfg, "a successful manual up", recreated=False) is False  # nothing recreated: nothing changes
    assert not (tmp_path / "breaker-reset").exists()
    assert reset_breaker(loop.wd.cfg, "a successful manual up", recreated=True) is False  # not failed: no breaker reset
    saved = json.loads((tmp_path / "watchdog.json").read_text())
    assert (saved["restarts_last_hour"], saved["restarts_counted"]) == (3, 0)
    loop.step(S.period_s, progress=True)  # the running loop takes the mark too (it holds its own state)
    assert [e["not_counted"] for e in loop.kinds("restart-budget")] == [3] and loop.wd.state.consecutive == 0
    loop.step(S.period_s, progress=True)
    loop.step(61, progress=True, running=2)  # past the grace period
    while not loop.restarts:
        loop.step(S.period_s, progress=False, running=2)
    assert loop.wd.state.phase != "failed" and len(loop.wd.state.restarts) == 4
    loop.wd.close()


def test_a_tripped_breaker_names_itself_not_the_stall_before_it():
    """What `failed` shows (the gateway's 503 says it): the breaker, not a suspicion left over."""
    c = Clock(WatchdogSettings(max_restarts_per_hour=0))
    c.feed(10, progress=False)  # ready
    c.feed(S.grace_after_start_s, progress=True, running=2)
    c.feed(S.period_s, progress=False, running=2)  # suspect: no progress with work in flight
    assert c.state.suspect_reason
    c.feed(S.period_s, progress=False, running=2, gone=["spark-ray-worker on sim-2 exited"])
    assert c.state.phase == "failed" and c.state.suspect_reason == "" and c.state.last_reason.startswith("circuit breaker")


def test_a_requested_restart_goes_past_backoff_and_counts():
    backoff = State(phase="backoff", since=1.0, restarts=(1.0,), consecutive=3, suspect_reason="stall")
    state, action = requested_restart(backoff, 5.0, "requested through the controller's API", S)
    assert (action.kind, action.delay_s) == ("restart", 0) and state.phase == "restarting" and state.suspect_reason == ""
    after = restarted(state, 9.0)
    assert after.restarts == (1.0, 9.0) and after.phase == "starting"


@pytest.mark.parametrize("restarts, budget_since, refused", [
    ((), None, False),
    ((100.0, 200.0), None, False),
    ((100.0, 200.0, 300.0), None, True),  # the breaker's limit (3): a script restarting in a loop stops here
    ((100.0, 200.0, 300.0), 250.0, False),  # resume (a new budget) counts only what came after
    ((-4000.0, 200.0, 300.0), None, False),  # one of them is over an hour old
])
def test_a_requested_restart_counts_against_the_breaker(restarts, budget_since, refused):
    from spark_cluster.decide import request_refused

    state = State(phase="failed" if refused else "healthy", restarts=restarts, budget_since=budget_since)
    assert (request_refused(state, 400.0, S) is not None) is refused
    new, action = requested_restart(state, 400.0, "requested", S)
    assert action.kind == ("alert" if refused else "restart") and (new is state) is refused
    if refused:
        assert "max_restarts_per_hour 3" in action.reason and "resume" in action.reason


def test_resume_confirms_afresh_but_a_failed_watchdog_stays_failed():
    suspect = State(phase="suspect", since=1.0, ready_at=1.0, suspect_since=2.0, suspect_reason="stall", restarts=(1.0,))
    fresh = resumed(suspect, 10.0)
    assert (fresh.phase, fresh.ready_at, fresh.suspect_since, fresh.restarts) == ("starting", None, None, (1.0,))
    failed = State(phase="failed", last_reason="circuit breaker")
    assert resumed(failed, 10.0) is failed


class ScriptedLoop:
    """The real Watchdog.step over scripted samples and a fake clock: no node, no engine."""

    def __init__(self, tmp_path):
        from spark_cluster.config import load_config
        from spark_cluster.watchdog import Watchdog

        from .conftest import SIM_CONFIG

        self.t = 1000.0
        self.counter = 0.0
        cfg = load_config(SIM_CONFIG).model_copy(update={"state_dir": str(tmp_path)})
        def no_engine(request: httpx.Request) -> httpx.Response:
            raise AssertionError(f"no engine here: {request.method} {request.url}")

        self.wd = Watchdog(cfg, None, clock=lambda: self.t, http=httpx.Client(transport=httpx.MockTransport(no_engine)))
        self.events: list[dict] = []
        self.wd.rec.on_event = self.events.append
        self.restarts: list[str] = []
        self.wd.restart = lambda action: (self.restarts.append(action.reason), setattr(self.wd, "state", restarted(self.wd.state, self.t)))
        self.wd.engine.canary = lambda timeout: (False, 10.0, None)

    def step(self, seconds: float, *, progress: bool, running: float = 0):
        self.t += seconds
        self.counter += 1 if progress else 0

        def observe() -> Sample:
            canary, self.wd.canary_result = self.wd.canary_result, None  # as the real observe hands it on
            return Sample(t=self.t, health=200, steps_total=self.counter, generation_tokens_total=self.counter, prompt_tokens_total=1.0,
                          running=running, canary_ok=canary[0] if canary else None, canary_s=canary[1] if canary else None,
                          canary_refused=canary[2] if canary else None)

        self.wd.observe = observe
        return self.wd.step()

    def kinds(self, kind):
        return [e for e in self.events if e["event"] == kind]


def test_the_loop_reports_detection_from_the_last_healthy_observation(tmp_path):
    """Not from the last progress: an engine idle for ten minutes that hangs on its next request
    was not failing all that time."""
    loop = ScriptedLoop(tmp_path)
    loop.step(0, progress=True, running=2)  # ready
    loop.step(61, progress=True, running=2)  # past the grace period
    loop.step(600, progress=False, running=0)  # idle: healthy, no progress
    stall_began = loop.t
    while not loop.restarts:
        loop.step(S.period_s, progress=False, running=2)
        assert loop.t - stall_began < 120, loop.events
    [decision] = [e for e in loop.kinds("decision") if e["action"] == "restart"]
    assert decision["detect_s"] == loop.t - stall_began
    loop.wd.close()


def test_the_loop_carries_out_pause_resume_and_a_requested_restart(tmp_path):
    loop = ScriptedLoop(tmp_path)
    loop.step(0, progress=True)
    loop.wd.pause(True)
    assert loop.step(S.period_s, progress=False, running=2) is None and loop.kinds("watch-paused")
    for _ in range(20):  # paused: a stall is observed, never acted on
        assert loop.step(S.period_s, progress=False, running=2) is None
    loop.wd.request_restart("requested through the controller's API")
    action = loop.step(S.period_s, progress=False, running=2)
    assert action.kind == "restart" and loop.restarts == ["requested through the controller's API"]
    loop.wd.pause(False)
    loop.step(S.period_s, progress=True)
    assert loop.kinds("watch-resumed") and loop.wd.state.phase == "healthy"
    loop.wd.close()


def test_a_running_loop_takes_a_breaker_reset_made_by_another_command(tmp_path):
    """`up` or `watch --reset` while the controller runs: its breaker is in memory, and must not
    overwrite the reset with `failed` on its next period."""
    import json

    from spark_cluster.watchdog import reset_breaker

    loop = ScriptedLoop(tmp_path)
    loop.step(0, progress=True)
    loop.wd.state = State(phase="failed", since=loop.t, last_reason="circuit breaker: 3 restarts")
    loop.wd.save_state()
    assert reset_breaker(loop.wd.cfg, "a successful manual up") is True
    loop.step(S.period_s, progress=True)
    assert loop.wd.state.phase == "healthy" and [e["why"] for e in loop.kinds("breaker-reset")] == ["a successful manual up"]
    assert json.loads((tmp_path / "watchdog.json").read_text())["state"] == "healthy"
    loop.step(S.period_s, progress=True)
    assert len(loop.kinds("breaker-reset")) == 1  # the mark is used once
    loop.wd.close()


# ---- what the ranks do (spark_cluster.ranks.group_activity) decides before the canary ----------


def restart_times(c: Clock) -> list[float]:
    return [t for t, a in c.actions if a.kind == "restart"]


@pytest.mark.parametrize("seconds", [120, 290])
def test_a_long_step_with_every_rank_working_is_busy_never_a_restart(seconds):
    """A 120 s prefill chunk or a compile: the counters stop, a canary would wait behind the step and
    fail, yet the ranks work. No canary, no restart, up to the busy budget (vLLM's step timeout, 300 s)."""
    c = ready()
    c.feed(seconds, progress=False, running=4, ranks="busy", evidence="sim-1: working (CPU 0.98 core(s))", canary_result=False)
    assert c.kinds() == [] and c.state.phase == "busy"
    assert "ranks working: sim-1: working" in c.state.suspect_reason
    c.feed(4, progress=True, running=4)  # the step ends
    assert c.state.phase == "healthy" and c.kinds() == []


def test_past_the_busy_budget_the_canary_decides_as_before():
    c = ready()
    c.feed(300 + 20, progress=False, running=4, ranks="busy", evidence="working", canary_result=False)
    assert c.kinds() == ["canary", "restart"]
    [(t, restart)] = [(t, a) for t, a in c.actions if a.kind == "restart"]
    assert "past the busy budget of 300s" in restart.reason


def test_the_busy_budget_is_a_setting_and_defaults_to_the_engines_step_timeout():
    from spark_cluster.config import load_config

    from .conftest import SIM_CONFIG

    cfg = load_config(SIM_CONFIG)
    assert cfg.container.env["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "3600" and cfg.busy_budget_s() == 3600  # as the model card sets it
    env = {k: v for k, v in cfg.container.env.items() if k != "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"}
    assert cfg.model_copy(update={"container": cfg.container.model_copy(update={"env": env})}).busy_budget_s() == 300  # vLLM's default
    assert cfg.model_copy(update={"watchdog": WatchdogSettings(busy_budget_s=90)}).busy_budget_s() == 90
    short = WatchdogSettings(busy_budget_s=60)
    c = Clock(short)
    c.feed(10, progress=False)
    c.feed(short.grace_after_start_s, progress=True, running=1)
    c.feed(56, progress=False, running=2, ranks="busy", canary_result=False)
    assert c.kinds() == []
    c.feed(20, progress=False, running=2, ranks="busy", canary_result=False)
    assert c.kinds() == ["canary", "restart"]


def test_a_stopped_rank_is_a_wedge_confirmed_at_the_stall_window_without_a_canary():
    c = ready()
    stall_began = c.t
    c.feed(30, progress=False, running=4, ranks="wedged", evidence="rank stopped: sim-2: stopped: ray::RayWorkerP (pid 77)")
    [t] = restart_times(c)
    assert S.stall_window_s <= t - stall_began <= S.stall_window_s + S.period_s
    assert "canary" not in c.kinds()
    reason = c.actions[-1][1].reason
    assert reason.startswith("hang confirmed: no progress for") and "rank stopped: sim-2" in reason


def test_a_wedge_is_not_confirmed_before_the_stall_window_nor_in_the_grace_period():
    c = ready()
    c.feed(S.stall_window_s - S.period_s, progress=False, running=4, ranks="wedged", evidence="x")
    assert c.kinds() == []
    fresh = Clock()
    fresh.feed(10, progress=False, health=None)  # loading
    fresh.feed(S.period_s, progress=False)  # ready: the grace period begins
    fresh.feed(S.grace_after_start_s - 20, progress=False, running=2, ranks="wedged", evidence="x")
    assert fresh.kinds() == []


def test_ranks_that_turn_from_busy_to_wedged_are_confirmed_at_once():
    """A compile that ends in a wedge: the stall already lasted longer than the window."""
    c = ready()
    c.feed(60, progress=False, running=2, ranks="busy")
    assert c.kinds() == []
    c.feed(S.period_s, progress=False, running=2, ranks="wedged", evidence="rank stopped")
    assert c.kinds() == ["restart"]


def test_without_rank_facts_the_stall_window_and_the_canary_decide_as_before():
    c = ready()
    c.feed(30, progress=False, running=2, ranks="unknown", canary_result=False)
    assert c.kinds() == ["canary", "restart"]


def test_an_idle_engine_is_never_judged_by_its_idle_ranks():
    c = ready()
    c.feed(25, progress=False, running=0, ranks="wedged", evidence="no rank uses any CPU")
    assert "restart" not in c.kinds()


@pytest.mark.parametrize("running, gateway, ranks, canary, restarted_", [
    # a client that stopped reading: the engine finished (reports 0), its ranks idle, the gateway still counts
    # the request. The canary answers: never a restart, however long
    (0, 1, "wedged", True, False),
    (0, 3, "wedged", True, False),
    # the same count with a canary that does not finish: a hang that began as the requests arrived
    (0, 1, "wedged", False, True),
    # the engine itself reports the work: idle ranks confirm without a canary
    (2, 2, "wedged", None, True),
    (1, 3, "wedged", None, True),
])
def test_the_gateways_count_alone_never_confirms_a_hang_the_canary_decides(running, gateway, ranks, canary, restarted_):
    """Pending work is the engine's: a request the gateway still counts because its client does not read
    may make the watchdog look (a canary), never decide with the ranks (which idle once the engine is done)."""
    c = ready()
    c.feed(300, progress=False, running=running, gateway=gateway, ranks=ranks, evidence="GPU rank at near-idle power: sim-2",
           canary_result=canary)
    assert ("restart" in c.kinds()) is restarted_, c.actions
    if restarted_ and canary is None:
        assert "canary" not in c.kinds() and "near-idle power" in c.actions[-1][1].reason
    if not restarted_:
        assert c.kinds() and set(c.kinds()) == {"canary"}


def test_the_rule_fed_the_attack_sample_does_not_restart():
    """The sample the attack produced: a non-reading client's request counted by the gateway, the engine
    reporting 0, GPU ranks at idle power; before, it was a restart 10 s later ("the gateway's count ... and GPU
    rank at near-idle power")."""
    c = ready()
    c.feed(S.stall_window_s + S.period_s, progress=False, running=0, gateway=1, ranks="wedged",
           evidence="GPU rank at near-idle power: sim-1: 15 W (idle 14 W)")
    assert "restart" not in c.kinds() and c.kinds() == ["canary"]
    assert "the gateway's count; the engine reports 0" in c.state.suspect_reason


def test_a_canary_refused_for_its_key_is_a_configuration_alert_never_a_restart():
    c = ready()
    c.feed(200, progress=False, running=0, refused=401)  # idle canaries: the first is refused
    assert c.kinds() == ["canary", "alert"] and "configuration error: vLLM answers 401" in c.actions[-1][1].reason
    c.feed(60, progress=False, running=2, refused=401)  # a stall: no canary can decide it now
    assert c.kinds() == ["canary", "alert"] and c.state.phase == "suspect"
    c.feed(30, progress=False, running=2, ranks="wedged", evidence="rank stopped")  # the ranks still can
    assert c.kinds() == ["canary", "alert", "restart"]
    assert not restarted(c.state, c.t).key_refused  # the new group gets a canary again


def test_a_deliberate_start_begins_a_new_restart_budget_and_keeps_the_history():
    from spark_cluster.decide import fresh_budget, hour_restarts, recent_restarts

    c = ready()
    for _ in range(3):  # three hangs: the breaker is at its limit
        c.feed(30, progress=False, running=2, canary_result=False)
        c.feed(S.grace_after_start_s + 10, progress=True, running=1)
    assert len(recent_restarts(c.state, c.t)) == 3
    c.state = fresh_budget(c.state, c.t)  # `up` recreated the group
    assert len(hour_restarts(c.state, c.t)) == 3 and recent_restarts(c.state, c.t) == () and c.state.consecutive == 0
    c.feed(10, progress=False)
    c.feed(S.grace_after_start_s + 10, progress=True, running=1)
    c.feed(30, progress=False, running=2, canary_result=False)  # the first genuine hang is restarted, not failed
    assert c.kinds()[-1] == "restart" and c.state.phase != "failed"
    tripped = breaker_reset(State(phase="failed", restarts=(c.t - 10,)), c.t)
    assert tripped.restarts == (c.t - 10,) and recent_restarts(tripped, c.t) == ()


def test_a_node_that_does_not_answer_while_the_engines_work_stands_still_is_a_hang_at_once():
    """A cable pulled under load: the first observation that finds the worker unreachable (each takes
    an SSH timeout then) confirms the hang when the engine's own work has stood still for the stall
    window, without waiting for several periods or a canary."""
    c = ready()
    t_cut = c.t
    c.feed(S.stall_window_s - S.period_s, progress=False, running=4)
    assert "restart" not in c.kinds()
    c.feed(S.period_s, progress=False, running=4, unreachable=["sim-2"])
    assert c.kinds()[-1] == "restart" and c.t - t_cut <= S.stall_window_s
    assert c.actions[-1][1].reason == "hang confirmed: no progress for 10s with 4 request(s) in flight or waiting, and sim-2 does not answer"
    # work only the gateway counts (a client not reading) is no hang, a node unreachable or not
    c = ready()
    c.feed(S.stall_window_s, progress=False, gateway=3)
    c.feed(S.period_s, progress=False, gateway=3, unreachable=["sim-2"])
    assert "restart" not in c.kinds()


def test_progress_counts_from_when_the_counters_were_read_not_from_when_a_slow_node_answered():
    """A cable pulled just after a sample began: that sample's worker probe takes its whole timeout (10 s),
    so the sample is decided 10 s after its counters were read. The stall runs from the read."""
    c = ready()
    t = c.t + S.period_s
    steps = c.steps + 3
    counters = dict(health=200, steps_total=steps, generation_tokens_total=steps * 2, prompt_tokens_total=100, running=4)
    c.state, action = decide(c.state, Sample(t=t, **counters), t + 10, S)  # moved; decided when the slow probe gave up
    assert action is None and c.state.last_progress == t
    c.state, action = decide(c.state, Sample(t=t + 10.1, unreachable=("sim-2",), **counters), t + 12, S)
    assert action is not None and action.kind == "restart" and action.reason.endswith("and sim-2 does not answer")
