"""The plan's cache steps run on the nodes (cache_seal says what they do and what they answer):
before an engine starts, each node's cache folder checked and what changed since its seal set aside
(a `cache-set-aside` event saying what and where); once the engine is ready, sealed. Both best
effort: a cache that cannot be checked or sealed is a warning, never a failed start (the engine
compiles what it does not find); what each node answered is kept in state_dir/caches.json."""

from __future__ import annotations

import time
from typing import Callable

from . import kept
from .cache_seal import CacheAnswer, parse_cache_answer, set_aside_message
from .config import ClusterConfig
from .errors import SparkClusterError
from .render import read_template
from .steps import Step
from .transport import Nodes, SSHTransport


def run_cache_steps(cfg: ClusterConfig, nodes: Nodes, steps: list[Step], emit: Callable[..., None]) -> dict[str, CacheAnswer]:
    """Each step on its node at once (a check or a seal); the answers by node, kept for `status`."""
    by_node = {s.node: s for s in steps}

    def one(t: SSHTransport) -> CacheAnswer | None:
        step = by_node[t.node]
        emit("step-start", step)
        t0 = time.monotonic()
        try:
            r = t.run(step.command, timeout=step.timeout_s, input=read_template(step.stdin).encode())
            answer = parse_cache_answer(r.stdout) if r.ok else None
            problem = None if answer else (r.tail(3).strip() or f"exit {r.exit_code}")
        except SparkClusterError as exc:
            answer, problem = None, exc.message
        took = round(time.monotonic() - t0, 3)
        if answer is None:
            emit("step-failed", step, duration_s=took, error=problem)
            emit("warning", node=t.node, message=f"{step.id}: the cache folder could not be {'sealed' if step.phase == 'seal' else 'checked'} "
                                                 f"({problem}); the engine starts with what it holds")
            return None
        emit("step-ok", step, duration_s=took, cache=answer.state, files=answer.files, bytes=answer.bytes)
        moved = set_aside_message(t.node, answer, cfg.cache.path, cfg.name)
        if moved:
            emit("cache-set-aside", node=t.node, message=moved, files=answer.suspect, bytes=answer.suspect_bytes, to=answer.moved_to)
        return answer

    got = {node: a for node, a in nodes.map(one, list(by_node)).succeeded.items() if isinstance(a, CacheAnswer)}
    if got:
        kept.save_caches(cfg, got)
    return got
