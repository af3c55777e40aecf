"""`spark-cluster sync` (and `model.sync: true` for `up`): make the model folder identical on every
node, copying node to node over the cluster link.

What to copy is decided by sync.plan_sync over each node's listing (facts.model_files_command);
the copy runs templates/node-scripts/sync-node.py on both nodes: a receiver on the target listening
on its cluster address, for one connection from the source's cluster address presenting a one-time
token, and a sender on the source. Bytes never pass through the controller (which may sit on
Wi-Fi). A copy cut off (killed, a cable pulled) leaves its files in `<model>.partial-sync/` next to
the folder; the next sync resumes each at the size it reached. A file moves into the folder only
once whole, so the model check never sees half a file under its real name. After the copy the
target's folder is listed again and must match the source's, sizes (and with `checksum`, SHA-256)
included.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import timeouts
from .config import ClusterConfig
from .errors import SparkClusterError, SyncError
from .facts import model_files_command, parse_file_listing
from .render import quote, read_template
from .sync import Listing, SyncPlan, plan_sync
from .transport import Nodes, Result

Reporter = Callable[[dict[str, Any]], None]
SCRIPT = "node-scripts/sync-node.py"


def partial_dir(path: str) -> str:
    """Where a cut-off copy's files wait, next to the model folder (same filesystem: moved in at once)."""
    return path.rstrip("/") + ".partial-sync"


def _checksum_command(path: str, files: list[str]) -> str:
    return f"cd {quote(path)} && sha256sum -- {' '.join(quote(f) for f in files)}"


def resume_points(files: list[str], want: Listing, partial: Listing) -> list[tuple[str, int, int]]:
    """(file, size, offset to send from) for each file to copy: a cut-off copy resumes at the size it
    reached; a leftover longer than the file is not a piece of it and starts over. Pure."""
    return [(f, want[f], partial.get(f, 0) if partial.get(f, 0) <= want[f] else 0) for f in files]


def parse_checksums(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([0-9a-f]{64}) [ *](.+)$", line)
        if m:
            out[m.group(2)] = m.group(1)
    return out


@dataclass
class SyncResult:
    source: Optional[str]
    files: dict[str, int] = field(default_factory=dict)  # target -> files copied
    sent: dict[str, int] = field(default_factory=dict)  # target -> bytes sent (resumed files count from their offset)
    seconds: dict[str, float] = field(default_factory=dict)
    total_files: int = 0
    total_bytes: int = 0
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)


def node_to_node(src: Any, dst: Any, src_address: str, dst_address: str, *, receive: str, send: str, rate_mb_s: float = 0,
                 prepend: str = "", on_bytes: Optional[Callable[[int], None]] = None, timeout_s: float = timeouts.SYNC_S,
                 python: str = "python3 -") -> tuple[Optional[Result], Optional[Result], str]:
    """One transfer over the cluster link with templates/node-scripts/sync-node.py: its receiving mode
    (`receive`: mode and arguments) on dst, listening on dst's cluster address for one connection from
    src's, then its sending mode (`send`) on src. python: the command that runs it from its standard
    input (a throwaway container's, plan_checks.python_in_image, for root's files). Returns both results and, when it failed, why."""
    token = secrets.token_hex(16)
    script = read_template(SCRIPT)
    port: list[int] = []
    listening = threading.Event()
    received: dict[str, Any] = {}

    def on_output(text: str) -> None:
        for line in text.splitlines():
            if line.startswith("listening "):
                port.append(int(line.split()[1]))
                listening.set()
            elif line.startswith("got ") and on_bytes is not None:
                on_bytes(int(line.split()[1]))

    def run_receiver() -> None:
        try:
            received["result"] = dst.run(f"{python} {receive} {quote(dst_address)} {quote(src_address)}",
                                         input=(f"TOKEN = {token!r}\n" + script).encode(), on_output=on_output, timeout=timeout_s)
        except SparkClusterError as exc:
            received["error"] = exc
        finally:
            listening.set()

    def why_receiver() -> str:
        if "error" in received:
            return str(received["error"])
        r: Optional[Result] = received.get("result")
        return "no answer" if r is None else (r.tail(3).strip() or f"exit code {r.exit_code}")

    receiver = threading.Thread(target=run_receiver, name=f"receive-{dst.node}", daemon=True)
    receiver.start()
    if not listening.wait(timeouts.SYNC_LISTENING_S) or not port:
        receiver.join(timeout=timeouts.QUICK_S)
        return None, received.get("result"), f"the receiver on {dst.node} did not start: {why_receiver()}"
    try:
        sent = src.run(f"{python} {send} {quote(dst_address)} {port[0]} {rate_mb_s:g}",
                       input=(f"TOKEN = {token!r}\n{prepend}" + script).encode(), timeout=timeout_s)
    except SparkClusterError as exc:
        return None, received.get("result"), f"sending from {src.node} failed: {exc}"
    # a sender that failed leaves the receiver waiting for its connection (it gives up by itself): not waited for
    receiver.join(timeout=timeouts.QUICK_S * 2 if sent.ok else 1)
    got: Optional[Result] = received.get("result")
    if not sent.ok or got is None or not got.ok:
        return sent, got, f"sender: {sent.tail(3).strip() or f'exit {sent.exit_code}'}; receiver: {why_receiver()}"
    return sent, got, ""


