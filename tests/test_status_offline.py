"""`status` against nodes that do not answer: no cluster needed (a local socket that accepts SSH
connections and never says anything, as a hung node's sshd does)."""

from __future__ import annotations

import socket
import threading
import time

import yaml

from spark_cluster.config import parse_config
from spark_cluster.status import status
from spark_cluster.transport import Nodes

from .conftest import SIM_CONFIG

CONNECT_TIMEOUT_S = 2.0


def silent_listener(host: str) -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind((host, 0))
    srv.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            held.append(conn)  # never answers, never closes

    threading.Thread(target=accept, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_a_head_that_does_not_answer_costs_one_connect_timeout(tmp_path):
    listeners = [silent_listener(f"127.0.0.{i + 1}") for i in range(2)]
    try:
        data = yaml.safe_load(SIM_CONFIG.read_text())
        for i, n in enumerate(data["nodes"]):
            n["host"] = f"127.0.0.{i + 1}"
            n["address"] = f"127.0.0.{i + 1}"
            n["ssh"] = {"port": listeners[i][1]}
        data["ssh"].update(connect_timeout_s=CONNECT_TIMEOUT_S, trust_on_first_use=True, known_hosts=str(tmp_path / "known_hosts"))
        data["state_dir"] = str(tmp_path)
        data["vllm"]["port"] = 9  # discard: nothing listens on loopback, refused at once
        cfg = parse_config(yaml.safe_dump(data))
        with Nodes(cfg) as nodes:
            t0 = time.monotonic()
            rep = status(cfg, nodes)
            took = time.monotonic() - t0
    finally:
        for srv, _ in listeners:
            srv.close()
    head = next(n for n in rep.observation.nodes if n.role == "head")
    assert not head.reachable and f"did not answer within {CONNECT_TIMEOUT_S:g}s" in head.error
    assert rep.verdict == "down" and head.name in rep.reason
    assert rep.observation.ray.error == "head unreachable"
    # the SSH connect (and banner) timeout once, not once for the node probe and again for Ray's
    assert took < 1.75 * CONNECT_TIMEOUT_S, f"status took {took:.2f}s with a {CONNECT_TIMEOUT_S:g}s connect timeout"
    # and a hang now would get the full restart, saying why
    assert rep.restart == "full" and rep.restart_why.startswith("sim-1 did not answer"), rep.restart_why
