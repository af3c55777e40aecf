"""Which node the model is copied from and what each other node lacks (spark_cluster/sync.py):
table tests over folder listings as the model check reads them (facts.parse_file_listing); where a
cut-off copy resumes (model_sync.py); the node-side copier itself, run here over loopback."""

from __future__ import annotations

import json
import socket
import os
import subprocess
import sys
import time

import pytest

from spark_cluster.facts import parse_file_listing
from spark_cluster.model_sync import parse_checksums, resume_points
from spark_cluster.render import read_template
from spark_cluster.sync import SyncPlan, plan_sync

GB = 1 << 30
MODEL = {"config.json": 1_500, "tokenizer.json": 11_000_000, "model-00001-of-00002.safetensors": 5 * GB,
         "model-00002-of-00002.safetensors": 3 * GB, "model.safetensors.index.json": 60_000}


def without(files: dict, *paths: str) -> dict:
    return {p: s for p, s in files.items() if p not in paths}


HALF = {"model-00002-of-00002.safetensors": GB}  # a copy cut off at 1 GiB of 3


@pytest.mark.parametrize("listings, prefer, source, expected", [
    # the head has it, the worker nothing: everything goes to the worker
    ({"spark-1": MODEL, "spark-2": None}, "spark-1", None,
     SyncPlan("spark-1", {"spark-2": tuple(sorted(MODEL))}, {"spark-2": sum(MODEL.values())}, {"spark-2": ()})),
    # the worker downloaded it, not the head: copy from the worker
    ({"spark-1": {}, "spark-2": MODEL}, "spark-1", None,
     SyncPlan("spark-2", {"spark-1": tuple(sorted(MODEL))}, {"spark-1": sum(MODEL.values())}, {"spark-1": ()})),
    # a half-copied shard is shorter: only it is copied again
    ({"spark-1": MODEL, "spark-2": {**MODEL, **HALF}}, "spark-1", None,
     SyncPlan("spark-1", {"spark-2": ("model-00002-of-00002.safetensors",)}, {"spark-2": 3 * GB}, {"spark-2": ()})),
    # identical everywhere: nothing to copy (a second sync copies nothing)
    ({"spark-1": MODEL, "spark-2": dict(MODEL), "spark-3": dict(MODEL)}, "spark-1", None,
     SyncPlan("spark-1", {"spark-2": (), "spark-3": ()}, {"spark-2": 0, "spark-3": 0}, {"spark-2": (), "spark-3": ()})),
    # a file only one node has is part of the whole: that node is the source (every node ends up the same)
    ({"spark-1": MODEL, "spark-2": {**MODEL, "notes.txt": 10}}, "spark-1", None,
     SyncPlan("spark-2", {"spark-1": ("notes.txt",)}, {"spark-1": 10}, {"spark-1": ()})),
    # ... unless the source is named: then it is left alone on the target and reported
    ({"spark-1": MODEL, "spark-2": {**MODEL, "notes.txt": 10}}, "spark-1", "spark-1",
     SyncPlan("spark-1", {"spark-2": ()}, {"spark-2": 0}, {"spark-2": ("notes.txt",)})),
    # named by the user: wins even over a node with more
    ({"spark-1": {**MODEL, **HALF}, "spark-2": MODEL}, "spark-1", "spark-1",
     SyncPlan("spark-1", {"spark-2": ("model-00002-of-00002.safetensors",)}, {"spark-2": GB}, {"spark-2": ()})),
])
def test_the_model_is_copied_from_a_node_that_has_all_of_it_to_what_each_other_lacks(listings, prefer, source, expected):
    assert plan_sync(listings, prefer=prefer, source=source) == expected


def test_a_second_sync_has_nothing_to_do():
    assert plan_sync({"spark-1": MODEL, "spark-2": dict(MODEL)}, prefer="spark-1").nothing_to_do
    assert not plan_sync({"spark-1": MODEL, "spark-2": {}}, prefer="spark-1").nothing_to_do


