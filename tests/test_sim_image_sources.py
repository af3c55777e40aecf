"""Where the simulated nodes' image gets the CPU build of torch: explicit, and a clear error otherwise.
Nothing here touches the network: reachability is passed in."""

from __future__ import annotations

import pytest

from spark_cluster.sim import image
from spark_cluster.sim.cluster import SimError


def wheel(folder, version="2.13.0"):
    folder.mkdir(exist_ok=True)
    (folder / f"torch-{version}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    return folder


def test_named_wheel_folder_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(image, "DEFAULT_WHEELS", wheel(tmp_path / "default"))
    named = wheel(tmp_path / "named")
    assert image.torch_source({image.WHEELS_ENV: str(named)}) == ["--find-links", str(named)]


def test_named_folder_without_the_wheel_is_refused(tmp_path):
    wheel(tmp_path / "w", version="2.12.0")
    with pytest.raises(SimError, match=r"SPARK_CLUSTER_SIM_WHEELS=.* holds no torch-2.13.0\+cpu wheel"):
        image.torch_source({image.WHEELS_ENV: str(tmp_path / "w")})


def test_default_folder_then_pytorch_cpu_index(tmp_path, monkeypatch):
    monkeypatch.setattr(image, "DEFAULT_WHEELS", wheel(tmp_path / "default"))
    assert image.torch_source({}) == ["--find-links", str(tmp_path / "default")]
    monkeypatch.setattr(image, "DEFAULT_WHEELS", tmp_path / "absent")
    asked = []
    assert image.torch_source({}, reachable=lambda url: asked.append(url) or "") == ["--extra-index-url", image.TORCH_CPU_INDEX]
    assert asked == [image.TORCH_CPU_INDEX]


def test_neither_reachable_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(image, "DEFAULT_WHEELS", tmp_path / "absent")
    with pytest.raises(SimError) as info:
        image.torch_source({}, reachable=lambda url: "ConnectError: no route")
    msg = str(info.value)
    assert image.TORCH_CPU_INDEX in msg and "not reachable (ConnectError: no route)" in msg and image.WHEELS_ENV in msg
