"""Making the model folder identical on every node: which node to copy from and what each other node
lacks, as a pure decision over each node's listing of the folder (facts.parse_file_listing). The
copy itself goes node to node over the cluster link (never through the controller, which may sit
on Wi-Fi); this module only decides.

The source is the node with the whole model: every file any node has, at the largest size any node
has it (a copy cut off halfway leaves a file shorter than the original, or none). When no node has
everything, nothing can be decided safely and the message names what each node lacks; naming the
source (`--from NODE`) settles it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

Listing = dict[str, int]  # relative path -> size in bytes


@dataclass(frozen=True)
class SyncPlan:
    source: Optional[str]
    copies: dict[str, tuple[str, ...]] = field(default_factory=dict)  # target -> files it lacks or has at another size
    bytes: dict[str, int] = field(default_factory=dict)  # target -> bytes to copy
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)  # target -> files the source does not have (left alone)
    error: Optional[str] = None

    @property
    def nothing_to_do(self) -> bool:
        return self.error is None and not any(self.copies.values())


def _complete(listings: dict[str, Listing]) -> Listing:
    """Every file any node has, at the largest size seen."""
    out: Listing = {}
    for files in listings.values():
        for path, size in files.items():
            out[path] = max(size, out.get(path, -1))
    return out


def _lacks(files: Listing, want: Listing) -> list[str]:
    return sorted(p for p, size in want.items() if files.get(p) != size)


def plan_sync(listings: dict[str, Optional[Listing]], *, prefer: str, source: Optional[str] = None) -> SyncPlan:
    """listings: each node's folder (None: the folder is missing there). prefer: the node taken when
    several have the whole model (the head). source: the user's choice, which wins."""
    have = {n: files for n, files in listings.items() if files}
    if source is not None:
        if source not in listings:
            return SyncPlan(None, error=f"{source} is not a node of this cluster ({', '.join(listings)})")
        if not listings[source]:
            return SyncPlan(None, error=f"the model folder is missing or empty on {source}")
    elif not have:
        return SyncPlan(None, error="the model folder is missing or empty on every node: download it on one node first")
    else:
        whole = _complete(have)
        complete = [n for n, files in have.items() if not _lacks(files, whole)]
        if not complete:
            lacking = "; ".join(f"{n} lacks {len(m)} file(s) or has them at another size, e.g. {m[0]}"
                                for n, files in have.items() for m in [_lacks(files, whole)])
            return SyncPlan(None, error=f"no node has the whole model ({lacking}): name the node to copy from")
        source = prefer if prefer in complete else sorted(complete)[0]
    want = listings[source] or {}
    copies, sizes, extra = {}, {}, {}
    for node, files in listings.items():
        if node == source:
            continue
        files = files or {}
        todo = tuple(_lacks(files, want))
        copies[node] = todo
        sizes[node] = sum(want[p] for p in todo)
        extra[node] = tuple(sorted(set(files) - set(want)))
    return SyncPlan(source, copies, sizes, extra)
