"""Secrets masked where they are written, and state_dir private: a known secret put in every place
cluster.yaml takes one (container.env, vllm.extra_args, container.extra_args) goes through `up`'s
events, a failover (events, the incident bundle with the containers' logs), `down`'s saved logs,
`status` and `plan`, on the fake transport; then no file under state_dir holds it, and every
folder there is 0700, every file 0600. (On the simulated cluster: tests/test_controller.py.)"""

from __future__ import annotations

import json
import stat
from concurrent.futures import Future

import pytest

from hypothesis import given
from hypothesis import strategies as st

from spark_cluster.config import secret_arguments
from spark_cluster.executor import Executor
from spark_cluster.observation import VLLMObs
from spark_cluster.plan import build_plan
from spark_cluster.status import status
from spark_cluster.watchdog import Watchdog

from .conftest import sim_variant
from .fakes import Clock, FakeCluster, FakeEngineApi, fake_nodes, periods


ENV_SECRET = "hf_envsecret0123456789"
FLAG_SECRET = "sk-flagsecret0123456789"
DOCKER_SECRET = "pw-dockersecret0123456789"
SECRETS = (ENV_SECRET, FLAG_SECRET, DOCKER_SECRET)


def secret_config(tmp_path, executor: str):
    return sim_variant(executor, **{"container.env": {"HF_TOKEN": ENV_SECRET}, "vllm.extra_args": ["--api-key", FLAG_SECRET],
                                    "container.extra_args": ["-e", f"MY_PASSWORD={DOCKER_SECRET}"],
                                    "state_dir": str(tmp_path / "state")})


def leaky(cluster: FakeCluster) -> None:
    """The nodes say the secrets back, as vLLM's log does (it prints its arguments) and `docker ps` may."""
    said = " ".join(SECRETS)
    cluster.script("docker logs ", (0, f"2026-12-03T00:00:00Z non-default args: api_key={FLAG_SECRET} env {said}\n", ""))
    cluster.script("docker ps -a; echo", (0, f"CONTAINER vllm serve --api-key {FLAG_SECRET} -e {DOCKER_SECRET} {ENV_SECRET}\n", ""))


@pytest.mark.parametrize("executor", ["ray", "native"])
def test_no_file_under_state_dir_holds_a_secret_and_none_is_readable_by_others(tmp_path, executor):
    cfg = secret_config(tmp_path, executor)
    assert set(SECRETS) <= set(cfg.secret_values())
    state = tmp_path / "state"

    cluster = FakeCluster(cfg)
    leaky(cluster)
    events: list[dict] = []
    Executor(cfg, fake_nodes(cluster), events.append, http=FakeEngineApi(cluster).client()).up()

    cluster.generation = 1
    engine = FakeEngineApi(cluster)
    clock = Clock()
    wd = Watchdog(cfg, fake_nodes(cluster), on_event=events.append, clock=clock, sleep=clock.sleep, http=engine.client())
    try:
        periods(wd, clock, 40)
        engine.wedge()
        periods(wd, clock, 20)
        assert any(e["event"] == "restart-done" for e in events)
        wd.event("note", said=f"a step failed: docker run -e HF_TOKEN={ENV_SECRET} --api-key {FLAG_SECRET}")
    finally:
        wd.close()
    Executor(cfg, fake_nodes(cluster)).down()

    seen = Future()
    seen.set_result(VLLMObs(endpoint=cfg.endpoint(), error=f"/health: ConnectError: refused (--api-key {FLAG_SECRET})"))
    report = status(cfg, fake_nodes(FakeCluster(cfg).serving()), vllm=seen).model_dump_json()
    shown_plan = build_plan(cfg).model_dump_json()

    files = [p for p in state.rglob("*") if p.is_file()]
    assert {"events.jsonl", "watchdog.json"} <= {p.name for p in files}
    assert any(p.suffix == ".log" and "incidents" in p.parts for p in files) and any("logs" in p.parts for p in files)
    for text, where in [(p.read_text(errors="replace"), str(p)) for p in files] + [
            (json.dumps(events), "the events as reported"), (report, "status"), (shown_plan, "plan")]:
        for secret in SECRETS:
            assert secret not in text, f"{where} holds {secret}"
    assert "********" in (next(p for p in files if p.suffix == ".log")).read_text()
    for p in [state, *state.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), f"{p} is {oct(mode)}"


