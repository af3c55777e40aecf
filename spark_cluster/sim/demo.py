"""`spark-cluster sim demo` (`make demo`): the main job on the built-in simulated cluster, end to
end: the node image, the nodes, `up` of configs/local-sim.yaml, what runs where, a chat completion;
and `sim up`, its first two parts."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from .. import timeouts
from ..config import ClusterConfig
from ..errors import SimError
from ..executor import Executor
from ..observe import list_containers, read_process, read_ray_state
from ..transport import Nodes
from ..views import err, out, step_reporter
from . import cluster, image as sim_image, provision


def demo(cfg: ClusterConfig, config: Path, nodes: int) -> None:
    t0 = time.monotonic()
    cluster.check_prerequisites()
    out.rule("[bold]1. the node image (built locally, cached by its inputs)")
    img = sim_image.build(log=lambda m: err.print(f"[dim]{m}[/]", highlight=False))
    out.print(f"image {img.tag} {img.image_id[:19]}: " + (f"cold build {img.built_s:.0f}s" if img.built_s else "reused from the cache"))
    out.rule("[bold]2. the simulated nodes (namespaces + sshd + dockerd)")
    sim_nodes = cluster.up(nodes, log=out.print)
    took = provision.provision(sim_nodes, img, log=out.print)
    out.print(f"image and model present on every node ({took:.1f}s)")
    out.rule(f"[bold]3. spark-cluster up {config}")
    t_up = time.monotonic()
    with Nodes(cfg) as ns:
        Executor(cfg, ns, step_reporter(False)).up()
        serving = time.monotonic()
        out.rule("[bold]4. what runs where")
        ex = Executor(cfg, ns)
        for n in cfg.nodes:
            for c in list_containers(ns[n.name], cfg.name):
                out.print(f"{n.name:8} {c.name:22} {c.state}", highlight=False)
            for p in ex.plan.processes():
                if p.node == n.name:
                    fact = read_process(ns[p.node], p)
                    out.print(f"{n.name:8}   {p.name} in {p.container}: {fact.state} (pid {fact.pid})", highlight=False)
        ray_step = next((s for s in ex.plan.steps if s.kind == "wait-ray"), None)
        if ray_step is not None:
            ray = read_ray_state(ns[ray_step.node], ray_step.command, timeouts.RAY_STATE_S)
            ranks = ", ".join(f"{a.cls} on {a.ip}" for a in sorted(ray.actors, key=lambda a: a.ip or ""))
            out.print(f"Ray: nodes alive {', '.join(ray.alive)}; vLLM ranks (Ray actors): {ranks or ray.error}", highlight=False)
    out.rule("[bold]5. a chat completion through the endpoint")
    body = {"model": cfg.model.name, "messages": [{"role": "user", "content": "Say hello to the Spark cluster."}], "max_tokens": 24}
    try:
        resp = httpx.post(f"{cfg.endpoint()}/v1/chat/completions", json=body, timeout=timeouts.DEMO_COMPLETION_S)
        resp.raise_for_status()
        msg = resp.json()["choices"][0]["message"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise SimError(f"the chat completion through {cfg.endpoint()} failed: {type(exc).__name__}: {exc}") from None
    reply = msg.get("content") or msg.get("reasoning") or msg.get("reasoning_content") or ""
    out.print(f"[bold]reply[/] (random weights, so random words): {reply!r}", highlight=False)
    out.print(f"[bold green]time to serving:[/] {serving - t_up:.1f}s for `up`, {serving - t0:.1f}s from the start of the demo", highlight=False)
    out.print("tear it down with: make demo-down")


def bring_up(nodes: int, *, with_image: bool = True) -> None:
    """`sim up`: the nodes (what an earlier run left removed first), then the image and model in each."""
    cluster.check_prerequisites()
    img = None
    if with_image:
        t0 = time.monotonic()
        img = sim_image.build(log=lambda m: err.print(f"[dim]{m}[/]", highlight=False))
        if img.built_s is not None:
            out.print(f"image built in {img.built_s:.0f}s (cold)")
        else:
            out.print(f"image {img.tag} reused from the cache ({time.monotonic() - t0:.1f}s)")
    sim_nodes = cluster.up(nodes, log=out.print)
    if img is not None:
        took = provision.provision(sim_nodes, img, log=out.print)
        out.print(f"image and model on every node ({took:.1f}s)")
    out.print(f"SSH: key {cluster.client_key()}, known_hosts {cluster.known_hosts()}")
