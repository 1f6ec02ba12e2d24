# SPDX-License-Identifier: Apache-2.0
"""The IPv6 path (bpf/ipv6.h): dsr services, extension headers, ICMPv6 and everything
that must pass untouched. Frames are built by scapy, which computes every length and
checksum: dsr changes only the MACs, so the expected frame is the sent one with new
MACs, byte for byte."""
from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6ND_RA, ICMPv6PacketTooBig, IPv6,
                                IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting)
from scapy.layers.inet import TCP, UDP
from scapy.layers.l2 import Ether
from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from xdplb import abi, hashing, layout, namespaces
from xdplb.model import Backend, Service
from xdplb.netlink import NextHop

from . import packets as P
from .conftest import LOOPBACK, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX

VIP6 = "fd00::2"
CLIENT6 = "fd00:1::10"
BACKEND6 = "fd00::101"
BACKEND6_2 = "fd00::102"
MACS = {P.BACKEND_MAC: BACKEND6, P.BACKEND2_MAC: BACKEND6_2}


def v6service(*backends: str, port: int = 80, proto: str = "tcp", forward: str = "dsr") -> Service:
    return Service(ipaddress.IPv6Address(VIP6), port, proto,
                   [Backend(ipaddress.IPv6Address(b), port) for b in backends or (BACKEND6,)], forward=forward)


@pytest.fixture
def h6(harness):
    harness.hops[BACKEND6] = NextHop(LOOPBACK, P.BACKEND_MAC, P.LB_MAC)
    harness.hops[BACKEND6_2] = NextHop(LOOPBACK, P.BACKEND2_MAC, P.LB_MAC)
    return harness


def frame(*layers, src=CLIENT6, dst=VIP6, hlim=64, smac=P.CLIENT_MAC) -> bytes:
    pkt = Ether(src=smac, dst=P.LB_MAC) / IPv6(src=src, dst=dst, hlim=hlim)
    for layer in layers:
        pkt = pkt / layer
    return P.build(pkt)


def syn(sport=40000, flags="S", *ext, dport=80, src=CLIENT6) -> bytes:
    return frame(*ext, TCP(sport=sport, dport=dport, flags=flags, seq=1000, window=64240), src=src)


def dsr(sent: bytes, mac: str = P.BACKEND_MAC) -> bytes:
    return bytes.fromhex(mac.replace(":", "")) + bytes.fromhex(P.LB_MAC.replace(":", "")) + sent[12:]


def flows6(h) -> dict:
    lib = h.dp.lib
    fd = h.dp.fds["xdplb_flows6"]
    out = {}
    for key in list(lib.keys(fd, abi.FlowKey6)):
        value = abi.Flow6()
        if lib.lookup(fd, key, value):
            out[(str(layout.from_words(key.saddr)), socket.ntohs(key.sport))] = value
    return out


def test_a_syn_to_an_ipv6_dsr_service_reaches_its_backend_with_only_the_macs_changed(h6):
    h6.configure([v6service()])
    sent = syn()
    action, out = h6.run(sent)
    assert (action, out) == (XDP_TX, dsr(sent))
    flow = flows6(h6)[(CLIENT6, 40000)]
    assert (str(layout.from_words(flow.daddr)), flow.flags) == (BACKEND6, abi.FlowFlags.HANDSHAKE)
    # The handshake's last ACK, data and the FIN follow the flow, and close it.
    for flags in ("A", "PA", "FA"):
        sent = syn(flags=flags)
        assert h6.run(sent) == (XDP_TX, dsr(sent))
    assert flows6(h6)[(CLIENT6, 40000)].flags == abi.FlowFlags.CLOSING | abi.FlowFlags.FIN_CLIENT
    counters = h6.dp.counters()
    assert (counters["new_flow"], counters["tx"], counters["recovered"]) == (1, 4, 0)
    svc_id = h6.dp.service_ids()[f"[{VIP6}]:80/tcp"]
    assert h6.dp.traffic("service", svc_id).packets == 4


