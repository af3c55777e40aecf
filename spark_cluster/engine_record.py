"""What an engine start that `up` made is recorded as, once it is ready: where its time went, read
from its own log (engine_log), and the KV cache it got, against the most an engine of the same
flags got (kv.json). Best effort: a log that cannot be read says nothing."""

from __future__ import annotations

import datetime as _dt
from typing import Callable

from . import kept, timeouts
from .config import ClusterConfig
from .engine_log import FIGURE_PART, KvCapacity, engine_start, kv_less, log_command
from .errors import SparkClusterError
from .steps import Plan
from .transport import Nodes


def record_engine_start(cfg: ClusterConfig, nodes: Nodes, plan: Plan, started: _dt.datetime,
                        emit: Callable[..., None]) -> dict[str, float]:
    """The start's parts as `up`'s phases (engine/<part>, vLLM's own figures under the part that holds
    them); an `engine-start` event with the KV cache it got, a `kv-less` one when that is less than the
    most an engine of these flags got (else it is kept as the most)."""
    head = cfg.head.name
    since = (started - _dt.timedelta(seconds=1)).isoformat(timespec="seconds")
    try:
        r = nodes[head].run(log_command(plan.api_container, since), timeout=timeouts.QUICK_S)
    except SparkClusterError:
        return {}
    if not r.ok:
        return {}
    start = engine_start(r.stdout, started)
    phases = {f"engine/{part}": s for part, s in start.parts.items()}
    phases.update({f"engine/{FIGURE_PART[name]}/{name}": s for name, s in start.figures.items()})
    emit("engine-start", node=head, parts=start.parts, figures=start.figures, kv_tokens=start.kv_tokens,
         kv_device=start.kv_device, kv_gib=start.kv_gib)
    if start.kv_tokens is None:
        return phases
    flags, most = plan.flags_hash, kept.kv_capacity(cfg)
    less = kv_less(most, flags, start)
    if less:
        emit("kv-less", node=head, message=less, kv_tokens=start.kv_tokens, most=most.tokens if most else None)
    elif most is None or most.flags_hash != flags or start.kv_tokens > most.tokens:
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        kept.save_kv_capacity(cfg, KvCapacity(flags_hash=flags, device=start.kv_device or "?", tokens=start.kv_tokens,
                                              gib=start.kv_gib, at=now))
    return phases
