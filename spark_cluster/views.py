"""What the CLI prints: the plan, executor and watchdog events, `status`, the simulated nodes.
Rendering only: nothing here contacts a node."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Optional

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.rule import Rule
from rich.table import Table

from . import kept
from .config import ClusterConfig
from .observation import RayObs
from .steps import PHASES, Plan

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


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
    from .steps import NOT_DETECTED

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


def json_line(e: dict) -> None:
    sys.stdout.write(json.dumps(e) + "\n")
    sys.stdout.flush()


def step_reporter(as_json: bool):
    """Print executor events: JSON lines, or one readable line per finished step."""

    def report(e: dict) -> None:
        if as_json:
            json_line(e)
            return
        kind = e["event"]
        where = e.get("node") or (f"group {e['group']}" if e.get("group") else "controller")
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
        elif kind == "preflight-warning":
            err.print(f"[yellow]![/] {where}: warning: {escape(e['warning'])}", highlight=False)
        elif kind == "memory-short":
            out.print(f"[yellow]…[/] {'':7} {where:10} {'memory':13} waiting for memory to come back: {escape(e['short'])}", highlight=False)
        elif kind.startswith("roll-"):
            said = {"roll-group": "group {group}", "roll-skip": "group {group}: unchanged", "roll-drain": "group {group}: draining "
                    "({in_flight} in flight): {why}", "roll-drained": "group {group}: drained ({cut} cut)", "roll-done":
                    "group {group}: serves the new config ({seconds}s)", "roll-failed": "group {group}: failed: {error}"}
            out.print(f"[bold]»[/] {escape(said.get(kind, kind).format_map(defaultdict(str, e)))}", highlight=False)

    return report


def watch_event_printer(as_json: bool):
    """Print watchdog events: JSON lines, or one line each (an executor step only when it finished)."""
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


def _ray_rows(eng: Table, ray: RayObs) -> None:
    """Ray's nodes and the engine's placement group, when Ray was asked."""
    if not ray.checked:
        return
    eng.add_row("ray", f"alive {', '.join(ray.alive) or 'none'}" + (f", [red]dead {', '.join(ray.dead)}[/]" if ray.dead else "")
                + (f", {ray.gpus:g} GPU" if ray.gpus else "") + (f" [red]{ray.error}[/]" if ray.error else ""))
    for rn in ray.nodes:
        res = ", ".join(f"{k} {v:g}" for k, v in sorted(rn.resources.items())
                        if k in ("CPU", "GPU") or not (k.startswith("node:") or k.endswith("memory") or k.startswith("accelerator_type")))
        eng.add_row("", f"{rn.ip} {'alive' if rn.alive else '[red]dead[/]'}: {res}")
    for pg in ray.placement_groups:
        where = ", ".join(f"{'+'.join(f'{k} {v:g}' for k, v in b.resources.items())} on {b.ip or 'pending'}" for b in pg.bundles)
        eng.add_row("placement group", f"{pg.id[:12]} {pg.state} {pg.strategy or ''}: {where}")
    if not ray.placement_groups and not ray.error:
        eng.add_row("placement group", "[dim]none (vLLM has not placed its workers)[/]")


def _watch_rows(eng: Table, rep) -> None:
    """Which restart a hang would get now, and the watchdog's state where one runs."""
    if rep.restart:
        eng.add_row("on a hang", f"the {rep.restart} restart: {escape(rep.restart_why)}")
    if rep.kv:
        eng.add_row("kv cache", escape(rep.kv))
    if rep.caches:
        eng.add_row("caches", escape("; ".join(rep.caches)))
    if rep.slow:
        eng.add_row("[bold yellow]slow[/]", escape(rep.slow))
    w = rep.observation.watchdog
    if w:
        eng.add_row("watchdog", f"{w.get('state')}" + (f", last restart {w.get('last_restart')} ({w.get('last_reason')})" if w.get("last_restart") else ""))


def render_status(rep) -> Table:
    """A status report as a table; a cluster of several groups as its verdict, then each group's."""
    if hasattr(rep, "groups"):
        grid = Table.grid()
        grid.add_row(f"[{VERDICT_STYLE[rep.verdict]}]{rep.verdict.upper()}[/]  {escape(rep.reason)}")
        for label, one in rep.groups.items():
            grid.add_row(Rule(f"group {label}", align="left"))
            grid.add_row(render_status(one))
        return grid
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
        gpu = (n.gpu or "") + (f", {n.gpu_power_w:g} W" if n.gpu_power_w is not None else "") + (f"; {n.gpu_heat}" if n.gpu_heat else "")
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
    _ray_rows(eng, o.ray)
    _watch_rows(eng, rep)
    grid = Table.grid()
    grid.add_row(title)
    grid.add_row(nodes)
    if members.row_count:
        grid.add_row(members)
    grid.add_row(eng)
    grid.add_row(f"[dim]{o.cluster} · {o.executor} · observed in {o.took_s:.2f}s at {o.ts}[/]")
    return grid


def print_down_plan(cfg: ClusterConfig, d) -> None:
    from .lifecycle import DOWN_PHASES

    how = "stop in order:" if d.graceful else "SIGKILL in order, then remove:"
    out.print(Panel(f"[bold]{escape(cfg.name)}[/]: {how} vLLM, the head, the workers; every container's log saved under "
                    "state_dir/logs/", title="spark-cluster plan --down", expand=False))
    print_steps(d.steps, DOWN_PHASES)


