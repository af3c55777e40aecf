"""Several groups of one model (cluster.yaml `groups`): each group is a cluster of its own
(ClusterConfig.group_configs: its nodes, its head, its containers, its state folder), and what a
command does to the cluster it does to every group at once, each in its own order.

The overall verdict of several groups is a pure rule (`overall_verdict`), table-tested.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, TypeVar

from .config import ClusterConfig
from .errors import SparkClusterError
from .judge import Verdict

T = TypeVar("T")
Report = Callable[[dict[str, Any]], None]

SERVES = ("serving", "busy")  # busy is not hung: a busy group serves, slowly
# when no group serves, the verdict that asks the most of a person first
NOT_SERVING_ORDER: tuple[Verdict, ...] = ("stalled", "down", "degraded", "starting")


def overall_verdict(verdicts: dict[str, Verdict]) -> tuple[Verdict, str]:
    """The cluster's verdict from its groups': serving when all serve, degraded while at least one
    serves, else the most pressing of theirs. Pure."""
    said = ", ".join(f"{g} {v}" for g, v in verdicts.items())
    serving = [g for g, v in verdicts.items() if v in SERVES]
    if len(serving) == len(verdicts):
        word: Verdict = "serving" if all(v == "serving" for v in verdicts.values()) else "busy"
        return word, f"every group serves ({said})"
    if serving:
        return "degraded", f"{len(serving)} of {len(verdicts)} groups serve ({said})"
    return next(v for v in NOT_SERVING_ORDER if v in verdicts.values()), f"no group serves ({said})"


def labelled(report: Optional[Report], label: str, several: bool) -> Optional[Report]:
    """A group's events, each with its group's label when there are several."""
    if report is None or not several:
        return report
    return lambda e: report({**e, "group": label})


def for_each_group(cfg: ClusterConfig, work: Callable[[str, ClusterConfig], T]) -> dict[str, T]:
    """work(label, group's config) for every group at once (one thread each), their results by
    label. When a group fails, the others still finish; then the first failure is raised, naming
    its group (and the others that failed)."""
    groups = cfg.group_configs()
    if len(groups) == 1:
        label, only = groups[0]
        return {label: work(label, only)}
    results: dict[str, T] = {}
    failed: dict[str, BaseException] = {}

    def run(label: str, group: ClusterConfig) -> None:
        try:
            results[label] = work(label, group)
        except BaseException as exc:  # noqa: BLE001 (raised below, in the caller's thread)
            failed[label] = exc

    threads = [threading.Thread(target=run, args=g, name=f"group-{g[0]}", daemon=True) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        label, exc = next((g, failed[g]) for g, _ in groups if g in failed)
        if isinstance(exc, SparkClusterError):
            others = [g for g in failed if g != label]
            exc.message = f"group {label}: {exc.message}" + (f" (group {', '.join(others)} failed too)" if others else "")
        raise exc
    return {label: results[label] for label, _ in groups}
