# SPDX-License-Identifier: Apache-2.0
"""Services in dsr and ipip mode (bpf/encap.h): the backend gets the client's packet as
sent, behind a new Ethernet header (dsr) or inside an outer IPv4 header (ipip), and the
flow table holds the client side only (the mode is in the entry's checksum fields, see
struct xdplb_flow in bpf/xdplb_abi.h).

Expected packets are built by scapy, which computes every length and checksum from
scratch: comparing bytes checks the outer header's checksum and that the inner packet
is untouched."""
from __future__ import annotations

import ctypes
import dataclasses
import os
import socket
import struct
import sys

import numpy
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from scapy.packet import Raw

from xdplb import abi, clock, hashing, namespaces, trace
from xdplb.netlink import NextHop

from . import packets as P
from .conftest import LOOPBACK, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, service
from .test_abi import header_constants
from . import test_trace

ENCAP_SOURCE = P.SNAT  # the harness gives no encap_source: the control plane writes the SNAT address
BACKEND3 = "10.0.0.103"
MACS = {P.BACKEND_MAC: P.BACKEND, P.BACKEND2_MAC: P.BACKEND2, "02:00:00:00:00:b3": BACKEND3}
IP_DF = 0x4000


def svc(mode: str, *backends: str, **kw):
    return dataclasses.replace(service(*(backends or (P.BACKEND,)), **kw), forward=mode)


def client_tcp(sport=40000, flags="S", **kw) -> bytes:
    return P.tcp(P.CLIENT, sport, P.VIP, 80, flags=flags, **kw)


def dsr(frame: bytes, mac: str = P.BACKEND_MAC, smac: str = P.LB_MAC) -> bytes:
    """What dsr sends: the frame with new MACs, nothing else changed."""
    return mac_bytes(mac) + mac_bytes(smac) + frame[12:]


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def ipip(frame: bytes, backend: str = P.BACKEND, mac: str = P.BACKEND_MAC, smac: str = P.LB_MAC) -> bytes:
    """What ipip sends: the frame's IP packet, untouched, inside an outer header from the
    encapsulation source to the backend (TTL 64; TOS, DF and id the inner one's)."""
    inner = P.IP(frame[14:])
    outer = P.IP(src=ENCAP_SOURCE, dst=backend, proto=socket.IPPROTO_IPIP, ttl=abi.IPIP_TTL, tos=inner.tos,
                 id=inner.id, flags=int(inner.flags) & 2)
    return P.build(P.Ether(src=smac, dst=mac, type=0x0800) / outer / Raw(frame[14:]))


def address(be32: int) -> str:
    return socket.inet_ntoa(be32.to_bytes(4, sys.byteorder))


def slots(harness) -> list[tuple]:
    """(index, last_seen, proto, backend_id, flags) of every entry of the flow table."""
    with harness.dp.flow_table() as table:
        return table.slots()


def flow_entry(harness, index: int) -> abi.FlowSlot:
    with harness.dp.flow_table() as table:
        return table.slot(index)


def flow_end(harness, index: int) -> tuple[int, int]:
    end = abi.FlowEnd()
    harness.dp.lib.lookup(harness.dp.fds["xdplb_flow_ends"], ctypes.c_uint32(index), end)
    return end.ts_recent, end.rcv_nxt


def cursor(harness, backend: str) -> int:
    """Where the backend's SNAT cursor stands (the harness starts them at 0)."""
    value = ctypes.c_uint32()
    backend_id = harness.dp.backend_ids()[(0, f"{backend}:80")]
    harness.dp.lib.lookup(harness.dp.fds["xdplb_port_cur"], ctypes.c_uint32(harness.dp.cursor_id(backend_id)), value)
    return value.value


def ring_backend(harness, sport: int, proto: int = socket.IPPROTO_TCP) -> str:
    """The backend the service's Maglev ring gives the client's flow from sport."""
    svc_id = harness.dp.service_ids()[f"{P.VIP}:80/{'tcp' if proto == socket.IPPROTO_TCP else 'udp'}"]
    ring = harness.dp.ring(svc_id)
    by_id = {i: addr.split(":")[0] for (_, addr), i in harness.dp.backend_ids().items()}
    h = hashing.flow_hash(P.CLIENT, sport, P.VIP, 80, proto, harness.settings.hash_seed)
    return by_id[ring[h % len(ring)]]


