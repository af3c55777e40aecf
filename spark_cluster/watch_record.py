"""What the watchdog writes: every change, decision and action as a JSON line in
state_dir/events.jsonl (secrets masked; also handed to its listener), its decision state in
state_dir/watchdog.json, and incident bundles under state_dir/incidents/ (the newest kept)."""

from __future__ import annotations

import json
import re
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from .config import ClusterConfig
from .decide import State
from .masking import mask_data
from .ranks import GpuBaseline
from .state_dir import DIR_MODE, EVENTS_FILE, INCIDENTS_KEPT, append_private, private_dir, prune, write_private
from .watch_state import STATE_FILE, iso, save_watchdog_state

EventSink = Callable[[dict[str, Any]], None]


class Record:
    def __init__(self, cfg: ClusterConfig, clock: Callable[[], float], on_event: EventSink):
        self.cluster, self.clock, self.on_event = cfg.name, clock, on_event
        self.dir = private_dir(cfg.resolved_state_dir())
        self.secrets = cfg.secret_values()  # masked in every event and every file of a bundle
        self.events_path = self.dir / EVENTS_FILE
        self.state_path = self.dir / STATE_FILE
        self.trail: deque[dict[str, Any]] = deque(maxlen=200)
        self.incidents_kept = INCIDENTS_KEPT

    def event(self, kind: str, **data: Any) -> None:
        e = mask_data(json.loads(json.dumps({"ts": iso(self.clock()), "event": kind, "cluster": self.cluster, **data}, default=str)),
                      self.secrets)
        self.trail.append(e)
        append_private(self.events_path, json.dumps(e) + "\n")
        self.on_event(e)

    def save(self, state: State, gpu_baseline: dict[str, GpuBaseline]) -> None:
        save_watchdog_state(self.state_path, state, self.clock(), gpu_baseline)

    def bundle(self, reason: str, files: dict[str, str]) -> Path:
        """A new incident bundle `<time>-<reason>` holding `files` (and the decision trail), the oldest
        beyond INCIDENTS_KEPT removed."""
        slug = re.sub(r"[^a-z0-9]+", "-", reason.lower())[:40].strip("-")
        name = f"{datetime.fromtimestamp(self.clock()).strftime('%Y%m%d-%H%M%S')}-{slug}"
        prune(private_dir(self.dir / "incidents"), self.incidents_kept - 1)  # the newest kept, this one among them
        d = self.dir / "incidents" / name
        n = 1
        while True:  # two incidents within one second keep two bundles
            try:
                d.mkdir(mode=DIR_MODE)
                break
            except FileExistsError:
                n += 1
                d = d.with_name(f"{name}-{n}")
        files = {"reason.txt": reason + "\n", "decision-trail.jsonl": "".join(json.dumps(e, default=str) + "\n" for e in self.trail),
                 **files}
        for file, text in files.items():
            write_private(d / file, text, self.secrets)
        return d

    def write(self, path: Path, text: str) -> None:
        write_private(path, text, self.secrets)
