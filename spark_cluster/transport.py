"""The one way spark-cluster reaches a node: SSH (paramiko), host keys verified.

Small on purpose: run a command with a deadline -> Result; put a file; close. One connection
per node, reused. Transport failures (unreachable, authentication, host key) raise
TransportError; a command that ran and failed is a Result with a non-zero exit code, and
`Result.check()` turns it into CommandFailed.
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Optional, Protocol, TypeVar

import paramiko

from . import timeouts
from .config import ClusterConfig
from .settings import Node, SSHSettings
from .errors import CommandFailed, CommandTimeout, HostKeyError, SparkClusterError, TransportError  # noqa: F401 - re-exported
from .render import quote

T = TypeVar("T")
# paramiko logs (with a traceback) what it also raises, which we turn into one clear message:
# a handler of its own keeps that off the user's terminal
logging.getLogger("paramiko").addHandler(logging.NullHandler())











@dataclass
class Result:
    node: str
    command: str
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def tail(self, lines: int = 15) -> str:
        text = (self.stderr.strip() or self.stdout.strip())
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def check(self, what: str | None = None) -> "Result":
        if not self.ok:
            raise CommandFailed(self, what)
        return self


@dataclass
class Endpoint:
    """Where and how to connect, after ~/.ssh/config is applied."""

    node: str
    hostname: str
    port: int
    user: str
    key_files: list[str] = field(default_factory=list)
    known_hosts: str = "~/.ssh/known_hosts"
    trust_on_first_use: bool = False
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 120.0


def resolve_endpoint(node: Node, s: SSHSettings) -> Endpoint:
    """Apply ~/.ssh/config (Host aliases, HostName, User, Port, IdentityFile), then cluster.yaml wins."""
    cfg_path = Path(os.path.expanduser(s.config_file or "~/.ssh/config"))
    host_cfg: dict = {}
    if cfg_path.is_file():
        ssh_config = paramiko.SSHConfig.from_path(str(cfg_path))
        host_cfg = ssh_config.lookup(node.host)
    keys = [s.key] if s.key else list(host_cfg.get("identityfile", []))
    return Endpoint(
        node=node.name,
        hostname=host_cfg.get("hostname", node.host),
        port=int(s.port or host_cfg.get("port") or 22),
        user=s.user or host_cfg.get("user") or getpass.getuser(),
        key_files=[os.path.expanduser(k) for k in keys],
        known_hosts=os.path.expanduser(s.known_hosts or host_cfg.get("userknownhostsfile", "~/.ssh/known_hosts").split()[0]),
        trust_on_first_use=bool(s.trust_on_first_use),
        connect_timeout_s=float(s.connect_timeout_s or 10),
        command_timeout_s=float(s.command_timeout_s or 120),
    )


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    def __init__(self, path: str):
        self.path = path

    def missing_host_key(self, client, hostname, key):  # noqa: D401 - paramiko API
        client.get_host_keys().add(hostname, key.get_name(), key)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


class Transport(Protocol):
    """What the executor, status and the watchdog need of a node's connection: SSHTransport here,
    tests/fakes.py's FakeTransport in the unit tests."""

    @property
    def node(self) -> str: ...

    def connect(self) -> Any: ...

    def run(self, command: str, *, timeout: float | None = None, input: bytes | None = None,
            on_output: Callable[[str], None] | None = None) -> Result: ...

    def stream_to(self, command: str, target: Any, target_command: str, *, timeout: float) -> tuple[Result, Result]: ...

    def close(self) -> None: ...


class Ended:
    """Whether a command's output is whole: its exit status is in, nothing is left to read, and the
    channel had its EOF, or timeouts.OUTPUT_AFTER_EXIT_S passed since the status came without one. Ending
    at the status alone lost the tail of an output (a read-back seen empty: "the value did not stick")."""

    def __init__(self, chan: Any) -> None:
        self.chan = chan
        self.exited: Optional[float] = None

    def __call__(self) -> bool:
        c = self.chan
        if not c.exit_status_ready() or c.recv_ready() or c.recv_stderr_ready():
            return False
        if c.eof_received or c.closed:
            return True
        self.exited = self.exited or time.monotonic()
        return time.monotonic() - self.exited > timeouts.OUTPUT_AFTER_EXIT_S


