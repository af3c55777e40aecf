"""Facts read from the nodes: each one command plus one pure parser, shared by `up`, `status` and
the watchdog (as pyinfra does with its facts). The parsers never raise on odd output: what they
cannot read becomes an error string in the fact, tested on recorded outputs in tests/data/facts/.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

from .render import quote


LABEL_PREFIX = "spark-cluster"


def marked_sections(mark: re.Pattern[str], text: str) -> list[tuple[re.Match[str], str]]:
    """Each line matching `mark` with the text after it, up to the next one (outputs of several
    commands run in one read, each after its mark)."""
    marks = list(mark.finditer(text))
    return [(m, text[m.end():marks[i + 1].start() if i + 1 < len(marks) else len(text)]) for i, m in enumerate(marks)]


# ---- the cluster's containers on a node (docker inspect) ----------------------------------------


class ContainerFact(BaseModel):
    node: str = ""
    name: str
    id: str = ""
    component: str = ""
    state: str = Field(description="docker's State.Status: running, paused, exited, restarting, created, dead.")
    image_id: str = ""
    started_at: str = ""
    restarts: int = 0
    exit_code: Optional[int] = None
    spec_hash: str = ""

    @property
    def running(self) -> bool:
        return self.state == "running"


_CONTAINER_FIELDS = ("{{.Id}}", "{{.Name}}", '{{index .Config.Labels "%s.component"}}' % LABEL_PREFIX, "{{.State.Status}}",
                     "{{.Image}}", "{{.State.StartedAt}}", "{{.RestartCount}}", "{{.State.ExitCode}}",
                     '{{index .Config.Labels "%s.spec-hash"}}' % LABEL_PREFIX)
_SEP = "|"


def containers_command(cluster: str) -> str:
    """Every container of the cluster on the node, one line each (nothing when there is none)."""
    filt = quote(f"label={LABEL_PREFIX}.cluster={cluster}")
    # one compound command, no `exit`: it is also a section of the status/watchdog node script
    return (f"if ids=$(docker ps -aq --no-trunc --filter {filt} 2>&1); then "
            f'[ -z "$ids" ] || docker inspect --format {quote(_SEP.join(_CONTAINER_FIELDS))} $ids; '
            'else echo "$ids" >&2; false; fi')


class ContainersFact(BaseModel):
    containers: list[ContainerFact] = Field(default_factory=list)
    error: Optional[str] = Field(None, description="Why docker could not be asked (then containers is empty).")


def parse_containers(node: str, exit_code: int, stdout: str, stderr: str = "") -> ContainersFact:
    out = []
    for line in stdout.splitlines():
        parts = line.split(_SEP)
        if len(parts) != len(_CONTAINER_FIELDS):
            continue
        cid, name, component, state, image, started, restarts, code, spec = parts
        out.append(ContainerFact(node=node, name=name.lstrip("/"), id=cid, component=component, state=state, image_id=image,
                                 started_at=started, restarts=int(restarts) if restarts.isdigit() else 0,
                                 exit_code=int(code) if code.lstrip("-").isdigit() else None, spec_hash=spec))
    # a container removed between `docker ps` and `docker inspect` is not an error: it is gone
    if exit_code != 0 and not (out or "No such" in stderr):
        why = (stderr.strip() or stdout.strip() or f"exit {exit_code}").splitlines()[-1][:300]
        return ContainersFact(error=why)
    return ContainersFact(containers=out)


# ---- memory (/proc/meminfo) ----------------------------------------------------------------------

MEMINFO_COMMAND = "grep -E '^(MemTotal|MemAvailable):' /proc/meminfo"


class MemoryFact(BaseModel):
    total_gib: Optional[float] = None
    available_gib: Optional[float] = None

    @property
    def known(self) -> bool:
        return self.total_gib is not None and self.available_gib is not None


def parse_meminfo(text: str) -> MemoryFact:
    kb = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s*(\w+):\s+(\d+) kB", text, re.M)}
    gib = {k: round(v / 2**20, 2) for k, v in kb.items()}
    return MemoryFact(total_gib=gib.get("MemTotal"), available_gib=gib.get("MemAvailable"))


# ---- sysctl values -------------------------------------------------------------------------------


def sysctl_command(keys: list[str]) -> str:
    """One line per key, in order (an unknown key prints its error on its line)."""
    return "; ".join(f"sysctl -n {quote(k)} 2>&1 | head -n 1" for k in keys) or "true"


def parse_sysctl(keys: list[str], stdout: str) -> dict[str, Optional[str]]:
    lines = stdout.splitlines()
    return {k: (lines[i].strip() if i < len(lines) else None) for i, k in enumerate(keys)}


# ---- GPU (nvidia-smi) ----------------------------------------------------------------------------

GPU_COMMAND = ("if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --query-gpu=name,memory.used,memory.total "
               "--format=csv,noheader 2>&1 | head -n 8; else echo 'no nvidia-smi'; fi")


class GpuFact(BaseModel):
    names: list[str] = Field(default_factory=list)
    unified_memory: bool = Field(False, description="nvidia-smi reports no memory of its own (GB10: CPU and GPU share it).")
    memory: Optional[str] = Field(None, description="used / total as nvidia-smi reports it, when it does")
    free_gib: Optional[float] = Field(None, description="The GPUs' own memory not in use, all of the node's together (none when unified).")
    error: Optional[str] = None

    def summary(self) -> Optional[str]:
        if self.error:
            return self.error
        if not self.names:
            return None
        what = ", ".join(self.names)
        return f"{what}: unified memory (see memory)" if self.unified_memory else f"{what}: {self.memory}"


def parse_gpu(text: str) -> GpuFact:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if not lines:
        return GpuFact()
    if lines[0] == "no nvidia-smi":
        return GpuFact(error="no nvidia-smi")
    names, memory, unified, free_mib = [], [], False, []
    for line in lines:
        parts = [x.strip() for x in line.split(",")]
        if len(parts) != 3:
            return GpuFact(error=line[:200])
        names.append(parts[0])
        if "N/A" in parts[1] or "N/A" in parts[2]:
            unified = True
        else:
            memory.append(f"{parts[1]} / {parts[2]}")
            used, total = (_mib(x) for x in parts[1:])
            free_mib.append(None if used is None or total is None else total - used)
    known = bool(free_mib) and not unified and None not in free_mib
    free = round(sum(free_mib) / 1024, 2) if known else None
    return GpuFact(names=names, unified_memory=unified, memory="; ".join(memory) or None, free_gib=free)


def _mib(value: str) -> Optional[float]:
    m = re.fullmatch(r"(\d+(?:\.\d+)?) MiB", value)
    return float(m.group(1)) if m else None


# ---- a folder's files and sizes (the model on each node) -----------------------------------------


def model_files_command(path: str) -> str:
    """Every file under the folder with its size, symlinks followed: a Hugging Face snapshot folder
    is symlinks into ../../blobs, and it is the files they point to that must be there and whole
    (a broken symlink is not listed, so the node lacks that file)."""
    return f"cd {quote(path)} && find -L . -type f -printf '%P\\t%s\\n' | LC_ALL=C sort"


def parse_file_listing(text: str) -> dict[str, int]:
    """model_files_command's listing: relative path -> size. Lines that are not path<TAB>size are
    skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        path, sep, size = line.rpartition("\t")
        if sep and path and size.strip().isdigit():
            out[path] = int(size)
    return out


