"""What Spark owners learned the hard way (spark_cluster.box_checks): each verdict over outputs recorded
on real machines (tests/data/facts: kernel-*, cma-*, driver-*, heat-*) and over the figures the public
threads give, healthy and each failing case; then `up` and `doctor` with them on fake nodes."""

from __future__ import annotations

import pytest

from spark_cluster import box_checks
from spark_cluster.box_checks import (ClockCapped, CmaSane, DriverSame, GdrCapable, GpuHeatOk, KernelKnown, MemoryCeiling, drivers_differ,
                                     heat_summary, heat_warning)
from spark_cluster.box_facts import GpuHeat, HeatFact, parse_ceiling, parse_heat, throttle_reasons
from spark_cluster.checks import evaluate, note, warning
from spark_cluster.config import load_config
from spark_cluster.lifecycle import build_down_plan, build_restart_plan
from spark_cluster.plan import build_plan

from .conftest import ROOT, recording


def out(case: str) -> str:
    return recording(case)["stdout"]


SIM_CMDLINE = out("kernel-sim-node").splitlines()[1]
KERNEL_PART, INIT_PART = SIM_CMDLINE.split(" -- ", 1)  # after `--` the words are the init program's


@pytest.mark.parametrize("stdout, found", [
    (out("kernel-real-spark-6.17"), None),
    (out("kernel-sim-node"), None),
    (out("kernel-real-spark-7.0-1019"), "kernel 7.0.0-1019-nvidia, without kho=off"),
    # the fix as NVIDIA/NV-Kernels#591 gives it: the same release, only kho=off added to the command line
    (out("kernel-real-spark-7.0-1019") + f"{KERNEL_PART} kho=off -- {INIT_PART}\n", None),
    # kho= given twice: the kernel takes the last
    (out("kernel-real-spark-7.0-1019") + f"kho=off {KERNEL_PART} kho=on -- {INIT_PART}\n", "without kho=off"),
    # after `--` the words are init's, not the kernel's
    (out("kernel-real-spark-7.0-1019") + f"{KERNEL_PART} -- kho=off {INIT_PART}\n", "without kho=off"),
    ("7.0.0-31-generic\n" + SIM_CMDLINE + "\n", "the HWE kernel 7.0.0-31"),
    ("7.0.0-30-generic\n" + SIM_CMDLINE + "\n", None),  # the one #259 says works
    ("", None),
])
def test_a_known_bad_kernel_is_refused_without_its_fix(stdout, found):
    problem = evaluate(KernelKnown(), 0, stdout, "")
    if found is None:
        assert problem is None
    else:
        assert problem is not None and found in problem and "kho=off" in problem and "#" in problem  # the fix and a source


@pytest.mark.parametrize("case, found, said", [
    ("cma-real-spark-idle", None, "CmaTotal 128 MiB, CmaFree 68 MiB"),
    ("cma-real-spark-kho", "CmaFree (0.9 GiB) is larger than CmaTotal (0.0 GiB)", None),
    ("cma-sim-node", None, "not applicable: no CMA lines in /proc/meminfo"),
])
def test_cma_free_above_its_total_is_kho_and_refused(case, found, said):
    problem = evaluate(CmaSane(), 0, out(case), "")
    assert (problem is None) == (found is None)
    if found:
        assert found in problem and "kho=off" in problem
    else:
        assert note(CmaSane(), out(case)) == said


@pytest.mark.parametrize("values, found", [
    ({"spark-1": out("driver-real-spark-580.142"), "spark-2": out("driver-real-spark-580.142")}, None),
    ({"spark-1": out("driver-real-spark-580.142"), "spark-2": out("driver-real-gb10-580.126.09")},
     "(spark-1 580.142, spark-2 580.126.09)"),
    ({"spark-2": out("driver-real-spark-nvidia-smi"), "spark-1": out("driver-real-spark-580.142")},
     "(spark-1 580.142, spark-2 580.173.02)"),  # the head first
    ({"spark-1": out("driver-real-spark-580.142"), "spark-2": out("driver-sim-node")}, "spark-2 no NVIDIA driver"),
    ({"sim-1": out("driver-sim-node"), "sim-2": out("driver-sim-node")}, None),
])
def test_drivers_that_differ_between_nodes_are_named_both(values, found):
    problem = drivers_differ(values, "spark-1" if "spark-1" in values else "sim-1")
    if found is None:
        assert problem is None
    else:
        assert found in problem and "thread 362368" in problem


@pytest.mark.parametrize("case, said", [
    ("driver-real-spark-580.142", "580.142 (open kernel module)"),
    ("driver-real-spark-nvidia-smi", "580.173.02"),
    ("driver-sim-node", "not applicable: no GPU (no NVIDIA driver)"),
])
def test_the_driver_found_or_why_not(case, said):
    assert evaluate(DriverSame(), 0, out(case), "") is None
    assert note(DriverSame(), out(case)) == said


