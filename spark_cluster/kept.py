"""What spark-cluster keeps in state_dir between runs, read back as typed models (a missing file is
as if nothing was kept; one of another shape is set aside with an alert, then the same) and written
best effort (a read-only state_dir only means the work is done again next time):
- link.json: what `nccl: auto` detected per node, so that `plan`, `status` and the watchdog render
  the containers the `up` that detected it started;
- vllm.json: the last checks of the `vllm serve` flags with vLLM's own parser, per image ID and
  flags, so that an unchanged `up` does not check again;
- memory.json: each node's memory right before the last engine start on it, the baseline the next
  start waits for (memory_back);
- kv.json: the most KV cache an engine of the config's flags got (engine_log.KvCapacity);
- caches.json: each node's cache folder as its last check or seal found it (cache_seal), for `status`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any, Generic, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, model_validator

from .config import ClusterConfig
from .link import LinkPick
from .cache_seal import CacheAnswer
from .engine_log import KvCapacity
from .memory_back import MemoryReading
from .state_dir import read_state, write_private

R = TypeVar("R", bound=BaseModel)

# how many checks vllm.json keeps (image ID x flags: e.g. both executors of one image)
KEPT_CHECKS = 8


def _write(cfg: ClusterConfig, name: str, data: dict) -> None:
    try:
        d = cfg.resolved_state_dir()
        write_private(d / name, json.dumps(data, indent=2) + "\n")
    except OSError:
        pass


def save_links(cfg: ClusterConfig, picks: dict[str, LinkPick]) -> None:
    _write(cfg, "link.json", {"detected_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "nodes": {name: {**asdict(p), "hcas": list(p.hcas)} for name, p in sorted(picks.items())}})


def links(cfg: ClusterConfig, *, repair: bool = True) -> dict[str, LinkPick]:
    """What the last detection found, for the nodes still in the config (nothing when `nccl.auto` is off).
    repair: a file that cannot be read is set aside (False: left as it is, for `status`)."""
    if not any(cfg.node_nccl(n).auto for n in cfg.nodes):
        return {}
    kept = read_state(cfg.resolved_state_dir() / "link.json", LinkFile, cfg.name, repair=repair)
    nodes = kept.nodes if kept is not None else {}
    return {n.name: LinkPick(netdev=nodes[n.name].netdev, hcas=tuple(nodes[n.name].hcas), mtu=nodes[n.name].mtu, note=nodes[n.name].note)
            for n in cfg.nodes if n.name in nodes}


class LinkRecord(BaseModel):
    netdev: str
    hcas: list[str] = []
    mtu: int
    note: str = ""


class LinkFile(BaseModel):
    """link.json: the link `nccl: auto` detected on each node."""

    model_config = ConfigDict(extra="ignore")
    detected_at: str = ""
    nodes: dict[str, LinkRecord]


class VllmFile(BaseModel):
    """vllm.json: the last vLLM flag checks (each a free-form record: image, image ID, flags' hash, version, ok)."""

    checks: list[dict[str, Any]]

    @model_validator(mode="before")
    @classmethod
    def _one_record(cls, data: Any) -> Any:
        return {"checks": [data]} if isinstance(data, dict) and "checks" not in data else data  # earlier versions kept one


def _checks(cfg: ClusterConfig, repair: bool = True) -> list[dict]:
    kept = read_state(cfg.resolved_state_dir() / "vllm.json", VllmFile, cfg.name, repair=repair)
    return kept.checks if kept is not None else []


def last_check(cfg: ClusterConfig, *, repair: bool = True) -> Optional[dict]:
    """The newest check of this image (version, image ID, argv hash, ok), for `status` and `plan`."""
    return next((r for r in _checks(cfg, repair) if r.get("image") == cfg.container.image), None)


def passed_before(cfg: ClusterConfig, image_id: str, argv_hash: str) -> Optional[dict]:
    """A passed check of exactly this image ID and these flags: no need to run it again."""
    return next((r for r in _checks(cfg) if r.get("ok") and r.get("image_id") == image_id and r.get("argv_hash") == argv_hash), None)


def save_check(cfg: ClusterConfig, record: dict) -> None:
    """A check's result (stamped with when it was kept), newest first."""
    record = {**record, "checked_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
    key = (record.get("image_id"), record.get("argv_hash"))
    rest = [r for r in _checks(cfg) if (r.get("image_id"), r.get("argv_hash")) != key]
    _write(cfg, "vllm.json", {"checks": [record, *rest][:KEPT_CHECKS]})


class NodesFile(BaseModel, Generic[R]):
    """A file of one reading per node (memory.json, caches.json)."""

    model_config = ConfigDict(extra="ignore")
    nodes: dict[str, R]


def _by_node(cfg: ClusterConfig, name: str, reading: type[R], repair: bool) -> dict[str, R]:
    kept = read_state(cfg.resolved_state_dir() / name, NodesFile[reading], cfg.name, repair=repair)  # type: ignore[valid-type]
    return kept.nodes if kept is not None else {}


def _save_by_node(cfg: ClusterConfig, name: str, reading: type[R], new: dict[str, R]) -> None:
    """These nodes' readings (the others' kept)."""
    _write(cfg, name, {"nodes": {k: v.model_dump() for k, v in {**_by_node(cfg, name, reading, True), **new}.items()}})


def memory_baselines(cfg: ClusterConfig, *, repair: bool = True) -> dict[str, MemoryReading]:
    """memory.json: each node's memory right before the last engine start on it."""
    return _by_node(cfg, "memory.json", MemoryReading, repair)


def save_memory_baselines(cfg: ClusterConfig, readings: dict[str, MemoryReading]) -> None:
    """These nodes' readings as their new baselines (the others' kept)."""
    _save_by_node(cfg, "memory.json", MemoryReading, readings)


def kv_capacity(cfg: ClusterConfig, *, repair: bool = True) -> Optional[KvCapacity]:
    return read_state(cfg.resolved_state_dir() / "kv.json", KvCapacity, cfg.name, repair=repair)


def save_kv_capacity(cfg: ClusterConfig, kv: KvCapacity) -> None:
    _write(cfg, "kv.json", kv.model_dump())


def caches(cfg: ClusterConfig, *, repair: bool = True) -> dict[str, CacheAnswer]:
    """caches.json: each node's cache folder as its last check or seal found it."""
    return _by_node(cfg, "caches.json", CacheAnswer, repair)


def save_caches(cfg: ClusterConfig, answers: dict[str, CacheAnswer]) -> None:
    _save_by_node(cfg, "caches.json", CacheAnswer, answers)