# ---- a GPU inside a container: the NVIDIA runtime really works (`--gpus all` smoke run) -----------


def gpu_smoke_command(image: str) -> str:
    """What `up` relies on, run for real: a throwaway container of the cluster's image asking for
    every GPU, listing them (docker info naming a runtime proves less)."""
    return f"docker run --rm --pull never --gpus all --network none --entrypoint nvidia-smi {quote(image)} -L"


class GpuSmokeFact(BaseModel):
    gpus: list[str] = Field(default_factory=list, description="GPU names the container saw")
    error: Optional[str] = None
    fix: Optional[str] = None


_SMOKE_GPU = re.compile(r"^GPU \d+: (.+?) \(UUID:", re.M)
# what docker or the container prints when the GPU cannot reach it, and what fixes it
_SMOKE_CAUSES = (
    ("could not select device driver", "the NVIDIA Container Toolkit is not set up for Docker: install nvidia-container-toolkit, "
                                       "then `sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker`"),
    ("unknown or invalid runtime name: nvidia", "Docker has no `nvidia` runtime registered: `sudo nvidia-ctk runtime configure "
                                                "--runtime=docker && sudo systemctl restart docker`"),
    ("exec format error", "the image is built for another CPU architecture (an amd64 image on an arm64 Spark): use an arm64 "
                          "or multi-arch image"),
    ("executable file not found", "the image has no nvidia-smi: the NVIDIA runtime did not inject the driver's tools "
                                  "(NVIDIA_DRIVER_CAPABILITIES must include utility), or the image is not a CUDA image"),
    ("Failed to initialize NVML", "the container cannot talk to the driver (driver/library version mismatch after an "
                                  "update: reboot the node)"),
)


