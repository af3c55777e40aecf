"""Golden tests: config in, plan out, per node and step, for every example config.

After an intended change: `UPDATE_GOLDEN=1 make test-unit`, then review the diff of tests/golden/.
"""

from __future__ import annotations

import json
import os

import pytest

from spark_cluster.config import load_config
from spark_cluster.plan import build_plan

from .conftest import EXAMPLE_CONFIGS, ROOT

GOLDEN = ROOT / "tests" / "golden"


def readable(plan) -> str:
    lines = []
    for step in plan.steps:
        lines.append(f"## {step.id}  [{step.kind} on {step.node or 'controller'}] {step.description}")
        if step.expect:
            lines.append(f"# expect {json.dumps(step.expect, sort_keys=True)}")
        lines.append(step.command or "")
        if step.stdin:
            lines.append(f"# stdin templates/{step.stdin}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.stem)
def test_plan_matches_golden(path):
    plan = build_plan(load_config(path))
    outputs = {
        GOLDEN / f"{path.stem}.plan.json": plan.model_dump_json(indent=2) + "\n",
        GOLDEN / f"{path.stem}.plan.txt": readable(plan),
    }
    for golden, text in outputs.items():
        if os.environ.get("UPDATE_GOLDEN"):
            golden.parent.mkdir(exist_ok=True)
            golden.write_text(text)
        assert golden.exists(), f"{golden} missing: run UPDATE_GOLDEN=1 pytest tests/test_golden.py"
        assert text == golden.read_text(), f"plan of {path.name} changed: review, then UPDATE_GOLDEN=1"
