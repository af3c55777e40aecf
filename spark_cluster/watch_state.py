"""The watchdog's state file (state_dir/watchdog.json): what its decisions remember, its restarts
and the GPUs' learned power, read by `status`, the controller and a restarted watchdog.

Written whole or not at all (state_dir.write_private); read as a typed model: a file of another
shape or encoding is set aside with an alert and the watchdog starts afresh (state_dir.read_state).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict

from .config import ClusterConfig
from .decide import State, hour_restarts, recent_restarts, resumed
from .ranks import GpuBaseline
from .state_dir import Alert, read_state, write_private

STATE_FILE = "watchdog.json"


class WatchdogFile(BaseModel):
    """watchdog.json: a summary a person reads, and the decision state itself."""

    model_config = ConfigDict(extra="ignore")

    state: str = "starting"
    since: Optional[str] = None
    last_restart: Optional[str] = None
    last_reason: str = ""
    restarts_last_hour: int = 0
    restarts_counted: int = 0
    updated: Optional[str] = None
    decision: State
    gpu_baseline: dict[str, GpuBaseline] = {}


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def read_watchdog_state(cfg: ClusterConfig, alert: Optional[Alert] = None, *, repair: bool = True) -> Optional[WatchdogFile]:
    """The file, or None when there is none (or it could not be read: then it is set aside, unless not `repair`)."""
    return read_state(cfg.resolved_state_dir() / STATE_FILE, WatchdogFile, cfg.name, alert, repair=repair)


def gpu_baselines(saved: Optional[WatchdogFile]) -> dict[str, GpuBaseline]:
    """The GPUs' idle and busy power per node as the watchdog learned them."""
    return dict(saved.gpu_baseline) if saved is not None else {}


def load_decision(saved: Optional[WatchdogFile], now: float) -> State:
    """The decision state the file keeps, resumed (a new watchdog first confirms what it sees: it
    never acts on a stale phase); a fresh start when there is none."""
    return resumed(saved.decision, now) if saved is not None else State(phase="starting", since=now)


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
    write_private(path, json.dumps(data, indent=1, default=list))