def test_ipv6_services_are_read_back_from_the_maps_and_removed(h6):
    wanted = [v6service(BACKEND6, BACKEND6_2), P_service4 := Service(ipaddress.IPv4Address(P.VIP), 80, "tcp",
                                                                     [Backend(ipaddress.IPv4Address(P.BACKEND), 80)])]
    h6.configure(wanted)
    assert [s.name for s in h6.dp.services()] == [f"{P.VIP}:80/tcp", f"[{VIP6}]:80/tcp"]
    assert h6.dp.services()[1].backends == wanted[0].backends
    assert not h6.sync(wanted)  # read back exactly: nothing to change
    h6.configure([P_service4])
    assert [s.name for s in h6.dp.services()] == [f"{P.VIP}:80/tcp"]
    assert list(h6.dp.lib.keys(h6.dp.fds["xdplb_services6"], abi.ServiceKey6)) == []
    sent = syn()
    assert h6.run(sent) == (XDP_PASS, sent)


def test_maglev_spreads_ipv6_flows_as_the_python_twin_predicts(h6):
    h6.configure([v6service(BACKEND6, BACKEND6_2)])
    svc_id = h6.dp.service_ids()[f"[{VIP6}]:80/tcp"]
    ring = h6.dp.ring(svc_id)
    by_id = {i: str(layout.from_words(b.addr)) for i, b in h6.dp._backend_entries().items()}
    seen = set()
    for sport in range(41000, 41064):
        action, out = h6.run(syn(sport))
        assert action == XDP_TX
        expected = by_id[ring[hashing.flow_hash6(CLIENT6, sport, VIP6, 80, socket.IPPROTO_TCP,
                                                 h6.settings.hash_seed) % len(ring)]]
        assert MACS[":".join(f"{x:02x}" for x in out[:6])] == expected
        seen.add(expected)
    assert seen == {BACKEND6, BACKEND6_2}


def test_udp_over_ipv6(h6):
    h6.configure([v6service(port=53, proto="udp")])
    sent = frame(UDP(sport=5353, dport=53) / b"query")
    assert h6.run(sent) == (XDP_TX, dsr(sent))


@pytest.mark.parametrize("ext", [
    [IPv6ExtHdrHopByHop()],
    [IPv6ExtHdrDestOpt()],
    [IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(segleft=0, addresses=[VIP6])],
    [IPv6ExtHdrFragment(offset=0, m=0, id=7)],  # atomic fragment: a whole packet
], ids=["hop-by-hop", "destination options", "three headers", "atomic fragment"])
def test_extension_headers_are_skipped_and_forwarded_as_sent(h6, ext):
    h6.configure([v6service()])
    sent = syn(40000, "S", *ext)
    assert h6.run(sent) == (XDP_TX, dsr(sent))


@pytest.mark.parametrize("ext,counter", [
    ([IPv6ExtHdrRouting(segleft=1, addresses=["fd00::99"])], "pass"),  # not the final destination yet
    ([IPv6ExtHdrFragment(offset=8, m=0, id=7)], "pass"),  # a later fragment: no ports
    ([IPv6ExtHdrDestOpt()] * (abi.V6_EXT_HEADERS + 1), "pass"),  # more headers than walked
], ids=["segments left", "later fragment", "too many headers"])
def test_packets_the_balancer_cannot_place_pass_untouched(h6, ext, counter):
    h6.configure([v6service()])
    sent = syn(40000, "S", *ext)
    assert h6.run(sent) == (XDP_PASS, sent)
    assert h6.dp.counters()[counter] == 1
    assert flows6(h6) == {}


def test_a_first_fragment_of_a_service_packet_is_dropped_and_counted(h6):
    h6.configure([v6service()])
    action, _ = h6.run(syn(40000, "S", IPv6ExtHdrFragment(offset=0, m=1, id=7)))
    assert action == XDP_DROP
    assert h6.dp.counters()["fragment"] == 1


