"""The gateway's groups (cluster.yaml `groups`; one without): each a Member with its engine, its door
and its requests in flight. `Members` keeps their doors as the watchdogs' events move them, drains
one for a rolling change, and picks the group a request goes to (spark_cluster.routing); the proxy
itself is spark_cluster.gateway's `Gateway`, a `Members`."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Optional, Protocol

from .continuation import Kept, pass_events
from .door import Door, door_after, overall_door
from .routing import PrefixTable, choose
from .serving_settings import GatewaySettings
from .upstream import Upstream


class Signal(asyncio.Event):
    """An asyncio.Event that also calls back when set: a request waits for its exchange, an
    interruption and its client's leaving on one future, without a task per thing awaited (each
    task is time on the hop)."""

    def __init__(self) -> None:
        super().__init__()
        self.callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        super().set()
        for callback in list(self.callbacks):
            callback()


@dataclass(eq=False)
class Member:
    """One group's engine behind the gateway."""

    name: str
    engine: Upstream
    door: Door = field(default_factory=Door)
    flights: set["Flight"] = field(default_factory=set)
    draining: bool = False  # a rolling change: its watchdog's events leave its door alone

    def with_engine(self) -> int:
        """Its requests that wait on the engine: those whose client does not read (the engine may be done
        with them) are not counted. Read from the watchdog's thread: the copy of the set is one atomic step."""
        return sum(1 for f in tuple(self.flights) if not f.client_blocked)


# The most of an event stream held back waiting for its event's end (vLLM's events are a few kB, with
# logprobs tens): past it the bytes go on as they are
EVENT_HELD_MAX = 2**20


@dataclass(eq=False)
class Flight:
    """One request while it is with the engine."""

    interrupt: Signal = field(default_factory=Signal)
    started: bool = False  # the response's head went to the client: no retry from here on
    finished: bool = False  # its last byte went too (a client leaving now changes nothing)
    event_stream: bool = False
    partial: bytes = b""  # an event stream's bytes past its last whole event: held until the event is whole
    done_sent: bool = False  # an event stream's `data: [DONE]` went out: the client has the whole answer
    cut: bool = False  # an interruption or the client's leaving cancelled the exchange
    tried: frozenset[str] = frozenset()  # the groups its request went to before this attempt
    client: Optional["Writer"] = None  # where its answer goes (front's request): is the client reading?
    kept: Optional[Kept] = None  # a stream the gateway may continue: what it keeps of it (continuation)
    why_cut: str = ""  # why a started answer could not be completed (its error event says it)
    first_at: float = 0.0  # when its answer's first piece came (time.monotonic)

    @property
    def client_blocked(self) -> bool:
        """The client does not read: the answer waits on it, not on the engine."""
        return self.client is not None and self.client.blocked

    def passing(self, chunk: bytes) -> bytes:
        """What of a piece of the answer goes on to the client now: all of it, but of an event stream
        only whole events (what follows the last one waits for its end), so that a stream cut in the
        middle of an event never hands the client half an event: its error event comes after whole ones."""
        if not self.event_stream:
            return chunk
        data = self.partial + chunk if self.partial else chunk
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        out, self.partial = data[:end], data[end:]
        if len(self.partial) > EVENT_HELD_MAX:  # not events as vLLM sends them: passed on as they come
            out, self.partial = data, b""
        if out:
            if self.kept is not None:
                out = pass_events(self.kept, out)
            self.done_sent = out.endswith(b"data: [DONE]\n\n")
        return out

    def rest(self) -> bytes:
        """What was held back, once the answer has ended whole (its last event without its blank line)."""
        out, self.partial = self.partial, b""
        return out


class Observer:
    """What the gateway reports (the controller's metrics implement it)."""

    def outcome(self, outcome: str) -> None: ...
    def first_byte(self, seconds: float) -> None: ...
    def held(self, count: int) -> None: ...
    def count_in_flight(self, count: Callable[[], int]) -> None: ...
    def routed(self, group: str, how: str) -> None: ...
    def cut(self, why: str) -> None: ...
    def continued(self, group: str, how: str, pause_s: float) -> None: ...
    def not_continued(self, reason: str) -> None: ...


# Takes the answer as messages of ASGI's shape (http.response.start, then http.response.body pieces).
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Writer(Protocol):
    """A client the gateway can write a body's pieces to at once, from the engine connection's own
    callback (spark_cluster.front): `write` returns False when the client reads slower than the
    engine writes; `on_drain` is called when it has caught up."""

    on_drain: Optional[Callable[[], None]]

    @property
    def blocked(self) -> bool: ...

    def write(self, chunk: bytes) -> bool: ...


