"""Two groups behind one gateway (cluster.yaml groups), each a fake engine on a loopback address of
its own, each with a scripted watchdog: requests spread over the groups that serve, a hang in one
costs clients nothing but that group's open streams, and a conversation stays where its prefix is."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from spark_cluster.door import Door
from spark_cluster.gateway import Flight, Member, to_move
from spark_cluster.metrics import sample_value

from .fake_engine import FakeEngine, free_port
from .gateway_rig import TOKEN, gateway_url, groups_cfg, serving_controller, sse_texts


@pytest.fixture
def two(tmp_path, request):
    port = free_port()
    engines = {"a": FakeEngine(port, "127.0.0.1").start(), "b": FakeEngine(port, "127.0.0.2").start()}
    ctl, served = serving_controller(groups_cfg(tmp_path, port, **getattr(request, "param", {})))
    served.start()
    try:
        for wd in ctl.wds.values():
            wd.emit("state", state="healthy")
        time.sleep(0.05)
        yield ctl, served, engines
    finally:
        served.stop()
        for e in engines.values():
            e.stop()


def emit(ctl, group: str, kind: str, **data) -> None:
    ctl.wds[group].emit(kind, **data)
    time.sleep(0.05)  # the event crosses into the controller's loop


def post(url: str, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


def until(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        time.sleep(0.01)


def at_once(n: int, fn) -> list:
    out: list = [None] * n
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_requests_spread_over_the_groups_by_what_each_has_in_flight(two):
    ctl, served, engines = two
    for e in engines.values():
        e.script.chunk_delay_s = 0.1  # each answer takes 0.5 s: eight at once are in flight together
    answers = at_once(8, lambda i: post(gateway_url(ctl), {"prompt": f"p{i}"}))
    assert [r.status_code for r in answers] == [200] * 8
    assert (engines["a"].script.calls, engines["b"].script.calls) == (4, 4)
    metrics = httpx.get(f"{served.url}/metrics").text
    assert sample_value(metrics, "spark_cluster_gateway_routed_total", group="a", how="least") == 4
    assert sample_value(metrics, "spark_cluster_state", group="b", spark_cluster_state="healthy") == 1


def test_a_hang_in_one_group_continues_its_streams_on_the_other_at_once_and_new_requests_go_there(two):
    """Streams the gateway can continue (a completion with its prompt) are: a's two go on on b from
    the token where a stopped (the fake's ids depend on their context alone: an uncut stream's)."""
    from .fake_engine import id_text, next_id

    ctl, served, engines = two
    for e in engines.values():  # streams of 2 s; token-id streams end with the context, as vLLM's without max_tokens
        e.script.chunks, e.script.chunk_delay_s, e.script.max_model_len = 40, 0.05, 42
    url = gateway_url(ctl)
    streams: dict[int, list[str]] = {}

    def stream(i: int) -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": f"s{i}", "stream": True}, timeout=30) as r:
            streams[i] = sse_texts(r.iter_lines())

    def uncut(prompt: str) -> str:
        context = list(prompt.encode())
        for _ in range(40):
            context.append(next_id(context))
        return "".join(id_text(t) for t in context[len(prompt):])

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert (engines["a"].script.running, engines["b"].script.running) == (2, 2)
    emit(ctl, "a", "decision", action="restart", reason="hang confirmed: no progress for 20s under load")
    t0 = time.monotonic()
    answers = at_once(4, lambda i: post(url, {"prompt": f"n{i}"}))
    took = time.monotonic() - t0
    for t in threads:
        t.join()
    assert [r.status_code for r in answers] == [200] * 4 and took < 3  # each answer takes 2 s: none was held
    assert sample_value(httpx.get(f"{served.url}/metrics").text, "spark_cluster_gateway_requests_total", outcome="held") == 0
    for i, texts in streams.items():  # every stream whole, a's continued on b without a token repeated or missing
        assert "".join(json.loads(e)["choices"][0]["text"] for e in texts) == uncut(f"s{i}"), i
    assert engines["a"].script.calls == 2 and engines["b"].script.calls == 8  # b: its 2 streams, a's 2 continued, 4 new
    metrics = httpx.get(f"{served.url}/metrics").text
    assert sample_value(metrics, "spark_cluster_gateway_streams_continued_total", group="b", how="other_group") == 2
    emit(ctl, "a", "restart-done", seconds=1.0)
    answers = at_once(4, lambda i: post(url, {"prompt": f"m{i}"}))
    assert [r.status_code for r in answers] == [200] * 4 and engines["a"].script.calls > 2  # a serves again


def test_a_hang_in_one_group_ends_only_its_streams_that_cannot_be_continued(two):
    ctl, served, engines = two
    for e in engines.values():
        e.script.chunks, e.script.chunk_delay_s = 40, 0.05
    url = gateway_url(ctl)
    streams: dict[int, list[str]] = {}

    def stream(i: int) -> None:  # two choices: not continued
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": f"s{i}", "stream": True, "n": 2}, timeout=30) as r:
            streams[i] = sse_texts(r.iter_lines())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    emit(ctl, "a", "decision", action="restart", reason="hang confirmed: no progress for 20s under load")
    for t in threads:
        t.join()
    cut = [texts for texts in streams.values() if "engine_unavailable" in texts[-1]]
    whole = [texts for texts in streams.values() if texts[-1] == '{"id": "cmpl-fake", "choices": [{"index": 0, "text": "t39"}]}']
    assert len(cut) == 2 and len(whole) == 2  # a's two streams cut, b's two whole
    assert sample_value(httpx.get(f"{served.url}/metrics").text, "spark_cluster_gateway_streams_not_continued_total", reason="choices") == 2


def test_a_request_one_group_refuses_before_its_first_byte_goes_to_the_other_at_once(two):
    ctl, served, engines = two
    engines["a"].stop()  # refused connections, and its watchdog has not noticed yet: its door is open
    engines["b"].script.chunks, engines["b"].script.chunk_delay_s = 60, 0.05
    busy = [threading.Thread(target=post, args=(gateway_url(ctl), {"prompt": f"long{i}"})) for i in range(2)]
    for t in busy:  # b has more in flight than a: the least loaded is a, again and again, unless a is not tried twice
        t.start()
    time.sleep(0.5)
    engines["b"].script.chunks = 1
    t0 = time.monotonic()
    answers = [post(gateway_url(ctl), {"prompt": f"p{i}"}) for i in range(4)]
    assert [r.status_code for r in answers] == [200] * 4 and time.monotonic() - t0 < 2
    for t in busy:
        t.join()
    assert engines["b"].script.calls == 6
    assert sample_value(httpx.get(f"{served.url}/metrics").text, "spark_cluster_gateway_requests_total", outcome="retried") >= 1


def test_a_suspect_group_gets_no_new_request_while_another_serves_and_nothing_waits_while_one_does(two):
    ctl, served, engines = two
    emit(ctl, "a", "state", state="suspect", reason="no progress for 5s")
    assert [post(gateway_url(ctl), {"prompt": f"p{i}"}).status_code for i in range(3)] == [200] * 3
    assert (engines["a"].script.calls, engines["b"].script.calls) == (0, 3)
    emit(ctl, "b", "state", state="restarting")
    assert post(gateway_url(ctl), {"prompt": "q"}).status_code == 200 and engines["a"].script.calls == 1  # suspect, but it serves
    emit(ctl, "a", "state", state="restarting")
    r = httpx.get(f"{served.url}/healthz").json()
    assert r["gateway"]["door"] == "hold" and r["groups"]["a"]["door"] == "hold"


@pytest.mark.parametrize("other_door, started, tried, moves", [
    (Door("open"), False, frozenset(), True),
    (Door("open"), True, frozenset(), False),  # a started answer cannot move
    (Door("open", suspect=True), False, frozenset(), False),  # no group serves undoubted
    (Door("hold", "restarting"), False, frozenset(), False),
    (Door("open"), False, frozenset({"b"}), False),  # it went to b already
])
def test_what_leaves_a_group_turning_suspect(other_door, started, tried, moves):
    a, b = Member("a", None), Member("b", None, door=other_door)
    a.door = Door("open", suspect=True)
    f = Flight(started=started, tried=tried)
    a.flights.add(f)
    assert to_move(a, [a, b]) == ([f] if moves else [])


def test_requests_unanswered_on_a_group_turning_suspect_go_to_one_that_serves_and_its_started_streams_stay(two):
    ctl, served, engines = two
    url = gateway_url(ctl)
    engines["a"].script.chunks, engines["a"].script.chunk_delay_s = 50, 0.02
    emit(ctl, "b", "state", state="restarting")  # everything goes to a for now
    texts: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "s", "stream": True}, timeout=30) as r:
            texts.extend(sse_texts(r.iter_lines()))

    streaming = threading.Thread(target=stream)
    streaming.start()
    until(lambda: engines["a"].script.running == 1, "the stream's first event")
    engines["a"].script.hang = True  # a stops in the middle of the stream: its frozen rank
    answers: list = []
    plain = threading.Thread(target=lambda: answers.extend(at_once(2, lambda i: post(url, {"prompt": f"p{i}"}))))
    plain.start()
    until(lambda: engines["a"].script.calls == 3, "two requests on a")
    emit(ctl, "b", "state", state="healthy")
    time.sleep(0.3)
    assert engines["b"].script.calls == 0 and not answers  # they wait on a: nothing moves them while a is not doubted
    t0 = time.monotonic()
    emit(ctl, "a", "state", state="suspect", reason="no progress for 4s with 3 request(s) in flight")
    plain.join(timeout=10)
    assert [r.status_code for r in answers] == [200, 200] and time.monotonic() - t0 < 2
    assert engines["b"].script.calls == 2
    assert sample_value(httpx.get(f"{served.url}/metrics").text, "spark_cluster_gateway_requests_total", outcome="retried") == 2
    assert streaming.is_alive() and engines["a"].script.abandoned == 0  # the stream that had started stays: the doubt may pass
    engines["a"].script.hang = False
    streaming.join(timeout=10)
    assert len(texts) == 50 and json.loads(texts[-1])["choices"][0]["finish_reason"] == "length"  # whole, from a


def test_a_request_moves_off_a_doubted_group_once_so_two_doubted_groups_never_pass_it_between_them(two):
    ctl, served, engines = two
    for e in engines.values():
        e.script.hang = True
    answer: list = []
    asking = threading.Thread(target=lambda: answer.append(post(gateway_url(ctl), {"prompt": "p"})))
    asking.start()
    until(lambda: sum(e.script.calls for e in engines.values()) == 1, "the request on a group")
    first = next(g for g, e in engines.items() if e.script.calls == 1)
    other = "b" if first == "a" else "a"
    emit(ctl, first, "state", state="suspect", reason="no progress")
    until(lambda: engines[other].script.calls == 1, "the request moved to the group that serves undoubted")
    emit(ctl, other, "state", state="suspect", reason="no progress")
    emit(ctl, first, "state", state="healthy")
    emit(ctl, other, "state", state="healthy")
    emit(ctl, other, "state", state="suspect", reason="no progress")  # doubted again: the request tried `first` already
    time.sleep(0.2)
    assert (engines[first].script.calls, engines[other].script.calls) == (1, 1) and not answer
    engines[other].script.hang = False
    asking.join(timeout=10)
    assert answer[0].status_code == 200


def chat_turns(conversation: int, turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You answer questions about DGX Sparks, briefly. " * 4}]
    out = []
    for t in range(turns):
        messages = messages + [{"role": "user", "content": f"Conversation {conversation}, question {t}: " + "why? " * 30}]
        out.append({"model": "tiny-qwen3", "messages": list(messages)})
        messages = messages + [{"role": "assistant", "content": "Because. " * 20}]
    return out


def test_each_conversation_stays_on_one_group(two):
    ctl, served, engines = two
    for c in range(6):
        for body in chat_turns(c, 4):
            assert httpx.post(f"{gateway_url(ctl)}/v1/chat/completions", json=body, timeout=30).status_code == 200
    where: dict[int, set[str]] = {}
    for name, e in engines.items():
        for r in e.script.received:
            conversation = int(json.loads(r["body"])["messages"][1]["content"].split(",")[0].split()[1])
            where.setdefault(conversation, set()).add(name)
    assert all(len(groups) == 1 for groups in where.values()), where
    # the conversations are spread: a new one shares only the system prompt with the others (a third of its
    # text), too little to follow
    assert {g for groups in where.values() for g in groups} == {"a", "b"}
    metrics = httpx.get(f"{served.url}/metrics").text
    hits = sum(sample_value(metrics, "spark_cluster_gateway_routed_total", group=g, how="affinity") for g in "ab")
    assert hits == 6 * 3  # every turn after the first


@pytest.mark.parametrize("two", [{"prefix_affinity": False}], indirect=True)
def test_without_prefix_affinity_a_conversation_is_spread(two):
    ctl, served, engines = two
    for body in chat_turns(0, 4):
        assert httpx.post(f"{gateway_url(ctl)}/v1/chat/completions", json=body, timeout=30).status_code == 200
    assert (engines["a"].script.calls, engines["b"].script.calls) == (2, 2)


# ---- a rolling change -----------------------------------------------------------------------------
class RecreatedEngine:
    """Stands in for rollout's Executor: `pending` says the group changes, `up` takes its fake engine
    away for a while and brings it back (as a recreated group), recording when."""

    def __init__(self, engines, log):
        self.engines, self.log = engines, log

    def __call__(self, group, nodes, report):
        self.label = group.name.split("-")[-1]
        return self

    def pending(self):
        from spark_cluster.reconcile import Reconciliation

        return Reconciliation(why="the config changed", start=[object()])

    def up(self):
        from spark_cluster.executor import UpResult

        old = self.engines[self.label]
        self.log.append((self.label, "up", time.monotonic(), old.script.running))
        old.stop()
        time.sleep(0.5)
        self.engines[self.label] = FakeEngine(old.port, old.served.server.config.host).start()
        self.log.append((self.label, "done", time.monotonic(), 0))
        return UpResult(changed=True, recreated=[f"{self.label}-head"], total_s=0.5)


class NoNodes:
    def __init__(self, cfg):
        pass

    def close(self):
        pass


def load(url: str, stop: threading.Event, results: list, stream: bool) -> None:
    while not stop.is_set():
        try:
            if stream:
                with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "s", "stream": True}, timeout=30) as r:
                    texts = sse_texts(r.iter_lines())
                results.append("cut" if any("engine_unavailable" in t for t in texts) else r.status_code)
            else:
                results.append(post(url, {"prompt": "p"}).status_code)
        except httpx.HTTPError as exc:
            results.append(type(exc).__name__)


@pytest.mark.parametrize("two", [{"drain_s": 5}], indirect=True)
def test_a_rolling_change_recreates_one_group_after_the_other_and_no_request_fails(two, monkeypatch, tmp_path):
    from spark_cluster import controller_client, rollout
    from spark_cluster.config import parse_config

    ctl, served, engines = two
    for e in engines.values():
        e.script.chunks, e.script.chunk_delay_s = 6, 0.05
    log: list = []
    monkeypatch.setattr(rollout, "Executor", RecreatedEngine(engines, log))
    monkeypatch.setattr(rollout, "Nodes", NoNodes)
    monkeypatch.setenv("SPARK_CLUSTER_TEST_TOKEN", "tok-rollout-1")
    ctl.token = "tok-rollout-1"
    new = ctl.cfg.model_dump()
    new["vllm"]["extra_args"] = ["--max-num-seqs", "64"]
    new["controller"] = {"port": served.port}
    new["api"] = {"token_env": "SPARK_CLUSTER_TEST_TOKEN"}
    import yaml

    text = yaml.safe_dump(new)
    stop, results = threading.Event(), []
    clients = [threading.Thread(target=load, args=(gateway_url(ctl), stop, results, i % 2 == 0)) for i in range(4)]
    for t in clients:
        t.start()
    time.sleep(0.5)
    said: list = []
    try:
        assert controller_client.through_controller(parse_config(text), text, said.append) is True
    finally:
        time.sleep(0.5)
        stop.set()
        for t in clients:
            t.join()
    kinds = [(e["event"], e.get("group")) for e in said if e["event"].startswith("roll-")]
    assert kinds == [("roll-group", "a"), ("roll-drain", "a"), ("roll-drained", "a"), ("roll-done", "a"),
                     ("roll-group", "b"), ("roll-drain", "b"), ("roll-drained", "b"), ("roll-done", "b")]
    assert [e["cut"] for e in said if e["event"] == "roll-drained"] == [0, 0]
    (a_up, a_done), (b_up, b_done) = [(log[i][2], log[i + 1][2]) for i in (0, 2)]
    assert [x[:2] for x in log] == [("a", "up"), ("a", "done"), ("b", "up"), ("b", "done")] and a_done <= b_up
    assert [x[3] for x in log if x[1] == "up"] == [0, 0]  # nothing in flight when its group went away
    assert len(results) > 20 and set(results) == {200}, results
    metrics = httpx.get(f"{served.url}/metrics").text
    assert sample_value(metrics, "spark_cluster_gateway_requests_total", outcome="retried") == 0  # none met a vanished engine
    assert ctl.cfg.vllm.extra_args == ["--max-num-seqs", "64"]
    assert [e["event"] for e in ctl.events if e.get("group") == "b"][-1] == "roll-done"
    for label, group in ctl.groups.items():  # kept where the group's watchdog writes, for after a restart of the controller
        kept = [json.loads(line) for line in (group.resolved_state_dir() / "events.jsonl").read_text().splitlines()]
        assert [(e["event"], e["cluster"]) for e in kept if e["event"].startswith("roll-")] == [
            (k, group.name) for k in ("roll-group", "roll-drain", "roll-drained", "roll-done")]


@pytest.mark.parametrize("two", [{"drain_s": 0.5}], indirect=True)
def test_streams_still_open_past_the_drain_timeout_are_continued_on_the_other_group(two, monkeypatch):
    from spark_cluster import rollout

    ctl, served, engines = two
    for e in engines.values():  # 5 s streams on a, ended by their context as vLLM's without max_tokens
        e.script.chunks, e.script.chunk_delay_s, e.script.max_model_len = 100, 0.05, 101
    b = engines["b"]
    b.script.chunk_delay_s = 0  # what b continues ends before b is drained (and recreated) in turn
    log: list = []
    monkeypatch.setattr(rollout, "Executor", RecreatedEngine(engines, log))
    monkeypatch.setattr(rollout, "Nodes", NoNodes)
    got: list = []
    stream = threading.Thread(target=lambda: got.append(_one_stream(gateway_url(ctl))))
    stream.start()
    time.sleep(0.3)
    assert engines["a"].script.running == 1
    said: list = []
    import asyncio

    ok = asyncio.run_coroutine_threadsafe(ctl.roll_out(ctl.cfg, said.append), ctl.loop).result(30)
    stream.join()
    assert ok and [e["cut"] for e in said if e["event"] == "roll-drained"] == [1, 0]
    assert got == [200] and b.script.prompts[0][:1] == list(b"s") and len(b.script.prompts[0]) > 1  # continued from a's tokens
    assert sample_value(httpx.get(f"{served.url}/metrics").text, "spark_cluster_gateway_streams_continued_total", group="b",
                        how="other_group") == 1


def _one_stream(url: str):
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "s", "stream": True}, timeout=30) as r:
        texts = sse_texts(r.iter_lines())
    return "cut" if any("engine_unavailable" in t for t in texts) else r.status_code


def test_a_group_whose_api_server_moved_in_a_rolling_change_is_reached_at_its_new_address():
    import asyncio

    from spark_cluster.door import Door
    from spark_cluster.gateway import Gateway
    from spark_cluster.serving_settings import GatewaySettings

    async def run():
        gw = Gateway({"a": "http://127.0.0.1:8000", "b": "http://127.0.0.2:8000"}, GatewaySettings())
        gw.set_door(Door("open", ""))
        gw.drain("a", "rolling")
        assert gw.door.mode == "open" and gw.members["a"].door.mode == "hold"
        gw.on_event({"event": "state", "state": "healthy"}, "a")  # its watchdog's word does not reopen it meanwhile
        assert gw.members["a"].door.mode == "hold"
        await gw.undrain("a", Door("open", ""), "http://127.0.0.1:8001")
        assert gw.members["a"].engine.url == "http://127.0.0.1:8001" and gw.members["a"].door.mode == "open"
        await gw.aclose()

    asyncio.run(run())


@pytest.mark.browser
def test_the_status_page_shows_every_group(two):
    from .browser import Browser

    ctl, served, engines = two
    for label, wd in ctl.wds.items():  # 20 and 50 tokens/s
        for t in (2.0, 3.0):
            wd.samples.append({"t": t, "health": 200, "running": 1, "waiting": 0, "prompt_tokens_total": 10.0, "steps_total": 40.0,
                               "generation_tokens_total": 40.0 + (t - 1) * (20.0 if label == "a" else 50.0)})
    from spark_cluster.decide import State

    ctl.wds["b"].state = State(phase="suspect", since=time.time())
    emit(ctl, "b", "state", state="suspect", reason="no progress for 5s")
    from spark_cluster.speed import SpeedState

    slow = "decode 94 ms a token over the last 20s, +49% against the fastest other group's 63 ms; spark-1 GPU: 84 °C"
    ctl.speed.states["a"] = SpeedState(slow=True, reason=slow, share=0.67)
    with Browser() as browser:
        page = browser.page()
        page.goto(served.url + "/")
        page.log_in(TOKEN)
        page.wait("(document.body.dataset.loaded || '').split(' ').length >= 3", 60, "status, samples and events")
        rows = page.eval("[...document.querySelectorAll('#nodes tbody tr')].map(r => r.cells[0].textContent + ' ' + r.cells[1].textContent)")
        assert rows == ["a sim-1", "a sim-2", "b sim-3", "b sim-4"]
        assert page.eval("getComputedStyle(document.querySelector('#nodes th.g')).display") == "table-cell"
        groups = page.eval("[...document.querySelectorAll('.group-vllm')].map(d => d.textContent)")
        assert len(groups) == 2 and "group a · watchdog healthy · door open" in groups[0] and "group b · watchdog suspect" in groups[1]
        verdicts = page.eval("[...document.querySelectorAll('.slow-verdict')].map(d => d.textContent)")
        assert verdicts == [f"slow {slow}"]  # a's, under a's engine
        assert page.eval("document.querySelectorAll('#throughput polyline').length") == 2
        assert "a 20.0, b 50.0" in page.eval("document.getElementById('throughput-label').textContent")
        assert page.eval("document.getElementById('verdict').textContent") == "down"  # nothing answers SSH on these nodes
        assert not page.console, page.console


def test_a_change_no_container_sees_gives_each_group_a_watchdog_of_the_new_config_and_drains_nothing(two, monkeypatch):
    import asyncio

    from spark_cluster import rollout
    from spark_cluster.reconcile import Reconciliation

    ctl, served, engines = two

    class Unchanged(RecreatedEngine):
        def pending(self):
            return Reconciliation(why="")

    monkeypatch.setattr(rollout, "Executor", Unchanged(engines, []))
    monkeypatch.setattr(rollout, "Nodes", NoNodes)
    before = dict(ctl.wds)
    new = ctl.cfg.model_copy(update={"watchdog": ctl.cfg.watchdog.model_copy(update={"period_s": 7.0})})
    said: list = []
    assert asyncio.run_coroutine_threadsafe(ctl.roll_out(new, said.append), ctl.loop).result(30)
    assert [e["event"] for e in said] == ["roll-group", "roll-skip", "roll-group", "roll-skip"]
    assert all(ctl.wds[g] is not before[g] and ctl.groups[g].watchdog.period_s == 7.0 for g in "ab")
    assert ctl.cfg.watchdog.period_s == 7.0 and all(m.door.mode == "open" for m in ctl.gateway.members.values())


def test_a_group_that_fails_its_rolling_change_stops_it_and_keeps_a_watchdog(two, monkeypatch):
    import asyncio

    from spark_cluster import rollout
    from spark_cluster.errors import PreflightError

    ctl, served, engines = two

    class Failing(RecreatedEngine):
        def up(self):
            raise PreflightError(["sim-1: docker does not answer"])

    monkeypatch.setattr(rollout, "Executor", Failing(engines, []))
    monkeypatch.setattr(rollout, "Nodes", NoNodes)
    before = dict(ctl.wds)
    said: list = []
    assert not asyncio.run_coroutine_threadsafe(ctl.roll_out(ctl.cfg, said.append), ctl.loop).result(30)
    assert [e["event"] for e in said] == ["roll-group", "roll-drain", "roll-drained", "roll-failed"]
    assert "docker does not answer" in said[-1]["error"]
    assert ctl.wds["a"] is not before["a"] and ctl.threads["a"].is_alive() and ctl.wds["b"] is before["b"]
    assert ctl.gateway.members["a"].door.mode == "hold" and not ctl.gateway.members["a"].draining
    assert post(gateway_url(ctl), {"prompt": "p"}).status_code == 200 and engines["b"].script.calls == 1  # b serves on


def test_a_controller_that_answers_the_change_with_something_not_an_event_is_a_clear_error(tmp_path):
    """`up`'s side of a rolling change: a line that is not an event (a proxy's page, a cut line) ends
    it with RolloutFailed, not a traceback; the events before it were reported."""
    import http.server

    import yaml

    from spark_cluster import controller_client
    from spark_cluster.config import parse_config
    from spark_cluster.errors import RolloutFailed

    name = groups_cfg(tmp_path, free_port()).name

    class Garbled(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # /healthz: this cluster's controller
            self._send(json.dumps({"cluster": name}).encode())

        def do_POST(self):  # /api/rollout: one event, then a proxy's page
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(b'{"event": "roll-group", "group": "a"}\n<html>502 Bad Gateway</html>\n')

        def _send(self, body: bytes):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Garbled)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        data = groups_cfg(tmp_path, free_port()).model_dump()
        data["controller"] = {"host": "127.0.0.1", "port": server.server_address[1]}
        text = yaml.safe_dump(data)
        said: list = []
        with pytest.raises(RolloutFailed, match="not an event"):
            controller_client.through_controller(parse_config(text), text, said.append)
        assert said == [{"event": "roll-group", "group": "a"}]
    finally:
        server.shutdown()
        server.server_close()


def test_deeply_nested_input_is_a_clear_answer_never_a_500(two):
    """The attack: with two groups, deeply nested JSON gave 500 and a traceback (routing read the body);
    deeply nested YAML in a rollout gave 500."""
    ctl, served, engines = two
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(f"{gateway_url(ctl)}/v1/chat/completions", content=deep, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400  # the engine's own answer to what it cannot read (the fake's: invalid JSON)
    r = httpx.post(f"{served.url}/api/rollout", content=b"a: " + b"[" * 100_000, timeout=30,
                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/yaml"})
    assert r.status_code == 422 and "nested too deeply" in r.json()["detail"]