def expected(mode: str, frame: bytes, backend: str = P.BACKEND) -> bytes:
    mac = {addr: mac for mac, addr in MACS.items()}[backend]
    return ipip(frame, backend, mac) if mode == "ipip" else dsr(frame, mac)


def test_abi_constants_of_the_modes_match_the_header():
    h = header_constants()
    assert (abi.IPIP_TTL, abi.ENCAP_MTU_FLOOR) == (h["XDPLB_IPIP_TTL"], h["XDPLB_ENCAP_MTU_FLOOR"])


# ---- the packets ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["dsr", "ipip"])
def test_syn_and_data_reach_the_backend_as_the_client_sent_them(harness, mode):
    harness.configure([svc(mode)])
    syn = client_tcp(tcp_options=[("MSS", 1460), ("Timestamp", (1, 0))])
    assert harness.run(syn) == (XDP_TX, expected(mode, syn))
    data = client_tcp(flags="PA", seq=1001, ack=5001, payload=b"GET / HTTP/1.1\r\n\r\n", ip_id=2)
    assert harness.run(data) == (XDP_TX, expected(mode, data))
    counters = harness.dp.counters()
    assert (counters["new_flow"], counters["tx"], counters["recovered"]) == (1, 2, 0)
    traffic = harness.dp.traffic("service", harness.dp.service_ids()[f"{P.VIP}:80/tcp"])
    assert (traffic.packets, traffic.bytes, traffic.new_flows) == (2, len(syn) + len(data), 1)


def test_ipip_copies_tos_df_and_id_and_keeps_options_and_ttl_of_the_inner_packet(harness):
    harness.configure([svc("ipip")])
    frame = P.build(P.Ether(src=P.CLIENT_MAC, dst=P.LB_MAC)
                    / P.IP(src=P.CLIENT, dst=P.VIP, ttl=2, tos=0xb9, id=0x1234, flags=0,
                           options=[P.IPOption_RR(routers=["0.0.0.0"])])
                    / P.TCP(sport=40000, dport=80, flags="S") / b"data")
    out = harness.run(frame)
    assert out == (XDP_TX, ipip(frame))
    outer = P.Ether(out[1])[P.IP]
    assert (outer.tos, outer.id, int(outer.flags), outer.ttl) == (0xb9, 0x1234, 0, 64)


@pytest.mark.parametrize("mode", ["dsr", "ipip"])
@pytest.mark.parametrize("zero_checksum", [False, True])
def test_udp_in_both_modes(harness, mode, zero_checksum):
    harness.configure([svc(mode, proto="udp")])
    for payload in (b"ping", b"again"):
        datagram = P.udp(P.CLIENT, 5000, P.VIP, 80, payload=payload, zero_checksum=zero_checksum)
        assert harness.run(datagram) == (XDP_TX, expected(mode, datagram))
    assert harness.dp.counters()["new_flow"] == 1
    [(_, _, proto, _, flags)] = slots(harness)
    assert (proto, flags) == (socket.IPPROTO_UDP, 0)


@pytest.mark.parametrize("mode", ["dsr", "ipip"])
def test_a_backend_behind_another_interface_is_redirected_to(harness, mode):
    harness.configure([svc(mode, "10.9.0.1")])
    syn = client_tcp()
    expect = (ipip(syn, "10.9.0.1", P.ROUTER_MAC, "02:00:00:00:00:07") if mode == "ipip"
              else dsr(syn, P.ROUTER_MAC, "02:00:00:00:00:07"))
    assert harness.run(syn) == (XDP_REDIRECT, expect)
    assert harness.dp.counters()["redirect"] == 1


@pytest.mark.parametrize("mode", ["dsr", "ipip"])
def test_ttl_one_still_goes_to_the_kernel(harness, mode):
    """As in full NAT: a loop through a backend that routes the packet back ends."""
    harness.configure([svc(mode)])
    syn = client_tcp(ttl=1)
    assert harness.run(syn) == (XDP_PASS, syn)
    assert harness.dp.counters()["ttl_expired"] == 1


