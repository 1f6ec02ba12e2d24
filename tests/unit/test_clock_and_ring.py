# SPDX-License-Identifier: Apache-2.0
"""The tick arithmetic the control plane shares with the data plane, and the packed
ring layout."""
from __future__ import annotations

import pytest

from xdplb import abi, clock
from xdplb.dataplane import pack_ring, unpack_ring


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
