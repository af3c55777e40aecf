"""What the operator is told from which event (spark_cluster.notices), and the throttle per kind: pure, table-tested."""

from __future__ import annotations

import pytest

from spark_cluster.notices import Notice, Throttle, at_least, notice_for

HANG = "hang confirmed: no progress for 12s with 4 request(s) in flight or waiting, and ranks idle: sim-2 power 15 W"


@pytest.mark.parametrize("event, kind, severity, title, body", [
    ({"event": "decision", "action": "restart", "reason": HANG, "delay_s": 0, "detect_s": 13.2},
     "hang", "critical", "hang confirmed, restarting the group", f"{HANG}. Detected 13.2 s after the last healthy observation."),
    ({"event": "decision", "action": "restart", "reason": HANG, "delay_s": 30, "detect_s": None},
     "hang", "critical", "hang confirmed, restarting the group", f"{HANG}. Backing off 30 s first (restarts in a row)."),
    ({"event": "decision", "action": "restart", "reason": "not ready within 1800s", "delay_s": 0},
     "restart", "critical", "restarting the group", "not ready within 1800s."),
    ({"event": "decision", "action": "restart", "reason": "requested through the controller's API", "delay_s": 0},
     "restart-requested", "info", "restart requested", "requested through the controller's API."),
    ({"event": "restart-done", "seconds": 72.4, "recover_s": 80.1, "restart": "kept",
      "phases": {"incident-bundle": 1.2, "kill": 3.0, "ready": 61.0, "engine/load": 20.0, "ray": 5.5, "clear": 0.4, "x": "y"}},
     "restart-done", "info", "restart done in 72.4 s",
     "The kept restart took 72.4 s; serving again 80.1 s after the decision. Longest parts: ready 61 s, ray 5.5 s, kill 3 s, "
     "incident-bundle 1.2 s."),
    ({"event": "restart-failed", "seconds": 9.0, "restart": "full", "error": "sim-2: docker run failed"},
     "restart-failed", "critical", "restart failed", "The full restart failed after 9 s: sim-2: docker run failed."),
    ({"event": "alert", "reason": "circuit breaker: 5 restarts in the last hour (limit 5); not restarting: " + HANG},
     "breaker-open", "critical", "circuit breaker open: the watchdog stopped restarting",
     "circuit breaker: 5 restarts in the last hour (limit 5); not restarting: " + HANG),
    ({"event": "alert", "reason": "restart needed but the watchdog only observes (watchdog.enabled: false): x"},
     "restart-needed", "critical", "a restart is needed (watchdog.enabled: false)",
     "restart needed but the watchdog only observes (watchdog.enabled: false): x"),
    ({"event": "alert", "reason": "configuration error: vLLM answers 401 to the canary"},
     "config-error", "critical", "configuration error", "configuration error: vLLM answers 401 to the canary"),
    ({"event": "alert", "reason": "events.jsonl set aside: 1 line(s) are not JSON"}, "alert", "warning", "alert",
     "events.jsonl set aside: 1 line(s) are not JSON"),
    ({"event": "breaker-reset", "why": "resumed through the controller's API", "previous": "circuit breaker: 5 restarts"},
     "breaker-reset", "info", "the watchdog restarts again", "resumed through the controller's API; before: circuit breaker: 5 restarts"),
    ({"event": "executor", "step_event": "memory-short", "node": "sim-2", "short": "available 80.1 GiB, was 110.0 GiB"},
     "memory", "warning", "memory not given back on sim-2", "The start waits for it: available 80.1 GiB, was 110.0 GiB."),
    ({"event": "restart-fallback", "why": "the kept restart failed: x", "to": "full"},
     "restart-fallback", "warning", "the kept restart fell back to the full one", "the kept restart failed: x"),
    ({"event": "kv-less", "message": "KV cache 120000 tokens, was 200000"}, "kv-less", "warning", "less KV cache than before",
     "KV cache 120000 tokens, was 200000"),
    ({"event": "slow", "reason": "decode 94 ms/token, its baseline 63"}, "slow", "warning", "the group is slow",
     "decode 94 ms/token, its baseline 63"),
    ({"event": "slow-over", "reason": "decode 64 ms/token"}, "slow-over", "info", "the group is back to its speed", "decode 64 ms/token"),
    ({"event": "roll-failed", "group": "b", "error": "sim-3: unreachable"}, "roll-failed", "warning", "a rolling change failed",
     "sim-3: unreachable"),
])
def test_each_event_worth_a_message_makes_its_notice(event, kind, severity, title, body):
    assert notice_for(event, "spark/a") == Notice(kind, severity, "spark/a", f"spark-cluster spark/a: {title}", body)


@pytest.mark.parametrize("event", [
    {"event": "decision", "action": "canary", "reason": "suspect: x"},
    {"event": "decision", "action": "alert", "reason": "circuit breaker: x"},  # its `alert` event tells
    {"event": "state", "state": "suspect", "previous": "healthy"},
    {"event": "canary", "ok": False},
    {"event": "executor", "step_event": "step-ok"},
    {"event": "stream-continued"},
    {"event": "incident", "reason": HANG},
    {},
])
def test_the_other_events_make_none(event):
    assert notice_for(event, "spark") is None


@pytest.mark.parametrize("severity, least, sent", [
    ("info", "info", True), ("info", "warning", False), ("warning", "warning", True), ("critical", "warning", True),
    ("warning", "critical", False), ("critical", "critical", True),
])
def test_a_target_gets_what_is_at_least_its_severity(severity, least, sent):
    assert at_least(severity, least) is sent


def n(kind="hang", where="spark/a", severity="critical", body="b"):
    return Notice(kind, severity, where, f"spark-cluster {where}: {kind}", body)


def test_a_restart_loop_sends_per_kind_then_one_summary_when_its_window_ends():
    t = Throttle(per_kind=3, window_s=100)
    sent = [x for i in range(10) for x in t.admit(n(body=f"hang {i}"), now=float(i))]
    assert [x.body for x in sent] == ["hang 0", "hang 1", "hang 2"]
    assert t.due(99.0) == []  # the window has not ended
    summary, = t.due(100.0)
    assert summary.kind == "summary" and summary.severity == "critical" and summary.where == "spark/a"
    assert "(and 7 more held back)" in summary.title and "7 more 'hang' notification(s)" in summary.body
    assert summary.body.endswith("The last: hang 9")
    assert t.due(500.0) == []  # said once
    assert t.admit(n(body="hang 10"), now=501.0) == [n(body="hang 10")]  # a new window


def test_kinds_and_groups_are_throttled_apart_and_a_window_without_held_notices_says_nothing():
    t = Throttle(per_kind=1, window_s=10)
    assert t.admit(n(), 0) == [n()] and t.admit(n(where="spark/b"), 0) == [n(where="spark/b")]
    assert t.admit(n(kind="restart-done", severity="info"), 0) == [n(kind="restart-done", severity="info")]
    assert t.admit(n(body="again"), 1) == []
    assert t.due(10) and t.due(20) == []


def test_the_summary_comes_before_the_next_notice_of_its_kind_and_with_the_worst_severity_held():
    t = Throttle(per_kind=1, window_s=10)
    t.admit(n(kind="alert", severity="warning"), 0)
    t.admit(n(kind="alert", severity="critical", body="bad"), 1)
    t.admit(n(kind="alert", severity="warning", body="last"), 2)
    summary, new = t.admit(n(kind="alert", severity="warning", body="new"), 12)
    assert summary.kind == "summary" and summary.severity == "critical" and "2 more 'alert'" in summary.body
    assert new.body == "new"