# ---- one entry per flow, and its TCP state -------------------------------------------------
@pytest.mark.parametrize("mode", ["dsr", "ipip"])
def test_a_flow_has_one_entry_marked_by_its_checksum_fields(harness, mode):
    harness.configure([svc(mode)])
    harness.run(client_tcp())
    [(index, _, proto, _, flags)] = slots(harness)
    entry = flow_entry(harness, index)
    assert (proto, flags) == (socket.IPPROTO_TCP, abi.FlowFlags.HANDSHAKE)
    flow = entry.flow
    assert flow.l3_csum_delta == 0
    assert (address(flow.daddr), socket.ntohs(flow.dport), flow.sport) == (P.BACKEND, 80, 0)
    if mode == "dsr":
        assert (flow.saddr, flow.l4_csum_delta) == (0, 0)
    else:
        assert address(flow.saddr) == ENCAP_SOURCE and flow.l4_csum_delta != 0
    # No SNAT source was taken, and nothing else was written into the table.
    assert harness.dp.snat_usage() == []
    assert cursor(harness, P.BACKEND) == 0
    with harness.dp.flow_table() as table:
        assert list(numpy.flatnonzero(table._rows["seq"])) == [index]


@pytest.mark.parametrize("mode", ["dsr", "ipip"])
def test_the_clients_first_ack_ends_the_handshake_and_its_fin_marks_the_flow_closing(harness, mode):
    """The balancer never sees the backend's SYN-ACK: the client's ACK completes the
    handshake (the established timeout applies), its FIN makes the flow closing."""
    harness.configure([svc(mode)])
    harness.run(client_tcp())
    harness.run(client_tcp(flags="A", seq=1001, ack=5001))
    [(index, _, _, _, flags)] = slots(harness)
    assert flags == 0
    # Idle for longer than the handshake timeout: still there (no recovery needed).
    cfg = harness.dp._config()
    stamp(harness, index, clock.now_ticks(cfg.tick_shift) - cfg.tcp_syn_expiry_ticks - 5)
    ack = client_tcp(flags="A", seq=1001, ack=5001, payload=b"x")
    assert harness.run(ack) == (XDP_TX, expected(mode, ack))
    assert harness.dp.counters()["recovered"] == 0
    fin = client_tcp(flags="FA", seq=1002, ack=5001)
    assert harness.run(fin) == (XDP_TX, expected(mode, fin))
    [(index, _, _, _, flags)] = slots(harness)
    assert flags == abi.FlowFlags.CLOSING | abi.FlowFlags.FIN_CLIENT
    assert flow_end(harness, index) == (0, 0)
    assert harness.dp.active_flows() == {}


@pytest.mark.parametrize("mode", ["dsr", "ipip"])
def test_a_handshake_the_client_never_completes_expires_after_the_syn_timeout(harness, mode):
    harness.configure([svc(mode)])
    harness.run(client_tcp())
    [(index, _, _, _, _)] = slots(harness)
    cfg = harness.dp._config()
    stamp(harness, index, clock.now_ticks(cfg.tick_shift) - cfg.tcp_syn_expiry_ticks - 5)
    assert harness.dp.active_flows() == {}


@pytest.mark.parametrize("mode", ["dsr", "ipip"])
def test_a_client_reset_marks_the_flow_reset(harness, mode):
    harness.configure([svc(mode)])
    harness.run(client_tcp())
    harness.run(client_tcp(flags="A", seq=1001))
    rst = client_tcp(flags="R", seq=1001)
    assert harness.run(rst) == (XDP_TX, expected(mode, rst))
    [(_, _, _, _, flags)] = slots(harness)
    assert flags == abi.FlowFlags.CLOSING | abi.FlowFlags.RESET


@pytest.mark.parametrize("mode", ["dsr", "ipip"])
def test_a_syn_on_a_closing_flow_is_balanced_afresh(harness, mode):
    harness.configure([svc(mode)])
    harness.run(client_tcp())
    harness.run(client_tcp(flags="FA", seq=1001))
    syn = client_tcp(seq=9000)
    assert harness.run(syn) == (XDP_TX, expected(mode, syn))
    [(_, _, _, _, flags)] = slots(harness)
    assert flags == abi.FlowFlags.HANDSHAKE
    assert harness.dp.counters()["new_flow"] == 2


# ---- stateless recovery --------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["dsr", "ipip"])
def test_a_segment_of_no_flow_goes_where_the_ring_points_and_opens_a_flow(harness, mode):
    harness.configure([svc(mode, P.BACKEND, P.BACKEND2, BACKEND3)])
    seen = set()
    for sport in range(41000, 41024):
        ack = client_tcp(sport, flags="PA", seq=7, ack=9, payload=b"more")
        backend = ring_backend(harness, sport)
        assert harness.run(ack) == (XDP_TX, expected(mode, ack, backend)), sport
        seen.add(backend)
    assert seen == {P.BACKEND, P.BACKEND2, BACKEND3}
    counters = harness.dp.counters()
    assert (counters["recovered"], counters["new_flow"], counters["no_flow"]) == (24, 24, 0)
    assert all(flags == 0 for *_, flags in slots(harness)) and len(slots(harness)) == 24


