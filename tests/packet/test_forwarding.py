# SPDX-License-Identifier: Apache-2.0
"""The data plane, packet by packet, through BPF_PROG_TEST_RUN.

Fixture tables in the style of Katran's tester: a description, the packets sent before
(to set up flows), the input, the expected action and the exact expected output bytes.
Expected packets are built by scapy, which computes every checksum from scratch."""
from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import socket
from dataclasses import dataclass, field

import pytest

from xdplb import abi, clock, hashing
from xdplb.libbpf import libbpf
from xdplb.model import Backend, Service
from xdplb.netlink import NextHop

from . import packets as P
from .conftest import LOOPBACK, SNAT_PORTS, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, service

FIRST = 20000  # first SNAT port


def to_backend(sport, dport, flags="S", backend=P.BACKEND, mac=P.BACKEND_MAC, **kw):
    return P.tcp(P.SNAT, sport, backend, dport, flags=flags, smac=P.LB_MAC, dmac=mac, ttl=63, **kw)


def from_backend(dport, flags="SA", backend=P.BACKEND, mac=P.BACKEND_MAC, **kw):
    return P.tcp(backend, 80, P.SNAT, dport, flags=flags, smac=mac, dmac=P.LB_MAC, **kw)


def to_client(dport, flags="SA", client=P.CLIENT, mac=P.CLIENT_MAC, **kw):
    return P.tcp(P.VIP, 80, client, dport, flags=flags, smac=P.LB_MAC, dmac=mac, ttl=63, **kw)


def syn(sport=40000, client=P.CLIENT, mac=P.CLIENT_MAC, **kw):
    return P.tcp(client, sport, P.VIP, 80, flags="S", smac=mac, **kw)


@dataclass
class Case:
    description: str
    input: bytes
    action: int
    output: bytes | None  # None: the input, unchanged
    before: list[bytes] = field(default_factory=list)
    services: list = field(default_factory=lambda: [service(P.BACKEND)])


