"""Where the CLI turns errors into messages and exit codes (spark_cluster.errors): every command
runs library code through `guard`; nothing else catches a SparkClusterError to exit."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

import typer
from rich.markup import escape

from .config import ClusterConfig, load_config
from .errors import SparkClusterError
from .views import err

T = TypeVar("T")


def guard(fn: Callable[[], T]) -> T:
    """Run library code; a SparkClusterError becomes its message and exit code."""
    try:
        return fn()
    except SparkClusterError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def run_until_stopped(fn: Callable[[], T]) -> T:
    """A long-running command: as guard, and Ctrl-C ends it with exit code 130 (no traceback)."""
    try:
        return guard(fn)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def load(path: Path) -> ClusterConfig:
    return guard(lambda: load_config(path))
