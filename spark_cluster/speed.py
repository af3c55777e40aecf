"""Is a group that still serves slower than it should? Pure rules, table-tested (tests/test_speed.py).

A Spark can go on serving at a fraction of its speed: decode flips from 63 to 94 ms a token on a firmware
power limit nvidia-smi does not show, some makes throttle at 82 °C to 70-80 %, a power-delivery defect
caps a GX10 at ~30 W (docs/field.md). Nothing fails, so no watchdog rule sees it; every client routed to
that group waits longer.

The measure: the engine's own time between two tokens of a request (vllm:inter_token_latency_seconds,
each token observed), the median of the watchdog's periods over the last `window_s`, at the load the group had (requests running, in buckets
of powers of two: a batch of 8 decodes slower per token than one request). A group is `slow` when that
is `slower_by` above what it learned for that load, or above the fastest peer group's at that load, for
`for_s`; back when it is within half of that for `for_s`. What it learns comes only from windows that
were not above (a slow period teaches nothing).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from .serving_settings import SlowSettings

MIN_TOKENS = 20  # fewer tokens in a window: no measure (an idle group is neither slow nor fast)
MIN_PERIOD_TOKENS = 3  # a period with fewer says little of the time per token
MIN_PERIODS = 3  # periods of the window with a figure, at least
LEARN_RATE = 0.1  # each look's weight in a load's baseline (an exponential mean: the looks' windows overlap)


@dataclass(frozen=True)
class Measure:
    t: float
    s_per_token: float
    load: int  # its bucket: 0 for 1 request running, 1 for 2, 2 for 3-4, 3 for 5-8 ...

    @property
    def running(self) -> str:
        return "1" if self.load == 0 else f"{2 ** (self.load - 1) + 1}-{2 ** self.load}" if self.load > 1 else "2"


def load_bucket(running: float) -> int:
    return max(0, math.ceil(math.log2(max(running, 1.0))))


def measure(samples: Sequence[dict[str, Any]], window_s: float) -> Optional[Measure]:
    """The decode time per token over the last `window_s` of a group's watchdog samples (oldest first): the median
    of each period's (a step of other requests' prefill, a scheduler's hiccup, move one period, not the verdict),
    the periods since the engine last started only, or None: too few tokens, no such figure from the engine."""
    if not samples:
        return None
    last = samples[-1]
    inside = [x for x in samples if last["t"] - x["t"] <= window_s and x.get("itl_sum") is not None and x.get("itl_count") is not None]
    per_period, tokens = [], 0.0
    for a, b in zip(inside, inside[1:]):
        n, spent = b["itl_count"] - a["itl_count"], b["itl_sum"] - a["itl_sum"]
        if n < 0 or spent < 0:  # a new engine: only its own periods count
            per_period, tokens = [], 0.0
            continue
        tokens += n
        if n >= MIN_PERIOD_TOKENS:
            per_period.append(spent / n)
    if tokens < MIN_TOKENS or len(per_period) < MIN_PERIODS:
        return None
    running = [float(x.get("running") or 0) for x in inside[1:]]
    return Measure(last["t"], statistics.median(per_period), load_bucket(sum(running) / len(running)))


@dataclass(frozen=True)
class SpeedState:
    slow: bool = False
    since: Optional[float] = None  # when the present verdict's condition began to hold (None: it does not)
    baseline: dict[int, float] = field(default_factory=dict)  # load bucket -> seconds a token, learned
    learned: dict[int, int] = field(default_factory=dict)  # load bucket -> windows it learned from
    reason: str = ""
    share: float = 1.0  # the group's speed against what it should be (1 when not slow): the gateway's weight


def _ms(s: float) -> str:
    return f"{s * 1000:.0f} ms"


def judge(state: SpeedState, m: Optional[Measure], peers: Sequence[Measure], s: SlowSettings,
          facts: str = "") -> tuple[SpeedState, Optional[tuple[str, str]]]:
    """One look at a group: its new state and the event to say, (`slow` or `slow-over`, reason), if any.
    `peers`: the other serving groups' measures now; `facts`: what its nodes' GPUs say (shown with a verdict)."""
    if m is None:
        return state, None
    own = state.baseline.get(m.load) if state.learned.get(m.load, 0) >= s.learn_windows else None
    peer = min((p.s_per_token for p in peers if p.load == m.load), default=None)
    refs = {**({f"its own {_ms(own)} at {m.running} running": own} if own else {}),
            **({f"the fastest other group's {_ms(peer)}": peer} if peer else {})}
    worst = max(((m.s_per_token / v, k) for k, v in refs.items()), default=None)
    if worst is None:  # nothing to compare with yet: learn (a slow group waits for a measure it can be judged by)
        return (state, None) if state.slow else (_learn(state, m), None)
    ratio, against = worst
    if not state.slow:
        if ratio < 1 + s.slower_by:
            return _learn(state, m), None
        since = state.since if state.since is not None else m.t
        if m.t - since < s.for_s:
            return replace(state, since=since), None
        reason = f"decode {_ms(m.s_per_token)} a token over the last {s.window_s:g}s, {ratio - 1:+.0%} against {against}" + (
            f"; {facts}" if facts else "")
        return replace(state, slow=True, since=None, reason=reason, share=round(1 / ratio, 3)), ("slow", reason)
    if ratio >= 1 + s.slower_by / 2:
        return replace(state, since=None, share=round(1 / ratio, 3)), None
    since = state.since if state.since is not None else m.t
    if m.t - since < s.for_s:
        return replace(state, since=since), None
    reason = f"decode {_ms(m.s_per_token)} a token, {ratio - 1:+.0%} against {against}"
    return replace(state, slow=False, since=None, reason="", share=1.0), ("slow-over", reason)


def _learn(state: SpeedState, m: Measure) -> SpeedState:
    n = state.learned.get(m.load, 0)
    old = state.baseline.get(m.load, m.s_per_token)
    learned = old + (m.s_per_token - old) * (LEARN_RATE if n else 1.0)
    return replace(state, since=None, baseline={**state.baseline, m.load: learned}, learned={**state.learned, m.load: n + 1})


THROTTLE_C = 82.0  # several Spark makes throttle to 70-80 % of their speed here (docs/field.md)


def gpu_facts(readings: dict[str, Sequence[Any]]) -> str:
    """What each node's GPUs say beside a slow verdict (ranks.GpuReading: temperature, SM clock, power); '' without GPUs."""
    said = []
    for node, gpus in readings.items():
        temps = [g.temperature_c for g in gpus if g.temperature_c is not None]
        clocks = [g.sm_mhz for g in gpus if g.sm_mhz is not None]
        power = [g.power_w for g in gpus if g.power_w is not None]
        parts = ([f"{max(temps):g} °C" + (f" (at or past {THROTTLE_C:g} °C, where Sparks throttle)" if max(temps) >= THROTTLE_C else "")]
                 if temps else []) + ([f"SM clock {min(clocks):g} MHz"] if clocks else []) + ([f"{max(power):g} W"] if power else [])
        if parts:
            said.append(f"{node} GPU: " + ", ".join(parts))
    return "; ".join(said)
