"""The docs say the defaults the code has: every `section.key` (value) or unambiguous `key` (value)
in README.md and docs/*.md is checked against the settings' default (ports, timeouts, sizes,
bounds); the exit codes' table is checked by tests/test_cli.py, the configuration reference by
tests/test_cli.py too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spark_cluster.config import ClusterConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MENTION = re.compile(r"`((?:[a-z]+\.)?[a-z][a-z_]+)` \((\d[\w.]*)(?: ?(s|seconds|ms))?[),:; ]")


def settings() -> dict[str, object]:
    """Every setting's default by `section.key`, and by `key` alone where only one section has it."""
    found: dict[str, object] = {}
    bare: dict[str, list[object]] = {}
    for section, field in ClusterConfig.model_fields.items():
        model = field.annotation
        for key, sub in getattr(model, "model_fields", {}).items():
            found[f"{section}.{key}"] = sub.default
            bare.setdefault(key, []).append(sub.default)
    found.update({k: v[0] for k, v in bare.items() if len(v) == 1 and k not in found})
    return found


def mentions() -> list[tuple[str, str, str]]:
    known = settings()
    return [(p.name, m.group(1), m.group(2)) for p in DOCS for m in MENTION.finditer(p.read_text()) if m.group(1) in known]


def same(said: str, default: object) -> bool:
    if isinstance(default, str):
        return said.lower() == default.lower()
    try:
        return float(said) == float(default)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def test_the_docs_mention_defaults():
    assert len(mentions()) >= 20  # the check sees what it checks


@pytest.mark.parametrize("doc, key, said", mentions())
def test_each_documented_default_is_the_codes(doc, key, said):
    assert same(said, settings()[key]), f"{doc} says `{key}` ({said}); the code's default is {settings()[key]!r}"


def test_a_wrong_default_in_the_docs_is_found():
    text = "`gateway.hold_s` (60 s) and `stall_window_s` (10 s)"
    found = {m.group(1): m.group(2) for m in MENTION.finditer(text + " ")}
    assert not same(found["gateway.hold_s"], settings()["gateway.hold_s"]) and same(found["stall_window_s"], settings()["stall_window_s"])
