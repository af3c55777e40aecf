"""Which restart a wedged group gets (spark_cluster.restart_choice): table-tested on made-up looks at
a Ray group of two nodes."""

from __future__ import annotations

import pytest

from spark_cluster.observation import ContainerObs, NodeObs, RayObs
from spark_cluster.restart_choice import KEPT_WHY, choose_restart

from .samples import EXPECTED


def ray_nodes(head=None, worker=None) -> list[NodeObs]:
    nodes = [
        NodeObs(name="sim-1", role="head", reachable=True,
                containers=[ContainerObs(name="spark-ray-head", component="ray-head", state="running", spec_current=True)]),
        NodeObs(name="sim-2", role="worker", reachable=True,
                containers=[ContainerObs(name="spark-ray-worker", component="ray-worker", state="running", spec_current=True)]),
    ]
    for i, changes in enumerate((head, worker)):
        if changes:
            nodes[i] = nodes[i].model_copy(update=changes)
    return nodes


def worker_container(**changes) -> dict:
    return {"containers": [ContainerObs(name="spark-ray-worker", component="ray-worker", **{"state": "running", "spec_current": True,
                                                                                           **changes})]}


BOTH_ALIVE = RayObs(checked=True, alive=sorted(EXPECTED.values()))


@pytest.mark.parametrize("wanted, executor, nodes, ray, kind, why", [
    # everything but the engine sound: keep it
    ("auto", "ray", ray_nodes(), BOTH_ALIVE, "kept", KEPT_WHY),
    # the user's choice, the executor
    ("full", "ray", ray_nodes(), BOTH_ALIVE, "full", "watchdog.restart is full"),
    ("auto", "native", ray_nodes(), BOTH_ALIVE, "full", "the native executor's containers are its ranks"),
    # a member in doubt: a frozen container (docker pause: no process in it can be killed), one gone, one changed
    ("auto", "ray", ray_nodes(worker=worker_container(state="paused")), BOTH_ALIVE, "full", "spark-ray-worker on sim-2 is paused"),
    ("auto", "ray", ray_nodes(worker=worker_container(state="exited")), BOTH_ALIVE, "full", "spark-ray-worker on sim-2 is exited"),
    ("auto", "ray", ray_nodes(worker=worker_container(state="missing")), BOTH_ALIVE, "full", "spark-ray-worker on sim-2 is missing"),
    ("auto", "ray", ray_nodes(worker=worker_container(spec_current=False)), BOTH_ALIVE, "full", "differs from cluster.yaml"),
    # a node that did not answer: a cable pulled, a node rebooting
    ("auto", "ray", ray_nodes(worker={"reachable": False, "error": "timed out"}), BOTH_ALIVE, "full", "sim-2 did not answer (timed out)"),
    # Ray in doubt: not asked yet, not readable, a node not alive
    ("auto", "ray", ray_nodes(), None, "full", "Ray has not been asked yet"),
    ("auto", "ray", ray_nodes(), RayObs(), "full", "Ray has not been asked yet"),
    ("auto", "ray", ray_nodes(), RayObs(checked=True, error="GCS unreachable"), "full", "Ray's view could not be read: GCS unreachable"),
    ("auto", "ray", ray_nodes(), RayObs(checked=True, alive=["10.99.0.11"], dead=["10.99.0.12"]), "full", "Ray does not show sim-2 alive"),
])
def test_the_restart_kept_only_when_everything_but_the_engine_is_sound(wanted, executor, nodes, ray, kind, why):
    choice = choose_restart(wanted, executor, nodes, ray, EXPECTED)
    assert choice.kind == kind and why in choice.why, choice
