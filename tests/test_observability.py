"""`spark-cluster observability`: its files pass promtool, its dashboard reads only what the controller exports, and a
real Prometheus scraping a serving controller fires the hang alert through a real Alertmanager to a webhook."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from spark_cluster.cli import app
from spark_cluster.config import load_config
from spark_cluster.metrics import ControllerMetrics
from spark_cluster.observability import PANELS, files, panel_metrics

from .conftest import CONFIGS
from .gateway_rig import rig_running
from .monitoring import alertmanager, panel_queries, prometheus, query, wait_for
from .webhook import Receiver

pytestmark = pytest.mark.skipif(not shutil.which("promtool"), reason="Debian's prometheus package (`make sim-deps` installs it)")


def observability(*args: str):
    """The command in this process (its exit codes and messages as a user gets them: typer's runner)."""
    return CliRunner().invoke(app, ["observability", *args], env={"COLUMNS": "200"})


def promtool(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.mark.monitoring
def test_the_files_written_pass_promtool_and_what_a_user_changed_is_not_replaced(tmp_path):
    out = tmp_path / "obs"
    first = observability(str(CONFIGS / "local-sim-2groups.yaml"), "--out", str(out))
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in out.iterdir()) == ["alerts.test.yml", "alerts.yml", "dashboard.json", "prometheus.yml"]
    checked = promtool("check", "config", "prometheus.yml", cwd=out)
    assert checked.returncode == 0 and "SUCCESS: 1 rule files found" in checked.stdout, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts.test.yml", cwd=out)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    (out / "alerts.yml").write_text((out / "alerts.yml").read_text() + "# my own note\n")  # the user's own change
    again = observability(str(CONFIGS / "local-sim-2groups.yaml"), "--out", str(out))
    assert again.exit_code == 2 and "already has alerts.yml with other content: nothing was written" in again.stderr
    assert "# my own note" in (out / "alerts.yml").read_text()
    assert observability(str(CONFIGS / "local-sim-2groups.yaml"), "--out", str(out), "--force").exit_code == 0
    assert "# my own note" not in (out / "alerts.yml").read_text()
    # an alert the tests do not cover fails them: the rule tests are not vacuous
    (out / "alerts.yml").write_text((out / "alerts.yml").read_text().replace("spark_cluster_state{spark_cluster_state=\"failed\"} == 1",
                                                                              "spark_cluster_state{spark_cluster_state=\"failed\"} == 2"))
    assert promtool("test", "rules", "alerts.test.yml", cwd=out).returncode == 1


def exported_families(metrics: ControllerMetrics) -> set[str]:
    return {f.name for f in text_string_to_metric_families(metrics.exposition().decode())}


def test_every_panel_reads_only_metrics_the_controller_exports():
    sample = {"t": 1.0, "health": 200, "running": 1, "waiting": 0, "kv_cache_usage": 0.5, "generation_tokens_total": 1.0,
              "prompt_tokens_total": 1.0, "steps_total": 1.0}
    metrics = ControllerMetrics(["a", "b"], lambda: {"a": sample}, lambda: {"a": 1})
    metrics.notify_targets(["1-json"])
    metrics.on_event({"event": "decision", "action": "restart", "reason": "hang confirmed: x", "detect_s": 12.0}, "a")
    metrics.on_event({"event": "restart-done", "recover_s": 60.0, "phases": {"kill": 1.0}}, "a")
    exported = exported_families(metrics)
    assert panel_metrics() <= exported, panel_metrics() - exported
    dashboard = json.loads(files(load_config(CONFIGS / "local-sim.yaml"))["dashboard.json"])
    assert [p["title"] for p in dashboard["panels"]] == [p.title for p in PANELS]
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in dashboard["panels"])


@pytest.mark.monitoring
def test_a_real_prometheus_fires_the_hang_alert_through_alertmanager_and_every_panel_evaluates(tmp_path):
    with Receiver() as hook, rig_running(tmp_path) as rig:
        target = rig.api.split("://", 1)[1]
        with alertmanager(tmp_path / "am", f"http://{hook.url.split('://', 1)[1].rsplit('/', 1)[0]}/alerts") as am, \
                prometheus(tmp_path / "prom", files(rig.ctl.cfg, target, am, interval_s=1)) as prom:
            wait_for("the controller scraped", lambda: query(prom, 'spark_cluster_hangs_confirmed_total{cluster="spark"}'))
            rig.emit("decision", action="restart", reason="hang confirmed: no progress for 12s, and ranks idle", delay_s=0, detect_s=12.3)
            t0 = time.time()
            alerts = wait_for("the hang alert at the webhook", lambda: [a for _, body in hook.received for a in body.get("alerts", [])
                                                                         if a["labels"]["alertname"] == "SparkClusterHangConfirmed"])
            took = time.time() - t0
            errors = {}
            for title, expr in panel_queries("spark"):
                try:
                    query(prom, expr)
                except AssertionError as exc:
                    errors[title] = str(exc)
    print(f"the hang alert reached the webhook {took:.1f}s after the decision")
    assert alerts[0]["labels"] == {"alertname": "SparkClusterHangConfirmed", "severity": "critical", "cluster": "spark",
                                   "group": "spark", "job": "spark-cluster", "instance": target}
    assert alerts[0]["annotations"]["summary"] == "spark/spark: a hang was confirmed"
    assert not errors, errors


def test_a_folder_that_cannot_be_written_is_said_plainly(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    res = observability(str(CONFIGS / "local-sim.yaml"), "--out", str(tmp_path / "taken"))
    assert res.exit_code == 2 and "cannot write there" in res.stderr and "Traceback" not in res.output
