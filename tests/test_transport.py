"""How the controller decides where and as whom to connect: ~/.ssh/config, then cluster.yaml."""

from __future__ import annotations

import os

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


class ScriptedChannel:
    """A paramiko channel as OpenSSH drives one: the exit status can come before the last of the output
    (RFC 4254), then EOF. `after_status`: the polls between the status and the tail's arrival; eof: whether
    EOF ever comes (a background child holding the output open: never)."""

    def __init__(self, head: bytes, tail: bytes, after_status: int, eof: bool = True):
        self.chunks, self.tail, self.polls, self.eof = [head], tail, after_status, eof
        self.eof_received, self.closed = 0, False
        self.read, self.write = os.pipe()  # what select() waits on: never ready

    def exec_command(self, command):
        pass

    def shutdown_write(self):
        pass

    def exit_status_ready(self):
        self.polls -= 1
        if self.polls == 0:
            self.chunks.append(self.tail)
        if self.polls < 0 and self.eof and not self.chunks:
            self.eof_received = 1
        return True

    def recv_ready(self):
        return bool(self.chunks)

    def recv(self, n):
        return self.chunks.pop(0)

    def recv_stderr_ready(self):
        return False

    def recv_exit_status(self):
        return 0

    def fileno(self):
        return self.read

    def close(self):
        os.close(self.read)
        os.close(self.write)


def scripted_run(chan: ScriptedChannel):
    from types import SimpleNamespace

    from spark_cluster.transport import SSHTransport

    t = SSHTransport(resolve_endpoint(parse_config(SIM_CONFIG.read_text()).nodes[0], SSHSettings()))
    t.connect = lambda: SimpleNamespace(get_transport=lambda: SimpleNamespace(open_session=lambda timeout: chan))
    return t.run("sysctl -n vm.swappiness && cat /etc/sysctl.d/90-spark-cluster.conf", timeout=30)


def test_output_that_comes_after_the_exit_status_is_kept():
    r = scripted_run(ScriptedChannel(b"1\n", b"vm.swappiness = 1\n", after_status=3))
    assert (r.exit_code, r.stdout) == (0, "1\nvm.swappiness = 1\n")


def test_a_command_whose_output_stays_open_ends_soon_after_its_exit_status():
    import time

    from spark_cluster import timeouts

    t0 = time.monotonic()
    r = scripted_run(ScriptedChannel(b"started\n", b"", after_status=1, eof=False))
    assert r.stdout == "started\n" and time.monotonic() - t0 < timeouts.OUTPUT_AFTER_EXIT_S + 5