def parse_gpu_smoke(exit_code: int, stdout: str, stderr: str = "") -> GpuSmokeFact:
    gpus = _SMOKE_GPU.findall(stdout)
    if exit_code == 0 and gpus:
        return GpuSmokeFact(gpus=gpus)
    text = (stderr + "\n" + stdout).strip()
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    fix = next((f for needle, f in _SMOKE_CAUSES if needle in text), None)
    error = next((x for x in lines if any(n in x for n, _ in _SMOKE_CAUSES)), lines[-1] if lines else f"exit code {exit_code}")
    return GpuSmokeFact(gpus=gpus, error="the container listed no GPU" if exit_code == 0 else error[:300], fix=fix)


# ---- room on the node: free space where Docker keeps images and container logs ----------------------

DOCKER_DISK_COMMAND = "d=$(docker info --format '{{.DockerRootDir}}' 2>/dev/null); df -Pk \"${d:-/var/lib/docker}\""


def parse_df_free_gib(text: str) -> Optional[float]:
    """Available space (GiB) of the one filesystem `df -Pk PATH` lists; None when unreadable."""
    rows = [x.split() for x in text.splitlines() if x.strip() and not x.startswith("Filesystem")]
    try:
        return int(rows[-1][3]) / 1024 ** 2
    except (IndexError, ValueError):
        return None


# ---- the node's clock (nodes whose clocks differ by seconds make every log and metric disagree) ------

CLOCK_COMMAND = "date +%s.%N"


def parse_clock(text: str) -> Optional[float]:
    try:
        return float(text.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return None


# ---- platforms: the node's Docker daemon and an image (an amd64 image on an arm64 Spark) ---------

DOCKER_PLATFORM_COMMAND = "docker version --format '{{.Server.Os}}/{{.Server.Arch}}'"


def image_platform_command(image: str) -> str:
    return f"docker image inspect --format '{{{{.Os}}}}/{{{{.Architecture}}}}{{{{if .Variant}}}}/{{{{.Variant}}}}{{{{end}}}}' {quote(image)}"


_PLATFORM = re.compile(r"^\s*([a-z]+/[a-z0-9_]+(?:/v\d+)?)\s*$")
_SERVER_OS_ARCH = re.compile(r"^Server:.*?^\s+OS/Arch:\s+(\S+)", re.M | re.S)


# the node's and the image's platform in one read (an image absent prints nothing after the mark)
def platforms_command(image: str) -> str:
    return f"{DOCKER_PLATFORM_COMMAND}; echo '=== image'; {image_platform_command(image)} 2>/dev/null"


def parse_platforms(stdout: str) -> tuple[Optional[str], Optional[str]]:
    node, _, image = stdout.partition("=== image\n")
    return parse_platform(node), parse_platform(image)


def parse_platform(text: str) -> Optional[str]:
    """os/arch[/variant] from one of the commands above, or from a whole `docker version` (its
    Server section's OS/Arch, which is what containers run on); None when neither is there."""
    if m := _SERVER_OS_ARCH.search(text):
        return m.group(1)
    lines = [x for x in text.splitlines() if x.strip()]
    m = _PLATFORM.match(lines[0]) if len(lines) == 1 else None
    return m.group(1) if m else None


_ARCH_ALIASES = {"aarch64": "arm64", "arm64/v8": "arm64", "x86_64": "amd64", "x86-64": "amd64"}


def same_platform(a: str, b: str) -> bool:
    """linux/arm64 and linux/arm64/v8 (or aarch64) are one platform; linux/amd64 is another."""
    def norm(p: str) -> str:
        os_, _, arch = p.partition("/")
        return f"{os_}/{_ARCH_ALIASES.get(arch, arch)}"
    return norm(a) == norm(b)


# ---- vLLM's /metrics: progress and load ----------------------------------------------------------

METRICS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",  # older releases
    "vllm:iteration_tokens_total_count": "steps_total",
    "vllm:generation_tokens_total": "generation_tokens_total",
    "vllm:prompt_tokens_total": "prompt_tokens_total",
    # the time between two tokens of a request, each token observed (0.17.1 and later): decode speed (spark_cluster.speed)
    "vllm:inter_token_latency_seconds_sum": "itl_sum",
    "vllm:inter_token_latency_seconds_count": "itl_count",
}
# the counters whose movement is progress: engine steps, generated and prompt tokens
PROGRESS_COUNTERS = ("steps_total", "generation_tokens_total", "prompt_tokens_total")

