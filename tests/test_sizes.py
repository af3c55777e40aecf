"""Sizes a reader can hold in their head: no module over 500 lines, no class over 300, no function
over 60, the CLI under 400 (the commands only: rendering, errors and the simulation live elsewhere)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "spark_cluster"
LIMITS = {"module": 500, "class": 300, "function": 60}
CLI_LIMIT = 400


def oversized(source: str, name: str) -> list[str]:
    """What in one module's source is over its limit, as 'name: kind N lines'."""
    found = []
    lines = len(source.splitlines())
    if lines > LIMITS["module"]:
        found.append(f"{name}: module {lines} lines")
    for node in ast.walk(ast.parse(source)):
        kind = "class" if isinstance(node, ast.ClassDef) else "function" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        if kind is not None and node.end_lineno - node.lineno + 1 > LIMITS[kind]:
            found.append(f"{name}: {kind} {node.name} {node.end_lineno - node.lineno + 1} lines")
    return found


def test_no_module_class_or_function_is_over_its_limit():
    found = [x for p in sorted(PACKAGE.rglob("*.py")) for x in oversized(p.read_text(), str(p.relative_to(PACKAGE.parent)))]
    assert found == []


def test_the_cli_holds_commands_only():
    assert len((PACKAGE / "cli.py").read_text().splitlines()) < CLI_LIMIT


def test_the_size_check_finds_what_is_over():
    long_function = "def f():\n" + "    x = 1\n" * 60
    long_class = "class C:\n" + "    x = 1\n" * 300
    assert oversized(long_function, "m.py") == ["m.py: function f 61 lines"]
    assert oversized(long_class, "m.py") == ["m.py: class C 301 lines"]
    assert oversized("x = 1\n" * 501, "m.py") == ["m.py: module 501 lines"]
    assert oversized("def f():\n" + "    x = 1\n" * 59, "m.py") == []


def imports_of(module: str) -> set[str]:
    """The package's modules `module` imports (relative imports, at any depth of its code)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return found


def reached(start: str, stop: set[str]) -> set[str]:
    """The package's modules `start` reaches by its imports, not going through those in `stop`."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen or m in stop or not (PACKAGE / f"{m}.py").exists():
            continue
        seen.add(m)
        todo += imports_of(m)
    return seen


GATEWAY_AND_CONTROL_PLANE = ["gateway", "front", "upstream", "door", "routing", "client_bounds", "control_api", "control_guard", "metrics"]


def test_the_gateway_and_the_control_plane_reach_the_executor_only_through_the_controller():
    for m in GATEWAY_AND_CONTROL_PLANE:
        assert not {"executor", "rollout"} & reached(m, stop={"controller"}), m
    assert "executor" in reached("controller", stop=set())  # the check sees what it looks for


def test_no_test_file_imports_another():
    """Shared helpers live in modules of their own (cluster_helpers, fakes, samples, gateway_rig...)."""
    tests = Path(__file__).parent
    found = [f"{p.name}: {node.module}" for p in sorted(tests.glob("test_*.py")) for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1].startswith("test_")]
    assert found == []
