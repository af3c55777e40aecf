# Installed into the simulated nodes' image as a .pth-imported module: at interpreter start,
# ask Linux for permission to use AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM). Without it,
# oneDNN's bf16 kernels die with SIGILL on AMX-capable CPUs. Simulation image only.
try:
    import ctypes

    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.syscall(158, 0x1023, 18)  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
except Exception:  # not x86_64, old kernel: nothing to do
    pass