_HELP_TYPE = re.compile(r"^# (HELP|TYPE) ")


def parse_metrics(text: str) -> dict[str, float]:
    """The progress and load numbers of vLLM's /metrics, summed over label sets."""
    out: dict[str, float] = {}
    from prometheus_client.parser import text_string_to_metric_families

    # vLLM's /metrics is ~60 KB of histograms; only the wanted families go through the parser
    wanted = tuple(METRICS) + tuple(name.removesuffix("_count") for name in METRICS)
    lines = [line for line in text.splitlines() if _HELP_TYPE.sub("", line).startswith(wanted)]
    try:
        families = list(text_string_to_metric_families("\n".join(lines) + "\n"))
    except ValueError:
        return {}
    for family in families:
        for sample in family.samples:
            key = METRICS.get(sample.name)
            if key is not None:
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def counters(metrics: dict[str, float]) -> tuple[Optional[float], ...]:
    return tuple(metrics.get(k) for k in PROGRESS_COUNTERS)


def progressed(before: tuple[Optional[float], ...], after: tuple[Optional[float], ...]) -> bool:
    """The one definition of progress (status and the watchdog): any counter moved between two
    readings. Busy is not dead: however slow, a movement is progress."""
    return any(a is not None and b is not None and a != b for b, a in zip(before, after))


# ---- Ray's own view (templates/node-scripts/ray-state.py, run inside the Ray head container) -----------------


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


# ---- a process started in a container (vLLM inside the Ray head container) ----------------------


class ProcessFact(BaseModel):
    state: Literal["running", "not-started", "gone", "unknown"]
    pid: Optional[int] = None
    detail: str = ""


def process_command(container: str, pid_file: str) -> str:
    """Prints the PID and command line of the process a container runs (its PID in `pid_file`), or
    says why it is not there. Exit 0 only when it runs."""
    script = ('p=$(cat "$1" 2>/dev/null) || { echo "no pid file"; exit 3; }; '
              '[ -r "/proc/$p/cmdline" ] || { echo "pid $p gone"; exit 4; }; '
              'printf "%s " "$p"; tr "\\0" " " < "/proc/$p/cmdline"; echo')
    return f"docker exec {quote(container)} sh -c {quote(script)} pid {quote(pid_file)}"


def parse_process(argv: list[str], exit_code: int, stdout: str, stderr: str = "") -> ProcessFact:
    """`argv`: the process's command line as started (its first two words identify it)."""
    out = stdout.strip()
    if exit_code == 0 and out:
        pid, _, cmdline = out.partition(" ")
        # the command line itself is never kept: it may carry a secret (`--api-key ...` in vllm.extra_args)
        if pid.isdigit() and argv[0] in cmdline and (len(argv) < 2 or argv[1] in cmdline):
            return ProcessFact(state="running", pid=int(pid), detail=" ".join(argv[:2]))
        program = cmdline.split(" ", 1)[0].rsplit("/", 1)[-1][:60]
        return ProcessFact(state="gone", detail=f"pid {pid} is another process now ({program})")
    if exit_code == 3:
        return ProcessFact(state="not-started", detail=out)
    if exit_code == 4:
        return ProcessFact(state="gone", detail=out)
    why = (stderr.strip() or out or f"exit {exit_code}").splitlines()[-1][:200]
    # `docker exec` into a stopped or paused container: the container fact says which
    return ProcessFact(state="unknown", detail=why)
