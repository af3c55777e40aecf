"""Property: no string field of cluster.yaml can break out of its shell quoting.

For arbitrary text in every free string field, each rendered command, run by a real bash
with `docker`/`sysctl`/... replaced by argv printers, yields exactly the intended words,
and a canary file is never created.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from spark_cluster.config import parse_config
from spark_cluster.errors import ConfigError
from spark_cluster.plan import build_plan

from .conftest import CONFIGS

CARD = yaml.safe_load((CONFIGS / "dgx-spark-2node.yaml").read_text())
CANARY = "/tmp/spark-cluster-quoting-canary"

# Text that is hostile to shells: metacharacters, quotes, newlines, expansions, unicode.
TOKENS = list(" ;|&$`'\"\\\n\t(){}[]<>*?~#!=:,/.-_aZ9é") + [f"$(touch {CANARY})", f";touch {CANARY};", "${IFS}", "'$'"]
shellish = st.one_of(
    st.lists(st.sampled_from(TOKENS), min_size=1, max_size=12).map("".join),
    # any text a shell can be handed (a NUL cannot be part of an argv: cluster.yaml refuses it, tested in test_config)
    st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=20),
)

# every program a plan's commands call is replaced by an argv printer: nothing runs, nothing is addressed
# (the link gate's `ip` and `ping` would reach for the example configs' node addresses)
STUBS = "".join(f'{name}() {{ printf "%s\\0" "$@"; }}\n' for name in (
    "docker", "sysctl", "tee", "ss", "grep", "cd", "find", "sort", "ip", "ping", "sed", "date", "df", "sudo", "ibdev2netdev"))


SANDBOX = tempfile.mkdtemp(prefix="spark-cluster-quoting-")


def words(command: str) -> list[str]:
    # run in an empty folder: if quoting ever broke, stray redirections land there, not in the repo
    # and with no PATH: a program added to a plan later and not stubbed here fails to start instead of running
    res = subprocess.run(["/bin/bash", "-c", STUBS + command], capture_output=True, timeout=10, cwd=SANDBOX, stdin=subprocess.DEVNULL,
                         env={"PATH": "/nonexistent"})
    return res.stdout.decode(errors="surrogateescape").split("\0")


@settings(suppress_health_check=[HealthCheck.too_slow])  # examples: conftest's profiles
@given(
    path=shellish, served=shellish, env_val=shellish, extra=shellish, mount=shellish, parser=shellish, nccl=shellish,
)
def test_no_field_breaks_out_of_quoting(path, served, env_val, extra, mount, parser, nccl):
    data = yaml.safe_load(yaml.safe_dump(CARD))
    data["model"]["path"] = "/" + path
    data["model"]["container_path"] = "/c" + path
    data["model"]["served_name"] = served
    data["container"]["env"]["USER_VALUE"] = env_val
    data["container"]["extra_args"] = [extra]
    data["container"]["mounts"] = [{"source": "/" + mount, "target": "/t" + mount}]
    data["vllm"]["reasoning_parser"] = parser
    data["vllm"]["extra_args"] = ["--x", extra]
    data["nccl"]["socket_ifname"] = nccl
    data["nodes"][1]["env"] = {"NODE_VALUE": env_val}
    try:
        cfg = parse_config(yaml.safe_dump(data))
    except ConfigError:
        assume(False)  # refused before anything runs (e.g. a model path of /): not a quoting case, not counted
    plan = build_plan(cfg)
    import os

    for step in plan.steps:
        if not step.command or step.kind == "http":
            continue
        got = words(step.command)
        if step.container is not None:
            spec = step.container
            assert got[: len(["run"])] == ["run"]
            tail = got[got.index(spec.image) + 1:-1] if got[-1] == "" else got[got.index(spec.image) + 1:]
            assert tail == spec.command
            assert f"USER_VALUE={env_val}" in got
            assert f"NCCL_SOCKET_IFNAME={nccl}" in got
            assert extra in got
            assert f"/{mount}:/t{mount}" in got
        assert shlex.split(step.command)  # also a valid word list for a POSIX shell parser
    assert not os.path.exists(CANARY)
    vllm = plan.vllm_argv
    assert vllm[vllm.index("--served-model-name") + 1] == served
    assert vllm[vllm.index("--reasoning-parser") + 1] == parser
    assert vllm[1] == "/c" + path