@pytest.mark.parametrize("pkt", [
    lambda: frame(ICMPv6ND_NS(tgt=VIP6), dst="ff02::1:ff00:2", hlim=255),
    lambda: frame(ICMPv6ND_RA(), src="fe80::1", dst="ff02::1", hlim=255),
    lambda: frame(ICMPv6EchoRequest(id=1, seq=1)),
    lambda: syn(dport=81),  # a port no service uses
    lambda: syn(40000, "S").replace(bytes(ipaddress.IPv6Address(VIP6).packed),
                                    bytes(ipaddress.IPv6Address("fd00::3").packed)),  # another address
    lambda: syn(40000, "S", dport=80)[:-4],  # truncated: shorter than its payload length
], ids=["neighbour solicitation", "router advertisement", "echo", "other port", "other address", "truncated"])
def test_traffic_not_for_a_service_passes_untouched(h6, pkt):
    h6.configure([v6service()])
    sent = pkt()
    assert h6.run(sent) == (XDP_PASS, sent)
    assert flows6(h6) == {}


def test_hop_limit_one_passes_to_the_kernel(h6):
    h6.configure([v6service()])
    sent = frame(TCP(sport=40000, dport=80, flags="S"), hlim=1)
    assert h6.run(sent) == (XDP_PASS, sent)
    assert h6.dp.counters()["ttl_expired"] == 1


def test_a_packet_too_big_about_a_flow_is_relayed_to_its_backend(h6):
    h6.configure([v6service(BACKEND6, BACKEND6_2)])
    action, out = h6.run(syn(40000))
    mac = ":".join(f"{x:02x}" for x in out[:6])
    # What a router on the way back says about the backend's reply (from the VIP).
    reply = IPv6(src=VIP6, dst=CLIENT6, hlim=63) / TCP(sport=80, dport=40000, flags="SA")
    error = frame(ICMPv6PacketTooBig(mtu=1280) / bytes(reply)[:120], src="fd00:9::1", dst=VIP6)
    assert h6.run(error) == (XDP_TX, dsr(error, mac))
    assert h6.dp.counters()["icmp_translated"] == 1
    # About a flow the table does not know: the kernel's.
    stranger = IPv6(src=VIP6, dst=CLIENT6, hlim=63) / TCP(sport=80, dport=40999, flags="SA")
    unknown = frame(ICMPv6PacketTooBig(mtu=1280) / bytes(stranger), src="fd00:9::1", dst=VIP6)
    assert h6.run(unknown) == (XDP_PASS, unknown)


def test_an_ack_without_a_flow_is_recovered_where_the_ring_points(h6):
    h6.configure([v6service()])
    sent = syn(flags="A")
    assert h6.run(sent) == (XDP_TX, dsr(sent))
    assert h6.dp.counters()["recovered"] == 1


def test_a_retired_backends_flows_keep_reaching_it_and_new_flows_do_not(h6):
    h6.configure([v6service(BACKEND6, BACKEND6_2)])
    owners = {}
    for sport in range(42000, 42016):
        _, out = h6.run(syn(sport))
        owners[sport] = MACS[":".join(f"{x:02x}" for x in out[:6])]
    h6.configure([v6service(BACKEND6_2)])
    for sport, owner in owners.items():
        sent = syn(sport, "A")
        mac = next(m for m, a in MACS.items() if a == owner)
        assert h6.run(sent) == (XDP_TX, dsr(sent, mac))
    sent = syn(43000)
    assert h6.run(sent) == (XDP_TX, dsr(sent, P.BACKEND2_MAC))


def test_a_syn_reusing_a_closed_flows_port_is_balanced_afresh(h6):
    h6.configure([v6service(BACKEND6)])
    h6.run(syn(44000))
    h6.run(syn(44000, "FA"))
    h6.configure([v6service(BACKEND6_2)])
    sent = syn(44000)
    assert h6.run(sent) == (XDP_TX, dsr(sent, P.BACKEND2_MAC))
    assert flows6(h6)[(CLIENT6, 44000)].flags == abi.FlowFlags.HANDSHAKE


