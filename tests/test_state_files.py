"""State files that cannot be read (another shape, another encoding, not JSON) never stop the
watchdog, the controller or `status`: each is set aside as `<name>.corrupt-<time>` for a person to
look at, an alert event says so, and the reader goes on from a clean state."""

from __future__ import annotations

import json
from concurrent.futures import Future

import httpx
import pytest

from spark_cluster.config import load_config
from spark_cluster.observation import VLLMObs
from spark_cluster.status import status
from spark_cluster.watchdog import Watchdog

from .conftest import SIM_CONFIG
from .fakes import FakeCluster, fake_nodes
from .gateway_rig import TOKEN, rig_cfg, serving_controller
from .fake_engine import FakeEngine

SHAPES = [b"[]", b"null", b'{"decision": []}', b'{"decision": {"restarts": "abc"}}', b'{"decision": {"since": "yesterday"}}',
          b"not json", b'{"decision": {"phase": "healthy"}, "state": "\xff\xfe"}']


def alerts(state_dir) -> list[str]:
    lines = (state_dir / "events.jsonl").read_text().splitlines() if (state_dir / "events.jsonl").exists() else []
    return [e["reason"] for e in map(json.loads, lines) if e["event"] == "alert"]


def set_aside(state_dir, name: str) -> list:
    return sorted(state_dir.glob(f"{name}.corrupt-*"))


@pytest.mark.parametrize("content", SHAPES)
def test_the_watchdog_starts_afresh_beside_a_state_file_it_cannot_read(tmp_path, content):
    (tmp_path / "watchdog.json").write_bytes(content)
    events: list[dict] = []
    wd = Watchdog(load_config(SIM_CONFIG).model_copy(update={"state_dir": str(tmp_path)}), None, clock=lambda: 5.0, on_event=events.append)
    try:
        assert (wd.state.phase, wd.state.since) == ("starting", 5.0)
        wd.save_state()
    finally:
        wd.close()
    [kept] = set_aside(tmp_path, "watchdog.json")
    assert kept.read_bytes() == content  # kept as it was, for a person to look at
    [alert] = alerts(tmp_path)
    assert "watchdog.json" in alert and kept.name in alert and [e["event"] for e in events] == ["alert"]
    assert json.loads((tmp_path / "watchdog.json").read_text())["state"] == "starting"  # a clean one written


def engine_sample(cfg) -> Future:
    engine = Future()
    engine.set_result(VLLMObs(endpoint=cfg.endpoint(), health=200, models=[cfg.model.name], running=0, waiting=0,
                              steps_total=5, generation_tokens_total=5, prompt_tokens_total=5, window_s=0.5, progressed=False))
    return engine


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


def test_status_goes_on_beside_state_files_it_cannot_read_and_leaves_them(tmp_path):
    cfg = load_config(SIM_CONFIG).model_copy(update={"state_dir": str(tmp_path)})
    (tmp_path / "watchdog.json").write_bytes(b'{"decision": {"restarts": "abc"}}')
    (tmp_path / "vllm.json").write_bytes(b'{"checks": "x"}')
    before = snapshot(tmp_path)
    report = status(cfg, fake_nodes(FakeCluster(cfg).serving()), vllm=engine_sample(cfg))
    assert report.verdict == "serving" and report.observation.watchdog is None
    assert snapshot(tmp_path) == before  # status only reads: the watchdog or up set such files aside


def test_status_writes_nothing_to_state_dir(tmp_path):
    """The read-only `status` wrote progress.json (and set unreadable files aside): now not a file nor an mtime changes."""
    cfg = load_config(SIM_CONFIG).model_copy(update={"state_dir": str(tmp_path / "state")})
    cluster = FakeCluster(cfg).serving()
    wd = Watchdog(cfg, fake_nodes(cluster), clock=lambda: 1_800_000_000.0, http=httpx.Client(transport=httpx.MockTransport(
        lambda r: httpx.Response(200, text="vllm:num_requests_running 0\n"))))
    try:
        wd.step()  # the folder as a watchdog leaves it: watchdog.json, events.jsonl
    finally:
        wd.close()
    before = snapshot(tmp_path)
    assert {"state", "state/watchdog.json", "state/events.jsonl"} <= set(before)
    for _ in range(2):
        status(cfg, fake_nodes(cluster), vllm=engine_sample(cfg))
    assert snapshot(tmp_path) == before


def test_the_controller_starts_beside_unreadable_events_and_state(tmp_path):
    engine = FakeEngine().start()
    cfg = rig_cfg(tmp_path, engine.url)
    state = cfg.resolved_state_dir()
    state.mkdir(parents=True)
    (state / "events.jsonl").write_bytes(b'{"ts": "2026-12-01T00:00:00Z", "event": "watch-start"}\n\xff\xfe not utf-8\n[]\n')
    ctl, served = serving_controller(cfg)
    served.start()
    try:
        assert httpx.get(f"{served.url}/healthz").status_code == 200
        events = httpx.get(f"{served.url}/api/events", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert events[0]["event"] == "watch-start" and any("events.jsonl" in e.get("reason", "") for e in events)
    finally:
        served.stop()
        engine.stop()
    assert len(set_aside(state, "events.jsonl")) == 1
