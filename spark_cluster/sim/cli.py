"""`spark-cluster sim ...`: the local simulated cluster's commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from ..guard import guard, load
from ..views import err, out, print_sim_status

sim_app = typer.Typer(
    help="The local simulated cluster: N 'Spark' nodes on this machine (namespaces + sshd + dockerd, real vLLM on CPU). Needs root.",
    no_args_is_help=True,
)


@sim_app.command("up")
def sim_up(
    nodes: int = typer.Option(2, "--nodes", "-n", help="How many nodes."),
    image: bool = typer.Option(True, "--image/--no-image", help="Build (or reuse) the node image and load it, with the model, into every node."),
) -> None:
    """Create the simulated nodes (removing what an earlier run left), then load the image and model."""
    from .demo import bring_up

    guard(lambda: bring_up(nodes, with_image=image))


@sim_app.command("down")
def sim_down() -> None:
    """Remove the simulated cluster: every process, namespace, link and cgroup. Safe to repeat."""
    from . import cluster

    guard(lambda: cluster.down(log=out.print))


@sim_app.command("status")
def sim_status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Which simulated nodes exist and run."""
    from . import cluster

    data = guard(cluster.status)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        print_sim_status(data)


@sim_app.command("demo")
def sim_demo(
    config: Path = typer.Option(Path("configs/local-sim.yaml"), "--config", help="The simulated cluster's file."),
    nodes: int = typer.Option(2, "--nodes", "-n"),
) -> None:
    """The main job on the built-in simulated cluster: sim up, `up`, the cluster's containers, a chat completion."""
    from .demo import demo

    cfg = load(config)
    guard(lambda: demo(cfg, config, nodes))


@sim_app.command("image")
def sim_image_cmd(force: bool = typer.Option(False, "--force", help="Rebuild even when cached.")) -> None:
    """Build (or reuse) the simulated nodes' image archive and the tiny model."""
    from . import image as sim_image

    img = guard(lambda: sim_image.build(force=force, log=lambda m: err.print(f"[dim]{m}[/]", highlight=False)))
    out.print(f"{img.tag} {img.image_id} {img.archive}" + (f" (built in {img.built_s:.0f}s)" if img.built_s else " (cached)"))