def test_the_ipv4_path_is_unchanged_beside_ipv6_services(h6):
    h6.configure([v6service(), Service(ipaddress.IPv4Address(P.VIP), 80, "tcp",
                                       [Backend(ipaddress.IPv4Address(P.BACKEND), 80)], forward="dsr")])
    sent = P.tcp(P.CLIENT, 40000, P.VIP, 80)
    assert h6.run(sent) == (XDP_TX, dsr(sent))
    sent6 = syn()
    assert h6.run(sent6) == (XDP_TX, dsr(sent6))


_EXT = st.sampled_from([IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(segleft=0),
                        IPv6ExtHdrRouting(segleft=2, addresses=["fd00::5", "fd00::6"]),
                        IPv6ExtHdrFragment(offset=0, m=0), IPv6ExtHdrFragment(offset=0, m=1),
                        IPv6ExtHdrFragment(offset=16, m=1)])


@st.composite
def v6_frames(draw):
    ext = draw(st.lists(_EXT, max_size=abi.V6_EXT_HEADERS + 2))
    l4 = draw(st.sampled_from(["tcp", "udp", "icmp", "raw"]))
    dport = draw(st.sampled_from([80, 81, 53]))
    top = {"tcp": TCP(sport=draw(st.integers(1, 65535)), dport=dport, flags=draw(st.sampled_from(["S", "A", "R", "FA"]))),
           "udp": UDP(sport=draw(st.integers(1, 65535)), dport=dport),
           "icmp": ICMPv6EchoRequest(), "raw": b"\x00" * 8}[l4]
    data = frame(*ext, top, dst=draw(st.sampled_from([VIP6, "fd00::3"])), hlim=draw(st.sampled_from([1, 2, 64])))
    cut = draw(st.integers(14, len(data)))  # a test run needs an Ethernet header
    return data[:cut] if draw(st.booleans()) else data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=v6_frames(), forward=st.sampled_from(["dsr", "ipip"]))
def test_no_ipv6_frame_is_ever_forwarded_changed(h6, data, forward):
    """Whatever the frame: passed untouched, dropped, or sent to a backend as it came
    (behind new MACs, or inside an outer IPv6 header to that backend)."""
    if h6.settings.encap_source6 is None:
        h6.sync(settings=dataclasses.replace(h6.settings, encap_source6=ipaddress.IPv6Address(ENCAP6)))
    wanted = [v6service(BACKEND6, BACKEND6_2, forward=forward)]
    if h6.configured != wanted:  # a flow keeps the mode it was created in: start afresh
        h6.configure(wanted)
        for key in list(h6.dp.lib.keys(h6.dp.fds["xdplb_flows6"], abi.FlowKey6)):
            h6.dp.lib.delete(h6.dp.fds["xdplb_flows6"], key)
    action, out = h6.run(data)
    if action == XDP_PASS:
        assert out == data
    elif action == XDP_TX and forward == "dsr":
        assert out[12:] == data[12:] and out[6:12] == bytes.fromhex(P.LB_MAC.replace(":", ""))
        assert ":".join(f"{x:02x}" for x in out[:6]) in MACS
    elif action == XDP_TX:
        backend = MACS[":".join(f"{x:02x}" for x in out[:6])]
        outer = IPv6(out[14:54])
        assert (outer.nh, outer.src, outer.dst, outer.plen) == (41, ENCAP6, backend, len(out) - 54)
        assert out[54:] == data[14:14 + len(out) - 54] and len(out) - 54 <= len(data) - 14
    else:
        assert action == XDP_DROP


