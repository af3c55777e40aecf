"""Notifications to the operator (cluster.yaml `notify`), sent through Apprise.

The controller hands every event to `Notifier.saw` from its event loop: a put into a bounded queue,
nothing more. A thread of the notifier turns events into notices (spark_cluster.notices: which, how
severe, the throttle per kind) and hands each to every target that wants it; each target has its own
bounded queue and thread, so a target that hangs or refuses delays neither the others nor the
watchdog nor the gateway. A message that finds its target's queue full is dropped, counted and
logged; a failed attempt is tried again 2, 4, 8 ... s later, up to notify.attempts.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import ConfigError
from .masking import mask
from .notices import Notice, Throttle, at_least, notice_for
from .serving_settings import NotifySettings, NotifyTarget

log = logging.getLogger("spark_cluster.notify")
TICK_S = 1.0  # how often the throttle's windows are looked at for summaries
EVENTS_QUEUED = 1000  # events waiting for the notifier's thread (the watchdog never waits: a full queue drops)
OUTCOMES = ("sent", "failed", "dropped")
Count = Callable[[str, str], None]  # (target, outcome)


@dataclass(frozen=True)
class TargetURL:
    name: str  # what logs and metrics call it: its place and its service, e.g. "1-json" (never the URL: a secret)
    url: str
    min_severity: str


def _url_of(t: NotifyTarget, index: int) -> str:
    where = f"notify.targets[{index}]"
    if t.url_env:
        url = os.environ.get(t.url_env, "").strip()
        if not url:
            raise ConfigError(f"{where}.url_env names {t.url_env}, which is not set (or empty) in the controller's environment")
        return url
    path = Path(str(t.url_file)).expanduser()
    try:
        lines = path.read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}.url_file {path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not lines or not lines[0].strip():
        raise ConfigError(f"{where}.url_file {path} is empty")
    return lines[0].strip()


def target_urls(s: NotifySettings) -> list[TargetURL]:
    """Each target's URL, read now; a URL Apprise cannot use is a ConfigError naming the target and the scheme only."""
    import apprise

    out = []
    for i, t in enumerate(s.targets):
        url = _url_of(t, i)
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if not scheme or apprise.Apprise.instantiate(url) is None:
            said = f"its scheme {scheme!r} is not one Apprise knows" if scheme else "it has no scheme (like json://, ntfys://, slack://)"
            raise ConfigError(f"notify.targets[{i}]: the URL from {t.url_env or t.url_file} cannot be used: {said}",
                              hint="see https://github.com/caronc/apprise/wiki for each service's URL")
        out.append(TargetURL(f"{i + 1}-{scheme.lower()}", url, t.min_severity or s.min_severity))
    return out


APPRISE_TYPE = {"info": "info", "warning": "warning", "critical": "failure"}


def send_once(url: str, n: Notice, timeout_s: float) -> tuple[bool, str]:
    """One attempt to send `n` to `url`: (sent, what went wrong)."""
    import apprise

    ap = apprise.Apprise()
    ap.add(url)
    try:
        result = ap.notify(body=n.body, title=n.title, notify_type=APPRISE_TYPE[n.severity], timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - a service's doing: counted and logged, the controller goes on
        return False, f"{type(exc).__name__}: {exc}"
    status = getattr(result, "status", None)
    return bool(result), "" if result else str(getattr(status, "name", status) or "not sent").lower()


class Masked(logging.Filter):
    """Apprise's own log lines, with every secret (the targets' URLs among them) masked."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = mask(record.getMessage(), self.secrets), ()
        return True


class Target:
    """One target's queue and sending thread."""

    def __init__(self, t: TargetURL, s: NotifySettings, count: Count, secrets: list[str],
                 send: Callable[[str, Notice, float], tuple[bool, str]] = send_once):
        self.t, self.s, self.count, self.secrets, self.send = t, s, count, secrets, send
        self.queue: queue.Queue[Optional[Notice]] = queue.Queue(maxsize=s.queue)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"notify-{t.name}", daemon=True)
        self.thread.start()

    def put(self, n: Notice) -> None:
        try:
            self.queue.put_nowait(n)
        except queue.Full:
            self.count(self.t.name, "dropped")
            log.warning("notification to target %s dropped (%d waiting, notify.queue): %s", self.t.name, self.s.queue,
                        mask(n.title, self.secrets))

    def _run(self) -> None:
        while (n := self.queue.get()) is not None:
            for attempt in range(self.s.attempts):
                ok, why = self.send(self.t.url, n, self.s.timeout_s)
                if ok:
                    self.count(self.t.name, "sent")
                    break
                log.warning("notification to target %s, attempt %d of %d, not sent: %s", self.t.name, attempt + 1, self.s.attempts,
                            mask(why, [self.t.url, *self.secrets]))
                if attempt + 1 < self.s.attempts and self.stopping.wait(2.0 ** (attempt + 1)):
                    break
            else:
                self.count(self.t.name, "failed")

    def stop(self, timeout_s: float) -> None:
        self.stopping.set()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass  # daemon thread: it ends with the process
        self.thread.join(timeout_s)


class Notifier:
    """Events in (`saw`, from the controller's loop: never blocks), notices out to every target."""

    def __init__(self, s: NotifySettings, targets: list[TargetURL], count: Count, secrets: list[str],
                 clock: Callable[[], float] = time.monotonic, send: Callable[[str, Notice, float], tuple[bool, str]] = send_once):
        self.s, self.clock = s, clock
        self.throttle = Throttle(s.per_kind, s.window_s)
        self.targets = [Target(t, s, count, secrets, send) for t in targets]
        self.events: queue.Queue[Optional[tuple[dict[str, Any], str]]] = queue.Queue(maxsize=EVENTS_QUEUED)
        self.thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self.masked = Masked(secrets)
        if self.targets:
            logging.getLogger("apprise").addFilter(self.masked)
            self.thread.start()

    def saw(self, e: dict[str, Any], where: str) -> None:
        if self.targets:
            try:
                self.events.put_nowait((e, where))
            except queue.Full:
                log.warning("notifier behind: event %s not looked at", e.get("event"))

    def _run(self) -> None:
        while True:
            try:
                item = self.events.get(timeout=TICK_S)
            except queue.Empty:
                item = ()
            if item is None:
                return
            out = self.throttle.due(self.clock())
            if item and (n := notice_for(*item)) is not None:
                out += self.throttle.admit(n, self.clock())
            for n in out:
                self.deliver(n)

    def deliver(self, n: Notice) -> None:
        for target in self.targets:
            if at_least(n.severity, target.t.min_severity):
                target.put(n)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.thread.is_alive():
            try:
                self.events.put(None, timeout=timeout_s)  # behind at most EVENTS_QUEUED events: the stop waits no longer than this
            except queue.Full:
                pass  # daemon thread: it ends with the process
            self.thread.join(timeout_s)
        for target in self.targets:
            target.stop(timeout_s)
        logging.getLogger("apprise").removeFilter(self.masked)


def send_test(targets: list[TargetURL], s: NotifySettings, where: str) -> list[tuple[str, bool, str]]:
    """`notify-test`: one message to every target, at once, whatever its least severity: (target, sent, why not)."""
    n = Notice("test", "info", where, f"spark-cluster {where}: test notification",
               "A test from `spark-cluster notify-test`: this target receives the cluster's notifications.")
    return [(t.name, *send_once(t.url, n, s.timeout_s)) for t in targets]
