"""`up` and `down` against the simulated cluster: real SSH, real Docker, real Ray, real vLLM."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import httpx
import pytest
import yaml

from spark_cluster.config import parse_config
from spark_cluster.errors import LockedError, PreflightError, StepError
from spark_cluster.executor import Executor
from spark_cluster.reconcile import member_name
from spark_cluster.plan import build_plan
from spark_cluster.sim import cluster
from spark_cluster.status import status
from spark_cluster.transport import HostKeyError, Nodes

from .conftest import (ROOT, SIM_CONFIG, SIM_CONFIGS, freeze, generation, group_containers, leftovers, own_state, run_cli,
                       sim_docker, sim_variant, worker_container)
from .cluster_helpers import Controlled, containers, stream_load
from .monitoring import query, wait_for, watched

pytestmark = pytest.mark.cluster


RECORD = ROOT / "tests" / "data" / "observations"


def record(name: str, rep) -> None:
    """Keep real observations for the verdict's table-driven tests (RECORD_OBSERVATIONS=1)."""
    import os

    if rep.observation.executor != "native":
        name = f"{name}-{rep.observation.executor}"
    if os.environ.get("RECORD_OBSERVATIONS"):
        RECORD.mkdir(parents=True, exist_ok=True)
        # no verdict kept: the case's name says what the cluster was made to show (its first word)
        (RECORD / f"{name}.json").write_text(json.dumps({"case": name, "observation": rep.observation.model_dump()}, indent=1) + "\n")


def members(cfg) -> list[str]:
    """The group's containers and hosted processes in start order, as `up` names them."""
    return [member_name(s) for s in build_plan(cfg).steps if s.kind in ("start", "exec")]


