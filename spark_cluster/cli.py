"""The `spark-cluster` command. The only place that turns errors into exit codes."""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from . import __version__, kept, timeouts
from .config import ClusterConfig, load_config
from .errors import SparkClusterError
from .plan import PHASES, Plan, build_plan
from .vllm_env import COST as VLLM_ENV_COST

app = typer.Typer(
    name="spark-cluster",
    help="Turn two or more DGX Spark / GB10 boxes into one reliable vLLM endpoint, from one cluster.yaml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

T = TypeVar("T")

CONFIG_ARG = typer.Argument(..., help="The cluster file (cluster.yaml).", show_default=False)


def _guard(fn: Callable[[], T]) -> T:
    """Run library code; a SparkClusterError becomes its message and exit code."""
    try:
        return fn()
    except SparkClusterError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def _run_until_stopped(fn: Callable[[], T]) -> T:
    """A long-running command: as _guard, and Ctrl-C ends it with exit code 130 (no traceback)."""
    try:
        return _guard(fn)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _load(path: Path) -> ClusterConfig:
    return _guard(lambda: load_config(path))


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


def _check_vllm(cfg: ClusterConfig, p: Plan, target: str):
    from .vllm_check import check_local, resolve_python

    if target == "image":
        from .executor import Executor

        with _nodes(cfg) as nodes:
            return Executor(cfg, nodes).check_vllm_flags()
    python = resolve_python(target, log=lambda m: err.print(f"[dim]{escape(m)}[/]", highlight=False))
    return check_local(python, p.vllm_argvs)


@app.command()
def validate(
    config: Path = CONFIG_ARG,
    vllm: Optional[str] = typer.Option(None, "--vllm", help=VLLM_OPT_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help="With --vllm: print the check result as JSON."),
) -> None:
    """Check cluster.yaml without contacting any node (exit 2 when invalid); --vllm also checks the
    `vllm serve` flags with vLLM's parser (exit 15 when vLLM refuses them)."""
    cfg = _load(config)
    plan = _guard(lambda: build_plan(cfg))
    if not as_json:
        out.print(
            f"[green]ok[/] {config}: cluster [bold]{cfg.name}[/], {len(cfg.nodes)} node(s), executor {cfg.executor}, "
            f"TP={cfg.tensor_parallel_size} PP={cfg.vllm.pipeline_parallel_size}, "
            f"gpu-memory-utilization {plan.gpu_memory_utilization} ({plan.gpu_memory_utilization_source})",
            highlight=False,
        )
    if vllm is None:
        return
    check = _guard(lambda: _check_vllm(cfg, plan, vllm))
    if as_json:
        sys.stdout.write(check.model_dump_json(indent=2) + "\n")
    _guard(lambda: check.raise_for_problems(cfg))
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
) -> None:
    """Show, in execution order and per node, every command `up` (or `down`) will run. Contacts nothing (unless --vllm image)."""
    cfg = _load(config)
    p = _guard(lambda: build_plan(cfg, links=kept.links(cfg)))
    if down or kill:
        from .lifecycle import DOWN_PHASES, build_down_plan

        d = build_down_plan(cfg, p, graceful=not kill)
        if as_json:
            sys.stdout.write(d.model_dump_json(indent=2) + "\n")
        else:
            out.print(Panel(f"[bold]{escape(cfg.name)}[/]: {'SIGKILL in order, then' if kill else 'stop in order:'} vLLM, the head, the "
                            "workers; every container's log saved under state_dir/logs/", title="spark-cluster plan --down", expand=False))
            print_steps(d.steps, DOWN_PHASES)
        return
    check = _guard(lambda: _check_vllm(cfg, p, vllm)) if vllm is not None else None
    if as_json:
        data = json.loads(p.model_dump_json())
        if check is not None:
            data["vllm_check"] = json.loads(check.model_dump_json())
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        print_plan(p, cfg, check)
    if check is not None:
        _guard(lambda: check.raise_for_problems(cfg))


