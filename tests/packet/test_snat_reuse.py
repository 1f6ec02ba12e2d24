# SPDX-License-Identifier: Apache-2.0
"""When a SNAT source still held by a flow goes to a new SYN: once the backend closed
and the client did too, only when the backend, in TIME_WAIT on that tuple, would accept
the SYN (RFC 6191: a newer timestamp, or without timestamps a higher sequence number);
after timeouts.tcp_syn for a handshake nobody completed or a flow reset before the
backend closed. Every case runs with a SNAT range of
one port, so the new SYN either takes the old flow's source or finds none."""
from __future__ import annotations

import ctypes
import dataclasses

import pytest

from xdplb import abi, clock
from xdplb.libbpf import libbpf

from . import packets as P
from .conftest import XDP_DROP, XDP_PASS, XDP_TX, service

PORT = 20000
CLIENT_ISN, BACKEND_ISN = 1000, 5000


def syn_options(tsval):
    """Linux's SYN layout: the timestamp sits behind MSS and SACK-permitted."""
    return [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (tsval, 0)), ("NOP", None), ("WScale", 7)]


def ts_options(tsval, tsecr):
    return [("NOP", None), ("NOP", None), ("Timestamp", (tsval, tsecr))]


def from_client(flags, seq, ack=0, tcp_options=(), client=P.CLIENT, sport=40000, mac=P.CLIENT_MAC):
    return P.tcp(client, sport, P.VIP, 80, flags=flags, seq=seq, ack=ack, smac=mac, tcp_options=tcp_options)


def from_backend(flags, seq, ack, tcp_options=()):
    return P.tcp(P.BACKEND, 80, P.SNAT, PORT, flags=flags, seq=seq, ack=ack, smac=P.BACKEND_MAC,
                 dmac=P.LB_MAC, tcp_options=tcp_options)


@pytest.fixture
def one_port(harness):
    settings = dataclasses.replace(harness.settings, snat_port_min=PORT, snat_port_max=PORT)
    harness.sync([service(P.BACKEND)], settings)
    for backend_id in harness.dp.backend_ids().values():
        libbpf().update(harness.dp.fds["xdplb_port_cur"], ctypes.c_uint32(harness.dp.cursor_id(backend_id)),
                        ctypes.c_uint32(0))
    return harness


def run_all(h, packets) -> None:
    for pkt in packets:
        action, _ = h.run(pkt)
        assert action == XDP_TX, P.Ether(pkt).summary()


def open_flow(h, ts=True):
    """client 40000 -> backend through SNAT:PORT, handshake completed."""
    run_all(h, [
        from_client("S", CLIENT_ISN, tcp_options=syn_options(100) if ts else ()),
        from_backend("SA", BACKEND_ISN, CLIENT_ISN + 1, ts_options(900, 100) if ts else ()),
        from_client("A", CLIENT_ISN + 1, BACKEND_ISN + 1, ts_options(101, 900) if ts else ()),
    ])


def close_flow(h, ts=True):
    """The backend closes first (as an HTTP server with Connection: close does), the client
    answers with its FIN, the backend acknowledges it and sits in TIME_WAIT: it now holds
    timestamp 102 and expects sequence number CLIENT_ISN + 2."""
    run_all(h, [
        from_backend("FA", BACKEND_ISN + 1, CLIENT_ISN + 1, ts_options(901, 101) if ts else ()),
        from_client("FA", CLIENT_ISN + 1, BACKEND_ISN + 2, ts_options(102, 901) if ts else ()),
        from_backend("A", BACKEND_ISN + 2, CLIENT_ISN + 2, ts_options(902, 102) if ts else ()),
    ])


def new_syn(seq, tsval=None):
    return from_client("S", seq, tcp_options=syn_options(tsval) if tsval is not None else (),
                       client=P.CLIENT2, mac=P.CLIENT2_MAC)


def expected_to_backend(seq, tsval=None):
    return P.tcp(P.SNAT, PORT, P.BACKEND, 80, flags="S", seq=seq, smac=P.LB_MAC, dmac=P.BACKEND_MAC, ttl=63,
                 tcp_options=syn_options(tsval) if tsval is not None else ())


