"""Sealed caches (pure: the command a node runs, what it answers, how it is told).

A cache folder (caches.py) is sealed once an engine that used it became ready: a manifest of its
files (size, modification time, SHA-256) kept beside them. Before the next engine start on a node,
every file changed or added since the seal (every file when there is no seal: a start that never
became ready wrote them) is moved aside, never deleted, to <cache.path>/<cluster>/.set-aside/<image>/
<UTC time>/: an interrupted start leaves empty or half-written compiled objects that break the next
start (eugr/spark-vllm-docker, docker/B12X_CACHE_INTEGRITY.md). The work is templates/node-scripts/cache.py, run on
the node in a throwaway container of the group's image (the files are root's, written by the
containers), the cluster's cache folder mounted at SCRIPT_ROOT, no network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .caches import image_folder

if TYPE_CHECKING:
    from .config import ClusterConfig

SCRIPT = "node-scripts/cache.py"  # fed on standard input to python3 in a throwaway container of the image
SCRIPT_ROOT = "/spark-cluster-caches"
Mode = Literal["seal", "check", "look", "manifest", "adopt"]
A = TypeVar("A", bound=BaseModel)


def script_options(cfg: "ClusterConfig", network: str = "none") -> list[str]:
    """The throwaway container's options: as root (the files are root's), no network (the copier: the
    node's), the cluster's cache folder mounted."""
    return ["--network", network, "--user", "0:0", "-v", f"{cfg.cache.path}/{cfg.name}:{SCRIPT_ROOT}"]


def script_args(cfg: "ClusterConfig", mode: Mode) -> list[str]:
    return [mode, SCRIPT_ROOT, image_folder(cfg.container.image)]


class CacheAnswer(BaseModel):
    """What the node's cache script printed (kept per node in state_dir/caches.json). files/bytes:
    what the folder holds (after a check: what it kept); suspect: files changed or added since the
    seal (moved to moved_to by a check); aside_*: what earlier checks set aside."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    mode: Mode
    files: int = 0
    bytes: int = 0
    sealed_at: Optional[str] = None
    suspect: int = 0
    suspect_bytes: int = 0
    examples: tuple[str, ...] = ()
    moved_to: Optional[str] = None
    aside_sets: int = 0
    aside_bytes: int = 0

    @property
    def state(self) -> str:
        """cold (empty), warm (sealed, nothing changed since), unsealed (files no ready engine sealed,
        or changed since). After a check, what it found is already set aside."""
        pending = self.suspect if self.mode == "look" else 0
        if self.files == 0 and not pending:
            return "cold"
        return "warm" if self.sealed_at and not pending else "unsealed"


def _last_answer(stdout: str, model: type[A]) -> Optional[A]:
    """The script's JSON line (the last one that is such an answer), or None when there is none."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            return model.model_validate_json(line)
        except ValidationError:
            continue
    return None


def parse_cache_answer(stdout: str) -> Optional[CacheAnswer]:
    return _last_answer(stdout, CacheAnswer)


def size_text(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def set_aside_message(node: str, answer: CacheAnswer, cache_path: str, cluster: str) -> Optional[str]:
    """What a check moved, for the event and the operator (None: nothing)."""
    if not answer.moved_to:
        return None
    since = f"changed or added since the seal of {answer.sealed_at}" if answer.sealed_at else "never sealed by a ready engine"
    examples = ", ".join(answer.examples) + (", ..." if answer.suspect > len(answer.examples) else "")
    return (f"{node}: {answer.suspect} cache file(s), {size_text(answer.suspect_bytes)}, {since}, moved to "
            f"{cache_path}/{cluster}/{answer.moved_to} (kept, not deleted): {examples}")


def cache_line(node: str, answer: CacheAnswer) -> str:
    """One node's cache for `status`: state, size, seal time, what was set aside."""
    text = f"{node} {answer.state}"
    if answer.files:
        text += f" {size_text(answer.bytes)} in {answer.files} file(s)"
    if answer.sealed_at:
        text += f", sealed {answer.sealed_at}"
    if answer.aside_sets:
        text += f"; set aside {answer.aside_sets} time(s), {size_text(answer.aside_bytes)}"
    return text


class Manifest(BaseModel):
    """A node's `manifest` answer: its seal (None: none readable) and the files its folder holds (sizes)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    mode: Literal["manifest"]
    sealed: Optional[dict] = None
    files: dict[str, int] = {}

    def sealed_files(self) -> dict[str, int]:
        """The sealed files with their sizes (none without a seal, or a seal of another shape)."""
        try:
            return {str(k): int(v[0]) for k, v in (self.sealed or {}).get("files", {}).items()}
        except (AttributeError, TypeError, ValueError, IndexError):
            return {}


def parse_manifest(stdout: str) -> Optional[Manifest]:
    return _last_answer(stdout, Manifest)