def test_ipv6_flows_are_counted_listed_and_reset_beside_ipv4_ones(h6):
    h6.configure([v6service(BACKEND6, BACKEND6_2), Service(ipaddress.IPv4Address(P.VIP), 80, "tcp",
                                                           [Backend(ipaddress.IPv4Address(P.BACKEND), 80)])])
    for sport in range(45000, 45010):
        h6.run(syn(sport))
    h6.run(syn(45000, "A"))
    h6.run(syn(45001, "FA"))  # closing: listed, not counted active
    h6.run(P.tcp(P.CLIENT, 40000, P.VIP, 80))
    ids = {str(layout.from_words(b.addr)): i for i, b in h6.dp._backend_entries().items()}
    active, entries = h6.dp.flow_census()
    assert entries == 10 + 2  # one IPv6 entry per flow, two for the IPv4 NAT flow
    assert active[ids[P.BACKEND]] == 1 and active[ids[BACKEND6]] + active[ids[BACKEND6_2]] == 9
    conns, total = h6.dp.connections()
    assert total == 11
    mine = {c.client: c for c in conns if c.client.startswith("[")}
    first = mine[f"[{CLIENT6}]:45000"]
    assert (first.proto, first.vip, first.via, first.state) == ("tcp", f"[{VIP6}]:80", "dsr", "ESTABLISHED")
    assert first.backend in (f"[{BACKEND6}]:80", f"[{BACKEND6_2}]:80")
    assert mine[f"[{CLIENT6}]:45001"].state == "FIN_WAIT"
    assert len(h6.dp.connections(limit=3)[0]) == 3
    owned = sum(1 for c in mine.values() if c.backend_id == ids[BACKEND6])
    assert h6.dp.reset_flows(ids[BACKEND6]) == owned
    assert all(v.backend_id != ids[BACKEND6] for v in flows6(h6).values())


# ---- ipip (ip6ip6) -------------------------------------------------------------------------
ENCAP6 = "fd00::1"


def ipip6(h, sent: bytes, sport: int = 40000, backend: str = BACKEND6, mac: str = P.BACKEND_MAC) -> bytes:
    """What ip6ip6 sends: the packet untouched inside an outer IPv6 header from the
    encapsulation source (hop limit 64, traffic class the inner one's, flow label from the
    inner 5-tuple)."""
    inner = IPv6(sent[14:])
    label = hashing.flow_hash6(CLIENT6, sport, VIP6, 80, socket.IPPROTO_TCP, h.dp._config().flow_seed) & 0xFFFFF
    outer = IPv6(src=ENCAP6, dst=backend, nh=41, hlim=64, tc=inner.tc, fl=label, plen=len(sent) - 14)
    return P.build(Ether(src=P.LB_MAC, dst=mac) / outer) + sent[14:]


@pytest.fixture
def ip6ip6(h6):
    h6.sync(settings=dataclasses.replace(h6.settings, encap_source6=ipaddress.IPv6Address(ENCAP6)))
    h6.configure([v6service(forward="ipip")])
    return h6


def test_ip6ip6_puts_the_packet_as_sent_inside_an_outer_header_to_the_backend(ip6ip6):
    for flags in ("S", "A", "PA"):
        sent = P.build(Ether(src=P.CLIENT_MAC, dst=P.LB_MAC) / IPv6(src=CLIENT6, dst=VIP6, tc=0xb9)
                       / TCP(sport=40000, dport=80, flags=flags) / b"data")
        assert ip6ip6.run(sent) == (XDP_TX, ipip6(ip6ip6, sent))
    flow = flows6(ip6ip6)[(CLIENT6, 40000)]
    assert flow.encap == 1
    assert ip6ip6.dp.read_settings().encap_source6 == ipaddress.IPv6Address(ENCAP6)
    conns, _ = ip6ip6.dp.connections()
    assert conns[0].via == "ipip"


def test_an_ipv6_ipip_service_without_an_outer_source_drops_new_flows(h6):
    h6.configure([v6service(forward="ipip")])  # the harness gives no encap_source6
    assert h6.run(syn())[0] == XDP_DROP
    assert h6.dp.counters()["table_full"] == 1