def backend_side_end(h) -> abi.FlowEnd:
    [index] = [i for i, _, _, _, flags in h.dp.flow_table().slots() if flags & abi.FlowFlags.REPLY]
    end = abi.FlowEnd()
    libbpf().lookup(h.dp.fds["xdplb_flow_ends"], ctypes.c_uint32(index), end)
    return end


def flags_of_flow(h) -> set[int]:
    return {flags for _, _, _, _, flags in h.dp.flow_table().slots()}


def test_closing_records_what_the_backend_knows_on_both_entries(one_port):
    h = one_port
    open_flow(h)
    assert flags_of_flow(h) == {0, int(abi.FlowFlags.REPLY)}  # the client's ACK ended the handshake
    close_flow(h)
    closed = int(abi.FlowFlags.CLOSING | abi.FlowFlags.FIN_CLIENT | abi.FlowFlags.FIN_BACKEND | abi.FlowFlags.END_TS)
    assert flags_of_flow(h) == {closed, closed | abi.FlowFlags.REPLY}
    end = backend_side_end(h)
    assert (end.ts_recent, end.rcv_nxt) == (102, CLIENT_ISN + 2)


@pytest.mark.parametrize("tsval, seq", [(102, CLIENT_ISN + 100), (50, CLIENT_ISN + 100), (2**31 + 200, 7)])
def test_a_syn_whose_timestamp_is_not_newer_gets_no_source_in_time_wait(one_port, tsval, seq):
    """The backend would drop it (PAWS) whatever its sequence number: the balancer drops it
    first, counted, and the client's retransmission may find a source later."""
    h = one_port
    open_flow(h)
    close_flow(h)
    action, _ = h.run(new_syn(seq, tsval))
    assert action == XDP_DROP
    counters = h.dp.counters()
    assert (counters["snat_exhausted"], counters["snat_reused"], counters["table_full"]) == (1, 0, 0)


@pytest.mark.parametrize("tsval, seq", [(103, 7), (2**31 + 101, CLIENT_ISN)])
def test_a_syn_with_a_newer_timestamp_takes_over_the_closed_flows_source(one_port, tsval, seq):
    h = one_port
    open_flow(h)
    close_flow(h)
    syn = new_syn(seq, tsval)
    action, out = h.run(syn)
    assert (action, out) == (XDP_TX, expected_to_backend(seq, tsval))
    assert h.dp.counters()["snat_reused"] == 1
    # The new flow owns the source both ways: the backend's SYN-ACK reaches the new client.
    action, out = h.run(from_backend("SA", 7000, seq + 1, ts_options(950, tsval)))
    assert action == XDP_TX
    assert (P.Ether(out)[P.IP].dst, P.Ether(out)[P.TCP].dport) == (P.CLIENT2, 40000)
    # The old client's late segment no longer reaches the backend inside the new connection.
    late = from_client("A", CLIENT_ISN + 2, BACKEND_ISN + 2, ts_options(104, 902))
    assert h.run(late) == (XDP_PASS, late)


@pytest.mark.parametrize("seq, reused", [(CLIENT_ISN + 2, False), (CLIENT_ISN + 1, False),
                                         (CLIENT_ISN + 3, True), ((CLIENT_ISN + 2 + 2**31) % 2**32, False)])
def test_without_timestamps_the_sequence_number_decides(one_port, seq, reused):
    h = one_port
    open_flow(h, ts=False)
    close_flow(h, ts=False)
    assert not {f & abi.FlowFlags.END_TS for f in flags_of_flow(h)} - {0}
    action, out = h.run(new_syn(seq, tsval=None))
    if reused:
        assert (action, out) == (XDP_TX, expected_to_backend(seq))
    else:
        assert action == XDP_DROP and h.dp.counters()["snat_exhausted"] == 1


def test_a_syn_with_timestamps_after_a_flow_without_them_needs_a_higher_sequence_number(one_port):
    """The backend's TIME_WAIT then holds no timestamp to compare: only the sequence number counts."""
    h = one_port
    open_flow(h, ts=False)
    close_flow(h, ts=False)
    assert h.run(new_syn(CLIENT_ISN, tsval=2**30))[0] == XDP_DROP
    assert h.run(new_syn(CLIENT_ISN + 50, tsval=2**30))[0] == XDP_TX


