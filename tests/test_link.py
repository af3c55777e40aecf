"""Which link carries a node's cluster traffic (spark_cluster/link.py): table tests over facts
recorded on real Sparks (tests/data/facts/, the same node's ibdev2netdev and ip addr where one was
published) and the simulated nodes."""

from __future__ import annotations

import pytest

from spark_cluster.checks import ClusterLink, PeerReachable, evaluate, link_of, note, peer_problem
from spark_cluster.link_facts import NetInterface, RdmaPort, parse_ibdev2netdev, parse_ip_addr, parse_link, parse_ping, parse_reach
from spark_cluster.link import LinkPick, pick_link, reach_problem, twin_key

from .conftest import recording


def ping(case: str):
    rec = recording(f"ping-{case}")
    return parse_ping(rec["exit_code"], rec["stdout"], rec["stderr"])


# spark-fb97 (KoyoImai/dgx_spark_cluster2): cage 0 cabled, 10.0.1.1/24 on enp1s0f0np0
FB97_PORTS = parse_ibdev2netdev(recording("ibdev-real-spark-trailing-prompt")["stdout"])
FB97_IFACES = parse_ip_addr(recording("ip-addr-real-spark-static")["stdout"])
# the same node before its cable went in: every CX-7 netdev NO-CARRIER, the Wi-Fi has an address
NO_CABLE_IFACES = parse_ip_addr(recording("ip-addr-real-spark-no-cable")["stdout"])
NO_CABLE_PORTS = [p.model_copy(update={"up": False}) for p in FB97_PORTS]
# the simulated node: no RDMA device, eth0 in the cluster's subnet
SIM_IFACES = [NetInterface(name="lo", mtu=65536, state="UNKNOWN", carrier=True, addresses=["127.0.0.1/8"]),
              NetInterface(name="eth0", mtu=1500, state="UP", carrier=True, addresses=["10.99.0.11/24"])]


def half_down(ports: list[RdmaPort], device: str) -> list[RdmaPort]:
    return [p.model_copy(update={"up": False}) if p.device == device else p for p in ports]


@pytest.mark.parametrize("address, ports, ifaces, expected", [
    # one cable: its netdev for sockets, both twins of the cage for RDMA
    ("10.0.1.1", FB97_PORTS, FB97_IFACES, LinkPick("enp1s0f0np0", ("rocep1s0f0", "roceP2p1s0f0"), 1500)),
    # one twin down: the other alone, and the note says what it costs
    ("10.0.1.1", half_down(FB97_PORTS, "roceP2p1s0f0"), FB97_IFACES,
     LinkPick("enp1s0f0np0", ("rocep1s0f0",), 1500, "roceP2p1s0f0 (the other half of this cable) is Down: about half the bandwidth")),
    # no RDMA at all (the simulated cluster): sockets only
    ("10.99.0.11", [], SIM_IFACES, LinkPick("eth0", (), 1500, "no RDMA devices: NCCL over TCP")),
])
def test_the_link_is_the_interface_holding_the_address_with_both_halves_of_its_cable(address, ports, ifaces, expected):
    assert pick_link(address, ports, ifaces) == expected


@pytest.mark.parametrize("address, ports, ifaces, words", [
    # cable out: the address is nowhere, the message lists what there is
    ("10.0.1.1", NO_CABLE_PORTS, NO_CABLE_IFACES,
     ["no interface holds the node's address 10.0.1.1", "wlP9s9 192.168.111.87/24", "rocep1s0f0 -> enp1s0f0np0 (Down)"]),
    # the address given is the Wi-Fi's: NCCL would not use RDMA
    ("192.168.111.87", NO_CABLE_PORTS, NO_CABLE_IFACES, ["on wlP9s9, which is no RDMA device's netdev", "over TCP"]),
    # the address is there but the link has no carrier
    ("10.0.1.1", FB97_PORTS, [i.model_copy(update={"carrier": False}) for i in FB97_IFACES], ["enp1s0f0np0 holds 10.0.1.1 but has no carrier"]),
    # carrier, but both RDMA halves down
    ("10.0.1.1", NO_CABLE_PORTS, FB97_IFACES, ["its RDMA device(s) rocep1s0f0, roceP2p1s0f0 are Down"]),
    # the same address on two interfaces
    ("10.0.1.1", FB97_PORTS, FB97_IFACES + [FB97_IFACES[0].model_copy(update={"name": "enP2p1s0f0np0"})], ["on 2 interfaces", "ambiguous"]),
])
def test_no_link_can_be_picked_and_the_message_says_what_was_found(address, ports, ifaces, words):
    why = pick_link(address, ports, ifaces)
    assert isinstance(why, str)
    for w in words:
        assert w in why, why


def test_the_socket_side_and_the_rdma_side_of_the_environment():
    assert LinkPick("enp1s0f0np0", ("rocep1s0f0", "roceP2p1s0f0"), 1500).env() == {
        "NCCL_SOCKET_IFNAME": "enp1s0f0np0", "GLOO_SOCKET_IFNAME": "enp1s0f0np0", "NCCL_IB_HCA": "rocep1s0f0,roceP2p1s0f0"}
    assert LinkPick("eth0", (), 1500).env() == {"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0"}


@pytest.mark.parametrize("a, b", [("roceP2p1s0f1", "rocep1s0f1"), ("enP2p1s0f1np1", "enp1s0f1np1"), ("enP7s7", "enP7s7")])
def test_twins_differ_only_in_the_pci_domain(a, b):
    assert twin_key(a) == twin_key(b) == b