def test_up_serves_idempotently_status_tells_serving_stalled_down_and_down_cleans(sim, engine_cfg, tmp_path):
    """One engine's life on each executor (one engine start, where two tests took two): `up` from
    nothing, `up` again keeps every member; `status` says serving (idle, then loaded), stalled (a
    paused worker, /health 200), down (the worker stopped); `down` removes everything, saving the logs.
    While the worker is paused, what the operator gets: a notification, the hang alert of a real Prometheus
    through a real Alertmanager, every dashboard panel evaluated."""
    cfg = engine_cfg
    (cfg.resolved_state_dir() / "vllm.json").unlink(missing_ok=True)  # the image's vLLM check runs afresh
    events: list[dict] = []
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).down()
        first = Executor(cfg, nodes, events.append).up()
    assert first.changed and first.recreated == members(cfg)
    assert first.recreated == {"ray": ["spark-ray-worker@sim-2", "spark-ray-head@sim-1", "spark-ray-head/vllm@sim-1"],
                               "native": ["spark-vllm-worker@sim-2", "spark-vllm@sim-1"]}[cfg.executor]
    flags = [e for e in events if e.get("step") == "preflight/sim-1/vllm-flags" and e["event"] != "step-start"]
    assert [(e["event"], e.get("vllm_version")) for e in flags] == [("step-ok", "0.32.0")]

    from openai import OpenAI  # here: importing it takes a second of every pytest worker's collection

    client = OpenAI(base_url=f"{cfg.endpoint()}/v1", api_key="none", timeout=120)
    reply = client.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    msg = reply.choices[0].message
    text = msg.content or (msg.model_extra or {}).get("reasoning") or ""
    assert isinstance(text, str) and text.strip()
    if cfg.executor == "ray":  # Ray's own listing: one vLLM rank (actor) on each node, one placement group
        ray = generation(cfg)["ray"]
        assert sorted(a.ip for a in ray.actors) == ["10.99.0.11", "10.99.0.12"]
        assert [sorted(b.ip for b in pg.bundles) for pg in ray.engine_placement_groups()] == [["10.99.0.11", "10.99.0.12"]]

    ids = containers(cfg)
    events.clear()
    with Nodes(cfg) as nodes:
        again = Executor(cfg, nodes, events.append).up()
    assert not again.changed and again.recreated == [] and again.kept == members(cfg)
    flags = [e for e in events if e.get("step") == "preflight/sim-1/vllm-flags"]
    assert [e["event"] for e in flags] == ["step-skip"] and "same image ID and flags" in flags[0]["reason"]
    assert containers(cfg) == ids  # same container IDs: nothing recreated

    url, worker = cfg.endpoint(), worker_container(cfg)
    with Nodes(cfg) as nodes:
        rep = status(cfg, nodes)
        record("serving-idle", rep)
        assert rep.verdict == "serving", rep.reason
        assert {c.name for n in rep.observation.nodes for c in n.containers} == group_containers(cfg)
        assert rep.observation.nodes[0].sysctl == {"vm.swappiness": {"expected": "1", "actual": "1"}}
        if cfg.executor == "ray":  # Ray with both nodes alive, and the engine's placement group across them
            ray = rep.observation.ray
            assert ray.alive == ["10.99.0.11", "10.99.0.12"] and ray.error is None and ray.actors == 2
            assert [n.resources.get("vllm_cpu") for n in ray.nodes] == [1.0, 1.0]
            assert [sorted(b.ip for b in pg.bundles) for pg in ray.placement_groups] == [["10.99.0.11", "10.99.0.12"]]
            assert [(p.name, p.state) for p in rep.observation.nodes[0].processes] == [("vllm", "running")]

        stop = threading.Event()
        threads = stream_load(url, 4, stop)
        try:
            deadline = time.monotonic() + 60
            while True:
                rep = status(cfg, nodes)
                if (rep.observation.vllm.running or 0) > 0 and rep.observation.vllm.generation_tok_s:
                    break
                assert time.monotonic() < deadline, "load never showed up in the metrics"
            record("serving-busy", rep)
            assert rep.verdict == "serving", rep.reason

            # the operator's view: a controller that only observes (the watchdog's restart is tested elsewhere), its
            # notifications, a real Prometheus scraping it with the shipped alert rules, a real Alertmanager
            observer = cfg.model_copy(update={"state_dir": str(tmp_path / "state"), "watchdog": cfg.watchdog.model_copy(update={"enabled": False})})
            with watched(observer, tmp_path / "monitoring") as w:
                w.ctl.wait_for(lambda e: e["event"] == "state" and e["state"] == "healthy", 60, "healthy state")
                wait_for("the engine's decode time measured and scraped",  # the slow verdict's measure: a few periods of load
                         lambda: query(w.prom, "spark_cluster_group_decode_seconds_per_token"), 60)
                freeze("sim-2", worker)
                try:
                    rep = status(cfg, nodes)
                    record("stalled-paused-worker", rep)
                    assert rep.verdict == "stalled", rep.reason
                    assert rep.observation.vllm.health == 200
                    assert rep.observation.vllm.steps_in_window == 0 and rep.observation.vllm.running > 0
                    assert "sim-2" in rep.reason
                    decided = w.ctl.wait_for(lambda e: e["event"] == "decision" and e["action"] == "alert", 60, "the hang confirmed")
                    assert "hang confirmed" in decided["reason"]
                    alert, = wait_for("the hang alert through Alertmanager", lambda: w.fired("SparkClusterHangConfirmed"), 30)
                    needed = "a restart is needed (watchdog.enabled: false)"
                    note = wait_for("the operator's notification", lambda: [b for b in w.notes.wait_for(1, timeout=0) if b["title"].endswith(needed)], 30)[0]
                    errors, empty = w.panels(cfg.name)
                finally:
                    sim_docker("sim-2", "unpause", worker)
            print(f"{cfg.executor}: hang confirmed at {decided['ts']}; notified: {note['title']}; alert: {alert['labels']}")
            assert alert["labels"]["group"] == cfg.name and alert["labels"]["severity"] == "critical"
            assert "hang confirmed" in note["message"]
            # every panel evaluates; those of a restart have nothing to show (none happened), of a slow verdict neither
            assert not errors, errors
            assert [x.split(":")[0] for x in empty] == ["Last restart"] * 3, empty
            rep = status(cfg, nodes)
            assert rep.verdict == "serving", rep.reason
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)

        sim_docker("sim-2", "stop", "-t", "1", worker)
        rep = status(cfg, nodes)
        record("down-worker-stopped", rep)
        assert rep.verdict == "down"
        assert f"{worker} on sim-2 is exited" in rep.reason
        logs = Executor(cfg, nodes).down()
        rep = status(cfg, nodes)
        assert rep.verdict == "down" and "missing" in rep.reason
    assert containers(cfg) == {"sim-1": {}, "sim-2": {}}
    assert leftovers(cfg) == {"sim-1": "", "sim-2": ""}
    saved = sorted(p.name for p in logs.iterdir())
    api_log = f"sim-1--{build_plan(cfg).api_container}.log"
    assert saved == sorted([api_log, f"sim-2--{worker_container(cfg)}.log"])
    assert "(APIServer pid=" in (logs / api_log).read_text()  # the API server's own output is in the saved log
    with Nodes(cfg) as nodes:  # down again: nothing to do, no error
        assert Executor(cfg, nodes).down() is None


