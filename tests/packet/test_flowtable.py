# SPDX-License-Identifier: Apache-2.0
"""src/xdplb/flowtable.py against a table the data plane filled with real packets: the
scans, resetting a backend's flows (and leaving alone a slot reused since the scan),
and next-hop generations that come round again after 256 bumps."""
from __future__ import annotations

import ctypes
import dataclasses
import socket

import pytest

from xdplb import abi, clock, hashing
from xdplb.flowtable import SLOT_SIZE, FlowTable, SnatUse
from xdplb.libbpf import libbpf
from xdplb.netlink import NextHop

from . import packets as P
from .conftest import LOOPBACK, XDP_PASS, XDP_TX, service
from .test_forwarding import FIRST, from_backend, syn, to_backend, to_client

UDP_SERVICE_PORT = 53


@pytest.fixture
def table(harness):
    with FlowTable(harness.dp.fds["xdplb_flows"], harness.dp.flow_slot_count()) as t:
        yield t


def config(harness) -> abi.Config:
    cfg = abi.Config()
    libbpf().lookup(harness.dp.fds["xdplb_config"], ctypes.c_uint32(0), cfg)
    return cfg


def write_config(harness, cfg: abi.Config) -> None:
    libbpf().update(harness.dp.fds["xdplb_config"], ctypes.c_uint32(0), cfg)


def ack(sport, client=P.CLIENT, flags="A", **kw):
    return P.tcp(client, sport, P.VIP, 80, flags=flags, seq=1001, **kw)


def stamp(table: FlowTable, index: int, ticks: int) -> None:
    at = index * SLOT_SIZE + abi.FlowSlot.last_seen.offset
    table._map[at:at + 4] = (ticks % (1 << 32)).to_bytes(4, "little")


def client_side(table: FlowTable, sport: int, client: str = P.CLIENT) -> int:
    """The index of the client-side slot of CLIENT:sport -> VIP:80."""
    key = (socket.inet_aton(client), socket.inet_aton(P.VIP), socket.htons(sport))
    for index, *_ in table.slots():
        s = table.slot(index)
        if (s.key.saddr.to_bytes(4, "little"), s.key.daddr.to_bytes(4, "little"), s.key.sport) == key:
            return index
    raise AssertionError(f"no slot for {client}:{sport}")


def backend_id(harness, port: int, addr: str, proto: str = "tcp") -> int:
    svc = harness.dp.service_ids()[f"{P.VIP}:{port}/{proto}"]
    return harness.dp.backend_ids()[(svc, f"{addr}:80")]


def open_flows(harness):
    """TCP to :80 (BACKEND): 40000 established, 40001 in its handshake, 40002 closed by
    both sides; TCP to :8080 (BACKEND2): 40010 and 40011; UDP to :53 (BACKEND): 5000."""
    harness.configure([service(P.BACKEND), service(P.BACKEND2, port=8080),
                       service(P.BACKEND, port=UDP_SERVICE_PORT, proto="udp")])
    for sport in (40000, 40001, 40002):
        assert harness.run(syn(sport=sport))[0] == XDP_TX
    for sport in (40000, 40002):
        assert harness.run(ack(sport))[0] == XDP_TX
    assert harness.run(from_backend(FIRST + 2, flags="FA", seq=5001, ack=1001))[0] == XDP_TX
    assert harness.run(ack(40002, flags="FA", ack=5002))[0] == XDP_TX
    for sport in (40010, 40011):
        assert harness.run(P.tcp(P.CLIENT, sport, P.VIP, 8080, flags="S"))[0] == XDP_TX
    assert harness.run(P.udp(P.CLIENT, 5000, P.VIP, UDP_SERVICE_PORT))[0] == XDP_TX


