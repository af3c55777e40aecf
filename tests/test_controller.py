"""The controller as a user runs it (`spark-cluster controller cluster.yaml`, a process of its own)
on the simulated cluster (Ray): its status page in a real browser, its metrics, clients that go
away, bad input (a huge header, half-sent requests), the API's restart (token or not), and the
circuit breaker closing the gateway's door.
The tests share one controller and run in this order."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from spark_cluster.config import parse_config
from spark_cluster.facts import parse_metrics

from .browser import Browser
from .conftest import ROOT, SIM_CONFIG, freeze, own_state, sim_docker, worker_container
from .fake_engine import free_ports
from .gateway_rig import completion_request, connected, health_probe, p99, send_huge_header, status_of
from .cluster_helpers import ControllerProcess
from .webhook import Receiver

pytestmark = pytest.mark.cluster

TOKEN = "controller-test-token-5d1e"
# a secret in each place cluster.yaml takes one: found in no file under state_dir, no API answer, no plan
SECRETS = {"container.env": "hf_simenvsecret0123456789", "vllm.extra_args": "hf_simflagsecret0123456789",
           "container.extra_args": "pw-simdockersecret0123456789", "notify": "hook-notifysecret0123456789"}
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def controller(sim, tmp_path_factory):
    from spark_cluster.executor import Executor
    from spark_cluster.transport import Nodes

    tmp = tmp_path_factory.mktemp("controller")
    data = own_state(yaml.safe_load(SIM_CONFIG.read_text()), tmp / "state")
    gateway, control = free_ports(2)
    data["gateway"] = {"host": "127.0.0.1", "port": gateway, "hold_s": 600, "request_deadline_s": 5}
    data["controller"] = {"port": control}
    data["api"] = {"token_env": "SPARK_CLUSTER_TEST_TOKEN"}
    # one restart an hour (the API's, below), and a stall window too long to confirm a hang: the
    # last test lets Ray's heartbeat end the engine, which trips the breaker
    data["watchdog"] = {"max_restarts_per_hour": 1, "stall_window_s": 600}
    data["container"]["env"]["HF_TOKEN"] = SECRETS["container.env"]
    data["vllm"]["extra_args"] = [*data["vllm"].get("extra_args", []), "--hf-token", SECRETS["vllm.extra_args"]]
    data["container"]["extra_args"] = [*data["container"].get("extra_args", []), "-e", f"MY_PASSWORD={SECRETS['container.extra_args']}"]
    data["notify"] = {"targets": [{"url_env": "SPARK_NOTIFY_URL"}]}  # the operator's webhook: its URL (a secret) in a variable
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = parse_config(path.read_text())
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).up()
    with Receiver(path=f"/{SECRETS['notify']}") as hook:
        c = ControllerProcess(path, cfg, {"SPARK_CLUSTER_TEST_TOKEN": TOKEN, "SPARK_NOTIFY_URL": hook.url}, TOKEN)
        c.hook = hook
        try:
            c.wait_for(lambda e: e["event"] == "state" and e["state"] == "healthy", 60, "healthy state")
            yield c
        finally:
            c.stop()
            with Nodes(cfg) as nodes:
                Executor(cfg, nodes).down()


def test_status_page_shows_the_cluster_in_a_real_browser(controller):
    with Browser() as browser:
        page = browser.page()
        page.goto(controller.url + "/")
        page.log_in(TOKEN)  # events and incidents need the token: the page asks for it once
        page.wait("(document.body.dataset.loaded || '').split(' ').length >= 4", 60, "status, samples, events and incidents")
        assert page.eval("document.getElementById('verdict').textContent") == "serving"
        assert page.eval("document.getElementById('wd-state').textContent") == "healthy"
        assert page.eval("document.getElementById('door').textContent") == "open"
        nodes = page.eval("[...document.querySelectorAll('#nodes tbody tr')].map(r => r.cells[1].textContent + ' ' + r.cells[2].textContent)")
        assert nodes == ["sim-1 head", "sim-2 worker"]
        ranks = page.eval("[...document.querySelectorAll('#nodes tbody tr')].map(r => r.cells[7].textContent + ': ' + r.cells[7].title)")
        assert all(r.split(":")[0] in ("working", "waiting") and "rank process" in r for r in ranks), ranks  # the evidence on hover
        containers = page.eval("document.getElementById('containers').textContent")
        assert "spark-ray-head" in containers and "spark-ray-worker" in containers and "vllm" in containers
        ray = page.eval("document.getElementById('ray').textContent")
        assert "10.99.0.11" in ray and "10.99.0.12" in ray and "placement group" in ray and "CREATED" in ray
        assert "watch-start" in page.eval("document.getElementById('timeline').textContent")
        # new watchdog events reach the page live (server-sent events), without a reload: pause and
        # resume the watchdog through the API
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.post(f"{controller.url}/api/watchdog/pause", headers=auth).status_code == 200
        page.wait("document.getElementById('timeline').textContent.includes('watch-paused')", 20, "the pause, live")
        assert httpx.post(f"{controller.url}/api/watchdog/resume", headers=auth).status_code == 200
        page.wait("document.getElementById('timeline').textContent.includes('watch-resumed')", 20, "the resume, live")
        # the throughput chart is drawn from the watchdog's samples once two exist
        page.wait("document.querySelector('#throughput polyline') !== null", 30, "the throughput line")
        shot = page.screenshot(ARTIFACTS / "status-page.png")
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 20_000
        assert not page.console, page.console
        # the resumed watchdog confirms afresh ("starting" until its next observation): leave it healthy
        resumed = controller.wait_for(lambda e: e["event"] == "watch-resumed", 10, "the resume")
        controller.wait_for(lambda e: e["event"] == "state" and e["state"] == "healthy" and e["ts"] > resumed["ts"], 60, "healthy again")


def test_metrics_parse_and_hold_no_secret(controller):
    text = httpx.get(f"{controller.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["spark_cluster_state"].samples and controller.metric("spark_cluster_state", spark_cluster_state="healthy") == 1
    assert controller.metric("spark_cluster_engine_up") == 1
    assert "spark_cluster_gateway_time_to_first_byte_seconds" in families
    status = httpx.get(f"{controller.url}/api/status", timeout=30)
    assert status.status_code == 200 and status.json()["verdict"] == "serving"
    assert httpx.get(f"{controller.url}/api/events").status_code == 401  # what a cluster did needs the token
    events = httpx.get(f"{controller.url}/api/events", headers={"Authorization": f"Bearer {TOKEN}"}).text
    for body in (text, status.text, events):
        assert TOKEN not in body
    assert httpx.get(f"{controller.url}/docs").status_code == 200


def rss_mb(pid: int) -> float:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def test_a_huge_header_and_half_sent_requests_cost_the_controller_nothing(controller):
    """docs/bad-input.md against the process itself: a 64 MB header gets 431 with the memory back
    within 10 MB; 300 half-sent requests are closed at gateway.request_deadline_s while a real
    completion is served."""
    body = {"model": controller.cfg.model.name, "prompt": "Hi", "max_tokens": 1}
    assert httpx.post(f"{controller.gateway}/v1/completions", json=body, timeout=60).status_code == 200
    before = rss_mb(controller.proc.pid)
    status, sent = send_huge_header(controller.gateway)
    assert status == 431 and sent < 64 * 2**20
    assert rss_mb(controller.proc.pid) - before < 10, (before, rss_mb(controller.proc.pid))

    socks = [connected(controller.gateway) for _ in range(300)]
    try:
        t0 = time.monotonic()
        for i, sock in enumerate(socks):
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\n" if i % 2 else completion_request()[:-5])
        assert httpx.post(f"{controller.gateway}/v1/completions", json=body, timeout=60).status_code == 200  # served meanwhile
        statuses = [status_of(sock, timeout=15) for sock in socks]
        assert statuses == [408] * 300, sorted(set(statuses))
        assert time.monotonic() - t0 < controller.cfg.gateway.request_deadline_s + 5
    finally:
        for sock in socks:
            sock.close()
    assert controller.stopped() is None


def test_crlf_floods_and_a_huge_header_to_the_control_plane_leave_the_gateway_serving(controller):
    """#36's attacks on the process: 200 connections sending blank lines do not stop a real client from
    being served within 1 s; a 64 MiB header to the control plane gets 431 while the gateway's /health
    answers within 100 ms (p99)."""
    body = {"model": controller.cfg.model.name, "prompt": "Hi", "max_tokens": 1}
    socks = [connected(controller.gateway) for _ in range(200)]
    try:
        for _ in range(3):
            for sock in socks:
                try:
                    sock.sendall(b"\r\n")
                except OSError:
                    pass  # closed at the keep-alive timeout: what the test wants
            t = time.monotonic()
            assert httpx.post(f"{controller.gateway}/v1/completions", json=body, timeout=60).status_code == 200
            assert time.monotonic() - t < 1
            time.sleep(1)
    finally:
        for sock in socks:
            sock.close()
    with health_probe(controller.gateway) as times:
        status, sent = send_huge_header(controller.url)
    print(f"control plane 64 MiB header: {status} after {sent / 2**20:.0f} MiB sent; the gateway's /health p99 "
          f"{p99(times) * 1000:.1f} ms over {len(times)} probes")
    assert status == 431 and sent < 64 * 2**20 and p99(times) < 0.1
    assert controller.stopped() is None


def vllm_running(cfg) -> float:
    return parse_metrics(httpx.get(f"{cfg.endpoint()}/metrics", timeout=10).text).get("running") or 0


def test_clients_that_disconnect_mid_stream_stop_their_requests_in_the_engine(controller):
    cfg = controller.cfg
    body = {"model": cfg.model.name, "prompt": "Once upon a time", "max_tokens": 1800, "ignore_eos": True, "stream": True}
    clients = [httpx.Client(timeout=60) for _ in range(3)]
    streams = [c.stream("POST", f"{controller.gateway}/v1/completions", json=body) for c in clients]
    lines = []  # each stream's line iterator stays referenced: a dropped one closes its connection
    try:
        for s in streams:
            lines.append(s.__enter__().iter_lines())
            assert next(line for line in lines[-1] if line.startswith("data: "))
        deadline = time.monotonic() + 20
        while vllm_running(cfg) < 3:  # the engine's gauges follow its steps
            assert time.monotonic() < deadline, f"the engine shows {vllm_running(cfg)} running requests, not 3"
            time.sleep(0.5)
    finally:
        gone = time.monotonic()
        for s, c in zip(streams, clients):
            s.__exit__(None, None, None)
            c.close()
    while vllm_running(cfg) and time.monotonic() - gone < 10:
        time.sleep(0.2)
    took = time.monotonic() - gone
    print(f"the engine's running requests dropped to 0 {took:.1f}s after the clients left")
    assert vllm_running(cfg) == 0 and took < 5
    assert controller.metric("spark_cluster_gateway_requests_total", outcome="cancelled") >= 3


def test_api_restart_needs_the_token_then_restarts_the_group_once_while_clients_are_held(controller):
    assert httpx.post(f"{controller.url}/api/restart").status_code == 401
    assert httpx.post(f"{controller.url}/api/restart", headers={"Authorization": "Bearer nope"}).status_code == 401
    time.sleep(2 * controller.cfg.watchdog.period_s)
    assert not [e for e in controller.events if e["event"] == "restart-start"]
    before = controller.metric("spark_cluster_restarts_total", reason="requested")
    r = httpx.post(f"{controller.url}/api/restart", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 202
    controller.wait_for(lambda e: e["event"] == "restart-start", 30, "restart start")
    # a client arriving while the group restarts is held, then served
    answers = []
    body = {"model": controller.cfg.model.name, "prompt": "Hi", "max_tokens": 4}
    t = threading.Thread(target=lambda: answers.append(httpx.post(f"{controller.gateway}/v1/completions", json=body, timeout=600)))
    t.start()
    done = controller.wait_for(lambda e: e["event"] in ("restart-done", "restart-failed"), 400, "restart end")
    assert done["event"] == "restart-done", done
    t.join(timeout=60)
    assert answers and answers[0].status_code == 200 and answers[0].json()["choices"]
    controller.wait_for(lambda e: e["event"] == "state" and e["state"] == "healthy" and e["ts"] > done["ts"], 60, "healthy again")
    assert len([e for e in controller.events if e["event"] == "restart-start"]) == 1
    assert controller.metric("spark_cluster_restarts_total", reason="requested") == before + 1
    assert controller.metric("spark_cluster_gateway_requests_total", outcome="held") >= 1
    assert controller.metric("spark_cluster_last_recovery_seconds") > 0
    with Browser() as browser:  # the page's incident shows the restart that followed it, part by part
        page = browser.page()
        page.goto(controller.url + "/")
        page.log_in(TOKEN)
        page.wait("document.querySelector('#incidents .restart') !== null", 60, "the incident's restart")
        shown = page.eval("document.querySelector('#incidents .restart').textContent")
        print(shown)
        assert shown.startswith(f"{done['restart']} restart done in ") and "ready/health " in shown, shown
        assert not page.console, page.console


def test_no_api_answer_holds_a_secret(controller):
    """After up and the API's restart (an incident bundle with the containers' logs: vLLM prints its
    arguments, the --hf-token among them)."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    incidents = httpx.get(f"{controller.url}/api/incidents", headers=auth, timeout=10).json()
    assert incidents and any(f.endswith(".log") for i in incidents for f in i["files"])
    answers = [httpx.get(f"{controller.url}{path}", headers=auth, timeout=30).text
               for path in ("/api/status", "/api/events?n=500", "/api/incidents", "/api/samples", "/metrics", "/healthz")]
    answers += [httpx.get(f"{controller.url}/incidents/{i['name']}/{f}", headers=auth, timeout=10).text
                for i in incidents for f in i["files"]]
    assert any("non-default args" in a for a in answers)  # vLLM's own account of its arguments is among them
    for secret in SECRETS.values():
        assert not [a[:200] for a in answers if secret in a], secret


