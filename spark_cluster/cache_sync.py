"""`sync` of the sealed caches: a node without a node's sealed cache (a replaced node, a fresh one)
gets it node to node over the cluster link, as the model is copied (model_sync.node_to_node), then
checks each file against the seal (size, SHA-256) and seals it as its own: its first engine start
finds the kernels compiled. The nodes' side runs in throwaway containers of the group's image (the
files are root's): cache.py's `manifest` and `adopt`, sync-node.py's `receive` and `send` on the
node's network. Best effort: a cache that cannot be copied is a warning (the engine compiles it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import kept, timeouts
from .cache_seal import SCRIPT, SCRIPT_ROOT, Manifest, parse_cache_answer, parse_manifest, script_args, script_options
from .caches import image_folder
from .config import ClusterConfig
from .errors import SparkClusterError
from .model_sync import node_to_node
from .plan_checks import python_in_image
from .render import quote, read_template
from .steps import container_name
from .transport import Nodes

Reporter = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class CacheSyncPlan:
    source: Optional[str]
    copies: dict[str, tuple[str, ...]] = field(default_factory=dict)  # target -> sealed files it lacks (or has at another size)
    why: str = ""  # when nothing is copied: why


def plan_cache_sync(manifests: dict[str, Optional[Manifest]], prefer: str) -> CacheSyncPlan:
    """Pure. The source: the node whose seal lists the most files (prefer, the head, on a tie). A
    target: every other node whose seal lacks a file of the source's (or lists it at another size);
    what it lists besides (its own ranks' files) is its own."""
    sealed = {n: m for n, m in manifests.items() if m is not None and m.sealed_files()}
    if not sealed:
        return CacheSyncPlan(None, why="no node has a sealed cache (one is sealed once an engine that used it is ready)")
    source = max(sealed, key=lambda n: (len(sealed[n].sealed_files()), n == prefer))
    want = sealed[source].sealed_files()
    copies = {}
    for node, m in manifests.items():
        if node == source or m is None:
            continue
        have = m.sealed_files()
        if all(have.get(p) == size for p, size in want.items()):
            continue
        copies[node] = tuple(sorted(p for p, size in want.items() if m.files.get(p) != size))
    return CacheSyncPlan(source, copies, "" if copies else f"every node has {source}'s sealed cache")


def in_image(cfg: ClusterConfig, mode: str, network: str, args: list[str]) -> str:
    """The cache's scripts in a throwaway container of the group's image, as root, the cluster's cache
    folder mounted, never pulling the image (what is not on the node is not copied there for this)."""
    return python_in_image(cfg, container_name(cfg, f"cache-{mode}"), ["--pull", "never", *script_options(cfg, network)], {}, args)


class CacheSync:
    def __init__(self, cfg: ClusterConfig, nodes: Nodes, report: Reporter | None = None):
        self.cfg, self.nodes = cfg, nodes
        self.report = report or (lambda e: None)
        self.folder = f"{SCRIPT_ROOT}/{image_folder(cfg.container.image)}"

    def emit(self, event: str, **data: Any) -> None:
        self.report({"event": event, **data})

    def _script(self, node: str, mode: str, prepend: str = "", timeout: float = timeouts.CACHE_CHECK_S) -> str:
        r = self.nodes[node].run(in_image(self.cfg, mode, "none", script_args(self.cfg, mode)), input=(prepend + read_template(SCRIPT)).encode(), timeout=timeout)
        if not r.ok:
            raise SparkClusterError(f"{node}: the cache script ({mode}) failed: {r.tail(3).strip() or r.exit_code}")
        return r.stdout

    def run(self) -> CacheSyncPlan:
        if not self.cfg.cache.enabled:
            return CacheSyncPlan(None, why="cache.enabled is false")
        got = self.nodes.map(lambda t: parse_manifest(self._script(t.node, "manifest")))
        for node, exc in got.failed.items():
            self.emit("warning", node=node, message=f"the cache folder could not be read: {exc}")
        plan = plan_cache_sync(got.succeeded, prefer=self.cfg.head.name)
        self.emit("cache-sync-plan", source=plan.source, copies={n: len(f) for n, f in plan.copies.items()}, why=plan.why)
        if plan.source is None:
            return plan
        source = got.succeeded[plan.source]
        assert source is not None and source.sealed is not None
        for target, files in plan.copies.items():
            try:
                self._copy(plan.source, target, files, source)
            except SparkClusterError as exc:
                self.emit("warning", node=target, message=f"the sealed cache of {plan.source} was not copied ({exc.message}): "
                                                          "its first engine start compiles what it lacks")
        return plan

    def _copy(self, source: str, target: str, files: tuple[str, ...], manifest: Manifest) -> None:
        want = manifest.sealed_files()
        address = {n.name: n.address for n in self.cfg.nodes}
        if files:
            partial = f"{SCRIPT_ROOT}/.partial-sync/{image_folder(self.cfg.container.image)}"
            listed = [[f, want[f], 0] for f in files]
            _, _, why = node_to_node(
                self.nodes[source], self.nodes[target], address[source], address[target],
                receive=f"receive {quote(self.folder)} {quote(partial)}", send=f"send {quote(self.folder)}",
                prepend=f"FILES = {listed!r}\n", python=in_image(self.cfg, "sync", "host", []))
            if why:
                raise SparkClusterError(why)
        prepend = f"MANIFEST = __import__('json').loads({json.dumps(manifest.sealed)!r})\n"
        adopted = parse_cache_answer(self._script(target, "adopt", prepend=prepend, timeout=timeouts.CACHE_SEAL_S))
        if adopted is None:
            raise SparkClusterError(f"{target} did not say what it adopted")
        self.emit("cache-synced", source=source, target=target, copied=len(files), files=adopted.files, bytes=adopted.bytes,
                  set_aside=adopted.suspect)
        kept.save_caches(self.cfg, {target: adopted})
