from __future__ import annotations

import json
import os
import ssl
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import settings

# property tests: 60 examples each in `make test`, 15 in `make check` (the inner loop; --hypothesis-profile=check);
# the gateway's fuzz test (not in `make check`) sets its own
settings.register_profile("suite", max_examples=60, deadline=None)
settings.register_profile("check", max_examples=15, deadline=None)
settings.load_profile("suite")

# The tests speak plain HTTP on loopback, yet httpx builds a TLS context for every client (every
# httpx.get): from a CA file that is ~35-90 ms of CPU each, half of `make check`'s CPU (306 clients).
# From the system's CA folder it is 0.2 ms: a folder's certificates are read only when one is checked.
_CA_DIR = ssl.get_default_verify_paths().capath
if _CA_DIR:
    os.environ.pop("SSL_CERT_FILE", None)
    os.environ["SSL_CERT_DIR"] = _CA_DIR

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
EXAMPLE_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


@pytest.fixture(autouse=True)
def fakes_refuse_the_unexpected():
    """A test fails when a fake node was asked a command nobody scripted, even if the code under
    test caught the fake's refusal (tests/fakes.py)."""
    from .fakes import MADE

    MADE.clear()
    yield
    asked = [f"{node}: {command}" for fake in MADE for node, command in fake.unscripted]
    MADE.clear()
    assert not asked, "commands nobody scripted reached a fake node:\n" + "\n".join(asked)


@pytest.fixture
def card_yaml() -> str:
    return (CONFIGS / "dgx-spark-2node.yaml").read_text()


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 60):
    """Run the real console entry point in a subprocess (as a user would)."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "spark_cluster", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=timeout,
    )


# ---- the local simulated cluster ---------------------------------------------------------------
# One per machine (fixed names and subnet): tests marked `cluster` share one session-scoped
# instance, created on first use and torn down at the end of the session, also on failure.

SIM_CONFIG = CONFIGS / "local-sim.yaml"  # the card's path: vLLM over Ray
# Every test that runs the engine runs on both executors, each with its own sim config
SIM_CONFIGS = {"ray": SIM_CONFIG, "native": CONFIGS / "local-sim-native.yaml"}
# outputs recorded on the simulated cluster and on real Sparks: the command, its exit code and output,
# where it was recorded, and the fact a parser must give
FACTS = Path(__file__).parent / "data" / "facts"


def recording(case: str) -> dict:
    return json.loads((FACTS / f"{case}.json").read_text())


def recorded_log(name: str) -> str:
    """A container log recorded on the simulated cluster (tests/data/logs/), as `docker logs --timestamps` printed it."""
    return (FACTS.parent / "logs" / f"{name}.log").read_text()


def own_state(data: dict, state, *, check_flags: bool = False) -> dict:
    """A sim config's data with its own state_dir (state). The image's vLLM flag check is kept per
    state_dir and costs about 40 s on the simulation's two cores: it is left off unless asked
    (check_flags), for tests that start the same image with the same flags as those that run it
    (test_up's first up, test_doctor's first test)."""
    data["state_dir"] = str(state)
    data["vllm"] = {**data["vllm"], "check_flags": check_flags}
    return data


def sim_variant(base: str = "ray", **changes):
    """A sim config (by executor) with dotted keys changed, e.g. sim_variant(**{"health.ray_join_timeout_s": 30})."""
    import yaml

    from spark_cluster.config import parse_config

    data = yaml.safe_load(SIM_CONFIGS[base].read_text())
    for dotted, value in changes.items():
        d = data
        *path, last = dotted.split(".")
        for p in path:
            d = d[p]
        d[last] = value
    return parse_config(yaml.safe_dump(data))


@pytest.fixture(scope="session")
def sim_image():
    from spark_cluster.sim import image

    return image.build()


@contextmanager
def simulated(n: int, image):
    """n simulated nodes with the image and the model loaded, removed at the end (also on failure)."""
    from spark_cluster.sim import cluster, provision

    cluster.check_prerequisites()
    nodes = cluster.up(n)
    try:
        provision.provision(nodes, image)
        yield nodes
    finally:
        cluster.down()


FOUR_NODES = "sim4"  # the fixture of the tests that need four simulated nodes


def needs_four_nodes(item) -> bool:
    return FOUR_NODES in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after pytest has grouped the items by their session fixtures
def pytest_collection_modifyitems(items):
    """Engines are shared (a test brings one up only where it needs a fresh one, `up` keeps one
    serving as planned): the tests that end the engine (or recreate it) after those that share a
    serving one, then the test that remakes the simulated cluster, the four-node tests last (the
    two-node engine is taken down once, before them)."""
    def key(item) -> tuple[bool, bool, bool]:
        return needs_four_nodes(item), item.get_closest_marker("remakes_sim") is not None, item.get_closest_marker("ends_engine") is not None

    items.sort(key=key)  # stable: pytest's order (grouped by executor) kept within each


@pytest.fixture(scope="session")
def sim(sim_image, request):
    """The session's simulated nodes with the image and the model loaded: two, or four when a selected
    test needs them (the two-node configs name sim-1 and sim-2 only, so they run on four alike; one
    cluster, provisioned once). Yields the SimNode list."""
    n = 4 if any(needs_four_nodes(item) for item in request.session.items) else 2
    with simulated(n, sim_image) as nodes:
        yield nodes


@pytest.fixture(scope="session")
def sim4(sim):
    """Four simulated nodes, with no two-node engine left on sim-1 and sim-2 (they share its ports)."""
    from spark_cluster.config import load_config
    from spark_cluster.executor import Executor
    from spark_cluster.transport import Nodes

    assert len(sim) == 4, [n.name for n in sim]
    cfg = load_config(SIM_CONFIG)  # both executors' two-node configs name their cluster alike: one down for both
    with Nodes(cfg) as nodes:
        Executor(cfg, nodes).down(graceful=False)
    return sim


@pytest.fixture(scope="session")
def sim_cfg(sim):
    """The built-in simulated cluster's config (Ray executor), for tests that need one executor."""
    from spark_cluster.config import load_config

    return load_config(SIM_CONFIG)


