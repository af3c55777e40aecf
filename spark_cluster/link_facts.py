"""Facts of the cluster link read from the nodes: RDMA devices and their netdevs, interfaces,
reachability, bandwidth (ib_write_bw, nccl-tests). Each one command plus one pure parser, tested on
recorded outputs in tests/data/facts/ (as spark_cluster.facts, for everything else a node shows).
"""

from __future__ import annotations

import re
from typing import Optional

from pydantic import BaseModel, Field

from .facts import marked_sections
from .render import quote


# ---- the cluster link: RDMA devices and their netdevs (ibdev2netdev), interfaces (ip addr) ----------
# On a Spark each QSFP cage of the ConnectX-7 shows up twice (two PCIe functions): RDMA devices
# rocep1s0f<N> and roceP2p1s0f<N>, netdevs enp1s0f<N>np<N> and enP2p1s0f<N>np<N>; full bandwidth on
# one cable needs both twins (docs/field.md, "The link").

IBDEV2NETDEV_COMMAND = "ibdev2netdev"
IP_ADDR_COMMAND = "ip addr"


class RdmaPort(BaseModel):
    device: str
    port: int
    netdev: str
    up: bool


_IBDEV = re.compile(r"^\s*(\S+) port (\d+) ==> (\S+) \((Up|Down)\)\s*$")


def parse_ibdev2netdev(text: str) -> list[RdmaPort]:
    """One RdmaPort per mapping line, in the order listed (systems differ: some list roceP2... first);
    anything else (a shell prompt kept in a capture, a blank) is not a mapping and is skipped."""
    return [RdmaPort(device=m.group(1), port=int(m.group(2)), netdev=m.group(3), up=m.group(4) == "Up")
            for m in map(_IBDEV.match, text.splitlines()) if m]


class NetInterface(BaseModel):
    name: str
    mtu: int
    state: str = Field(description="the kernel's operational state: UP, DOWN, UNKNOWN")
    carrier: bool = Field(description="a cable and a partner: LOWER_UP among the flags (NO-CARRIER: no cable or the other end down)")
    addresses: list[str] = Field(default_factory=list, description="IPv4 addresses with their prefix length, e.g. 10.0.1.1/24")
    altnames: list[str] = Field(default_factory=list)


_IFACE = re.compile(r"^\s*\d+: ([^:@\s]+)(?:@\S+)?: <([^>]*)> mtu (\d+)\b.*?\bstate (\S+)")
_INET = re.compile(r"^\s+inet ([0-9.]+/\d+)\s")
_ALTNAME = re.compile(r"^\s+altname (\S+)")


def parse_ip_addr(text: str) -> list[NetInterface]:
    """`ip addr` (or `ip addr show DEV`): every interface with its MTU, state, carrier and IPv4
    addresses. Lines before the first interface (a prompt) and IPv6 addresses are skipped."""
    out: list[NetInterface] = []
    for line in text.splitlines():
        if m := _IFACE.match(line):
            flags = m.group(2).split(",")
            out.append(NetInterface(name=m.group(1), mtu=int(m.group(3)), state=m.group(4),
                                    carrier="LOWER_UP" in flags and "NO-CARRIER" not in flags))
        elif out and (m := _INET.match(line)):
            out[-1].addresses.append(m.group(1))
        elif out and (m := _ALTNAME.match(line)):
            out[-1].altnames.append(m.group(1))
    return out


class PingFact(BaseModel):
    sent: int = 0
    received: int = 0
    rtt_avg_ms: Optional[float] = None
    reported_mtu: Optional[int] = Field(None, description="the MTU the sender (\"local error: message too long, mtu=N\") or a hop on "
                                                         "the path (\"Frag needed and DF set (mtu = N)\") reported for a packet too large")
    error: Optional[str] = Field(None, description="why nothing was sent (no route, no ping), or the last error ping printed")

    @property
    def answered(self) -> bool:
        return self.received > 0


_PING_STATS = re.compile(r"(\d+) packets transmitted, (\d+) received")
_PING_RTT = re.compile(r"= [\d.]+/([\d.]+)/")
_PING_MTU = re.compile(r"mtu ?= ?(\d+)")


def parse_ping(exit_code: int, stdout: str, stderr: str = "") -> PingFact:
    stats = _PING_STATS.search(stdout)
    rtt = _PING_RTT.search(stdout)
    mtu = _PING_MTU.search(stderr + stdout)
    errors = [x.strip() for x in stderr.splitlines() if x.strip()]
    return PingFact(sent=int(stats.group(1)) if stats else 0, received=int(stats.group(2)) if stats else 0,
                    rtt_avg_ms=float(rtt.group(1)) if rtt else None, reported_mtu=int(mtu.group(1)) if mtu else None,
                    error=(errors[-1][:200] if errors else None) if exit_code != 0 else None)


