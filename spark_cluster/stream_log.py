"""What became of the streams a cut reached, kept where an operator looks (the controller's part of
the gateway's continuations, spark_cluster.stream_carry).

Each stream continued or not continued after a cut is an event of the group it was cut on
(`stream-continued`: where, how, from which token, the pause at the seam; `stream-not-continued`:
why), in that group's events.jsonl, /api/events and the status page; and a line of `streams.jsonl` in
the group's latest incident bundle (the restart that bundle records is what cut the stream), so the
bundle says what the clients saw of the incident."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from .state_dir import append_private


class StreamLog:
    def __init__(self, record: Callable[[dict[str, Any]], None], mask: Callable[[str], str], default_group: str, within_s: float):
        """record: the controller's (a group's events.jsonl, published); mask: secrets out of a line;
        within_s: how long after its incident a stream may still be continued (gateway.continue_within_s)."""
        self.record, self.mask, self.default_group, self.within_s = record, mask, default_group, within_s
        self.incidents: dict[str, tuple[Path, float]] = {}  # each group's latest bundle, and when it was made (monotonic)

    def saw(self, e: dict[str, Any], group: str) -> None:
        """A watchdog's event: an incident's bundle is where the streams its restart cuts are written."""
        if e.get("event") == "incident" and e.get("bundle"):
            self.incidents[group] = (Path(e["bundle"]), time.monotonic())

    def carried(self, rec: dict[str, Any]) -> None:
        """One stream continued or not (the gateway's record; its `group`: the group it was cut on, "" for the only one)."""
        group = rec.get("group") or self.default_group
        rec = {**rec, "group": group}
        self.record(rec)
        incident = self.incidents.get(group)
        if incident is not None and time.monotonic() - incident[1] <= self.within_s + 60 and incident[0].is_dir():
            append_private(incident[0] / "streams.jsonl", self.mask(json.dumps({"ts": time.time(), **rec}, default=str)) + "\n")
