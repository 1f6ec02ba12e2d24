# SPDX-License-Identifier: Apache-2.0
"""FlowTable over a file laid out as the flow table (no root needed): the data plane's
expiry rules on 32-bit ticks that wrap, and the checks a kill makes before it writes."""
from __future__ import annotations

import socket

import pytest

from xdplb import abi
from xdplb.flowtable import SLOT_SIZE, FlowTable

F = abi.FlowFlags
SLOTS = 64


def cfg() -> abi.Config:
    return abi.Config(tcp_expiry_ticks=1000, tcp_closing_expiry_ticks=100, udp_expiry_ticks=50,
                      tcp_syn_expiry_ticks=10, ticks_per_s=4, touch_ticks=2)


def put(f, index: int, **fields) -> None:
    """A slot written into the file: key fields by name, flow fields prefixed flow_."""
    s = abi.FlowSlot(seq=fields.pop("seq", 2), last_seen=fields.pop("last_seen", 0) % (1 << 32))
    s.key.saddr, s.key.daddr = fields.pop("saddr", 1), fields.pop("daddr", 2)
    s.key.sport, s.key.dport = fields.pop("sport", 3), fields.pop("dport", 4)
    s.key.proto = fields.pop("proto", socket.IPPROTO_TCP)
    for name, value in fields.items():
        setattr(s.flow, name.removeprefix("flow_"), value)
    f.seek(index * SLOT_SIZE)
    f.write(bytes(s))
    f.flush()


@pytest.fixture
def table_file(tmp_path):
    with open(tmp_path / "flows", "w+b") as f:
        f.truncate(SLOTS * SLOT_SIZE)
        yield f


def test_expiry_follows_the_data_planes_rules_across_the_tick_wrap(table_file):
    now = 5  # just after the 32-bit tick counter wrapped
    put(table_file, 0, last_seen=now - 1000, flow_backend_id=1)                       # established, at its limit
    put(table_file, 1, last_seen=now - 1001, flow_backend_id=1)                       # one tick past it
    put(table_file, 2, last_seen=now - 20, flow_backend_id=2, flow_flags=F.HANDSHAKE)  # syn timeout passed
    put(table_file, 3, last_seen=now - 20, flow_backend_id=3, flow_flags=F.RESET | F.FIN_BACKEND | F.CLOSING)
    put(table_file, 4, last_seen=now - 60, flow_backend_id=4, proto=socket.IPPROTO_UDP, flow_udp_timeout_s=15)
    put(table_file, 5, last_seen=now - 60, flow_backend_id=5, proto=socket.IPPROTO_UDP)
    put(table_file, 6, last_seen=now + 3, flow_backend_id=6)  # stamped by another CPU a tick ahead
    put(table_file, 7, last_seen=now, flow_backend_id=7, flow_flags=F.DEAD)
    with FlowTable(table_file.fileno(), SLOTS) as t:
        assert t.count() == 7
        assert t.active_flows(cfg(), now) == {1: 1, 4: 1, 6: 1}


def test_a_kill_writes_only_into_a_slot_that_still_holds_what_the_scan_saw(table_file):
    for index in range(4):
        put(table_file, index, sport=100 + index, flow_backend_id=9)
    put(table_file, 4, sport=200, flow_backend_id=9, flow_flags=F.REPLY)
    with FlowTable(table_file.fileno(), SLOTS) as t:
        refs = t.backend_slots(9)
        assert [r.index for r in refs] == [0, 1, 2, 3, 4]
        # Between the scan and the kill: a writer at work on slot 0, slot 1 taken by
        # another key, slot 2 by another backend's flow (same seq: checked anyway).
        put(table_file, 0, seq=3, sport=100, flow_backend_id=9)
        put(table_file, 1, seq=4, sport=999, flow_backend_id=9)
        put(table_file, 2, seq=2, sport=102, flow_backend_id=8)
        assert t.kill(refs) == 1  # slot 3; slot 4 is a backend side, not counted as a flow
        flags = [t.slot(i).flow.flags for i in range(5)]
        assert [bool(f & F.DEAD) for f in flags] == [False, False, False, True, True]
        assert [t.slot(i).seq for i in range(5)] == [3, 4, 4, 4, 4]  # refused after holding: moved on
        assert t.slot(4).flow.flags == F.REPLY | F.DEAD  # the rest of the word kept


def test_the_sweep_moves_the_coming_byte_of_client_sides_only(table_file):
    put(table_file, 0, flow_hop_gen=7)
    put(table_file, 1, flow_hop_gen=7, flow_flags=F.REPLY)
    put(table_file, 2, flow_hop_gen=7, flow_flags=F.DEAD)
    put(table_file, 3, flow_hop_gen=6)
    with FlowTable(table_file.fileno(), SLOTS) as t:
        assert t.before_hop_bump(0x107) == 1
        assert [t.slot(i).flow.hop_gen for i in range(4)] == [0x87, 7, 7, 6]
        assert t.before_hop_bump(0x108) == 0
