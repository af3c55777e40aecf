"""The watchdog's state file (state_dir/watchdog.json): what its decisions remember, its restarts
and the GPUs' learned power, read by `status`, the controller and a restarted watchdog.

Written atomically (a temporary file renamed over it); read defensively: a file of another shape
starts the watchdog afresh instead of stopping it.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from .config import ClusterConfig
from .decide import State, hour_restarts, recent_restarts, resumed
from .ranks import GpuBaseline

STATE_FILE = "watchdog.json"


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def read_watchdog_state(cfg: ClusterConfig) -> Optional[dict[str, Any]]:
    """The file as written, or None when there is none or it is not JSON."""
    try:
        return json.loads((cfg.resolved_state_dir() / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def gpu_baselines(watchdog: Optional[dict[str, Any]]) -> dict[str, GpuBaseline]:
    """The GPUs' idle and busy power per node as the watchdog learned them."""
    saved = watchdog.get("gpu_baseline") if isinstance(watchdog, dict) else None
    out = {}
    for node, b in (saved.items() if isinstance(saved, dict) else ()):
        if isinstance(b, dict):
            idle, busy = b.get("idle_w"), b.get("busy_w")
            out[node] = GpuBaseline(idle if isinstance(idle, (int, float)) else None, busy if isinstance(busy, (int, float)) else None)
    return out


def load_decision(data: Optional[dict[str, Any]], now: float) -> State:
    """The decision state the file keeps, resumed (a new watchdog first confirms what it sees: it
    never acts on a stale phase); a fresh start when there is none or it has another shape."""
    decision = data.get("decision") if isinstance(data, dict) else None
    if not isinstance(decision, dict):
        return State(phase="starting", since=now)
    fields = {f.name for f in dataclasses.fields(State)}
    try:
        st = State(**{k: (tuple(v) if k in ("restarts", "last_counters") and v is not None else v)
                      for k, v in decision.items() if k in fields})
        return resumed(st, now)
    except (ValueError, TypeError):
        return State(phase="starting", since=now)


def save_watchdog_state(path: Path, st: State, now: float, gpu_baseline: dict[str, GpuBaseline]) -> None:
    data = {
        "state": st.phase,
        "since": iso(st.since),
        "last_restart": iso(st.last_restart) if st.last_restart else None,
        "last_reason": st.last_reason,
        "restarts_last_hour": len(hour_restarts(st, now)),
        "restarts_counted": len(recent_restarts(st, now)),  # by the breaker: since the last deliberate start
        "updated": iso(now),
        "decision": dataclasses.asdict(st),
        "gpu_baseline": {n: dataclasses.asdict(b) for n, b in gpu_baseline.items()},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=list))
    tmp.replace(path)
