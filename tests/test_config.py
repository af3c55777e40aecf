"""cluster.yaml validation: each bad input gets one clear message naming file, key path and value."""

from __future__ import annotations

import pytest
import yaml

from spark_cluster.config import ClusterConfig, load_config, parse_config
from spark_cluster.errors import ConfigError

from .conftest import CONFIGS, EXAMPLE_CONFIGS


def edit(card_yaml: str, fn) -> str:
    data = yaml.safe_load(card_yaml)
    fn(data)
    return yaml.safe_dump(data, sort_keys=False)


def problems(text: str, source: str = "cluster.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source=source)
    assert info.value.exit_code == 2
    return str(info.value)


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    """Each shipped config loads, plans a start step on every node (workers before the head), and
    survives a round trip through its own JSON (what `validate --json` prints) unchanged."""
    from spark_cluster.plan import build_plan

    cfg = load_config(path)
    for _, group in cfg.group_configs():
        started = [s.node for s in build_plan(group).steps if s.kind == "start"]
        assert set(started) == {n.name for n in group.nodes} and started[-1] == group.head.name
    assert ClusterConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_card_config_values(card_yaml):
    cfg = parse_config(card_yaml)
    assert cfg.tensor_parallel_size == 2
    assert cfg.gpu_memory_utilization()[0] == 0.5
    assert cfg.ray.port == 6399
    assert cfg.container.shm_size == "10.24g"
    assert cfg.sysctl == {"vm.swappiness": 1}


def test_memory_cap_refused_with_reason(card_yaml):
    text = edit(card_yaml, lambda d: d["vllm"].update(gpu_memory_utilization=0.9))
    msg = problems(text)
    assert "vllm.gpu_memory_utilization = 0.9: above the 0.85 cap" in msg and "freezes" in msg


def test_memory_cap_override_must_be_spelled_out(card_yaml):
    def f(d):
        d["vllm"]["gpu_memory_utilization"] = 0.9
        d["memory"]["override_cap"] = True

    cfg = parse_config(edit(card_yaml, f))
    value, source = cfg.gpu_memory_utilization()
    assert value == 0.9 and "override_cap" in source


def test_memory_cap_not_applied_without_unified_memory(card_yaml):
    def f(d):
        d["vllm"]["gpu_memory_utilization"] = 0.9
        d["memory"]["unified"] = False

    assert parse_config(edit(card_yaml, f)).gpu_memory_utilization()[0] == 0.9


@pytest.mark.parametrize(
    "nodes,expected",
    [
        (1, (0.75, "one node")),
        (2, (0.5, "0.50")),
    ],
)
def test_memory_default_derived_and_explained(card_yaml, nodes, expected):
    def f(d):
        d["vllm"].pop("gpu_memory_utilization")
        d["vllm"].pop("tensor_parallel_size")
        d["nodes"] = d["nodes"][:nodes]

    value, source = parse_config(edit(card_yaml, f)).gpu_memory_utilization()
    assert value == expected[0] and expected[1] in source


def test_tp_times_pp_must_match_gpus(card_yaml):
    msg = problems(edit(card_yaml, lambda d: d["vllm"].update(tensor_parallel_size=4)))
    assert "tensor_parallel_size 4" in msg and "2 GPU" in msg


def test_pp_counts(card_yaml):
    def f(d):
        d["vllm"]["tensor_parallel_size"] = 1
        d["vllm"]["pipeline_parallel_size"] = 2

    assert parse_config(edit(card_yaml, f)).vllm.pipeline_parallel_size == 2


def test_no_head(card_yaml):
    msg = problems(edit(card_yaml, lambda d: d["nodes"][0].update(role="worker")))
    assert "no node has role head" in msg


def test_two_heads(card_yaml):
    msg = problems(edit(card_yaml, lambda d: d["nodes"][1].update(role="head")))
    assert "2 nodes have role head (spark-1, spark-2)" in msg


@pytest.mark.parametrize("field,value", [("name", "spark-1"), ("address", "192.168.100.10"), ("host", "spark-1.local")])
def test_duplicates(card_yaml, field, value):
    msg = problems(edit(card_yaml, lambda d: d["nodes"][1].update({field: value})))
    assert f"same {field} {value!r}" in msg


def test_missing_model_path(card_yaml):
    msg = problems(edit(card_yaml, lambda d: d["model"].pop("path")))
    assert "model.path: required, but missing" in msg


def test_relative_model_path(card_yaml):
    msg = problems(edit(card_yaml, lambda d: d["model"].update(path="models/x")))
    assert "model.path = 'models/x'" in msg and "absolute" in msg


@pytest.mark.parametrize("bad", ["10.24gb", "lots", "-1g", "10,5g"])
def test_malformed_sizes(card_yaml, bad):
    msg = problems(edit(card_yaml, lambda d: d["container"].update(shm_size=bad)))
    assert f"container.shm_size = {bad!r}" in msg and "is not a size" in msg


def test_malformed_object_store_size(card_yaml):
    msg = problems(edit(card_yaml, lambda d: d["ray"].update(object_store_memory="2 gigs")))
    assert "ray.object_store_memory" in msg


def test_unknown_key_did_you_mean(card_yaml):
    text = card_yaml.replace("  max_model_len: 225000", "  max_model_length: 225000")
    msg = problems(text, source="configs/x.yaml")
    assert "vllm.max_model_length: unknown key (did you mean 'max_model_len'?)" in msg
    line = text.splitlines().index("  max_model_length: 225000") + 1
    assert f"configs/x.yaml:{line}:" in msg


def test_unknown_key_in_list_item(card_yaml):
    msg = problems(edit(card_yaml, lambda d: d["nodes"][1].update(adress="1.2.3.4")))
    assert "nodes[1].adress: unknown key (did you mean 'address'?)" in msg


def test_unknown_top_level_key_lists_known_keys(card_yaml):
    msg = problems(card_yaml + "\nzzz: 1\n")
    assert "zzz: unknown key (known keys:" in msg


def test_auto_tool_choice_needs_parser(card_yaml):
    msg = problems(edit(card_yaml, lambda d: d["vllm"].pop("tool_call_parser")))
    assert "enable_auto_tool_choice needs tool_call_parser" in msg


def test_address_must_be_ip(card_yaml):
    msg = problems(edit(card_yaml, lambda d: d["nodes"][1].update(address="spark-2")))
    assert "nodes[1].address = 'spark-2'" in msg and "not an IP address" in msg


def test_every_problem_reported_once(card_yaml):
    def f(d):
        d["container"]["shm_size"] = "x"
        d["nodes"][0]["name"] = "Bad Name"

    msg = problems(edit(card_yaml, f))
    assert msg.count("container.shm_size") == 1 and "nodes[0].name" in msg


def test_not_yaml():
    assert "not valid YAML" in problems("nodes: [\n")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_is_described():
    schema = ClusterConfig.model_json_schema()
    missing = []
    for name, model in [("ClusterConfig", schema)] + list(schema["$defs"].items()):
        for field, prop in model.get("properties", {}).items():
            if "description" not in prop:
                missing.append(f"{name}.{field}")
    assert missing == [] or set(missing) <= {"Mount.source", "Mount.target", "Mount.read_only", "HttpRequest.method"}, missing


def test_per_node_overrides(card_yaml):
    def f(d):
        d["nccl"]["ib_hca"] = "roceP2p1s0f0"
        d["nodes"][1]["nccl"] = {"socket_ifname": "enp1s0f1np1", "extra": {"NCCL_IB_TIMEOUT": "22"}}
        d["nodes"][1]["ssh"] = {"port": 2222}

    cfg = parse_config(edit(card_yaml, f))
    w = cfg.nodes[1]
    assert cfg.node_nccl(w).env()["NCCL_SOCKET_IFNAME"] == "enp1s0f1np1"
    assert cfg.node_nccl(w).env()["NCCL_IB_HCA"] == "roceP2p1s0f0"
    assert cfg.node_nccl(w).env()["NCCL_IB_TIMEOUT"] == "22"
    assert cfg.node_ssh(w).port == 2222 and cfg.node_ssh(w).user == "spark"
    assert cfg.node_ssh(cfg.nodes[0]).port is None  # from ~/.ssh/config, else 22, at connect time


@pytest.mark.parametrize("where", ["nccl.socket_ifname", "nccl.ib_hca", "container.image", "vllm.dtype", "model.served_name"])
def test_nul_byte_refused_in_any_string(card_yaml, where):
    section, key = where.split(".")
    msg = problems(edit(card_yaml, lambda d: d.setdefault(section, {}).update({key: "a\x00b"})))
    assert where in msg and "NUL" in msg


@pytest.mark.parametrize("gateway, controller, clash", [
    ({"port": 8081}, {}, True),  # the gateway on every address, the controller on 127.0.0.1, one port
    ({"host": "127.0.0.1", "port": 9000}, {"host": "127.0.0.1", "port": 9000}, True),
    ({"host": "10.0.0.1", "port": 9000}, {"host": "0.0.0.0", "port": 9000}, True),
    ({"host": "10.0.0.1", "port": 9000}, {"host": "127.0.0.1", "port": 9000}, False),  # two addresses: both can listen
    ({}, {}, False),
])
def test_the_gateway_and_the_control_plane_need_two_listening_places(card_yaml, gateway, controller, clash):
    text = edit(card_yaml, lambda d: d.update(gateway=gateway, controller=controller))
    if clash:
        assert "give the controller another port" in problems(text)
    else:
        cfg = parse_config(text)
        assert cfg.controller_url().startswith("http://") and cfg.gateway_url() != cfg.controller_url()


# ---- groups ---------------------------------------------------------------------------------------
TWO_GROUPS = CONFIGS / "local-sim-2groups.yaml"


def test_two_groups_are_two_clusters_of_their_own():
    cfg = load_config(TWO_GROUPS)
    (a, ga), (b, gb) = cfg.group_configs()
    assert (a, ga.name, [n.name for n in ga.nodes], ga.head.name) == ("a", "spark-a", ["sim-1", "sim-2"], "sim-1")
    assert (b, gb.name, [n.name for n in gb.nodes], gb.head.name) == ("b", "spark-b", ["sim-3", "sim-4"], "sim-3")
    assert gb.endpoint() == "http://10.99.0.13:8000" and ga.tensor_parallel_size == gb.tensor_parallel_size == 2
    assert gb.resolved_state_dir() == cfg.resolved_state_dir() / "b" and not gb.groups
    with pytest.raises(RuntimeError, match="one head per group"):
        cfg.head  # noqa: B018 (a question only a group can answer)
    assert load_config(CONFIGS / "local-sim.yaml").group_configs()[0][0] == "spark"  # no groups: the cluster itself


def groups(*members, **edits):
    def f(d):
        d["groups"] = [{"name": n, "nodes": list(m)} for n, m in zip("abc", members)]
        for key, value in edits.items():
            d[key] = value
    return edit(TWO_GROUPS.read_text(), f)


@pytest.mark.parametrize("text, said", [
    (groups(["sim-1", "sim-2"], ["sim-2", "sim-3", "sim-4"]), "groups[1].nodes[0] = 'sim-2': sim-2 is in group a already"),
    (groups(["sim-1", "sim-2"], ["sim-3", "sim-5"]), "groups[1].nodes[1] = 'sim-5': no node is named 'sim-5'"),
    (groups(["sim-1", "sim-2"], ["sim-3"]), "nodes[3].name = 'sim-4': in no group"),
    (groups(["sim-1", "sim-3"], ["sim-2", "sim-4"]), "2 nodes of group a have role head (sim-1, sim-3)"),
    (groups(["sim-1", "sim-2"], ["sim-3", "sim-4"], ["sim-5"]), "no node is named 'sim-5'"),
    (edit(TWO_GROUPS.read_text(), lambda d: d["groups"][1].update(name="a")), "two groups are named 'a'"),
    (edit(TWO_GROUPS.read_text(), lambda d: d["vllm"].update(endpoint="http://127.0.0.1:8000")), "vllm.endpoint"),
])
def test_groups_that_cannot_be_served(text, said):
    assert said in problems(text)


def test_every_group_holds_the_whole_parallel_layout():
    text = edit(TWO_GROUPS.read_text(), lambda d: d["groups"].__setitem__(slice(None), [
        {"name": "a", "nodes": ["sim-1", "sim-2", "sim-4"]}, {"name": "b", "nodes": ["sim-3"]}]))
    msg = problems(text)
    assert "but group a's nodes have 3 GPU(s)" in msg and "but group b's nodes have 1 GPU(s)" in msg
