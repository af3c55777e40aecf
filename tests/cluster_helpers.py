"""What the cluster tests share: waiting for a watchdog's events (in a thread of the test, or the
controller process's), load on the engine, the containers a cluster runs. Test files import these;
no test file imports another."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx

from spark_cluster.metrics import sample_value
from spark_cluster.observe import list_containers
from spark_cluster.transport import Nodes
from spark_cluster.watchdog import Watchdog

from .conftest import ROOT


def stream_load(url: str, n: int, stop: threading.Event, max_tokens: int = 1500, repeat: bool = False):
    from .loadgen import stream_load as load

    return load(url, "tiny-qwen3", n, stop, max_tokens=max_tokens, repeat=repeat)


class EventWaiter:
    """Waits for a watchdog event. Subclasses hold `events` (a list, or a property reading them) and
    say whether the watchdog stopped."""

    poll_s = 0.5
    events: list[dict]

    def stopped(self) -> str | None:
        return None

    def wait_for(self, pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((e for e in self.events if pred(e)), None)
            if hit is not None:
                return hit
            error = self.stopped()
            assert error is None, f"watchdog stopped: {error}"
            time.sleep(self.poll_s)
        raise AssertionError(f"no {what} within {timeout}s; events: {[e['event'] for e in self.events][-30:]}")

    def kinds(self, kind):
        return [e for e in self.events if e["event"] == kind]

class Controlled(EventWaiter):
    """The controller (real watchdog, gateway, API) in this process, both planes on free loopback
    ports; clients go through `url` (the gateway)."""

    def __init__(self, cfg, token: str = "test-token"):
        from spark_cluster.control_api import create_app
        from spark_cluster.controller import Controller, listening_socket

        from .fake_engine import Served

        gateway = listening_socket("127.0.0.1", 0, "gateway.port")
        self.ctl = Controller(cfg, token=token, gateway_socket=gateway)
        self.served = Served(create_app(self.ctl))
        self.url = f"http://127.0.0.1:{gateway.getsockname()[1]}"

    def __enter__(self):
        self.served.start()
        return self

    def __exit__(self, *exc):
        self.served.stop()

    @property
    def events(self) -> list[dict]:
        return list(self.ctl.events)

    @property
    def wd(self):
        return self.ctl.wd

    def stopped(self) -> str | None:
        return "; ".join(self.ctl.watchdog_errors.values()) or None


class Running(EventWaiter):
    """A watchdog in a background thread, stopped and joined at the end."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.events: list[dict] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.nodes = Nodes(cfg)
        self.wd = Watchdog(cfg, self.nodes, on_event=self.events.append)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.wd.run(stop=self.stop.is_set)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=300)
        self.nodes.close()

    def stopped(self) -> str | None:
        return None if self.error is None else repr(self.error)

    def restart_succeeded(self):
        done = self.wait_for(lambda e: e["event"] in ("restart-done", "restart-failed"), 400, "restart end")
        assert done["event"] == "restart-done", done

@contextmanager
def streaming(cfg, n: int, **kw):
    """n streaming completions in flight while the block runs; stopped and joined after it."""
    stop = threading.Event()
    threads = stream_load(cfg.endpoint(), n, stop, max_tokens=1800, **kw)
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)

def compile_data(executor: str) -> dict:
    """configs/local-sim-compile.yaml, for the native executor as local-sim-native.yaml differs from
    local-sim.yaml (the executor, no Ray resource)."""
    import yaml

    data = yaml.safe_load((ROOT / "configs" / "local-sim-compile.yaml").read_text())
    if executor == "native":
        data["executor"] = "native"
        data["ray"].pop("resources")
    return data


def completion_works(cfg) -> bool:
    try:
        r = httpx.post(f"{cfg.endpoint()}/v1/completions", json={"model": "tiny-qwen3", "prompt": "Hi", "max_tokens": 2}, timeout=60)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and bool(r.json()["choices"])

def ts(e) -> float:
    return datetime.fromisoformat(e["ts"]).timestamp()


