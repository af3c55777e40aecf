"""The controller as `controller` serves it, in front of a fake vLLM (tests/fake_engine.py), with a
scripted watchdog standing in for the real one; and raw-socket helpers to talk to its gateway the
way clients (and careless ones) do. The `rig` fixture (conftest.py) puts them together."""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Iterator

import httpx
import yaml

from spark_cluster.config import parse_config
from spark_cluster.control_api import create_app
from spark_cluster.control_guard import uvicorn_options
from spark_cluster.controller import Controller, listening_socket
from spark_cluster.decide import State
from spark_cluster.metrics import sample_value

from .conftest import SIM_CONFIG
from .fake_engine import FakeEngine, Served

TOKEN = "test-token-7f3a9c"
SECRET = "hf_secretvalue123456"


class ScriptedWatchdog:
    """Stands in for the watchdog thread: the test sends its events."""

    def __init__(self, cfg, nodes, on_event):
        self.on_event = on_event
        self.state = State(phase="healthy", since=time.time())
        self.samples = deque([{"t": 1.0, "health": 200, "running": 2, "waiting": 1, "generation_tokens_total": 40.0,
                               "prompt_tokens_total": 10.0, "steps_total": 30.0}], maxlen=60)
        self.paused = False
        self.woken = threading.Event()
        self.restarts: list[str] = []
        self.pauses: list[bool] = []

    @property
    def busy_restarting(self) -> bool:
        return self.state.phase in ("backoff", "restarting")

    def clock(self) -> float:
        return time.time()

    def request_restart(self, reason: str) -> None:
        self.restarts.append(reason)

    def pause(self, paused: bool = True) -> None:
        self.pauses.append(paused)

    def run(self, stop, stop_when_failed):
        while not stop():
            self.woken.wait(0.05)

    def emit(self, kind: str, **data) -> None:
        self.on_event({"ts": "2026-11-29T00:00:00.000+00:00", "event": kind, "cluster": "spark", **data})


class Rig:
    def __init__(self, engine: FakeEngine, ctl: Controller, served: Served):
        self.engine, self.ctl, self.served = engine, ctl, served
        self.url = gateway_url(ctl)  # the data plane: clients
        self.api = served.url  # the control plane: API, page, metrics
        self.script = engine.script

    @property
    def wd(self) -> ScriptedWatchdog:
        return self.ctl.wd  # type: ignore[return-value]

    def emit(self, kind: str, **data) -> None:
        self.wd.emit(kind, **data)
        time.sleep(0.05)  # the event crosses into the controller's loop

    def metric(self, name: str, **labels) -> float:
        time.sleep(0.05)  # a request's outcome is counted just after its last byte went out
        return sample_value(httpx.get(f"{self.api}/metrics").text, name, **labels)


@contextmanager
def rig_running(tmp_path, **gateway) -> Iterator[Rig]:
    """The rig with these gateway settings, stopped at the end."""
    engine = FakeEngine().start()
    ctl, served = serving_controller(rig_cfg(tmp_path, engine.url, **gateway))
    served.start()
    try:
        yield Rig(engine, ctl, served)
    finally:
        served.stop()
        engine.stop()


@contextmanager
def health_probe(url: str) -> Iterator[list[float]]:
    """The gateway's /health asked again and again while the block runs: the answers' times, sorted at the end."""
    stop, times = threading.Event(), []

    def probe() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                t = time.monotonic()
                c.get(f"{url}/health")
                times.append(time.monotonic() - t)
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        time.sleep(0.5)
        yield times
        time.sleep(0.5)
    finally:
        stop.set()
        prober.join()
        times.sort()


def p99(times: list[float]) -> float:
    return times[int(len(times) * 0.99)]