class SSHTransport:
    """One node's SSH connection, opened on first use and reused; thread-safe."""

    def __init__(self, endpoint: Endpoint):
        self.ep = endpoint
        self._client: Optional[paramiko.SSHClient] = None
        self._lock = threading.Lock()

    @property
    def node(self) -> str:
        return self.ep.node

    def _host_id(self) -> str:
        return self.ep.hostname if self.ep.port == 22 else f"[{self.ep.hostname}]:{self.ep.port}"

    def _client_checking_host_keys(self) -> paramiko.SSHClient:
        """A client that knows the node's known_hosts and refuses an unknown key (or, with
        trust_on_first_use, records it)."""
        ep = self.ep
        client = paramiko.SSHClient()
        if os.path.exists(ep.known_hosts):
            client.get_host_keys().load(ep.known_hosts)
        elif not ep.trust_on_first_use:
            raise HostKeyError(
                f"{ep.node}: known_hosts file {ep.known_hosts} does not exist, so the host key of {self._host_id()} cannot be verified",
                hint="add the node's key (ssh-keyscan, checked by hand) or set ssh.trust_on_first_use: true once",
            )
        client.set_missing_host_key_policy(
            _TrustOnFirstUse(ep.known_hosts) if ep.trust_on_first_use else paramiko.RejectPolicy()
        )
        return client

    def connect(self) -> paramiko.SSHClient:
        with self._lock:
            if self._client is not None and self._client.get_transport() is not None and self._client.get_transport().is_active():
                return self._client
            ep = self.ep
            client = self._client_checking_host_keys()
            t_connect = time.monotonic()
            try:
                client.connect(
                    ep.hostname,
                    port=ep.port,
                    username=ep.user,
                    key_filename=ep.key_files or None,
                    timeout=ep.connect_timeout_s,
                    banner_timeout=ep.connect_timeout_s,
                    auth_timeout=ep.connect_timeout_s,
                    channel_timeout=ep.connect_timeout_s,
                    allow_agent=not ep.key_files,
                    look_for_keys=not ep.key_files,
                )
            except paramiko.BadHostKeyException as exc:
                raise HostKeyError(
                    f"{ep.node}: the SSH host key of {self._host_id()} CHANGED (got {exc.key.get_name()} "
                    f"{exc.key.get_fingerprint().hex()}, {ep.known_hosts} has another). Refusing to connect.",
                    hint="if the node was reinstalled, remove its old line from known_hosts after checking the new key",
                ) from None
            except paramiko.SSHException as exc:
                if "not found in known_hosts" in str(exc):
                    raise HostKeyError(
                        f"{ep.node}: the SSH host key of {self._host_id()} is not in {ep.known_hosts}. Refusing to connect.",
                        hint="add it after checking it (ssh-keyscan), or set ssh.trust_on_first_use: true once",
                    ) from None
                if "protocol banner" in str(exc) or time.monotonic() - t_connect >= ep.connect_timeout_s * 0.9:
                    raise TransportError(f"{ep.node}: {self._host_id()} did not answer within {ep.connect_timeout_s:g}s "
                                         "(it accepts connections but its SSH server says nothing: hung or overloaded?)") from None
                if isinstance(exc, paramiko.AuthenticationException):
                    raise TransportError(f"{ep.node}: SSH authentication as {ep.user}@{self._host_id()} failed ({exc})") from None
                raise TransportError(f"{ep.node}: SSH to {self._host_id()} failed: {exc}") from None
            except (socket.timeout, TimeoutError):
                raise TransportError(f"{ep.node}: {self._host_id()} did not answer within {ep.connect_timeout_s:g}s (unreachable?)") from None
            except OSError as exc:
                raise TransportError(f"{ep.node}: cannot reach {self._host_id()}: {exc.strerror or exc}") from None
            transport = client.get_transport()
            if transport is not None:
                transport.set_keepalive(15)
                try:  # small request/reply exchanges: without this each channel open waits ~40 ms (Nagle + delayed ACK)
                    transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except (AttributeError, OSError):
                    pass  # not a TCP socket (ProxyCommand)
            self._client = client
            return client

    def run(self, command: str, *, timeout: float | None = None, input: bytes | None = None,
            on_output: Callable[[str], None] | None = None) -> Result:
        """Run `command` through the node's shell; at most `timeout` seconds. The node ends it then
        too (coreutils `timeout`, whose whole process group is signalled), so nothing lingers there;
        CommandTimeout keeps what it printed until then."""
        limit = self.ep.command_timeout_s if timeout is None else timeout
        client = self.connect()
        t0 = time.monotonic()
        remote = f"timeout -k {timeouts.REMOTE_KILL_AFTER_S} {math.ceil(limit)} sh -c {quote(command)}"
        out, err = bytearray(), bytearray()

        def partial(code: int = -1) -> Result:
            return Result(self.node, command, code, out.decode(errors="replace"), err.decode(errors="replace"), time.monotonic() - t0)

        def timed_out() -> CommandTimeout:
            return CommandTimeout(f"{self.node}: command did not finish within {limit:g}s: {_short(command)}", partial())

        try:
            chan = client.get_transport().open_session(timeout=self.ep.connect_timeout_s)
            chan.exec_command(remote)
            ended = Ended(chan)
            if input is not None:
                chan.sendall(input)
            chan.shutdown_write()
            # the node's own limit ends the command first; this one only if the node stops answering
            deadline = t0 + limit + timeouts.REMOTE_KILL_AFTER_S + timeouts.LOCAL_GRACE_S
            while True:
                progressed = False
                while chan.recv_ready():
                    chunk = chan.recv(65536)
                    out += chunk
                    if on_output:
                        on_output(chunk.decode(errors="replace"))
                    progressed = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    progressed = True
                if ended():
                    break
                if time.monotonic() > deadline:
                    chan.close()
                    raise timed_out()
                if not progressed:
                    select.select([chan], [], [], 0.05)
            code = chan.recv_exit_status()
            chan.close()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self.close()
            raise TransportError(f"{self.node}: SSH connection lost while running {_short(command)}: {exc}") from None
        if code in (124, 137) and time.monotonic() - t0 >= limit - 0.5:
            raise timed_out()
        return partial(code)

    def stream_to(self, command: str, target: "SSHTransport", target_command: str, *, timeout: float) -> tuple[Result, Result]:
        """Pipe the stdout of `command` here into the stdin of `target_command` on another node,
        through the controller (e.g. docker save | docker load between nodes that cannot SSH to
        each other). Returns both results."""
        src_client, dst_client = self.connect(), target.connect()
        t0 = time.monotonic()
        deadline = t0 + timeout
        src = src_client.get_transport().open_session(timeout=self.ep.connect_timeout_s)
        dst = dst_client.get_transport().open_session(timeout=target.ep.connect_timeout_s)
        src.exec_command(command)
        dst.exec_command(target_command)
        src_err, dst_out, dst_err = bytearray(), bytearray(), bytearray()
        src_ended, dst_ended = Ended(src), Ended(dst)
        try:
            while True:
                if time.monotonic() > deadline:
                    raise CommandTimeout(f"{self.node} -> {target.node}: transfer did not finish within {timeout:g}s")
                moved = False
                if src.recv_ready():
                    dst.sendall(src.recv(1 << 20))
                    moved = True
                while src.recv_stderr_ready():
                    src_err += src.recv_stderr(65536)
                while dst.recv_ready():
                    dst_out += dst.recv(65536)
                while dst.recv_stderr_ready():
                    dst_err += dst.recv_stderr(65536)
                if src_ended():
                    break
                if not moved:
                    select.select([src], [], [], 0.05)
            dst.shutdown_write()
            while True:
                while dst.recv_ready():
                    dst_out += dst.recv(65536)
                while dst.recv_stderr_ready():
                    dst_err += dst.recv_stderr(65536)
                if dst_ended():
                    break
                if time.monotonic() > deadline:
                    raise CommandTimeout(f"{target.node}: `{_short(target_command)}` did not finish within {timeout:g}s")
                time.sleep(0.05)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise TransportError(f"{self.node} -> {target.node}: SSH connection lost during transfer: {exc}") from None
        finally:
            src.close()
            dst.close()
        took = time.monotonic() - t0
        return (Result(self.node, command, src.recv_exit_status(), "", src_err.decode(errors="replace"), took),
                Result(target.node, target_command, dst.recv_exit_status(), dst_out.decode(errors="replace"),
                       dst_err.decode(errors="replace"), took))

    def put(self, path: str, data: bytes, *, mode: int = 0o644, timeout: float | None = None) -> None:
        """Write a file on the node atomically (via the shell: no SFTP subsystem needed)."""
        tmp = f"{path}.spark-cluster.tmp"
        cmd = f"umask 077 && cat > {quote(tmp)} && chmod {mode:o} {quote(tmp)} && mv -f {quote(tmp)} {quote(path)}"
        self.run(cmd, input=data, timeout=timeout).check(f"writing {path}")

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _short(command: str, n: int = 120) -> str:
    one = " ".join(command.split())
    return one if len(one) <= n else one[: n - 1] + "…"