@pytest.mark.parametrize("mode", ["dsr", "ipip"])
def test_a_connection_survives_the_flow_table_forgetting_it(harness, mode):
    """As after a detach and attach (a new, empty table) or a resize: while its backend
    stays in the ring, the next segment goes to it again."""
    harness.configure([svc(mode, P.BACKEND, P.BACKEND2, BACKEND3)])
    for sport in (42000, 42001, 42002):
        harness.run(client_tcp(sport))
        harness.run(client_tcp(sport, flags="A", seq=1001))
    for backend_id in harness.dp.backend_ids().values():
        harness.dp.reset_flows(backend_id)
    assert slots(harness) == []
    for sport in (42000, 42001, 42002):
        ack = client_tcp(sport, flags="A", seq=1001, payload=b"after")
        assert harness.run(ack) == (XDP_TX, expected(mode, ack, ring_backend(harness, sport)))
    assert harness.dp.counters()["recovered"] == 3


@pytest.mark.parametrize("flags,state", [("FA", abi.FlowFlags.CLOSING | abi.FlowFlags.FIN_CLIENT),
                                         ("R", abi.FlowFlags.CLOSING | abi.FlowFlags.RESET)])
def test_a_recovered_fin_or_reset_opens_a_closing_flow(harness, flags, state):
    harness.configure([svc("dsr")])
    segment = client_tcp(flags=flags, seq=5)
    assert harness.run(segment) == (XDP_TX, dsr(segment))
    [(_, _, _, _, got)] = slots(harness)
    assert got == state


def test_full_nat_still_passes_a_segment_of_no_flow(harness):
    harness.configure([service(P.BACKEND)])
    ack = client_tcp(flags="A", seq=7)
    assert harness.run(ack) == (XDP_PASS, ack)
    counters = harness.dp.counters()
    assert (counters["no_flow"], counters["recovered"], counters["new_flow"]) == (1, 0, 0)


def test_recovery_respects_the_allow_list(harness):
    harness.configure([dataclasses.replace(svc("dsr", clients=["10.0.1.16/28"]))])
    ack = client_tcp(flags="A", seq=7)
    assert harness.run(ack) == (XDP_DROP, ack)
    assert harness.dp.counters()["not_allowed"] == 1 and slots(harness) == []


# ---- flows keep their mode; next hops ------------------------------------------------------
def test_flows_keep_the_mode_they_were_created_in(harness):
    harness.configure([service(P.BACKEND)])
    harness.run(client_tcp(40000))
    harness.configure([svc("dsr")])
    ack = client_tcp(40000, flags="A", seq=1001)
    nat_out = P.tcp(P.SNAT, 20000, P.BACKEND, 80, flags="A", seq=1001, smac=P.LB_MAC, dmac=P.BACKEND_MAC, ttl=63)
    assert harness.run(ack) == (XDP_TX, nat_out)
    syn = client_tcp(40001)
    assert harness.run(syn) == (XDP_TX, dsr(syn))
    harness.configure([svc("ipip")])
    ack = client_tcp(40001, flags="A", seq=1001)
    assert harness.run(ack) == (XDP_TX, dsr(ack))
    syn = client_tcp(40002)
    assert harness.run(syn) == (XDP_TX, ipip(syn))


@pytest.mark.parametrize("mode", ["dsr", "ipip"])
def test_flows_follow_their_backends_new_next_hop(harness, mode):
    harness.configure([svc(mode)])
    harness.run(client_tcp())
    moved = "02:00:00:00:00:c1"
    assert harness.move_hop(P.BACKEND, NextHop(LOOPBACK, moved, P.LB_MAC))
    ack = client_tcp(flags="A", seq=1001)
    out = ipip(ack, P.BACKEND, moved) if mode == "ipip" else dsr(ack, moved)
    assert harness.run(ack) == (XDP_TX, out)