@pytest.fixture(scope="session", params=sorted(SIM_CONFIGS))
def engine_cfg(request, sim):
    """Each simulated config in turn: tests using it run on both executors (pytest groups them by
    executor, so the cluster switches executor once)."""
    from spark_cluster.config import load_config

    return load_config(SIM_CONFIGS[request.param])


# engine_cfg's executors in its order, the native one marked `long`: the longest two-node tests run
# on Ray in `make test` and on both in `make test-long` (the suite's 60 minutes)
RAY_IN_SUITE = [pytest.param("native", marks=pytest.mark.long), "ray"]


def worker_container(cfg) -> str:
    """The container on the worker node that holds a tensor-parallel rank."""
    return f"{cfg.name}-ray-worker" if cfg.executor == "ray" else f"{cfg.name}-vllm-worker"


def group_containers(cfg) -> set[str]:
    from spark_cluster.plan import build_plan

    return {c.name for c in build_plan(cfg).containers()}


def kill_vllm_api(cfg) -> None:
    """kill -9 the vLLM API server process itself, from its node."""
    from spark_cluster.plan import VLLM_PID_FILE
    from spark_cluster.transport import Nodes

    head = cfg.head.name
    with Nodes(cfg) as nodes:
        if cfg.executor == "ray":  # vLLM runs in the Ray head container, its PID in the pid file
            nodes[head].run(f"docker exec {cfg.name}-ray-head sh -c 'kill -9 $(cat {VLLM_PID_FILE})'").check()
        else:
            nodes[head].run(f"kill -9 $(docker inspect -f '{{{{.State.Pid}}}}' {cfg.name}-vllm)").check()


def leftovers(cfg) -> dict[str, str]:
    """Ray's and vLLM's processes on every node (raylet, GCS, Ray workers, `vllm serve`, its engine and
    ranks): empty after down."""
    from spark_cluster.transport import Nodes

    with Nodes(cfg) as nodes:
        return {n: r.stdout.strip() for n, r in nodes.map(lambda t: t.run("pgrep -af '[r]aylet|[g]cs_server|[R]ayWorker|[v]llm serve|[V]LLM::' || true")).values_or_raise().items()}


