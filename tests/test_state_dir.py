"""State you own: a state_dir of another user, or one others can write to, is refused with the fix;
no state file is read or appended to through a symbolic link; events.jsonl and the incident bundles
stay within their bounds. Everything here happens inside the test's own temporary folder."""

from __future__ import annotations

import os

import pytest

from spark_cluster.config import load_config
from spark_cluster.controller import load_token
from spark_cluster.errors import StateDirUnsafe
from spark_cluster.state_dir import append_private, private_dir, prune, read_private
from spark_cluster.watchdog import Watchdog

from .conftest import SIM_CONFIG
from .fakes import FakeCluster, fake_nodes

NOBODY = 65534


def cfg_in(state_dir):
    return load_config(SIM_CONFIG).model_copy(update={"state_dir": str(state_dir)})


def test_a_state_dir_of_another_user_is_refused_and_its_planted_token_never_used(tmp_path):
    """The attack: a state_dir owned by another user was trusted: a planted api-token was used."""
    if os.getuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    (theirs / "api-token").write_text("planted-token\n")
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(StateDirUnsafe) as e:
        load_token(cfg_in(theirs))
    assert f"owned by uid {NOBODY}" in str(e.value) and "set state_dir" in str(e.value)


@pytest.mark.parametrize("mode, refused", [(0o1777, True), (0o777, False), (0o750, False)])
def test_a_state_dir_others_can_write_to_is_refused_unless_it_can_be_narrowed(tmp_path, mode, refused):
    d = tmp_path / "state"
    d.mkdir()
    d.chmod(mode)
    if refused:  # shared (sticky, like /tmp): not narrowed, so refused
        with pytest.raises(StateDirUnsafe, match="writable by others"):
            private_dir(d)
    else:  # the user's own: narrowed to 0700
        assert private_dir(d) == d and d.stat().st_mode & 0o777 == 0o700


def test_no_state_file_is_followed_through_a_symbolic_link(tmp_path):
    """The attack: a symlinked events.jsonl was followed (appended to wherever it pointed)."""
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere.txt"
    state.mkdir(mode=0o700)
    elsewhere.write_text("kept\n")
    (state / "events.jsonl").symlink_to(elsewhere)
    (state / "api-token").symlink_to(elsewhere)
    with pytest.raises(StateDirUnsafe, match="symbolic link"):
        append_private(state / "events.jsonl", '{"event": "x"}\n')
    with pytest.raises(StateDirUnsafe, match="symbolic link"):
        load_token(cfg_in(state))
    with pytest.raises(StateDirUnsafe):
        read_private(state / "events.jsonl")
    assert elsewhere.read_text() == "kept\n"


def test_events_rotate_past_their_bound(tmp_path):
    path = tmp_path / "events.jsonl"
    line = '{"event": "state"}\n'
    for _ in range(100):
        append_private(path, line, max_bytes=len(line) * 30)
    older = path.with_name("events.jsonl.1")
    assert path.stat().st_size <= len(line) * 30 and older.stat().st_size <= len(line) * 30
    assert path.read_text().count(line) + older.read_text().count(line) >= 30  # the newest kept, the rest dropped
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_only_the_newest_incident_bundles_are_kept(tmp_path):
    cluster = FakeCluster(cfg_in(tmp_path)).serving()
    wd = Watchdog(cluster.cfg, fake_nodes(cluster), clock=iter(range(1_800_000_000, 1_800_001_000, 7)).__next__)
    wd.rec.incidents_kept = 3
    try:
        made = [wd.incident_bundle(f"hang {i}").name for i in range(5)]
    finally:
        wd.close()
    assert sorted(p.name for p in (tmp_path / "incidents").iterdir()) == made[-3:]


def test_prune_keeps_the_newest_by_name(tmp_path):
    for name in ["20261201-a", "20261203-c", "20261202-b", ".hidden"]:
        (tmp_path / name).mkdir()
    assert [p.name for p in prune(tmp_path, 1)] == ["20261201-a", "20261202-b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "20261203-c"]
