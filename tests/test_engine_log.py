"""Where an engine start's time went, read from its log (spark_cluster.engine_log): a start recorded on
the simulated cluster, and lines written with vLLM's own format strings for what only GPUs print."""

from __future__ import annotations

from datetime import datetime, timezone
from spark_cluster.engine_log import engine_start

from .conftest import recorded_log

KEPT_HEAD = recorded_log("vllm-0.32-cpu-ray-start-in-kept-head")


def at(hh: int, mm: int, ss: float) -> datetime:
    return datetime(2026, 12, 6, hh, mm, int(ss), int(ss % 1 * 1e6), tzinfo=timezone.utc)


def test_a_recorded_start_on_the_simulated_cluster_is_cut_into_its_parts():
    """vLLM 0.32 on CPU over Ray, started again in a kept head container at 10:33:50: the EngineCore
    began at 10:34:03.87, the KV cache was sized at 10:34:16.28 (the ranks' import and join took
    most of it), the engine was up at 10:34:16.83, the API at 10:34:18.61."""
    start = engine_start(KEPT_HEAD, at(10, 33, 50))
    assert start.parts == {"import": 13.87, "load": 12.41, "warmup": 0.55, "api": 1.77}
    assert start.figures == {"weights": 0.01}  # enforce_eager: no compile, no graphs
    assert (start.kv_device, start.kv_tokens, start.kv_gib) == ("CPU", 2097152, None)


def test_only_the_last_start_in_the_window_counts():
    earlier = KEPT_HEAD.replace("10:3", "10:2").replace("2,097,152 tokens", "1,000 tokens")
    start = engine_start(earlier + KEPT_HEAD, at(10, 33, 50))
    assert start.parts["load"] == 12.41 and start.kv_tokens == 2097152


def test_a_log_without_an_engine_start_says_nothing():
    assert engine_start("2026-12-06T10:00:00.000000000Z Ray runtime started.\n", at(10, 0, 0)).parts == {}
    assert engine_start("", at(10, 0, 0)).kv_tokens is None


# lines as vLLM 0.33's format strings print them on a GPU (gpu_model_runner.py, gpu_worker.py,
# kv_cache_utils.py, core.py, compilation/monitor.py), behind docker's timestamps
GPU_START = """\
2026-12-06T10:00:20.100000000Z (EngineCore_DP0 pid=301) INFO 12-06 10:00:20 [core.py:93] Initializing a V1 LLM engine (v0.33.0) with config: model='/models/qwen'
2026-12-06T10:01:45.000000000Z (Worker_TP0 pid=402) INFO 12-06 10:01:45 [default_loader.py:507] Loading weights took 61.20 seconds
2026-12-06T10:01:46.000000000Z (Worker_TP0 pid=402) INFO 12-06 10:01:46 [gpu_model_runner.py:5089] Model loading took 31.52 GiB memory and 63.118215 seconds
2026-12-06T10:01:50.000000000Z (Worker_TP0 pid=402) INFO 12-06 10:01:50 [monitor.py:20] torch.compile took 41.27 s in total
2026-12-06T10:01:58.000000000Z (Worker_TP0 pid=402) INFO 12-06 10:01:58 [gpu_worker.py:773] Available KV cache memory: 58.9 GiB
2026-12-06T10:01:58.500000000Z (EngineCore_DP0 pid=301) INFO 12-06 10:01:58 [kv_cache_utils.py:1148] GPU KV cache size: 642,848 tokens, Maximum concurrency for 225,000 tokens per request: 2.86x
2026-12-06T10:02:10.000000000Z (Worker_TP1 pid=188) INFO 12-06 10:02:10 [gpu_model_runner.py:5089] Model loading took 31.52 GiB memory and 66.400000 seconds
2026-12-06T10:02:12.000000000Z (Worker_TP0 pid=402) INFO 12-06 10:02:12 [gpu_model_runner.py:6517] Graph capturing finished in 9 secs, took 0.61 GiB
2026-12-06T10:02:12.700000000Z (EngineCore_DP0 pid=301) INFO 12-06 10:02:12 [core.py:406] init engine (profile, create kv cache, warmup model) took 52.31 s (compilation: 41.27 s)
2026-12-06T10:02:15.000000000Z INFO:     Application startup complete.
"""


