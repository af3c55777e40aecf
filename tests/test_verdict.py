"""The status verdict: one pure function, table-driven over observations.

Recorded observations from the simulated cluster live in tests/data/observations/ (written by
tests/test_up.py with RECORD_OBSERVATIONS=1); the constructed rows cover what the cluster
cannot easily be made to show.
"""

from __future__ import annotations

import json

import pytest

from spark_cluster.serving_settings import WatchdogSettings
from spark_cluster.decide import State, decide
from spark_cluster.judge import sample_of, verdict
from spark_cluster.observation import ContainerObs, Observation, ProcessObs, RayObs, VLLMObs

from .conftest import ROOT
from .samples import EXPECTED, obs


def ranks(activity: str, gpu_power_w: float | None = None) -> dict:
    return {"activity": activity, "activity_evidence": f"{activity} evidence", "gpu_power_w": gpu_power_w}


def container(state, **kw):
    name = kw.pop("name", "spark-vllm-worker")
    return [ContainerObs(name=name, component="vllm-worker", state=state, spec_current=kw.pop("spec_current", True))]


CASES = [
    ("idle and healthy", obs(), "serving", ""),
    ("busy, slow but moving", obs(vllm={"running": 8, "waiting": 20, "steps_in_window": 1, "generation_tok_s": 0.5, "progressed": True}), "serving", ""),
    ("tokens moving, step counter missing (older vLLM)", obs(vllm={"running": 2, "steps_in_window": None, "generation_tok_s": 3.0, "progressed": True}), "serving", ""),
    ("work in flight, no step", obs(vllm={"running": 4, "steps_in_window": 0, "generation_tok_s": 0.0}), "stalled", "4 request(s)"),
    ("only waiting, no step", obs(vllm={"running": 0, "waiting": 3, "steps_in_window": 0}), "stalled", "no engine step"),
    ("prompt tokens moving (a long prefill), no step yet", obs(vllm={"running": 1, "progressed": True}), "serving", ""),
    ("/metrics unreadable", obs(vllm={"running": None, "waiting": None, "steps_total": None, "generation_tokens_total": None,
                                      "progressed": None, "error": "/metrics: ReadTimeout"}), "serving", ""),
    ("vLLM process exited in the Ray head", obs(nodes={0: {"processes": [ProcessObs(name="vllm", container="spark-ray-head", component="vllm",
                                                                                    state="gone", detail="pid 309 gone")]}}), "down", "has exited"),
    ("vLLM process not started yet", obs(nodes={0: {"processes": [ProcessObs(name="vllm", container="spark-ray-head", component="vllm",
                                                                             state="not-started", detail="no pid file")]}}), "starting", "not started"),
    ("paused worker, idle", obs(nodes={1: {"containers": container("paused")}}), "stalled", "spark-vllm-worker on sim-2 is paused"),
    ("worker container exited", obs(nodes={1: {"containers": container("exited")}}), "down", "spark-vllm-worker on sim-2 is exited"),
    ("worker container missing", obs(nodes={1: {"containers": container("missing")}}), "down", "sim-2 is missing"),
    ("worker unreachable", obs(nodes={1: {"reachable": False, "error": "timeout", "containers": []}}), "down", "unreachable: sim-2"),
    ("API not answering yet", obs(vllm={"health": None, "error": "ConnectError", "models": []}), "starting", "does not answer"),
    ("API 503", obs(vllm={"health": 503, "models": []}), "starting", "503"),
    ("API 500", obs(vllm={"health": 500, "models": []}), "down", "500"),
    ("model not listed yet", obs(vllm={"models": []}), "starting", "does not list tiny-qwen3"),
    ("ray lost a node", obs(ray=RayObs(checked=True, alive=["10.99.0.11"], dead=["10.99.0.12"])), "down", "Ray does not see node(s) sim-2"),
    ("ray all alive", obs(ray=RayObs(checked=True, alive=["10.99.0.11", "10.99.0.12"])), "serving", ""),
    ("sysctl drifted", obs(nodes={0: {"sysctl": {"vm.swappiness": {"expected": "1", "actual": "60"}}}}), "degraded", "vm.swappiness=60"),
    ("container from an older config", obs(nodes={1: {"containers": container("running", spec_current=False)}}), "degraded", "another config"),
    ("memory nearly exhausted", obs(nodes={0: {"mem_available_gib": 2}}), "degraded", "only 2.0 GiB"),
    ("watchdog gave up", obs(watchdog={"state": "failed", "reason": "breaker"}), "degraded", "watchdog failed"),
    # what the ranks do while nothing progresses (spark_cluster.ranks)
    ("a long step: every rank working", obs(vllm={"running": 4}, nodes={0: ranks("working"), 1: ranks("working")}), "busy",
     "the current step has run 30s, every rank working"),
    ("a compile on one rank, its peer waiting", obs(vllm={"running": 4}, nodes={0: ranks("waiting", 30.0), 1: ranks("compiling", 30.0)}),
     "busy", "compiling"),
    ("a rank stopped", obs(vllm={"running": 4}, nodes={0: ranks("working"), 1: ranks("stopped")}), "stalled", "rank stopped: sim-2"),
    ("GPU ranks at near-idle power", obs(vllm={"running": 4}, nodes={0: ranks("waiting", 20.0), 1: ranks("waiting", 21.0)}), "stalled",
     "near-idle power"),
    ("a rank not read", obs(vllm={"running": 4}, nodes={0: ranks("working"), 1: ranks("unknown")}), "stalled", "4 request(s)"),
    ("idle ranks of an idle engine", obs(nodes={0: ranks("waiting"), 1: ranks("waiting")}), "serving", ""),
]


