# SPDX-License-Identifier: Apache-2.0
"""The data plane's clock: ticks of jiffies >> tick_shift (bpf/xdplb_abi.h).

The tick length depends on the kernel's CONFIG_HZ, which the coarse monotonic clock
reveals: it advances once per jiffy, so its resolution is one jiffy.
"""
from __future__ import annotations

import math
import time

from . import abi, stubs
from .libbpf import libbpf

NS = 1_000_000_000
CLOCK_MONOTONIC_COARSE = getattr(time, "CLOCK_MONOTONIC_COARSE", 6)
TOUCH_S = 1


def jiffy_ns() -> int:
    return round(time.clock_getres(CLOCK_MONOTONIC_COARSE) * NS)


def tick_shift(jiffy: int) -> int:
    """The smallest shift that makes a tick at least TICK_MIN_NS long."""
    shift = 0
    while jiffy << shift < abi.TICK_MIN_NS:
        shift += 1
    return shift


def to_ticks(seconds: int, jiffy: int, shift: int) -> int:
    """Whole ticks covering `seconds` (rounded up: a flow never expires early)."""
    return math.ceil(seconds * NS / (jiffy << shift))


_clock_fds: dict[int, int] = {}


def now_ticks(shift: int) -> int:
    """The data plane's current tick (jiffies >> shift, low 32 bits), read by running
    the same helper it uses."""
    if shift not in _clock_fds:
        _clock_fds[shift] = stubs.load_clock_program(shift)
    retval, _, _ = libbpf().test_run(_clock_fds[shift], bytes(64))
    return retval


def ticks_since(now: int, then: int) -> int:
    """now - then in 32-bit ticks, signed as the data plane compares them."""
    return (now - then + (1 << 31)) % (1 << 32) - (1 << 31)
