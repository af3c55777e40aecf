"""`spark-cluster logs`: the cluster's container logs from the nodes, once or followed (every
container at once, each line prefixed with where it comes from); and a container's whole log saved
into a folder (`down` and the watchdog's incident bundles)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, TextIO

from . import lifecycle, timeouts
from .config import ClusterConfig
from .errors import SparkClusterError
from .facts import ContainerFact
from .masking import mask
from .observe import list_containers
from .render import quote
from .state_dir import write_private
from .transport import Nodes

if TYPE_CHECKING:
    from .transport import SSHTransport


def containers_of(cfg: ClusterConfig, nodes: Nodes, targets: list[str]) -> list[tuple[str, ContainerFact]]:
    """The cluster's containers on each target node (with groups: the node's group's)."""
    cluster_of = {n.name: group.name for _, group in cfg.group_configs() for n in group.nodes}
    return [(n, c) for n in targets for c in list_containers(nodes[n], cluster_of[n])]


def _lines(tail: int) -> str:
    return f"--tail {tail if tail else 'all'}"


def read_logs(nodes: Nodes, found: list[tuple[str, ContainerFact]], tail: int, secrets: Sequence[str]) -> Iterator[tuple[str, ContainerFact, str]]:
    """Each container's last `tail` lines (0: all), in turn, secrets masked."""
    for n, c in found:
        r = nodes[n].run(f"docker logs {_lines(tail)} {quote(c.name)} 2>&1", timeout=timeouts.LOG_DUMP_S)
        yield n, c, mask(r.stdout, secrets)


def follow_logs(nodes: Nodes, found: list[tuple[str, ContainerFact]], tail: int, write: TextIO, secrets: Sequence[str]) -> None:
    """Every container's log as it grows, a thread each, whole lines prefixed with `node/container | `
    (secrets masked), until every container's log ends (or Ctrl-C)."""
    lock = threading.Lock()

    def follow_one(n: str, name: str) -> None:
        buf = [""]

        def emit(text: str) -> None:
            buf[0] += text
            *done, buf[0] = buf[0].split("\n")
            with lock:
                for line in done:
                    write.write(f"{n}/{name} | {mask(line, secrets)}\n")
                write.flush()

        nodes[n].run(f"docker logs --follow {_lines(tail)} {quote(name)} 2>&1", timeout=timeouts.FOLLOW_LIMIT_S, on_output=emit)

    threads = [threading.Thread(target=follow_one, args=(n, c.name), daemon=True) for n, c in found]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        time.sleep(0.2)


def save_logs(t: "SSHTransport", name: str, folder: Path, secrets: Sequence[str]) -> Optional[Path]:
    """A container's whole log into folder, secrets masked (None when the node did not give it)."""
    try:
        r = t.run(lifecycle.logs_command(name), timeout=timeouts.LOG_DUMP_S)
    except SparkClusterError:
        return None
    return write_private(folder / f"{t.node}--{name}.log", r.stdout, secrets)
