"""The cluster link, as pure decisions over facts read from the nodes: which interface and RDMA
devices carry a node's cluster traffic (facts.parse_ibdev2netdev, facts.parse_ip_addr and its
cluster address from cluster.yaml), and whether a peer is reachable over it at the link's MTU
(facts.parse_ping).

On a Spark each QSFP cage of the ConnectX-7 is two PCIe functions, so one cable shows up as two
RDMA devices (rocep1s0f<N>, roceP2p1s0f<N>) and two netdevs (enp1s0f<N>np<N>, enP2p1s0f<N>np<N>):
"twins" that differ only in the PCI domain part (`P2`). Full bandwidth on one cable needs both
(NCCL_IB_HCA names both); the socket side (NCCL's bootstrap, Gloo, vLLM's host IP) uses the netdev
that holds the node's cluster address. A node without RDMA devices (the simulated cluster, a box
without a ConnectX) gets the socket side only: NCCL then runs over TCP.

What `nccl: auto` detected is kept in state_dir/link.json (spark_cluster.kept), so that `plan`,
`status` and the watchdog render the same containers as the `up` that detected it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

from .link_facts import NetInterface, PingFact, RdmaPort

@dataclass(frozen=True)
class LinkPick:
    netdev: str  # holds the node's cluster address: NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME
    hcas: tuple[str, ...]  # the active RDMA devices of that cable (both twins when both are up): NCCL_IB_HCA
    mtu: int
    note: str = ""  # something worth saying that is not an error (a twin down: half the bandwidth)

    def env(self) -> dict[str, str]:
        out = {"NCCL_SOCKET_IFNAME": self.netdev, "GLOO_SOCKET_IFNAME": self.netdev}
        if self.hcas:
            out["NCCL_IB_HCA"] = ",".join(self.hcas)
        return out


def twin_key(name: str) -> str:
    """The name without its PCI domain part: twins of one cable share it (roceP2p1s0f1 and
    rocep1s0f1 -> rocep1s0f1; enP2p1s0f1np1 and enp1s0f1np1 -> enp1s0f1np1)."""
    return re.sub(r"^(en|roce)P\d+(?=p\d)", r"\1", name)


def _found(ports: list[RdmaPort], ifaces: list[NetInterface]) -> str:
    with_ip = [f"{i.name} {', '.join(i.addresses)}{'' if i.carrier else ' (no carrier)'}" for i in ifaces if i.addresses and i.name != "lo"]
    rdma = [f"{p.device} -> {p.netdev} ({'Up' if p.up else 'Down'})" for p in ports]
    return (f"interfaces with an IPv4 address: {'; '.join(with_ip) or 'none'}; "
            f"RDMA devices: {'; '.join(rdma) or 'none (no ibdev2netdev, or no ConnectX)'}")


def pick_link(address: str, ports: list[RdmaPort], ifaces: list[NetInterface]) -> Union[LinkPick, str]:
    """The link that carries this node's cluster traffic, or why none can be picked (what was found
    included, so the message says what to fix)."""
    holders = [i for i in ifaces if any(a.split("/")[0] == address for a in i.addresses)]
    if not holders:
        return f"no interface holds the node's address {address}: {_found(ports, ifaces)}"
    if len(holders) > 1:
        return f"{address} is on {len(holders)} interfaces ({', '.join(i.name for i in holders)}): which one is the cluster link is ambiguous"
    iface = holders[0]
    if not iface.carrier:
        return f"{iface.name} holds {address} but has no carrier: the cable is out or the other end is down"
    twins = [p for p in ports if twin_key(p.netdev) == twin_key(iface.name)]
    if not twins:
        if ports:
            return (f"{address} is on {iface.name}, which is no RDMA device's netdev: NCCL would run over TCP on it "
                    f"(a management network or Wi-Fi?); give the node its address on the ConnectX-7 link: {_found(ports, ifaces)}")
        return LinkPick(netdev=iface.name, hcas=(), mtu=iface.mtu, note="no RDMA devices: NCCL over TCP")
    twins.sort(key=lambda p: (p.device != twin_key(p.device), p.device))  # rocep1s0f<N> before its roceP2 twin
    up = tuple(p.device for p in twins if p.up)
    if not up:
        return f"{iface.name} holds {address}, but its RDMA device(s) {', '.join(p.device for p in twins)} are Down"
    down = [p.device for p in twins if not p.up]
    note = f"{', '.join(down)} (the other half of this cable) is Down: about half the bandwidth" if down else ""
    return LinkPick(netdev=iface.name, hcas=up, mtu=iface.mtu, note=note)


def reach_problem(node: str, peer_name: str, peer: str, mtu: int, small: PingFact, full: PingFact) -> Optional[str]:
    """None when the peer answers packets of the link's MTU that may not be fragmented (`full`);
    else what is wrong and the fix. `small`: the same with small packets, which tells a peer that
    cannot be reached at all from an MTU that differs along the path."""
    if not small.answered:
        return (f"{node} cannot reach {peer_name} at {peer} over the cluster link ({small.error or 'no answer'}): "
                f"check the cable (ibdev2netdev: Up on both ends) and that both nodes have their cluster address on it (ip addr)")
    if full.answered:
        return None
    fix = f"set the same MTU on every end of the link (ip link set <dev> mtu {mtu}, and in netplan to keep it)"
    if full.reported_mtu is not None:
        return f"the path from {node} to {peer_name} ({peer}) has MTU {full.reported_mtu}, smaller than the link's {mtu}: {fix}"
    return (f"{node} reaches {peer_name} ({peer}) with small packets but not with {mtu}-byte packets that may not be "
            f"fragmented: the MTU differs along the path ({peer_name}'s interface, or a switch port); {fix}")
