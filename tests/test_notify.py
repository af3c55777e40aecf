"""Notifications sent for real through Apprise to local JSON webhooks (tests/webhook.py): from the notifier alone,
from the controller as it serves, and by `spark-cluster notify-test`."""

from __future__ import annotations

import time
from contextlib import contextmanager

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from spark_cluster.cli import app
from spark_cluster.errors import ConfigError
from spark_cluster.metrics import sample_value
from spark_cluster.notify import Notifier, TargetURL, target_urls
from spark_cluster.serving_settings import NotifySettings

from .conftest import CONFIGS, run_cli
from .fake_engine import FakeEngine
from .gateway_rig import TOKEN, rig_cfg, serving_controller
from .webhook import Receiver

pytestmark = pytest.mark.monitoring  # Apprise to local webhooks: seconds of retries and subprocesses, out of `make check`

HANG = {"event": "decision", "action": "restart", "reason": "hang confirmed: no progress for 12s with 2 request(s) in flight "
        "or waiting, and ranks idle", "delay_s": 0, "detect_s": 12.5}


class Counts:
    def __init__(self):
        self.seen: dict[tuple[str, str], int] = {}

    def __call__(self, target: str, outcome: str) -> None:
        self.seen[target, outcome] = self.seen.get((target, outcome), 0) + 1


def settings(**kw) -> NotifySettings:
    return NotifySettings(**{"timeout_s": 2, "attempts": 1, **kw})


def test_a_target_that_hangs_or_refuses_delays_neither_another_target_nor_the_caller():
    counts = Counts()
    with Receiver("hang") as hangs, Receiver("refuse") as refuses, Receiver() as good:
        # an attempt may take 30 s (Apprise's own read timeout too: `rto`, 4 s unless the URL says):
        # the hanging target holds its first message the whole test
        targets = [TargetURL("1-json", f"{hangs.url}?rto=30", "info"), TargetURL("2-json", refuses.url, "info"),
                   TargetURL("3-json", good.url, "info")]
        notifier = Notifier(settings(queue=2, per_kind=5, timeout_s=30), targets, counts, [])
        try:
            for i in range(4):
                t0 = time.monotonic()
                notifier.saw({**HANG, "reason": f"{HANG['reason']} #{i}"}, "spark")
                assert time.monotonic() - t0 < 5  # a put: waiting for the hanging target would take 30 s
                assert len(good.wait_for(i + 1)) == i + 1  # the working target has it while the first still holds #0
            assert hangs.attempts == 1
            bodies = good.wait_for(4)
            assert [b["title"] for b in bodies] == ["spark-cluster spark: hang confirmed, restarting the group"] * 4
            assert bodies[0]["type"] == "failure" and bodies[0]["message"].startswith(HANG["reason"] + " #0.")
        finally:
            notifier.stop(timeout_s=0.1)  # the hanging target's thread ends when its receiver closes
    # the hanging target: one message in its thread, two waiting (notify.queue: 2), the fourth dropped
    assert counts.seen.get(("1-json", "dropped")) == 1 and ("1-json", "sent") not in counts.seen
    assert counts.seen[("3-json", "sent")] == 4 and refuses.attempts >= 1 and ("2-json", "sent") not in counts.seen


def test_a_failed_attempt_is_tried_again_after_two_seconds():
    counts = Counts()
    with Receiver("refuse") as refuses:
        notifier = Notifier(settings(attempts=2), [TargetURL("1-json", refuses.url, "info")], counts, [])
        try:
            notifier.saw(HANG, "spark")
            deadline = time.monotonic() + 10
            while ("1-json", "failed") not in counts.seen and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            notifier.stop()
    assert refuses.attempts == 2 and counts.seen == {("1-json", "failed"): 1}


def test_each_target_gets_what_is_at_least_its_severity():
    with Receiver() as everything, Receiver() as pager:
        notifier = Notifier(settings(), [TargetURL("1-json", everything.url, "info"), TargetURL("2-json", pager.url, "critical")],
                            Counts(), [])
        try:
            notifier.saw({"event": "restart-done", "seconds": 40.0, "restart": "kept", "phases": {}}, "spark")
            notifier.saw(HANG, "spark")
            everything.wait_for(2)
            pager.wait_for(1)
            time.sleep(0.3)
        finally:
            notifier.stop()
    assert [t.split(": ", 1)[1] for t in everything.titles()] == ["restart done in 40 s", "hang confirmed, restarting the group"]
    assert [t.split(": ", 1)[1] for t in pager.titles()] == ["hang confirmed, restarting the group"]