class ModelSync:
    def __init__(self, cfg: ClusterConfig, nodes: Nodes, report: Reporter | None = None):
        self.cfg, self.nodes = cfg, nodes
        self.report = report or (lambda e: None)
        self.path = cfg.model.path
        self.address = {n.name: n.address for n in cfg.nodes}

    def emit(self, event: str, **data: Any) -> None:
        self.report({"event": event, **data})

    def listings(self) -> dict[str, Optional[Listing]]:
        results = self.nodes.map(lambda t: t.run(model_files_command(self.path), timeout=timeouts.QUICK_S * 4))
        for node, exc in results.failed.items():
            raise SyncError(f"cannot list the model folder on {node}: {exc}")
        return {node: parse_file_listing(r.stdout) if r.ok else None for node, r in results.succeeded.items()}

    def run(self, *, source: Optional[str] = None, checksum: bool = False, max_rate_mb_s: float = 0) -> SyncResult:
        listings = self.listings()
        plan = plan_sync(listings, prefer=self.cfg.group_configs()[0][1].head.name, source=source)
        if plan.error:
            raise SyncError(plan.error)
        assert plan.source is not None
        want = listings[plan.source] or {}
        result = SyncResult(plan.source, total_files=len(want), total_bytes=sum(want.values()), extra=dict(plan.extra))
        self.emit("sync-plan", source=plan.source, copies={n: len(f) for n, f in plan.copies.items()}, bytes=dict(plan.bytes),
                  total_files=result.total_files, total_bytes=result.total_bytes)
        for target, files in plan.copies.items():
            if files:
                self._copy(plan, target, list(files), want, max_rate_mb_s, result)
        problems = self._verify(plan, want, checksum)
        if problems:
            raise SyncError("the model folders still differ after the copy:\n" + "\n".join(f"  - {p}" for p in problems))
        return result

    # ---- one target ------------------------------------------------------------------------------
    def _copy(self, plan: SyncPlan, target: str, files: list[str], want: Listing, max_rate: float, result: SyncResult) -> None:
        src, dst = self.nodes[plan.source], self.nodes[target]
        partial = partial_dir(self.path)
        have = parse_file_listing(dst.run(model_files_command(partial), timeout=timeouts.QUICK_S).stdout)  # nothing there: empty
        todo = resume_points(files, want, have)
        to_send = sum(size - offset for _, size, offset in todo)
        resumed = sum(offset for _, _, offset in todo)
        self.emit("sync-start", source=plan.source, target=target, files=len(todo), bytes=to_send, resumed_bytes=resumed,
                  via=f"{self.address[plan.source]} -> {self.address[target]}")
        t0 = time.monotonic()
        files_json = [[f, size, offset] for f, size, offset in todo]
        # memory.drop_page_cache: what the copy wrote (and read) leaves the page cache, which on unified memory
        # holds memory the model load needs (a 164 GiB sync left several GiB behind, MiaAI-Lab/GLM-5.3-Flash-EXL3-2x-DGX-Sparks#47)
        uncached = "-uncached" if self.cfg.memory.drop_page_cache else ""
        _, _, why = node_to_node(
            src, dst, self.address[plan.source], self.address[target],
            receive=f"receive{uncached} {quote(self.path)} {quote(partial)}", send=f"send{uncached} {quote(self.path)}", rate_mb_s=max_rate,
            prepend=f"FILES = {files_json!r}\n", on_bytes=lambda n: self.emit("sync-progress", target=target, bytes=n, total=to_send))
        if why:
            raise SyncError(f"copying from {plan.source} to {target} failed (the files copied so far are kept in {partial} on "
                            f"{target}; sync again to resume): {why}")
        dst.run(f"find {quote(partial)} -depth -type d -empty -delete 2>/dev/null; true", timeout=timeouts.QUICK_S)
        took = time.monotonic() - t0
        result.files[target], result.sent[target], result.seconds[target] = len(todo), to_send, round(took, 2)
        self.emit("sync-done", target=target, files=len(todo), bytes=to_send, seconds=round(took, 2),
                  mb_s=round(to_send / 1e6 / took, 1) if took > 0 else None)

    # ---- afterwards: every node lists the source's files at their sizes ----------------------------
    def _verify(self, plan: SyncPlan, want: Listing, checksum: bool) -> list[str]:
        problems = []
        for node, files in self.listings().items():
            lacking = sorted(p for p, size in want.items() if (files or {}).get(p) != size)
            if lacking:
                problems.append(f"{node} lacks or has at another size {len(lacking)} file(s), e.g. {lacking[0]}")
        if problems or not checksum:
            return problems
        names = sorted(want)
        group = self.nodes.map(lambda t: t.run(_checksum_command(self.path, names), timeout=timeouts.SYNC_S))
        sums = {**group.succeeded, **group.failed}
        ref = sums[plan.source]
        if isinstance(ref, BaseException) or not ref.ok:
            return [f"cannot checksum the model on {plan.source}: {ref}"]
        ref_sums = parse_checksums(ref.stdout)
        for node, r in sums.items():
            if node == plan.source:
                continue
            if isinstance(r, BaseException) or not r.ok:
                problems.append(f"cannot checksum the model on {node}: {r}")
                continue
            bad = sorted(f for f, h in parse_checksums(r.stdout).items() if ref_sums.get(f) != h)
            if bad:
                # removed, so that the next sync copies them again
                self.nodes[node].run(f"cd {quote(self.path)} && rm -f -- {' '.join(quote(f) for f in bad)}", timeout=timeouts.QUICK_S)
                problems.append(f"{node}: {len(bad)} file(s) differ from {plan.source}'s by SHA-256 (removed: sync again), e.g. {bad[0]}")
        self.emit("sync-checksums", files=len(names), nodes=len(sums), ok=not problems)
        return problems
