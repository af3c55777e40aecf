"""A real multi-node cluster on one Linux machine: the built-in default and the test bed.

Every simulated node is a set of Linux namespaces with its own IP address, its own OpenSSH
server and its own Docker daemon, reachable from the controller as `ssh root@10.99.0.1N`.
Only the GPU is missing. Layout (all fixed, so a crashed run can always be cleaned):

  netns scsim-switch   bridge br0 joining every node, plus a veth to the root namespace
  netns scsim-<node>   eth0 = 10.99.0.1N/24, default route to an unused address, egress
                       outside the subnet rejected (traffic stays on this machine)
  root namespace       scsim-host = 10.99.0.1/24: the controller's way in
  /var/lib/spark-cluster-sim/
      ssh/             client key, known_hosts (host keys of every node), authorized_keys
      nodes/<node>/    sshd_config, host key, docker data-root (kept: images survive down/up),
                       private /srv (models), /etc/sysctl.d, swappiness, hosts, logs
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import SimError, SparkClusterError  # noqa: F401 - re-exported

SIM_ROOT = Path(os.environ.get("SPARK_CLUSTER_SIM_ROOT", "/var/lib/spark-cluster-sim"))
SUBNET = ipaddress.ip_network("10.99.0.0/24")
HOST_IP = "10.99.0.1"
GATEWAY_IP = "10.99.0.254"  # unused on purpose: Ray wants a default route; nothing answers there
NS_PREFIX = "scsim-"
SWITCH_NS = f"{NS_PREFIX}switch"
HOST_VETH = f"{NS_PREFIX}host"
REQUIRED_TOOLS = {
    "ip": "iproute2",
    "iptables": "iptables",
    "sshd": "openssh-server",
    "ssh-keygen": "openssh-client",
    "dockerd": "docker.io",
    "docker": "docker.io",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "mmdebstrap": "mmdebstrap",
    "ping": "iputils-ping",  # the link gate pings every node from every node (preflight)
}
MAX_NODES = 32




@dataclass
class SimNode:
    name: str
    ip: str
    netns: str
    dir: str
    pid: int = 0

    @property
    def path(self) -> Path:
        return Path(self.dir)


def node_name(i: int) -> str:
    return f"sim-{i}"


def node_ip(i: int) -> str:
    return str(SUBNET.network_address + 10 + i)


def ssh_dir() -> Path:
    return SIM_ROOT / "ssh"


def client_key() -> Path:
    return ssh_dir() / "id_ed25519"


def known_hosts() -> Path:
    return ssh_dir() / "known_hosts"


def state_file() -> Path:
    return SIM_ROOT / "state.json"


def _run(*args: str, check: bool = True, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired:
        raise SimError(f"`{' '.join(args)}` did not finish within {timeout:g}s") from None
    if check and res.returncode != 0:
        raise SimError(f"`{' '.join(args)}` failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


def check_prerequisites() -> None:
    """Refuse clearly when not root or when a tool is missing, saying what to install."""
    if os.geteuid() != 0:
        raise SimError("the simulated cluster needs root (network namespaces, mounts, a Docker daemon per node)",
                       hint="run it as root, e.g. `sudo make demo`")
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise SimError(f"missing tools for the simulated cluster: {', '.join(missing)}",
                       hint=f"apt-get install -y {' '.join(missing)}   (or `make sim-deps`)")


def list_netns() -> list[str]:
    res = _run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


# ---- up ------------------------------------------------------------------------------------


def _ensure_ssh_material(nodes: list[SimNode]) -> None:
    d = ssh_dir()
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    if not client_key().exists():
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "spark-cluster-sim-controller", "-f", str(client_key()))
    (d / "authorized_keys").write_text(client_key().with_suffix(".pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    lines = []
    for node in nodes:
        key = node.path / "ssh_host_ed25519_key"
        if not key.exists():
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{node.name}-host", "-f", str(key))
        pub = key.with_suffix(".pub").read_text().split()
        lines.append(f"{node.ip} {pub[0]} {pub[1]}")
    known_hosts().write_text("\n".join(lines) + "\n")


def _write_node_files(node: SimNode, nodes: list[SimNode]) -> None:
    p = node.path
    for sub in ("docker", "etc-docker", "srv", "sysctl.d", "log", "proc-driver"):
        (p / sub).mkdir(parents=True, exist_ok=True)
    set_driver(node.name, None, where=p)
    hosts = ["127.0.0.1 localhost", f"{HOST_IP} controller"] + [f"{n.ip} {n.name}" for n in nodes]
    (p / "hosts").write_text("\n".join(hosts) + "\n")
    (p / "hostname").write_text(node.name + "\n")
    # a resolver that fails at once: the host's resolver is unreachable from a node, and
    # every lookup would otherwise hang ~12 s
    (p / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    (p / "swappiness").write_text(Path("/proc/sys/vm/swappiness").read_text())
    # the node's own root shell start-up, as on a fresh box (Debian's skeleton: nothing for
    # non-interactive shells). sshd runs every command through bash, which reads ~/.bashrc:
    # the controller's own (here: pyenv set-up, ~0.2 s) must not be charged to each node command.
    skel = Path("/etc/skel/.bashrc")
    (p / "bashrc").write_text(skel.read_text() if skel.exists() else "# simulated node\n")
    (p / "etc-docker" / "daemon.json").write_text(json.dumps({"log-driver": "json-file", "log-opts": {"max-size": "50m"}}) + "\n")
    (p / "sshd_config").write_text(
        "\n".join([
            f"ListenAddress {node.ip}",
            "Port 22",
            f"HostKey {p / 'ssh_host_ed25519_key'}",
            "PidFile /run/sshd.pid",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            f"AuthorizedKeysFile {ssh_dir() / 'authorized_keys'}",
            "StrictModes no",
            "PrintMotd no",
            "MaxSessions 64",
            "MaxStartups 64:30:128",
            "Subsystem sftp internal-sftp",
            "",
        ])
    )
    for name in ("node.log", "dockerd.log", "init.ready"):
        (p / name).unlink(missing_ok=True)


def _network(nodes: list[SimNode]) -> None:
    _run("ip", "netns", "add", SWITCH_NS)
    sw = ("ip", "netns", "exec", SWITCH_NS)
    _run(*sw, "ip", "link", "set", "lo", "up")
    _run(*sw, "ip", "link", "add", "br0", "type", "bridge")
    _run(*sw, "ip", "link", "set", "br0", "up")
    # the controller's way in, from the root namespace
    _run("ip", "link", "add", HOST_VETH, "type", "veth", "peer", "name", "sw-host")
    _run("ip", "link", "set", "sw-host", "netns", SWITCH_NS)
    _run(*sw, "ip", "link", "set", "sw-host", "master", "br0", "up")
    _run("ip", "addr", "add", f"{HOST_IP}/{SUBNET.prefixlen}", "dev", HOST_VETH)
    _run("ip", "link", "set", HOST_VETH, "up")
    for i, node in enumerate(nodes, start=1):
        _run("ip", "netns", "add", node.netns)
        ns = ("ip", "netns", "exec", node.netns)
        _run("ip", "link", "add", f"{NS_PREFIX}v{i}", "type", "veth", "peer", "name", f"sw-v{i}")
        _run("ip", "link", "set", f"sw-v{i}", "netns", SWITCH_NS)
        _run(*sw, "ip", "link", "set", f"sw-v{i}", "master", "br0", "up")
        _run("ip", "link", "set", f"{NS_PREFIX}v{i}", "netns", node.netns)
        _run(*ns, "ip", "link", "set", f"{NS_PREFIX}v{i}", "name", "eth0")
        _run(*ns, "ip", "addr", "add", f"{node.ip}/{SUBNET.prefixlen}", "dev", "eth0")
        _run(*ns, "ip", "link", "set", "eth0", "up")
        _run(*ns, "ip", "link", "set", "lo", "up")
        _run(*ns, "ip", "route", "add", "default", "via", GATEWAY_IP)
        # traffic stays on this machine: anything not for the simulated subnet is refused at once
        _run(*ns, "iptables", "-A", "OUTPUT", "-o", "eth0", "!", "-d", str(SUBNET), "-j", "REJECT")


def _start_node(node: SimNode) -> None:
    init = Path(__file__).with_name("node_init.py")
    log = open(node.path / "log" / "init.log", "ab")
    proc = subprocess.Popen(
        [
            "nsenter", f"--net=/run/netns/{node.netns}",
            "unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "slave",
            sys.executable, str(init), str(node.path), node.name, node.ip, f"/{NS_PREFIX}{node.name}",
        ],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )
    node.pid = proc.pid


def _wait_ready(nodes: list[SimNode], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending and time.monotonic() < deadline:
        for node in list(pending):
            if not Path(f"/proc/{node.pid}").exists() or _host_pid_of_init(node) is None and time.monotonic() > deadline - timeout + 5:
                tail = (node.path / "log" / "init.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise SimError(f"simulated node {node.name} died while starting: " + " | ".join(tail))
            ns = ("ip", "netns", "exec", node.netns)
            ssh_up = _run(*ns, "ss", "-Htln", "sport = :22", check=False).stdout.strip() != ""
            sock = node.path / "init.ready"
            docker_up = sock.exists() and _nsenter(node, "docker", "version", "--format", "{{.Server.Version}}", check=False).returncode == 0
            if ssh_up and docker_up:
                pending.remove(node)
        time.sleep(0.3)
    if pending:
        detail = "; ".join(f"{n.name}: see {n.path / 'dockerd.log'} and {n.path / 'node.log'}" for n in pending)
        raise SimError(f"simulated node(s) not ready within {timeout:g}s ({detail})")


def _init_pid(node: SimNode) -> int | None:
    try:
        return int((node.path / "init.ready").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _host_pid_of_init(node: SimNode) -> int | None:
    """PID (in the root namespace) of the node's PID 1: the child of the unshare process."""
    try:
        children = Path(f"/proc/{node.pid}/task/{node.pid}/children").read_text().split()
        return int(children[0]) if children else None
    except (OSError, ValueError):
        return None