def _vllm_line(cfg: ClusterConfig, check) -> str:
    if check is not None:
        verdict = "[green]accepts every flag[/]" if check.ok else f"[red]refuses {len(check.messages())} flag(s)[/]"
        return f"{escape(check.vllm_version or '?')} ({escape(check.where)}): {verdict}"

    seen = kept.last_check(cfg)
    checked = "flags checked in preflight by the image's own parser" if cfg.vllm.check_flags else "flag check off (vllm.check_flags)"
    if seen:
        return f"{escape(str(seen.get('vllm_version')))} [dim](image {escape(str(seen.get('image')))}, seen {escape(str(seen.get('checked_at'))[:19])})[/]; {checked}"
    return f"not checked yet ([bold]--vllm image[/] checks now); {checked}"


def _link_line(cfg: ClusterConfig) -> str:
    from .plan import NOT_DETECTED

    links = kept.links(cfg)
    if not links:
        return f"auto: not detected yet (`doctor` or `up` detects it; until then the variables show {escape(NOT_DETECTED)})"
    return "auto, as last detected: " + "; ".join(
        f"{escape(n)} {escape(p.netdev)}" + (f" + RDMA {escape(','.join(p.hcas))}" if p.hcas else " (no RDMA: NCCL over TCP)")
        for n, p in links.items())


def print_plan(p: Plan, cfg: ClusterConfig, check=None) -> None:
    head = Table.grid(padding=(0, 2))
    head.add_column(no_wrap=True)
    head.add_column(overflow="fold")
    head.add_row("cluster", f"[bold]{p.cluster}[/] ({len(cfg.nodes)} nodes: " + ", ".join(f"{n.name} {n.role} {n.address}" for n in cfg.nodes) + ")")
    head.add_row("executor", p.executor)
    head.add_row("endpoint", p.endpoint)
    head.add_row("model", f"{p.served_model}  ({cfg.model.path})")
    head.add_row("gpu-memory-utilization", f"{p.gpu_memory_utilization}  [dim]← {p.gpu_memory_utilization_source}[/]")
    head.add_row("vllm", _vllm_line(cfg, check))
    if any(cfg.node_nccl(n).auto for n in cfg.nodes):
        head.add_row("nccl", _link_line(cfg))
    head.add_row("plan hash", p.plan_hash)
    out.print(Panel(head, title="spark-cluster plan", expand=False))
    print_steps(p.steps, PHASES)


def print_steps(steps: list, phases) -> None:
    """The steps by phase, numbered; each command printed verbatim (what you see is what runs), then
    what the step may also run."""
    n = 0
    for phase in dict.fromkeys(phases):
        in_phase = [s for s in steps if s.phase == phase]
        if not in_phase:
            continue
        out.rule(f"[bold]{phase}[/]", align="left")
        for step in in_phase:
            n += 1
            where = step.node or "controller"
            limit = f"timeout {step.timeout_s:g}s" + (f", keeps trying for {step.deadline_s:g}s" if step.deadline_s else "")
            out.print(f"[bold cyan]{n:>2}.[/] [bold]{where}[/]  {step.description}  [dim]({limit})[/]", highlight=False)
            first = step.kind == "remove"  # the hosted process stopped and the log saved come before the removal
            for other in step.also if first else ():
                out.print(f"  first: {other}", markup=False, highlight=False, soft_wrap=True, style="dim green")
            if step.command:  # no wrapping, no indent
                out.print(step.command, markup=False, highlight=False, soft_wrap=True, style="green")
            if step.stdin:
                out.print(f"  < standard input: templates/{step.stdin}", markup=False, highlight=False, style="dim")
            for other in () if first else step.also:
                out.print(f"  as needed: {other}", markup=False, highlight=False, soft_wrap=True, style="dim green")


def _json_line(e: dict) -> None:
    sys.stdout.write(json.dumps(e) + "\n")
    sys.stdout.flush()


