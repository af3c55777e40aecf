"""Typed errors, every one with its exit code. Library code raises these; only the CLI turns
them into exit codes and messages. The first line of each class's docstring is what its exit code
means in docs/design.md's table (`exit_codes()`; a test keeps the two equal). Every other module
imports this one; it imports nothing of the project (what it needs of a command's result or a
plan's step is said by the protocols below)."""

from __future__ import annotations

from typing import Any, Optional, Protocol


class Output(Protocol):
    """What an error tells of a node command's result (transport.Result)."""

    node: str
    exit_code: int

    def tail(self, lines: int = ...) -> str: ...


class StepLike(Protocol):
    """What an error tells of a plan's step (plan.Step)."""

    id: str
    node: Optional[str]
    description: str

# exit codes that are not errors of a class below
EXIT_OK = 0
EXIT_NOT_SERVING = 3
EXIT_INTERRUPTED = 130


class SparkClusterError(Exception):
    """Base of every error spark-cluster raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(SparkClusterError):
    """cluster.yaml is missing, unreadable or invalid, or a command line is wrong. Nothing has been contacted."""

    exit_code = 2

    def __init__(self, message: str, *, problems: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.problems = problems or []

    def __str__(self) -> str:
        lines = [self.message] + [f"  - {p}" for p in self.problems]
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


class SimError(SparkClusterError):
    """The simulated cluster cannot be created or removed."""

    exit_code = 4


class TransportError(SparkClusterError):
    """The node could not be reached or would not let us in (nothing ran)."""

    exit_code = 5


class HostKeyError(TransportError):
    """The node's SSH host key is unknown or changed: refused before anything runs."""


class CommandTimeout(SparkClusterError):
    """A node command did not finish in time (it was ended on the node too).

    `partial` keeps what it printed until then."""

    exit_code = 6

    def __init__(self, message: str, partial: Optional[Output] = None):
        super().__init__(message)
        self.partial = partial

    def __str__(self) -> str:
        tail = self.partial.tail(5) if self.partial is not None else ""
        return self.message + (f"\n  last output:\n{tail}" if tail else "")


class CommandFailed(SparkClusterError):
    """A node command exited non-zero where it must not."""

    exit_code = 7

    def __init__(self, result: Output, what: str | None = None):
        self.result = result
        tail = result.tail()
        msg = f"{result.node}: {what or 'command'} failed with exit code {result.exit_code}"
        super().__init__(msg + (f"\n{tail}" if tail else ""))


class PreflightError(SparkClusterError):
    """A preflight check failed: nothing on any node was changed."""

    exit_code = 8

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("preflight failed, nothing was changed:\n" + "\n".join(f"  - {p}" for p in problems))


def indent(text: str) -> str:
    """Lines shown under an error's message (a container's last log lines, what was read back)."""
    return "\n".join("      " + line for line in text.splitlines())


class StepError(SparkClusterError):
    """A step of `up` failed, or `down` could not remove a container; the message says which, where, and the last log lines."""

    exit_code = 9

    def __init__(self, step: StepLike, message: str, tail: str = ""):
        self.step = step
        where = step.node or "controller"
        super().__init__(f"{where}: step {step.id} ({step.description}) failed: {message}" + (f"\n{tail}" if tail else ""))


class RemoveFailed(SparkClusterError):
    """A container could not be stopped or removed; the message names what is left where."""

    exit_code = 9


class LockedError(SparkClusterError):
    """Another spark-cluster operation holds the cluster's lock on the head."""

    exit_code = 10


class RenderError(SparkClusterError):
    """A template could not be rendered (a bug or a broken templates/ folder)."""

    exit_code = 11


class WatchdogFailed(SparkClusterError):
    """The circuit breaker tripped (or the watchdog only observes): it stopped restarting."""

    exit_code = 12


class VllmEnvError(SparkClusterError):
    """A parser-only vLLM environment could not be built."""

    exit_code = 13


class VllmCheckError(SparkClusterError):
    """The flag check itself could not run (no vLLM in the image or environment, timeout...)."""

    exit_code = 14


class VllmArgsError(SparkClusterError):
    """vLLM refuses the rendered `vllm serve` flags."""

    exit_code = 15

    def __init__(self, problems: list[str], where: str):
        super().__init__(f"vLLM ({where}) refuses the `vllm serve` command line:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class SyncError(SparkClusterError):
    """`sync` could not make the model folder identical on every node."""

    exit_code = 16


# where the engine's API key goes in cluster.yaml (said by up, status and the watchdog alike)
ENGINE_KEY_FIX = "VLLM_API_KEY in container.env, or --api-key in vllm.extra_args"


class EngineKeyRefused(SparkClusterError):
    """vLLM refuses the API key spark-cluster sends it (401/403): a configuration error, not a hang."""

    exit_code = 17

    def __init__(self, status: int, where: str):
        super().__init__(f"vLLM answers {status} to {where}: it demands an API key spark-cluster does not have or has wrong",
                         hint=f"give the engine's key as {ENGINE_KEY_FIX}; spark-cluster sends it with readiness, the canary and status")


class RolloutFailed(SparkClusterError):
    """A rolling change (`up` while the controller serves) stopped at a group that did not come back with the new config."""

    exit_code = 18


class StateDirUnsafe(SparkClusterError):
    """state_dir, or a file in it, is not the user's own (another owner, writable by others, a symbolic link): nothing was read from it."""

    exit_code = 19


class MemoryNotBack(SparkClusterError):
    """A node's memory did not come back to what it was before the last engine start: no engine was started into it."""

    exit_code = 20

    def __init__(self, short: dict[str, str], waited_s: float):
        self.short = short
        lines = "\n".join(f"  - {node}: {why}" for node, why in sorted(short.items()))
        super().__init__(
            f"memory did not come back in {waited_s:g}s, no engine was started into it:\n{lines}",
            hint="a killed engine can leave unified memory held in the GPU driver, invisible to nvidia-smi: look for a process "
                 "still holding it (`sudo fuser -v /dev/nvidia*`, `docker ps`), or reboot the node; if something else uses that "
                 "memory on purpose now, `spark-cluster up --accept-memory` starts anyway and keeps the new figure")


class NotifyFailed(SparkClusterError):
    """`notify-test`: a notification target did not take the test message."""

    exit_code = 21


def exit_codes() -> dict[int, str]:
    """Exit code -> what it means (for the documented table and its test)."""
    table: dict[int, str] = {EXIT_OK: "done (`status`: serving)", EXIT_NOT_SERVING: "`status`: not serving",
                             EXIT_INTERRUPTED: "interrupted (Ctrl-C)"}

    def walk(cls: Any) -> None:
        for sub in cls.__subclasses__():  # in definition order: the first class of a code describes it
            table.setdefault(sub.exit_code, (sub.__doc__ or sub.__name__).strip().splitlines()[0])
            walk(sub)

    table[SparkClusterError.exit_code] = "another spark-cluster error"
    walk(SparkClusterError)
    return dict(sorted(table.items()))
