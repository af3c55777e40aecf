"""The slow-but-alive verdict (spark_cluster.speed): pure rules, table-tested; and the controller saying it."""

from __future__ import annotations

import time
from dataclasses import replace

import httpx
import pytest

from spark_cluster.metrics import sample_value
from spark_cluster.ranks import GpuReading
from spark_cluster.serving_settings import SlowSettings
from spark_cluster.speed import Measure, SpeedState, gpu_facts, judge, load_bucket, measure

S = SlowSettings(slower_by=0.2, for_s=60, window_s=60, learn_windows=3)


def samples(per_token_s: float, running: float = 1, seconds: int = 120, every: int = 5, tokens_per_s: float = 10, start: float = 0):
    """A group's watchdog samples: tokens coming at `tokens_per_s`, each `per_token_s` after the one before."""
    return [{"t": start + t, "running": running, "itl_count": t * tokens_per_s, "itl_sum": t * tokens_per_s * per_token_s}
            for t in range(0, seconds + 1, every)]


@pytest.mark.parametrize("running, bucket, label", [(0, 1, "1"), (1, 1, "1"), (1.4, 1, "1"), (1.5, 2, "2"), (3, 3, "3"), (4.2, 4, "4"),
                                                    (8, 8, "8"), (8.6, 16, "9-16"), (16, 16, "9-16"), (17, 32, "17-32"), (40, 64, "33-64")])
def test_load_buckets_are_each_count_to_8_then_powers_of_two(running, bucket, label):
    assert load_bucket(running) == bucket and Measure(0, 0.1, bucket).running == label


def test_the_measure_is_the_engines_time_between_tokens_over_the_window():
    m = measure(samples(0.063, running=4), 60)
    assert m == Measure(120, pytest.approx(0.063), 4) and m.running == "4"
    assert measure(samples(0.063)[:4], 60) == Measure(15, pytest.approx(0.063), 1)  # three periods of 50 tokens: enough
    assert measure(samples(0.063)[:3], 60) is None  # two periods: too few to say
    assert measure(samples(0.063, tokens_per_s=0.5)[-9:], 60) is None  # 20 tokens, but 2.5 a period: too few to say
    hiccup = samples(0.063)
    for x in hiccup[-2:]:  # one period 100 times slower (the sum is cumulative)
        x["itl_sum"] += 30
    assert measure(hiccup, 60).s_per_token == pytest.approx(0.063)  # the median: one period moves it not
    assert measure([{"t": 0, "running": 1}, {"t": 5, "running": 1}], 60) is None  # an engine without the figure
    restarted = samples(0.063)
    restarted[-1] = {**restarted[-1], "itl_count": 3, "itl_sum": 0.2}  # the counters went back: a new engine
    assert measure(restarted, 60) is None  # nothing of it yet
    restarted += [{"t": 125 + 5 * i, "running": 1, "itl_count": 3 + 50 * i, "itl_sum": 0.2 + 50 * i * 0.09} for i in range(1, 4)]
    assert measure(restarted, 60).s_per_token == pytest.approx(0.09)  # its own periods, at once: not the old engine's
    assert measure([], 60) is None


def learned(per_token_s: float, load: int = 1, n: int = 3) -> SpeedState:
    return SpeedState(baseline={load: per_token_s}, learned={load: n})