def test_scans_read_what_packets_wrote(harness, table):
    open_flows(harness)
    cfg = config(harness)
    tcp80, tcp8080, udp = (backend_id(harness, 80, P.BACKEND), backend_id(harness, 8080, P.BACKEND2),
                           backend_id(harness, UDP_SERVICE_PORT, P.BACKEND, "udp"))
    assert table.count() == 12
    assert table.active_flows(cfg) == {tcp80: 2, tcp8080: 2, udp: 1}  # the closed flow is not active
    assert table.snat_usage(cfg) == [SnatUse(P.SNAT, f"{P.BACKEND}:80/tcp", 2, 1),
                                     SnatUse(P.SNAT, f"{P.BACKEND}:80/udp", 1, 0),
                                     SnatUse(P.SNAT, f"{P.BACKEND2}:80/tcp", 2, 0)]
    assert table.held_snat_ports(cfg) == {FIRST, FIRST + 1, FIRST + 2}

    # An entry idle past its timeout still counts as an entry, not as a flow.
    now = clock.now_ticks(cfg.tick_shift)
    stamp(table, client_side(table, 40000), now - cfg.tcp_expiry_ticks - 5)
    assert table.count() == 12
    assert table.active_flows(cfg) == {tcp80: 1, tcp8080: 2, udp: 1}
    assert table.active_flows(cfg, now - 10) == {tcp80: 2, tcp8080: 2, udp: 1}  # not yet idle that long
    # The UDP flow, seen a UDP timeout ago, has expired on both sides.
    later = now + cfg.udp_expiry_ticks + 5
    assert udp not in table.active_flows(cfg, later)
    assert SnatUse(P.SNAT, f"{P.BACKEND}:80/udp", 1, 0) not in table.snat_usage(cfg, later)


def test_reset_flows_forgets_both_directions_of_one_backend(harness, table):
    open_flows(harness)
    assert table.reset_flows(backend_id(harness, 80, P.BACKEND)) == 3
    assert table.count() == 6
    assert harness.run(ack(40000)) == (XDP_PASS, ack(40000))
    reply = from_backend(FIRST, flags="A")
    assert harness.run(reply) == (XDP_PASS, reply)
    to_8080 = P.tcp(P.CLIENT, 40010, P.VIP, 8080, flags="A", seq=1001)
    expected = P.tcp(P.SNAT, FIRST, P.BACKEND2, 80, flags="A", seq=1001, smac=P.LB_MAC, dmac=P.BACKEND2_MAC, ttl=63)
    assert harness.run(to_8080) == (XDP_TX, expected)
    assert table.reset_flows(backend_id(harness, 80, P.BACKEND)) == 0


def test_a_kill_checks_the_slot_still_holds_what_the_scan_saw(harness, table):
    harness.configure([service(P.BACKEND)])
    harness.run(syn())
    be = backend_id(harness, 80, P.BACKEND)
    refs = table.backend_slots(be)
    assert len(refs) == 2
    client = next(r for r in refs if not table.slot(r.index).flow.flags & abi.FlowFlags.REPLY)
    stale = [dataclasses.replace(client, seq=client.seq + 2), dataclasses.replace(client, seq=client.seq + 1),
             dataclasses.replace(client, key=bytes(16)), dataclasses.replace(client, backend_id=be + 1)]
    assert table.kill(stale) == 0
    assert harness.run(ack(40000)) == (XDP_TX, to_backend(FIRST, 80, flags="A", seq=1001))
    # Refused after taking the slot (key or backend differ), a kill still moved its seq on,
    # as any writer does: the refs of an earlier scan no longer hold.
    assert table.kill([client]) == 0
    refs = table.backend_slots(be)
    seq = table.slot(client.index).seq
    assert table.kill(refs) == 1
    # Held as a writer holds it: seq moved on by two, even again.
    assert table.slot(client.index).seq == seq + 2
    assert table.slot(client.index).flow.flags & abi.FlowFlags.DEAD
    assert harness.run(ack(40000)) == (XDP_PASS, ack(40000))
    assert table.count() == 0