@pytest.mark.parametrize("small, full, words", [
    ("ok", "ok", None),
    # small packets pass, full-size ones vanish: an MTU differs along the path
    ("ok", "peer-mtu-smaller", ["with small packets but not with 9000-byte packets", "ip link set <dev> mtu 9000"]),
    # the sender itself refuses: its own route has the smaller MTU
    ("ok", "local-mtu-smaller", ["has MTU 1500, smaller than the link's 9000"]),
    ("unreachable", "unreachable", ["sim-1 cannot reach sim-2 at 10.77.0.2", "(no answer)", "ibdev2netdev"]),
    ("no-route", "no-route", ["(ping: connect: Network is unreachable)"]),
])
def test_a_peer_is_reachable_at_the_links_mtu_or_the_message_says_what_differs(small, full, words):
    why = reach_problem("sim-1", "sim-2", "10.77.0.2", 9000, ping(small), ping(full))
    if words is None:
        assert why is None
    else:
        assert why is not None
        for w in words:
            assert w in why, why


# ---- the link gate's one read per peer (facts.reach_command / parse_reach), recorded on the simulated nodes
def reach(case: str):
    return parse_reach(recording(f"reach-sim-{case}")["stdout"])


def test_the_reach_read_gives_the_route_the_mtu_and_both_pings():
    ok = reach("ok")
    assert (ok.route_dev, ok.mtu, ok.route) == ("eth0", 1500, "10.99.0.12 dev eth0 src 10.99.0.11 uid 0")
    assert ok.small.received == 2 and ok.full.received == 2 and ok.full.rtt_avg_ms == 0.061
    lowered = reach("peer-mtu-smaller")
    assert lowered.small.answered and not lowered.full.answered and lowered.full.reported_mtu is None
    own = reach("own-mtu-smaller")  # sim-2, its eth0 at MTU 1400, told link.mtu 1500
    assert own.mtu == 1500 and own.full.reported_mtu == 1400 and own.full.error == "ping: local error: message too long, mtu=1400"
    gone = reach("unreachable")
    assert not gone.small.answered and not gone.full.answered


def test_a_node_without_ping_is_told_how_to_get_it():
    # constructed: what reach_command prints when the shell cannot find ping (exit code 127)
    out = "route: 10.0.1.2 dev enp1s0f0np0 src 10.0.1.1 uid 0\nmtu: 9000\n== small 127\nsh: 1: ping: not found\n== full 127\nsh: 1: ping: not found\n"
    r = parse_reach(out)
    assert not r.small.answered and "apt install iputils-ping" in r.small.error
    assert "apt install iputils-ping" in peer_problem(PeerReachable(node="spark-1", peer="spark-2", address="10.0.1.2"), out)


@pytest.mark.parametrize("case, node, peer, address, mtu, via, words", [
    ("ok", "sim-1", "sim-2", "10.99.0.12", None, "eth0", None),
    ("peer-mtu-smaller", "sim-1", "sim-2", "10.99.0.12", None, "eth0",
     ["link eth0 to sim-2: sim-1 reaches sim-2 (10.99.0.12) with small packets but not with 1500-byte packets", "ip link set"]),
    ("own-mtu-smaller", "sim-2", "sim-1", "10.99.0.11", 1500, None,
     ["link eth0 to sim-1: the path from sim-2 to sim-1 (10.99.0.11) has MTU 1400, smaller than the link's 1500"]),
    ("unreachable", "sim-1", "sim-2", "10.99.0.99", None, "eth0", ["sim-1 cannot reach sim-2 at 10.99.0.99 over the cluster link"]),
    # the route to the peer leaves by another interface than the cluster link (a management network, Wi-Fi)
    ("ok", "sim-1", "sim-2", "10.99.0.12", None, "enp1s0f0np0",
     ["leaves by eth0, not by the cluster link enp1s0f0np0", "route: 10.99.0.12 dev eth0"]),
])
def test_the_link_gate_names_node_link_and_fix(case, node, peer, address, mtu, via, words):
    check = PeerReachable(node=node, peer=peer, address=address, mtu=mtu, via=via)
    rec = recording(f"reach-sim-{case}")
    why = evaluate(check, rec["exit_code"], rec["stdout"], rec["stderr"])
    if words is None:
        assert why is None and note(check, rec["stdout"]) == "over eth0, MTU 1500 unfragmented, 0.061 ms"
    else:
        assert why is not None
        for w in words:
            assert w in why, why


def test_nccl_auto_reads_the_simulated_nodes_link():
    out = recording("link-sim")["stdout"]
    assert parse_link(out) == ([], SIM_IFACES[:1] + [SIM_IFACES[1].model_copy(update={"altnames": []})])
    assert evaluate(ClusterLink(address="10.99.0.11"), 0, out) is None
    assert note(ClusterLink(address="10.99.0.11"), out) == "eth0 (MTU 1500); no RDMA devices: NCCL over TCP"
    assert "no interface holds the node's address 10.99.0.12" in evaluate(ClusterLink(address="10.99.0.12"), 0, out)


def test_nccl_auto_reads_a_real_sparks_link():
    # ibdev2netdev and ip addr of one Spark (spark-fb97), as LINK_COMMAND prints them
    out = recording("ibdev-real-spark-trailing-prompt")["stdout"] + "=== ip addr\n" + recording("ip-addr-real-spark-static")["stdout"]
    assert link_of(ClusterLink(address="10.0.1.1"), out) == LinkPick("enp1s0f0np0", ("rocep1s0f0", "roceP2p1s0f0"), 1500)
