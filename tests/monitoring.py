"""Real Prometheus and Alertmanager (Debian's packages, `make` installs them) on loopback, for the tests of what
`spark-cluster observability` writes: each started in a folder of the test's own, on free ports, and stopped."""

from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import yaml

from spark_cluster.observability import PANELS

from .fake_engine import free_port

PROMETHEUS, ALERTMANAGER = "/usr/bin/prometheus", "/usr/bin/prometheus-alertmanager"


def _ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready: {log.read_text()[-3000:]}"
        time.sleep(0.2)


@contextmanager
def running(argv: list[str], ready_url: str, log: Path) -> Iterator[None]:
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            _ready(proc, ready_url, log)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def alertmanager(folder: Path, webhook: str) -> Iterator[str]:
    """Alertmanager sending every alert at once (group_wait 0) to `webhook` (http://...); its host:port."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"route": {"receiver": "hook", "group_by": ["alertname", "group"], "group_wait": "0s", "group_interval": "1s",
                        "repeat_interval": "1h"},
              "receivers": [{"name": "hook", "webhook_configs": [{"url": webhook, "send_resolved": False}]}]}
    (folder / "alertmanager.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with running([ALERTMANAGER, f"--config.file={folder / 'alertmanager.yml'}", f"--storage.path={folder / 'data'}",
                  f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                 f"http://127.0.0.1:{port}/-/ready", folder / "alertmanager.log"):
        yield f"127.0.0.1:{port}"


@contextmanager
def prometheus(folder: Path, files: dict[str, str]) -> Iterator[str]:
    """Prometheus on `observability`'s files (written into `folder`); its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    port = free_port()
    with running([PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
                  f"--web.listen-address=127.0.0.1:{port}"], f"http://127.0.0.1:{port}/-/ready", folder / "prometheus.log"):
        yield f"http://127.0.0.1:{port}"


def query(url: str, expr: str) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def panel_queries(cluster: str) -> list[tuple[str, str]]:
    """Each dashboard panel's expressions as Grafana sends them: (panel title, PromQL)."""
    return [(p.title, expr.replace("$cluster", cluster).replace("$__rate_interval", "1m")) for p in PANELS for expr, _ in p.targets]


def wait_for(what: str, check, timeout: float = 60, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        time.sleep(every)
    return got


class Watched:
    """A controller (tests/cluster_helpers.Controlled) with a notification target, scraped by a real Prometheus whose
    alerts go through a real Alertmanager: `notes` receives the controller's notifications, `alerts` Alertmanager's."""

    def __init__(self, ctl, prom: str, notes, alerts):
        self.ctl, self.prom, self.notes, self.alerts = ctl, prom, notes, alerts

    def fired(self, name: str) -> list[dict]:
        return [a for _, body in self.alerts.received for a in body.get("alerts", []) if a["labels"]["alertname"] == name]

    def panels(self, cluster: str) -> tuple[dict[str, str], list[str]]:
        """Each panel evaluated now: (title -> error) of those that failed, and 'title: expression' of each of their
        expressions without data."""
        errors, empty = {}, []
        for title, expr in panel_queries(cluster):
            try:
                if not query(self.prom, expr):
                    empty.append(f"{title}: {expr}")
            except AssertionError as exc:
                errors[title] = str(exc)
        return errors, empty


@contextmanager
def watched(cfg, folder: Path) -> Iterator[Watched]:
    """`cfg`'s controller in this process, its notifications to a local webhook, Prometheus scraping it every second."""
    from spark_cluster.serving_settings import NotifySettings

    from .cluster_helpers import Controlled
    from .webhook import Receiver

    folder.mkdir(parents=True, exist_ok=True)
    with Receiver() as notes, Receiver() as alerts:
        (folder / "notify-url").write_text(notes.url + "\n")
        cfg = cfg.model_copy(update={"notify": NotifySettings(targets=[{"url_file": str(folder / "notify-url")}])})
        from spark_cluster.observability import files

        with Controlled(cfg) as c, alertmanager(folder / "am", f"http://{alerts.url.split('://', 1)[1]}") as am:
            target = c.served.url.split("://", 1)[1]
            with prometheus(folder / "prom", files(cfg, target, am, interval_s=1)) as prom:
                yield Watched(c, prom, notes, alerts)
