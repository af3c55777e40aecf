"""Each group's slow verdict as the controller keeps it (spark_cluster.speed has the rules): looked at every few
seconds from its watchdog's samples, said as `slow` / `slow-over` events of the group (events.jsonl, the page, a
notification), shown in /metrics, and handed to the gateway as the group's share of new requests."""

from __future__ import annotations

import datetime as _dt
from typing import Any, Callable, Optional, Sequence

from .serving_settings import SlowSettings
from .speed import Measure, SpeedState, gpu_facts, judge, measure

SERVING = ("healthy", "busy")


class SpeedWatch:
    def __init__(self, s: SlowSettings, record: Callable[[dict[str, Any]], None], shown: Callable[[str, Optional[Measure], SpeedState], None],
                 weigh: Callable[[str, float], None]):
        self.s, self.record, self.shown, self.weigh = s, record, shown, weigh
        self.states: dict[str, SpeedState] = {}

    def look(self, samples: dict[str, Sequence[dict[str, Any]]], phases: dict[str, str], gpus: dict[str, dict[str, Sequence[Any]]]) -> None:
        """One look at every group: `samples` its watchdog's (oldest first), `phases` its watchdog's state, `gpus` its nodes' readings."""
        measures = {g: measure(x, self.s.window_s) if phases.get(g) in SERVING else None for g, x in samples.items()}
        for group, m in measures.items():
            state = self.states.get(group, SpeedState())
            peers = [p for other, p in measures.items() if other != group and p is not None]
            peer_slow = any(x.slow for other, x in self.states.items() if other != group)
            new, said = judge(state, m, peers, self.s, gpu_facts(gpus.get(group, {})), peer_slow=peer_slow)
            self.states[group] = new
            self.shown(group, m, new)
            if new.share != state.share:
                self.weigh(group, new.share)
            if said:
                now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
                self.record({"ts": now, "event": said[0], "group": group, "reason": said[1], "share": new.share})

    def verdict(self, group: str) -> Optional[str]:
        """'slow: why' while the group is slow."""
        state = self.states.get(group)
        return f"slow: {state.reason}" if state is not None and state.slow else None
