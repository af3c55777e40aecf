"""What the operator is told, from the events the controller sees (spark_cluster.notify sends it).

Pure: `notice_for` turns one event into a Notice (or nothing: most events are not worth a message), and
`Throttle` bounds how many of one kind one group sends in a window, turning the rest into one summary.
Table-tested in tests/test_notices.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from .serving_settings import Severity

RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}
PARTS_SHOWN = 4  # the restart's longest parts named in its message


@dataclass(frozen=True)
class Notice:
    kind: str  # hang, restart, restart-done, restart-failed, breaker-open, ... (the throttle's key, with `where`)
    severity: Severity
    where: str  # the cluster, or cluster/group
    title: str
    body: str


def at_least(severity: str, least: str) -> bool:
    return RANK[severity] >= RANK[least]


def _parts(phases: dict[str, Any]) -> str:
    """The restart's longest top-level parts, e.g. 'ready 41.2 s, kill 3.0 s' (engine/... parts are inside ready)."""
    top = sorted(((k, v) for k, v in phases.items() if "/" not in k and isinstance(v, (int, float))), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v:g} s" for k, v in top[:PARTS_SHOWN])


def _alert(reason: str) -> tuple[str, Severity, str]:
    rules: list[tuple[str, str, Severity, str]] = [
        ("circuit breaker", "breaker-open", "critical", "circuit breaker open: the watchdog stopped restarting"),
        ("restart needed but the watchdog only observes", "restart-needed", "critical", "a restart is needed (watchdog.enabled: false)"),
        ("configuration error", "config-error", "critical", "configuration error"),
    ]
    for prefix, kind, severity, title in rules:
        if reason.startswith(prefix):
            return kind, severity, title
    return "alert", "warning", "alert"


def notice_for(e: dict[str, Any], where: str) -> Optional[Notice]:
    """The notice one event of `where` (a cluster, or cluster/group) makes, or None."""
    kind = e.get("event")
    reason = str(e.get("reason") or "")

    def make(k: str, severity: Severity, title: str, body: str) -> Notice:
        return Notice(k, severity, where, f"spark-cluster {where}: {title}", body)

    if kind == "decision" and e.get("action") == "restart":
        detect = f" Detected {e['detect_s']:g} s after the last healthy observation." if e.get("detect_s") is not None else ""
        backoff = f" Backing off {e['delay_s']:g} s first (restarts in a row)." if e.get("delay_s") else ""
        if reason.startswith("hang confirmed"):
            return make("hang", "critical", "hang confirmed, restarting the group", f"{reason}.{detect}{backoff}")
        if reason.startswith("requested"):
            return make("restart-requested", "info", "restart requested", f"{reason}.{backoff}")
        return make("restart", "critical", "restarting the group", f"{reason}.{detect}{backoff}")
    if kind == "restart-done":
        back = f"; serving again {e['recover_s']:g} s after the decision" if e.get("recover_s") is not None else ""
        parts = _parts(e.get("phases") or {})
        return make("restart-done", "info", f"restart done in {e.get('seconds', 0):g} s",
                    f"The {e.get('restart', 'full')} restart took {e.get('seconds', 0):g} s{back}." + (f" Longest parts: {parts}." if parts else ""))
    if kind == "restart-failed":
        return make("restart-failed", "critical", "restart failed",
                    f"The {e.get('restart', 'full')} restart failed after {e.get('seconds', 0):g} s: {e.get('error') or 'no reason given'}.")
    if kind == "alert":
        k, severity, title = _alert(reason)
        return make(k, severity, title, reason)
    if kind == "breaker-reset":
        return make("breaker-reset", "info", "the watchdog restarts again", f"{e.get('why', '')}; before: {e.get('previous', '')}")
    if kind == "restart-fallback":
        return make("restart-fallback", "warning", "the kept restart fell back to the full one", str(e.get("why", "")))
    if kind == "kv-less":
        return make("kv-less", "warning", "less KV cache than before", str(e.get("message", "")))
    if kind == "executor" and e.get("step_event") == "memory-short":
        return make("memory", "warning", f"memory not given back on {e.get('node', '?')}", f"The start waits for it: {e.get('short', '')}.")
    if kind == "slow":
        return make("slow", "warning", "the group is slow", str(e.get("reason", "")))
    if kind == "slow-over":
        return make("slow-over", "info", "the group is back to its speed", str(e.get("reason", "")))
    if kind == "roll-failed":
        return make("roll-failed", "warning", "a rolling change failed", str(e.get("error", "")))
    return None


@dataclass
class Window:
    start: float
    sent: int = 0
    held: int = 0
    worst: Severity = "info"
    last: Optional[Notice] = None


@dataclass
class Throttle:
    """At most `per_kind` notices of one kind for one `where` per window of `window_s` from the first; the others are
    held back and counted, and said in one summary when the window ends (`due`), or before the next one sent."""

    per_kind: int
    window_s: float
    windows: dict[tuple[str, str], Window] = field(default_factory=dict)

    def admit(self, n: Notice, now: float) -> list[Notice]:
        """What to send now for `n`: itself, or nothing (held back); a summary of the last window first when it ended."""
        key = (n.where, n.kind)
        out = self._close(key, now)
        w = self.windows.setdefault(key, Window(start=now))
        if w.sent < self.per_kind:
            w.sent += 1
            return [*out, n]
        w.held += 1
        w.last = n
        w.worst = max(w.worst, n.severity, key=RANK.__getitem__)
        return out

    def due(self, now: float) -> list[Notice]:
        """The summaries of windows that ended with notices held back."""
        return [s for key in list(self.windows) for s in self._close(key, now)]

    def _close(self, key: tuple[str, str], now: float) -> list[Notice]:
        w = self.windows.get(key)
        if w is None or now - w.start < self.window_s:
            return []
        del self.windows[key]
        if not w.held or w.last is None:
            return []
        last = w.last
        return [replace(last, kind="summary", severity=w.worst, title=f"{last.title} (and {w.held} more held back)",
                        body=f"{w.held} more '{last.kind}' notification(s) in {self.window_s:g} s after the {self.per_kind} sent "
                             f"(notify.per_kind). The last: {last.body}")]
