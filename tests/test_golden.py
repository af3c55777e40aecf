"""Golden tests: config in, plan out, per node and step, for every example config.

After an intended change: `make golden`, then review the diff of tests/golden/
"""

from __future__ import annotations

import json
import os

import pytest

from spark_cluster.config import load_config
from spark_cluster.lifecycle import build_down_plan
from spark_cluster.plan import build_plan

from .conftest import EXAMPLE_CONFIGS, ROOT

GOLDEN = ROOT / "tests" / "golden"


def readable(plan) -> str:
    lines = []
    for step in plan.steps:
        lines.append(f"## {step.id}  [{step.kind} on {step.node or 'controller'}] {step.description}")
        if step.check is not None:
            lines.append(f"# check {json.dumps(step.check.model_dump(), sort_keys=True)}")
        lines.append(step.command or "")
        if step.stdin:
            lines.append(f"# stdin templates/{step.stdin}")
        lines += [f"# also: {other}" for other in step.also]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.stem)
def test_plan_matches_golden(path):
    outputs = {}
    whole = load_config(path)
    for label, cfg in whole.group_configs():  # a config of groups: one golden set per group
        stem = f"{path.stem}.{label}" if whole.groups else path.stem
        plan = build_plan(cfg)
        outputs.update({
            GOLDEN / f"{stem}.plan.json": plan.model_dump_json(indent=2) + "\n",
            GOLDEN / f"{stem}.plan.txt": readable(plan),
            GOLDEN / f"{stem}.down.txt": readable(build_down_plan(cfg, plan)),
            GOLDEN / f"{stem}.kill.txt": readable(build_down_plan(cfg, plan, graceful=False)),
        })
    for golden, text in outputs.items():
        if os.environ.get("UPDATE_GOLDEN"):
            golden.parent.mkdir(exist_ok=True)
            golden.write_text(text)
        assert golden.exists(), f"{golden} missing: run make golden"
        assert text == golden.read_text(), f"plan of {path.name} changed: if intended, run make golden and review the diff"