def test_a_target_that_cannot_be_used_stops_the_start_and_its_url_is_never_said(monkeypatch, tmp_path):
    monkeypatch.delenv("SPARK_NOTIFY", raising=False)
    with pytest.raises(ConfigError, match=r"notify.targets\[0\].url_env names SPARK_NOTIFY, which is not set"):
        target_urls(NotifySettings(targets=[{"url_env": "SPARK_NOTIFY"}]))
    monkeypatch.setenv("SPARK_NOTIFY", "nosuchservice://secret-key-42@host")
    with pytest.raises(ConfigError) as exc:
        target_urls(NotifySettings(targets=[{"url_env": "SPARK_NOTIFY"}]))
    assert "scheme 'nosuchservice' is not one Apprise knows" in str(exc.value) and "secret-key-42" not in str(exc.value)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        target_urls(NotifySettings(targets=[{"url_file": str(tmp_path / "empty")}]))
    (tmp_path / "url").write_text("json://127.0.0.1:9/x\nignored\n")
    assert target_urls(NotifySettings(targets=[{"url_file": str(tmp_path / "url")}], min_severity="warning")) == [
        TargetURL("1-json", "json://127.0.0.1:9/x", "warning")]
    with pytest.raises(ValueError, match="url_env or url_file"):
        NotifySettings(targets=[{"url_env": "A", "url_file": "b"}])


@contextmanager
def notifying_controller(tmp_path, monkeypatch, url: str, **notify):
    monkeypatch.setenv("SPARK_NOTIFY_URL", url)
    engine = FakeEngine().start()
    cfg = rig_cfg(tmp_path, engine.url)
    cfg = cfg.model_copy(update={"notify": NotifySettings(targets=[{"url_env": "SPARK_NOTIFY_URL"}], timeout_s=2, attempts=1, **notify)})
    ctl, served = serving_controller(cfg)
    served.start()
    try:
        yield ctl, served
    finally:
        served.stop()
        engine.stop()


def test_the_controller_tells_of_a_hang_at_once_and_the_targets_url_stays_secret(tmp_path, monkeypatch):
    with Receiver() as hook, notifying_controller(tmp_path, monkeypatch, hook.url) as (ctl, served):
        t0 = time.time()
        ctl.wd.emit(HANG["event"], **{k: v for k, v in HANG.items() if k != "event"})
        body, = hook.wait_for(1)
        took = hook.received[0][0] - t0
        ctl.wd.emit("alert", reason=f"something said {hook.url}")  # the URL in an event: masked wherever it goes
        hook.wait_for(2)
        time.sleep(0.1)
        metrics = httpx.get(f"{served.url}/metrics").text
        events = httpx.get(f"{served.url}/api/events", headers={"authorization": f"Bearer {TOKEN}"}).text
    assert took < 1.0, took
    assert body["title"] == "spark-cluster spark: hang confirmed, restarting the group" and "Detected 12.5 s" in body["message"]
    assert sample_value(metrics, "spark_cluster_notifications_total", target="1-json", outcome="sent") == 2
    assert sample_value(metrics, "spark_cluster_notifications_total", target="1-json", outcome="dropped") == 0
    port = hook.url.rsplit(":", 1)[1]
    assert port not in events and port not in hook.received[1][1]["message"] and "something said" in events


def test_ten_restarts_in_a_row_send_per_kind_messages_then_one_summary(tmp_path, monkeypatch):
    with Receiver() as hook, notifying_controller(tmp_path, monkeypatch, hook.url, per_kind=2, window_s=2) as (ctl, served):
        for i in range(10):
            ctl.wd.emit("decision", **{**HANG, "reason": f"{HANG['reason']} #{i}"})
            ctl.wd.emit("restart-done", seconds=3.0, restart="kept", phases={})
        hook.wait_for(6)
        time.sleep(0.3)
    hangs = [b for b in hook.wait_for(6) if "hang confirmed" in b["title"]]
    assert [b["message"].split(".")[0][-2:] for b in hangs[:2]] == ["#0", "#1"] and len(hook.received) == 6
    summary, = [b for b in hangs if "held back" in b["title"]]
    assert "8 more 'hang' notification(s)" in summary["message"] and "ranks idle #9." in summary["message"]
    assert sum("restart done" in t for t in hook.titles()) == 3  # two, and their summary


def test_notify_test_sends_one_message_to_every_target_and_says_which_did_not_take_it(tmp_path):
    data = yaml.safe_load((CONFIGS / "local-sim.yaml").read_text())
    data["notify"] = {"targets": [{"url_env": "HOOK_A"}, {"url_env": "HOOK_B", "min_severity": "critical"}], "timeout_s": 2, "attempts": 1}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    with Receiver() as a, Receiver() as b, Receiver("refuse") as refuses:
        ok = run_cli("notify-test", str(path), env={"HOOK_A": a.url, "HOOK_B": b.url})
        bad = run_cli("notify-test", str(path), env={"HOOK_A": a.url, "HOOK_B": refuses.url})
    assert ok.returncode == 0, ok.stderr
    assert "target 1-json: sent" in ok.stdout and "target 2-json: sent" in ok.stdout
    assert a.titles() == ["spark-cluster spark: test notification"] * 2 and b.titles() == ["spark-cluster spark: test notification"]
    assert bad.returncode == 21 and "target 2-json: not sent" in bad.stdout and "1 of 2 notification target(s)" in bad.stderr
    assert refuses.url.rsplit(":", 1)[1] not in bad.stdout + bad.stderr
    none = CliRunner().invoke(app, ["notify-test", str(CONFIGS / "local-sim.yaml")])
    assert none.exit_code == 2 and "notify.targets is empty" in none.stderr
