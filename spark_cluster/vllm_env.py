"""Parser-only Python environments for an exact vLLM release (no GPU, no CUDA downloads).

`spark-cluster validate --vllm 0.17.1` checks the rendered `vllm serve` flags against that
release without the image and without a GPU. The environment holds vLLM itself (`--no-deps`),
the CPU build of PyTorch and vLLM's requirements minus the GPU-only ones: built once (`COST`),
then reused from the cache folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from . import timeouts
from .errors import SparkClusterError, VllmEnvError  # noqa: F401 - re-exported

# measured 2026-12-02 on the 2-core machine: 0.17.1 in 1m46s, 4.0 GB; 0.33.0 in 3m23s, 4.9 GB
COST = "about 2-4 minutes and 4-5 GB"
# the CPU build of PyTorch pip can install here (any torch imports far enough to build vLLM's parser)
DEFAULT_TORCH = os.environ.get("SPARK_CLUSTER_VLLM_ENV_TORCH", "torch==2.13.0")
CACHE = Path(os.environ.get("SPARK_CLUSTER_VLLM_ENV_CACHE", Path.home() / ".cache" / "spark-cluster" / "vllm-envs"))
# requirements that only matter on a GPU (or pull CUDA builds); the parser never imports them
GPU_ONLY = re.compile(
    r"^(torch|torchaudio|torchvision|triton|xformers|flashinfer.*|nvidia-.*|quack-kernels|cupy.*|deep[-_]gemm|"
    r"deep[-_]ep|ray|fastsafetensors|apache-tvm-ffi|tilelang|cuda-.*|flash[-_]attn.*)$",
    re.I,
)
# Run by the new environment's interpreter (which has no `packaging` yet): vLLM's requirements as
# declared, and the environment markers are evaluated against (as packaging.markers.default_environment).
_REQUIREMENTS = r"""
import importlib.metadata as md, json, os, platform, sys
impl = sys.implementation
version = "{0.major}.{0.minor}.{0.micro}".format(impl.version)
if impl.version.releaselevel != "final":
    version += impl.version.releaselevel[0] + str(impl.version.serial)
env = {"implementation_name": impl.name, "implementation_version": version, "os_name": os.name,
       "platform_machine": platform.machine(), "platform_release": platform.release(), "platform_system": platform.system(),
       "platform_version": platform.version(), "python_full_version": platform.python_version(),
       "platform_python_implementation": platform.python_implementation(), "python_version": ".".join(platform.python_version_tuple()[:2]),
       "sys_platform": sys.platform}
print(json.dumps({"requires": md.requires("vllm") or [], "environment": env}))
"""


def install_specs(requires: list[str], environment: dict[str, str]) -> list[str]:
    """vLLM's requirements to install into the parser-only environment: those whose marker holds
    there (no extras), minus the GPU-only ones, each as `name<spec>` without its marker."""
    from packaging.requirements import Requirement  # here: `status` and every other command import this module's COST

    out = []
    for line in requires:
        r = Requirement(line)
        if r.marker is not None and not r.marker.evaluate({**environment, "extra": ""}):
            continue
        if not GPU_ONLY.match(r.name):
            out.append(str(r).split(";")[0].strip())
    return out




def env_python(version: str, cache: Path = CACHE) -> Path:
    return cache / f"vllm-{version}" / "bin" / "python"


def _run(cmd: list[str], log, timeout: float) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        partial = ((exc.stdout or b"") + (exc.stderr or b""))
        partial = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
        raise VllmEnvError(f"`{' '.join(cmd[:8])}` did not finish within {timeout:g}s; its last output:\n{partial[-2000:]}") from None
    except OSError as exc:
        raise VllmEnvError(f"`{cmd[0]}` cannot run: {exc}") from None
    if log:
        log(" ".join(c if len(c) < 60 else c[:57] + "..." for c in cmd[:8]) + (" ..." if len(cmd) > 8 else ""))
    if p.returncode != 0:
        raise VllmEnvError(f"`{' '.join(cmd[:8])}` failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-2000:]}")
    return p.stdout


def ensure_env(version: str, *, cache: Path = CACHE, log=None, timeout: float = timeouts.VLLM_ENV_STEP_S) -> Path:
    """The interpreter of a parser-only environment for vLLM `version`, built if missing."""
    if not re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", version):
        raise VllmEnvError(f"{version!r} is not a vLLM release number (like 0.17.1)")
    python = env_python(version, cache)
    if (python.parent.parent / ".complete").exists():
        return python
    final = python.parent.parent
    tmp = final.with_name(final.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    base = os.environ.get("SPARK_CLUSTER_VLLM_ENV_PYTHON", sys.executable)
    _run([base, "-m", "venv", str(tmp)], log, 300)
    py = str(tmp / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run(pip + [DEFAULT_TORCH], log, timeout)
    _run(pip + ["--no-deps", f"vllm=={version}"], log, timeout)
    declared = json.loads(_run([py, "-c", _REQUIREMENTS], log, 120))
    _run(pip + install_specs(declared["requires"], declared["environment"]), log, timeout)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    # venv scripts carry the folder name in their shebangs; python itself is what we run
    (final / ".complete").write_text(version + "\n")
    return env_python(version, cache)
