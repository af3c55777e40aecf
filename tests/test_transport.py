"""How the controller decides where and as whom to connect: ~/.ssh/config, then cluster.yaml."""

from __future__ import annotations

from spark_cluster.config import SSHSettings, parse_config
from spark_cluster.transport import resolve_endpoint

from .conftest import SIM_CONFIG


def test_ssh_config_alias_is_honoured(tmp_path):
    conf = tmp_path / "ssh_config"
    conf.write_text("Host spark-a\n  HostName 192.0.2.10\n  User sparkuser\n  Port 2200\n  IdentityFile ~/.ssh/spark_key\n")
    cfg = parse_config(SIM_CONFIG.read_text().replace("host: 10.99.0.11", "host: spark-a"))
    node = cfg.nodes[0]
    s = SSHSettings(config_file=str(conf), known_hosts="/kh")
    ep = resolve_endpoint(node, s)
    assert (ep.hostname, ep.user, ep.port) == ("192.0.2.10", "sparkuser", 2200)
    assert ep.key_files[0].endswith("/.ssh/spark_key") and not ep.key_files[0].startswith("~")
    # cluster.yaml wins where it says something
    ep = resolve_endpoint(node, SSHSettings(config_file=str(conf), user="root", port=22, key="/k"))
    assert (ep.user, ep.port, ep.key_files) == ("root", 22, ["/k"])


def test_defaults_without_ssh_config(tmp_path):
    cfg = parse_config(SIM_CONFIG.read_text())
    ep = resolve_endpoint(cfg.nodes[1], SSHSettings(config_file=str(tmp_path / "none")))
    assert (ep.hostname, ep.port, ep.connect_timeout_s) == ("10.99.0.12", 22, 10.0)
    assert ep.trust_on_first_use is False


def test_nodes_map_hands_back_errors_but_never_swallows_ctrl_c():
    import pytest

    from spark_cluster.errors import TransportError

    from .fakes import FakeCluster, fake_nodes

    nodes = fake_nodes(FakeCluster(parse_config(SIM_CONFIG.read_text())))

    def fail(t):
        if t.node == "sim-2":
            raise TransportError("sim-2: unreachable")
        return t.node

    got = nodes.map(fail)
    assert got.succeeded == {"sim-1": "sim-1"} and isinstance(got.failed["sim-2"], TransportError)
    with pytest.raises(TransportError, match="sim-2: unreachable"):
        got.values_or_raise()

    def bug(t):
        if t.node == "sim-2":
            raise KeyError("MemTotal")
        return t.node

    with pytest.raises(KeyError):  # a bug is not a node's doing: raised, not handed back
        nodes.map(bug)

    def interrupted(t):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        nodes.map(interrupted)
