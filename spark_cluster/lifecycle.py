"""What `up` and `down` run besides creating the group, as plan steps: taking and releasing the
cluster's lock, listing the cluster's containers, and for each container the commands that stop a
process hosted in it, save its log, kill it, stop and remove it. `build_plan` adds them to `up`'s
plan; `build_down_plan` is `down`'s. So `plan` and `plan --down` show every command that will run
(a container of the cluster found on a node that the plan does not name, from an earlier
cluster.yaml, gets the same commands with its name).
"""

from __future__ import annotations

from . import lock, timeouts
from .config import ClusterConfig
from .box_facts import clock_reset_command
from .engine_log import SINCE, log_command
from .facts import containers_command, process_command
from .render import quote
from .steps import PHASES, ContainerSpec, DownPlan, Plan, ProcessSpec, RestartPlan, Step

# the order a group stops in: the API first, the head, then the workers (a Ray head or vLLM's rank 0
# stopped after its workers would wait on them)
COMPONENT_ORDER = ["vllm", "ray-head", "vllm-worker", "ray-worker"]


def stop_rank(component: str) -> int:
    return COMPONENT_ORDER.index(component) if component in COMPONENT_ORDER else len(COMPONENT_ORDER)


# ---- the commands ---------------------------------------------------------------------------------

def stop_timeout_s(cfg: ClusterConfig, component: str, graceful: bool) -> int:
    """How long a container gets to stop by itself: a Ray worker node keeps nothing worth a graceful
    stop, and its `ray start --block` waits out the whole stop timeout once the head is gone."""
    if not graceful:
        return 0
    stop = cfg.container.stop_timeout_s
    return min(stop, timeouts.RAY_WORKER_STOP_S) if component == "ray-worker" else stop


def stop_process_command(p: ProcessSpec, timeout_s: int) -> str:
    """SIGTERM to a process hosted in a container, then wait (bounded) until it has exited."""
    script = ('p=$(cat "$1" 2>/dev/null) || exit 0; kill -TERM "$p" 2>/dev/null || exit 0; i=0; '
              'while [ -e "/proc/$p" ] && [ "$i" -lt "$2" ]; do sleep 0.5; i=$((i+1)); done')
    return f"docker exec {quote(p.container)} sh -c {quote(script)} stop {quote(p.pid_file)} {timeout_s * 2} >/dev/null 2>&1; true"


def clear_engine_command(container: str, wait_s: int = timeouts.ENGINE_GONE_S) -> str:
    """SIGKILL whatever is left of an engine in a container, and wait (bounded) until it is gone: a
    SIGKILLed vLLM API server leaves its EngineCore and workers alive, holding their memory
    (vllm#55510), and a wedged engine takes no SIGTERM. Matched by command line (`vllm serve`, the
    `VLLM::` process titles), this shell left out (its own text is written so it does not match).
    Exit 0 once none is left; else 1, naming the PIDs still there (stuck in the kernel)."""
    script = ('left() { for d in /proc/[0-9]*; do c=$(tr "\\0" " " < "$d/cmdline" 2>/dev/null) || continue; '
              'case "$c" in *"vllm"" serve"*|"VLLM"::*) echo "${d#/proc/}";; esac; done; }; '
              'i=0; while l=$(left); [ -n "$l" ]; do [ "$i" -ge "$1" ] && { echo "engine processes still there: "$l; exit 1; }; '
              'kill -9 $l 2>/dev/null; sleep 0.5; i=$((i+1)); done')
    return f"docker exec {quote(container)} sh -c {quote(script)} clear {wait_s * 2}"


def logs_command(name: str) -> str:
    """A container's whole log, with timestamps (saved by down, the watchdog's bundles, a replacement)."""
    return f"docker logs --timestamps {quote(name)} 2>&1"


def tail_command(name: str, lines: int = 20) -> str:
    """A container's last lines (shown when a step that concerns it failed)."""
    return f"docker logs --tail {lines} {quote(name)} 2>&1"


def kill_command(name: str) -> str:
    """SIGKILL (also reaches a paused container); a failure is left to the removal that follows."""
    return f"docker kill {quote(name)} >/dev/null 2>&1; true"


def discard_command(name: str) -> str:
    """A throwaway container removed at once, whatever it was doing (the flag check's, after its deadline)."""
    return f"docker rm -f {quote(name)} >/dev/null 2>&1; true"


def remove_command(name: str, stop_s: int) -> str:
    """Stop (`stop_s` to end by itself), then remove: `docker rm -f` also ends a paused container,
    which a SIGTERM never reaches. Exit 0 only when docker no longer knows it."""
    return (f"docker stop -t {stop_s} {quote(name)} >/dev/null 2>&1; docker rm -f {quote(name)} 2>&1 >/dev/null; "
            f"! docker container inspect {quote(name)} >/dev/null 2>&1")