def sim_docker(node: str, *args: str, check: bool = True, timeout: float = 120):
    """Run docker inside a simulated node directly (test setup and fault injection, not the product path)."""
    from spark_cluster.sim import cluster

    return cluster.node_exec(node, "docker", *args, check=check, timeout=timeout)


def freeze(node: str, container: str, tries: int = 5) -> None:
    """`docker pause` a container inside a simulated node: a frozen rank. runc's freeze gives up
    when the cgroup does not settle in time ("unable to freeze", moby/moby#48205; seen here under the
    suite's load), and leaves the container running: tried again a few times."""
    from spark_cluster.errors import SimError

    for attempt in range(tries):
        try:
            sim_docker(node, "pause", container)
            return
        except SimError as exc:
            if "unable to freeze" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(1)


def generation(cfg) -> dict:
    """What the cluster runs now: container IDs, the PIDs (as each node sees them) of Ray's and
    vLLM's processes, and on Ray its placement groups and live actors (Ray's own state listing)."""
    from spark_cluster.observe import list_containers, read_ray_state
    from spark_cluster.plan import build_plan
    from spark_cluster.transport import Nodes

    pattern = "[r]aylet|[g]cs_server|[R]ayWorker|[v]llm serve|VLLM::"
    with Nodes(cfg) as nodes:
        pids = {n: set(r.stdout.split()) for n, r in nodes.map(lambda t: t.run(f"pgrep -f '{pattern}' || true")).values_or_raise().items()}
        ids = {c.id for n in nodes.by_name for c in list_containers(nodes[n], cfg.name)}
        ray = None
        if cfg.executor == "ray":
            step = next(s for s in build_plan(cfg).steps if s.kind == "wait-ray")
            ray = read_ray_state(nodes[cfg.head.name], step.command, 60)
            assert ray.error is None, ray.error
    return {"containers": ids, "pids": pids, "ray": ray}


def assert_nothing_of(before: dict, after: dict, cfg) -> None:
    """Nothing of the `before` generation survives in `after`, on any node: no container, no
    process, no placement group, no actor; and `after` is one complete generation."""
    assert before["containers"] and not before["containers"] & after["containers"]
    for node, pids in before["pids"].items():
        assert pids and not pids & after["pids"][node], f"{node}: processes of the previous generation survive"
    if cfg.executor == "ray":
        old, new = before["ray"], after["ray"]
        assert not {pg.id for pg in old.placement_groups} & {pg.id for pg in new.placement_groups}
        assert [pg.state for pg in new.engine_placement_groups()] == ["CREATED"]
        assert sorted(a.ip for a in new.actors) == sorted(n.address for n in cfg.nodes)  # one vLLM rank per node
        # actors by Ray's ID (their PIDs repeat: each new container numbers its processes afresh)
        assert all(a.id for a in new.actors) and not {a.id for a in old.actors} & {a.id for a in new.actors}


def assert_engine_alone_new(before: dict, after: dict, cfg) -> None:
    """The kept restart (Ray): the same containers and Ray's own processes, a new engine: its placement
    group and its ranks (Ray's actors, one per node) new."""
    assert before["containers"] and after["containers"] == before["containers"]
    for node, pids in before["pids"].items():
        assert pids & after["pids"][node], f"{node}: nothing of Ray's own processes was kept"
    old, new = before["ray"], after["ray"]
    assert [pg.state for pg in new.engine_placement_groups()] == ["CREATED"]
    assert not {pg.id for pg in old.placement_groups} & {pg.id for pg in new.engine_placement_groups()}
    assert sorted(a.ip for a in new.actors) == sorted(n.address for n in cfg.nodes)
    assert all(a.id for a in new.actors) and not {a.id for a in old.actors} & {a.id for a in new.actors}


@pytest.fixture
def rig(tmp_path, request):
    """The controller with a scripted watchdog in front of a fake engine (tests/gateway_rig.py);
    parametrize indirectly with gateway settings."""
    from .gateway_rig import rig_running

    with rig_running(tmp_path, **getattr(request, "param", {})) as r:
        yield r