CASES = [
    Case("new TCP flow: SYN to the VIP goes to the backend from the first SNAT port",
         syn(), XDP_TX, to_backend(FIRST, 80)),
    Case("established flow: the ACK follows the SYN's rewrite",
         P.tcp(P.CLIENT, 40000, P.VIP, 80, flags="A", seq=1001, payload=b"GET / HTTP/1.1\r\n\r\n"),
         XDP_TX, to_backend(FIRST, 80, flags="A", seq=1001, payload=b"GET / HTTP/1.1\r\n\r\n"),
         before=[syn()]),
    Case("reply: the backend's SYN-ACK goes back to the client, from the VIP",
         from_backend(FIRST), XDP_TX, to_client(40000), before=[syn()]),
    Case("reply with data keeps the payload and fixes the checksum",
         from_backend(FIRST, flags="PA", payload=b"HTTP/1.1 200 OK\r\n\r\nhello"),
         XDP_TX, to_client(40000, flags="PA", payload=b"HTTP/1.1 200 OK\r\n\r\nhello"), before=[syn()]),
    Case("second client with the same source port gets the next SNAT port",
         syn(client=P.CLIENT2, mac=P.CLIENT2_MAC), XDP_TX, to_backend(FIRST + 1, 80), before=[syn()]),
    Case("reply to the second client goes to the second client",
         from_backend(FIRST + 1), XDP_TX, to_client(40000, client=P.CLIENT2, mac=P.CLIENT2_MAC),
         before=[syn(), syn(client=P.CLIENT2, mac=P.CLIENT2_MAC)]),
    Case("reply to the first client still goes to the first client",
         from_backend(FIRST), XDP_TX, to_client(40000),
         before=[syn(), syn(client=P.CLIENT2, mac=P.CLIENT2_MAC)]),
    Case("IPv4 options are kept and the header checksum stays right",
         syn(options=[P.IPOption_RR(routers=["0.0.0.0"])]), XDP_TX,
         to_backend(FIRST, 80, options=[P.IPOption_RR(routers=["0.0.0.0"])])),
    Case("UDP datagram with a checksum",
         P.udp(P.CLIENT, 5000, P.VIP, 80), XDP_TX,
         P.udp(P.SNAT, FIRST, P.BACKEND, 80, smac=P.LB_MAC, dmac=P.BACKEND_MAC, ttl=63),
         services=[service(P.BACKEND, proto="udp")]),
    Case("UDP datagram without a checksum keeps checksum 0",
         P.udp(P.CLIENT, 5000, P.VIP, 80, zero_checksum=True), XDP_TX,
         P.udp(P.SNAT, FIRST, P.BACKEND, 80, smac=P.LB_MAC, dmac=P.BACKEND_MAC, ttl=63, zero_checksum=True),
         services=[service(P.BACKEND, proto="udp")]),
    Case("UDP reply goes back to the client",
         P.udp(P.BACKEND, 80, P.SNAT, FIRST, smac=P.BACKEND_MAC, payload=b"pong"), XDP_TX,
         P.udp(P.VIP, 80, P.CLIENT, 5000, smac=P.LB_MAC, dmac=P.CLIENT_MAC, ttl=63, payload=b"pong"),
         before=[P.udp(P.CLIENT, 5000, P.VIP, 80)], services=[service(P.BACKEND, proto="udp")]),
    Case("backend behind another interface: XDP_REDIRECT with that interface's MACs",
         syn(), XDP_REDIRECT,
         P.tcp(P.SNAT, FIRST, "10.9.0.1", 80, smac="02:00:00:00:00:07", dmac=P.ROUTER_MAC, ttl=63),
         services=[service("10.9.0.1")]),
    Case("allow-list: an allowed client is balanced",
         syn(), XDP_TX, to_backend(FIRST, 80), services=[service(P.BACKEND, clients=["10.0.1.0/28"])]),
    Case("allow-list: any other client is dropped",
         syn(), XDP_DROP, None, services=[service(P.BACKEND, clients=["10.0.1.16/28"])]),
    Case("allow-list: any other client's segment of no flow is dropped too (the kernel would reset)",
         P.tcp(P.CLIENT, 40000, P.VIP, 80, flags="A"), XDP_DROP, None,
         services=[service(P.BACKEND, clients=["10.0.1.16/28"])]),
    Case("allow-list with not_allowed = pass: any other client passes to the kernel untouched",
         syn(), XDP_PASS, None,
         services=[dataclasses.replace(service(P.BACKEND, clients=["10.0.1.16/28"]), not_allowed="pass")]),
    Case("a second service on another port has its own backend",
         P.tcp(P.CLIENT, 40000, P.VIP, 8080, flags="S"), XDP_TX,
         P.tcp(P.SNAT, FIRST, P.BACKEND2, 80, flags="S", smac=P.LB_MAC, dmac=P.BACKEND2_MAC, ttl=63),
         services=[service(P.BACKEND), service(P.BACKEND2, port=8080)]),
    Case("a service on another VIP has its own backend",
         P.tcp(P.CLIENT, 40000, "10.0.0.3", 80, flags="S"), XDP_TX,
         P.tcp(P.SNAT, FIRST, P.BACKEND2, 80, flags="S", smac=P.LB_MAC, dmac=P.BACKEND2_MAC, ttl=63),
         services=[service(P.BACKEND), service(P.BACKEND2, vip="10.0.0.3")]),
    Case("a retransmitted SYN follows the first one's rewrite (same SNAT port)",
         syn(), XDP_TX, to_backend(FIRST, 80), before=[syn()]),
    Case("a SYN on a closed flow (client reusing its port) is balanced afresh, new SNAT port",
         syn(), XDP_TX, to_backend(FIRST + 1, 80),
         before=[syn(), P.tcp(P.CLIENT, 40000, P.VIP, 80, flags="FA")]),
    # Everything below passes to the kernel byte for byte.
    Case("TCP to another port of the VIP", P.tcp(P.CLIENT, 40000, P.VIP, 22), XDP_PASS, None),
    Case("TCP to port 80 of another address", P.tcp(P.CLIENT, 40000, "10.0.0.9", 80), XDP_PASS, None),
    Case("UDP to port 80 when only TCP is balanced", P.udp(P.CLIENT, 5000, P.VIP, 80), XDP_PASS, None),
    Case("ICMP echo to the VIP is the kernel's to answer",
         P.build(P.Ether(src=P.CLIENT_MAC, dst=P.LB_MAC) / P.IP(src=P.CLIENT, dst=P.VIP) / P.ICMP()),
         XDP_PASS, None),
    Case("ARP", P.build(P.Ether(src=P.CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / P.ARP(psrc=P.CLIENT, pdst=P.VIP)),
         XDP_PASS, None),
    Case("IPv6", P.build(P.Ether(src=P.CLIENT_MAC, dst=P.LB_MAC) / P.IPv6() / P.TCP(dport=80)), XDP_PASS, None),
    Case("a TCP segment of an unknown flow (not a SYN)", P.tcp(P.CLIENT, 40000, P.VIP, 80, flags="A"),
         XDP_PASS, None),
    Case("a reply-looking packet of no flow", from_backend(FIRST), XDP_PASS, None),
    Case("TTL 1: the kernel decides", syn(ttl=1), XDP_PASS, None),
    Case("a later fragment has no ports to match: the kernel reassembles or drops it",
         P.build(P.Ether(src=P.CLIENT_MAC, dst=P.LB_MAC) / P.IP(src=P.CLIENT, dst=P.VIP, proto=6, frag=100)
                 / (b"x" * 40)), XDP_PASS, None),
    Case("a first fragment for the service is dropped (it could not be balanced whole)",
         P.build(P.Ether(src=P.CLIENT_MAC, dst=P.LB_MAC) / P.IP(src=P.CLIENT, dst=P.VIP, flags="MF")
                 / P.TCP(sport=40000, dport=80, flags="S")), XDP_DROP, None),
    Case("no backend with weight: passes (the kernel resets), counted",
         syn(), XDP_PASS, None, services=[service(P.BACKEND, weights=[0])]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_fixture(harness, case):
    harness.configure(case.services)
    for pkt in case.before:
        action, _ = harness.run(pkt)
        assert action in (XDP_TX, XDP_REDIRECT, XDP_PASS)
    action, out = harness.run(case.input)
    assert action == case.action
    expected = case.input if case.output is None else case.output
    if out != expected:
        # scapy's diff names the field that differs
        P.Ether(out).show()
        P.Ether(expected).show()
    assert out == expected


def test_counters_say_why(harness):
    harness.configure([service(P.BACKEND)])
    harness.run(syn())
    harness.run(P.tcp(P.CLIENT, 40001, P.VIP, 80, flags="A"))
    harness.run(syn(ttl=1, sport=40002))
    harness.run(P.build(P.Ether(src=P.CLIENT_MAC, dst=P.LB_MAC) / P.IP(src=P.CLIENT, dst=P.VIP, flags="MF")
                        / P.TCP(sport=40003, dport=80, flags="S")))
    harness.run(P.tcp(P.CLIENT, 40000, P.VIP, 80)[:40])  # truncated inside the TCP header
    counters = harness.dp.counters()
    assert counters["new_flow"] == 1
    assert counters["tx"] == 1
    assert counters["no_flow"] == 1
    assert counters["ttl_expired"] == 1
    assert counters["fragment"] == 1
    assert counters["drop"] == 1
    assert counters["malformed"] == 1
    assert counters["pass"] == 3
    svc_id = harness.dp.service_ids()[f"{P.VIP}:80/tcp"]
    traffic = harness.dp.traffic("service", svc_id)
    assert (traffic.packets, traffic.new_flows) == (1, 1)
    assert traffic.bytes == len(syn())


@pytest.mark.parametrize("not_allowed", ["drop", "pass"])
def test_clients_outside_the_allow_list_are_counted(harness, not_allowed):
    """Dropped by default (the host's own stack never sees them), passed on request;
    counted not_allowed either way, and the allowed client is balanced."""
    svc = dataclasses.replace(service(P.BACKEND, clients=["10.0.1.16/28"]), not_allowed=not_allowed)
    harness.configure([svc])
    assert harness.dp.services()[0].not_allowed == not_allowed
    action = XDP_DROP if not_allowed == "drop" else XDP_PASS
    assert harness.run(syn()) == (action, syn())
    allowed = syn(client="10.0.1.17", sport=40001)
    assert harness.run(allowed)[0] == XDP_TX
    counters = harness.dp.counters()
    assert counters["not_allowed"] == 1 and counters["new_flow"] == 1 and counters["no_flow"] == 0
    assert (counters["drop"], counters["pass"]) == ((1, 0) if not_allowed == "drop" else (0, 1))


def test_backend_follows_maglev_ring_and_flow_hash(harness):
    """The backend of a new flow is the ring slot picked by the flow hash that
    xdplb.hashing mirrors, for many flows over three backends."""
    backends = [P.BACKEND, P.BACKEND2, "10.0.0.103"]
    harness.configure([service(*backends)])
    svc_id = harness.dp.service_ids()[f"{P.VIP}:80/tcp"]
    ring = harness.dp.ring(svc_id)
    by_id = {i: addr.split(":")[0] for (_, addr), i in harness.dp.backend_ids().items()}
    seen = set()
    for sport in range(41000, 41060):
        action, out = harness.run(syn(sport=sport))
        assert action == XDP_TX
        h = hashing.flow_hash(P.CLIENT, sport, P.VIP, 80, socket.IPPROTO_TCP, harness.settings.hash_seed)
        expected = by_id[ring[h % len(ring)]]
        assert P.Ether(out)[P.IP].dst == expected
        seen.add(expected)
    assert seen == set(backends)


def test_existing_flow_stays_when_backends_change(harness):
    harness.configure([service(P.BACKEND)])
    harness.run(syn())
    harness.configure([service(P.BACKEND2)])
    ack = P.tcp(P.CLIENT, 40000, P.VIP, 80, flags="A", seq=1001)
    action, out = harness.run(ack)
    assert action == XDP_TX
    assert out == to_backend(FIRST, 80, flags="A", seq=1001)
    action, out = harness.run(syn(sport=40001))
    assert P.Ether(out)[P.IP].dst == P.BACKEND2


def test_weight_zero_takes_no_new_flows(harness):
    harness.configure([service(P.BACKEND, P.BACKEND2, weights=[1, 0])])
    for sport in range(42000, 42040):
        action, out = harness.run(syn(sport=sport))
        assert action == XDP_TX
        assert P.Ether(out)[P.IP].dst == P.BACKEND


def test_snat_ports_cycle_instead_of_reusing(harness):
    """Closed flows do not give their SNAT port back at once: the next flows take the
    following ports, which keeps backends' TIME_WAIT entries from being hit."""
    harness.configure([service(P.BACKEND)])
    ports = []
    for sport in range(43000, 43010):
        _, out = harness.run(syn(sport=sport))
        ports.append(P.Ether(out)[P.TCP].sport)
        harness.run(P.tcp(P.CLIENT, sport, P.VIP, 80, flags="RA"))
    assert ports == list(range(FIRST, FIRST + 10))


def test_icmp_fragmentation_needed_reaches_the_client(harness):
    """A router on the backend side says our packet to the backend was too big; the
    client gets the error about its own packet, from the VIP."""
    harness.configure([service(P.BACKEND)])
    harness.run(syn())
    sent = P.Ether(to_backend(FIRST, 80, flags="A", seq=1001, payload=b"x" * 20))[P.IP]
    error = P.build(P.Ether(src=P.BACKEND_MAC, dst=P.LB_MAC)
                    / P.IP(src="10.0.0.254", dst=P.SNAT, ttl=64, id=7)
                    / P.ICMP(type=3, code=4, nexthopmtu=1400) / bytes(sent)[:28])
    original = P.Ether(P.tcp(P.CLIENT, 40000, P.VIP, 80, flags="A", seq=1001, payload=b"x" * 20))[P.IP]
    # The quoted packet carries the TTL it had when the router saw it.
    quoted = P.IP(bytes(original))
    quoted.ttl = 63
    del quoted.chksum
    expected = P.build(P.Ether(src=P.LB_MAC, dst=P.CLIENT_MAC)
                       / P.IP(src=P.VIP, dst=P.CLIENT, ttl=64, id=7)
                       / P.ICMP(type=3, code=4, nexthopmtu=1400) / bytes(P.IP(bytes(quoted)))[:28])
    action, out = harness.run(error)
    assert action == XDP_TX
    assert out == expected
    assert harness.dp.counters()["icmp_translated"] == 1


def test_icmp_error_with_full_quote_fixes_the_quoted_tcp_checksum(harness):
    harness.configure([service(P.BACKEND)])
    harness.run(syn())
    sent = bytes(P.Ether(to_backend(FIRST, 80, flags="A", seq=1001))[P.IP])
    error = P.build(P.Ether(src=P.BACKEND_MAC, dst=P.LB_MAC) / P.IP(src="10.0.0.254", dst=P.SNAT, id=9)
                    / P.ICMP(type=11, code=0) / sent)
    action, out = harness.run(error)
    assert action == XDP_TX
    quoted = P.Ether(out)[P.ICMP].payload
    inner = P.IP(bytes(quoted))
    assert (inner.src, inner.dst, inner[P.TCP].sport, inner[P.TCP].dport) == (P.CLIENT, P.VIP, 40000, 80)
    recomputed = P.IP(bytes(inner))
    del recomputed.chksum
    del recomputed[P.TCP].chksum
    recomputed = P.IP(bytes(recomputed))
    assert inner.chksum == recomputed.chksum
    assert inner[P.TCP].chksum == recomputed[P.TCP].chksum
    outer = P.Ether(out)
    check = P.Ether(bytes(out))
    del check[P.IP].chksum
    del check[P.ICMP].chksum
    check = P.Ether(bytes(check))
    assert outer[P.IP].chksum == check[P.IP].chksum
    assert outer[P.ICMP].chksum == check[P.ICMP].chksum


def test_icmp_error_about_no_flow_passes(harness):
    harness.configure([service(P.BACKEND)])
    sent = bytes(P.Ether(to_backend(FIRST, 80))[P.IP])
    error = P.build(P.Ether(src=P.BACKEND_MAC, dst=P.LB_MAC) / P.IP(src="10.0.0.254", dst=P.SNAT)
                    / P.ICMP(type=3, code=4) / sent[:28])
    action, out = harness.run(error)
    assert (action, out) == (XDP_PASS, error)


def test_counters_index_is_the_abi(harness):
    assert len(harness.dp.counters()) == abi.Counter.MAX


def test_new_backends_start_their_snat_search_at_random_places(harness):
    harness.sync([service(P.BACKEND, P.BACKEND2, "10.0.0.103")])
    cursors = set()
    for backend_id in harness.dp.backend_ids().values():
        value = ctypes.c_uint32()
        harness.dp.lib.lookup(harness.dp.fds["xdplb_port_cur"], ctypes.c_uint32(harness.dp.cursor_id(backend_id)),
                              value)
        cursors.add(value.value)
    assert len(cursors) > 1


def test_a_backend_added_again_skips_the_ports_its_old_flows_hold(harness):
    """Its new cursor starts where the old one did; the ports of its still-live flows
    form a run, which the search jumps past instead of giving up after a few tries."""
    harness.configure([service(P.BACKEND)])
    for sport in range(44000, 44020):
        harness.run(syn(sport=sport))
    harness.configure([service(P.BACKEND2)])
    harness.configure([service(P.BACKEND)])
    action, out = harness.run(syn(sport=45000))
    assert action == XDP_TX
    assert P.Ether(out)[P.TCP].sport == FIRST + 1 + 1000 // abi.SNAT_PORT_TRIES  # 20000-20999 in jumps
    assert harness.dp.counters()["table_full"] == 0


def test_a_backend_added_again_continues_its_snat_ports_where_it_stopped(harness):
    """The backend still holds TIME_WAIT entries for the ports it was last given: a
    fresh cursor would collide with them, so the removal leaves a note of where this
    one stood, and the new backend entry starts there."""
    harness.configure([service(P.BACKEND, P.BACKEND2)])
    ports = []
    for sport in range(44000, 44030):
        action, out = harness.run(syn(sport=sport))
        if P.Ether(out)[P.IP].dst == P.BACKEND:
            ports.append(P.Ether(out)[P.TCP].sport)
    assert ports == list(range(FIRST, FIRST + len(ports))) and ports
    harness.sync([service(P.BACKEND2)])
    harness.sync([service(P.BACKEND2, P.BACKEND)])
    backend_id = harness.dp.backend_ids()[(0, f"{P.BACKEND}:80")]
    cursor = ctypes.c_uint32()
    harness.dp.lib.lookup(harness.dp.fds["xdplb_port_cur"], ctypes.c_uint32(harness.dp.cursor_id(backend_id)),
                          cursor)
    assert FIRST + cursor.value % (SNAT_PORTS[1] - SNAT_PORTS[0] + 1) == ports[-1] + 1
    for sport in range(45000, 45030):
        action, out = harness.run(syn(sport=sport))
        if P.Ether(out)[P.IP].dst == P.BACKEND:
            assert (action, P.Ether(out)[P.TCP].sport) == (XDP_TX, ports[-1] + 1)
            break
    else:
        pytest.fail("no new flow went to the re-added backend")


def test_a_snat_pool_alternates_addresses_and_replies_find_their_flow(harness):
    """Two SNAT addresses: consecutive flows to one backend take address 1, address 2,
    then the next port on each, and a reply to either address reaches its client."""
    pool = dataclasses.replace(harness.settings, snat_addrs=[ipaddress.IPv4Address(P.SNAT),
                                                             ipaddress.IPv4Address(P.SNAT2)])
    harness.sync(settings=pool)
    harness.configure([service(P.BACKEND)])
    sources = [(P.SNAT, FIRST), (P.SNAT2, FIRST), (P.SNAT, FIRST + 1), (P.SNAT2, FIRST + 1)]
    for i, (addr, port) in enumerate(sources):
        action, out = harness.run(syn(sport=41000 + i))
        expected = P.tcp(addr, port, P.BACKEND, 80, flags="S", smac=P.LB_MAC, dmac=P.BACKEND_MAC, ttl=63)
        assert (action, out) == (XDP_TX, expected), i
    reply = P.tcp(P.BACKEND, 80, P.SNAT2, FIRST, flags="SA", smac=P.BACKEND_MAC, dmac=P.LB_MAC)
    assert harness.run(reply) == (XDP_TX, to_client(41001))
    reply = P.tcp(P.BACKEND, 80, P.SNAT, FIRST + 1, flags="SA", smac=P.BACKEND_MAC, dmac=P.LB_MAC)
    assert harness.run(reply) == (XDP_TX, to_client(41002))
    # A backend removed and added again goes on with the pool where it stopped.
    harness.sync([service(P.BACKEND2)])
    harness.sync([service(P.BACKEND)])
    action, out = harness.run(syn(sport=41010))
    assert (action, out) == (XDP_TX, P.tcp(P.SNAT, FIRST + 2, P.BACKEND, 80, flags="S", smac=P.LB_MAC,
                                           dmac=P.BACKEND_MAC, ttl=63))


def test_a_backend_in_two_services_takes_its_sources_from_one_cursor(harness):
    """Same backend address and port behind two VIP ports: one tuple space, so one
    SNAT sequence (two cursors would hand out the same ports and reuse each other's
    TIME_WAIT tuples after a restart). UDP to the same endpoint is another space."""
    harness.configure([service(P.BACKEND), service(P.BACKEND, port=81), service(P.BACKEND, proto="udp")])
    ids = harness.dp.backend_ids()
    tcp_cursors = {harness.dp.cursor_id(ids[(svc, f"{P.BACKEND}:80")]) for svc in (0, 1)}
    assert len(tcp_cursors) == 1 and harness.dp.cursor_id(ids[(2, f"{P.BACKEND}:80")]) not in tcp_cursors
    assert harness.run(syn(sport=42000)) == (XDP_TX, to_backend(FIRST, 80))
    to_81 = P.tcp(P.CLIENT, 42001, P.VIP, 81, flags="S", smac=P.CLIENT_MAC)
    assert harness.run(to_81) == (XDP_TX, to_backend(FIRST + 1, 80))
    # The service on port 80 goes; the one on 81 keeps the shared sequence.
    harness.sync([service(P.BACKEND, port=81)])
    to_81 = P.tcp(P.CLIENT, 42002, P.VIP, 81, flags="S", smac=P.CLIENT_MAC)
    assert harness.run(to_81) == (XDP_TX, to_backend(FIRST + 2, 80))


def test_flows_follow_a_backends_new_next_hop(harness):
    """A backend rebuilt with the same address and a new MAC: once the control plane
    writes the new next hop, established flows and new ones use it."""
    harness.configure([service(P.BACKEND)])
    harness.run(syn())
    moved = "02:00:00:00:00:c1"
    hop = NextHop(LOOPBACK, moved, P.LB_MAC)
    assert harness.move_hop(P.BACKEND, hop) == [
        f"lo: backend {P.BACKEND}:80 next hop {P.BACKEND_MAC} (if {LOOPBACK}) -> {moved} (if {LOOPBACK})"]
    assert harness.move_hop(P.BACKEND, hop) == []
    ack = P.tcp(P.CLIENT, 40000, P.VIP, 80, flags="A", seq=1001)
    assert harness.run(ack) == (XDP_TX, to_backend(FIRST, 80, flags="A", seq=1001, mac=moved))
    assert harness.run(syn(sport=40001)) == (XDP_TX, to_backend(FIRST + 1, 80, mac=moved))
    # Rewriting the settings (here: tracing off) keeps the generation the flows compare with.
    harness.dp.set_trace(False)
    assert harness.run(ack) == (XDP_TX, to_backend(FIRST, 80, flags="A", seq=1001, mac=moved))


def test_a_retired_backends_flows_keep_their_own_next_hop(harness):
    """Once its backend entry is reused by another backend, a flow keeps the next hop
    it was created with instead of following the newcomer's."""
    harness.configure([service(P.BACKEND)])
    harness.run(syn())
    old_id = harness.dp.backend_ids()[(0, f"{P.BACKEND}:80")]
    harness.sync([service(P.BACKEND2)])
    harness.sync([service(P.BACKEND2, "10.0.0.103")])
    assert harness.dp.backend_ids()[(0, "10.0.0.103:80")] == old_id
    # The newcomer's next hop changes: older flows look their backend entry up again.
    assert harness.move_hop("10.0.0.103", NextHop(LOOPBACK, "02:00:00:00:00:c3", P.LB_MAC))
    ack = P.tcp(P.CLIENT, 40000, P.VIP, 80, flags="A", seq=1001)
    assert harness.run(ack) == (XDP_TX, to_backend(FIRST, 80, flags="A", seq=1001))


def _client_slot(harness) -> int:
    [index] = [i for i, _, _, _, flags in harness.dp.flow_table().slots() if not flags & abi.FlowFlags.REPLY]
    return index


def _stamp(harness, index: int, ticks: int) -> None:
    with harness.dp.flow_table() as table:
        at = index * ctypes.sizeof(abi.FlowSlot) + abi.FlowSlot.last_seen.offset
        table._map[at:at + 4] = (ticks % (1 << 32)).to_bytes(4, "little")


def test_idle_flows_expire_on_the_clock_the_control_plane_reads(harness):
    """The data plane stamps flows with jiffies >> tick_shift and the control plane reads
    the same clock: a flow idle just under its timeout is kept, just over is forgotten
    (its next ACK finds no flow and goes to the kernel, which answers with a reset)."""
    harness.configure([service(P.BACKEND)])
    cfg = abi.Config()
    libbpf().lookup(harness.dp.fds["xdplb_config"], ctypes.c_uint32(0), cfg)
    assert cfg.tcp_expiry_ticks > clock.to_ticks(harness.settings.tcp_timeout_s, clock.jiffy_ns(), cfg.tick_shift)
    harness.run(syn(sport=44000))
    ack = P.tcp(P.CLIENT, 44000, P.VIP, 80, flags="A", smac=P.CLIENT_MAC)
    harness.run(ack)  # the handshake completes: the established timeout applies
    index = _client_slot(harness)
    now = clock.now_ticks(cfg.tick_shift)
    [(_, stamped, _, _, _)] = [s for s in harness.dp.flow_table().slots() if s[0] == index]
    assert abs(clock.ticks_since(now, stamped)) <= 1

    _stamp(harness, index, now - cfg.tcp_expiry_ticks + 5)
    action, out = harness.run(ack)
    assert action == XDP_TX and P.Ether(out)[P.TCP].sport == FIRST
    assert list(harness.dp.active_flows().values()) == [1]

    _stamp(harness, index, now - cfg.tcp_expiry_ticks - 5)
    assert harness.dp.active_flows() == {}
    action, out = harness.run(ack)
    assert (action, out) == (XDP_PASS, ack)
    assert harness.dp.counters()["no_flow"] == 1


def test_hundreds_of_services_each_reach_their_backend(harness):
    """The service table holds them all (linear probing from service_hash, as the control
    plane laid it out); removing some swaps in a table without them: they take no new
    flows, and every established flow carries on."""
    def many(n):
        # Each on its own backend port: the harness starts every SNAT cursor at the first
        # port, and services sharing one backend endpoint would share its ports.
        return [Service(ipaddress.IPv4Address("10.0.2.0") + i // 2, 80 + i % 2, "tcp",
                        [Backend(ipaddress.IPv4Address(P.BACKEND if i % 3 else P.BACKEND2), 8000 + i)], [], 13)
                for i in range(n)]
    services = many(300)
    # The flows below stay in their handshake for the whole test, which on a loaded
    # machine can outlast the default tcp_syn timeout (5 s).
    harness.sync(settings=dataclasses.replace(harness.settings, tcp_syn_timeout_s=120))
    harness.configure(services)
    for i, svc in enumerate(services):
        action, out = harness.run(P.tcp(P.CLIENT, 41000 + i, str(svc.vip), svc.port, flags="S", smac=P.CLIENT_MAC))
        assert action == XDP_TX and P.Ether(out)[P.IP].dst == str(svc.backends[0].addr), svc.name
    # Every fourth goes; port 81 stays in use by the others, so packets for it are looked at.
    kept = [svc for i, svc in enumerate(services) if i % 4 != 3]
    harness.configure(kept)
    for i, svc in enumerate(services):
        ack = P.tcp(P.CLIENT, 41000 + i, str(svc.vip), svc.port, flags="A", smac=P.CLIENT_MAC)
        action, out = harness.run(ack)
        # Established flows keep going, those of removed services too (until they expire).
        assert action == XDP_TX and P.Ether(out)[P.IP].dst == str(svc.backends[0].addr), svc.name
        fresh = P.tcp(P.CLIENT2, 41000 + i, str(svc.vip), svc.port, flags="S", smac=P.CLIENT2_MAC)
        action, out = harness.run(fresh)
        assert action == (XDP_PASS if i % 4 == 3 else XDP_TX), svc.name
