"""The `spark-cluster` command. The only place that turns errors into exit codes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from . import __version__
from .config import ClusterConfig, load_config
from .errors import SparkClusterError
from .plan import PHASES, Plan, build_plan

app = typer.Typer(
    name="spark-cluster",
    help="Turn two or more DGX Spark / GB10 boxes into one reliable vLLM endpoint, from one cluster.yaml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

T = TypeVar("T")

CONFIG_ARG = typer.Argument(..., help="The cluster file (cluster.yaml).", show_default=False)


def _guard(fn: Callable[[], T]) -> T:
    """Run library code; a SparkClusterError becomes its message and exit code."""
    try:
        return fn()
    except SparkClusterError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def _load(path: Path) -> ClusterConfig:
    return _guard(lambda: load_config(path))


@app.callback(invoke_without_command=True)
def _main(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        out.print(__version__)
        raise typer.Exit(0)


@app.command()
def validate(config: Path = CONFIG_ARG) -> None:
    """Check cluster.yaml without contacting any node. Exit 2 when it is invalid."""
    cfg = _load(config)
    plan = _guard(lambda: build_plan(cfg))
    out.print(
        f"[green]ok[/] {config}: cluster [bold]{cfg.name}[/], {len(cfg.nodes)} node(s), executor {cfg.executor}, "
        f"TP={cfg.tensor_parallel_size} PP={cfg.vllm.pipeline_parallel_size}, "
        f"gpu-memory-utilization {plan.gpu_memory_utilization} ({plan.gpu_memory_utilization_source})",
        highlight=False,
    )


@app.command()
def schema() -> None:
    """Print the JSON Schema of cluster.yaml (for editor completion)."""
    sys.stdout.write(json.dumps(ClusterConfig.model_json_schema(), indent=2) + "\n")


@app.command()
def plan(
    config: Path = CONFIG_ARG,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON data."),
) -> None:
    """Show, in execution order and per node, every command `up` will run. Contacts nothing."""
    cfg = _load(config)
    p = _guard(lambda: build_plan(cfg))
    if as_json:
        sys.stdout.write(p.model_dump_json(indent=2) + "\n")
        return
    print_plan(p, cfg)


def print_plan(p: Plan, cfg: ClusterConfig) -> None:
    head = Table.grid(padding=(0, 2))
    head.add_column(no_wrap=True)
    head.add_column(overflow="fold")
    head.add_row("cluster", f"[bold]{p.cluster}[/] ({len(cfg.nodes)} nodes: " + ", ".join(f"{n.name} {n.role} {n.address}" for n in cfg.nodes) + ")")
    head.add_row("executor", p.executor)
    head.add_row("endpoint", p.endpoint)
    head.add_row("model", f"{p.served_model}  ({cfg.model.path})")
    head.add_row("gpu-memory-utilization", f"{p.gpu_memory_utilization}  [dim]← {p.gpu_memory_utilization_source}[/]")
    head.add_row("plan hash", p.plan_hash)
    out.print(Panel(head, title="spark-cluster plan", expand=False))
    n = 0
    for phase in PHASES:
        steps = p.steps_in(phase)
        if not steps:
            continue
        out.rule(f"[bold]{phase}[/]", align="left")
        for step in steps:
            n += 1
            where = step.node or "controller"
            limit = f"timeout {step.timeout_s:g}s" + (f", keeps trying for {step.deadline_s:g}s" if step.deadline_s else "")
            out.print(f"[bold cyan]{n:>2}.[/] [bold]{where}[/]  {step.description}  [dim]({limit})[/]", highlight=False)
            if step.command:
                # printed verbatim (no wrapping, no indent): what you see is what runs
                out.print(step.command, markup=False, highlight=False, soft_wrap=True, style="green")


def main() -> None:  # console script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