@pytest.mark.parametrize("closer", ["client", "backend"])
def test_a_half_closed_flow_keeps_its_source(one_port, closer):
    """One FIN is not the end: the other side may still be sending."""
    h = one_port
    open_flow(h)
    if closer == "client":
        run_all(h, [from_client("FA", CLIENT_ISN + 1, BACKEND_ISN + 1, ts_options(102, 900))])
    else:
        run_all(h, [from_backend("FA", BACKEND_ISN + 1, CLIENT_ISN + 1, ts_options(901, 101))])
    assert h.run(new_syn(CLIENT_ISN + 10**6, 10**6))[0] == XDP_DROP
    # ... and the open direction still flows.
    if closer == "client":
        run_all(h, [from_backend("PA", BACKEND_ISN + 1, CLIENT_ISN + 2, ts_options(901, 102))])
    else:
        run_all(h, [from_client("PA", CLIENT_ISN + 1, BACKEND_ISN + 2, ts_options(103, 901))])


@pytest.mark.parametrize("sender", ["client", "backend"])
def test_a_reset_before_the_backend_closed_frees_the_source_after_tcp_syn(one_port, sender):
    """The reset may not have reached or convinced the backend (out of window), so the
    source is not handed out at once, but after timeouts.tcp_syn instead of 120 s."""
    h = one_port
    open_flow(h)
    if sender == "client":
        run_all(h, [from_client("R", CLIENT_ISN + 1)])
    else:
        run_all(h, [from_backend("R", BACKEND_ISN + 1, 0)])
    reset = int(abi.FlowFlags.CLOSING | abi.FlowFlags.RESET)
    assert flags_of_flow(h) == {reset, reset | abi.FlowFlags.REPLY}
    assert h.run(new_syn(10**6, tsval=10**6))[0] == XDP_DROP
    cfg = abi.Config()
    libbpf().lookup(h.dp.fds["xdplb_config"], ctypes.c_uint32(0), cfg)
    _stamp_all(h, clock.now_ticks(cfg.tick_shift) - cfg.tcp_syn_expiry_ticks - 5)
    action, out = h.run(new_syn(7, tsval=1))
    assert (action, out) == (XDP_TX, expected_to_backend(7, 1))


def test_a_client_reset_after_the_backends_fin_still_needs_a_newer_syn(one_port):
    """The backend is in FIN_WAIT or TIME_WAIT, which a reset does not always end: the
    record decides, as for a FIN."""
    h = one_port
    open_flow(h)
    run_all(h, [from_backend("FA", BACKEND_ISN + 1, CLIENT_ISN + 1, ts_options(901, 101)),
                from_client("R", CLIENT_ISN + 1)])
    assert h.run(new_syn(7, tsval=101))[0] == XDP_DROP
    action, out = h.run(new_syn(7, tsval=102))
    assert (action, out) == (XDP_TX, expected_to_backend(7, 102))


def _stamp_all(h, ticks: int) -> None:
    with h.dp.flow_table() as table:
        for index, *_ in table.slots():
            at = index * ctypes.sizeof(abi.FlowSlot) + abi.FlowSlot.last_seen.offset
            table._map[at:at + 4] = (ticks % (1 << 32)).to_bytes(4, "little")


def test_a_handshake_nobody_completes_frees_its_source_after_tcp_syn(one_port):
    """A spoofed SYN: the backend's SYN-ACKs go nowhere and are repeated, which must not
    keep the half-open flow alive; after timeouts.tcp_syn of silence from the client the
    source is free, and the backend's next SYN-ACK is handed to the kernel."""
    h = one_port
    cfg = abi.Config()
    libbpf().lookup(h.dp.fds["xdplb_config"], ctypes.c_uint32(0), cfg)
    assert cfg.tcp_syn_timeout_s == h.settings.tcp_syn_timeout_s <= 10
    run_all(h, [from_client("S", CLIENT_ISN, tcp_options=syn_options(100)),
                from_backend("SA", BACKEND_ISN, CLIENT_ISN + 1, ts_options(900, 100))])
    now = clock.now_ticks(cfg.tick_shift)
    _stamp_all(h, now - cfg.tcp_syn_expiry_ticks + 5)
    assert h.run(new_syn(7, tsval=1))[0] == XDP_DROP  # not yet
    _stamp_all(h, now - cfg.tcp_syn_expiry_ticks - 5)
    # The backend repeats its SYN-ACK: it now goes to this host's kernel, whose reset ends
    # the backend's half-open connection before a new flow gets the tuple.
    repeated = from_backend("SA", BACKEND_ISN, CLIENT_ISN + 1, ts_options(1900, 100))
    assert h.run(repeated) == (XDP_PASS, repeated)
    action, out = h.run(new_syn(7, tsval=1))
    assert (action, out) == (XDP_TX, expected_to_backend(7, 1))
    assert h.dp.counters()["snat_reused"] == 0  # expired, not taken over


