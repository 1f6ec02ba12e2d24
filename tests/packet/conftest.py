# SPDX-License-Identifier: Apache-2.0
"""A loaded (not attached) data plane for BPF_PROG_TEST_RUN, with the configuration
the packet tests use: one service VIP:80/tcp, backends reached through interface 1.

Without a context, test runs see the loopback device (ifindex 1) as the ingress
interface, so backends on ifindex 1 are sent with XDP_TX and others with XDP_REDIRECT."""
from __future__ import annotations

import ctypes
import ipaddress
import os
from dataclasses import dataclass

import pytest

from xdplb import abi, plan, snatmemo
from xdplb.dataplane import DataPlane
from xdplb.libbpf import libbpf
from xdplb.model import Backend, Service, Settings
from xdplb.netlink import NextHop

from . import packets as P

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
LOOPBACK = 1
SNAT_PORTS = (20000, 20999)
FLOW_SLOTS = 8192


@dataclass
class Harness:
    prog_fd: int
    dp: DataPlane
    settings: Settings
    hops: dict
    configured: list | None = None

    def run(self, data: bytes) -> tuple[int, bytes]:
        action, out, _ = libbpf().test_run(self.prog_fd, data)
        return action, out

    def sync(self, services: list[Service] | None = None, settings: Settings | None = None) -> plan.Plan:
        """Makes the maps hold these services and settings (by default, the last ones)."""
        if settings is not None:
            self.settings = settings
        if services is not None:
            self.configured = services
        return self.dp.sync(plan.Wanted(self.settings, self.configured or [], self.hops), "lo")

    def move_hop(self, addr: str, hop: NextHop) -> list[str]:
        """The kernel now reaches addr through hop: the change lines of the next sync."""
        self.hops[addr] = hop
        return self.sync().lines

    def configure(self, services: list[Service]) -> None:
        if services == self.configured:  # hypothesis calls this once per example
            return
        self.sync(services)
        # A plan starts SNAT port searches at random places; the fixtures expect the
        # first port of the range, so start every search there.
        for backend_id in self.dp.backend_ids().values():
            libbpf().update(self.dp.fds["xdplb_port_cur"], ctypes.c_uint32(self.dp.cursor_id(backend_id)),
                            ctypes.c_uint32(0))


def service(*backends: str, port: int = 80, proto: str = "tcp", vip: str = P.VIP, clients=(),
            weights=None) -> Service:
    weights = weights or [1] * len(backends)
    return Service(ipaddress.IPv4Address(vip), port, proto,
                   [Backend(ipaddress.IPv4Address(b), 80, w) for b, w in zip(backends, weights)],
                   [ipaddress.IPv4Network(c) for c in clients])


@pytest.fixture
def harness(bpf_object, tmp_path):
    # Per-CPU state (SNAT slices, counters) is predictable only on one CPU.
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    lib = libbpf()
    obj = lib.load_object(str(bpf_object), {"xdplb_flows": FLOW_SLOTS, "xdplb_flow_ends": FLOW_SLOTS})
    fds = {name: os.dup(lib.map_fd(obj, name)) for name in abi.MAPS}
    prog_fd = os.dup(lib.prog_fd(obj, abi.PROGRAM_NAME))
    lib.bpf_object__close(obj)
    dp = DataPlane(fds, memo=snatmemo.Memo(tmp_path / "snat-cursors.json"))
    settings = Settings(snat_addrs=[ipaddress.IPv4Address(P.SNAT)], snat_port_min=SNAT_PORTS[0],
                        snat_port_max=SNAT_PORTS[1])
    hops = {
        P.BACKEND: NextHop(LOOPBACK, P.BACKEND_MAC, P.LB_MAC),
        P.BACKEND2: NextHop(LOOPBACK, P.BACKEND2_MAC, P.LB_MAC),
        "10.0.0.103": NextHop(LOOPBACK, "02:00:00:00:00:b3", P.LB_MAC),
        "10.9.0.1": NextHop(7, P.ROUTER_MAC, "02:00:00:00:00:07"),
    }
    h = Harness(prog_fd, dp, settings, hops)
    h.sync([])
    try:
        yield h
    finally:
        dp.close()
        os.close(prog_fd)
        os.sched_setaffinity(0, saved)