def _reporter(as_json: bool):
    """Print executor events: JSON lines, or one readable line per finished step."""

    def report(e: dict) -> None:
        if as_json:
            _json_line(e)
            return
        kind = e["event"]
        where = e.get("node") or "controller"
        if kind == "step-ok":
            extra = f" [dim](vLLM {escape(str(e['vllm_version']))})[/]" if e.get("vllm_version") else \
                f" [dim]({escape(str(e['note']))})[/]" if e.get("note") else ""
            out.print(f"[green]✓[/] [dim]{e['duration_s']:7.1f}s[/] {where:10} {e['phase']:13} {escape(e['description'])}{extra}", highlight=False)
        elif kind == "step-failed":
            out.print(f"[red]✗[/] [dim]{e.get('duration_s', 0):7.1f}s[/] {where:10} {e['phase']:13} {escape(e['description'])}", highlight=False)
        elif kind == "step-skip":
            out.print(f"[cyan]=[/] [dim]{'':8}[/] {where:10} {e['phase']:13} {e['description']} [dim]({e['reason']})[/]", highlight=False)
        elif kind == "step-start" and e.get("phase") in ("wait-ray", "ready"):
            out.print(f"[dim]… {'':7} {where:10} {e['phase']:13} {e['description']}[/]", highlight=False)
        elif kind == "container-remove":
            out.print(f"[yellow]-[/] {'':8} {where:10} {'remove':13} {e['container']} [dim]({e['reason']})[/]", highlight=False)
        elif kind == "node-unreachable":
            err.print(f"[yellow]![/] {where}: unreachable: {e['error']}", highlight=False)

    return report


def _nodes(cfg: ClusterConfig):
    from .transport import Nodes

    return Nodes(cfg)


@app.command()
def up(
    config: Path = CONFIG_ARG,
    as_json: bool = typer.Option(False, "--json", help="Print events as JSON lines instead of a progress view."),
    watch_after: bool = typer.Option(False, "--watch", help="Stay on after serving as the controller (like `controller`): "
                                                            "watchdog, gateway, API, metrics, status page."),
) -> None:
    """Bring the cluster to serving: preflight, node tuning, workers then head, Ray, vLLM, a real completion."""
    from .executor import Executor

    cfg = _load(config)

    def run():
        with _nodes(cfg) as nodes:
            return Executor(cfg, nodes, _reporter(as_json)).up()

    res = _guard(run)
    from .watchdog import reset_breaker

    if reset_breaker(cfg, "a successful manual up", recreated=res.changed) and not as_json:
        out.print("[yellow]watchdog:[/] out of its failed state (the circuit breaker is reset)", highlight=False)
    if not as_json:
        if res.changed:
            out.print(f"[bold green]serving[/] at {cfg.endpoint()} (model {cfg.model.name}) after {res.total_s:.1f}s  "
                      f"[dim]phases: {', '.join(f'{k} {v:.1f}s' for k, v in res.phases.items())}[/]", highlight=False)
        else:
            out.print(f"[bold green]serving[/] at {cfg.endpoint()}: nothing changed (all containers up to date)", highlight=False)
    if watch_after:
        _controller(cfg, as_json)


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

    cfg = _load(config)

    def run():
        with _nodes(cfg) as nodes:
            return Executor(cfg, nodes).doctor()

    findings = _guard(run)
    bad = [f for f in findings if f.problem]
    if as_json:
        sys.stdout.write(json.dumps([{"node": f.node, "check": f.check, "description": f.description, "ok": not f.problem,
                                      "problem": f.problem, "note": f.note} for f in findings], indent=2) + "\n")
    else:
        table = Table(title=f"doctor: cluster {cfg.name}", title_justify="left")
        for col in ("node", "check", "", "found"):
            table.add_column(col, overflow="fold")
        for f in findings:
            table.add_row(f.node or "all", escape(f.description), "[red]FAIL[/]" if f.problem else "[green]ok[/]",
                          escape(f.problem or f.note or ""))
        out.print(table)
        if bad:
            err.print(f"[bold red]{len(bad)} problem(s)[/]: `up` would stop before starting anything", highlight=False)
        else:
            out.print("[bold green]ready[/]: `up` would pass its preflight", highlight=False)
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
    nothing. Exit 16 when the folders cannot be made identical."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from .model_sync import ModelSync

    cfg = _load(config)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=False), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=out, disable=as_json)
    tasks: dict[str, Any] = {}

    def report(e: dict) -> None:
        if as_json:
            _json_line(e)
            return
        kind = e["event"]
        if kind == "sync-plan":
            todo = {n: c for n, c in e["copies"].items() if c}
            what = ", ".join(f"{n}: {c} file(s), {e['bytes'][n] / 1e9:.2f} GB" for n, c in todo.items()) or "nothing to copy"
            progress.console.print(f"model {escape(cfg.model.path)}: {e['total_files']} files, {e['total_bytes'] / 1e9:.2f} GB on "
                                   f"{escape(e['source'])}; {escape(what)}", highlight=False)
        elif kind == "sync-start":
            resumed = f", resuming {e['resumed_bytes'] / 1e9:.2f} GB already there" if e["resumed_bytes"] else ""
            tasks[e["target"]] = progress.add_task(f"{e['target']} ({e['via']}{resumed})", total=e["bytes"] or 1)
        elif kind == "sync-progress" and e["target"] in tasks:
            progress.update(tasks[e["target"]], completed=e["bytes"])
        elif kind == "sync-done" and e["target"] in tasks:
            progress.update(tasks[e["target"]], completed=e["bytes"] or 1)
        elif kind == "sync-checksums" and e["ok"]:
            progress.console.print(f"SHA-256 of all {e['files']} files equal on {e['nodes']} nodes", highlight=False)

    def run():
        with _nodes(cfg) as nodes, progress:
            return ModelSync(cfg, nodes, report).run(source=source, checksum=checksum, max_rate_mb_s=max_rate)

    res = _run_until_stopped(run)
    if not as_json:
        copied = {n: c for n, c in res.files.items() if c}
        if copied:
            out.print("[bold green]in sync[/]: " + "; ".join(
                f"{escape(n)} got {c} file(s), {res.sent[n] / 1e9:.2f} GB in {res.seconds[n]:.1f}s" for n, c in copied.items()), highlight=False)
        else:
            out.print(f"[bold green]in sync[/]: every node has the same {res.total_files} files "
                      f"({res.total_bytes / 1e9:.2f} GB); nothing copied", highlight=False)
        for n, extra in res.extra.items():
            if extra:
                err.print(f"[yellow]note:[/] {escape(n)} has {len(extra)} file(s) {escape(str(res.source))} does not have "
                          f"(left alone), e.g. {escape(extra[0])}", highlight=False)


