"""Facts read from the nodes: each one command plus one pure parser, shared by `up`, `status` and
the watchdog (as pyinfra does with its facts). The parsers never raise on odd output: what they
cannot read becomes an error string in the fact, tested on recorded outputs in tests/data/facts/.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

from .errors import SparkClusterError
from .plan import ProcessSpec
from .render import quote


# ---- Ray's own view (templates/ray-state.py, run inside the Ray head container) -----------------


class RayNode(BaseModel):
    ip: str
    alive: bool
    resources: dict[str, float] = Field(default_factory=dict)


class RayBundle(BaseModel):
    resources: dict[str, float] = Field(default_factory=dict)
    ip: Optional[str] = Field(None, description="Node the bundle is placed on (None while pending).")


class RayPlacementGroup(BaseModel):
    id: str
    name: str = ""
    state: Optional[str] = None
    strategy: Optional[str] = None
    bundles: list[RayBundle] = Field(default_factory=list)


class RayActor(BaseModel):
    id: Optional[str] = None
    cls: Optional[str] = Field(None, alias="class")
    state: Optional[str] = None
    ip: Optional[str] = None
    pid: Optional[int] = Field(None, description="As the actor's container sees it: the same number in every new container.")

    model_config = {"populate_by_name": True}


class RayState(BaseModel):
    nodes: list[RayNode] = Field(default_factory=list)
    placement_groups: list[RayPlacementGroup] = Field(default_factory=list)
    actors: list[RayActor] = Field(default_factory=list, description="Actors that are not dead.")
    error: Optional[str] = Field(None, description="Why Ray's view could not be read (then nodes is empty).")

    @property
    def alive(self) -> list[str]:
        return sorted(n.ip for n in self.nodes if n.alive)

    @property
    def dead(self) -> list[str]:
        alive = set(self.alive)
        return sorted({n.ip for n in self.nodes if not n.alive and n.ip not in alive})

    def total(self, resource: str) -> float:
        """A resource summed over the alive nodes (GPU, or the simulation's stand-in)."""
        return sum(float(n.resources.get(resource, 0)) for n in self.nodes if n.alive)

    def engine_placement_groups(self) -> list[RayPlacementGroup]:
        """Placement groups that are not removed: on a healthy cluster, the one of vLLM's engine."""
        return [pg for pg in self.placement_groups if pg.state != "REMOVED"]


_RAY_PREFIX = "SPARK_CLUSTER_RAY_"


def parse_ray_state(stdout: str, stderr: str = "") -> RayState:
    lines: dict[str, Any] = {}
    for line in stdout.splitlines():
        if line.startswith(_RAY_PREFIX) and " " in line:
            key, _, payload = line.partition(" ")
            try:
                lines[key.removeprefix(_RAY_PREFIX)] = json.loads(payload)
            except ValueError:
                lines[key.removeprefix(_RAY_PREFIX)] = None
    if not isinstance(lines.get("NODES"), list):
        why = (stderr.strip() or stdout.strip() or "no answer").splitlines()[-1][:300]
        return RayState(error=why)
    try:
        state = RayState(nodes=[RayNode(**n) for n in lines["NODES"]])
        state.placement_groups = [RayPlacementGroup(**pg) for pg in lines.get("PGS") or []]
        state.actors = [RayActor(**a) for a in lines.get("ACTORS") or []]
    except (TypeError, ValueError) as exc:
        return RayState(error=f"unreadable Ray state: {exc}"[:300])
    return state


def read_ray_state(t: Any, command: str, timeout: float) -> RayState:
    """Run the Ray state command (the plan's wait-ray step) on the head and parse it; a node that
    does not answer becomes the fact's error."""
    try:
        r = t.run(command, timeout=timeout)
    except SparkClusterError as exc:
        return RayState(error=exc.message)
    return parse_ray_state(r.stdout, r.stderr)


# ---- a process started in a container (vLLM inside the Ray head container) ----------------------


class ProcessFact(BaseModel):
    state: Literal["running", "not-started", "gone", "unknown"]
    pid: Optional[int] = None
    detail: str = ""


def process_command(p: ProcessSpec) -> str:
    """Prints the PID and command line of the process, or says why it is not there. Exit 0 only when it runs."""
    script = ('p=$(cat "$1" 2>/dev/null) || { echo "no pid file"; exit 3; }; '
              '[ -r "/proc/$p/cmdline" ] || { echo "pid $p gone"; exit 4; }; '
              'printf "%s " "$p"; tr "\\0" " " < "/proc/$p/cmdline"; echo')
    return f"docker exec {quote(p.container)} sh -c {quote(script)} pid {quote(p.pid_file)}"


def parse_process(p: ProcessSpec, exit_code: int, stdout: str, stderr: str = "") -> ProcessFact:
    out = stdout.strip()
    if exit_code == 0 and out:
        pid, _, cmdline = out.partition(" ")
        if pid.isdigit() and p.argv[0] in cmdline and (len(p.argv) < 2 or p.argv[1] in cmdline):
            return ProcessFact(state="running", pid=int(pid), detail=cmdline[:200])
        return ProcessFact(state="gone", detail=f"pid {pid} is another process now: {cmdline[:100]}")
    if exit_code == 3:
        return ProcessFact(state="not-started", detail=out)
    if exit_code == 4:
        return ProcessFact(state="gone", detail=out)
    why = (stderr.strip() or out or f"exit {exit_code}").splitlines()[-1][:200]
    # `docker exec` into a stopped or paused container: the container fact says which
    return ProcessFact(state="unknown", detail=why)