# the node's side of the link in one read: RDMA devices (nothing when ibdev2netdev is not installed or
# there is no ConnectX: the simulated nodes), then every interface
# (without ibdev2netdev the same lines are made from sysfs: each RDMA device's netdev and its port's state, ACTIVE = Up)
SYSFS_IBDEV2NETDEV = ("for d in /sys/class/infiniband/*; do [ -d \"$d\" ] || continue; s=$(cat \"$d/ports/1/state\" 2>/dev/null); "
                      "case \"$s\" in *ACTIVE*) u=Up;; *) u=Down;; esac; for n in \"$d\"/device/net/*; do [ -e \"$n\" ] && "
                      "echo \"${d##*/} port 1 ==> ${n##*/} ($u)\"; done; done")
LINK_COMMAND = (f"if command -v {IBDEV2NETDEV_COMMAND} >/dev/null 2>&1; then {IBDEV2NETDEV_COMMAND} 2>/dev/null; else {SYSFS_IBDEV2NETDEV}; fi; "
                f"echo {quote('=== ip addr')}; {IP_ADDR_COMMAND}")


def parse_link(stdout: str) -> tuple[list[RdmaPort], list[NetInterface]]:
    """LINK_COMMAND's output: the RDMA ports and the interfaces."""
    rdma, _, ip = stdout.partition("=== ip addr\n")
    return parse_ibdev2netdev(rdma), parse_ip_addr(ip)


def reach_command(peer: str, mtu: Optional[int] = None) -> str:
    """Can this node reach a peer over the cluster link, and at the link's MTU? One read: the route
    to the peer (which interface the traffic leaves by), the MTU the test uses (`mtu`, else that
    interface's own), a ping with small packets, then one with packets of that MTU that may not be
    fragmented. Each ping's exit code precedes its output (parse_reach)."""
    p = quote(peer)
    # the interface's MTU as the kernel reports it over netlink (`ip`), which is right inside any network namespace
    size = str(mtu) if mtu else "$(ip -o link show dev \"$dev\" 2>/dev/null | sed -n 's/.* mtu \\([0-9]*\\).*/\\1/p')"
    return (f"r=$(ip -o route get {p} 2>&1); echo \"route: $r\"; "
            f"dev=$(printf '%s' \"$r\" | sed -n 's/.* dev \\([^ ]*\\).*/\\1/p'); mtu={size}; echo \"mtu: ${{mtu:-0}}\"; "
            f"out=$(ping -n -c 2 -i 0.2 -W 1 {p} 2>&1); echo \"== small $?\"; echo \"$out\"; "
            f"out=$(ping -n -c 2 -i 0.2 -W 1 -M do -s $(( ${{mtu:-0}} - 28 )) {p} 2>&1); echo \"== full $?\"; echo \"$out\"")


class ReachFact(BaseModel):
    route_dev: Optional[str] = Field(None, description="the interface the traffic to the peer leaves by")
    route: str = ""
    mtu: int = 0
    small: PingFact = Field(default_factory=PingFact)
    full: PingFact = Field(default_factory=PingFact)


_REACH_SECTION = re.compile(r"^== (small|full) (\d+)$", re.M)
_RAIL_SECTION = re.compile(r"^== (\S+ \S+)$", re.M)


_ROUTE_DEV = re.compile(r"\bdev (\S+)")


def parse_reach(stdout: str) -> ReachFact:
    route = next((x[len("route: "):].split("\\")[0].strip() for x in stdout.splitlines() if x.startswith("route: ")), "")
    dev = _ROUTE_DEV.search(route)
    mtu = re.search(r"^mtu: (\d+)$", stdout, re.M)
    pings: dict[str, PingFact] = {}
    for m, text in marked_sections(_REACH_SECTION, stdout):
        code = int(m.group(2))
        if code == 127:
            pings[m.group(1)] = PingFact(error="ping is not installed on the node (Debian/Ubuntu: apt install iputils-ping)")
            continue
        # ping's own complaints (stderr, merged) and "From <hop> ... Unreachable" lines are its errors
        errors = "\n".join(x for x in text.splitlines() if x.startswith(("ping:", "From ")) or ": not found" in x)
        pings[m.group(1)] = parse_ping(code, text, errors)
    return ReachFact(route_dev=dev.group(1) if dev else None, route=route[:200], mtu=int(mtu.group(1)) if mtu else 0,
                     small=pings.get("small", PingFact(error="no ping ran")), full=pings.get("full", PingFact(error="no ping ran")))


