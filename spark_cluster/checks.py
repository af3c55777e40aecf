"""Typed checks: what a step's result must show, as data in the plan, evaluated here in one place.

Each check is one variant of a discriminated union (its `kind`), carrying everything its message
needs, so evaluating is a pure function of the check and the command's result (table-tested
without nodes). Nothing dispatches on step ids: renaming a step cannot turn a check into "exit
code 0", and a check step without a check is refused when the plan is built.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .facts import parse_file_listing, parse_meminfo


class _Check(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    same_on_all_nodes: bool = Field(False, description="The output must be the same on every node (compared after each passed).")


class DockerAnswers(_Check):
    kind: Literal["docker-answers"] = "docker-answers"


class ImagePresent(_Check):
    """The image is on the node (its ID printed); a node without it gets it pulled or streamed first."""

    kind: Literal["image-present"] = "image-present"
    image: str
    same_on_all_nodes: bool = True


class ModelFiles(_Check):
    """The model folder lists its files with sizes: present, not empty, the same everywhere."""

    kind: Literal["model-files"] = "model-files"
    path: str
    same_on_all_nodes: bool = True


class RuntimeListed(_Check):
    """`docker info` lists the container runtime (nvidia, when GPUs are requested)."""

    kind: Literal["runtime-listed"] = "runtime-listed"
    runtime: str = "nvidia"


class PortsFree(_Check):
    """Nothing listens on the ports (`ss` prints nothing); ignored while the cluster itself runs."""

    kind: Literal["ports-free"] = "ports-free"
    ports: list[int]


class MemoryAvailable(_Check):
    """/proc/meminfo shows enough available memory; ignored while the cluster itself runs."""

    kind: Literal["memory-available"] = "memory-available"
    min_available_fraction: float = Field(description="Of total memory (unified memory: vLLM's share must be free).")
    min_available_gib: float
    gpu_memory_utilization: float
    drop_page_cache: bool


class ReadBack(_Check):
    """The command reads back what was written: its output must be exactly this."""

    kind: Literal["read-back"] = "read-back"
    stdout: str


class VllmFlags(_Check):
    """The image's own vLLM accepts the rendered flags (evaluated by vllm_check.parse_output)."""

    kind: Literal["vllm-flags"] = "vllm-flags"
    container: str = Field(description="The throwaway container's name (removed if the check times out).")


class RayMembers(_Check):
    """Ray shows every node alive and the resources the engine will ask for."""

    kind: Literal["ray-members"] = "ray-members"
    alive_ips: list[str]
    resources: dict[str, float] = Field(default_factory=dict)


class ProcessRuns(_Check):
    kind: Literal["process-runs"] = "process-runs"
    name: str


class HttpAnswer(_Check):
    kind: Literal["http"] = "http"
    status: int = 200
    model: Optional[str] = Field(None, description="/v1/models must list it.")
    choices: bool = Field(False, description="A completion must return choices.")


Check = Annotated[Union[DockerAnswers, ImagePresent, ModelFiles, RuntimeListed, PortsFree, MemoryAvailable, ReadBack,
                        VllmFlags, RayMembers, ProcessRuns, HttpAnswer], Field(discriminator="kind")]


def evaluate(check: Check, exit_code: int, stdout: str, stderr: str = "", *, cluster_running: bool = False) -> Optional[str]:
    """The problem (with its fix) a node command's result shows, or None. cluster_running: this
    cluster's own containers run on the node (their ports and memory are not a problem)."""
    ok = exit_code == 0
    tail = "\n".join((stderr.strip() or stdout.strip()).splitlines()[-3:])
    if isinstance(check, DockerAnswers):
        return None if ok else f"docker does not answer ({tail}): install Docker and let the SSH user use it (docker group)"
    if isinstance(check, ImagePresent):
        return None if ok else (f"image {check.image} is not on this node and could not be pulled or copied from "
                                f"another node: `docker pull {check.image}` there, or load it by hand")
    if isinstance(check, ModelFiles):
        if not ok:
            return f"model folder {check.path} is missing or unreadable: copy the model there (same files on every node)"
        return None if stdout.strip() else f"model folder {check.path} is empty"
    if isinstance(check, RuntimeListed):
        if ok and check.runtime in stdout:
            return None
        return f"the {check.runtime} container runtime is missing: install nvidia-container-toolkit (GPUs are requested)"
    if isinstance(check, PortsFree):
        if cluster_running or not stdout.strip():
            return None
        return f"port(s) {', '.join(map(str, check.ports))} already in use by something else: {stdout.strip().splitlines()[0]}"
    if isinstance(check, MemoryAvailable):
        if cluster_running:
            return None
        mem = parse_meminfo(stdout)
        if not ok or not mem.known:
            return f"cannot read memory information: {tail or 'no output'}"
        need = max(mem.total_gib * check.min_available_fraction, check.min_available_gib)
        if mem.available_gib >= need:
            return None
        hint = "" if check.drop_page_cache else " (memory.drop_page_cache: true may free page cache)"
        return (f"only {mem.available_gib:.1f} GiB of {mem.total_gib:.1f} GiB available, {need:.1f} GiB needed "
                f"for gpu_memory_utilization {check.gpu_memory_utilization}{hint}")
    if isinstance(check, ReadBack):
        if not ok:
            return f"exit code {exit_code}: {tail}"
        return None if stdout == check.stdout else "the value did not stick"
    return None if ok else f"exit code {exit_code}: {tail}"


def differs(check: Check, values: dict[str, str], head: str) -> Optional[str]:
    """For checks whose output must be the same on every node: what differs, or None."""
    if not check.same_on_all_nodes or len(set(values.values())) <= 1:
        return None
    ref = values.get(head, next(iter(values.values())))
    bad = [n for n, v in values.items() if v != ref]
    if isinstance(check, ImagePresent):
        ids = ", ".join(f"{n}={v.strip()[:19]}" for n, v in values.items())
        return f"image {check.image} differs between nodes ({ids}): load the same image everywhere"
    if isinstance(check, ModelFiles):
        want = parse_file_listing(ref)
        details = []
        for n in bad:
            have = parse_file_listing(values[n])
            missing = sorted(p for p, size in want.items() if have.get(p) != size)[:5]
            extra = sorted(p for p, size in have.items() if want.get(p) != size)[:5]
            details.append(f"{n}: missing or different {missing}, extra {extra}")
        return f"model folder {check.path} differs from {head}'s: " + "; ".join(details)
    return f"{check.kind} differs between nodes: {', '.join(bad)}"