def _controller(cfg: ClusterConfig, as_json: bool) -> None:
    from .controller import serve

    if not as_json:
        gateway, control = cfg.gateway_url(), cfg.controller_url()
        out.print(f"controller: clients use [bold]{gateway}/v1[/] (OpenAI API, failover hidden); status page {control}/ ; "
                  f"metrics {control}/metrics ; API docs {control}/docs", highlight=False)
    _run_until_stopped(lambda: serve(cfg))


@app.command()
def controller(
    config: Path = CONFIG_ARG,
    print_unit: bool = typer.Option(False, "--print-unit", help="Print a systemd unit that runs this controller, and exit."),
) -> None:
    """The long-running controller: the watchdog, a gateway that holds requests while the group restarts
    (/v1 on gateway.port), and on controller.port the API (/api, /docs), Prometheus metrics (/metrics)
    and a status page (/)."""
    cfg = _load(config)
    if print_unit:
        _print_unit(cfg, config, "controller")
        return
    _controller(cfg, False)


def _print_unit(cfg: ClusterConfig, config: Path, command: str) -> None:
    import getpass
    import shutil

    from .render import render

    exe = shutil.which("spark-cluster") or f"{sys.executable} -m spark_cluster"
    sys.stdout.write(render("spark-cluster-watch.service.j2", cluster=cfg.name, config=str(config.resolve()), command=command,
                            state_dir=str(cfg.resolved_state_dir()), user=getpass.getuser(), executable=exe) + "\n")