# ---- ICMP errors about the backends' replies -----------------------------------------------
@pytest.mark.parametrize("mode", ["dsr", "ipip"])
def test_an_icmp_error_about_a_reply_goes_to_the_flows_backend_as_it_came(harness, mode):
    """A backend's reply leaves from the VIP, so a router's error about it (here: its
    path MTU) comes to the balancer: the backend needs it, unchanged."""
    harness.configure([svc(mode, P.BACKEND, P.BACKEND2, BACKEND3)])
    harness.run(client_tcp(43000))
    reply = P.tcp(P.VIP, 80, P.CLIENT, 43000, flags="A", payload=b"y" * 40)
    error = P.build(P.Ether(src=P.ROUTER_MAC, dst=P.LB_MAC) / P.IP(src="192.0.2.1", dst=P.VIP, id=3)
                    / P.ICMP(type=3, code=4, nexthopmtu=1300) / reply[14:14 + 28])
    assert harness.run(error) == (XDP_TX, expected(mode, error, ring_backend(harness, 43000)))
    assert harness.dp.counters()["icmp_translated"] == 1


def test_an_icmp_error_about_no_flow_still_passes(harness):
    harness.configure([svc("dsr")])
    reply = P.tcp(P.VIP, 80, P.CLIENT, 43000, flags="A")
    error = P.build(P.Ether(src=P.ROUTER_MAC, dst=P.LB_MAC) / P.IP(src="192.0.2.1", dst=P.VIP)
                    / P.ICMP(type=3, code=4, nexthopmtu=1300) / reply[14:14 + 28])
    assert harness.run(error) == (XDP_PASS, error)


# ---- too big once encapsulated -------------------------------------------------------------
SMALL_MTU = 1400  # the link towards the backend in the MTU tests
BELOW_FLOOR_MTU = 1000  # an MTU under XDPLB_ENCAP_MTU_FLOOR, which the data plane does not ask for


@pytest.fixture
def small_mtu_links():
    """A namespace with two veth links of small MTUs (test runs there see its loopback
    as the ingress interface, and bpf_check_mtu finds its links): {mtu: ifindex}."""
    name = f"xdplb-fm-{os.getpid()}"
    pyroute2_netns.create(name)
    try:
        with IPRoute(netns=name) as ipr:
            links = {}
            for ifname, mtu in (("fm0", SMALL_MTU), ("fm1", BELOW_FLOOR_MTU)):
                ipr.link("add", ifname=ifname, kind="veth", peer=f"{ifname}p")
                index = ipr.link_lookup(ifname=ifname)[0]
                ipr.link("set", index=index, mtu=mtu)
                links[mtu] = index
        yield name, links
    finally:
        pyroute2_netns.remove(name)


def run_in(harness, netns: str, frame: bytes):
    return namespaces.run_in_netns(netns, lambda: harness.run(frame))


def data_segment(l3_len: int, df: bool = True, options=None, sport: int = 40000) -> bytes:
    """A client segment of a flow whose IP packet is l3_len bytes long."""
    def frame(payload: bytes) -> bytes:
        ip = P.IP(src=P.CLIENT, dst=P.VIP, ttl=64, id=77, flags="DF" if df else 0)
        if options:
            ip.options = options
        return P.build(P.Ether(src=P.CLIENT_MAC, dst=P.LB_MAC) / ip
                       / P.TCP(sport=sport, dport=80, flags="A", seq=1001) / payload)
    headers = len(frame(b"")) - 14
    return frame(b"z" * (l3_len - headers))


def frag_needed(frame: bytes, mtu: int) -> bytes:
    """The answer to a client's packet too big for a link of `mtu` once encapsulated."""
    inner = P.IP(frame[14:])
    quote = frame[14:14 + inner.ihl * 4 + 8]
    return P.build(P.Ether(src=P.LB_MAC, dst=P.CLIENT_MAC)
                   / P.IP(src=P.VIP, dst=P.CLIENT, ttl=64, id=0, flags="DF", tos=0xc0)
                   / P.ICMP(type=3, code=4, nexthopmtu=mtu - 20) / quote)


@pytest.mark.parametrize("options", [None, [P.IPOption_RR(routers=["0.0.0.0"] * 3)]], ids=["plain", "ip-options"])
def test_a_packet_too_big_once_encapsulated_is_answered_with_fragmentation_needed(harness, small_mtu_links,
                                                                                  options):
    netns, links = small_mtu_links
    harness.hops[P.BACKEND] = NextHop(links[SMALL_MTU], P.BACKEND_MAC, P.LB_MAC)
    harness.configure([svc("ipip")])
    assert run_in(harness, netns, client_tcp())[0] == XDP_REDIRECT
    fits = data_segment(SMALL_MTU - 20, options=options)
    assert run_in(harness, netns, fits) == (XDP_REDIRECT, ipip(fits))
    too_big = data_segment(SMALL_MTU - 19, options=options)
    answer = frag_needed(too_big, SMALL_MTU)
    assert run_in(harness, netns, too_big) == (XDP_TX, answer)
    assert P.Ether(answer)[P.ICMP].nexthopmtu == SMALL_MTU - 20
    counters = harness.dp.counters()
    assert (counters["frag_needed"], counters["tx"], counters["redirect"], counters["too_big"]) == (1, 1, 2, 0)