def test_engine_ended_by_rays_heartbeat_is_a_member_gone_and_the_tripped_breaker_closes_the_door(controller):
    """The Ray path's own ending of a frozen worker: the stall window (600 s) is too long to confirm
    the hang, so Ray marks the frozen node dead after its heartbeat timeout, the engine dies and the
    API exits; the watchdog sees a member gone (no canary). The API's restart counted, the breaker
    (1 an hour) trips: the gateway refuses at once, saying so, and a new watchdog remembers."""
    from .loadgen import stream_load
    from spark_cluster.transport import Nodes
    from spark_cluster.watchdog import Watchdog, WatchdogFailed

    cfg = controller.cfg
    stop = threading.Event()
    threads = stream_load(controller.gateway, cfg.model.name, 2, stop, max_tokens=1800, repeat=True)
    try:
        time.sleep(5)
        frozen_at = time.time()
        freeze("sim-2", worker_container(cfg))
        alert = controller.wait_for(lambda e: e["event"] == "alert", 240, "breaker alert")
    finally:
        stop.set()
    print(f"engine ended by Ray; breaker alert {alert['ts']} ({time.time() - frozen_at:.1f}s after the freeze or less): {alert['reason']}")
    assert "circuit breaker" in alert["reason"] and "member gone" in alert["reason"]
    # the operator is told: the API's restart earlier (asked for, then done), now the breaker open
    told = {b["title"].split(": ", 1)[1]: b for b in controller.hook.wait_for(3, timeout=10)}
    assert {"restart requested", "circuit breaker open: the watchdog stopped restarting"} <= set(told), list(told)
    assert told["circuit breaker open: the watchdog stopped restarting"]["type"] == "failure"
    assert "vllm in spark-ray-head on sim-1 has exited" in alert["reason"] or "Ray lists node sim-2" in alert["reason"]
    canaries = [e for e in controller.events if e["event"] == "canary" and datetime.fromisoformat(e["ts"]).timestamp() > frozen_at]
    assert not canaries  # no hang verdict: the stall window never ran out
    t0 = time.monotonic()
    r = httpx.post(f"{controller.gateway}/v1/completions", json={"model": cfg.model.name, "prompt": "Hi", "max_tokens": 1}, timeout=30)
    assert r.status_code == 503 and time.monotonic() - t0 < 2
    message = r.json()["error"]["message"]  # a category on the public port; the watchdog's reason on the control plane
    assert "given up" in message and "member gone" not in message and "sim-" not in message, message
    assert "circuit breaker" in httpx.get(f"{controller.url}/healthz", timeout=30).text
    assert controller.metric("spark_cluster_state", spark_cluster_state="failed") == 1
    assert len([e for e in controller.events if e["event"] == "restart-start"]) == 1
    for t in threads:
        t.join(timeout=30)
    # a new watchdog process remembers it failed, and does nothing
    controller.stop()
    with Nodes(cfg) as nodes:
        with pytest.raises(WatchdogFailed):
            Watchdog(cfg, nodes).run(max_seconds=5)
    sim_docker("sim-2", "unpause", worker_container(cfg), check=False)


def test_after_up_a_failover_and_down_no_file_under_state_dir_holds_a_secret(controller, tmp_path):
    """Runs last: `down` saves the containers' logs too. Every folder under state_dir 0700, every file 0600."""
    import stat

    from spark_cluster.executor import Executor
    from spark_cluster.transport import Nodes

    from .conftest import run_cli

    cfg = controller.cfg
    with Nodes(cfg) as nodes:
        assert Executor(cfg, nodes).down() is not None
    state = cfg.resolved_state_dir()
    files = [p for p in state.rglob("*") if p.is_file()]
    assert any(p.parts[-3] == "logs" for p in files) and any("incidents" in p.parts and p.suffix == ".log" for p in files)
    config = state.parent / "cluster.yaml"
    shown = [run_cli("plan", str(config)).stdout, run_cli("plan", str(config), "--json").stdout, run_cli("plan", str(config), "--down").stdout]
    assert "--hf-token" in shown[0]
    for secret in SECRETS.values():
        assert not [str(p) for p in files if secret in p.read_text(errors="replace")], secret
        assert not [x[:200] for x in shown if secret in x], secret
    for p in [state, *state.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p
