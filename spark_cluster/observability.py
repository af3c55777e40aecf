"""`spark-cluster observability`: what Prometheus, Alertmanager and Grafana need to watch the controller.

Writes a scrape config for the controller(s) of a cluster.yaml (prometheus.yml), the alert rules with their
unit tests (templates/observability: alerts.yml, alerts.test.yml, run by `promtool test rules`) and a Grafana
dashboard (dashboard.json) whose every panel reads only metrics the controller exports (spark_cluster.metrics;
tests/test_observability.py evaluates each against a real Prometheus). Pure but for `write`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import ClusterConfig
from .errors import ConfigError
from .render import templates_dir

RATE = "$__rate_interval"  # Grafana's rate window (at least four scrapes)
SEL = '{cluster=~"$cluster"}'


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str  # Grafana's unit id
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)
    kind: str = "timeseries"
    description: str = ""


TOP_PHASES = '{cluster=~"$cluster", phase!~"engine/.*"}'  # the restart's own parts (the engine's are inside ready)


PANELS: tuple[Panel, ...] = (
    Panel("Watchdog state", "none", ((f"spark_cluster_state{SEL} == 1", "{{group}}: {{spark_cluster_state}}"),), "state-timeline",
          "Each group's watchdog: healthy, busy (a long step), suspect, backoff, restarting, starting, failed (breaker open), paused."),
    Panel("Engine up", "none", ((f"spark_cluster_engine_up{SEL}", "{{group}}"),), "stat", "1 when vLLM's /health answered 200."),
    Panel("Slow verdict", "none", ((f"spark_cluster_group_slow{SEL}", "{{group}}"),), "stat",
          "1 while a group serves slower than its own baseline or its peers (docs/observability.md)."),
    Panel("Hangs and restarts (1 h)", "none", ((f"sum by (group) (increase(spark_cluster_hangs_confirmed_total{SEL}[1h]))", "{{group}} hangs"),
                                               (f"sum by (group, reason) (increase(spark_cluster_restarts_total{SEL}[1h]))",
                                                "{{group}} restarts: {{reason}}")), "stat"),
    Panel("Decode time per token", "s", ((f"spark_cluster_group_decode_seconds_per_token{SEL}", "{{group}}"),
                                         (f"spark_cluster_group_decode_baseline_seconds_per_token{SEL}", "{{group}} baseline")),
          description="The engine's inter-token latency over the last minute, beside what the group learned it to be at similar load."),
    Panel("Generated tokens /s", "short", ((f"sum by (group) (rate(spark_cluster_engine_generation_tokens_total{SEL}[{RATE}]))", "{{group}}"),)),
    Panel("Requests in the engine", "short", ((f"spark_cluster_engine_requests_running{SEL}", "{{group}} running"),
                                              (f"spark_cluster_engine_requests_waiting{SEL}", "{{group}} waiting"))),
    Panel("KV cache used", "percentunit", ((f"spark_cluster_engine_kv_cache_usage{SEL}", "{{group}}"),)),
    Panel("Gateway requests /s by outcome", "reqps",
          ((f"sum by (outcome) (rate(spark_cluster_gateway_requests_total{SEL}[{RATE}]))", "{{outcome}}"),)),
    Panel("Time to first byte", "s", tuple(
        (f"histogram_quantile({q}, sum by (le) (rate(spark_cluster_gateway_time_to_first_byte_seconds_bucket{SEL}[{RATE}])))", f"p{int(q * 100)}")
        for q in (0.5, 0.95))),
    Panel("Held and in flight", "short", ((f"spark_cluster_gateway_held_requests{SEL}", "held"),
                                          (f"spark_cluster_gateway_group_requests_in_flight{SEL}", "{{group}} in flight"))),
    Panel("Requests routed /s", "reqps", ((f"sum by (group, how) (rate(spark_cluster_gateway_routed_total{SEL}[{RATE}]))", "{{group}} {{how}}"),),
          description="With several groups: by prefix affinity, past a group's load bound (overflow), or to the least loaded."),
    Panel("Streams continued (1 h)", "none", (
        (f"sum by (group, how) (increase(spark_cluster_gateway_streams_continued_total{SEL}[1h]))", "{{group}} {{how}}"),
        (f"sum by (reason) (increase(spark_cluster_gateway_streams_not_continued_total{SEL}[1h]))", "not continued: {{reason}}"))),
    Panel("Pause at a continued stream's seam (p95)", "s", (
        (f"histogram_quantile(0.95, sum by (le) (rate(spark_cluster_gateway_continuation_pause_seconds_bucket{SEL}[1h])))", "p95"),)),
    Panel("Last restart", "s", ((f"spark_cluster_last_detect_seconds{SEL}", "{{group}} detect"),
                                (f"spark_cluster_last_recovery_seconds{SEL}", "{{group}} recovery"),
                                (f"spark_cluster_restart_phase_seconds{TOP_PHASES}", "{{group}} {{phase}}")), "bargauge",
          "From the last healthy observation to the decision (detect), from the decision to serving again (recovery), and its parts."),
    Panel("Clients cut by the gateway (1 h)", "none",
          ((f"sum by (why) (increase(spark_cluster_gateway_clients_cut_total{SEL}[1h]))", "{{why}}"),)),
    Panel("Notifications (1 h)", "none", ((f"sum by (target, outcome) (increase(spark_cluster_notifications_total{SEL}[1h]))",
                                           "{{target}} {{outcome}}"),)),
)

METRIC_RE = re.compile(r"\bspark_cluster_[a-z_]+")


def panel_metrics() -> set[str]:
    """Every metric a panel reads (histogram series by their family's name)."""
    names = {m for p in PANELS for expr, _ in p.targets for m in METRIC_RE.findall(expr)}
    return {re.sub(r"_(bucket|total)$", "", n) for n in names}


def dashboard(title: str) -> dict[str, Any]:
    """A Grafana dashboard (schema 39): a Prometheus data source and a cluster picked by variables."""
    panels = []
    for i, p in enumerate(PANELS):
        width = 12 if p.kind in ("timeseries", "state-timeline", "bargauge") else 6
        panels.append({
            "id": i + 1, "type": p.kind, "title": p.title, "description": p.description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": width},  # placed by _lay_out
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}} for j, (expr, legend) in enumerate(p.targets)],
        })
    _lay_out(panels)
    return {
        "title": title, "uid": "spark-cluster", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s", "tags": ["spark-cluster", "vllm"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "cluster", "type": "query", "label": "Cluster", "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(spark_cluster_state, cluster)", "refId": "cluster"}, "includeAll": True, "multi": True,
             "current": {"text": "All", "value": "$__all"}, "refresh": 2},
        ]},
        "panels": panels,
    }


