"""Jinja2 rendering of what runs on the nodes. Pure: reads templates, nothing else."""

from __future__ import annotations

import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from .errors import RenderError


def templates_dir() -> Path:
    here = Path(__file__).resolve().parent
    # installed wheel: spark_cluster/templates; source checkout / editable install: ../templates
    for candidate in (here / "templates", here.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise RenderError(f"templates folder not found next to {here}")


def quote(value: Any) -> str:
    """The one shell-quoting function: every value that reaches a shell goes through it."""
    return shlex.quote(str(value))


def argv_lines(argv: list[str], indent: str = "    ") -> str:
    """Quote argv for a shell; each --flag starts a continued line (readable, same words)."""
    out = ""
    for i, arg in enumerate(argv):
        if i and arg.startswith("--"):
            out += " \\\n" + indent
        elif i:
            out += " "
        out += quote(arg)
    return out


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["q"] = quote
    env.filters["argv"] = argv_lines
    return env


def render(name: str, **context: Any) -> str:
    try:
        return _env().get_template(name).render(**context).strip()
    except jinja2.TemplateError as exc:
        raise RenderError(f"template {name}: {exc}") from exc


def render_argv(name: str, **context: Any) -> list[str]:
    """Render a template that lists shell words (values quoted with |q) and split it into argv."""
    return shlex.split(render(name, **context))


def read_template(name: str) -> str:
    try:
        return (templates_dir() / name).read_text()
    except OSError as exc:
        raise RenderError(f"template {name}: {exc}") from exc
