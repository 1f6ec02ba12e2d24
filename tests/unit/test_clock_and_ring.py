# SPDX-License-Identifier: Apache-2.0
"""The tick arithmetic the control plane shares with the data plane, the packed ring
layout and the service table layout."""
from __future__ import annotations

import ipaddress
import socket

import pytest

from xdplb import abi, clock, hashing
from xdplb.layout import be32, pack_ring, service_table, unpack_ring
from xdplb.errors import XdplbError


@pytest.mark.parametrize("hz", [100, 250, 300, 1000])
def test_a_tick_is_8_to_16_ms_whatever_the_kernel_hz(hz):
    jiffy = 1_000_000_000 // hz
    tick = jiffy << clock.tick_shift(jiffy)
    assert abi.TICK_MIN_NS <= tick < 2 * abi.TICK_MIN_NS


def test_timeouts_round_up_to_whole_ticks():
    jiffy = 4_000_000  # HZ=250
    shift = clock.tick_shift(jiffy)
    assert shift == 1
    assert clock.to_ticks(1, jiffy, shift) == 125
    assert clock.to_ticks(900, jiffy, shift) == 112_500
    assert clock.to_ticks(1, 3_333_333, 2) == 76  # 13.3 ms ticks: 75.0000075 -> 76


def test_tick_differences_are_signed_and_wrap():
    assert clock.ticks_since(5, 3) == 2
    assert clock.ticks_since(3, 5) == -2
    assert clock.ticks_since(2, 0xFFFFFFFE) == 4
    assert clock.ticks_since(0x7FFFFFFF, 0) == 0x7FFFFFFF


def test_ring_packs_four_slots_per_value_and_back():
    slots = [7, abi.NO_BACKEND, 0, 4095, 1, 2, 3]
    values = pack_ring(slots)
    assert len(values) == 2
    assert values[0] == 7 | abi.NO_BACKEND << 16 | 0 << 32 | 4095 << 48
    assert values[1] == 1 | 2 << 16 | 3 << 32 | abi.NO_BACKEND << 48
    assert unpack_ring(values, len(slots)) == slots
    assert len(pack_ring([0] * abi.RING_SLOTS)) == abi.RING_ENTRIES


def _key(vip: ipaddress.IPv4Address, port: int = 80) -> abi.ServiceKey:
    return abi.ServiceKey(vip=be32(vip), port=socket.htons(port), proto=socket.IPPROTO_TCP)


def _same_home(count: int) -> list[ipaddress.IPv4Address]:
    """Addresses whose service keys (port 80/tcp) share one home slot."""
    home = hashing.service_hash("10.0.0.1", 80, socket.IPPROTO_TCP) % abi.SERVICE_SLOTS
    found, addr = [], ipaddress.IPv4Address("10.0.0.1")
    while len(found) < count:
        if hashing.service_hash(str(addr), 80, socket.IPPROTO_TCP) % abi.SERVICE_SLOTS == home:
            found.append(addr)
        addr += 1
    return found


def test_service_table_probes_linearly_from_the_home_slot():
    vips = _same_home(3)
    slots = service_table([(_key(v), abi.Service(id=i, ring_size=13)) for i, v in enumerate(vips)])
    home = hashing.service_hash(str(vips[0]), 80, socket.IPPROTO_TCP) % abi.SERVICE_SLOTS
    assert [slots[(home + d) % abi.SERVICE_SLOTS].svc.id for d in range(3)] == [0, 1, 2]
    assert sum(1 for s in slots if s.key.proto) == 3


def test_service_table_refuses_a_key_beyond_the_probe_window():
    vips = _same_home(abi.SERVICE_PROBES + 1)
    with pytest.raises(XdplbError, match="collides"):
        service_table([(_key(v), abi.Service(id=i)) for i, v in enumerate(vips)])
