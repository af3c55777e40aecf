"""Where the compile and kernel caches live (pure: from the config alone).

Each node keeps them on its own disk, in a folder per cluster and image (kernels compiled for one
vLLM, PyTorch and FlashInfer are not the next image's), mounted into every container of the group at
CACHE_TARGET, and every library's cache location is pointed into it by its own variable (one the
user sets in container.env or a node's env wins). What each variable is, with its source: docs/caches.md.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .settings import Mount

if TYPE_CHECKING:
    from .config import ClusterConfig

CACHE_TARGET = "/spark-cluster-cache"

# each library's cache variable -> its folder under CACHE_TARGET
CACHE_ENV = {
    "VLLM_CACHE_ROOT": "vllm",  # vLLM: torch.compile's artifacts (torch_compile_cache), its other caches
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",  # PyTorch Inductor's compiled graphs and kernels
    "TRITON_CACHE_DIR": "triton",  # Triton's compiled kernels
    "FLASHINFER_WORKSPACE_BASE": "flashinfer",  # FlashInfer's JIT modules (it appends .cache/flashinfer)
    "TILELANG_CACHE_DIR": "tilelang",  # TileLang's kernels and autotuner
    "TORCH_EXTENSIONS_DIR": "torch-extensions",  # C++/CUDA extensions built at run time
    "CUDA_CACHE_PATH": "cuda",  # the driver's PTX JIT cache
    "TVM_FFI_CACHE_DIR": "tvm-ffi",
    "CUTE_DSL_CACHE_DIR": "cute-dsl",  # CUTLASS's CuTe DSL kernels
}


def image_folder(image: str) -> str:
    """The image reference as one folder name (registry/name:tag -> registry_name_tag)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image).strip("._") or "image"


def host_folder(cfg: "ClusterConfig") -> str:
    """The group's cache folder on each of its nodes."""
    return f"{cfg.cache.path}/{cfg.name}/{image_folder(cfg.container.image)}"


# PyTorch Inductor keeps its precompiled C++ headers in its default folder whatever
# TORCHINDUCTOR_CACHE_DIR says (torch 2.13 codecache._HEADER_DIR: tempfile's folder, then
# torchinductor_<user>; the group's containers run as root), so the cache folder itself is mounted
# there too: a container started again finds them in <cache>/precompiled_headers (measured:
# docs/caches.md). The folder itself, never a subfolder: emptying the cache while a container runs
# would leave a subfolder's mount pointing at a deleted directory (Inductor's mkdir then fails)
INDUCTOR_DEFAULT_DIR = "/tmp/torchinductor_root"


def cache_mount(cfg: "ClusterConfig") -> list[Mount]:
    if not cfg.cache.enabled:
        return []
    return [Mount(source=host_folder(cfg), target=target) for target in (CACHE_TARGET, INDUCTOR_DEFAULT_DIR)]


def cache_env(cfg: "ClusterConfig") -> dict[str, str]:
    """The caches' variables (container.env and a node's env, applied after them, win)."""
    return {k: f"{CACHE_TARGET}/{sub}" for k, sub in CACHE_ENV.items()} if cfg.cache.enabled else {}