def print_restart_plan(cfg: ClusterConfig, r) -> None:
    from .lifecycle import DOWN_PHASES

    out.print(Panel(f"[bold]{escape(cfg.name)}[/] on a hang: {escape(r.on_hang)}", title="spark-cluster plan --restart", expand=False))
    if r.kept is not None:
        out.rule("[bold]the kept restart[/] (a part that fails: the full restart below)", align="left")
        print_steps(r.kept, ("kill", *PHASES))
    out.rule("[bold]the full restart[/]: the kill, then `up`", align="left")
    print_steps(r.full_kill.steps, DOWN_PHASES)
    print_steps(r.full_up.steps, PHASES)


def print_findings(cfg: ClusterConfig, findings: list) -> None:
    """`doctor`'s table, then what `up` would do."""
    table = Table(title=f"doctor: cluster {cfg.name}", title_justify="left")
    for col in ("node", "check", "", "found"):
        table.add_column(col, overflow="fold")
    for f in findings:
        verdict = "[red]FAIL[/]" if f.problem else "[yellow]WARN[/]" if f.warning else "[green]ok[/]"
        found = f.problem or "; ".join(x for x in (f.warning, f.note) if x)
        table.add_row(f.node or "all", escape(f.description), verdict, escape(found))
    out.print(table)
    bad = [f for f in findings if f.problem]
    warned = [f for f in findings if not f.problem and f.warning]
    if bad:
        err.print(f"[bold red]{len(bad)} problem(s)[/]: `up` would stop before starting anything", highlight=False)
    else:
        out.print("[bold green]ready[/]: `up` would pass its preflight"
                  + (f" [yellow](with {len(warned)} warning(s), said again by `up`)[/]" if warned else ""), highlight=False)


def sync_reporter(cfg: ClusterConfig, as_json: bool):
    """`sync`'s progress bars (or JSON lines) and the reporter that moves them."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=False), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=out, disable=as_json)
    tasks: dict[str, Any] = {}

    def report(e: dict) -> None:
        if as_json:
            json_line(e)
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
        elif kind == "cache-sync-plan":
            todo = ", ".join(f"{n}: {c} file(s)" for n, c in e["copies"].items())
            what = f"sealed on {e['source']}, to copy: {todo}" if todo else e["why"]
            progress.console.print(f"caches: {escape(what)}", highlight=False)
        elif kind == "cache-synced":
            aside = f", {e['set_aside']} set aside" if e["set_aside"] else ""
            progress.console.print(f"caches: {escape(e['target'])} has {escape(e['source'])}'s sealed cache ({e['files']} file(s), "
                                   f"{e['copied']} copied{aside})", highlight=False)
        elif kind == "warning":
            progress.console.print(f"[yellow]warning[/] {escape(e.get('node') or '')}: {escape(e['message'])}", highlight=False)

    return progress, report


def print_synced(res) -> None:
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


def print_up_result(cfg: ClusterConfig, res) -> None:
    if res.changed:
        out.print(f"[bold green]serving[/] at {cfg.endpoint()} (model {cfg.model.name}) after {res.total_s:.1f}s  "
                  f"[dim]phases: {', '.join(f'{k} {v:.1f}s' for k, v in res.phases.items())}[/]", highlight=False)
    else:
        out.print(f"[bold green]serving[/] at {cfg.endpoint()}: nothing changed (all containers up to date)", highlight=False)


def print_sim_status(data: dict) -> None:
    if not data["nodes"]:
        out.print("no simulated cluster" + (f" (leftover namespaces: {', '.join(data['namespaces'])})" if data["namespaces"] else ""))
    for n in data["nodes"]:
        out.print(f"{n['name']:8} {n['ip']:12} {'running' if n['running'] else 'STOPPED'}")


def print_valid(path, cfg: ClusterConfig, plan: Plan) -> None:
    groups = f" as {len(cfg.groups)} groups ({', '.join(f'{g.name}: ' + ' '.join(g.nodes) for g in cfg.groups)})" if cfg.groups else ""
    out.print(f"[green]ok[/] {path}: cluster [bold]{cfg.name}[/], {len(cfg.nodes)} node(s){groups}, executor {cfg.executor}, "
              f"TP={cfg.tensor_parallel_size} PP={cfg.vllm.pipeline_parallel_size}, "
              f"gpu-memory-utilization {plan.gpu_memory_utilization} ({plan.gpu_memory_utilization_source})", highlight=False)


def show_status(first, again, *, as_json: bool, watch: bool, interval: float):
    """`status`: the first report (`first()`), then with watch a new one (`again()`) every interval,
    refreshed in place (or a JSON line each); the last report, None when Ctrl-C ended a live view."""
    import time

    if watch and not as_json:
        from rich.live import Live

        with Live(render_status(first()), console=out, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(interval)
                    live.update(render_status(again()), refresh=True)
            except KeyboardInterrupt:
                return None
    get = first
    while True:
        rep, get = get(), again
        if as_json:
            sys.stdout.write(rep.model_dump_json(indent=None if watch else 2) + "\n")
            sys.stdout.flush()
        else:
            out.print(render_status(rep))
        if not watch:
            return rep
        time.sleep(interval)