def _print_watch_event(as_json: bool):
    def show(e: dict) -> None:
        if as_json:
            sys.stdout.write(json.dumps(e, default=str) + "\n")
            sys.stdout.flush()
            return
        kind = e["event"]
        if kind == "executor":
            if e.get("step_event") == "step-ok" and e.get("description"):
                out.print(f"[dim]{e['ts'][11:19]}   {e.get('node') or 'controller':10} {e['description']} ({e['duration_s']:.1f}s)[/]", highlight=False)
            return
        style = {"state": "bold", "decision": "yellow", "incident": "magenta", "restart-start": "bold yellow",
                 "restart-done": "bold green", "restart-failed": "bold red", "alert": "bold red", "canary": "cyan"}.get(kind, "dim")
        detail = {k: v for k, v in e.items() if k not in ("ts", "event", "cluster")}
        text = " ".join(f"{k}={v}" for k, v in detail.items())
        out.print(f"[{style}]{e['ts'][11:19]} {kind:14}[/] {text}", highlight=False)

    return show


def _watch(cfg: ClusterConfig, as_json: bool, max_seconds: Optional[float]) -> None:
    from .watchdog import Watchdog

    def run():
        with _nodes(cfg) as nodes:
            return Watchdog(cfg, nodes, on_event=_print_watch_event(as_json)).run(max_seconds=max_seconds)

    _run_until_stopped(run)


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
    cfg = _load(config)
    if reset:
        from .watchdog import reset_breaker

        done = reset_breaker(cfg, "watch --reset")
        err.print("watchdog: " + ("out of its failed state (the circuit breaker is reset)" if done else "was not failed; nothing to reset"),
                  highlight=False)
    if print_unit:
        _print_unit(cfg, config, "watch")
        return
    _watch(cfg, as_json, max_seconds)


@app.command()
def down(
    config: Path = CONFIG_ARG,
    as_json: bool = typer.Option(False, "--json", help="Print events as JSON lines."),
) -> None:
    """Stop vLLM, the head, then the workers; save their logs locally; remove the containers."""
    from .executor import Executor

    cfg = _load(config)

    def run():
        with _nodes(cfg) as nodes:
            return Executor(cfg, nodes, _reporter(as_json)).down()

    logs = _guard(run)
    if not as_json:
        out.print("down: no cluster container left" + (f"; logs saved in {logs}" if logs else " (nothing was running)"), highlight=False)


