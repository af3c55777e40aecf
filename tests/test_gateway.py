"""The gateway and the controller's API, fast: the door's rules as tables, then the real controller
app (uvicorn, real sockets) in front of a fake vLLM, with a scripted watchdog standing in for the
real one (the real one on the simulated cluster: tests/test_controller.py)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from spark_cluster.config import GatewaySettings, parse_config
from spark_cluster.controller import listening_socket, load_token
from spark_cluster.decide import State
from spark_cluster.errors import ConfigError
from spark_cluster.door import Admission, Door, admit, door_after, door_for_phase, retry_status
from spark_cluster.metrics import restart_kind

from .conftest import SIM_CONFIG
from .fake_engine import FakeEngine
from .gateway_rig import SECRET, TOKEN, completion_request, connected, gateway_url, read_answers, rig_cfg, serving_controller, sse_texts

# ---- the door's rules ---------------------------------------------------------------------------
@pytest.mark.parametrize("door, event, expected, interrupt", [
    (Door("hold"), {"event": "state", "state": "healthy"}, "open", False),
    (Door("open"), {"event": "state", "state": "suspect"}, "open", False),  # busy is not dead
    (Door("open"), {"event": "state", "state": "restarting"}, "hold", True),
    (Door("open"), {"event": "state", "state": "backoff"}, "hold", True),
    (Door("open"), {"event": "state", "state": "failed", "reason": "circuit breaker"}, "closed", False),
    (Door("open"), {"event": "decision", "action": "restart", "reason": "hang confirmed"}, "hold", True),
    (Door("open"), {"event": "decision", "action": "canary"}, "open", False),
    (Door("hold"), {"event": "restart-done"}, "open", False),
    (Door("hold"), {"event": "restart-failed"}, "hold", False),
    (Door("hold"), {"event": "watch-paused"}, "open", False),
    (Door("closed"), {"event": "incident"}, "closed", False),
])
def test_door_after_event(door, event, expected, interrupt):
    new, act = door_after(door, event)
    assert (new.mode, act) == (expected, interrupt)


def test_door_reason_names_the_phase():
    assert door_for_phase("backoff").reason.startswith("the engine is about to be restarted")
    assert door_for_phase("failed", "circuit breaker: 4 restarts").reason == "circuit breaker: 4 restarts"


@pytest.mark.parametrize("door, held, expected", [
    (Door("open"), 999, Admission("pass")),
    (Door("hold", "restarting"), 0, Admission("hold")),
    (Door("hold", "restarting: ssh x@y", public="restarting"), 2,
     Admission("reject", "not serving (restarting) and 2 requests are already waiting (gateway.max_held 2)", True)),
    (Door("closed", "breaker: ssh x@y", public=""), 0, Admission("reject", "not serving: not serving")),
    (door_for_phase("failed", "breaker: ssh x@y"), 0, Admission("reject", "not serving: the watchdog has given up restarting the engine")),
])
def test_admit(door, held, expected):
    assert admit(door, held, GatewaySettings(max_held=2)) == expected


@pytest.mark.parametrize("status, answers, retry", [
    (502, None, True), (503, None, True), (504, None, True),
    (500, False, True), (500, True, False),  # a 500 is retried only from an engine that no longer answers /health
    (400, None, False), (404, None, False), (422, None, False), (429, None, False),
])
def test_retry_status(status, answers, retry):
    assert retry_status(status, answers) is retry


@pytest.mark.parametrize("reason, kind", [
    ("hang confirmed: no progress for 20s", "hang"), ("member gone: spark-ray-worker on sim-2 exited", "member-gone"),
    ("the last restart failed: x", "restart-failed"), ("requested through the controller's API", "requested"),
    ("not ready 3600s after start", "not-ready"), ("something new", "other"),
])
def test_restart_kind(reason, kind):
    assert restart_kind(reason) == kind


def test_requests_pass_through_unchanged_and_streams_are_not_buffered(rig):
    r = httpx.post(f"{rig.url}/v1/completions?x=1", json={"model": "tiny-qwen3", "prompt": "hi"},
                   headers={"Authorization": "Bearer client-key", "X-Custom": "kept"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "xxxxx" and r.headers["x-fake"] == "1"
    got = rig.script.received[-1]
    assert got["headers"]["authorization"] == "Bearer client-key" and got["headers"]["x-custom"] == "kept"
    assert json.loads(got["body"]) == {"model": "tiny-qwen3", "prompt": "hi"}
    # a stream arrives event by event as the engine sends them (0.3 s apart), not at the end
    rig.script.chunks, rig.script.chunk_delay_s = 4, 0.3
    arrivals = []
    with httpx.stream("POST", f"{rig.url}/v1/completions", json={"model": "m", "prompt": "p", "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream") and s.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in s.headers
        for line in s.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 5 and arrivals[-1] - arrivals[0] > 0.8
    assert rig.metric("spark_cluster_gateway_requests_total", outcome="ok") == 2


def test_engine_4xx_reaches_the_client_unchanged_and_is_not_retried(rig):
    rig.script.status = 400
    r = httpx.post(f"{rig.url}/v1/completions", json={"model": "nope"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "fake error 400"
    assert rig.script.calls == 1


# ---- the front protocol (spark_cluster.front): one connection, several kinds of requests ------------
def test_the_two_planes_answer_apart(rig):
    """Clients' port: /v1/* and /health only; the control plane's port: no /v1/*."""
    with connected(rig.url) as sock:  # one kept-alive connection: the gateway, a path it does not serve, the gateway again
        sock.sendall(completion_request())
        (status, _, body), = read_answers(sock, 1)
        assert status == 200 and json.loads(body)["choices"][0]["text"] == "xxxxx"
        sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: gw\r\n\r\n")
        (status, _, body), = read_answers(sock, 1)
        assert status == 404 and "controller.port" in json.loads(body)["error"]["message"]
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: gw\r\n\r\n")
        (status, _, body), = read_answers(sock, 1)
        assert status == 200 and json.loads(body)["gateway"] == "open"
        sock.sendall(completion_request())
        assert read_answers(sock, 1)[0][0] == 200
    rig.emit("state", state="restarting", previous="healthy", reason="hang confirmed")
    assert httpx.get(f"{rig.url}/health").status_code == 503
    assert httpx.post(f"{rig.api}/v1/completions", json={"prompt": "p"}).status_code == 404
    assert httpx.get(f"{rig.api}/healthz").status_code == 200
    assert "spark_cluster_gateway_requests_total" in httpx.get(f"{rig.api}/metrics").text
    assert rig.script.calls == 2 and rig.metric("spark_cluster_gateway_requests_total", outcome="ok") == 2


def test_pipelined_requests_are_answered_in_order_and_the_target_passes_unchanged(rig):
    rig.script.chunk_delay_s = 0.01
    with connected(rig.url) as sock:
        sock.sendall(completion_request("/v1/completions?a=%2F1", b'{"prompt": "first"}') +
                     completion_request("/v1/completions?a=%2F2", b'{"prompt": "second", "stream": true}'))
        first, second = read_answers(sock, 2)
    assert first[0] == 200 and json.loads(first[2])["object"] == "text_completion"
    assert second[0] == 200 and second[1]["content-type"].startswith("text/event-stream") and second[2].endswith(b"data: [DONE]\n\n")
    assert [r["target"] for r in rig.script.received] == ["/v1/completions?a=%2F1", "/v1/completions?a=%2F2"]
    assert [json.loads(r["body"])["prompt"] for r in rig.script.received] == ["first", "second"]
    # another path pipelined behind a gateway request: answered in its turn, the connection kept
    with connected(rig.url) as sock:
        sock.sendall(completion_request() + b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n" + completion_request())
        assert [a[0] for a in read_answers(sock, 3)] == [200, 404, 200]


def test_expect_100_continue_close_and_a_bad_request(rig):
    body = json.dumps({"prompt": "p" * 2000}).encode()
    with connected(rig.url) as sock:  # as curl sends a body over 1 KB: the head, then the body once told to go on
        sock.sendall(completion_request(body=b"", extra="expect: 100-continue\r\n").replace(b"content-length: 0", b"content-length: %d" % len(body)))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        assert read_answers(sock, 1)[0][0] == 200
    assert json.loads(rig.script.received[-1]["body"]) == json.loads(body)
    with connected(rig.url) as sock:  # the client asks to close: the answer says so and the connection ends
        sock.sendall(completion_request(extra="connection: close\r\n"))
        (status, headers, _), = read_answers(sock, 1)
        assert status == 200 and headers["connection"] == "close" and sock.recv(1) == b""
    with connected(rig.url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\ncontent-length: x\r\n\r\n")
        (status, _, body), = read_answers(sock, 1)
        assert status == 400 and sock.recv(1) == b""


CHUNKS = 800


def test_a_client_reading_slower_than_the_engine_writes_gets_every_byte_in_order(rig):
    # 13 MB as fast as the engine can: more than the sockets' buffers on the way hold, so the
    # engine finishes within the second only if the gateway keeps reading it for a client that does not
    rig.script.chunks, rig.script.chunk_delay_s, rig.script.pad = CHUNKS, 0, 16384
    with connected(rig.url, receive_buffer=16384) as sock:
        sock.sendall(completion_request(body=b'{"stream": true}'))
        deadline = time.monotonic() + 10
        while rig.script.calls == 0:  # the engine has the request (a loaded machine takes a while)
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.05)
        time.sleep(1.0)  # nothing read: the gateway's buffer to this client fills, it stops reading from the engine
        assert rig.script.running == 1
        (status, _, body), = read_answers(sock, 1, timeout=30)
    events = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line.startswith("data: {")]
    assert status == 200 and [e["choices"][0]["text"] for e in events] == [f"t{i}" for i in range(CHUNKS)]
    assert body.endswith(b"data: [DONE]\n\n") and rig.script.abandoned == 0


def test_body_over_the_limit_is_refused_with_413(rig):
    r = httpx.post(f"{rig.url}/v1/completions", content=b"x" * (1024 * 1024 + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "gateway.max_body" in r.json()["error"]["message"]
    # sent in chunks without a declared length: refused once the bytes pass the limit
    r = httpx.post(f"{rig.url}/v1/completions", content=(b"x" * 65536 for _ in range(17)), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and "gateway.max_body" in r.json()["error"]["message"]
    assert rig.script.calls == 0
    assert rig.metric("spark_cluster_gateway_requests_total", outcome="rejected") == 2


def test_requests_are_held_while_restarting_and_go_through_after(rig):
    rig.emit("state", state="restarting", previous="suspect", reason="hang confirmed")
    results = []
    t = threading.Thread(target=lambda: results.append(httpx.post(f"{rig.url}/v1/completions", json={"prompt": "p"}, timeout=30)))
    t.start()
    time.sleep(0.5)
    assert rig.script.calls == 0 and rig.metric("spark_cluster_gateway_held_requests") == 1
    assert httpx.get(f"{rig.url}/health").status_code == 503 and httpx.get(f"{rig.api}/healthz").status_code == 200
    rig.emit("restart-done", seconds=1.0, recover_s=2.0)
    t.join(timeout=10)
    assert results and results[0].status_code == 200
    assert rig.metric("spark_cluster_gateway_requests_total", outcome="held") == 1
    assert rig.metric("spark_cluster_gateway_held_requests") == 0
    assert rig.metric("spark_cluster_last_recovery_seconds") == 2.0


@pytest.mark.parametrize("rig", [{"hold_s": 1, "max_held": 1, "retry_after_s": 7}], indirect=True)
def test_past_hold_s_or_max_held_a_request_gets_503_with_retry_after(rig):
    rig.emit("state", state="backoff", previous="healthy", reason="member gone")
    first = []
    t = threading.Thread(target=lambda: first.append(httpx.post(f"{rig.url}/v1/completions", json={}, timeout=10)))
    t.start()
    time.sleep(0.3)
    second = httpx.post(f"{rig.url}/v1/completions", json={}, timeout=10)  # max_held 1: refused at once
    assert second.status_code == 503 and second.headers["retry-after"] == "7" and "max_held" in second.json()["error"]["message"]
    t.join(timeout=10)
    assert first[0].status_code == 503 and first[0].headers["retry-after"] == "7" and "hold_s" in first[0].json()["error"]["message"]
    assert rig.script.calls == 0 and rig.metric("spark_cluster_gateway_requests_total", outcome="rejected") == 2


def test_when_the_watchdog_has_given_up_nothing_is_held(rig):
    rig.emit("state", state="failed", previous="starting", reason="circuit breaker: 4 restarts in the last hour")
    t0 = time.monotonic()
    r = httpx.post(f"{rig.url}/v1/completions", json={})
    assert time.monotonic() - t0 < 1 and r.status_code == 503
    assert "given up" in r.json()["error"]["message"] and "retry-after" not in r.headers


@pytest.mark.parametrize("event", [
    {"event": "state", "state": "failed", "previous": "backoff",
     "reason": "the last restart failed: ssh root@10.77.0.2:22: host key not in /root/.ssh/known_hosts"},
    {"event": "decision", "action": "restart", "reason": "member gone: node sim-2 (root@10.77.0.2) unreachable for 3 periods"},
    {"event": "state", "state": "starting", "previous": "restarting", "reason": "docker: Error response from daemon: /srv/models"},
])
def test_the_public_port_says_serving_holding_or_closed_never_the_watchdogs_detail(rig, event):
    """The attack: /health and every 503 body carried the watchdog's whole reason: SSH targets, the
    known_hosts path, a failed restart's text. The control plane keeps it."""
    rig.emit(event.pop("event"), **event)
    health = httpx.get(f"{rig.url}/health")
    with httpx.Client(timeout=10) as c:
        refused = c.post(f"{rig.url}/v1/completions", json={"prompt": "p"}, timeout=10) if health.json()["gateway"] == "closed" else None
    for text in [health.text] + ([refused.text] if refused is not None else []):
        assert "10.77.0.2" not in text and "known_hosts" not in text and "docker" not in text and "/srv" not in text, text
    assert health.status_code == 503 and health.json()["reason"].startswith(("the engine", "the watchdog"))
    detail = httpx.get(f"{rig.api}/api/status", timeout=30).json()
    assert "10.77.0.2" in json.dumps(detail) or "/srv/models" in json.dumps(detail)  # the control plane keeps the detail


def test_a_request_refused_before_its_first_byte_is_retried_once_the_engine_is_back(tmp_path):
    port = FakeEngine().port  # nothing listens there yet: connection refused
    ctl, served = serving_controller(rig_cfg(tmp_path, f"http://127.0.0.1:{port}"))
    with served:
        results = []
        t = threading.Thread(target=lambda: results.append(httpx.post(f"{gateway_url(ctl)}/v1/completions", json={"prompt": "p"}, timeout=30)))
        t.start()
        time.sleep(0.8)
        engine = FakeEngine(port).start()
        try:
            t.join(timeout=15)
            assert results and results[0].status_code == 200 and engine.script.calls == 1
            text = httpx.get(f"{served.url}/metrics").text
            assert 'spark_cluster_gateway_requests_total{outcome="retried"} 1.0' in text
        finally:
            engine.stop()


@pytest.mark.parametrize("status, health, retried", [(503, 200, True), (500, 503, True), (500, 200, False)])
def test_an_error_status_from_a_dying_engine_is_retried(rig, status, health, retried):
    rig.script.status, rig.script.health = status, health
    results = []
    t = threading.Thread(target=lambda: results.append(httpx.post(f"{rig.url}/v1/completions", json={}, timeout=30)))
    t.start()
    time.sleep(0.6)
    rig.script.status, rig.script.health = 200, 200
    t.join(timeout=15)
    assert results[0].status_code == (200 if retried else 500)
    assert (rig.script.calls > 1) is retried


def test_a_confirmed_hang_ends_started_streams_with_an_error_event_and_requeues_the_rest(rig):
    rig.script.chunks, rig.script.chunk_delay_s = 50, 0.1
    lines: list[str] = []
    ended: list[float] = []

    def stream():
        with httpx.stream("POST", f"{rig.url}/v1/completions", json={"stream": True}, timeout=30) as s:
            for line in s.iter_lines():
                lines.append(line)
        ended.append(time.monotonic())

    plain = []
    ts = threading.Thread(target=stream)
    ts.start()
    time.sleep(0.5)
    rig.script.hang = True  # the engine freezes: the stream has started, the next request gets nothing
    tp = threading.Thread(target=lambda: plain.append(httpx.post(f"{rig.url}/v1/completions", json={"prompt": "p"}, timeout=30)))
    tp.start()
    time.sleep(0.5)
    confirmed = time.monotonic()
    rig.emit("state", state="restarting", previous="suspect", reason="hang confirmed")
    ts.join(timeout=5)
    assert ended and ended[0] - confirmed < 2, "the started stream was not ended at once"
    events = sse_texts(lines)
    assert events[0].startswith('{"id": "cmpl-fake"') and "error" in json.loads(events[-1])
    assert json.loads(events[-1])["error"]["type"] == "engine_unavailable"
    assert not plain, "the request that had received nothing must wait for the restart"
    rig.script.hang, rig.script.chunks = False, 3
    rig.emit("restart-done", seconds=1.0)
    tp.join(timeout=10)
    assert plain and plain[0].status_code == 200
    assert rig.metric("spark_cluster_gateway_requests_total", outcome="interrupted") == 1
    assert rig.metric("spark_cluster_gateway_requests_total", outcome="retried") == 1


def test_a_client_that_goes_away_cancels_its_request_upstream(rig):
    rig.script.chunks, rig.script.chunk_delay_s = 200, 0.05
    with httpx.stream("POST", f"{rig.url}/v1/completions", json={"stream": True}, timeout=30) as s:
        lines = s.iter_lines()  # kept referenced: a dropped iterator closes the connection at once
        assert next(line for line in lines if line.startswith("data: "))
        time.sleep(0.3)
        assert rig.script.running == 1
        gone = time.monotonic()
    deadline = time.monotonic() + 5
    while rig.script.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rig.script.running == 0 and rig.script.abandoned == 1 and rig.script.abandoned_at[0] - gone < 2
    # a held request whose client leaves is not sent later
    rig.emit("state", state="restarting", previous="healthy", reason="hang confirmed")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{rig.url}/v1/completions", json={}, timeout=0.5)
    time.sleep(0.3)
    assert rig.metric("spark_cluster_gateway_held_requests") == 0
    calls = rig.script.calls
    rig.emit("restart-done", seconds=1.0)
    time.sleep(0.5)
    assert rig.script.calls == calls
    assert rig.metric("spark_cluster_gateway_requests_total", outcome="cancelled") == 2


def test_a_client_that_leaves_after_the_last_event_has_its_whole_answer(rig):
    rig.script.chunks, rig.script.linger_s = 2, 1.0  # the engine closes the stream a second after [DONE]
    with httpx.stream("POST", f"{rig.url}/v1/completions", json={"stream": True}, timeout=30) as s:
        assert "data: [DONE]" in (line for line in s.iter_lines())  # stops reading there and leaves
    time.sleep(0.3)
    assert rig.metric("spark_cluster_gateway_requests_total", outcome="ok") == 1
    assert rig.metric("spark_cluster_gateway_requests_total", outcome="cancelled") == 0


def test_restart_and_pause_need_the_token(rig):
    for path in ("/api/restart", "/api/watchdog/pause", "/api/watchdog/resume"):
        assert httpx.post(rig.api + path).status_code == 401
        assert httpx.post(rig.api + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert rig.wd.restarts == [] and rig.wd.pauses == []
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(f"{rig.api}/api/restart", headers=auth).status_code == 202
    assert rig.wd.restarts == ["requested through the controller's API"]
    assert httpx.post(f"{rig.api}/api/watchdog/pause", headers=auth).status_code == 200
    assert httpx.post(f"{rig.api}/api/watchdog/resume", headers=auth).status_code == 200
    assert rig.wd.pauses == [True, False]
    rig.wd.state = State(phase="restarting")
    assert httpx.post(f"{rig.api}/api/restart", headers=auth).status_code == 409
    now = time.time()  # three restarts in the last hour: the breaker's limit counts the API's too
    rig.wd.state = State(phase="failed", restarts=(now - 300, now - 200, now - 100))
    r = httpx.post(f"{rig.api}/api/restart", headers=auth)
    assert r.status_code == 429 and "resume" in r.json()["detail"] and len(rig.wd.restarts) == 1


def test_metrics_parse_and_count_restarts_by_reason(rig):
    before = rig.metric("spark_cluster_restarts_total", reason="hang")
    rig.emit("decision", action="restart", reason="hang confirmed: x", detect_s=31.5)
    rig.emit("incident", reason="hang confirmed: x", bundle="/tmp/x")
    rig.emit("restart-start", reason="hang confirmed: x", attempt=1)
    rig.emit("restart-done", seconds=140.2, recover_s=141.0, phases={"incident-bundle": 0.3, "kill": 5.1, "ready/health": 110.4})
    rig.emit("state", state="healthy", previous="starting")
    assert rig.metric("spark_cluster_restarts_total", reason="hang") == before + 1
    assert rig.metric("spark_cluster_restart_phase_seconds", phase="kill") == 5.1
    assert rig.metric("spark_cluster_restart_phase_seconds", phase="ready/health") == 110.4
    assert rig.metric("spark_cluster_last_recovery_seconds") == 141.0
    assert rig.metric("spark_cluster_last_detect_seconds") == 31.5
    assert rig.metric("spark_cluster_incidents_total") == 1
    assert rig.metric("spark_cluster_state", spark_cluster_state="healthy") == 1
    assert rig.metric("spark_cluster_engine_requests_running") == 2 and rig.metric("spark_cluster_engine_generation_tokens_total") == 40
    assert rig.metric("spark_cluster_engine_steps_total", group="spark") == 30  # as docs/controller.md names it
    names = {f.name for f in text_string_to_metric_families(httpx.get(f"{rig.api}/metrics").text)}
    assert {"spark_cluster_gateway_time_to_first_byte_seconds", "spark_cluster_gateway_requests", "spark_cluster_restarts"} <= names


def test_no_secret_in_events_or_metrics(rig):
    rig.emit("restart-failed", error=f"docker run -e HF_TOKEN={SECRET} failed")  # as a failed step could say it
    auth = {"Authorization": f"Bearer {TOKEN}"}
    events = httpx.get(f"{rig.api}/api/events", headers=auth).text
    assert "restart-failed" in events and SECRET not in events and "********" in events
    for path in ("/api/events", "/metrics", "/healthz", "/"):
        body = httpx.get(rig.api + path, headers=auth).text
        assert SECRET not in body and TOKEN not in body, path


def test_events_stream_as_server_sent_events(rig):
    rig.emit("state", state="healthy", previous="starting")
    got = []
    with httpx.stream("GET", f"{rig.api}/api/events?n=1", headers={"Accept": "text/event-stream", "Authorization": f"Bearer {TOKEN}"},
                      timeout=10) as s:
        threading.Timer(0.3, lambda: rig.wd.emit("canary", ok=True, seconds=0.1)).start()
        for line in s.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:])["event"])
            if len(got) == 2:
                break
    assert got == ["state", "canary"]


def test_token_from_env_or_file_or_created(tmp_path, monkeypatch):
    base = yaml.safe_load(SIM_CONFIG.read_text())
    base["state_dir"] = str(tmp_path / "state")
    cfg = parse_config(yaml.safe_dump(base))
    made = load_token(cfg)
    path = tmp_path / "state" / "api-token"
    assert len(made) >= 32 and path.stat().st_mode & 0o777 == 0o600 and load_token(cfg) == made
    monkeypatch.setenv("SC_TOKEN", "from-env")
    assert load_token(parse_config(yaml.safe_dump({**base, "api": {"token_env": "SC_TOKEN"}}))) == "from-env"
    with pytest.raises(ConfigError, match="SC_MISSING"):
        load_token(parse_config(yaml.safe_dump({**base, "api": {"token_env": "SC_MISSING"}})))
    with pytest.raises(ConfigError, match="cannot be read"):
        load_token(parse_config(yaml.safe_dump({**base, "api": {"token_file": str(tmp_path / "nope")}})))


def test_the_load_generator_reads_an_error_answer_to_a_stream_once():
    """A stream answered with an error status (the gateway's 503 when the breaker tripped, say): the
    client keeps the answer as its error instead of failing to read a body it already read."""
    from .loadgen import one_request

    engine = FakeEngine().start()
    try:
        engine.script.status = 503
        r = one_request(engine.url, "tiny-qwen3", "stream", 4)
    finally:
        engine.stop()
    assert (r.status, r.complete, r.first_byte) == (503, False, None)
    assert "fake error 503" in r.error


def test_the_load_generator_reads_a_stream_to_its_end_so_a_kept_alive_client_reuses_its_connection():
    """As openai-python does: the body's end after `data: [DONE]` is read, so the next request goes
    over the same connection (the gateway bench's probes would otherwise pay a new connection each)."""
    from .loadgen import one_request

    engine = FakeEngine().start()
    try:
        engine.script.chunks, engine.script.chunk_delay_s = 2, 0.0
        with httpx.Client() as client:
            rs = [one_request(engine.url, "tiny-qwen3", "stream", 2, client=client) for _ in range(2)]
    finally:
        engine.stop()
    assert [(r.complete, r.tokens) for r in rs] == [(True, 2), (True, 2)]
    assert engine.script.received[0]["peer"] == engine.script.received[1]["peer"]


def test_a_port_in_use_is_said_plainly_before_anything_starts():
    taken = listening_socket("127.0.0.1", 0, "gateway.host/gateway.port")
    taken.listen()
    try:
        with pytest.raises(ConfigError, match=r"controller.host/controller.port: cannot listen on 127.0.0.1:\d+ \(Address already in use\)") as info:
            listening_socket("127.0.0.1", taken.getsockname()[1], "controller.host/controller.port")
        assert "choose another controller.port" in str(info.value)
    finally:
        taken.close()
