from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
EXAMPLE_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


@pytest.fixture
def card_yaml() -> str:
    return (CONFIGS / "dgx-spark-2node.yaml").read_text()


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None):
    """Run the real console entry point in a subprocess (as a user would)."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "spark_cluster", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=60,
    )


# ---- the local simulated cluster ---------------------------------------------------------------
# One per machine (fixed names and subnet): tests marked `cluster` share one session-scoped
# instance, created on first use and torn down at the end of the session, also on failure.

SIM_CONFIG = CONFIGS / "local-sim.yaml"


def sim_variant(**changes):
    """configs/local-sim.yaml with dotted keys changed, e.g. sim_variant(executor="ray", **{"health.ray_join_timeout_s": 30})."""
    import yaml

    from spark_cluster.config import parse_config

    data = yaml.safe_load(SIM_CONFIG.read_text())
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


@pytest.fixture(scope="session")
def sim(sim_image):
    """Two simulated nodes with the image and the model loaded. Yields the SimNode list."""
    from spark_cluster.sim import cluster, provision

    cluster.check_prerequisites()
    nodes = cluster.up(2)
    try:
        provision.provision(nodes, sim_image)
        yield nodes
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def sim_cfg(sim):
    from spark_cluster.config import load_config

    return load_config(SIM_CONFIG)


def sim_docker(node: str, *args: str, check: bool = True, timeout: float = 120):
    """Run docker inside a simulated node directly (test setup and fault injection, not the product path)."""
    from spark_cluster.sim import cluster

    return cluster.node_exec(node, "docker", *args, check=check, timeout=timeout)
