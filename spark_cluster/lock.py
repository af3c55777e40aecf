"""The cluster's lock on the head node: one `up`, `down` or watchdog restart at a time, whichever
machine runs it. A directory made with `mkdir` (atomic) in the SSH user's home, holding a record of
who holds it.

The commands are plan steps (`plan` shows them); whether a lock found held is stale is decided
here, a pure rule: its holder ran on this machine and its process is gone (a holder on another
machine cannot be checked from here: that one is only ever removed by hand).
"""

from __future__ import annotations

import json
from typing import Callable

from .render import quote


LOCKS = '"$HOME"/.spark-cluster/locks'  # only the SSH user can write there (not /tmp, where anyone could make it first)


def lock_dir(cluster: str) -> str:
    """Where the lock is, as a person types it."""
    return f"~/.spark-cluster/locks/{cluster}.lock"


def _path(cluster: str) -> str:
    return f"{LOCKS}/{quote(cluster + '.lock')}"


def take_command(cluster: str) -> str:
    """Takes the lock (exit 0) or finds it held (exit 1); the holder's record comes on standard input."""
    return f"mkdir -p -m 700 {LOCKS} && mkdir {_path(cluster)} 2>/dev/null && cat > {_path(cluster)}/holder"


def holder_command(cluster: str) -> str:
    return f"cat {_path(cluster)}/holder 2>/dev/null"


def release_command(cluster: str) -> str:
    return f"rm -rf {_path(cluster)}"


def holder_record(command: str, host: str, pid: int, since: str) -> str:
    return json.dumps({"host": host, "pid": pid, "command": command, "since": since})


def _holder(text: str) -> dict:
    try:
        h = json.loads(text)
    except ValueError:
        return {}
    return h if isinstance(h, dict) else {}


def stale(holder_text: str, host: str, pid_alive: Callable[[int], bool]) -> bool:
    """A lock held by a process of this machine that no longer runs (a crashed or killed run)."""
    h = _holder(holder_text)
    pid = h.get("pid")
    return h.get("host") == host and isinstance(pid, int) and pid > 0 and not pid_alive(pid)


def who(holder_text: str) -> str:
    h = _holder(holder_text)
    if not h:
        return "unknown holder"
    return f"{h.get('command', '?')} by pid {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('since', '?')}"
