"""Files under state_dir: private to the user (the folder 0700, every file 0600), written whole or
not at all (a temporary file, fsync, rename), with secrets masked as they are written.

Logs, events and incident bundles hold what a cluster did, and the API token lives here too:
nothing of it is for other local users, and nothing another user put there is trusted: a folder
owned by another user or writable by others is refused (StateDirUnsafe, with the fix), and no state
file is read or appended to through a symbolic link. events.jsonl is rotated past EVENTS_MAX_BYTES
(one older file kept, events.jsonl.1), and only the newest INCIDENTS_KEPT incident bundles are kept.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import StateDirUnsafe
from .masking import mask

DIR_MODE = 0o700
FILE_MODE = 0o600
# events.jsonl is rotated past this size (the older half kept as events.jsonl.1): a watchdog writes a few
# lines a minute when something happens, a restart loop a few hundred; 16 MiB is months of a cluster's life
EVENTS_MAX_BYTES = 16 * 2**20
# incident bundles kept (the newest; each holds the containers' logs: megabytes)
INCIDENTS_KEPT = 50


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
    st = path.lstat()
    # a folder found wider is narrowed only when it is the user's own and not shared (never /tmp, never the home folder)
    if st.st_mode & 0o777 != DIR_MODE and st.st_uid == os.getuid() and not st.st_mode & stat.S_ISVTX and path != Path.home():
        path.chmod(DIR_MODE)
        st = path.lstat()
    _own(path, st)
    return path


def _own(path: Path, st: os.stat_result) -> None:
    """Refuses a folder that is not the user's own: another owner, writable by others, a symbolic link."""
    if st.st_uid != os.getuid() or st.st_mode & 0o022 or stat.S_ISLNK(st.st_mode):
        what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else f"owned by uid {st.st_uid}" if st.st_uid != os.getuid()
                else f"writable by others (mode {stat.S_IMODE(st.st_mode):o})")
        raise StateDirUnsafe(f"{path} is {what}: spark-cluster keeps its token, events and logs only in a folder of its own user "
                             f"(uid {os.getuid()})", hint="set state_dir in cluster.yaml to a folder of your own (the default "
                                                          "~/.local/state/spark-cluster/<name>), or `chown` this one to you and "
                                                          "`chmod 700` it")


def read_private(path: Path) -> bytes:
    """A state file's bytes, never through a symbolic link and only when it is the user's own
    (FileNotFoundError when there is none; StateDirUnsafe otherwise). Reads only: nothing is created or changed."""
    _own(path.parent, path.parent.lstat())
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateDirUnsafe(f"{path} is a symbolic link: state files are read only as regular files of their own",
                                 hint=f"remove it (`rm {path}`); spark-cluster writes it again") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
            raise StateDirUnsafe(f"{path} is not a file of uid {os.getuid()}'s own", hint=f"remove it (`rm {path}`)")
        return f.read()


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


def rotated(path: Path) -> Path:
    """Where append_private keeps a file's older half (`<name>.1`)."""
    return path.with_name(path.name + ".1")


def append_private(path: Path, line: str, max_bytes: int = EVENTS_MAX_BYTES) -> None:
    """One line added at the end of the file (made 0600 when new; never through a symbolic link); past
    max_bytes the file is first moved to `<name>.1` (replacing the one there) and a new one begun. The
    caller masks the line (Watchdog.event)."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateDirUnsafe(f"{path} is a symbolic link: state files are written only as regular files of their own",
                                 hint=f"remove it (`rm {path}`)") from None
        raise
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        if os.fstat(f.fileno()).st_size + len(line) > max_bytes:
            os.replace(path, rotated(path))  # the open file goes with it; the line starts the new one
            append_private(path, line, max_bytes)
            return
        f.write(line)


def prune(folder: Path, keep: int) -> list[Path]:
    """The oldest entries of `folder` removed (by name, which starts with the time) beyond the newest `keep`; those removed."""
    import shutil

    try:
        entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    except FileNotFoundError:
        return []
    gone = entries[:max(len(entries) - keep, 0)]
    for p in gone:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


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


def read_state(path: Path, model: type[M], cluster: str, alert: Optional[Alert] = None, *, repair: bool = True) -> Optional[M]:
    """A JSON state file as its typed model; None when there is none. One of another shape or
    encoding is set aside (set_aside; repair False: left as it is, for readers that write nothing,
    `status`) and None returned: the reader goes on from a clean state."""
    try:
        raw = read_private(path)
    except OSError:
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if not repair:
            return None
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "the file"
        set_aside(path, f"{where}: {first.get('msg', 'invalid')}", cluster, alert)
        return None