@pytest.mark.parametrize("state, m, peers, said, slow, since, share", [
    # learning: the first windows of a load teach it; nothing to compare with yet
    (SpeedState(), Measure(10, 0.06, 1), [], None, False, None, 1.0),
    (learned(0.06, n=2), Measure(10, 0.09, 1), [], None, False, None, 1.0),  # 2 of 3 windows learned: no verdict yet
    # above its own: it starts to hold, then after for_s it is said
    (learned(0.06), Measure(10, 0.09, 1), [], None, False, 10, 1.0),
    (replace(learned(0.06), since=10), Measure(69, 0.09, 1), [], None, False, 10, 1.0),
    (replace(learned(0.06), since=10), Measure(70, 0.09, 1), [], "slow", True, None, 0.667),
    # 19 % above: not slow, and it learns
    (learned(0.06), Measure(10, 0.0714, 1), [], None, False, None, 1.0),
    # at a higher load its own time at a lower one says nothing (a batch decodes slower a token); a peer at that load does
    (learned(0.06), Measure(10, 0.09, 4), [], None, False, None, 1.0),
    (SpeedState(), Measure(10, 0.09, 4), [Measure(10, 0.06, 4)], None, False, 10, 1.0),
    (SpeedState(since=10), Measure(70, 0.09, 4), [Measure(70, 0.06, 4), Measure(70, 0.03, 1)], "slow", True, None, 0.667),
    # other groups serving: they are the reference, not its own past (traffic of then): 50 % above its own, 6 % above a peer's
    (replace(learned(0.06), since=10), Measure(70, 0.09, 1), [Measure(70, 0.085, 1)], None, False, None, 1.0),
    # a faster peer at a lower load is no reference
    (SpeedState(since=10), Measure(70, 0.09, 4), [Measure(70, 0.03, 1)], None, False, None, 1.0),
    # ... but its own time or a peer's at a higher load is (slower than a bigger batch was): the fastest of them
    (replace(learned(0.06, load=6), since=10), Measure(70, 0.09, 3), [], "slow", True, None, 0.667),
    (replace(SpeedState(), since=10), Measure(70, 0.09, 3), [Measure(70, 0.07, 5), Measure(70, 0.06, 8)], "slow", True, None, 0.667),
    (SpeedState(baseline={5: 0.09, 6: 0.06}, learned={5: 3, 6: 3}), Measure(10, 0.08, 4), [], None, False, 10, 1.0),
    # slow: stays slow while 10 % or more above, its share following its speed
    (replace(learned(0.06), slow=True, share=0.667), Measure(80, 0.1, 1), [], None, True, None, 0.6),
    (replace(learned(0.06), slow=True, share=0.667), Measure(80, 0.065, 1), [], None, True, 80, 0.667),  # back within 10 %: holds
    (replace(learned(0.06), slow=True, share=0.667, since=80), Measure(140, 0.065, 1), [], "slow-over", False, None, 1.0),
    # slow, at a load it has no figure for: to come back, its nearest lower load's (so it is never kept slow for want of one)
    (replace(learned(0.06), slow=True, share=0.667), Measure(80, 0.02, 3), [], None, True, 80, 0.667),
    (replace(learned(0.06), slow=True, share=0.667, since=80), Measure(140, 0.09, 3), [], None, True, None, 0.667),
    (replace(learned(0.06), slow=True, share=0.667, since=80), Measure(140, 0.065, 3), [], "slow-over", False, None, 1.0),
    # slow, nothing learned at all: no verdict either way
    (replace(SpeedState(), slow=True, share=0.667), Measure(80, 0.02, 3), [], None, True, None, 0.667),
    # an idle group: nothing changes
    (replace(learned(0.06), slow=True, share=0.5, since=30), None, [], None, True, 30, 0.5),
])
def test_judge(state, m, peers, said, slow, since, share):
    new, event = judge(state, m, peers, S)
    assert (event[0] if event else None, new.slow, new.since, new.share) == (said, slow, since, share)


def test_a_slow_period_teaches_nothing_and_the_verdict_says_why_with_the_gpus():
    state, said = learned(0.063), None
    for t in range(0, 61, 5):
        state, event = judge(state, Measure(t, 0.094, 1), [], S, "spark-2 GPU: 84 °C (at or past 82 °C, where Sparks throttle)")
        said = said or event
    assert said == ("slow", "decode 94 ms a token over the last 60s, +49% against its own 63 ms at 1 running; "
                            "spark-2 GPU: 84 °C (at or past 82 °C, where Sparks throttle)")
    assert state.baseline == {1: 0.063} and state.learned == {1: 3}


def test_learning_follows_the_group_slowly_and_every_load_apart():
    state = SpeedState()
    for t, s in enumerate([0.06, 0.07, 0.05]):
        state, _ = judge(state, Measure(t, s, 1), [], S)
    state, _ = judge(state, Measure(9, 0.2, 8), [], S)
    assert state.baseline[1] == pytest.approx(0.06 + (0.07 - 0.06) * 0.1 + (0.05 - 0.061) * 0.1)
    assert state.baseline[8] == 0.2 and state.learned == {1: 3, 8: 1}


def test_nothing_is_learned_while_another_group_is_slow():
    """The gateway sends it more than its share then (on the simulated cluster, also more of the shared cores): a load
    learned only then would make its normal speed look slow once the other is back."""
    state, _ = judge(SpeedState(), Measure(0, 0.03, 3), [], S, peer_slow=True)
    assert state == SpeedState()
    state, _ = judge(learned(0.06, load=3), Measure(0, 0.03, 3), [], S, peer_slow=True)
    assert state == learned(0.06, load=3)
    state, event = judge(replace(learned(0.06, load=3), since=0), Measure(60, 0.09, 3), [], S, peer_slow=True)
    assert event[0] == "slow"  # its own verdict still said