def test_a_slot_reused_between_scan_and_kill_is_left_alone(harness, table):
    """The client side of an expired flow is taken over by another client's new flow
    (one whose home slot is the same) after the scan: the kill leaves the newcomer be."""
    harness.configure([service(P.BACKEND)])
    harness.run(syn())
    cfg = config(harness)
    refs = table.backend_slots(backend_id(harness, 80, P.BACKEND))
    old = client_side(table, 40000)
    stamp(table, old, clock.now_ticks(cfg.tick_shift) - cfg.tcp_syn_expiry_ticks - 5)
    sport = next(p for p in range(1024, 65536)
                 if hashing.flow_hash(P.CLIENT2, p, P.VIP, 80, socket.IPPROTO_TCP, cfg.flow_seed) & cfg.flow_mask
                 == old)
    assert harness.run(syn(sport=sport, client=P.CLIENT2, mac=P.CLIENT2_MAC)) == (XDP_TX, to_backend(FIRST + 1, 80))
    assert client_side(table, sport, P.CLIENT2) == old

    assert table.kill(refs) == 0  # only the old flow's backend side is still what the scan saw
    newcomer = ack(sport, client=P.CLIENT2, smac=P.CLIENT2_MAC)
    assert harness.run(newcomer) == (XDP_TX, to_backend(FIRST + 1, 80, flags="A", seq=1001))
    reply = from_backend(FIRST + 1, flags="A")
    assert harness.run(reply) == (XDP_TX, to_client(sport, flags="A", client=P.CLIENT2, mac=P.CLIENT2_MAC))


def bump(harness, table: FlowTable) -> int:
    """What the control plane does to announce rewritten next hops (after the backend
    entries): moves the bytes out of the way, then writes the new generation."""
    cfg = config(harness)
    gen = (cfg.hop_gen + 1) & 0xFFFFFFFF
    table.before_hop_bump(gen)
    cfg.hop_gen = gen
    write_config(harness, cfg)
    return gen


def test_a_flow_idle_across_256_bumps_follows_the_new_next_hop(harness, table):
    """The flow keeps one byte of the generation: 256 bumps later the byte matches again,
    and without the control plane's sweep the flow would keep the next hop it copied
    before the first bump."""
    harness.configure([service(P.BACKEND)])
    harness.run(syn())
    created = table.slot(client_side(table, 40000)).flow.hop_gen
    assert created == config(harness).hop_gen & 0xFF
    moved = "02:00:00:00:00:c1"
    assert harness.move_hop(P.BACKEND, NextHop(LOOPBACK, moved, P.LB_MAC))  # one bump
    for _ in range(255):
        gen = bump(harness, table)
    assert gen & 0xFF == created
    assert harness.run(ack(40000)) == (XDP_TX, to_backend(FIRST, 80, flags="A", seq=1001, mac=moved))


def test_a_flow_whose_next_hop_stayed_takes_the_new_generation(harness, table):
    """A bump for another backend costs the flow one lookup, after which its slot holds
    the new generation; a flow of the backend that moved keeps looking it up."""
    harness.configure([service(P.BACKEND), service(P.BACKEND2, port=8080)])
    harness.run(syn())
    harness.run(P.tcp(P.CLIENT, 40001, P.VIP, 8080, flags="S"))
    moved = "02:00:00:00:00:c2"
    assert harness.move_hop(P.BACKEND2, NextHop(LOOPBACK, moved, P.LB_MAC))
    gen = config(harness).hop_gen & 0xFF
    stayed, went = client_side(table, 40000), client_side(table, 40001)
    assert table.slot(stayed).flow.hop_gen != gen
    assert harness.run(ack(40000)) == (XDP_TX, to_backend(FIRST, 80, flags="A", seq=1001))
    assert table.slot(stayed).flow.hop_gen == gen
    to_8080 = P.tcp(P.CLIENT, 40001, P.VIP, 8080, flags="A", seq=1001)
    expected = P.tcp(P.SNAT, FIRST, P.BACKEND2, 80, flags="A", seq=1001, smac=P.LB_MAC, dmac=moved, ttl=63)
    assert harness.run(to_8080) == (XDP_TX, expected)
    assert table.slot(went).flow.hop_gen != gen


def test_the_sweep_moves_only_client_sides_holding_the_coming_byte(harness, table):
    harness.configure([service(P.BACKEND)])
    harness.run(syn())
    gen = config(harness).hop_gen
    client = client_side(table, 40000)
    assert table.before_hop_bump(gen + 1) == 0
    assert table.before_hop_bump(gen + 256) == 1  # the byte of the flow's own generation
    assert table.slot(client).flow.hop_gen == (gen + 128) & 0xFF
    assert harness.run(ack(40000)) == (XDP_TX, to_backend(FIRST, 80, flags="A", seq=1001))
    assert table.slot(client).flow.hop_gen == gen & 0xFF  # found right again
