"""Check the rendered `vllm serve` flags with vLLM's own parser, before anything starts.

The check script (templates/node-scripts/vllm-check.py) builds vLLM's `serve` parser the way vLLM's CLI
does, parses the argv, runs the subcommand's validate() and then checks what argparse does not:
the tool call parser, reasoning parser and distributed executor backend names. It runs either
in a throwaway container of the cluster's image on the head node (preflight, plan/validate
`--vllm image`) or in a local Python environment holding a pinned vLLM release.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, Field

from . import timeouts
from .config import ClusterConfig
from .errors import SparkClusterError, VllmArgsError, VllmCheckError  # noqa: F401 - re-exported
from .render import read_template

MARKER = "SPARK-CLUSTER-VLLM-CHECK "
SCRIPT = "node-scripts/vllm-check.py"
# which cluster.yaml key renders a flag (for the error message)
FLAG_KEYS = {
    "--tool-call-parser": "vllm.tool_call_parser",
    "--enable-auto-tool-choice": "vllm.enable_auto_tool_choice",
    "--reasoning-parser": "vllm.reasoning_parser",
    "--distributed-executor-backend": "executor",
    "--dtype": "vllm.dtype",
    "--max-model-len": "vllm.max_model_len",
    "--max-num-seqs": "vllm.max_num_seqs",
    "--gpu-memory-utilization": "vllm.gpu_memory_utilization",
    "--tensor-parallel-size": "vllm.tensor_parallel_size",
    "--pipeline-parallel-size": "vllm.pipeline_parallel_size",
    "--served-model-name": "model.name",
    "--enable-prefix-caching": "vllm.enable_prefix_caching",
    "--no-enable-prefix-caching": "vllm.enable_prefix_caching",
    "--enforce-eager": "vllm.enforce_eager",
    "--trust-remote-code": "vllm.trust_remote_code",
    "--enable-scale-out": "gateway.continue_chat (vLLM 0.30 on; false for an older one)",
}






class ArgProblem(BaseModel):
    flag: Optional[str] = None
    value: Optional[str] = None
    message: str
    suggestion: Optional[str] = None


class VllmCheck(BaseModel):
    where: str = Field(description="what was checked: image@node or a Python interpreter")
    vllm_version: Optional[str] = None
    problems: list[ArgProblem] = Field(default_factory=list)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not self.problems and not self.error

    def messages(self, cfg: Optional[ClusterConfig] = None) -> list[str]:
        out = [describe(p, self.vllm_version, cfg) for p in self.problems]
        if self.error:
            out.append(f"the check could not run: {self.error}")
        return out

    def raise_for_problems(self, cfg: Optional[ClusterConfig] = None) -> None:
        if self.error and not self.problems:
            raise VllmCheckError(f"checking the `vllm serve` flags with {self.where} failed: {self.error}")
        if not self.ok:
            raise VllmArgsError(self.messages(cfg), f"{self.vllm_version or '?'}, {self.where}")


def describe(p: ArgProblem, version: Optional[str], cfg: Optional[ClusterConfig]) -> str:
    head = " ".join(x for x in (p.flag, p.value) if x) or "vllm serve"
    text = f"{head}: {p.message}"
    if version and p.value and p.suggestion is not None:
        text += f" (vLLM {version})"
    if p.suggestion:
        text += f"; did you mean {p.suggestion}?"
    key = config_key(p.flag, cfg)
    if key:
        text += f" [cluster.yaml: {key}]"
    return text


def config_key(flag: Optional[str], cfg: Optional[ClusterConfig]) -> Optional[str]:
    if not flag:
        return None
    if cfg is not None and any(a == flag or a.startswith(flag + "=") for a in cfg.vllm.extra_args):
        return "vllm.extra_args"
    return FLAG_KEYS.get(flag)


def parse_output(stdout: str, stderr: str, exit_status: int, where: str) -> VllmCheck:
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARKER):
            try:
                data = json.loads(line[len(MARKER):])
            except ValueError:
                break
            return VllmCheck(where=where, **data)
    tail = "\n".join((stdout + "\n" + stderr).strip().splitlines()[-8:])
    raise VllmCheckError(
        f"could not run vLLM's parser with {where} (exit {exit_status}):\n{tail}",
        hint="the image (or environment) must hold vLLM with python3 on its PATH; set vllm.check_flags: false to skip this check",
    )


def argv_hash(argvs: list[list[str]]) -> str:
    return hashlib.sha256(json.dumps(argvs).encode()).hexdigest()[:16]


def check_local(python: str | os.PathLike, argv: list[str], *, timeout: float = timeouts.LOCAL_CHECK_S) -> VllmCheck:
    """Run the check with a local interpreter that imports vllm (a parser-only environment)."""
    where = str(python)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "PYTHON"))}
    env.update({"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    with tempfile.TemporaryDirectory(prefix="spark-cluster-vllm-check-") as tmp:
        env.update({"TMPDIR": tmp, "VLLM_CACHE_ROOT": tmp, "HOME": env.get("HOME", tmp)})
        try:
            p = subprocess.run([str(python), "-", json.dumps(argv)], input=read_template(SCRIPT), capture_output=True,
                               text=True, timeout=timeout, env=env, cwd=tmp)
        except FileNotFoundError:
            raise VllmCheckError(f"{python}: no such interpreter") from None
        except subprocess.TimeoutExpired:
            raise VllmCheckError(f"checking the vllm serve flags with {python} took longer than {timeout:.0f} s") from None
    return parse_output(p.stdout, p.stderr, p.returncode, where)


def resolve_python(target: str, log=None) -> Path:
    """`--vllm` values other than `image`: an interpreter, a virtual environment, or a release."""
    from .vllm_env import ensure_env

    path = Path(target).expanduser()
    if path.is_dir():
        for candidate in (path / "bin" / "python", path / "bin" / "python3"):
            if candidate.exists():
                return candidate
        raise VllmCheckError(f"{target}: a folder without bin/python (give a virtual environment or an interpreter)")
    if path.exists():
        return path
    if target[:1].isdigit():
        from .vllm_env import CACHE, COST, env_python

        if log and not (env_python(target).parent.parent / ".complete").exists():
            log(f"building a parser-only environment for vLLM {target} in {CACHE} (once: {COST})")
        return ensure_env(target, log=log)
    raise VllmCheckError(f"--vllm {target}: not an interpreter, a virtual environment, a vLLM release (like 0.17.1) or `image`")