@pytest.mark.ends_engine
def test_a_key_given_to_the_head_restarts_the_whole_group_in_order_and_the_engine_then_demands_it(sim, sim_cfg, tmp_path):
    """On Ray (the native executor's restart order is checked by the frozen-worker failover test, and
    both executors' recreate decisions by tests/test_reconcile.py). The change is VLLM_API_KEY in the
    head's environment (docs/security.md): only the head's spec changes, yet the whole group restarts
    in order. Readiness passed only by sending the key; status and the canary send it; a client with a
    wrong key gets vLLM's own 401 through the gateway, and nothing is restarted. (One test: the key's
    engine is the changed one, an engine start saved.)"""
    cfg = sim_cfg
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).up()
    before = containers(cfg)
    key = "sk-sim-engine-key-4d2a"
    data = yaml.safe_load(SIM_CONFIGS[cfg.executor].read_text())
    data["nodes"][0]["env"]["VLLM_API_KEY"] = key
    data = own_state(data, tmp_path / "state")
    data["watchdog"] = {**data.get("watchdog", {}), "idle_canary_s": 10}
    changed = parse_config(yaml.safe_dump(data))
    events = []
    with Nodes(changed) as nodes:
        try:
            res = Executor(changed, nodes, events.append).up()  # readiness passes only by sending the key
            engine_demands_the_key_and_the_watchdog_sends_it(changed, key)
        finally:
            Executor(changed, nodes).down()  # the next tests get the engine without a key
    # only the head's spec changed, yet the whole group restarts (a lone rank 0 or Ray head would
    # orphan the worker's rank or raylet)
    assert res.recreated == members(cfg)
    removed = [e["container"] for e in events if e["event"] == "container-remove"]
    started = [e["step"] for e in events if e["event"] == "step-ok" and e["phase"] in ("start-workers", "start-head", "serve")]
    # vLLM stopped first (while Ray still runs), then the head, then the worker
    stopped = [e["process"] for e in events if e["event"] == "process-stop"]
    assert stopped == ["vllm"] and removed == ["spark-ray-head", "spark-ray-worker"]
    assert started == ["start-workers/sim-2/ray-worker", "start-head/sim-1/ray-head", "serve/sim-1/vllm"]
    assert before["sim-1"]  # it was running before