# ---- as steps -------------------------------------------------------------------------------------

def image_fetch_commands(cfg: ClusterConfig, node: str) -> list[str]:
    """What brings the image to a node that lacks it, in the order tried: `docker pull`; node to node
    from a node that has it (a receiver here, `docker save` there, over the cluster link; `<port>` is
    the receiver's); streamed through the controller (`docker save` there, `docker load` here)."""
    image = cfg.container.image
    here = cfg.node(node)
    out = [f"docker pull --quiet {quote(image)}"]
    for other in cfg.nodes:
        if other.name != node:
            out += [f"python3 - receive-pipe {quote('docker load')} {quote(here.address)} {quote(other.address)}",
                    f"on {other.name}: python3 - send-pipe {quote('docker save ' + quote(image))} {quote(here.address)} <port> 0",
                    f"on {other.name}: docker save {quote(image)}"]
    return out + ["docker load"]


def with_lifecycle(cfg: ClusterConfig, plan: Plan) -> Plan:
    """`up`'s plan with the steps around the group's: the lock, the listing, the replacement of a
    group that must be created again, and what other steps run when they need to (`also`)."""
    # a wait (Ray's members, readiness) checks now and then that the group still runs, and shows
    # the last log lines of what ended or did not join
    members = [f"on {n}: {containers_command(cfg.name)}" for n in dict.fromkeys(c.node for c in plan.containers())]
    members += [f"on {p.node}: {process_command(p.container, p.pid_file)}" for p in plan.processes()]
    tails = [f"on {c.node}: {tail_command(c.name)}" for c in plan.containers()]
    steps = []
    for s in plan.steps:
        also: list[str] = []
        if s.kind in ("wait-ray", "http"):
            also = members + tails
        elif s.kind == "start" and s.container is not None:
            also = [tail_command(s.container.name)]
            if s.container.component == "vllm":  # the API's rank: where its start's time went, once ready
                also.append(log_command(s.container.name, SINCE))
        elif s.kind == "exec" and s.process is not None:
            also = [process_command(s.process.container, s.process.pid_file), tail_command(s.process.container),
                    log_command(s.process.container, SINCE)]
        elif s.check is not None and s.check.kind == "image-present":
            also = image_fetch_commands(cfg, s.node)
        elif s.check is not None and s.check.kind == "vllm-flags":
            also = [discard_command(s.check.container)]  # after a check that timed out
        steps.append(s.model_copy(update={"also": also}) if also else s)
    steps = [lock_step(cfg), *list_steps(cfg, "list"), *steps, *replace_steps(cfg, plan), unlock_step(cfg)]
    order = {phase: i for i, phase in enumerate(PHASES)}
    return plan.model_copy(update={"steps": sorted(steps, key=lambda s: order[s.phase])})


def lock_step(cfg: ClusterConfig, phase: str = "lock") -> Step:
    return Step(id="lock", phase=phase, node=cfg.head.name, kind="lock", timeout_s=timeouts.QUICK_S,
                description="take the cluster's lock (when held: read who holds it; a holder of this machine whose process is gone is removed)",
                command=lock.take_command(cfg.name), also=[lock.holder_command(cfg.name), lock.release_command(cfg.name)])


def unlock_step(cfg: ClusterConfig, phase: str = "unlock") -> Step:
    return Step(id="unlock", phase=phase, node=cfg.head.name, kind="unlock", timeout_s=timeouts.QUICK_S,
                description="release the cluster's lock", command=lock.release_command(cfg.name))


def list_steps(cfg: ClusterConfig, phase: str) -> list[Step]:
    return [Step(id=f"list/{n.name}", phase=phase, node=n.name, kind="list", timeout_s=timeouts.QUICK_S,
                 description="list the cluster's containers", command=containers_command(cfg.name)) for n in cfg.nodes]


def hosted(processes: list[ProcessSpec], node: str, container: str) -> list[ProcessSpec]:
    """The processes started inside a container (vLLM inside the Ray head)."""
    return [p for p in processes if p.node == node and p.container == container]


def remove_step(cfg: ClusterConfig, node: str, name: str, component: str, processes: list[ProcessSpec], *,
                phase: str, graceful: bool = True, save_log: bool = True) -> Step:
    """Stop and remove one container: first a process hosted in it (vLLM in the Ray head, while Ray
    still runs), its log saved, then the container."""
    stop = stop_timeout_s(cfg, component, graceful)
    hosted_here = hosted(processes, node, name) if graceful else []
    first = [stop_process_command(p, stop) for p in hosted_here] + ([logs_command(name)] if save_log else [])
    what = ", ".join([f"stop {p.name} in it" for p in hosted_here] + (["save its log"] if save_log else []))
    return Step(id=f"remove/{node}/{name}", phase=phase, node=node, kind="remove", timeout_s=stop + timeouts.REMOVE_EXTRA_S,
                description=f"{what + ', then ' if what else ''}stop ({stop} s) and remove {name}", command=remove_command(name, stop),
                also=first)