MTU6 = 1400  # the link towards the backend in the MTU tests


@pytest.fixture
def small_mtu_link():
    """A namespace with a veth link of MTU6 (test runs there see its loopback as the
    ingress interface, and bpf_check_mtu finds the link): its ifindex."""
    name = f"xdplb-m6-{os.getpid()}"
    pyroute2_netns.create(name)
    try:
        with IPRoute(netns=name) as ipr:
            ipr.link("add", ifname="m6", kind="veth", peer="m6p")
            index = ipr.link_lookup(ifname="m6")[0]
            ipr.link("set", index=index, mtu=MTU6)
        yield name, index
    finally:
        pyroute2_netns.remove(name)


def segment6(l3_len: int, sport: int = 40000) -> bytes:
    """A client's data segment whose IPv6 packet is l3_len bytes long."""
    head = 40 + 20
    return P.build(Ether(src=P.CLIENT_MAC, dst=P.LB_MAC) / IPv6(src=CLIENT6, dst=VIP6)
                   / TCP(sport=sport, dport=80, flags="A", seq=1001) / (b"z" * (l3_len - head)))


def packet_too_big(frame: bytes, mtu: int) -> bytes:
    """The answer to a client's packet too big once encapsulated: as much of it as fits
    in 1280 bytes, from the VIP, checksum computed by scapy."""
    quote = frame[14:14 + 1280 - 48]
    return P.build(Ether(src=P.LB_MAC, dst=P.CLIENT_MAC) / IPv6(src=VIP6, dst=CLIENT6, hlim=64)
                   / ICMPv6PacketTooBig(mtu=mtu) / quote)


def test_a_packet_too_big_once_encapsulated_is_answered_with_packet_too_big(ip6ip6, small_mtu_link):
    netns, index = small_mtu_link
    ip6ip6.move_hop(BACKEND6, NextHop(index, P.BACKEND_MAC, P.LB_MAC))
    run = lambda frame: namespaces.run_in_netns(netns, lambda: ip6ip6.run(frame))  # noqa: E731
    assert run(syn())[0] == XDP_REDIRECT
    fits = segment6(MTU6 - 40)
    assert run(fits) == (XDP_REDIRECT, ipip6(ip6ip6, fits))
    too_big = segment6(MTU6 - 39)
    action, out = run(too_big)
    assert (action, out) == (XDP_TX, packet_too_big(too_big, MTU6 - 40))
    assert len(out) == 14 + 1280  # quoted as much as fits the minimum MTU
    counters = ip6ip6.dp.counters()
    assert (counters["frag_needed"], counters["tx"], counters["redirect"], counters["too_big"]) == (1, 1, 2, 0)
    # Over a link below 1320 bytes no MTU can be offered (none is below 1280): dropped.
    with IPRoute(netns=netns) as ipr:
        ipr.link("set", index=index, mtu=1300)
    assert run(segment6(1261))[0] == XDP_DROP
    assert run(segment6(1300))[0] == XDP_DROP
    assert ip6ip6.dp.counters()["too_big"] == 2
    assert run(segment6(1260))[0] == XDP_REDIRECT  # what fits still goes


def test_an_icmpv6_error_about_an_ip6ip6_flow_is_encapsulated_to_its_backend(ip6ip6):
    ip6ip6.run(syn(40000))
    reply = IPv6(src=VIP6, dst=CLIENT6, hlim=63) / TCP(sport=80, dport=40000, flags="SA")
    error = frame(ICMPv6PacketTooBig(mtu=1280) / bytes(reply), src="fd00:9::1", dst=VIP6)
    action, out = ip6ip6.run(error)
    assert action == XDP_TX and out[14 + 40:] == error[14:]
    assert IPv6(out[14:]).nh == 41 and IPv6(out[14:]).dst == BACKEND6
    assert ip6ip6.dp.counters()["icmp_translated"] == 1