def _lay_out(panels: list[dict[str, Any]]) -> None:
    """Left to right, then the next row, on Grafana's 24-column grid."""
    x = y = row_h = 0
    for p in panels:
        pos = p["gridPos"]
        if x + pos["w"] > 24:
            x, y, row_h = 0, y + row_h, 0
        pos["x"], pos["y"] = x, y
        x, row_h = x + pos["w"], max(row_h, pos["h"])


def scrape_target(cfg: ClusterConfig) -> str:
    """host:port of the controller's /metrics as this machine reaches it."""
    return cfg.controller_url().split("://", 1)[1]


def prometheus_config(cfg: ClusterConfig, target: Optional[str], alertmanager: str, interval_s: float) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": f"{interval_s:g}s"},
        "rule_files": ["alerts.yml"],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [{"job_name": "spark-cluster", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [target or scrape_target(cfg)], "labels": {"cluster": cfg.name}}]}],
    }


def files(cfg: ClusterConfig, target: Optional[str] = None, alertmanager: str = "127.0.0.1:9093",
          interval_s: float = 15) -> dict[str, str]:
    """File name -> text, as `observability` writes them."""
    shipped = templates_dir() / "observability"
    return {
        "prometheus.yml": "# written by `spark-cluster observability`: Prometheus scraping the spark-cluster controller\n"
                          + yaml.safe_dump(prometheus_config(cfg, target, alertmanager, interval_s), sort_keys=False),
        "alerts.yml": (shipped / "alerts.yml").read_text(),
        "alerts.test.yml": (shipped / "alerts.test.yml").read_text(),
        "dashboard.json": json.dumps(dashboard(f"spark-cluster: {cfg.name}"), indent=1) + "\n",
    }


def write(out: Path, texts: dict[str, str], force: bool) -> list[Path]:
    """The files into `out`; a file there with other content is kept unless `force` (nothing a user changed is lost)."""
    changed = [name for name, text in texts.items() if (out / name).exists() and (out / name).read_text(errors="replace") != text]
    if changed and not force:
        raise ConfigError(f"{out} already has {', '.join(changed)} with other content: nothing was written",
                          hint="write elsewhere (--out), or --force to replace them")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (out / name).write_text(text)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write there ({exc.strerror or exc})", hint="choose another folder (--out)") from None
    return [out / name for name in texts]