@dataclass
class GroupResult(Generic[T]):
    """Nodes.map's answer: per node, what it gave or the error that stopped it there."""

    succeeded: dict[str, T] = field(default_factory=dict)
    failed: dict[str, SparkClusterError] = field(default_factory=dict)

    def values_or_raise(self) -> dict[str, T]:
        """Every node's value; the first node's error when one failed."""
        if self.failed:
            raise next(iter(self.failed.values()))
        return dict(self.succeeded)


class Nodes:
    """The transports of a cluster, with a parallel map over nodes."""

    def __init__(self, cfg: ClusterConfig, factory: Callable[[Endpoint], Transport] = SSHTransport):
        self.cfg = cfg
        self.by_name = {n.name: factory(resolve_endpoint(n, cfg.node_ssh(n))) for n in cfg.nodes}

    def __getitem__(self, name: str) -> SSHTransport:
        return self.by_name[name]

    def map(self, fn: Callable[[SSHTransport], T], names: Iterable[str] | None = None) -> "GroupResult[T]":
        """Run fn on several nodes in parallel: what each node gave, or the SparkClusterError it
        raised (as Fabric's GroupResult). Anything else raised is a bug, not a node's doing: it is
        raised here once every node has finished (Ctrl-C too)."""
        names = list(names or self.by_name)
        out: GroupResult[T] = GroupResult()
        bug: Optional[BaseException] = None
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            futures = {name: pool.submit(fn, self.by_name[name]) for name in names}
            for name, fut in futures.items():
                try:
                    out.succeeded[name] = fut.result()
                except SparkClusterError as exc:
                    out.failed[name] = exc
                except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other nodes
                    bug = bug or exc
        if bug is not None:
            raise bug
        return out

    def close(self) -> None:
        for t in self.by_name.values():
            t.close()

    def __enter__(self) -> "Nodes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
