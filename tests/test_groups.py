"""Several groups of one model: the overall verdict (a pure rule) and commands that run on every
group at once."""

from __future__ import annotations

import threading

import pytest

from spark_cluster.config import load_config
from spark_cluster.errors import PreflightError
from spark_cluster.groups import for_each_group, labelled, overall_verdict

from .conftest import CONFIGS

TWO_GROUPS = load_config(CONFIGS / "local-sim-2groups.yaml")


@pytest.mark.parametrize("verdicts, expected", [
    ({"a": "serving", "b": "serving"}, "serving"),
    ({"a": "serving", "b": "busy"}, "busy"),
    ({"a": "serving", "b": "stalled"}, "degraded"),
    ({"a": "busy", "b": "starting"}, "degraded"),
    ({"a": "down", "b": "stalled"}, "stalled"),
    ({"a": "down", "b": "starting"}, "down"),
    ({"a": "starting", "b": "starting"}, "starting"),
    ({"a": "degraded", "b": "starting"}, "degraded"),
    ({"a": "down"}, "down"),
])
def test_overall_verdict(verdicts, expected):
    word, reason = overall_verdict(verdicts)
    assert word == expected and all(f"{g} {v}" in reason for g, v in verdicts.items())


def test_every_group_runs_at_once_and_a_failure_names_its_group_after_the_others_finished():
    both_in = threading.Barrier(2, timeout=5)  # each waits for the other: they run at the same time
    done = []

    def work(label, group):
        both_in.wait()
        if label == "a":
            raise PreflightError(["sim-1: docker does not answer"])
        done.append((label, group.name))
        return label

    with pytest.raises(PreflightError, match="^group a: preflight failed, nothing was changed:\n  - sim-1: docker does not answer"):
        for_each_group(TWO_GROUPS, work)
    assert done == [("b", "spark-b")]
    assert for_each_group(TWO_GROUPS, lambda label, group: group.head.name) == {"a": "sim-1", "b": "sim-3"}


def test_a_cluster_without_groups_runs_in_the_callers_thread_and_its_events_are_unlabelled():
    cfg = load_config(CONFIGS / "local-sim.yaml")
    assert for_each_group(cfg, lambda label, group: (label, threading.current_thread() is threading.main_thread())) == \
        {"spark": ("spark", True)}
    seen = []
    labelled(seen.append, "spark", False)({"event": "step-ok"})
    labelled(seen.append, "a", True)({"event": "step-ok"})
    assert seen == [{"event": "step-ok"}, {"event": "step-ok", "group": "a"}]
