"""The engine's API key: found in the config, sent by every request the controller makes to vLLM's
/v1, and a refusal reported as the configuration error it is (never a hang)."""

from __future__ import annotations

import httpx
import pytest

from spark_cluster.errors import EngineKeyRefused

from .conftest import sim_variant


@pytest.mark.parametrize("changes, key", [
    ({}, None),
    ({"container.env": {"VLLM_API_KEY": "sk-env-0123"}}, "sk-env-0123"),
    ({"vllm.extra_args": ["--api-key", "sk-arg-4567"]}, "sk-arg-4567"),
    ({"vllm.extra_args": ["--api-key=sk-eq-89ab"]}, "sk-eq-89ab"),
    # the flag wins over the variable, as in vLLM (--api-key takes precedence over VLLM_API_KEY)
    ({"container.env": {"VLLM_API_KEY": "sk-env-0123"}, "vllm.extra_args": ["--api-key", "sk-arg-4567"]}, "sk-arg-4567"),
])
def test_the_engine_key_is_read_from_the_config_and_masked(changes, key):
    cfg = sim_variant(**changes)
    assert cfg.engine_api_key() == key
    assert cfg.engine_headers() == ({"Authorization": f"Bearer {key}"} if key else {})
    if key:
        assert key in cfg.secret_values()


def ready_step(path: str = "/v1/models"):
    from spark_cluster.plan import build_plan

    cfg = sim_variant(**{"container.env": {"VLLM_API_KEY": "sk-env-0123"}})
    return cfg, next(s for s in build_plan(cfg).steps_in("ready") if s.request.url.endswith(path))


def test_readiness_sends_the_key_and_a_refusal_ends_it_at_once_as_a_configuration_error():
    from spark_cluster.waits import Waits
    from spark_cluster.observe import Engine

    cfg, step = ready_step()
    seen = []

    def engine(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.headers.get("authorization") != "Bearer sk-env-0123":
            return httpx.Response(401, json={"error": "Unauthorized"})
        return httpx.Response(200, json={"data": [{"id": cfg.model.name}]})

    with httpx.Client(transport=httpx.MockTransport(engine), headers=cfg.engine_headers()) as http:
        assert Waits._ready_problem(Engine(cfg, http), step) is None
    with httpx.Client(transport=httpx.MockTransport(engine)) as http:
        with pytest.raises(EngineKeyRefused) as err:
            Waits._ready_problem(Engine(cfg, http), step)
    assert err.value.exit_code == 17 and "401" in str(err.value) and "GET /v1/models" in str(err.value)
    assert "sk-env" not in str(err.value)
    assert seen == ["Bearer sk-env-0123", None]


def test_status_says_a_refused_key_is_a_configuration_error():
    from spark_cluster.judge import verdict
    from spark_cluster.observation import NodeObs, Observation, RayObs, VLLMObs

    obs = Observation(ts="now", cluster="c", executor="ray", plan_hash="x",
                      nodes=[NodeObs(name="sim-1", role="head", reachable=True)], ray=RayObs(),
                      vllm=VLLMObs(endpoint="http://e", health=200, key_refused=401))
    word, reason = verdict(obs, served_model="tiny-qwen3", expected_nodes={})
    assert word == "degraded" and "answers 401 to /v1/models" in reason and "VLLM_API_KEY" in reason
