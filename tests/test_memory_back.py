"""The rule for memory back before an engine starts (spark_cluster.memory_back), on recorded figures."""

from __future__ import annotations

import pytest

from spark_cluster.memory_back import MemoryReading, parse_memory, shortfall, slack_gib

from .conftest import recording

SPARK = 121.69  # a DGX Spark's MemTotal in GiB (127600816 kB)


def reading(available: float, gpu: float | None = None, total: float = SPARK) -> MemoryReading:
    return MemoryReading(available_gib=available, total_gib=total, gpu_free_gib=gpu, at="2026-12-06T10:00:00+00:00")


def test_a_spark_read_after_a_stop_is_its_memory_with_no_gpu_memory_of_its_own():
    got = parse_memory(recording("memory-real-spark-after-stop")["stdout"])
    assert (got.available_gib, got.total_gib, got.gpu_free_gib) == (38.31, 121.69, None) and got.at
    discrete = parse_memory("MemTotal: 1048576 kB\nMemAvailable: 524288 kB\n@@gpu\nNVIDIA H100 80GB HBM3, 1024 MiB, 81559 MiB\n")
    assert (discrete.available_gib, discrete.gpu_free_gib) == (0.5, 78.65)
    assert parse_memory("grep: /proc/meminfo: Permission denied\n@@gpu\nno nvidia-smi\n") is None


@pytest.mark.parametrize("total, setting, want", [
    (SPARK, None, 6.08),  # 5 % of a Spark
    (23.4, None, 2.0),    # this machine: at least 2 GiB
    (SPARK, 1.5, 1.5),    # memory.back_slack_gib as given
    (SPARK, 0.0, 0.0),
])
def test_the_slack_is_a_share_of_the_node_with_a_floor_unless_given(total, setting, want):
    assert slack_gib(total, setting) == want


@pytest.mark.parametrize("baseline, now, short", [
    (None, reading(10.0), None),                    # no start before: nothing to compare with
    (reading(110.0), reading(105.0), None),         # within the slack
    (reading(110.0), reading(115.0), None),         # more than before
    # a killed run's ~33 GB held in the driver (al-engr.com): short
    (reading(110.0), reading(77.0), "77.0 GiB available, 110.0 GiB before the last engine start (2026-12-06T10:00:00+00:00), "
                                    "6.08 GiB allowed below it"),
    (reading(110.0, gpu=78.0), reading(109.0, gpu=40.0), "GPU 40.0 GiB free, 78.0 GiB before the last engine start "
                                                          "(2026-12-06T10:00:00+00:00), 6.08 GiB allowed below it"),
    (reading(110.0, gpu=78.0), reading(109.0, gpu=None), None),  # a GPU figure not read now compares nothing
])
def test_memory_is_back_within_the_slack_of_what_the_node_had_before_the_last_start(baseline, now, short):
    assert shortfall(baseline, now, slack_gib(SPARK, None)) == short
