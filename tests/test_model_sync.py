"""`spark-cluster sync` on the simulated cluster: a model folder copied from the head to a worker that
lacks it, node to node over the cluster addresses, killed halfway and resumed, then nothing to do."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from spark_cluster.sim import cluster

from .conftest import ROOT, SIM_CONFIG

pytestmark = pytest.mark.cluster
FOLDER = "sync-test"


def on(node: str):
    return cluster.SIM_ROOT / "nodes" / node / "srv" / "models" / FOLDER


def digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def sync(path: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "spark_cluster", "sync", path, "--json", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def events(proc: subprocess.Popen) -> list[dict]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_sync_copies_over_the_cluster_link_resumes_after_a_kill_and_then_has_nothing_to_do(sim, tmp_path):
    src, dst = on("sim-1"), on("sim-2")
    for d in (src, dst):
        subprocess.run(["rm", "-rf", str(d)], check=True)
    # a Hugging Face snapshot: the files are symlinks into blobs/ (read through: the worker gets regular files)
    (src / "blobs").mkdir(parents=True)
    (src / "blobs" / "weights").write_bytes(os.urandom(48 * 1024 * 1024))
    (src / "blobs" / "config").write_text('{"architectures": ["Qwen3ForCausalLM"]}')
    snapshot = src / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").symlink_to("../blobs/weights")
    (snapshot / "config.json").symlink_to("../blobs/config")
    data = yaml.safe_load(SIM_CONFIG.read_text())
    data["model"]["path"] = f"/srv/models/{FOLDER}/snapshot"
    data["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        # 48 MB at 16 MB/s: killed after about a second, a part of the weights is on the worker
        first = sync(str(path), "--max-rate", "16", start_new_session=True)
        partial = dst / "snapshot.partial-sync" / "model.safetensors"  # next to the model folder
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 8 * 1024 * 1024):
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        time.sleep(1)  # the nodes' sides end when their connections do
        cut = partial.stat().st_size
        assert 0 < cut < 48 * 1024 * 1024 and not (dst / "snapshot" / "model.safetensors").exists()

        second = events(sync(str(path), "--checksum"))
        start = next(e for e in second if e["event"] == "sync-start")
        assert start["target"] == "sim-2" and start["via"] == "10.99.0.11 -> 10.99.0.12"  # the cluster addresses
        # config.json went whole before the kill; the weights resume where the copy stopped
        assert start["files"] == 1 and start["resumed_bytes"] >= cut and start["bytes"] == 48 * 1024 * 1024 - start["resumed_bytes"]
        assert any(e["event"] == "sync-checksums" and e["ok"] for e in second)
        assert digest(dst / "snapshot") == digest(src / "snapshot")
        assert not (dst / "snapshot" / "model.safetensors").is_symlink() and not (dst / "snapshot.partial-sync").exists()

        third = events(sync(str(path)))
        plan = next(e for e in third if e["event"] == "sync-plan")
        assert plan["copies"] == {"sim-2": 0} and not [e for e in third if e["event"] == "sync-start"]
    finally:
        for d in (src, dst):
            subprocess.run(["rm", "-rf", str(d)], check=True)
