"""Files under state_dir: private to the user (the folder 0700, every file 0600), written whole or
not at all (a temporary file, fsync, rename), with secrets masked as they are written.

Logs, events and incident bundles hold what a cluster did, and the API token lives here too:
nothing of it is for other local users.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from pydantic import BaseModel, ValidationError

from .masking import mask

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """The folder made private to the user, and each missing folder above it too; one found wider is
    narrowed when it is the user's own and not shared."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass
    path = missing[0] if missing else path
    st = path.stat()
    # a folder found wider is narrowed only when it is the user's own and not shared (never /tmp, never the home folder)
    if st.st_mode & 0o777 != DIR_MODE and st.st_uid == os.getuid() and not st.st_mode & stat.S_ISVTX and path != Path.home():
        path.chmod(DIR_MODE)
    return path


def write_private(path: Path, text: str, secrets: Sequence[str] = ()) -> Path:
    """The file replaced whole (a reader sees the old one or the new one, never a part), 0600, secrets masked."""
    private_dir(path.parent)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600, a name of its own
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(mask(text, secrets))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def append_private(path: Path, line: str) -> None:
    """One line added at the end of the file (made 0600 when new); the caller masks it (Watchdog.event)."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line)


EVENTS_FILE = "events.jsonl"
M = TypeVar("M", bound=BaseModel)
Alert = Callable[[str], None]


def record_event(folder: Path, cluster: str, kind: str, **data: Any) -> None:
    """An event line in folder's events.jsonl, as the watchdog writes them (for readers without a watchdog)."""
    event = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": kind, "cluster": cluster, **data}
    append_private(folder / EVENTS_FILE, json.dumps(event, default=str) + "\n")


def set_aside(path: Path, why: str, cluster: str, alert: Optional[Alert] = None) -> Optional[Path]:
    """A state file that cannot be read moved aside (`<name>.corrupt-<time>`, kept for a person to
    look at), and an alert saying so: through `alert`, else as a line in events.jsonl. Never raises
    (a read-only state_dir: the alert says the file stays where it is)."""
    aside: Optional[Path] = path.with_name(f"{path.name}.corrupt-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}")
    try:
        os.replace(path, aside)  # type: ignore[arg-type]
        where = f"kept as {aside.name}"  # type: ignore[union-attr]
    except FileNotFoundError:
        return None  # another reader set it aside first
    except OSError as exc:
        aside, where = None, f"left in place ({exc.strerror})"
    message = f"state file {path.name} could not be read ({why}): {where}; going on from a clean state"
    try:
        if alert is not None:
            alert(message)
        else:
            record_event(path.parent, cluster, "alert", reason=message)
    except OSError:
        pass
    return aside


def read_state(path: Path, model: type[M], cluster: str, alert: Optional[Alert] = None) -> Optional[M]:
    """A JSON state file as its typed model; None when there is none. One of another shape or
    encoding is set aside (set_aside) and None returned: the reader goes on from a clean state."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "the file"
        set_aside(path, f"{where}: {first.get('msg', 'invalid')}", cluster, alert)
        return None