def test_heat_values_read_as_a_gb10_prints_them():
    # shared/data/real-sparks-outputs.md 3.5 (nvitop#208, a GB10 on 580.173.02): "[N/A], ..., 0 %, 11.17 W, 35"
    assert parse_heat("35, [N/A], [N/A], 11.17 W, [N/A], 0x0000000000000001\n").gpus == [
        GpuHeat(temperature_c=35, power_w=11.17, reasons=["idle"])]
    # a driver without the throttle reasons field: the five others
    assert parse_heat("35, [N/A], [N/A], 11.17 W, [N/A]\n").gpus == [GpuHeat(temperature_c=35, power_w=11.17)]
    assert parse_heat(out("heat-sim-node")).error == "no nvidia-smi"
    assert parse_heat("Field \"clocks.max.sm\" is not a valid field to query.\n").error.startswith("Field")


@pytest.mark.parametrize("mask, reasons", [  # nvml.h's nvmlClocksEventReason bits
    ("0x0000000000000000", []),
    ("0x0000000000000001", ["idle"]),
    ("0x0000000000000060", ["software thermal slowdown", "hardware thermal slowdown"]),
    ("0x0000000000000084", ["software power cap", "hardware power brake"]),
    ("[N/A]", []),
])
def test_throttle_reasons_by_bit(mask, reasons):
    assert throttle_reasons(mask) == reasons


@pytest.mark.parametrize("gpu, found", [
    (GpuHeat(temperature_c=35, power_w=11.17, reasons=["idle"]), None),  # the recorded idle GB10
    (GpuHeat(temperature_c=81), None),
    (GpuHeat(temperature_c=82), "GPU 0 at 82 °C"),  # where some makes throttle (dredyson.com)
    (GpuHeat(temperature_c=65, reasons=["hardware thermal slowdown"]), "held back now: hardware thermal slowdown"),
    (GpuHeat(reasons=["software power cap"]), None),  # a power cap doing its job is not heat
    (GpuHeat(power_limit_w=30), "power limit 30 W"),  # the GX10 defect (ai-muninn.com)
])
def test_heat_and_a_low_power_limit_are_warned_about(gpu, found):
    said = heat_warning(HeatFact(gpus=[gpu]))
    if found is None:
        assert said is None
    else:
        assert found in said and "gpu.max_clock_mhz" in said


@pytest.mark.parametrize("rdma, stdout, warned, said", [
    (True, "no GPU\n", None, "not applicable: no GPU"),
    (False, "mlx5dv_reg_dmabuf_mr no\n", None, "not applicable: no RDMA devices on the cluster link"),
    (True, "mlx5dv_reg_dmabuf_mr yes\n", None, "GPUDirect RDMA through DMA-BUF (the image's libmlx5 has mlx5dv_reg_dmabuf_mr)"),
    (True, "mlx5dv_reg_dmabuf_mr no\nnvidia_peermem loaded\n", None, "GPUDirect RDMA through nvidia_peermem"),
    (True, "mlx5dv_reg_dmabuf_mr no\n", "GDR 0", None),
    (True, "no libmlx5\n", "falls back to sockets", None),
    (True, "Traceback (most recent call last):\nOSError: boom\n", "cannot tell", None),
])
def test_gpudirect_rdma_off_is_a_warning(rdma, stdout, warned, said):
    check = GdrCapable(rdma=rdma)
    assert evaluate(check, 0, stdout, "") is None  # never refused
    w = warning(check, 0, stdout, "")
    assert (w is None) == (warned is None) and (warned is None or warned in w)
    if said:
        assert note(check, stdout) == said


GIB = 2**30


@pytest.mark.parametrize("free_gib, util, highest", [
    (102.2, 0.87, 0.83),  # MiaAI-Lab/GLM-5.3-Flash-EXL3-2x-DGX-Sparks#47: CUDA free caps at ~102 of 121.69 GiB, 0.87 never starts
    (110.34, 0.87, None),  # the same thread's counter-example: 110.34 free at start, 0.87 started
    (102.2, 0.83, None),
])
def test_a_utilization_above_what_cuda_can_allocate_is_refused_with_the_highest_that_starts(free_gib, util, highest):
    stdout = f"cuda {int(free_gib * GIB)} {int(121.69 * GIB)}\n"
    problem = evaluate(MemoryCeiling(gpu_memory_utilization=util), 0, stdout, "")
    if highest is None:
        assert problem is None
    else:
        assert f"The highest value that would start is {highest:.2f}" in problem and f"gpu_memory_utilization {util:g}" in problem
        assert evaluate(MemoryCeiling(gpu_memory_utilization=util), 0, stdout, "", cluster_running=True) is None  # its own engine holds it


def test_doctor_measuring_with_the_page_cache_up_drops_first_warns_instead_of_refusing():
    stdout = f"cuda {int(102.2 * GIB)} {int(121.69 * GIB)}\n"
    counted = MemoryCeiling(gpu_memory_utilization=0.87, page_cache_counted=True)
    assert evaluate(counted, 0, stdout, "") is None
    said = warning(counted, 0, stdout, "")
    assert "The highest value that would start is 0.83" in said and "`up` drops it first" in said
    assert warning(MemoryCeiling(gpu_memory_utilization=0.87), 0, stdout, "") is None  # up's own: a refusal, not a warning


