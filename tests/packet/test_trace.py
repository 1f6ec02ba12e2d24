# SPDX-License-Identifier: Apache-2.0
"""Tracing is a lease: the data plane prints a trace line only while the trace flag is
set and its deadline lies ahead (bpf/xdplb.bpf.c, trace_line).

A trace line's arguments go through the per-CPU map xdplb_trace_args right before it is
printed, so the tests read that map (the harness runs on CPU 0) instead of the global
trace_pipe, which a concurrent `xdplb trace` would read away."""
from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import os
import time

import pytest

from xdplb import abi, clock
from xdplb.libbpf import MapInfo, libbpf

from . import packets as P
from .conftest import XDP_TX, service

TRACE_ARGS = 12
TRACE_VALUE = TRACE_ARGS * 8 + 3 * 16  # struct trace_args: the arguments, then an IPv6 line's addresses


def open_trace_args(prog_fd: int) -> int:
    """An fd of the program's xdplb_trace_args (the kernel keeps 15 characters of its name)."""
    lib = libbpf()
    for map_id in lib.prog_map_ids(prog_fd):
        fd = lib.bpf_map_get_fd_by_id(map_id)
        if lib.obj_info(fd, MapInfo()).name.decode() == "xdplb_trace_arg":
            return fd
        os.close(fd)
    pytest.fail("the program has no xdplb_trace_args map")


@pytest.fixture
def trace_args(harness):
    fd = open_trace_args(harness.prog_fd)
    yield fd
    os.close(fd)


def traced(harness, fd, sport: int) -> list[int] | None:
    """Runs a SYN from `sport` and returns the trace line it printed (its arguments), or
    None if it printed none."""
    lib = libbpf()
    size = TRACE_VALUE * harness.dp.ncpus
    lib.update(fd, ctypes.c_uint32(0), ctypes.create_string_buffer(size))
    action, _ = harness.run(P.tcp(P.CLIENT, sport, P.VIP, 80, flags="S"))
    assert action == XDP_TX
    buf = ctypes.create_string_buffer(size)
    lib.lookup(fd, ctypes.c_uint32(0), buf)
    cpu0 = list((ctypes.c_uint64 * TRACE_ARGS).from_buffer_copy(buf.raw[:TRACE_ARGS * 8]))
    return cpu0 if any(cpu0) else None


def set_lease(harness, until: int) -> None:
    """The trace flag with a raw deadline, as a reader would have left it."""
    cfg = harness.dp._config()
    cfg.flags |= abi.ConfigFlags.TRACE
    cfg.trace_until = until & 0xFFFFFFFF
    libbpf().update(harness.dp.fds["xdplb_config"], ctypes.c_uint32(0), cfg)


def now(harness) -> int:
    return clock.now_ticks(harness.dp._config().tick_shift)


def test_a_live_lease_traces_and_its_line_describes_the_packet(harness, trace_args):
    harness.configure([service(P.BACKEND)])
    assert traced(harness, trace_args, 40000) is None  # off by default
    harness.dp.set_trace(True)
    assert harness.dp.read_settings().trace is True
    line = traced(harness, trace_args, 40001)
    client = int(ipaddress.IPv4Address(P.CLIENT))
    assert line is not None and line[1:7] == [6, 0x02, client, 40001, int(ipaddress.IPv4Address(P.VIP)), 80]
    assert (line[10], line[11]) == (abi.TraceEvent.NEW_FLOW, XDP_TX)
    harness.dp.set_trace(False)
    assert traced(harness, trace_args, 40002) is None
    assert harness.dp.read_settings().trace is False


def test_an_expired_lease_traces_nothing_though_the_flag_is_left_on(harness, trace_args):
    """What a killed `xdplb trace` leaves behind: the flag, and a deadline in the past."""
    harness.configure([service(P.BACKEND)])
    set_lease(harness, now(harness) - 1)
    assert traced(harness, trace_args, 40010) is None
    assert harness.dp.read_settings().trace is False
    # Deadlines further ahead than a lease can be (a wrapped-around old one) count as expired.
    set_lease(harness, now(harness) + abi.TRACE_LEASE_MAX_TICKS + 100)
    assert traced(harness, trace_args, 40011) is None
    assert harness.dp.read_settings().trace is False
    set_lease(harness, now(harness) + 200)
    assert traced(harness, trace_args, 40012) is not None
    assert harness.dp.read_settings().trace is True


def test_a_lease_runs_out_on_the_data_planes_clock(harness, trace_args):
    harness.configure([service(P.BACKEND)])
    harness.dp.renew_trace(0.5)
    assert traced(harness, trace_args, 40020) is not None
    time.sleep(0.8)
    assert traced(harness, trace_args, 40021) is None
    assert harness.dp.read_settings().trace is False
    harness.dp.renew_trace()
    assert traced(harness, trace_args, 40022) is not None


def test_rewriting_settings_keeps_a_live_lease_and_clears_an_expired_one(harness, trace_args):
    harness.configure([service(P.BACKEND)])
    harness.dp.renew_trace()
    harness.sync(settings=dataclasses.replace(harness.settings, udp_timeout_s=301))
    assert harness.dp.read_settings().trace is True
    set_lease(harness, now(harness) - 1)
    harness.sync(settings=dataclasses.replace(harness.settings, udp_timeout_s=302))
    cfg = harness.dp._config()
    assert (cfg.flags & abi.ConfigFlags.TRACE, cfg.trace_until) == (0, 0)