def test_on_a_gpu_the_engines_own_figures_name_the_weights_the_compile_and_the_graphs():
    start = engine_start(GPU_START, at(10, 0, 0))
    assert start.parts == {"import": 20.1, "load": 98.4, "warmup": 14.2, "api": 2.3}
    # the slowest rank's whole model load (not its weights alone), the init line's compile figure
    assert start.figures == {"weights": 66.4, "compile": 41.27, "graph-capture": 9.0}
    assert (start.kv_device, start.kv_tokens, start.kv_gib) == ("GPU", 642848, 58.9)


def test_an_engine_with_less_kv_cache_than_the_most_of_the_same_flags_is_told():
    from spark_cluster.engine_log import KvCapacity, kv_less

    most = KvCapacity(flags_hash="f1", device="GPU", tokens=642848, gib=58.9, at="2026-12-06T10:02:12+00:00")
    start = engine_start(GPU_START.replace("642,848 tokens", "610,000 tokens"), at(10, 0, 0))
    assert kv_less(most, "f1", start) == ("the engine got a KV cache of 610,000 tokens, 5.1 % less than the 642,848 an engine of the "
                                          "same flags got (2026-12-06T10:02:12+00:00): memory another process holds, or a colder start")
    assert kv_less(most, "f2", start) is None  # other flags: another capacity is expected
    assert kv_less(most, "f1", engine_start(GPU_START, at(10, 0, 0))) is None and kv_less(None, "f1", start) is None


def test_three_restarts_in_a_row_keep_the_kv_cache_the_first_start_got_and_a_running_engine_is_not_recreated_for_it(tmp_path):
    """GPU: the size vLLM reported ("Available KV cache memory") is passed to every later start of the
    same flags (--kv-cache-memory-bytes); the engine that runs without it is kept; the plan shows it."""
    import yaml

    from spark_cluster.config import parse_config
    from spark_cluster.engine_log import KV_PIN_FLAG
    from spark_cluster.executor import Executor
    from spark_cluster.kept import kv_capacity
    from spark_cluster.plan import build_plan

    from .conftest import SIM_CONFIGS
    from .fakes import FakeCluster, FakeEngineApi, fake_nodes, started

    data = yaml.safe_load(SIM_CONFIGS["ray"].read_text())
    data.update(state_dir=str(tmp_path), vllm={**data["vllm"], "check_flags": False}, health={"poll_interval_s": 0.01})
    cfg = parse_config(yaml.safe_dump(data))
    fake = FakeCluster(cfg)
    fake.script("docker logs --timestamps --since", (0, GPU_START, ""), node="sim-1")
    pinned = f"{KV_PIN_FLAG} {int(58.9 * 2**30)}"

    def up() -> list[str]:
        before = len(fake.log)
        Executor(cfg, fake_nodes(fake), http=FakeEngineApi(fake).client()).up()
        return [c for _, c in fake.log[before:] if c.startswith("docker exec") and "vllm serve" in c]

    [first] = up()
    assert KV_PIN_FLAG not in first and kv_capacity(cfg).gib == 58.9
    assert up() == [] and started(fake).count("sim-1:spark-ray-head/vllm") == 1  # the running engine is kept, not recreated for the size
    assert pinned in " ".join(build_plan(cfg, kv=kv_capacity(cfg)).vllm_argv)  # what `plan` shows
    for _ in range(3):  # vLLM alone gone: it starts again in its kept container, with the size
        fake.vllm_running = False
        [again] = up()
        assert pinned in again
    assert kv_capacity(cfg).gib == 58.9 and kv_capacity(cfg).flags_hash == build_plan(cfg).flags_hash

    for extra in (["--kv_cache_memory_bytes=1000"], ["--num-gpu-blocks-override", "40"]):  # the user's own size: nothing passed
        own = cfg.model_copy(update={"vllm": cfg.vllm.model_copy(update={"extra_args": extra})})
        assert build_plan(own, kv=kv_capacity(cfg).model_copy(update={"flags_hash": build_plan(own).flags_hash})).kv_pin_bytes is None
    off = cfg.model_copy(update={"vllm": cfg.vllm.model_copy(update={"keep_kv_cache": False})})
    assert build_plan(off, kv=kv_capacity(cfg)).kv_pin_bytes is None
    other = cfg.model_copy(update={"vllm": cfg.vllm.model_copy(update={"max_model_len": 1024})})
    assert build_plan(other, kv=kv_capacity(cfg)).kv_pin_bytes is None  # other flags: vLLM sizes it