def containers(cfg) -> dict[str, dict[str, str]]:
    with Nodes(cfg) as nodes:
        return {n: {c.name: c.id for c in list_containers(nodes[n], cfg.name)} for n in nodes.by_name}


class ControllerProcess(EventWaiter):
    poll_s = 1.0

    def __init__(self, cfg_path: Path, cfg, env: dict, token: str):
        self.cfg, self.token = cfg, token
        self.url = cfg.controller_url()  # the control plane: page, API, metrics
        self.gateway = cfg.gateway_url()  # clients
        self.log = open(cfg_path.with_suffix(".log"), "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "spark_cluster", "controller", str(cfg_path)], cwd=ROOT,
                                     env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, cfg_path.with_suffix(".log").read_text()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the controller did not answer /healthz"
            time.sleep(0.3)

    @property
    def events(self) -> list[dict]:
        return httpx.get(f"{self.url}/api/events?n=500", timeout=10, headers={"Authorization": f"Bearer {self.token}"}).json()

    def stopped(self) -> str | None:
        return None if self.proc.poll() is None else f"the controller exited with {self.proc.returncode}"

    def metric(self, name: str, **labels) -> float:
        return sample_value(httpx.get(f"{self.url}/metrics", timeout=10).text, name, **labels)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


# vLLM's own log format, with its request logger at DEBUG: each request's prompt token ids are logged
# ("Request <id> details: prompt: ..., prompt_token_ids: [...]"), everything else as vLLM logs it
REQUEST_LOG_DIR = "/srv/spark-cluster-test"  # on each simulated node (its /srv is its own)
REQUEST_LOGGING = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"vllm": {"()": "vllm.logging_utils.NewLineFormatter", "datefmt": "%m-%d %H:%M:%S", "log_level": "INFO",
                            "format": "(%(vllm_process_name)s pid=%(process)d) %(levelname)s %(asctime)s [%(fileinfo)s:%(lineno)d] %(message)s"}},
    "handlers": {"vllm": {"class": "logging.StreamHandler", "formatter": "vllm", "level": "DEBUG", "stream": "ext://sys.stdout"}},
    "loggers": {"vllm": {"handlers": ["vllm"], "level": "INFO", "propagate": False},
                "vllm.entrypoints.serve.utils.request_logger": {"level": "DEBUG"}},
}
LOGGED_PROMPT = re.compile(r"Request (\S+) details: prompt: .*?, prompt_token_ids: \[([\d, ]*)\]")


def log_prompt_ids(data: dict) -> None:
    """Config data (as parsed YAML) whose engines log every request's prompt token ids: what the
    engine itself was asked, not what the gateway says it sent."""
    from spark_cluster.sim import cluster

    text = json.dumps(REQUEST_LOGGING)
    for node in data["nodes"]:
        cluster.node_exec(node["name"], "sh", "-c", f'mkdir -p {REQUEST_LOG_DIR} && printf %s "$1" > {REQUEST_LOG_DIR}/vllm-logging.json',
                          "sh", text, timeout=30)
    c = data["container"]
    c.setdefault("env", {})["VLLM_LOGGING_CONFIG_PATH"] = "/etc/spark-cluster-test/vllm-logging.json"
    c.setdefault("mounts", []).append({"source": REQUEST_LOG_DIR, "target": "/etc/spark-cluster-test", "read_only": True})
    data["vllm"]["extra_args"] = [*data["vllm"].get("extra_args", []), "--enable-log-requests"]


def logged_prompts(cfg) -> list[list[int]]:
    """Every prompt's token ids the group's engine logged (log_prompt_ids), in order."""
    from spark_cluster.sim import cluster

    out = []
    for name in containers(cfg).get(cfg.head.name, {}):
        log = cluster.node_exec(cfg.head.name, "docker", "logs", name, check=False, timeout=60)
        for m in LOGGED_PROMPT.finditer(log.stdout + log.stderr):
            out.append([int(t) for t in m.group(2).split(",") if t.strip()])
    return out
