"""The gateway's door: whether a new request passes, waits or is refused, from what the watchdog
says (its phase and events) and how many wait already. Pure rules, table-tested (tests/test_gateway.py);
with several groups each has its door and the gateway's is `overall_door` of theirs.

A door has two reasons: `reason`, the watchdog's whole reason (SSH targets, paths, a failed restart's
text), for the control plane behind its token; and `told`, a short category that clients of the
public port see (`/health`, 503 bodies, a cut stream's error event)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from .serving_settings import GatewaySettings

Mode = Literal["open", "hold", "closed"]


PUBLIC = {"open": "serving", "hold": "not serving yet", "closed": "not serving"}


@dataclass(frozen=True)
class Door:
    mode: Mode = "hold"
    reason: str = "the controller is starting"
    suspect: bool = False  # open, but the watchdog doubts it: with several groups, new requests go to the others
    public: str = "the controller is starting"  # what clients are told (no detail); "" for the mode's own word

    @property
    def told(self) -> str:
        return self.public or PUBLIC[self.mode]


OPEN = Door("open", "", public="")


def door_for_phase(phase: str, reason: str = "") -> Door:
    """The door for a watchdog phase: open while it serves (busy and suspect are still serving: busy is not dead)."""
    if phase in ("healthy", "busy", "suspect", "paused"):
        return Door("open", "", suspect=phase == "suspect", public="")
    if phase == "failed":
        return Door("closed", reason or "the watchdog has given up", public="the watchdog has given up restarting the engine")
    what = {"starting": "the engine is starting", "backoff": "the engine is about to be restarted (backoff)",
            "restarting": "the engine is being restarted"}.get(phase, "the engine is not serving")
    return Door("hold", what + (f": {reason}" if reason else ""), public=what)


def door_after(door: Door, event: dict[str, Any]) -> tuple[Door, bool]:
    """The door after one watchdog event, and whether what is in flight must be acted on now
    (a restart was decided: the engine is hung or a member is gone). Pure."""
    kind = event.get("event")
    if kind == "state":
        new = door_for_phase(str(event.get("state")), str(event.get("reason") or ""))
        return new, new.mode == "hold" and event.get("state") in ("backoff", "restarting")
    if kind == "decision" and event.get("action") == "restart":
        return Door("hold", f"the engine is being restarted: {event.get('reason', '')}", public="the engine is being restarted"), True
    if kind == "restart-done":
        return OPEN, False  # `up` ended with a real completion: it serves
    if kind == "watch-paused":
        return OPEN, False
    return door, False


@dataclass(frozen=True)
class Admission:
    verdict: Literal["pass", "hold", "reject"]
    message: str = ""
    retry_after: bool = False


def admit(door: Door, held_now: int, s: GatewaySettings) -> Admission:
    """What a new (or re-queued) request does at the door. Pure."""
    if door.mode == "open":
        return Admission("pass")
    if door.mode == "closed":
        return Admission("reject", f"not serving: {door.told}")
    if held_now >= s.max_held:
        return Admission("reject", f"not serving ({door.told}) and {held_now} requests are already waiting "
                                   f"(gateway.max_held {s.max_held})", retry_after=True)
    return Admission("hold")


def retry_status(status: int, engine_answers: Optional[bool]) -> bool:
    """May an error status from the engine be retried (it has reached no client yet)? 502/503/504
    say the engine is unavailable; a 500 only when the engine no longer answers /health (a dying
    engine); 4xx never (bad input is the engine's to judge). Pure."""
    if status in (502, 503, 504):
        return True
    if status == 500:
        return engine_answers is False
    return False


def overall_door(doors: list[Door]) -> Door:
    """The gateway's door over several groups' doors: open while any is open, closed when all are
    closed (every watchdog has given up), else holding. Pure."""
    if any(d.mode == "open" for d in doors):
        return OPEN
    if doors and all(d.mode == "closed" for d in doors):
        return doors[0] if len(doors) == 1 else _joined("closed", doors)
    held = [d for d in doors if d.mode == "hold"]
    return held[0] if len(doors) == 1 or not held else _joined("hold", held)


def _joined(mode: Mode, doors: list[Door]) -> Door:
    return Door(mode, "; ".join(d.reason for d in doors), public="; ".join(dict.fromkeys(d.told for d in doors)))

