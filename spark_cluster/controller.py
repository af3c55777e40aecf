"""The controller: one long-running process per cluster (`spark-cluster controller CONFIG`).

It holds the watchdog (in a thread: observe, decide, restart the group in order), and serves two
planes on two ports:
- the data plane on `gateway.port`: /v1/*, the OpenAI API clients use instead of vLLM's port
  (spark_cluster.gateway), on a server of its own (spark_cluster.front);
- the control plane on `controller.port` (127.0.0.1 by default), FastAPI on uvicorn
  (spark_cluster.control_api: status, events, incidents, metrics, the status page, restart and
  pause/resume with the token).
Every watchdog event is pushed from its thread into the event loop, where it moves the gateway's
door, the metrics and the event streams. Nothing shown carries a secret: events and status pass
through `mask` with every secret value of cluster.yaml, and the token is never printed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import Request

from . import rollout, timeouts
from .config import ClusterConfig
from .decide import hour_restarts, recent_restarts
from .errors import ConfigError
from .front import GatewayServer
from .door import Door, door_for_phase
from .gateway import Gateway
from .masking import mask
from .metrics import ControllerMetrics
from .notify import Notifier, target_urls
from .speed_watch import SpeedWatch
from .render import render
from .stream_log import StreamLog
from .state_dir import EVENTS_FILE, FILE_MODE, append_private, private_dir, read_private, set_aside
from .transport import Nodes
from .watchdog import Watchdog

log = logging.getLogger("spark_cluster.controller")
EVENTS_KEPT = 500
TOKEN_NEEDED = ("a valid bearer token is needed (cluster.yaml api.token_env or api.token_file; default state_dir/api-token); "
                "the status page asks for it once")
SESSION_COOKIE = "spark_cluster_session"


def load_token(cfg: ClusterConfig) -> str:
    """The API's bearer token: from the variable or file cluster.yaml names, else state_dir/api-token
    (created with a random token, mode 600, on first start)."""
    a = cfg.api
    if a.token_env:
        value = os.environ.get(a.token_env, "").strip()
        if not value:
            raise ConfigError(f"api.token_env names {a.token_env}, which is not set (or empty) in the controller's environment")
        return value
    path = Path(a.token_file).expanduser() if a.token_file else cfg.resolved_state_dir() / "api-token"
    if not path.exists() and not a.token_file:
        private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    try:
        value = (path.read_text() if a.token_file else read_private(path).decode("utf-8", "replace")).strip()
    except OSError as exc:
        raise ConfigError(f"api.token_file {path}: cannot be read ({exc.strerror})") from None
    if not value:
        raise ConfigError(f"api token file {path} is empty")
    return value


def tail_events(path: Path, n: int, cluster: str) -> list[dict[str, Any]]:
    """The last n events of events.jsonl. A file holding a line that is not a JSON object in UTF-8
    is set aside with an alert (state_dir.set_aside); its readable events are still shown."""
    try:
        lines = read_private(path).splitlines()
    except OSError:
        return []
    out, bad = [], 0
    for line in lines:
        try:
            event = json.loads(line.decode("utf-8"))
        except ValueError:  # not UTF-8 (UnicodeDecodeError is one), not JSON
            event = None
        if isinstance(event, dict):
            out.append(event)
        elif line.strip():
            bad += 1
    if bad:
        set_aside(path, f"{bad} line(s) are not JSON events in UTF-8", cluster)
        return (out + tail_events(path, n, cluster))[-n:]  # what could be read, then the alert
    return out[-n:]


WatchdogFactory = Callable[[ClusterConfig, Nodes, Callable[[dict[str, Any]], None]], Watchdog]


def listening_socket(host: str, port: int, setting: str) -> socket.socket:
    """A socket bound now, before anything starts, so that a port in use is said plainly (`setting`
    names the cluster.yaml keys)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{setting}: cannot listen on {host}:{port} ({exc.strerror})",
                          hint="another controller of this cluster may be running, or another program holds the port: "
                               f"stop it or choose another {setting.split('/')[-1]}") from None
    return sock