def kill_step(node: str, name: str, phase: str) -> Step:
    return Step(id=f"kill/{node}/{name}", phase=phase, node=node, kind="kill", timeout_s=timeouts.QUICK_S,
                description=f"SIGKILL {name}", command=kill_command(name))


def _in_stop_order(containers: list[ContainerSpec]) -> list[ContainerSpec]:
    return sorted(containers, key=lambda c: stop_rank(c.component))


def replace_steps(cfg: ClusterConfig, plan: Plan) -> list[Step]:
    """`up`'s removals of the group before it is created again (a member changed, stopped or gone):
    run only for what `up` finds must go."""
    return [remove_step(cfg, c.node, c.name, c.component, plan.processes(), phase="replace") for c in _in_stop_order(plan.containers())]


DOWN_PHASES = ("lock", "list", "kill", "remove", "restore", "unlock")


def restore_steps(cfg: ClusterConfig) -> list[Step]:
    """What `up`'s prepare changed on a node that `down` gives back: the GPU's clock cap (the sysctls
    stay, persisted: the box is better with them)."""
    if not cfg.gpu.max_clock_mhz:
        return []
    return [Step(id=f"restore/{n.name}/gpu-clock", phase="restore", node=n.name, kind="run", timeout_s=timeouts.QUICK_S,
                 description="give the GPU's SM clock back to the driver (undo gpu.max_clock_mhz)",
                 command=clock_reset_command("sudo -n " if cfg.node_ssh(n).sudo else "")) for n in cfg.nodes]


def build_down_plan(cfg: ClusterConfig, plan: Plan, *, graceful: bool = True, restore: bool = True) -> DownPlan:
    """`down`: every container of the group in stop order (vLLM, the head, then the workers), each
    stopped and removed with its log saved; graceful=False (a wedged group, the watchdog's restart):
    SIGKILL in that order first, then every log saved and every container removed at once. restore:
    then what prepare changed is given back (not on a restart: its `up` sets it again)."""
    containers = _in_stop_order(plan.containers())
    steps = [lock_step(cfg), *list_steps(cfg, "list")]
    if not graceful:
        steps += [kill_step(c.node, c.name, "kill") for c in containers]
    steps += [remove_step(cfg, c.node, c.name, c.component, plan.processes(), phase="remove", graceful=graceful) for c in containers]
    steps += restore_steps(cfg) if restore else []
    steps.append(unlock_step(cfg))
    return DownPlan(cluster=cfg.name, graceful=graceful, steps=steps)


def build_restart_plan(cfg: ClusterConfig, plan: Plan) -> RestartPlan:
    """`plan --restart`: the watchdog's two restarts as data (watch_restart runs them)."""
    from .restart_choice import KEPT_WHY, always_full

    full_kill, why = build_down_plan(cfg, plan, graceful=False, restore=False), always_full(cfg.watchdog.restart, cfg.executor)
    if why is not None:
        return RestartPlan(cluster=cfg.name, on_hang=f"the full restart: {why}", kept=None, full_kill=full_kill, full_up=plan)
    head = cfg.head.name
    logs = [Step(id=f"logs/{c.node}/{c.name}", phase="kill", node=c.node, kind="run", timeout_s=timeouts.LOG_DUMP_S,
                 description=f"save {c.name}'s log so far into the incident bundle (the container stays)", command=logs_command(c.name))
            for c in plan.containers()]
    clear = [s.model_copy(update={"phase": "kill"}) for s in plan.steps_in("clear")]
    wait = next(s for s in plan.steps if s.kind == "wait-ray")
    release = wait.model_copy(update={"id": f"kill/{head}/ray-release", "phase": "kill", "deadline_s": timeouts.RAY_RELEASE_S,
                                      "description": "ask Ray until it has released the engine's ranks (its placement group removed)"})
    then = [s for s in plan.steps if s.kind != "start" and s.phase != "replace"]  # `up` in the kept containers
    return RestartPlan(cluster=cfg.name, kept=[*logs, *clear, release, *then], full_kill=full_kill, full_up=plan,
                       on_hang=f"the kept restart when, at the hang, {KEPT_WHY.split(': ')[0]}; else the full restart (the "
                               "`restart-start` event and the incident say which and why)")