# ---- the link's bandwidth: ib_write_bw (perftest) and nccl-tests --------------------------------


class BandwidthFact(BaseModel):
    gbits: Optional[float] = Field(None, description="the measured average, in Gb/s")
    error: Optional[str] = None


def _last_line(text: str) -> str:
    """What a tool that gave no result said last (its error, usually)."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return lines[-1][:200] if lines else "no output"


_NUMBER_ROW = re.compile(r"^\s*\d[\d.\s]*$")


def _rows(lines: list[str], start: int) -> list[list[float]]:
    """The rows of numbers right after a table's header line."""
    out = []
    for line in lines[start:]:
        if not _NUMBER_ROW.match(line):
            if out:
                break
            continue
        out.append([float(x) for x in line.split()])
    return out


def parse_ib_write_bw(text: str) -> BandwidthFact:
    """The client side's table: the mean of its "BW average" rows (one row, or one per interval with
    --run_infinitely), in Gb/s whether it reports Gb/sec (--report_gbits) or MB/sec."""
    lines = text.splitlines()
    head = next((i for i, x in enumerate(lines) if "BW average[" in x), None)
    if head is None:
        return BandwidthFact(error=_last_line(text))
    rows = [r for r in _rows(lines, head + 1) if len(r) >= 4]
    if not rows:
        return BandwidthFact(error="no result row after the table's header")
    mean = sum(r[3] for r in rows) / len(rows)
    return BandwidthFact(gbits=round(mean if "Gb/sec" in lines[head] else mean * 8 / 1000, 2))


# NVIDIA's check-connectx-bandwidth: ib_write_bw per rail, 4 queue pairs, 5 seconds; a pass is 80 Gb/s or more per rail
RDMA_BW_PORT = 18515  # rail i listens on RDMA_BW_PORT + i on the serving node
PERFTEST_COMMAND = "command -v ib_write_bw || true"
_IB_WRITE_BW = "ib_write_bw -q 4 -D 5 -F --report_gbits"


def ib_write_bw_server_command(hcas: list[str]) -> str:
    """On a worker: one ib_write_bw server per rail, in turn (each ends after its client)."""
    return " && ".join(f"{_IB_WRITE_BW} -d {quote(h)} -p {RDMA_BW_PORT + i} >/dev/null" for i, h in enumerate(hcas))


def ib_write_bw_client_command(hcas: list[str], peers: list[tuple[str, str, int]]) -> str:
    """On the head: for each (peer name, its address, its rails), a client per rail (retried while
    the peer's server starts), each output after a `== PEER HCA` line (parse_rdma_bandwidth)."""
    parts = []
    for name, address, rails in peers:
        for i, hca in enumerate(hcas[:rails]):
            run = f"{_IB_WRITE_BW} -d {quote(hca)} -p {RDMA_BW_PORT + i} {quote(address)}"
            parts.append(f"echo {quote(f'== {name} {hca}')}; for t in $(seq 60); do {run} 2>&1 && break; sleep 0.5; done")
    return "; ".join(parts)


def parse_rdma_bandwidth(stdout: str) -> dict[str, BandwidthFact]:
    """ib_write_bw_client_command's output: 'PEER HCA' -> that rail's figure."""
    return {m.group(1): parse_ib_write_bw(text) for m, text in marked_sections(_RAIL_SECTION, stdout)}


_NCCL_AVG = re.compile(r"^# Avg bus bandwidth\s*:\s*([\d.]+)", re.M)


def parse_nccl_tests(text: str) -> BandwidthFact:
    """nccl-tests' average bus bandwidth (GB/s) in Gb/s (templates/node-scripts/allreduce.py prints
    the same line); when the output stops before that line, the mean of the rows' bus bandwidth
    (out-of-place and in-place), as nccl-tests computes it."""
    if m := _NCCL_AVG.search(text):
        return BandwidthFact(gbits=round(float(m.group(1)) * 8, 2))
    # size count type redop root | time algbw busbw #wrong (out-of-place) | time algbw busbw #wrong (in-place)
    rows = [x.split() for x in text.splitlines() if not x.startswith("#") and x.split() and x.split()[0].isdigit()]
    busbw = [float(r[i]) for r in rows if len(r) >= 13 for i in (7, 11)]
    if not busbw:
        return BandwidthFact(error=_last_line(text))
    return BandwidthFact(gbits=round(sum(busbw) / len(busbw) * 8, 2))