@app.command()
def logs(
    config: Path = CONFIG_ARG,
    node: Optional[str] = typer.Argument(None, help="Only this node."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    tail: int = typer.Option(100, "--tail", help="Lines per container (0: all)."),
) -> None:
    """Container logs of the cluster (Ray head/worker, vLLM) from every node, or one."""
    from .executor import list_containers
    from .render import quote

    cfg = _load(config)
    names = [n.name for n in cfg.nodes]
    if node is not None and node not in names:
        err.print(f"[bold red]error:[/] no node {node!r} in {config} (nodes: {', '.join(names)})")
        raise typer.Exit(2)

    def run():
        with _nodes(cfg) as nodes:
            targets = [node] if node else names
            found = [(n, c) for n in targets for c in list_containers(nodes[n], cfg.name)]
            lines = f"--tail {tail if tail else 'all'}"
            if not follow:
                for n, c in found:
                    r = nodes[n].run(f"docker logs {lines} {quote(c.name)} 2>&1", timeout=timeouts.LOG_DUMP_S)
                    out.print(f"[bold]== {n} {c.name} ({c.state})[/]")
                    sys.stdout.write(r.stdout)
                return
            # every container at once, each line prefixed with where it comes from
            lock = threading.Lock()

            def follow_one(n: str, name: str) -> None:
                buf = [""]

                def emit(text: str) -> None:
                    buf[0] += text
                    *done, buf[0] = buf[0].split("\n")
                    with lock:
                        for line in done:
                            sys.stdout.write(f"{n}/{name} | {line}\n")
                        sys.stdout.flush()

                nodes[n].run(f"docker logs --follow {lines} {quote(name)} 2>&1", timeout=timeouts.FOLLOW_LIMIT_S, on_output=emit)

            out.print(f"[bold]== following {', '.join(f'{c.name}@{n}' for n, c in found) or 'nothing'}: Ctrl-C to stop[/]")
            threads = [threading.Thread(target=follow_one, args=(n, c.name), daemon=True) for n, c in found]
            for th in threads:
                th.start()
            while any(th.is_alive() for th in threads):
                time.sleep(0.2)

    try:
        _guard(run)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None




def age(started_at: str, now: Optional[datetime] = None) -> str:
    """`up 4m`-style age of a container from docker's StartedAt (readable at 80 columns)."""
    text = started_at.rstrip("Z")  # docker: UTC, nanoseconds
    if "." in text:
        whole, frac = text.split(".", 1)
        text = f"{whole}.{frac[:6]}"
    try:
        t = datetime.fromisoformat(text).replace(tzinfo=timezone.utc)
    except ValueError:
        return ""
    secs = max(0, int(((now or datetime.now(timezone.utc)) - t).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"up {secs // size}{unit}"
    return f"up {secs}s"


VERDICT_STYLE = {"serving": "bold green", "degraded": "bold yellow", "busy": "bold cyan", "stalled": "bold red", "down": "bold red",
                 "starting": "bold cyan"}
ACTIVITY_STYLE = {"working": "green", "compiling": "cyan", "waiting": "yellow", "stopped": "red", "unknown": "dim"}


def render_status(rep) -> Table:
    o = rep.observation
    title = f"[{VERDICT_STYLE[rep.verdict]}]{rep.verdict.upper()}[/]" + (f"  {rep.reason}" if rep.reason else "")
    nodes = Table(title=None, expand=False, box=None, padding=(0, 1))
    for col in ("node", "ssh", "memory avail/total", "gpu", "sysctl", "ranks"):
        nodes.add_column(col, overflow="fold")
    members = Table(title=None, expand=False, box=None, padding=(0, 1))
    for col in ("node", "container / process", "state"):
        members.add_column(col, overflow="fold")
    for n in o.nodes:
        if not n.reachable:
            nodes.add_row(n.name, f"[red]unreachable[/] {escape(n.error or '')}", "", "", "", "")
            continue
        sysctl = ", ".join(f"{k.split('.')[-1]}={v['actual']}" + ("" if v["actual"] == v["expected"] else f" [red](want {v['expected']})[/]")
                           for k, v in n.sysctl.items())
        mem = f"{n.mem_available_gib:.1f}/{n.mem_total_gib:.1f} GiB" if n.mem_total_gib else "?"
        ranks = f"[{ACTIVITY_STYLE.get(n.activity, 'dim')}]{n.activity}[/] {escape(n.activity_evidence)}" if n.activity else ""
        gpu = (n.gpu or "") + (f", {n.gpu_power_w:g} W" if n.gpu_power_w is not None else "")
        nodes.add_row(f"{n.name} ({n.role})", f"{n.latency_ms:.0f} ms", mem, gpu, sysctl, ranks)
        for c in n.containers:
            members.add_row(n.name, c.name, f"[{'green' if c.state == 'running' else 'red'}]{c.state}[/]"
                            + (f" {age(c.started_at)}" if c.started_at and c.state == "running" else "")
                            + (f", {c.restarts} restarts" if c.restarts else "")
                            + ("" if c.spec_current is not False else " [yellow](other config)[/]"))
        for pr in n.processes:
            members.add_row(n.name, f"  {pr.name} (in {pr.container})", f"[{'green' if pr.state == 'running' else 'red'}]{pr.state}[/]"
                            + (f" pid {pr.pid}" if pr.pid else f" {escape(pr.detail)}"))
    v = o.vllm
    eng = Table.grid(padding=(0, 2))
    eng.add_row("endpoint", v.endpoint)
    eng.add_row("/health", f"{v.health} ({v.health_ms:.0f} ms)" if v.health is not None else f"[red]no answer[/] {v.error or ''}")
    if v.models:
        eng.add_row("models", ", ".join(v.models))
    if v.version:
        eng.add_row("vLLM", v.version + ("" if v.version_source == "server" else " [dim](in the image, at the last preflight)[/]"))
    if v.running is not None:
        eng.add_row("requests", f"{v.running:g} running, {v.waiting or 0:g} waiting")
        eng.add_row("KV cache", f"{(v.kv_cache_usage or 0) * 100:.1f}%")
        eng.add_row("generation", f"{v.generation_tok_s or 0:.1f} tok/s over {v.window_s:.1f}s ({v.steps_in_window or 0:g} engine steps)")
        eng.add_row("last progress", f"{v.progress_age_s:g}s ago" if v.progress_age_s else "now")
    if o.ray.checked:
        eng.add_row("ray", f"alive {', '.join(o.ray.alive) or 'none'}" + (f", [red]dead {', '.join(o.ray.dead)}[/]" if o.ray.dead else "")
                    + (f", {o.ray.gpus:g} GPU" if o.ray.gpus else "") + (f" [red]{o.ray.error}[/]" if o.ray.error else ""))
        for rn in o.ray.nodes:
            res = ", ".join(f"{k} {v:g}" for k, v in sorted(rn.resources.items())
                            if k in ("CPU", "GPU") or not (k.startswith("node:") or k.endswith("memory") or k.startswith("accelerator_type")))
            eng.add_row("", f"{rn.ip} {'alive' if rn.alive else '[red]dead[/]'}: {res}")
        for pg in o.ray.placement_groups:
            where = ", ".join(f"{'+'.join(f'{k} {v:g}' for k, v in b.resources.items())} on {b.ip or 'pending'}" for b in pg.bundles)
            eng.add_row("placement group", f"{pg.id[:12]} {pg.state} {pg.strategy or ''}: {where}")
        if not o.ray.placement_groups and not o.ray.error:
            eng.add_row("placement group", "[dim]none (vLLM has not placed its workers)[/]")
    if o.watchdog:
        w = o.watchdog
        eng.add_row("watchdog", f"{w.get('state')}" + (f", last restart {w.get('last_restart')} ({w.get('last_reason')})" if w.get("last_restart") else ""))
    grid = Table.grid()
    grid.add_row(title)
    grid.add_row(nodes)
    if members.row_count:
        grid.add_row(members)
    grid.add_row(eng)
    grid.add_row(f"[dim]{o.cluster} · {o.executor} · observed in {o.took_s:.2f}s at {o.ts}[/]")
    return grid


@app.command()
def status(
    config: Path = CONFIG_ARG,
    as_json: bool = typer.Option(False, "--json", help="The same content as JSON (schema_version 1)."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh in place."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between refreshes with --watch."),
    window: float = typer.Option(0.5, "--window", help="Seconds over which throughput and progress are sampled."),
) -> None:
    """Is it serving, and if not, where is it broken? One verdict from every node, Ray and vLLM."""
    from .status import begin_vllm
    from .status import status as get_status

    cfg = _load(config)
    # vLLM's sampling window starts before paramiko is even imported: it overlaps the SSH work
    first = begin_vllm(cfg, window, cfg.health.probe_timeout_s)

    def get(vllm=None):
        return _guard(lambda: get_status(cfg, nodes, window_s=window, vllm=vllm))

    with _nodes(cfg) as nodes:
        if watch and not as_json:
            from rich.live import Live

            with Live(render_status(get(first)), console=out, auto_refresh=False) as live:
                try:
                    while True:
                        time.sleep(interval)
                        live.update(render_status(get()), refresh=True)
                except KeyboardInterrupt:
                    return
        while True:
            rep, first = get(first), None
            if as_json:
                sys.stdout.write(rep.model_dump_json(indent=None if watch else 2) + "\n")
                sys.stdout.flush()
            else:
                out.print(render_status(rep))
            if not watch:
                break
            time.sleep(interval)
    if rep.verdict != "serving":
        raise typer.Exit(3)


sim_app = typer.Typer(
    help="The local simulated cluster: N 'Spark' nodes on this machine (namespaces + sshd + dockerd, real vLLM on CPU). Needs root.",
    no_args_is_help=True,
)
app.add_typer(sim_app, name="sim")


@sim_app.command("up")
def sim_up(
    nodes: int = typer.Option(2, "--nodes", "-n", help="How many nodes."),
    image: bool = typer.Option(True, "--image/--no-image", help="Build (or reuse) the node image and load it, with the model, into every node."),
) -> None:
    """Create the simulated nodes (removing what an earlier run left), then load the image and model."""
    from .sim import cluster, image as sim_image, provision

    def run() -> None:
        cluster.check_prerequisites()
        img = None
        if image:
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

    _guard(run)


@sim_app.command("down")
def sim_down() -> None:
    """Remove the simulated cluster: every process, namespace, link and cgroup. Safe to repeat."""
    from .sim import cluster

    _guard(lambda: cluster.down(log=out.print))


@sim_app.command("status")
def sim_status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Which simulated nodes exist and run."""
    from .sim import cluster

    data = _guard(cluster.status)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    if not data["nodes"]:
        out.print("no simulated cluster" + (f" (leftover namespaces: {', '.join(data['namespaces'])})" if data["namespaces"] else ""))
    for n in data["nodes"]:
        out.print(f"{n['name']:8} {n['ip']:12} {'running' if n['running'] else 'STOPPED'}")


@sim_app.command("demo")
def sim_demo(
    config: Path = typer.Option(Path("configs/local-sim.yaml"), "--config", help="The simulated cluster's file."),
    nodes: int = typer.Option(2, "--nodes", "-n"),
) -> None:
    """The main job on the built-in simulated cluster: sim up, `up`, the cluster's containers, a chat completion."""
    from .executor import Executor, list_containers
    from .sim import cluster, image as sim_image, provision

    cfg = _load(config)

    def run() -> None:
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
        with _nodes(cfg) as ns:
            Executor(cfg, ns, _reporter(False)).up()
            serving = time.monotonic()
            out.rule("[bold]4. what runs where")
            ex = Executor(cfg, ns)
            for n in cfg.nodes:
                for c in list_containers(ns[n.name], cfg.name):
                    out.print(f"{n.name:8} {c.name:22} {c.state}", highlight=False)
                for p in ex.plan.processes():
                    if p.node == n.name:
                        fact = ex.process_fact(p)
                        out.print(f"{n.name:8}   {p.name} in {p.container}: {fact.state} (pid {fact.pid})", highlight=False)
            ray_step = next((s for s in ex.plan.steps if s.kind == "wait-ray"), None)
            if ray_step is not None:
                from .facts import read_ray_state

                ray = read_ray_state(ns[ray_step.node], ray_step.command, timeouts.RAY_STATE_S)
                ranks = ", ".join(f"{a.cls} on {a.ip}" for a in sorted(ray.actors, key=lambda a: a.ip or ""))
                out.print(f"Ray: nodes alive {', '.join(ray.alive)}; vLLM ranks (Ray actors): {ranks or ray.error}", highlight=False)
        out.rule("[bold]5. a chat completion through the endpoint")
        import httpx

        body = {"model": cfg.model.name, "messages": [{"role": "user", "content": "Say hello to the Spark cluster."}], "max_tokens": 24}
        try:
            resp = httpx.post(f"{cfg.endpoint()}/v1/chat/completions", json=body, timeout=timeouts.DEMO_COMPLETION_S)
            resp.raise_for_status()
            msg = resp.json()["choices"][0]["message"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            from .sim.cluster import SimError

            raise SimError(f"the chat completion through {cfg.endpoint()} failed: {type(exc).__name__}: {exc}") from None
        reply = msg.get("content") or msg.get("reasoning") or msg.get("reasoning_content") or ""
        out.print(f"[bold]reply[/] (random weights, so random words): {reply!r}", highlight=False)
        out.print(f"[bold green]time to serving:[/] {serving - t_up:.1f}s for `up`, {serving - t0:.1f}s from the start of the demo", highlight=False)
        out.print("tear it down with: make demo-down")

    _guard(run)


@sim_app.command("image")
def sim_image_cmd(force: bool = typer.Option(False, "--force", help="Rebuild even when cached.")) -> None:
    """Build (or reuse) the simulated nodes' image archive and the tiny model."""
    from .sim import image as sim_image

    img = _guard(lambda: sim_image.build(force=force, log=lambda m: err.print(f"[dim]{m}[/]", highlight=False)))
    out.print(f"{img.tag} {img.image_id} {img.archive}" + (f" (built in {img.built_s:.0f}s)" if img.built_s else " (cached)"))


def main() -> None:  # console script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