@pytest.mark.parametrize("listings, source, words", [
    ({"spark-1": None, "spark-2": {}}, None, ["missing or empty on every node"]),
    # each has what the other lacks: neither is whole
    ({"spark-1": without(MODEL, "config.json"), "spark-2": {**MODEL, **HALF}}, None,
     ["no node has the whole model", "spark-1 lacks 1 file(s)", "e.g. config.json", "spark-2 lacks 1", "name the node to copy from"]),
    ({"spark-1": MODEL, "spark-2": None}, "spark-3", ["spark-3 is not a node of this cluster"]),
    ({"spark-1": MODEL, "spark-2": None}, "spark-2", ["missing or empty on spark-2"]),
])
def test_nothing_is_copied_when_the_source_is_not_clear(listings, source, words):
    plan = plan_sync(listings, prefer="spark-1", source=source)
    assert plan.source is None and plan.error and not plan.nothing_to_do
    for w in words:
        assert w in plan.error, plan.error


def test_the_listing_as_the_model_check_prints_it():
    text = "config.json\t1500\nsub dir/weights.safetensors\t5368709120\nodd line\n\tnot-a-path\n"
    assert parse_file_listing(text) == {"config.json": 1500, "sub dir/weights.safetensors": 5 * GB}


def test_a_cut_off_copy_resumes_where_it_stopped():
    want = {"a": 100, "b": 50, "c": 10}
    assert resume_points(["a", "b", "c"], want, {"a": 40, "b": 80}) == [("a", 100, 40), ("b", 50, 0), ("c", 10, 0)]


def test_checksums_as_sha256sum_prints_them():
    out = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  config.json\n" \
          "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03 *sub/model.safetensors\nsha256sum: x: No such file\n"
    assert parse_checksums(out) == {"config.json": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                                    "sub/model.safetensors": "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"}


# ---- the node-side copier (templates/node-scripts/sync-node.py), run here over loopback ----------------
def node_script(mode: str, *args: str, **prepend) -> subprocess.Popen:
    head = "".join(f"{k} = {v!r}\n" for k, v in prepend.items())
    proc = subprocess.Popen([sys.executable, "-", mode, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(head + read_template("node-scripts/sync-node.py"))
    proc.stdin.close()
    return proc


def receiver(dest, partial, token="t0k"):
    proc = node_script("receive", str(dest), str(partial), "127.0.0.1", "127.0.0.1", TOKEN=token)
    line = proc.stdout.readline()
    assert line.startswith("listening "), proc.stderr.read()
    return proc, line.split()[1]


def test_the_copier_resumes_a_partial_file_and_moves_each_file_in_only_when_whole(tmp_path):
    src, dest, partial = tmp_path / "src", tmp_path / "dest", tmp_path / "dest.partial-sync"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(bytes(range(256)) * 4096)
    (src / "c.json").write_text("{}")
    (partial / "sub").mkdir(parents=True)
    (partial / "sub" / "w.bin").write_bytes((bytes(range(256)) * 4096)[:300000])  # what a cut-off copy left
    recv, port = receiver(dest, partial)
    send = node_script("send", str(src), "127.0.0.1", port, "0", TOKEN="t0k", FILES=[["sub/w.bin", 1048576, 300000], ["c.json", 2, 0]])
    assert send.wait(30) == 0 and recv.wait(30) == 0, send.stderr.read() + recv.stderr.read()
    assert (dest / "sub" / "w.bin").read_bytes() == (src / "sub" / "w.bin").read_bytes() and (dest / "c.json").read_text() == "{}"
    assert send.stdout.read().strip() == f"sent {1048576 - 300000 + 2}"
    assert not (partial / "sub" / "w.bin").exists()


def cached_bytes(path) -> int:
    """How much of a file the page cache holds (util-linux's fincore)."""
    return int(subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], check=True,
                              capture_output=True, text=True).stdout.split()[0])


@pytest.mark.parametrize("uncached", [False, True])
def test_with_memory_drop_page_cache_the_copy_leaves_nothing_it_wrote_or_read_in_the_page_cache(tmp_path, uncached):
    src, dest, partial = tmp_path / "src", tmp_path / "dest", tmp_path / "dest.partial-sync"
    src.mkdir()
    with open(src / "w.bin", "wb") as f:  # a model on the source node's disk
        f.write(os.urandom(8 << 20))
        os.fsync(f.fileno())
    assert cached_bytes(src / "w.bin") > 0  # just written: in the page cache
    mode = "-uncached" if uncached else ""
    recv = node_script("receive" + mode, str(dest), str(partial), "127.0.0.1", "127.0.0.1", TOKEN="t0k")
    port = recv.stdout.readline().split()[1]
    send = node_script("send" + mode, str(src), "127.0.0.1", port, "0", TOKEN="t0k", FILES=[["w.bin", 8 << 20, 0]])
    assert send.wait(30) == 0 and recv.wait(30) == 0, send.stderr.read() + recv.stderr.read()
    left = {"written": cached_bytes(dest / "w.bin"), "read": cached_bytes(src / "w.bin")}
    if uncached:
        assert left == {"written": 0, "read": 0}
    else:
        assert left["written"] > 0 and left["read"] > 0
    assert (dest / "w.bin").read_bytes() == (src / "w.bin").read_bytes()