def test_the_cpu_builds_kv_cache_is_never_pinned(tmp_path):
    from spark_cluster.engine_log import KvCapacity
    from spark_cluster.plan import build_plan

    from .conftest import SIM_CONFIGS

    from spark_cluster.config import load_config

    cfg = load_config(SIM_CONFIGS["native"])
    flags = build_plan(cfg).flags_hash
    assert build_plan(cfg, kv=KvCapacity(flags_hash=flags, device="CPU", tokens=2097152)).kv_pin_bytes is None
    gpu = build_plan(cfg, kv=KvCapacity(flags_hash=flags, device="GPU", tokens=642848, gib=58.9))
    assert gpu.kv_pin_bytes == int(58.9 * 2**30) and all(a[-2:] == ["--kv-cache-memory-bytes", str(gpu.kv_pin_bytes)] for a in gpu.vllm_argvs)
    assert gpu.flags_hash == flags and [c.labels for c in gpu.containers()] == [c.labels for c in build_plan(cfg).containers()]


def test_the_cpu_builds_compile_is_timed_by_its_ranks_and_a_start_that_finds_the_cache_compiles_in_a_quarter_of_the_time():
    """Recorded on the simulated cluster with configs/local-sim-compile.yaml: a cold start (TorchInductor
    compiling C++ kernels), then vLLM alone started again in its kept head container, finding the
    kernels in the node's cache folder (vLLM 0.32's CPU build fails to load its own AOT artefact,
    "'function' object has no attribute 'finalize_loading'", and compiles again from Inductor's cache)."""
    log = recorded_log("vllm-0.32-cpu-compile-cold-then-cached")
    lines = log.splitlines(keepends=True)
    second = next(i for i, line in enumerate(lines) if "Initializing a V1 LLM engine" in line and "pid=745" in line)
    cold = engine_start("".join(lines[:second]), at(16, 12, 30))
    cached = engine_start(log, at(16, 14, 20))
    assert cold.figures["compile"] == 41.0 and cached.figures["compile"] == 11.0  # first rank's start to last rank's end, vLLM's clock
    print(f"compile: cold {cold.figures['compile']} s, from the cache {cached.figures['compile']} s")
    assert cached.figures["compile"] <= 0.27 * cold.figures["compile"]
    assert cold.kv_tokens == cached.kv_tokens == 2097152


def test_the_cpu_compile_is_timed_from_ranks_lines_that_rays_forwarding_reordered_and_dropped():
    """Recorded with configs/local-sim-compile.yaml and VLLM_USE_AOT_COMPILE=0: Ray forwarded a rank's
    "Warming up done." before its start, and dropped one rank's end in each start; the ranks compile
    in step, so the first start seen and the last end seen still time it (vLLM's older cache path,
    the compiled graphs loaded directly: 4 s against 33 s)."""
    log = recorded_log("vllm-0.32-cpu-compile-no-aot-ray-lines-reordered")
    lines = log.splitlines(keepends=True)
    second = next(i for i, line in enumerate(lines) if "Initializing a V1 LLM engine" in line and "pid=786" in line)
    cold = engine_start("".join(lines[:second]), at(18, 22, 40))
    cached = engine_start(log, at(18, 24, 0))
    assert (cold.figures["compile"], cached.figures["compile"]) == (33.0, 4.0)
    assert engine_start(log.replace("Warming up done.", "Warming up."), at(18, 24, 0)).figures.get("compile") is None  # no end: no figure
