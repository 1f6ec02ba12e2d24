# SPDX-License-Identifier: Apache-2.0
"""The data plane's clock: ticks of jiffies >> tick_shift (bpf/xdplb_abi.h).

The tick length depends on the kernel's CONFIG_HZ, which the coarse monotonic clock
reveals: it advances once per jiffy, so its resolution is one jiffy. The current tick
is read by test-running a tiny program (raw instructions, no compiler needed) that
calls the same helper as the data plane.
"""
from __future__ import annotations

import math
import time

from . import abi
from .libbpf import libbpf

NS = 1_000_000_000
CLOCK_MONOTONIC_COARSE = getattr(time, "CLOCK_MONOTONIC_COARSE", 6)
TOUCH_S = 1
BPF_FUNC_JIFFIES64 = 118
CLOCK_NAME = "xdplb_clock"


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


def clock_insns(shift: int) -> bytes:
    """call bpf_jiffies64; r0 >>= shift; exit. A test run returns the low 32 bits of r0:
    the data plane's tick, truncated exactly as it truncates it."""
    return bytes([0x85, 0, 0, 0, *BPF_FUNC_JIFFIES64.to_bytes(4, "little"),
                  0x77, 0, 0, 0, shift, 0, 0, 0,
                  0x95, 0, 0, 0, 0, 0, 0, 0])


def load_clock_program(shift: int) -> int:
    """Loads the clock program (raw instructions, no compiler needed); returns its fd."""
    return libbpf().load_xdp_insns(CLOCK_NAME, clock_insns(shift), "load the clock program")


_clock_fds: dict[int, int] = {}  # shift -> the clock program's fd, loaded once per process


def now_ticks(shift: int) -> int:
    """The data plane's current tick (jiffies >> shift, low 32 bits), read by running
    the same helper it uses."""
    if shift not in _clock_fds:
        _clock_fds[shift] = load_clock_program(shift)
    retval, _, _ = libbpf().test_run(_clock_fds[shift], bytes(64))
    return retval


def ticks_since(now: int, then: int) -> int:
    """now - then in 32-bit ticks, signed as the data plane compares them."""
    return (now - then + (1 << 31)) % (1 << 32) - (1 << 31)