@pytest.mark.parametrize("path", ["../outside", "{tmp}/outside", "sub/../../outside"])
def test_the_copier_refuses_a_path_outside_the_folder(tmp_path, path):
    # every attempt aims inside tmp_path (an absolute path too): a broken check must not write anywhere else
    path = path.format(tmp=tmp_path)
    recv, port = receiver(tmp_path / "a" / "dest", tmp_path / "a" / "partial")
    sock = socket.create_connection(("127.0.0.1", int(port)))
    sock.sendall(b"t0k" + json.dumps([path, 1, 0]).encode() + b"\n" + b"x")
    assert recv.wait(30) != 0 and "refused path" in recv.stderr.read()
    sock.close()
    assert not (tmp_path / "outside").exists() and not (tmp_path / "a" / "outside").exists() and not (tmp_path / "a" / "dest").exists()


def test_the_copier_takes_no_connection_without_the_token(tmp_path):
    recv, port = receiver(tmp_path / "dest", tmp_path / "partial", token="right")
    wrong = socket.create_connection(("127.0.0.1", int(port)))
    wrong.sendall(b"wrong" + json.dumps(["a", 1, 0]).encode() + b"\nx")
    wrong.close()
    send = node_script("send", str(tmp_path), "127.0.0.1", port, "0", TOKEN="right", FILES=[])
    assert send.wait(30) == 0 and recv.wait(30) == 0
    assert not (tmp_path / "dest").exists()


def test_the_copier_pipes_one_commands_output_into_anothers_input(tmp_path):
    # the image's path between nodes: `docker save` on one, `docker load` on the other
    (tmp_path / "image.tar").write_bytes(bytes(range(256)) * 8192)
    recv = node_script("receive-pipe", f"cat > {tmp_path / 'loaded.tar'}", "127.0.0.1", "127.0.0.1", TOKEN="t0k")
    port = recv.stdout.readline().split()[1]
    send = node_script("send-pipe", f"cat {tmp_path / 'image.tar'}", "127.0.0.1", port, "0", TOKEN="t0k")
    assert send.wait(30) == 0 and recv.wait(30) == 0, send.stderr.read() + recv.stderr.read()
    assert (tmp_path / "loaded.tar").read_bytes() == (tmp_path / "image.tar").read_bytes()
    # a command that fails on either side fails the transfer
    recv = node_script("receive-pipe", "cat > /dev/null; exit 3", "127.0.0.1", "127.0.0.1", TOKEN="t0k")
    port = recv.stdout.readline().split()[1]
    send = node_script("send-pipe", "echo partial; exit 5", "127.0.0.1", port, "0", TOKEN="t0k")
    assert send.wait(30) == 5 and recv.wait(30) == 3


def test_a_stalled_or_cut_connection_does_not_hold_the_copier_from_its_sender(tmp_path):
    """A connection from the peer's address that sends part of the token and stalls, and one that
    closes at once: each is dropped within seconds, and the real sender still gets through."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello")
    recv, port = receiver(tmp_path / "dest", tmp_path / "partial", token="right-token-0123456789abcdef012")
    t0 = time.monotonic()
    stalled = socket.create_connection(("127.0.0.1", int(port)))
    stalled.sendall(b"right")  # 5 bytes of the token, then nothing
    cut = socket.create_connection(("127.0.0.1", int(port)))
    cut.close()
    send = node_script("send", str(tmp_path / "src"), "127.0.0.1", port, "0", TOKEN="right-token-0123456789abcdef012",
                       FILES=[["a.txt", 5, 0]])
    assert send.wait(30) == 0 and recv.wait(30) == 0, send.stderr.read() + recv.stderr.read()
    assert (tmp_path / "dest" / "a.txt").read_text() == "hello" and time.monotonic() - t0 < 15
    stalled.close()
