"""Typed errors. Library code raises these; only the CLI maps them to exit codes."""

from __future__ import annotations


class SparkClusterError(Exception):
    """Base of every error spark-cluster raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(SparkClusterError):
    """cluster.yaml is missing, unreadable or invalid. Nothing has been contacted."""

    exit_code = 2

    def __init__(self, message: str, *, problems: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.problems = problems or []

    def __str__(self) -> str:
        lines = [self.message] + [f"  - {p}" for p in self.problems]
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


class RenderError(SparkClusterError):
    """A template could not be rendered (a bug or a broken templates/ folder)."""

    exit_code = 11