def test_the_ceiling_without_a_gpu_is_the_cpu_builds_figure_and_a_failed_measure_a_warning():
    check = MemoryCeiling(gpu_memory_utilization=0.5)
    assert parse_ceiling(0, f"cpu {16 * GIB} {23 * GIB}\n").highest_utilization == 0.69
    assert note(check, f"cpu {16 * GIB} {23 * GIB}\n").startswith("no GPU: the CPU build's figure, 16.0 of 23.00 GiB")
    failed = "Traceback (most recent call last):\nModuleNotFoundError: No module named 'torch'\n"
    assert evaluate(check, 1, "", failed) is None
    assert "No module named 'torch'" in warning(check, 1, "", failed)
    assert evaluate(check, 125, "", "Unable to find image 'x' locally\nError: No such image: x\n") is None  # the image check says so
    assert warning(check, 125, "", "Error: No such image: x\n") is None


def test_every_box_check_says_something_on_a_node_without_a_gpu():
    """The simulated node's recorded answers: no check passes silently, none fails."""
    answers = {KernelKnown(): out("kernel-sim-node"), CmaSane(): out("cma-sim-node"), DriverSame(): out("driver-sim-node"),
               GpuHeatOk(): out("heat-sim-node"), GdrCapable(rdma=False): "no GPU\n",
               MemoryCeiling(gpu_memory_utilization=0.5): f"cpu {16 * GIB} {23 * GIB}\n"}
    for check, stdout in answers.items():
        assert evaluate(check, 0, stdout, "") is None and warning(check, 0, stdout, "") is None, check
        assert box_checks.note(check, 0, stdout), check


@pytest.mark.parametrize("case, exit_code, cap, found, said", [
    ("clock-lock-real-clamped", 0, 2100, None, "SM clock capped at 1860 MHz (the GPU's own maximum is lower)"),
    ("clock-lock-real-one-gpu", 0, 1740, None, "SM clock capped at 1740 MHz"),
    ("clock-lock-real-one-gpu", 0, 1500, "above gpu.max_clock_mhz 1500", None),
    ("clock-lock-sim-node", 0, 2100, None, "not applicable: no GPU (no nvidia-smi)"),
])
def test_the_clock_cap_is_read_back_from_the_drivers_own_answer(case, exit_code, cap, found, said):
    check = ClockCapped(max_clock_mhz=cap)
    problem = evaluate(check, exit_code, out(case), "")
    assert (problem is None) == (found is None) and (found is None or found in problem)
    if said:
        assert note(check, out(case)) == said


def test_a_refused_clock_cap_says_it_needs_root():
    problem = evaluate(ClockCapped(max_clock_mhz=2100), 4, "Insufficient Permissions\n", "")
    assert "could not be capped at 2100 MHz" in problem and "Insufficient Permissions" in problem and "root" in problem


def test_the_clock_cap_is_in_plan_undone_by_down_and_kept_across_a_restart():
    cfg = load_config(ROOT / "configs" / "dgx-spark-4node.yaml")
    plan = build_plan(cfg)
    assert [s.id for s in plan.steps_in("prepare") if "gpu-clock" in s.id] == [f"prepare/spark-{i}/gpu-clock" for i in range(1, 5)]
    assert "sudo -n nvidia-smi -lgc 0,2100" in plan.steps_in("prepare")[-1].command
    down = build_down_plan(cfg, plan)
    assert [s.id for s in down.steps_in("restore")] == [f"restore/spark-{i}/gpu-clock" for i in range(1, 5)]
    assert "nvidia-smi -rgc" in down.steps_in("restore")[0].command and down.steps[-1].phase == "unlock"
    assert not build_restart_plan(cfg, plan).full_kill.steps_in("restore")  # its `up` caps the clock again
    plain = load_config(ROOT / "configs" / "dgx-spark-2node.yaml")
    assert not [s for s in build_plan(plain).steps if "gpu-clock" in s.id] and not build_down_plan(plain, build_plan(plain)).steps_in("restore")


def test_status_shows_each_gpus_heat_clock_and_what_holds_it_back():
    fact = parse_heat("83, 1800 MHz, 3003 MHz, 44.70 W, [N/A], 0x0000000000000040\n")
    assert heat_summary(fact, 2100) == "83 °C, SM 1800 of 3003 MHz, capped at 2100 MHz, 44.7 W, held back: hardware thermal slowdown"
    assert heat_summary(parse_heat("35, [N/A], [N/A], 11.17 W, [N/A], 0x0000000000000001\n"), None) == "35 °C, 11.17 W"  # idle is not held back
    assert heat_summary(parse_heat(out("heat-sim-node")), 2100) is None