def node_pids(node: SimNode) -> list[int]:
    """The node's unshare process and its init, if the PIDs in the (possibly stale) state file
    still are them: a PID reused by an unrelated process since is never signalled."""
    out = []
    for pid in (node.pid, _host_pid_of_init(node)):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if pid else []
        except OSError:
            continue
        if is_node_cmdline(cmdline, node):
            out.append(pid)
    return out


def is_node_cmdline(argv: list[str], node: SimNode) -> bool:
    """Whether a process's argv is the node's init (or the unshare that runs it)."""
    return any(a.endswith("node_init.py") for a in argv) and str(node.path) in argv and node.name in argv


def _nsenter(node: SimNode, *cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    pid = _host_pid_of_init(node)
    if pid is None:
        raise SimError(f"node {node.name} is not running")
    return _run("nsenter", "-t", str(pid), "-m", "-u", "-i", "-n", "-p", "--", *cmd, check=check, timeout=timeout)


def node_exec(name: str, *cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command inside a simulated node (for the sim's own setup and for tests)."""
    node = next((n for n in load_state() if n.name == name), None)
    if node is None:
        raise SimError(f"no simulated node named {name}")
    return _nsenter(node, *cmd, check=check, timeout=timeout)


# as a DGX Spark's /proc/driver/nvidia/version begins (box_facts.parse_driver; tests/data/facts/driver-real-spark-580.142.json)
DRIVER_LINE = "NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  {version}  Release Build  (simulated)"


def set_driver(name: str, version: str | None, *, where: Path | None = None) -> None:
    """The simulation's hook for the driver fact: give a node an NVIDIA kernel module of this version (its
    /proc/driver/nvidia/version), or none (None: a node without a GPU, the default). Takes effect at once."""
    if where is None:
        node = next((n for n in load_state() if n.name == name), None)
        if node is None:
            raise SimError(f"no simulated node named {name}")
        where = node.path
    folder = where / "proc-driver" / "nvidia"
    if version is None:
        (folder / "version").unlink(missing_ok=True)
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "version").write_text(DRIVER_LINE.format(version=version) + "\n")


def save_state(nodes: list[SimNode]) -> None:
    state_file().write_text(json.dumps([asdict(n) for n in nodes], indent=2) + "\n")


def load_state() -> list[SimNode]:
    try:
        return [SimNode(**d) for d in json.loads(state_file().read_text())]
    except (OSError, ValueError):
        return []


def up(n: int = 2, *, log=print) -> list[SimNode]:
    """Create N nodes (after removing whatever a previous run left). Returns them, serving SSH and docker."""
    check_prerequisites()
    if not 1 <= n <= MAX_NODES:
        raise SimError(f"--nodes must be between 1 and {MAX_NODES}, not {n}")
    down(log=lambda *_: None)
    nodes = [SimNode(node_name(i), node_ip(i), f"{NS_PREFIX}{node_name(i)}", str(SIM_ROOT / "nodes" / node_name(i)))
             for i in range(1, n + 1)]
    for node in nodes:
        node.path.mkdir(parents=True, exist_ok=True)
    _ensure_ssh_material(nodes)
    for node in nodes:
        _write_node_files(node, nodes)
    t0 = time.monotonic()
    try:
        _network(nodes)
        for node in nodes:
            _start_node(node)
        save_state(nodes)
        _wait_ready(nodes)
        # a node starts empty: containers a killed run left in the kept docker data-root go
        for node in nodes:
            ids = _nsenter(node, "docker", "ps", "-aq").stdout.split()
            if ids:
                _nsenter(node, "docker", "rm", "-f", *ids)
    except BaseException:
        down(log=lambda *_: None)
        raise
    log(f"simulated cluster up: {n} node(s) in {time.monotonic() - t0:.1f}s: "
        + ", ".join(f"{nd.name}={nd.ip}" for nd in nodes))
    return nodes


# ---- down ----------------------------------------------------------------------------------


def _kill_netns_processes(ns: str) -> None:
    res = _run("ip", "netns", "pids", ns, check=False)
    for pid in res.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _node_cgroups(name: str) -> list[Path]:
    root = Path("/sys/fs/cgroup")
    found = []
    for pattern in (f"*/{NS_PREFIX}{name}", f"{NS_PREFIX}{name}", f"*/unified/{NS_PREFIX}{name}"):
        found.extend(p for p in root.glob(pattern) if p.is_dir())
    return found


def _kill_cgroup_processes(name: str) -> None:
    """Thaw, then kill, whatever still lives in a node's cgroups: a paused (frozen) container
    ignores SIGKILL until thawed, and its processes may outlive the node's namespaces."""
    for base in _node_cgroups(name):
        for f in base.rglob("freezer.state"):
            try:
                f.write_text("THAWED")
            except OSError:
                pass
        for f in base.rglob("cgroup.freeze"):
            try:
                f.write_text("0")
            except OSError:
                pass
    for base in _node_cgroups(name):
        for f in [base / "cgroup.procs", *base.rglob("*/cgroup.procs")]:
            try:
                pids = f.read_text().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass


def _remove_cgroups(name: str) -> None:
    root = Path("/sys/fs/cgroup")
    for ctl in root.iterdir() if root.is_dir() else []:
        for base in (ctl / f"{NS_PREFIX}{name}", ctl / "unified" / f"{NS_PREFIX}{name}"):
            if base.is_dir():
                for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                    try:
                        d.rmdir()
                    except OSError:
                        pass
                try:
                    base.rmdir()
                except OSError:
                    pass


def down(*, log=print) -> None:
    """Remove every trace of the simulated cluster: processes, namespaces, links, cgroups.

    Works from the fixed names alone, so it also cleans after a crashed or killed run.
    """
    nodes = load_state()
    for node in nodes:
        for pid in node_pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    names = [ns for ns in list_netns() if ns.startswith(NS_PREFIX)]
    deadline = time.monotonic() + 20
    for ns in names:
        while True:
            _kill_netns_processes(ns)
            if not _run("ip", "netns", "pids", ns, check=False).stdout.strip() or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    for ns in names:
        _run("ip", "netns", "del", ns, check=False)
    _run("ip", "link", "del", HOST_VETH, check=False)
    node_dirs = sorted((SIM_ROOT / "nodes").glob("*")) if (SIM_ROOT / "nodes").is_dir() else []
    # a cgroup can only go once the kernel has finished killing its processes: retry briefly
    deadline = time.monotonic() + 15
    while True:
        for d in node_dirs:
            _kill_cgroup_processes(d.name)
            _remove_cgroups(d.name)
        left = [p for p in Path("/sys/fs/cgroup").glob(f"*/{NS_PREFIX}*")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if left:
        log(f"warning: cgroups still busy after teardown: {', '.join(map(str, left))}")
    for d in node_dirs:
        (d / "init.ready").unlink(missing_ok=True)
    state_file().unlink(missing_ok=True)
    if names or nodes:
        log(f"simulated cluster down: removed {len(names)} namespace(s)")


def status() -> dict:
    nodes = load_state()
    out = {"nodes": [], "namespaces": [ns for ns in list_netns() if ns.startswith(NS_PREFIX)]}
    for node in nodes:
        alive = _host_pid_of_init(node) is not None
        out["nodes"].append({"name": node.name, "ip": node.ip, "running": alive})
    return out