@pytest.mark.parametrize("name,observation,want,reason_part", CASES, ids=[c[0] for c in CASES])
def test_verdict_table(name, observation, want, reason_part):
    got, reason = verdict(observation, served_model="tiny-qwen3", expected_nodes=EXPECTED)
    assert got == want, reason
    assert reason_part in reason


RECORDED = sorted((ROOT / "tests" / "data" / "observations").glob("*.json"))


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
def test_verdict_on_recorded_observations(path):
    """Each recording's name starts with what the cluster was made to show (serving-idle,
    down-worker-stopped, stalled-paused-worker): the verdict must say that."""
    data = json.loads(path.read_text())
    got, reason = verdict(Observation.model_validate(data["observation"]), served_model="tiny-qwen3", expected_nodes=EXPECTED)
    assert got == path.stem.split("-")[0], reason


ALL = [(c[0], c[1]) for c in CASES] + [(p.stem, Observation.model_validate(json.loads(p.read_text())["observation"])) for p in RECORDED]


@pytest.mark.parametrize("name,observation", ALL, ids=[a[0] for a in ALL])
def test_status_and_the_watchdog_agree(name, observation):
    """The same observation through `status` and through the watchdog's decision: a member gone
    for one is gone for the other, and an engine without progress under load is stalled for
    status exactly when the watchdog suspects it."""
    word, reason = verdict(observation, served_model="tiny-qwen3", expected_nodes=EXPECTED)
    sample = sample_of(observation.nodes, observation.ray, observation.vllm, EXPECTED, t=100.0)
    lost = bool(sample.gone or sample.unreachable)
    member_down = word == "down" and not reason.startswith("/health")
    assert lost == member_down, (word, reason, sample)
    if lost:
        return
    # the watchdog, serving before this sample with the counters at their previous reading
    v = observation.vllm
    before = dict(steps_total=v.steps_total, generation_tokens_total=v.generation_tokens_total,
                  prompt_tokens_total=v.prompt_tokens_total)
    if v.progressed:
        before["generation_tokens_total"] = (v.generation_tokens_total or 0) - 1
    prev = tuple(before[k] for k in ("steps_total", "generation_tokens_total", "prompt_tokens_total"))
    state = State(phase="healthy", since=0, ready_at=0, healthy_since=0, last_counters=prev, last_progress=99.0)
    new, action = decide(state, sample, 100.0, WatchdogSettings(grace_after_start_s=0))
    # (an idle engine with a paused container is stalled for status, which sees the pause; the
    # watchdog finds such a wedge with its idle canary, progress says nothing without work)
    stalled_for_status = word == "stalled" and sample.pending > 0
    # a stall the ranks show as a wedge is suspect too until the stall window has passed, then confirmed without a canary
    suspect_for_watchdog = (new.phase == "suspect" and "in flight" in new.suspect_reason) or (
        action is not None and action.kind == "restart" and "hang confirmed" in action.reason)
    assert stalled_for_status == suspect_for_watchdog, (word, reason, new)
    assert (word == "busy") == (new.phase == "busy"), (word, reason, new)


@pytest.mark.parametrize("moved, last_counters, last_progress, age", [
    (True, None, None, 0.0),  # it moved in the window
    (False, None, None, 1.0),  # no watchdog: at least the window
    (False, (5.0, 6.0, 7.0), 970.0, 30.0),  # the watchdog saw these counters last move 30 s ago
    (False, (4.0, 6.0, 7.0), 970.0, 1.0),  # it saw other values: they moved since, as far as status knows
])
def test_progress_age_from_the_window_and_the_watchdogs_last_progress(moved, last_counters, last_progress, age):
    from spark_cluster.decide import State
    from spark_cluster.observe import progress_age
    from spark_cluster.watch_state import WatchdogFile

    v = VLLMObs(endpoint="http://e", steps_total=5, generation_tokens_total=6, prompt_tokens_total=7, window_s=1.0,
                steps_in_window=1 if moved else 0, generation_tok_s=0.0)
    saved = WatchdogFile(decision=State(last_counters=last_counters, last_progress=last_progress)) if last_counters else None
    assert progress_age(v, saved, 1000.0) == age
