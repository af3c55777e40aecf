"""`sim up` refuses clearly, before touching anything, when it cannot work."""

from __future__ import annotations

import shutil

from typer.testing import CliRunner

from spark_cluster.cli import app
from spark_cluster.sim import cluster


def test_refuses_when_not_root(monkeypatch):
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 1000)
    called = []
    monkeypatch.setattr(cluster, "_network", lambda *a: called.append(a))
    res = CliRunner().invoke(app, ["sim", "up", "--no-image"])
    assert res.exit_code == 4 and "needs root" in res.output and called == []


def test_names_the_packages_to_install(monkeypatch):
    real = shutil.which
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(cluster.shutil, "which", lambda t: None if t in ("mmdebstrap", "dockerd") else real(t))
    res = CliRunner().invoke(app, ["sim", "up", "--no-image"])
    assert res.exit_code == 4
    assert "missing tools for the simulated cluster: docker.io, mmdebstrap" in res.output
    assert "apt-get install -y docker.io mmdebstrap" in res.output