def engine_demands_the_key_and_the_watchdog_sends_it(cfg, key: str) -> None:
    assert httpx.get(f"{cfg.endpoint()}/v1/models", timeout=10).status_code == 401  # the engine does demand it
    with Nodes(cfg) as nodes:
        rep = status(cfg, nodes)
    assert rep.verdict == "serving", rep.reason
    with Controlled(cfg) as c:
        c.wait_for(lambda e: e["event"] == "canary" and e["ok"], 60, "an idle canary that passed")
        body = {"model": cfg.model.name, "prompt": "Hi", "max_tokens": 1}
        wrong = httpx.post(f"{c.url}/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}, timeout=30)
        assert wrong.status_code == 401 and wrong.json() == {"error": "Unauthorized"}
        right = httpx.post(f"{c.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert right.status_code == 200
        time.sleep(15)
        assert not [e for e in c.events if e["event"] in ("alert", "restart-start")], c.events[-10:]
        assert all(e["ok"] for e in c.kinds("canary"))


@pytest.mark.ends_engine
def test_worker_that_cannot_reach_the_head_is_named(sim):
    cfg = sim_variant(**{"health.ray_join_timeout_s": 30})
    block = ["ip", "netns", "exec", "scsim-sim-2", "iptables", "-I", "OUTPUT", "-d", "10.99.0.11", "-p", "tcp", "-j", "DROP"]
    subprocess.run(block, check=True)
    waiting_since: list[float] = []

    def note(e: dict) -> None:
        if e["event"] == "step-start" and e.get("phase") == "wait-ray":
            waiting_since.append(time.monotonic())

    try:
        with Nodes(cfg) as nodes, pytest.raises(StepError) as info:
            Executor(cfg, nodes, note).up(stop_after="wait-ray")
        waited = time.monotonic() - waiting_since[0]
    finally:
        subprocess.run([*block[:5], "-D", *block[6:]], check=True)
        with Nodes(cfg) as nodes:
            Executor(cfg, nodes).down()
    msg = str(info.value)
    assert "Ray shows 1 of 2 nodes" in msg and "missing: sim-2" in msg and "sim-2 (10.99.0.12) has not joined" in msg
    assert 30 <= waited < 30 + 30  # gave up at the join deadline (not before, not much after)


@pytest.mark.ends_engine
def test_changed_host_key_is_refused_before_anything_runs(sim, sim_cfg, tmp_path):
    key = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    lines = cluster.known_hosts().read_text().splitlines()
    forged = [line if not line.startswith("10.99.0.12 ") else "10.99.0.12 " + key.with_suffix(".pub").read_text().split(" ", 2)[0] + " "
              + key.with_suffix(".pub").read_text().split()[1] for line in lines]
    kh = tmp_path / "known_hosts"
    kh.write_text("\n".join(forged) + "\n")
    cfg = sim_variant(**{"ssh.known_hosts": str(kh)})
    with Nodes(sim_cfg) as nodes:
        Executor(sim_cfg, nodes).down()
        nodes["sim-1"].run("rm -f /etc/sysctl.d/90-spark-cluster.conf")
    with Nodes(cfg) as nodes, pytest.raises(HostKeyError, match="sim-2: the SSH host key of 10.99.0.12 CHANGED"):
        Executor(cfg, nodes).up()
    assert containers(sim_cfg) == {"sim-1": {}, "sim-2": {}}
    with Nodes(sim_cfg) as nodes:  # not even the head was tuned or locked
        assert nodes["sim-1"].run("ls /etc/sysctl.d; ls -d ~/.spark-cluster/locks/spark.lock 2>&1").stdout.count("90-spark-cluster") == 0


@pytest.mark.ends_engine
def test_model_missing_on_worker_fails_preflight_naming_the_node(sim, sim_cfg):
    model = cluster.SIM_ROOT / "nodes" / "sim-2" / "srv" / "models" / "tiny-qwen3"
    aside = model.with_name("tiny-qwen3.aside")
    with Nodes(sim_cfg) as nodes:
        Executor(sim_cfg, nodes).down()
    model.rename(aside)
    try:
        with Nodes(sim_cfg) as nodes, pytest.raises(PreflightError) as info:
            Executor(sim_cfg, nodes).up()
    finally:
        aside.rename(model)
    assert "sim-2: model folder /srv/models/tiny-qwen3 is missing" in str(info.value)
    assert "sim-1:" not in str(info.value)
    assert containers(sim_cfg) == {"sim-1": {}, "sim-2": {}}


@pytest.mark.ends_engine
def test_model_that_differs_between_nodes_is_refused(sim, sim_cfg):
    extra = cluster.SIM_ROOT / "nodes" / "sim-2" / "srv" / "models" / "tiny-qwen3" / "stray.bin"
    extra.write_bytes(b"x")
    try:
        with Nodes(sim_cfg) as nodes, pytest.raises(PreflightError, match=r"differs from sim-1's: sim-2: .*extra \['stray.bin'\]"):
            Executor(sim_cfg, nodes).up()
    finally:
        extra.unlink()


@pytest.mark.ends_engine
def test_second_operation_is_refused_while_one_holds_the_lock(sim, sim_cfg):
    holder = {"host": "laptop-of-someone-else", "pid": 4242, "command": "up", "since": "2026-11-26T10:00:00+00:00"}
    with Nodes(sim_cfg) as nodes:
        nodes["sim-1"].run(f"mkdir -p ~/.spark-cluster/locks/spark.lock && echo '{json.dumps(holder)}' > ~/.spark-cluster/locks/spark.lock/holder").check()
        try:
            with pytest.raises(LockedError, match="up by pid 4242 on laptop-of-someone-else"):
                Executor(sim_cfg, nodes).up()
            with pytest.raises(LockedError):
                Executor(sim_cfg, nodes).down()
        finally:
            nodes["sim-1"].run("rm -rf ~/.spark-cluster/locks/spark.lock")


@pytest.mark.ends_engine
def test_missing_image_is_copied_node_to_node_or_else_through_the_controller(sim, sim_cfg):
    """No registry here: `docker pull` fails at once, so preflight copies the image from sim-1 over
    the cluster link (docker save there, docker load on sim-2); when sim-2 cannot be reached that
    way (a firewall), it is streamed through the controller. sim-2 gets the same image ID either
    way. A small image of its own (the node image is gigabytes: the path is the same, the bytes are
    not the point)."""
    tag = "spark-cluster-test/streamed:1"
    for node in ("sim-1", "sim-2"):
        sim_docker(node, "rmi", "-f", tag, check=False)
    made = cluster.node_exec("sim-1", "sh", "-c", f"printf 'streamed' > /tmp/streamed.txt && tar -C /tmp -c streamed.txt | docker import - {tag}")
    image_id = made.stdout.strip()
    cfg = sim_cfg.model_copy(update={"container": sim_cfg.container.model_copy(update={"image": tag}),
                                     "vllm": sim_cfg.vllm.model_copy(update={"check_flags": False})})
    # sim-2 refuses new TCP connections from sim-1 (SSH from the controller still comes in)
    block = ["ip", "netns", "exec", "scsim-sim-2", "iptables", "-I", "INPUT", "-s", "10.99.0.11", "-p", "tcp", "--syn", "-j", "DROP"]
    try:
        for firewalled, second in ((False, "node to node from sim-1 over the cluster link"), (True, "streamed from sim-1 through the controller")):
            sim_docker("sim-2", "rmi", "-f", tag, check=False)
            if firewalled:
                subprocess.run(block, check=True)
            events = []
            try:
                with Nodes(cfg) as nodes:
                    Executor(cfg, nodes).down()
                    Executor(cfg, nodes, events.append).up(stop_after="preflight")
            finally:
                if firewalled:
                    subprocess.run([*block[:5], "-D", *block[6:]], check=True)
            hows = [e["how"] for e in events if e["event"] == "image-fetch"]
            assert hows[0] == "docker pull" and hows[1] == "node to node from sim-1 over the cluster link" and hows[-1].startswith(second), hows
            got = sim_docker("sim-2", "image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
            assert got == image_id and got.startswith("sha256:")
    finally:
        for node in ("sim-1", "sim-2"):
            sim_docker(node, "rmi", "-f", tag, check=False)


@pytest.mark.ends_engine
def test_misspelt_tool_parser_fails_preflight_with_a_suggestion_and_starts_nothing(sim, sim_cfg, tmp_path):
    """Acceptance of #7: the image's own vLLM refuses `qwen3xml` within 60 s, before any container starts."""
    with Nodes(sim_cfg) as nodes:
        Executor(sim_cfg, nodes).down()
    config = tmp_path / "cluster.yaml"
    config.write_text(SIM_CONFIG.read_text().replace("tool_call_parser: qwen3_xml", "tool_call_parser: qwen3xml"))
    t0 = time.monotonic()
    res = run_cli("up", str(config))  # run_cli gives up after 60 s
    took = time.monotonic() - t0
    assert res.returncode == 8, res.stdout + res.stderr
    assert "--tool-call-parser qwen3xml" in res.stderr and "did you mean qwen3_xml?" in res.stderr
    assert "vllm.tool_call_parser" in res.stderr and "vLLM 0.32.0" in res.stderr
    assert took < 60
    assert containers(sim_cfg) == {"sim-1": {}, "sim-2": {}}
    for node in ("sim-1", "sim-2"):  # not even the throwaway check container is left
        assert sim_docker(node, "ps", "-aq", "--filter", "name=spark-check-vllm-flags").stdout.strip() == ""