def rig_cfg(tmp_path, engine_url: str, **gateway):
    data = yaml.safe_load(SIM_CONFIG.read_text())
    data["vllm"]["endpoint"] = engine_url
    data["state_dir"] = str(tmp_path / "state")
    data["gateway"] = {"host": "127.0.0.1", "port": 8080, "hold_s": 20, "max_held": 8, "max_body": "1m", **gateway}
    data["container"]["env"]["HF_TOKEN"] = SECRET
    return parse_config(yaml.safe_dump(data))


def groups_cfg(tmp_path, port: int, **gateway):
    """configs/local-sim-2groups.yaml with each group's head on a loopback address of its own
    (127.0.0.1 and 127.0.0.2), vLLM's port `port` on both: where two fake engines listen."""
    data = yaml.safe_load((SIM_CONFIG.parent / "local-sim-2groups.yaml").read_text())
    for node, host in zip(data["nodes"], ["127.0.0.1", "127.0.0.3", "127.0.0.2", "127.0.0.4"]):
        node["host"] = host  # loopback only: nothing answers SSH there (status finds the nodes unreachable at once)
    data["vllm"]["port"] = port
    data["state_dir"] = str(tmp_path / "state")
    data["gateway"] = {"host": "127.0.0.1", "port": 8080, "hold_s": 20, "max_held": 8, **gateway}
    return parse_config(yaml.safe_dump(data))


def serving_controller(cfg) -> tuple[Controller, Served]:
    """The controller as `controller` serves it: the control plane on uvicorn (a free port), the
    gateway on a socket of its own (another free port), a scripted watchdog."""
    ctl = Controller(cfg, token=TOKEN, watchdog=ScriptedWatchdog, gateway_socket=listening_socket("127.0.0.1", 0, "gateway.port"))
    return ctl, Served(create_app(ctl), **uvicorn_options(cfg.gateway.max_head_bytes()))


def gateway_url(ctl: Controller) -> str:
    return f"http://127.0.0.1:{ctl.gateway_socket.getsockname()[1]}"


def sse_texts(lines) -> list[str]:
    out = []
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(line[6:])
    return out


def completion_request(target: str = "/v1/completions", body: bytes = b'{"prompt": "p"}', extra: str = "") -> bytes:
    return (f"POST {target} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
            ).encode() + body


def read_answers(sock: socket.socket, count: int, timeout: float = 10) -> list[tuple[int, dict[str, str], bytes]]:
    """`count` HTTP/1.1 answers from a socket: status, headers, body (chunked or sized)."""
    sock.settimeout(timeout)
    stream = sock.makefile("rb")
    answers = []
    for _ in range(count):
        status = int(stream.readline().split()[1])
        headers = {}
        while (line := stream.readline()) not in (b"\r\n", b""):
            name, value = line.decode().split(":", 1)
            headers[name.strip().lower()] = value.strip()
        body = b""
        if headers.get("transfer-encoding") == "chunked":
            while size := int(stream.readline(), 16):
                body += stream.read(size)
                stream.readline()
            stream.readline()
        else:
            body = stream.read(int(headers.get("content-length", 0)))
        answers.append((status, headers, body))
    return answers


def status_of(sock: socket.socket, timeout: float = 10) -> int:
    """The status of the answer a socket reads first (0 when it is closed without one)."""
    sock.settimeout(timeout)
    line = sock.makefile("rb").readline()
    return int(line.split()[1]) if line else 0


def send_huge_header(url: str, size: int = 64 * 2**20) -> tuple[int, int]:
    """A request whose one header value is `size` bytes, sent a MiB at a time until the gateway
    closes the connection: the status it answered, and how many bytes went out."""
    with connected(url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\nx-big: ")
        sent = 0
        try:
            while sent < size:
                sock.sendall(b"a" * 2**20)
                sent += 2**20
        except OSError:
            pass  # the gateway closed the connection: the rest is never read
        return status_of(sock), sent


def connected(url: str, receive_buffer: int = 0) -> socket.socket:
    host, port = url.split("//")[1].split(":")
    sock = socket.socket()
    if receive_buffer:  # before connecting: the window the client offers follows it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    return sock