def test_a_packet_too_big_without_df_is_dropped_and_counted(harness, small_mtu_links):
    netns, links = small_mtu_links
    harness.hops[P.BACKEND] = NextHop(links[SMALL_MTU], P.BACKEND_MAC, P.LB_MAC)
    harness.configure([svc("ipip")])
    fits = data_segment(SMALL_MTU - 20, df=False)
    assert run_in(harness, netns, fits) == (XDP_REDIRECT, ipip(fits))
    too_big = data_segment(SMALL_MTU - 19, df=False)
    assert run_in(harness, netns, too_big)[0] == XDP_DROP
    counters = harness.dp.counters()
    assert (counters["too_big"], counters["drop"], counters["frag_needed"]) == (1, 1, 0)


def test_an_icmp_error_too_big_to_relay_is_dropped_not_answered(harness, small_mtu_links):
    netns, links = small_mtu_links
    harness.hops[P.BACKEND] = NextHop(links[SMALL_MTU], P.BACKEND_MAC, P.LB_MAC)
    harness.configure([svc("ipip")])
    run_in(harness, netns, client_tcp(43000))
    reply = P.tcp(P.VIP, 80, P.CLIENT, 43000, flags="A", payload=b"y" * 1400)
    error = P.build(P.Ether(src=P.ROUTER_MAC, dst=P.LB_MAC) / P.IP(src="192.0.2.1", dst=P.VIP, flags="DF")
                    / P.ICMP(type=11, code=0) / reply[14:])
    assert run_in(harness, netns, error)[0] == XDP_DROP
    counters = harness.dp.counters()
    assert (counters["too_big"], counters["frag_needed"], counters["icmp_translated"]) == (1, 0, 0)


trace_args = test_trace.trace_args  # the fixture: the fd of xdplb_trace_args
TRACE_ARGS = test_trace.TRACE_ARGS


def last_trace(harness, fd) -> tuple[int, int] | None:
    """(event, action) of the trace line the last run printed on CPU 0, then cleared."""
    size = test_trace.TRACE_VALUE * harness.dp.ncpus
    buf = ctypes.create_string_buffer(size)
    harness.dp.lib.lookup(fd, ctypes.c_uint32(0), buf)
    harness.dp.lib.update(fd, ctypes.c_uint32(0), ctypes.create_string_buffer(size))
    line = list((ctypes.c_uint64 * TRACE_ARGS).from_buffer_copy(buf.raw[:TRACE_ARGS * 8]))
    return (line[10], line[11]) if any(line) else None


def test_a_too_big_packet_is_traced_as_such(harness, small_mtu_links, trace_args):
    netns, links = small_mtu_links
    harness.hops[P.BACKEND] = NextHop(links[SMALL_MTU], P.BACKEND_MAC, P.LB_MAC)
    harness.configure([svc("ipip")])
    harness.dp.renew_trace()
    run_in(harness, netns, data_segment(SMALL_MTU - 19))
    assert last_trace(harness, trace_args) == (abi.TraceEvent.TOO_BIG, XDP_TX)
    run_in(harness, netns, data_segment(SMALL_MTU - 19, df=False))
    assert last_trace(harness, trace_args) == (abi.TraceEvent.TOO_BIG, XDP_DROP)
    run_in(harness, netns, data_segment(SMALL_MTU - 20))
    assert last_trace(harness, trace_args) == (abi.TraceEvent.FLOW, XDP_REDIRECT)
    assert trace.EVENTS[abi.TraceEvent.TOO_BIG] == "too-big"  # what `xdplb trace` prints


def test_the_mtu_is_asked_for_only_above_the_floor(harness, small_mtu_links):
    """XDPLB_ENCAP_MTU_FLOOR: a packet that is at most that long once encapsulated goes
    without asking (a link below it is not supported); one byte more is checked."""
    netns, links = small_mtu_links
    harness.hops[P.BACKEND] = NextHop(links[BELOW_FLOOR_MTU], P.BACKEND_MAC, P.LB_MAC)
    harness.configure([svc("ipip")])
    unchecked = data_segment(abi.ENCAP_MTU_FLOOR - 20)
    assert run_in(harness, netns, unchecked) == (XDP_REDIRECT, ipip(unchecked))
    checked = data_segment(abi.ENCAP_MTU_FLOOR - 19)
    assert run_in(harness, netns, checked) == (XDP_TX, frag_needed(checked, BELOW_FLOOR_MTU))