@pytest.mark.parametrize("readings, said", [
    ({}, ""),
    ({"sim-1": []}, ""),  # no GPU (the simulated cluster)
    ({"spark-1": [GpuReading(power_w=45.2, sm_mhz=2405, temperature_c=61)]}, "spark-1 GPU: 61 °C, SM clock 2405 MHz, 45.2 W"),
    ({"spark-1": [GpuReading(power_w=31, sm_mhz=900, temperature_c=82)], "spark-2": [GpuReading(temperature_c=None)]},
     "spark-1 GPU: 82 °C (at or past 82 °C, where Sparks throttle), SM clock 900 MHz, 31 W"),
])
def test_what_the_gpus_say_beside_a_verdict(readings, said):
    assert gpu_facts(readings) == said


def test_the_controller_says_a_slow_group_in_an_event_its_metrics_the_page_and_the_gateways_share(tmp_path, monkeypatch):
    from spark_cluster import timeouts

    from .gateway_rig import rig_cfg, serving_controller
    from .fake_engine import FakeEngine

    monkeypatch.setattr(timeouts, "SPEED_LOOK_S", 0.05)
    engine = FakeEngine().start()
    cfg = rig_cfg(tmp_path, engine.url).model_copy(update={"slow": SlowSettings(for_s=0, window_s=60, learn_windows=2)})
    ctl, served = serving_controller(cfg)
    served.start()
    try:
        wd = ctl.wd
        now = time.time()
        wd.samples.clear()
        wd.samples.extend(samples(0.06, start=now - 300, seconds=120))  # learns its speed at one request running
        time.sleep(0.3)
        assert sample_value(httpx.get(f"{served.url}/metrics").text, "spark_cluster_group_slow", group="spark") == 0
        wd.samples.clear()
        wd.samples.extend(samples(0.09, start=now - 100, seconds=60))
        deadline = time.monotonic() + 5
        while not [e for e in ctl.events if e["event"] == "slow"] and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = httpx.get(f"{served.url}/metrics").text
        status = httpx.get(f"{served.url}/healthz").json()
        events = (cfg.resolved_state_dir() / "events.jsonl").read_text()
        weights = dict(ctl.gateway.weights)
    finally:
        served.stop()
        engine.stop()
    slow, = [e for e in ctl.events if e["event"] == "slow"]
    assert slow["group"] == "spark" and slow["reason"].startswith("decode 90 ms a token over the last 60s, +50% against its own 60 ms")
    assert sample_value(metrics, "spark_cluster_group_slow", group="spark") == 1
    assert sample_value(metrics, "spark_cluster_group_decode_seconds_per_token", group="spark") == pytest.approx(0.09)
    assert sample_value(metrics, "spark_cluster_group_decode_baseline_seconds_per_token", group="spark") == pytest.approx(0.06)
    assert sample_value(metrics, "spark_cluster_group_share", group="spark") == pytest.approx(0.667)
    assert status["slow"] == "slow: " + slow["reason"] and weights == {"spark": 0.667}
    assert '"event": "slow"' in events


@pytest.mark.parametrize("lines, said", [
    ([], ""),
    ([b'{"event": "state"}', b'not json', b'{"ts": "T1", "event": "slow", "reason": "decode 94 ms"}', b'{"event": "canary"}'],
     "since T1: decode 94 ms"),
    ([b'{"ts": "T1", "event": "slow", "reason": "x"}', b'{"ts": "T2", "event": "slow-over", "reason": "y"}'], ""),
    ([b'{"ts": "T1", "event": "slow-over"}', b'{"ts": "T3", "event": "slow", "reason": "z"}', b'["slow"]'], "since T3: z"),
])
def test_status_says_the_slow_verdict_the_controller_last_wrote(lines, said):
    from spark_cluster.status import slow_line

    assert slow_line(lines) == said


def test_status_finds_the_last_slow_verdict_however_far_back_and_in_the_rotated_half(tmp_path):
    from spark_cluster.state_dir import append_private
    from spark_cluster.status import event_lines, slow_line

    state = tmp_path / "state"
    events = state / "events.jsonl"
    append_private(events, '{"ts": "T0", "event": "slow", "reason": "long ago"}\n')
    for _ in range(3000):  # hours of canaries since: the verdict holds
        append_private(events, '{"event": "canary", "ok": true, "seconds": 0.4}\n')
    assert slow_line(event_lines(events)) == "since T0: long ago"
    events.rename(state / "events.jsonl.1")  # rotated away: its older half is read too
    append_private(events, '{"event": "canary", "ok": true}\n')
    assert slow_line(event_lines(events)) == "since T0: long ago"
    append_private(events, '{"ts": "T1", "event": "slow-over", "reason": "back"}\n')
    assert slow_line(event_lines(events)) == ""
    assert event_lines(tmp_path / "none" / "events.jsonl") == []
