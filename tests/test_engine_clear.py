"""What is left of an engine is cleared before another starts in its container (lifecycle's
clear_engine_command): run for real, in a PID namespace of its own (it kills by command line, so
never on this machine's own process table), among decoys named as vLLM's and Ray's processes are."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest

from spark_cluster.lifecycle import clear_engine_command

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare for a PID namespace")

# each decoy: a process whose command line is the name given (bash's exec -a), the names passed in the
# environment so that no command line of the harness itself reads like an engine's
HARNESS = """
for name in "$ENGINE_API" "$ENGINE_CORE" "$RANK" "$OTHER"; do N="$name" bash -c 'exec -a "$N" sleep 60' & done
if [ -n "$RESPAWN" ]; then (while :; do N="$ENGINE_API" bash -c 'exec -a "$N" sleep 60' & sleep 0.1; done) & fi
sleep 0.5
sh -c "$CLEAR" clear "$WAIT"; echo "exit $?"
for d in /proc/[0-9]*; do tr '\\0' ' ' < "$d/cmdline"; echo; done
"""
NAMES = {"ENGINE_API": "/usr/bin/python3 /usr/local/bin/vllm serve /models/x", "ENGINE_CORE": "VLLM::EngineCore",
         "RANK": "ray::RayWorkerWrapper", "OTHER": "python3 -m http.server"}


def cleared(respawn: bool = False, wait: int = 4) -> tuple[str, list[str]]:
    """What the clear said (and its exit), and the decoys left (their names)."""
    script = shlex.split(clear_engine_command("c"))[5]  # docker exec c sh -c SCRIPT ...: the script run in the container
    env = {**os.environ, **NAMES, "CLEAR": script, "WAIT": str(wait), "RESPAWN": "1" if respawn else ""}
    res = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", HARNESS], env=env,
                         capture_output=True, text=True, timeout=60)
    lines = res.stdout.splitlines()
    said = "\n".join(line for line in lines[:lines.index(next(x for x in lines if x.startswith("exit "))) + 1])
    return said, sorted({line.removesuffix(" 60 ") for line in lines if line.endswith(" 60 ")})


def test_the_api_server_and_the_engine_core_are_killed_and_nothing_else():
    said, left = cleared()
    assert said == "exit 0", said
    assert left == sorted([NAMES["RANK"], NAMES["OTHER"]]), left


def test_an_engine_that_will_not_go_is_named_within_the_bound():
    said, _ = cleared(respawn=True, wait=2)
    assert "engine processes still there: " in said and said.endswith("exit 1"), said