def test_a_completed_handshake_gets_the_established_timeout(one_port):
    h = one_port
    cfg = abi.Config()
    libbpf().lookup(h.dp.fds["xdplb_config"], ctypes.c_uint32(0), cfg)
    open_flow(h)
    _stamp_all(h, clock.now_ticks(cfg.tick_shift) - cfg.tcp_syn_expiry_ticks - 5)
    assert h.run(new_syn(10**6, tsval=10**6))[0] == XDP_DROP
    assert list(h.dp.active_flows().values()) == [1]


def test_snat_usage_counts_open_and_closed_sources_per_backend(harness):
    """What `xdplb stats` and the metrics report: sources held by open flows, and by
    closed ones whose backend may still be in TIME_WAIT."""
    h = harness
    h.configure([service(P.BACKEND)])
    for sport in (41000, 41001, 41002):
        run_all(h, [from_client("S", CLIENT_ISN, sport=sport)])
    assert [(u.snat, u.backend, u.open, u.time_wait) for u in h.dp.snat_usage()] == [
        (P.SNAT, f"{P.BACKEND}:80/tcp", 3, 0)]
    first = 20000  # the harness starts the cursor at the first port: 41000 has it
    run_all(h, [
        P.tcp(P.BACKEND, 80, P.SNAT, first, flags="FA", seq=1, ack=CLIENT_ISN + 1, smac=P.BACKEND_MAC, dmac=P.LB_MAC),
        from_client("FA", CLIENT_ISN + 1, 2, sport=41000),
    ])
    assert [(u.open, u.time_wait) for u in h.dp.snat_usage()] == [(2, 1)]


def test_a_udp_service_keeps_its_own_idle_timeout(harness):
    """A DNS-like service forgets its flows after its udp_timeout; another UDP service on
    the same interface keeps the interface's timeouts.udp."""
    h = harness
    dns = dataclasses.replace(service(P.BACKEND, port=53, proto="udp"), udp_timeout_s=10)
    other = service(P.BACKEND2, port=5353, proto="udp")
    h.configure([dns, other])
    assert {s.port: s.udp_timeout_s for s in h.dp.services()} == {53: 10, 5353: 0}
    cfg = abi.Config()
    libbpf().lookup(h.dp.fds["xdplb_config"], ctypes.c_uint32(0), cfg)
    q1, q2 = P.udp(P.CLIENT, 5000, P.VIP, 53), P.udp(P.CLIENT, 5000, P.VIP, 5353)
    assert h.run(q1)[0] == XDP_TX and h.run(q2)[0] == XDP_TX
    eleven_s = clock.to_ticks(11, clock.jiffy_ns(), cfg.tick_shift)
    _stamp_all(h, clock.now_ticks(cfg.tick_shift) - eleven_s - clock.to_ticks(1, clock.jiffy_ns(), cfg.tick_shift))
    assert h.dp.active_flows() == {h.dp.backend_ids()[(1, f"{P.BACKEND2}:80")]: 1}
    h.run(q1)
    h.run(q2)
    assert h.dp.counters()["new_flow"] == 3  # the DNS query opened a new flow, the other did not
    # A change applies to flows created after it.
    h.configure([dataclasses.replace(dns, udp_timeout_s=0), other])
    assert {s.port: s.udp_timeout_s for s in h.dp.services()} == {53: 0, 5353: 0}