def test_dsr_adds_nothing_so_it_asks_nothing(harness, small_mtu_links):
    netns, links = small_mtu_links
    harness.hops[P.BACKEND] = NextHop(links[SMALL_MTU], P.BACKEND_MAC, P.LB_MAC)
    harness.configure([svc("dsr")])
    full = data_segment(SMALL_MTU)
    assert run_in(harness, netns, full) == (XDP_REDIRECT, dsr(full))


# ---- whatever arrives ----------------------------------------------------------------------
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SERVICE_PORTS = {("tcp", 80): "dsr", ("tcp", 81): "ipip", ("udp", 80): "ipip", ("udp", 81): "dsr",
                 ("tcp", 82): "nat"}


def fuzz_services():
    return [svc(mode, P.BACKEND, P.BACKEND2, port=port, proto=proto) for (proto, port), mode in SERVICE_PORTS.items()]


@st.composite
def client_frames(draw):
    proto = draw(st.sampled_from(["tcp", "udp"]))
    dst = draw(st.sampled_from([P.VIP] * 4 + ["10.0.0.9"]))
    dport = draw(st.sampled_from([80, 81, 82, 80, 81, 82, 80, 81, 82, draw(st.integers(0, 65535))]))
    ip = P.IP(src=draw(st.sampled_from([P.CLIENT, P.CLIENT2, "192.0.2.7"])), dst=dst, ttl=draw(st.integers(0, 255)),
              id=draw(st.integers(0, 65535)), tos=draw(st.integers(0, 255)),
              flags=draw(st.sampled_from([0, 2, 2, 2, 2, 1])))  # 2: DF, 1: MF (a first fragment)
    if draw(st.booleans()):
        ip.options = [P.IPOption_RR(routers=["0.0.0.0"] * draw(st.integers(1, 5)))]
    sport = draw(st.integers(0, 65535))
    if proto == "tcp":
        l4 = P.TCP(sport=sport, dport=dport, flags=draw(st.integers(0, 255)), seq=draw(st.integers(0, 2**32 - 1)))
    else:
        l4 = P.UDP(sport=sport, dport=dport)
    frame = P.build(P.Ether(src=P.CLIENT_MAC, dst=P.LB_MAC) / ip / l4 / draw(st.binary(max_size=80)))
    cut = draw(st.sampled_from([None, None, None, None, draw(st.integers(14, len(frame)))]))
    return frame if cut is None else frame[:cut]


def ones_sum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def header_ok(ip: bytes) -> bool:
    return ones_sum(ip[:(ip[0] & 0xF) * 4]) == 0xFFFF


def packet_ok(ip: bytes) -> bool:
    """The IPv4 header checksum, and the TCP, UDP (unless 0) or ICMP one, from scratch."""
    ihl, total, proto = (ip[0] & 0xF) * 4, int.from_bytes(ip[2:4], "big"), ip[9]
    l4 = ip[ihl:total]
    if not header_ok(ip):
        return False
    if proto == socket.IPPROTO_UDP and l4[6:8] == b"\0\0":
        return True
    if proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        return ones_sum(ip[12:20] + bytes([0, proto]) + len(l4).to_bytes(2, "big") + l4) == 0xFFFF
    return proto != socket.IPPROTO_ICMP or ones_sum(l4) == 0xFFFF