def test_an_ipv6_packet_is_traced_with_its_three_addresses(h6):
    from . import test_trace
    fd = test_trace.open_trace_args(h6.prog_fd)
    try:
        h6.configure([v6service()])
        h6.dp.renew_trace()
        assert h6.run(syn(46000))[0] == XDP_TX
        size = test_trace.TRACE_VALUE
        buf = ctypes.create_string_buffer(size * h6.dp.ncpus)
        h6.dp.lib.lookup(fd, ctypes.c_uint32(0), buf)
        v = list((ctypes.c_uint64 * 12).from_buffer_copy(buf.raw[:96]))
        addrs = [str(ipaddress.IPv6Address(buf.raw[96 + 16 * i:112 + 16 * i])) for i in range(3)]
        assert v[1:3] == [6, 0x02] and (v[4], v[6], v[8]) == (46000, 80, 80)
        assert (v[10], v[11]) == (abi.TraceEvent.NEW_FLOW, XDP_TX)
        assert addrs == [CLIENT6, VIP6, BACKEND6]
        assert (v[5] - v[3], v[7] - v[5]) == (16, 16)  # %pI6 arguments: pointers to those addresses
    finally:
        os.close(fd)


def test_an_ipv6_allow_list_lets_its_networks_in_and_drops_or_passes_the_rest(h6):
    listed = dataclasses.replace(v6service(), clients=[ipaddress.IPv6Network("fd00:1::/64")])
    h6.configure([listed])
    assert h6.dp.services()[0].clients == [ipaddress.IPv6Network("fd00:1::/64")]  # read back from the map
    assert not h6.sync([listed])
    inside = syn(47000)
    assert h6.run(inside) == (XDP_TX, dsr(inside))
    outside = syn(47001, src="fd00:2::10")
    assert h6.run(outside)[0] == XDP_DROP
    assert h6.dp.counters()["not_allowed"] == 1
    h6.configure([dataclasses.replace(listed, not_allowed="pass")])
    assert h6.run(outside) == (XDP_PASS, outside)
    h6.configure([v6service()])  # the allow-list removed: everybody in
    assert list(h6.dp.lib.keys(h6.dp.fds["xdplb_clients6"], abi.ClientKey6)) == []
    assert h6.run(syn(47002, src="fd00:2::10"))[0] == XDP_TX


def test_an_ipv6_backend_reusing_an_ipv4_backends_id_does_not_take_its_flows(h6):
    """The id of a retired IPv4 backend goes to an IPv6 one whose address ends in the
    same 32 bits, on the same port: the IPv4 flow keeps its own next hop."""
    from .test_forwarding import FIRST, to_backend
    look_alike = str(ipaddress.IPv6Address("fd00::") + int(ipaddress.IPv4Address(P.BACKEND)))
    h6.hops[look_alike] = NextHop(LOOPBACK, "02:00:00:00:00:c6", P.LB_MAC)
    four = lambda *b: Service(ipaddress.IPv4Address(P.VIP), 80, "tcp",  # noqa: E731
                              [Backend(ipaddress.IPv4Address(x), 80) for x in b])
    h6.configure([four(P.BACKEND)])
    h6.run(P.tcp(P.CLIENT, 40000, P.VIP, 80, flags="S"))
    old_id = h6.dp.backend_ids()[(0, f"{P.BACKEND}:80")]
    h6.sync([four(P.BACKEND2)])
    h6.sync([four(P.BACKEND2), v6service(look_alike)])
    assert h6.dp.backend_ids()[(1, f"[{look_alike}]:80")] == old_id
    assert h6.move_hop(look_alike, NextHop(LOOPBACK, "02:00:00:00:00:c7", P.LB_MAC))  # bumps the generation
    ack = P.tcp(P.CLIENT, 40000, P.VIP, 80, flags="A", seq=1001)
    assert h6.run(ack) == (XDP_TX, to_backend(FIRST, 80, flags="A", seq=1001))
