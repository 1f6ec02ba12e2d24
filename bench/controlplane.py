# SPDX-License-Identifier: Apache-2.0
"""Control-plane timings: recomputing and swapping a service's Maglev ring for 10, 100
and 1000 backends (library calls on a loaded program), scanning the flow table for
counts, and, end to end through the CLI in the lab, attaching and changing one backend
of a service with 100 backends."""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from pyroute2 import IPRoute

from xdplb import lab, plan
from xdplb.model import Backend, Service

from xdplb.netlink import NextHop

from .perpacket import LB_MAC, LOOPBACK, VIP, Bench

PREFIX = "xdplb-b"
LB_NS = f"{PREFIX}-lb"


@dataclass
class Timing:
    name: str
    runs_s: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs_s)

    def as_dict(self) -> dict:
        return {"name": self.name, "median_ms": round(self.median * 1000, 1),
                "min_ms": round(min(self.runs_s) * 1000, 1), "max_ms": round(max(self.runs_s) * 1000, 1)}


def fake_backends(n: int, base: str = "10.200.0.0") -> list[str]:
    start = int(ipaddress.IPv4Address(base)) + 1
    return [str(ipaddress.IPv4Address(start + i)) for i in range(n)]


def ring_swaps(sizes: list[int], runs: int) -> list[Timing]:
    """DataPlane.sync after one backend changes weight: Maglev recomputed (natively),
    a new inner map filled and swapped in."""
    bench = Bench(10_000)
    out = []
    try:
        for n in sizes:
            addrs = fake_backends(n)
            hops = {a: NextHop(LOOPBACK, "02:00:00:00:00:b0", LB_MAC) for a in addrs}
            backends = [Backend(ipaddress.IPv4Address(a), 80, 1) for a in addrs]
            bench.dp.sync(plan.Wanted(bench.settings, [Service(ipaddress.IPv4Address(VIP), 80, "tcp", backends)], hops))
            times = []
            for r in range(runs):
                backends[0] = Backend(backends[0].addr, 80, 2 + r)
                svc = Service(ipaddress.IPv4Address(VIP), 80, "tcp", list(backends))
                start = time.perf_counter()
                bench.dp.sync(plan.Wanted(bench.settings, [svc], hops))
                times.append(time.perf_counter() - start)
            out.append(Timing(f"recompute + rewrite ring, {n} backends", times))
    finally:
        bench.close()
    return out


def _cli(*args) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "xdplb", "-n", LB_NS, *args], check=True, capture_output=True)
    return time.perf_counter() - start


def end_to_end(runs: int, backends: int = 100) -> list[Timing]:
    """The CLI as a user runs it, in a lab whose load balancer knows 100 backends
    (permanent neighbour entries: their next hops resolve without ARP)."""
    lab.down(PREFIX)
    lab.up(backends=1, clients=1, prefix=PREFIX)
    try:
        addrs = fake_backends(backends, "10.42.0.150")  # inside the lab's /24, after its hosts
        with IPRoute(netns=LB_NS) as ipr:
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            for i, a in enumerate(addrs):
                ipr.neigh("replace", dst=a, lladdr=f"02:00:00:00:01:{i:02x}", ifindex=eth0,
                          state=0x80)  # NUD_PERMANENT
        attach, change = [], []
        for r in range(runs):
            attach.append(_cli("attach", "eth0", "--mode", "native", "--backends", ",".join(addrs), "--flows", "65536"))
            change.append(_cli("backend", "set", "eth0", f"{lab.LB_ADDR}:80", addrs[0], "--weight", str(2 + r)))
            _cli("detach", "eth0")
        return [Timing(f"xdplb attach with {backends} backends (CLI, end to end)", attach),
                Timing(f"xdplb backend set on a service with {backends} backends (CLI, end to end)", change)]
    finally:
        subprocess.run([sys.executable, "-m", "xdplb", "-n", LB_NS, "detach", "eth0"], capture_output=True)
        lab.down(PREFIX)


def flow_scans(runs: int, flows: int = 1_000_000) -> list[Timing]:
    """What `stats` and every scrape compute from the flow table: the active-flow count
    and the SNAT usage, on the default 4M-slot table, empty and with `flows` flows (both
    entries of each written straight into the table: live, half of them closing).
    Timed on a data plane that has mapped the table already (serve's case) and, apart,
    the first scan of a fresh one (a CLI command's)."""
    import numpy as np
    from xdplb import abi, build
    from xdplb.dataplane import DataPlane
    from xdplb.layout import flow_slots
    from xdplb.libbpf import libbpf
    from xdplb.model import FLOWS_DEFAULT
    lib = libbpf()
    obj = lib.load_object(str(build.require_object()), {"xdplb_flows": flow_slots(FLOWS_DEFAULT)})
    fds = {name: os.dup(lib.map_fd(obj, name)) for name in abi.MAPS}
    lib.bpf_object__close(obj)
    dp = DataPlane(fds)
    out = []
    try:
        start = time.perf_counter()
        dp.active_flows()
        out.append(Timing(f"active-flow count, first scan of a fresh process, {dp.flow_slot_count():,} slots, empty",
                          [time.perf_counter() - start]))
        for label in ("empty", f"{flows:,} flows"):
            if label != "empty":
                _fill(dp, flows, np)
            for name, scan in (("active-flow count", dp.active_flows), ("SNAT usage", dp.snat_usage)):
                times = []
                for _ in range(runs):
                    start = time.perf_counter()
                    scan()
                    times.append(time.perf_counter() - start)
                out.append(Timing(f"{name}, {dp.flow_slot_count():,} slots, {label}", times))
    finally:
        dp.close()
    return out


def _fill(dp, flows: int, np) -> None:
    """Both entries of `flows` TCP flows at random slots, stamped now."""
    from xdplb import clock
    rows = dp._flows()._rows
    picked = np.random.default_rng(1).choice(len(rows), 2 * flows, replace=False)
    r = rows[picked]
    r["proto"] = 6
    r["backend_id"] = np.arange(len(picked)) % 100
    r["flags"] = np.where(np.arange(len(picked)) % 2, 1, 0)  # every other entry the reply side
    r["last_seen"] = clock.now_ticks(dp._config().tick_shift)
    rows[picked] = r


def seed_change(services: int, backends: int, runs: int) -> list[Timing]:
    """A new hash seed for an interface with `services` services of `backends` backends
    each: every ring recomputed and rewritten, in one DataPlane.sync."""
    bench = Bench(10_000)
    out = []
    try:
        addrs = fake_backends(backends)
        hops = {a: NextHop(LOOPBACK, "02:00:00:00:00:b0", LB_MAC) for a in addrs}
        members = [Backend(ipaddress.IPv4Address(a), 80, 1) for a in addrs]
        base = int(ipaddress.IPv4Address("10.210.0.0"))
        svcs = [Service(ipaddress.IPv4Address(base + i // 4), 80 + i % 4, "tcp", list(members))
                for i in range(services)]
        bench.dp.sync(plan.Wanted(bench.settings, svcs, hops))
        times = []
        for r in range(runs):
            settings = dataclasses.replace(bench.settings, hash_seed=bench.settings.hash_seed + 1 + r)
            start = time.perf_counter()
            p = bench.dp.sync(plan.Wanted(settings, svcs, hops))
            times.append(time.perf_counter() - start)
            rings = sum(isinstance(op, plan.SetRing) for op in p.ops)
            if rings != services:
                raise RuntimeError(f"a seed change rewrote {rings} rings of {services}")
        out.append(Timing(f"seed change: {services} services x {backends} backends, every ring rewritten", times))
    finally:
        bench.close()
    return out