def check_output(data: bytes, action: int, out: bytes) -> None:
    """Passed: untouched. Sent: to a backend, in the mode of the service the packet was
    for, nothing changed but what the mode changes, and checksums as valid as they came."""
    assert action != XDP_ABORTED and action in (XDP_PASS, XDP_TX, XDP_REDIRECT, XDP_DROP)
    if action == XDP_PASS:
        assert out == data
    if action not in (XDP_TX, XDP_REDIRECT):
        return
    sent = data[14:]
    ihl, proto = (sent[0] & 0xF) * 4, sent[9]
    assert proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP)  # nothing else of a client goes anywhere
    mode = SERVICE_PORTS[({6: "tcp", 17: "udp"}[proto], int.from_bytes(sent[ihl + 2:ihl + 4], "big"))]
    backend = MACS[P.Ether(out).dst]
    assert backend in (P.BACKEND, P.BACKEND2) and out[6:12] == mac_bytes(P.LB_MAC)
    assert 14 + int.from_bytes(out[16:18], "big") <= len(out)  # the whole packet is in the frame
    if mode == "ipip":
        outer = out[14:34]
        assert out[12:14] == b"\x08\x00" and header_ok(outer)
        assert outer[:1] + outer[8:10] == bytes([0x45, abi.IPIP_TTL, socket.IPPROTO_IPIP])
        assert (outer[1], outer[4:6], int.from_bytes(outer[6:8], "big")) == (sent[1], sent[4:6],
                                                                            int.from_bytes(sent[6:8], "big") & IP_DF)
        assert (socket.inet_ntoa(outer[12:16]), socket.inet_ntoa(outer[16:20])) == (ENCAP_SOURCE, backend)
        assert int.from_bytes(outer[2:4], "big") == int.from_bytes(sent[2:4], "big") + 20
        assert out[34:] == sent  # the inner packet untouched
    elif mode == "dsr":
        assert out[12:] == data[12:]  # the MACs only
    else:
        ip = out[14:]
        assert (socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), len(out)) == (P.SNAT, backend, len(data))
        if packet_ok(sent):
            assert packet_ok(ip)


@SETTINGS
@given(frame=client_frames())
def test_random_frames_are_never_forwarded_corrupted(harness, frame):
    harness.configure(fuzz_services())
    action, out = harness.run(frame)
    check_output(frame, action, out)


@st.composite
def ipv4_headers(draw):
    """Any IPv4 header, mostly towards the services, with an L4 part of random bytes:
    lengths, header length, fragment bits and checksums right or wrong."""
    ihl = draw(st.sampled_from([5, 5, 5, 6, 15, draw(st.integers(0, 15))]))
    body = bytearray(draw(st.binary(min_size=max(ihl * 4, 20) + 4, max_size=max(ihl * 4, 20) + 60)))
    body[0] = draw(st.sampled_from([0x40, 0x40, draw(st.integers(0, 255)) & 0xF0])) | ihl
    body[9] = draw(st.sampled_from([6, 17, 6, 17, 1, draw(st.integers(0, 255))]))
    body[16:20] = socket.inet_aton(draw(st.sampled_from([P.VIP, P.VIP, "10.0.0.9"])))
    if draw(st.sampled_from([True, True, True, False])):
        body[2:4] = len(body).to_bytes(2, "big")
    if draw(st.booleans()):
        body[6:8] = draw(st.sampled_from([0, IP_DF])).to_bytes(2, "big")
    if ihl >= 5:
        body[ihl * 4 + 2:ihl * 4 + 4] = draw(st.sampled_from([80, 81, 82])).to_bytes(2, "big")
    if draw(st.booleans()) and ihl >= 5:
        body[10:12] = b"\0\0"
        body[10:12] = (0xFFFF - ones_sum(bytes(body[:ihl * 4]))).to_bytes(2, "big")
    return mac_bytes(P.LB_MAC) + mac_bytes(P.CLIENT_MAC) + b"\x08\x00" + bytes(body)


@SETTINGS
@given(frame=ipv4_headers())
def test_random_ipv4_headers_pass_or_go_out_valid(harness, frame):
    harness.configure(fuzz_services())
    action, out = harness.run(frame)
    check_output(frame, action, out)


@SETTINGS
@given(dport=st.one_of(st.integers(1, 65535), st.integers(20000, 20999)).filter(lambda p: p not in (80, 81, 82)),
       proto=st.sampled_from(["tcp", "udp"]), flags=st.sampled_from(["S", "A", "FA", "R"]))
def test_traffic_not_for_a_service_passes_untouched(harness, dport, proto, flags):
    """Other ports of the VIP, SNAT ports among them (no flow there): the kernel's."""
    harness.configure(fuzz_services())
    pkt = (P.tcp(P.CLIENT, 1234, P.VIP, dport, flags=flags) if proto == "tcp"
           else P.udp(P.CLIENT, 1234, P.VIP, dport))
    assert harness.run(pkt) == (XDP_PASS, pkt)


def stamp(harness, index: int, ticks: int) -> None:
    with harness.dp.flow_table() as table:
        at = index * ctypes.sizeof(abi.FlowSlot) + abi.FlowSlot.last_seen.offset
        table._map[at:at + 4] = (ticks % (1 << 32)).to_bytes(4, "little")
