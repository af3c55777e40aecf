# Runs in the cluster's own image on every node at once (python3 - RANK WORLD MASTER PORT BACKEND MB
# ITERS; this text on standard input), with the node's containers' environment (NCCL_*, GLOO_*):
# a short all-reduce across the nodes, printing the bus bandwidth as nccl-tests computes and prints
# it (2 (n-1)/n x bytes / time, GB/s). NCCL on the GPUs of Sparks; Gloo on the CPU of the simulated nodes.
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

rank, world, master, port, backend, mb, iters = sys.argv[1:8]
rank, world, iters = int(rank), int(world), int(iters)
dist.init_process_group(backend, init_method=f"tcp://{master}:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
device = "cuda" if backend == "nccl" else "cpu"
x = torch.ones(int(float(mb) * 2**20) // 4, dtype=torch.float32, device=device)


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


for _ in range(2):  # warm-up: connections, buffers
    dist.all_reduce(x)
sync()
dist.barrier()
t0 = time.perf_counter()
for _ in range(iters):
    dist.all_reduce(x)
sync()
took = (time.perf_counter() - t0) / iters
size = x.numel() * 4
busbw = 2 * (world - 1) / world * size / took
if rank == 0:  # nccl-tests' own summary line (facts.parse_nccl_tests reads both)
    print(f"# all-reduce backend={backend} world={world} bytes={size} seconds={took:.6f}", flush=True)
    print(f"# Avg bus bandwidth    : {busbw / 1e9:.4f} ", flush=True)
dist.destroy_process_group()