class Controller:
    def __init__(self, cfg: ClusterConfig, *, token: Optional[str] = None, watchdog: Optional[WatchdogFactory] = None,
                 gateway_socket: Optional[socket.socket] = None):
        """`gateway_socket`: where the gateway serves clients (bound by `listening_socket`); without
        it the gateway is made but not served (tests of the control plane alone). With groups
        (cluster.yaml `groups`), one watchdog per group, each in its own thread, and one gateway."""
        self.cfg = cfg
        self.groups = dict(cfg.group_configs())  # label -> the group as a cluster of its own
        self.several = bool(cfg.groups)
        self.gateway_socket = gateway_socket
        self.front: Optional[GatewayServer] = None
        self.make_watchdog: WatchdogFactory = watchdog or (
            lambda group, nodes, on_event: Watchdog(group, nodes, on_event=on_event, in_flight=lambda: self.in_flight(self.label_of(group))))
        self.token = token if token is not None else load_token(cfg)
        # the status page's session: derived from the token, so the cookie never holds the token itself
        self.session = hmac.new(self.token.encode(), b"spark-cluster status page", hashlib.sha256).hexdigest()
        notify_targets = target_urls(cfg.notify)  # read now: a target that cannot be used stops the start, said plainly
        self.secrets = sorted({v for v in cfg.secret_values() + [self.token] + [t.url for t in notify_targets] if v}, key=len, reverse=True)
        self.dir = cfg.resolved_state_dir()
        self.events: deque[dict[str, Any]] = deque(self._kept_events(), maxlen=EVENTS_KEPT)
        self.subscribers: set[asyncio.Queue] = set()
        self.wds: dict[str, Watchdog] = {}
        self.gateway: Optional[Gateway] = None
        self.metrics = ControllerMetrics(list(self.groups), lambda: {g: wd.samples[-1] for g, wd in self.wds.items() if wd.samples},
                                         lambda: {g: len(m.flights) for g, m in self.gateway.members.items()} if self.gateway else {})
        self.metrics.notify_targets([t.name for t in notify_targets])
        self.notifier = Notifier(cfg.notify, notify_targets, self.metrics.notified, self.secrets)
        self.speed_task: Optional[asyncio.Task] = None
        self.speed = SpeedWatch(cfg.slow, self.record, self.metrics.speed_shown,
                                lambda label, share: self.gateway.weigh(label, share) if self.gateway else None)
        self.streams = StreamLog(self.record, lambda text: mask(text, self.secrets), next(iter(self.groups)), self.cfg.gateway.continue_within_s)
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.stopping = threading.Event()
        self.threads: dict[str, threading.Thread] = {}
        self.stop_flags: dict[str, threading.Event] = {}  # one group's watchdog stops (a rolling change)
        self.rolling = asyncio.Lock()  # one rolling change at a time
        self.guesses = asyncio.Lock()  # wrong tokens wait their turn (control_api._failed_attempt)
        self.tasks: set[asyncio.Task] = set()  # rolling changes under way (kept: a task nobody holds may vanish)
        self.nodes: dict[str, Nodes] = {}
        self.status_nodes: dict[str, Nodes] = {}
        self.status_lock = threading.Lock()
        self.status_cache: tuple[float, Any] = (float("-inf"), None)
        self.watchdog_errors: dict[str, str] = {}

    @property
    def wd(self) -> Optional[Watchdog]:
        """The watchdog of a cluster without groups (the first group's with groups)."""
        return next(iter(self.wds.values()), None)

    def label_of(self, group: ClusterConfig) -> str:
        return next(label for label, g in self.groups.items() if g.name == group.name)

    def _kept_events(self) -> list[dict[str, Any]]:
        """The last events each group's watchdog wrote (events.jsonl in its state folder), in time order."""
        if not self.several:
            return tail_events(self.dir / EVENTS_FILE, EVENTS_KEPT, self.cfg.name)
        merged = [{**e, "group": label} for label, g in self.groups.items()
                  for e in tail_events(g.resolved_state_dir() / EVENTS_FILE, EVENTS_KEPT, g.name)]
        return sorted(merged, key=lambda e: str(e.get("ts", "")))[-EVENTS_KEPT:]

    # ---- life -------------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.gateway = Gateway({label: g.endpoint() for label, g in self.groups.items()}, self.cfg.gateway, self.metrics)
        self.gateway.on_carried = self.streams.carried
        for label, group in list(self.groups.items()):
            self.start_watch(label, group, Nodes(group))
            wd = self.wds[label]
            self.gateway.set_door(door_for_phase(wd.state.phase, wd.state.last_reason), group=label)
        if self.gateway_socket is not None:
            self.front = GatewayServer(self.gateway)
            await self.front.start(self.gateway_socket)
        if self.cfg.slow.enabled:
            self.speed_task = asyncio.create_task(self._look_at_speed(), name="speed")

    async def _look_at_speed(self) -> None:
        """Every few seconds, each group's slow verdict from its watchdog's samples (spark_cluster.speed_watch)."""
        while not self.stopping.is_set():
            await asyncio.sleep(timeouts.SPEED_LOOK_S)
            wds = dict(self.wds)
            try:
                self.speed.look({g: list(wd.samples) for g, wd in wds.items()},
                                {g: "paused" if wd.paused else wd.state.phase for g, wd in wds.items()},
                                {g: {n.name: n._gpus for n in getattr(getattr(wd, "eyes", None), "last_nodes", [])} for g, wd in wds.items()})
            except Exception:  # noqa: BLE001 - a bug here must not end the verdicts for good: logged, looked at again
                log.exception("the slow verdict's look failed")

    def start_watch(self, label: str, group: ClusterConfig, nodes: Nodes) -> None:
        """A watchdog of `group` in a thread of its own (a rolling change: of the group's new config), and
        status's connections to its nodes."""
        for old in (self.nodes.get(label), self.status_nodes.get(label)):
            if old is not None and old is not nodes:
                old.close()
        self.groups[label], self.nodes[label], self.status_nodes[label] = group, nodes, Nodes(group)
        wd = self.wds[label] = self.make_watchdog(group, nodes, self._reporter(label))
        self.metrics.state.labels(label).state(wd.state.phase)
        flag = self.stop_flags[label] = threading.Event()
        self.watchdog_errors.pop(label, None)
        self.threads[label] = threading.Thread(target=self._watch, args=(label, wd, flag), name=f"watchdog-{label}", daemon=True)
        self.threads[label].start()

    # ---- a rolling change (spark_cluster.rollout: its Fleet) --------------------------------------
    def change_refused(self, new: ClusterConfig) -> Optional[str]:
        """Why `new` cannot roll through the running groups (None: it can)."""
        return rollout.refusal(self.cfg, new) or ("a rolling change is already under way" if self.rolling.locked() else None)

    def restart_needed_for(self, new: ClusterConfig) -> list[str]:
        """The changed settings this controller reads only when it starts."""
        return rollout.needs_restart(self.cfg, new)

    async def roll_out(self, new: ClusterConfig, report: Callable[[dict[str, Any]], None]) -> bool:
        """Each group of `new` in turn (one change at a time); True when every group serves it, which
        is then this controller's config."""
        async with self.rolling:
            ok = await rollout.roll_out(self, new, report)
            if ok:
                self.cfg = new
            return ok

    @property
    def drain_s(self) -> float:
        return self.cfg.gateway.drain_s

    def current(self, label: str) -> ClusterConfig:
        return self.groups[label]

    def drain(self, label: str, reason: str) -> int:
        """The group takes no new request; how many it has in flight."""
        assert self.gateway is not None
        self.gateway.drain(label, reason)
        return len(self.gateway.members[label].flights)

    async def drained(self, label: str, timeout_s: float) -> int:
        assert self.gateway is not None
        return await self.gateway.drained(label, timeout_s)

    async def undrain(self, label: str, door: Door, url: str) -> None:
        assert self.gateway is not None
        await self.gateway.undrain(label, door, url)

    async def stop_watch(self, label: str) -> None:
        """One group's watchdog stopped (after the period, or the restart, it is in)."""
        self.stop_flags[label].set()
        self.wds[label].woken.set()
        await asyncio.to_thread(self.threads[label].join, timeouts.CONTROLLER_STOP_S + self.groups[label].health.ready_timeout_s)

    def _watch(self, label: str, wd: Watchdog, flag: threading.Event) -> None:
        try:
            wd.run(stop=lambda: self.stopping.is_set() or flag.is_set(), stop_when_failed=False)
        except Exception as exc:  # noqa: BLE001 - shown by /healthz and the page, the controller stays up
            self.watchdog_errors[label] = f"{type(exc).__name__}: {exc}"

    def watching(self) -> bool:
        """Every group's watchdog thread runs."""
        return bool(self.threads) and all(t.is_alive() or self.stop_flags[label].is_set() for label, t in self.threads.items())

    async def stop(self) -> None:
        if self.speed_task is not None:
            self.speed_task.cancel()
        if self.front is not None:
            await self.front.stop(timeouts.GRACEFUL_SHUTDOWN_S)
        self.stopping.set()
        for wd in self.wds.values():
            wd.woken.set()
        for t in self.threads.values():
            await asyncio.to_thread(t.join, timeouts.CONTROLLER_STOP_S)
        for n in [*self.nodes.values(), *self.status_nodes.values()]:
            n.close()
        if self.gateway is not None:
            await self.gateway.aclose()
        await asyncio.to_thread(self.notifier.stop)

    def token_ok(self, request: Request) -> bool:
        """The bearer token in the Authorization header, or the status page's session cookie; compared
        in constant time, never taken from the query."""
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return hmac.compare_digest(auth[7:].strip().encode(), self.token.encode())
        return hmac.compare_digest(request.cookies.get(SESSION_COOKIE, "").encode(), self.session.encode())

    def in_flight(self, label: str) -> int:
        """Requests the gateway has sent a group's engine and not seen finish, their clients reading (read
        from its watchdog's thread): what a client leaves unread is not the engine's pending work."""
        return self.gateway.members[label].with_engine() if self.gateway is not None else 0

    # ---- events -----------------------------------------------------------------------------
    def _reporter(self, label: str) -> Callable[[dict[str, Any]], None]:
        """A group's watchdog's events, into the event loop (labelled with the group when there are several)."""
        def report(e: dict[str, Any]) -> None:
            if self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.on_event, {**e, "group": label} if self.several else e)
        return report

    def on_event(self, e: dict[str, Any]) -> None:
        e = json.loads(mask(json.dumps(e, default=str), self.secrets))
        label = e.get("group") if e.get("group") in self.groups else next(iter(self.groups))
        self.events.append(e)
        self.metrics.on_event(e, label)
        self.streams.saw(e, label)
        self.notifier.saw(e, f"{self.cfg.name}/{label}" if self.several else self.cfg.name)
        if self.gateway is not None:
            self.gateway.on_event(e, label)
        for q in list(self.subscribers):
            if q.qsize() < 1000:
                q.put_nowait(e)

    def record(self, e: dict[str, Any]) -> None:
        """An event of the controller's own doing to a group (a rolling change's): published as the
        watchdogs' are, and kept in the group's events.jsonl beside theirs (read again at a restart)."""
        group = self.groups.get(str(e.get("group")))
        if group is not None:
            e = {**e, "cluster": group.name}
            append_private(group.resolved_state_dir() / EVENTS_FILE, mask(json.dumps(e, default=str), self.secrets) + "\n")
        self.on_event(e)

    # ---- what the API reads -----------------------------------------------------------------
    def status_json(self) -> dict[str, Any]:
        """The last observation when recent; else one gather at a time, while the other requests get
        the last observation at once (only the very first waits for it)."""
        t, rep = self.status_cache
        if rep is not None and time.monotonic() - t <= timeouts.STATUS_CACHE_S:
            return rep
        if not self.status_lock.acquire(blocking=rep is None):
            return rep
        try:
            t, rep = self.status_cache
            if rep is None or time.monotonic() - t > timeouts.STATUS_CACHE_S:
                rep = json.loads(mask(self._observe().model_dump_json(), self.secrets))
                self.status_cache = (time.monotonic(), rep)
            return rep
        finally:
            self.status_lock.release()

    def _observe(self) -> Any:
        from . import status

        if self.several:
            return status.groups_status(self.cfg, self.status_nodes, window_s=0.5)
        return status.status(self.cfg, next(iter(self.status_nodes.values())), window_s=0.5)

    def watchdog_json(self) -> dict[str, Any]:
        """The watchdog's state and the gateway's door; with groups, each group's under `groups`."""
        gw = self.gateway
        door = {"door": gw.door.mode if gw else "hold", "reason": mask(gw.door.reason, self.secrets) if gw else "",
                "held": gw.held if gw else 0, "in_flight": len(gw.flights) if gw else 0}
        groups = {label: self._group_json(label) for label in self.groups}
        if not self.several:
            return {**next(iter(groups.values())), "gateway": door}
        states = {label: g["state"] for label, g in groups.items()}
        summary = next(iter(states.values())) if len(set(states.values())) == 1 else ", ".join(f"{k} {v}" for k, v in states.items())
        return {"state": summary, "groups": groups, "gateway": door,
                "error": "; ".join(f"group {k}: {v}" for k, v in self.watchdog_errors.items()) or None}

    def _group_json(self, label: str) -> dict[str, Any]:
        wd = self.wds.get(label)
        st = wd.state if wd else None
        member = self.gateway.members[label] if self.gateway else None
        return {
            "state": "paused" if wd and wd.paused else (st.phase if st else "starting"),
            "reason": mask(st.suspect_reason or st.last_reason, self.secrets) if st else "",
            "restarts_last_hour": len(hour_restarts(st, wd.clock())) if st and wd else 0,
            "restarts_counted": len(recent_restarts(st, wd.clock())) if st and wd else 0,  # since the last deliberate start
            "last_restart": st.last_restart if st else None,
            "door": member.door.mode if member else "hold",
            "in_flight": len(member.flights) if member else 0,
            "error": self.watchdog_errors.get(label),
            "slow": self.speed.verdict(label),
        }

    def incidents(self, n: int) -> list[dict[str, Any]]:
        """The last n incident bundles (of every group: named <group>/<bundle>), newest first."""
        found = []
        for label, group in self.groups.items():
            root = group.resolved_state_dir() / "incidents"
            found += [(d.name, f"{label}/{d.name}" if self.several else d.name, d) for d in root.glob("*") if d.is_dir()]
        out = []
        for _, name, d in sorted(found, reverse=True)[:n]:
            reason = (d / "reason.txt").read_text().strip() if (d / "reason.txt").exists() else ""
            files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
            out.append({"name": name, "reason": mask(reason, self.secrets), "files": files, "restart": _restart_of(d)})
        return out


def _restart_of(bundle: Path) -> Optional[dict[str, Any]]:
    """The bundle's restart.json (its kind, seconds and parts), or None while it runs or when unreadable."""
    try:
        done = json.loads((bundle / "restart.json").read_text())
        return {k: done[k] for k in ("event", "restart", "seconds", "phases") if k in done}
    except (OSError, ValueError, TypeError):
        return None


def systemd_unit(cfg: ClusterConfig, config: Path, command: str) -> str:
    """A systemd unit that runs `spark-cluster <command> CONFIG` (controller or watch) as this user."""
    import getpass
    import shutil
    import sys

    exe = shutil.which("spark-cluster") or f"{sys.executable} -m spark_cluster"
    return render("spark-cluster-watch.service.j2", cluster=cfg.name, config=str(config.resolve()), command=command,
                  state_dir=str(cfg.resolved_state_dir()), user=getpass.getuser(), executable=exe,
                  max_clients=cfg.gateway.max_clients, max_connections=cfg.gateway.max_connections,
                  nofile=max(65536, 2 * (cfg.gateway.max_clients + cfg.gateway.max_connections)))