def to_move(doubted: Member, members: Iterable[Member]) -> list[Flight]:
    """The requests to take off a group the watchdog now doubts (no progress with work in flight, its
    ranks not all seen working): those that have sent nothing to their client yet, each when a group
    serves undoubted that it has not tried; rather than wait there for the hang to be confirmed.
    Started streams stay: the doubt may pass. Each request moves at most once per group, so two
    doubted groups never pass one between them."""
    others = [o for o in members if o is not doubted and o.door.mode == "open" and not o.door.suspect]
    return [f for f in doubted.flights if not f.started and any(o.name not in f.tried for o in others)]


class Members:
    def __init__(self, upstreams: "str | dict[str, str]", settings: GatewaySettings, observer: Observer | None = None):
        """upstreams: each group's engine by its label (one URL: one group)."""
        self.s = settings
        self.obs = observer or Observer()
        self.door = Door()
        self.changed = asyncio.Event()  # set (and replaced) at every change of a door
        self.flights: set[Flight] = set()
        self.obs.count_in_flight(lambda: len(self.flights))
        urls = upstreams if isinstance(upstreams, dict) else {"": upstreams}
        self.members = {name: Member(name, self._upstream(url)) for name, url in urls.items()}
        self.prefixes = PrefixTable()
        self.credits: dict[str, float] = {}  # equal loads: each group's turn, by its weight (routing.choose)
        self.weights: dict[str, float] = {}  # a slow group's share (spark_cluster.speed_watch)

    def _upstream(self, url: str) -> Upstream:
        return Upstream(url, max_connections=self.s.max_connections, connect_timeout_s=self.s.connect_timeout_s,
                        read_timeout_s=self.s.read_timeout_s, max_head=self.s.max_head_bytes())

    async def aclose(self) -> None:
        for m in self.members.values():
            await m.engine.aclose()

    # ---- the doors ---------------------------------------------------------------------------
    def set_door(self, door: Door, interrupt: bool = False, group: Optional[str] = None) -> None:
        """A group's door (every group's when `group` is None); interrupt: act on that group's flights now.
        A group turning suspect gives up its unanswered requests to the others (to_move)."""
        changed = False
        for m in self.members.values() if group is None else [self.members[group]]:
            doubted = door.suspect and not m.door.suspect
            if door != m.door:
                m.door, changed = door, True
                if door.mode != "open":
                    self.prefixes.forget(m.name)  # its cache does not outlive a restart
            for f in list(m.flights) if interrupt else to_move(m, self.members.values()) if doubted else ():
                f.interrupt.set()
        if changed:
            self.door = overall_door([m.door for m in self.members.values()])
            self.changed.set()
            self.changed = asyncio.Event()

    def on_event(self, event: dict[str, Any], group: Optional[str] = None) -> None:
        """A watchdog's event: its group's door moves (`group` None: the only group)."""
        m = self.members[group] if group is not None else next(iter(self.members.values()))
        if m.draining:
            return
        door, interrupt = door_after(m.door, event)
        self.set_door(door, interrupt, m.name)

    def weigh(self, group: str, share: float) -> None:
        """A group's share of new requests against its peers' (a slow group's speed against what it should be)."""
        self.weights[group] = share

    # ---- a rolling change, one group at a time ---------------------------------------------------
    def drain(self, group: str, reason: str) -> None:
        """The group takes no new request (they go to the other groups, or wait at the door when it
        is the only one); what it has in flight goes on."""
        self.set_door(Door("hold", reason, public="a rolling change is under way"), group=group)
        self.members[group].draining = True

    async def drained(self, group: str, timeout_s: float) -> int:
        """Wait until the group has nothing in flight, at most timeout_s; what is left then is cut
        (a stream ends with its error event, a request not yet answered goes to another group).
        How many were cut."""
        m = self.members[group]
        deadline = time.monotonic() + timeout_s
        while m.flights and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(m.flights)
        for f in left:
            f.interrupt.set()
        return len(left)

    async def undrain(self, group: str, door: Door, url: str) -> None:
        """The group takes requests again, at `url` (a rolling change may have moved its API server)."""
        m = self.members[group]
        if url != m.engine.url:
            old, m.engine = m.engine, self._upstream(url)
            await old.aclose()
        m.draining = False
        self.set_door(door, group=group)

    def pick(self, tried: set[str], keys: list[bytes]) -> Optional[Member]:
        """The member a request goes to now: an open one it has not failed on (a suspect one only when
        no other serves), by routing.choose; None when no door is open."""
        open_ = [m for m in self.members.values() if m.door.mode == "open"]
        fresh = [m for m in open_ if m.name not in tried] or open_
        candidates = [m for m in fresh if not m.door.suspect] or fresh
        if not candidates:
            return None
        if len(self.members) == 1:
            return candidates[0]
        name, how = choose({m.name: len(m.flights) for m in candidates}, self.prefixes.longest(keys) if keys else None,
                           self.s.affinity_bound, self.credits, self.weights)
        self.prefixes.remember(keys, name)
        self.obs.routed(name, how)
        return self.members[name]
