from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
EXAMPLE_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


@pytest.fixture
def card_yaml() -> str:
    return (CONFIGS / "dgx-spark-2node.yaml").read_text()


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None):
    """Run the real console entry point in a subprocess (as a user would)."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "spark_cluster", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=60,
    )