@pytest.mark.parametrize("args, names, found", [
    (["--api-key", "sk-1"], set(), ["sk-1"]),
    (["--api-key=sk-2", "--hf-token", "hf-3"], set(), ["sk-2", "hf-3"]),
    (["--max-model-len", "4096", "--token-budget"], set(), []),  # a secret flag at the end: nothing after it
    (["-e", "HF_TOKEN=hf-4", "-e", "PLAIN=x", "--env", "MY_PASSWORD=pw-5", "--env=API_KEY=k-6"], set(), ["hf-4", "pw-5", "k-6"]),
    (["-e", "CUSTOM=c-7"], {"CUSTOM"}, ["c-7"]),
    (["--shm-size", "10.24g", "-e", "NCCL_DEBUG=INFO"], set(), []),
    (["--secret-file", "/run/s", "--client-secret=cs-8", "--password", "p-9"], set(), ["cs-8", "p-9"]),  # a path to a secret is none
    (["--api_key", "sk-10", "--hf_token=hf-11"], set(), ["sk-10", "hf-11"]),  # vLLM reads underscores as dashes
    (["--api-key", "k-12", "k-13", "--port", "8000"], set(), ["k-12", "k-13"]),  # vLLM takes several keys
])
def test_secret_arguments(args, names, found):
    assert secret_arguments(args, names) == found


def test_a_state_folder_is_made_private_but_a_shared_one_is_refused_and_left_as_it_is(tmp_path):
    from spark_cluster.errors import StateDirUnsafe
    from spark_cluster.state_dir import write_private

    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    mine.chmod(0o755)
    shared = tmp_path / "shared"  # as /tmp is: sticky, everyone's
    shared.mkdir()
    shared.chmod(0o1777)
    write_private(mine / "f.json", "{}")  # a state_dir made wider by an earlier version, or by hand
    write_private(mine / "a" / "b" / "f.json", "{}")
    with pytest.raises(StateDirUnsafe, match="writable by others"):  # nothing of ours in a folder others can write to
        write_private(shared / "g.json", "{}")
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert modes == {"mine": 0o700, "mine/f.json": 0o600, "mine/a": 0o700, "mine/a/b": 0o700, "mine/a/b/f.json": 0o600,
                     "shared": 0o1777}


SPELLINGS = {"api-key": ["--api-key", "--api_key"], "hf-token": ["--hf-token", "--hf_token"]}
BENIGN = [["--max-model-len", "4096"], ["--enable-prefix-caching"], ["--port=8000"], ["--served-model-name", "qwen"],
          ["--gpu_memory_utilization", "0.8"], ["--swap-space", "4"]]


@st.composite
def command_line(draw) -> tuple[list[str], dict[str, list[str]]]:
    """vllm.extra_args with the API key (one or two) and an HF token in every spelling vLLM's parser
    accepts (`--api-key X`, `--api_key=X`, ...), among other flags in any order."""
    parts = [list(p) for p in draw(st.lists(st.sampled_from(BENIGN), max_size=4))]
    secrets: dict[str, list[str]] = {}
    for flag, spellings in SPELLINGS.items():
        if not draw(st.booleans()):
            continue
        spelled = draw(st.sampled_from(spellings))
        values = [f"{flag}-{draw(st.text('abcdef0123', min_size=6, max_size=12))}" for _ in range(draw(st.integers(1, 2)) if flag == "api-key" else 1)]
        secrets[flag] = values
        parts.insert(draw(st.integers(0, len(parts))), [f"{spelled}={values[0]}"] if len(values) == 1 and draw(st.booleans())
                     else [spelled, *values])
    return [w for p in parts for w in p], secrets


@given(command_line())
def test_a_secret_flag_is_masked_and_the_engine_key_found_in_every_spelling(line):
    """The attack: `--api_key` and `--hf_token`, which vLLM accepts, were printed raw by `plan`, and
    `--api_key` was not taken for the engine's key (readiness then failed)."""
    args, secrets = line
    cfg = sim_variant("ray", **{"vllm.extra_args": args})
    shown = build_plan(cfg).model_dump_json()
    for value in (v for values in secrets.values() for v in values):
        assert value in secret_arguments(args, set()) and value not in shown, (args, value)
    assert cfg.engine_api_key() == (secrets["api-key"][0] if "api-key" in secrets else None)
