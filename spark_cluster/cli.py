"""The `spark-cluster` commands: each parses its arguments, calls the library through
`guard` (errors become messages and exit codes there) and prints with spark_cluster.views."""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Optional, TypeVar

import typer

from . import __version__, cli_run, kept
from .config import ClusterConfig
from .plan import build_plan
from .groups import for_each_group, labelled
from .guard import guard, load, run_until_stopped
from .sim.cli import sim_app
from .views import (err, out, print_down_plan, print_findings, print_plan, print_restart_plan, print_synced, print_up_result, print_valid,
                    show_status, step_reporter, sync_reporter)
from .vllm_env import COST as VLLM_ENV_COST

app = typer.Typer(
    name="spark-cluster",
    help="Turn two or more DGX Spark / GB10 boxes into one reliable vLLM endpoint, from one cluster.yaml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(sim_app, name="sim")

T = TypeVar("T")

CONFIG_ARG = typer.Argument(..., help="The cluster file (cluster.yaml).", show_default=False)


@app.callback(invoke_without_command=True)
def _main(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        out.print(__version__)
        raise typer.Exit(0)


VLLM_OPT_HELP = (
    "Also check the rendered `vllm serve` flags with vLLM's own parser: `image` (the configured image, in a "
    "throwaway container on the head node, over SSH), a Python interpreter or virtual environment with vllm "
    "installed, or a vLLM release such as 0.17.1 (a parser-only environment is built once under "
    f"~/.cache/spark-cluster/vllm-envs: {VLLM_ENV_COST})."
)


@app.command()
def validate(
    config: Path = CONFIG_ARG,
    vllm: Optional[str] = typer.Option(None, "--vllm", help=VLLM_OPT_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help="With --vllm: print the check result as JSON."),
) -> None:
    """Check cluster.yaml without contacting any node (exit 2 when invalid); --vllm also checks the
    `vllm serve` flags with vLLM's parser (exit 15 when vLLM refuses them)."""
    cfg = load(config)
    plans = {label: guard(lambda: build_plan(group)) for label, group in cfg.group_configs()}
    plan = next(iter(plans.values()))  # every group runs the same `vllm serve` flags
    if not as_json:
        print_valid(config, cfg, plan)
    if vllm is None:
        return
    check = guard(lambda: cli_run.check_vllm(cfg.group_configs()[0][1], plan, vllm))
    if as_json:
        sys.stdout.write(check.model_dump_json(indent=2) + "\n")
    guard(lambda: check.raise_for_problems(cfg))
    if not as_json:
        out.print(f"[green]ok[/] vLLM {check.vllm_version} ({check.where}) accepts the `vllm serve` flags of "
                  f"{len(plan.vllm_argvs)} command line(s)", highlight=False)


@app.command()
def schema() -> None:
    """Print the JSON Schema of cluster.yaml (for editor completion)."""
    sys.stdout.write(json.dumps(ClusterConfig.model_json_schema(), indent=2) + "\n")


@app.command()
def plan(
    config: Path = CONFIG_ARG,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON data."),
    vllm: Optional[str] = typer.Option(None, "--vllm", help=VLLM_OPT_HELP, show_default=False),
    down: bool = typer.Option(False, "--down", help="The plan of `down` instead: every command it will run."),
    kill: bool = typer.Option(False, "--kill", help="With --down: as the watchdog's restart runs it (SIGKILL in order, then removal)."),
    restart: bool = typer.Option(False, "--restart", help="What the watchdog runs on a hang: which restart and when, and each one's commands."),
) -> None:
    """Show, in execution order and per node, every command `up` (or `down`, or the watchdog's restart)
    will run; with groups, each group's (they run at once). Contacts nothing (unless --vllm image)."""
    cfg = load(config)
    groups = cfg.group_configs()
    plans = {label: guard(lambda: build_plan(group, links=kept.links(group), kv=kept.kv_capacity(group))) for label, group in groups}
    if restart:
        from .lifecycle import build_restart_plan

        restarts = {label: build_restart_plan(group, plans[label]) for label, group in groups}
        if as_json:
            sys.stdout.write(cli_run.per_group(cfg, {label: json.loads(r.model_dump_json()) for label, r in restarts.items()}))
        for label, group in () if as_json else groups:
            print_restart_plan(group, restarts[label])
        return
    if down or kill:
        from .lifecycle import build_down_plan

        downs = {label: build_down_plan(group, plans[label], graceful=not kill) for label, group in groups}
        if as_json:
            sys.stdout.write(cli_run.per_group(cfg, {label: json.loads(d.model_dump_json()) for label, d in downs.items()}))
        for label, group in () if as_json else groups:
            print_down_plan(group, downs[label])
        return
    first, p = groups[0][1], plans[groups[0][0]]
    check = guard(lambda: cli_run.check_vllm(first, p, vllm)) if vllm is not None else None
    if as_json:
        data = {label: json.loads(plan.model_dump_json()) for label, plan in plans.items()}
        for one in data.values() if check is not None else ():
            one["vllm_check"] = json.loads(check.model_dump_json())
        sys.stdout.write(cli_run.per_group(cfg, data))
    for label, group in () if as_json else groups:
        print_plan(plans[label], group, check)
    if check is not None:
        guard(lambda: check.raise_for_problems(cfg))


@app.command()
def up(
    config: Path = CONFIG_ARG,
    as_json: bool = typer.Option(False, "--json", help="Print events as JSON lines instead of a progress view."),
    watch_after: bool = typer.Option(False, "--watch", help="Stay on after serving as the controller (like `controller`): "
                                                            "watchdog, gateway, API, metrics, status page."),
    accept_memory: bool = typer.Option(False, "--accept-memory", help="Start the engine although a node has less memory available "
                                                                     "than before the last engine start (kept as its new figure)."),
) -> None:
    """Bring the cluster to serving: preflight, node tuning, workers then head, Ray, vLLM, a real completion."""
    from .executor import Executor

    cfg = load(config)
    report = step_reporter(as_json)
    from .controller_client import through_controller

    if guard(lambda: through_controller(cfg, config.read_text(), report)):  # the controller serves: one group at a time
        if not as_json:
            out.print(f"[bold green]serving[/] the new config through {cfg.gateway_url()} (rolled one group at a time)", highlight=False)
        return

    def one(label: str, group: ClusterConfig):
        with cli_run.nodes_of(group) as nodes:
            return Executor(group, nodes, labelled(report, label, bool(cfg.groups)), accept_memory=accept_memory).up()

    results = guard(lambda: for_each_group(cfg, one))
    from .watchdog import reset_breaker

    for label, group in cfg.group_configs():
        if reset_breaker(group, "a successful manual up", recreated=results[label].changed) and not as_json:
            out.print(f"[yellow]watchdog{f' of group {label}' if cfg.groups else ''}:[/] out of its failed state "
                      "(the circuit breaker is reset)", highlight=False)
        if not as_json:
            print_up_result(group, results[label])
    if watch_after:
        cli_run.controller(cfg, as_json)


@app.command()
def doctor(
    config: Path = CONFIG_ARG,
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
) -> None:
    """Every check `up` makes before it starts anything (nodes, image, model, the cluster link and its MTU,
    nccl: auto, memory, ports, the image's vLLM), as a table; changes nothing. Exit 0 only when `up` would
    pass its preflight (8 otherwise)."""
    from .errors import PreflightError
    from .executor import Executor

    cfg = load(config)

    def one(label: str, group: ClusterConfig):
        with cli_run.nodes_of(group) as nodes:
            return Executor(group, nodes).doctor()

    findings = [f for found in guard(lambda: for_each_group(cfg, one)).values() for f in found]
    bad = [f for f in findings if f.problem]
    if as_json:
        sys.stdout.write(json.dumps([{"node": f.node, "check": f.check, "description": f.description, "ok": not f.problem,
                                      "problem": f.problem, "warning": f.warning, "note": f.note} for f in findings], indent=2) + "\n")
    else:
        print_findings(cfg, findings)
    if bad:
        raise typer.Exit(PreflightError.exit_code)


@app.command()
def sync(
    config: Path = CONFIG_ARG,
    source: Optional[str] = typer.Option(None, "--from", help="The node to copy from (default: one with the whole model, the head first)."),
    checksum: bool = typer.Option(False, "--checksum", help="Also compare every file's SHA-256 across nodes afterwards (reads it all)."),
    max_rate: float = typer.Option(0, "--max-rate", help="Most MB/s to send (0: as fast as the link goes)."),
    as_json: bool = typer.Option(False, "--json", help="Print events as JSON lines."),
) -> None:
    """Make the model folder identical on every node: node to node over the cluster link (not through this
    machine), from a node that has the whole model, resuming a copy that was cut off; a second sync copies
    nothing. Then the sealed compile caches the same way (a node without them gets them, checked against the
    seal). Exit 16 when the model folders cannot be made identical."""
    from .cache_sync import CacheSync
    from .model_sync import ModelSync

    cfg = load(config)
    progress, report = sync_reporter(cfg, as_json)

    def run():
        with cli_run.nodes_of(cfg) as nodes, progress:
            synced = ModelSync(cfg, nodes, report).run(source=source, checksum=checksum, max_rate_mb_s=max_rate)
            CacheSync(cfg, nodes, report).run()  # the sealed caches too: a replaced node starts warm
            return synced

    res = run_until_stopped(run)
    if not as_json:
        print_synced(res)


@app.command()
def controller(
    config: Path = CONFIG_ARG,
    print_unit: bool = typer.Option(False, "--print-unit", help="Print a systemd unit that runs this controller, and exit."),
) -> None:
    """The long-running controller: the watchdog, a gateway that holds requests while the group restarts
    (/v1 on gateway.port), and on controller.port the API (/api, /docs), Prometheus metrics (/metrics)
    and a status page (/)."""
    cfg = load(config)
    if print_unit:
        cli_run.print_unit(cfg, config, "controller")
        return
    cli_run.controller(cfg, False)


@app.command("import")
def import_(
    recipe: Path = typer.Argument(..., help="A recipe: eugr/spark-vllm-docker's (recipe_version 1) or sparkrun's YAML."),
    nodes: Optional[str] = typer.Option(None, "--nodes", help="HOST[/ADDRESS],...: SSH host and cluster-link address, the head first."),
    config: Optional[Path] = typer.Option(None, "--config", help="An existing cluster.yaml whose nodes and settings are kept."),
    name: Optional[str] = typer.Option(None, "--name", help="The cluster's name (default: the recipe's)."),
    model_path: Optional[str] = typer.Option(None, "--model-path", help="The model folder on every node (default /srv/models/NAME)."),
    out_path: Path = typer.Option(Path("cluster.yaml"), "--out", help="Where the cluster.yaml is written."),
    force: bool = typer.Option(False, "--force", help="Replace a file of that name with other content."),
) -> None:
    """Write a cluster.yaml from a recipe; every recipe feature it cannot carry over is named, with why."""
    guard(lambda: cli_run.import_recipe(recipe, nodes, config, name, model_path, out_path, force))


@app.command("notify-test")
def notify_test(config: Path = CONFIG_ARG) -> None:
    """Send one test message to every notification target (cluster.yaml notify.targets) and say which took it
    (exit code 21 when one did not)."""
    cfg = load(config)
    guard(lambda: cli_run.notify_test(cfg))


@app.command()
def observability(
    config: Path = CONFIG_ARG,
    out_dir: Path = typer.Option(Path("observability"), "--out", help="Folder the files are written to."),
    target: Optional[str] = typer.Option(None, "--target", help="host:port Prometheus scrapes (default: controller.host:port as "
                                                                 "this machine reaches it)."),
    alertmanager: str = typer.Option("127.0.0.1:9093", "--alertmanager", help="host:port of the Alertmanager alerts go to."),
    interval_s: float = typer.Option(15, "--scrape-interval", min=1, help="Seconds between scrapes."),
    force: bool = typer.Option(False, "--force", help="Replace files of the same name with other content."),
) -> None:
    """Write a Prometheus scrape config for the controller, alert rules with their promtool tests, and a Grafana dashboard."""
    cfg = load(config)
    guard(lambda: cli_run.observability(cfg, out_dir, target, alertmanager, interval_s, force))


@app.command()
def watch(
    config: Path = CONFIG_ARG,
    as_json: bool = typer.Option(False, "--json", help="Print events as JSON lines."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Stop after this long (default: forever)."),
    print_unit: bool = typer.Option(False, "--print-unit", help="Print a systemd unit that runs this watchdog, and exit."),
    reset: bool = typer.Option(False, "--reset", help="Take the watchdog out of its failed state (after the circuit breaker "
                                                       "tripped and the cause is fixed), then watch."),
) -> None:
    """The failover watchdog: catches a hang under load (not only a crash) and restarts the whole group in order.

    Events go to state_dir/events.jsonl; exit code 12 when the circuit breaker trips (`--reset` or a successful `up` clears it)."""
    cfg = load(config)
    if reset:
        from .watchdog import reset_breaker

        for label, group in cfg.group_configs():
            done = reset_breaker(group, "watch --reset")
            err.print(f"watchdog{f' of group {label}' if cfg.groups else ''}: "
                      + ("out of its failed state (the circuit breaker is reset)" if done else "was not failed; nothing to reset"), highlight=False)
    if print_unit:
        cli_run.print_unit(cfg, config, "watch")
        return
    cli_run.watch(cfg, as_json, max_seconds)


@app.command()
def down(
    config: Path = CONFIG_ARG,
    as_json: bool = typer.Option(False, "--json", help="Print events as JSON lines."),
) -> None:
    """Stop vLLM, the head, then the workers; save their logs locally; remove the containers."""
    from .executor import Executor

    cfg = load(config)
    report = step_reporter(as_json)

    def one(label: str, group: ClusterConfig):
        with cli_run.nodes_of(group) as nodes:
            return Executor(group, nodes, labelled(report, label, bool(cfg.groups))).down()

    saved = [str(logs) for logs in guard(lambda: for_each_group(cfg, one)).values() if logs]
    if not as_json:
        out.print("down: no cluster container left" + (f"; logs saved in {', '.join(saved)}" if saved else " (nothing was running)"),
                  highlight=False)


@app.command()
def logs(
    config: Path = CONFIG_ARG,
    node: Optional[str] = typer.Argument(None, help="Only this node."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    tail: int = typer.Option(100, "--tail", help="Lines per container (0: all)."),
) -> None:
    """Container logs of the cluster (Ray head/worker, vLLM) from every node, or one."""
    from .container_logs import containers_of, follow_logs, read_logs

    cfg = load(config)
    names = [n.name for n in cfg.nodes]
    if node is not None and node not in names:
        err.print(f"[bold red]error:[/] no node {node!r} in {config} (nodes: {', '.join(names)})")
        raise typer.Exit(2)

    def run():
        with cli_run.nodes_of(cfg) as nodes:
            found = containers_of(cfg, nodes, [node] if node else names)
            if not follow:
                for n, c, text in read_logs(nodes, found, tail, cfg.secret_values()):
                    out.print(f"[bold]== {n} {c.name} ({c.state})[/]")
                    sys.stdout.write(text)
                return
            out.print(f"[bold]== following {', '.join(f'{c.name}@{n}' for n, c in found) or 'nothing'}: Ctrl-C to stop[/]")
            follow_logs(nodes, found, tail, sys.stdout, cfg.secret_values())

    try:
        guard(run)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def status(
    config: Path = CONFIG_ARG,
    as_json: bool = typer.Option(False, "--json", help="The same content as JSON (schema_version 1)."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh in place."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between refreshes with --watch."),
    window: float = typer.Option(0.5, "--window", help="Seconds over which throughput and progress are sampled."),
) -> None:
    """Is it serving, and if not, where is it broken? One verdict from every node, Ray and vLLM."""
    from .observe import begin_vllm
    from .status import groups_status
    from .status import status as get_status

    cfg = load(config)
    groups = cfg.group_configs()
    # vLLM's sampling window starts before paramiko is even imported: it overlaps the SSH work
    first = {label: begin_vllm(group, window, group.health.probe_timeout_s) for label, group in groups}

    def get(vllm=None):
        if cfg.groups:
            return guard(lambda: groups_status(cfg, nodes, window_s=window, vllm=vllm))
        label = groups[0][0]
        return guard(lambda: get_status(cfg, nodes[label], window_s=window, vllm=(vllm or {}).get(label)))

    with ExitStack() as stack:
        nodes = {label: stack.enter_context(cli_run.nodes_of(group)) for label, group in groups}
        rep = show_status(lambda: get(first), get, as_json=as_json, watch=watch, interval=interval)
    if rep is not None and rep.verdict != "serving":
        raise typer.Exit(3)


def main() -> None:  # console script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
