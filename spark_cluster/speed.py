"""Is a group that still serves slower than it should? Pure rules, table-tested (tests/test_speed.py).

A Spark can go on serving at a fraction of its speed: decode flips from 63 to 94 ms a token on a firmware
power limit nvidia-smi does not show, some makes throttle at 82 °C to 70-80 %, a power-delivery defect
caps a GX10 at ~30 W (docs/field.md). Nothing fails, so no watchdog rule sees it; every client routed to
that group waits longer.

The measure: the engine's own time between two tokens of a request (vllm:inter_token_latency_seconds,
each token observed), the median of the watchdog's periods over the last `window_s`, at the load the group had (requests
running: each count to 8 apart, then buckets of powers of two; a batch of 4 decodes slower per token than one request, on a
CPU markedly). A group is `slow` when that is `slower_by` above the fastest other group's at that load, or, serving alone,
above what it learned for that load, for `for_s`; back when it is within half of that for `for_s`.

The other groups come first: they serve the same model under the same traffic now, while what a group learned was under
the traffic of then (longer prompts through the day slow every group at once, and no group is then slow). On the
simulated cluster, where the groups share two cores, a group's own time moved 1.7-fold in minutes with nothing slowed.
A group learns only from windows that were not above and while no other group is slow (the gateway sends it more then).

A time at a higher load counts too: a batch decodes no faster per token than a smaller one, so being slower than a bigger
batch was is being slow (a group that slowed holds its requests longer, so runs more at once, at a load it may never
have had). To come back, a group with no figure at its load is compared with the nearest lower load's (stricter: it is
never kept slow for want of a reference).
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
    load: int  # its bucket: the requests running, 1 to 8, then the power of two at or above it (16 for 9-16 ...)

    @property
    def running(self) -> str:
        return running_label(self.load)


EXACT_LOADS = 8  # requests running, each count its own bucket up to here


def load_bucket(running: float) -> int:
    n = max(1, int(running + 0.5))
    return n if n <= EXACT_LOADS else 2 ** math.ceil(math.log2(n))


def running_label(load: int) -> str:
    return str(load) if load <= EXACT_LOADS else f"{load // 2 + 1}-{load}"


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
          facts: str = "", *, peer_slow: bool = False) -> tuple[SpeedState, Optional[tuple[str, str]]]:
    """One look at a group: its new state and the event to say, (`slow` or `slow-over`, reason), if any.
    `peers`: the other serving groups' measures now; `facts`: what its nodes' GPUs say (shown with a verdict);
    `peer_slow`: another group is slow now, so the gateway sends this one more than its share: it learns nothing
    (a load it runs only then, learned then, would make its normal speed look slow once the other is back)."""
    if m is None:
        return state, None
    fastest: dict[int, float] = {}
    for p in peers:
        fastest[p.load] = min(p.s_per_token, fastest.get(p.load, math.inf))
    if fastest:  # other groups serve now: the reference (the module's doc says why)
        peer = _reference(fastest, m.load, lower_too=state.slow)
        ref = (m.s_per_token / peer[1], f"the fastest other group's {_ms(peer[1])} at {running_label(peer[0])} running") if peer else None
    else:
        learned = {load: v for load, v in state.baseline.items() if state.learned.get(load, 0) >= s.learn_windows}
        own = _reference(learned, m.load, lower_too=state.slow)
        ref = (m.s_per_token / own[1], f"its own {_ms(own[1])} at {running_label(own[0])} running") if own else None
    if ref is None:  # nothing to compare with yet: learn (a slow group waits for a measure it can be judged by)
        return (state, None) if state.slow or peer_slow else (_learn(state, m), None)
    ratio, against = ref
    if not state.slow:
        if ratio < 1 + s.slower_by:
            return (replace(state, since=None) if peer_slow else _learn(state, m)), None
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


def _reference(times: dict[int, float], load: int, lower_too: bool) -> Optional[tuple[int, float]]:
    """(load, seconds a token) to compare a measure at `load` with: the figure at that load, else the fastest at a higher
    one, else (`lower_too`) the nearest lower one's."""
    if load in times:
        return load, times[load]
    higher = [(v, x) for x, v in times.items() if x > load]
    if higher:
        v, x = min(higher)
        return x, v
    lower = [x for x in times if x < load]
    return (max(lower), times[max(lower)]) if lower_too and lower else None


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
