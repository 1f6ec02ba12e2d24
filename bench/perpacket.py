# SPDX-License-Identifier: Apache-2.0
"""Per-packet cost of the data plane through BPF_PROG_TEST_RUN.

Every iteration sees the original frame: bench_reset (bench/bpf/bench.bpf.c) restores it
and tail-calls the program under test. All figures include that harness; its cost alone
(harness + XDP_PASS) is reported, and every figure is also given as a ratio to the
floor, a MAC-swapping XDP_TX program measured the same way in the same run: one floor
run before each run of the case, so that a shared host's drifting speed hits both.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from xdplb import abi, build
from xdplb import plan
from xdplb.dataplane import DataPlane
from xdplb.layout import flow_slots
from xdplb.libbpf import libbpf
from xdplb.model import Backend, Service, Settings
from xdplb.netlink import NextHop

XDP_TX = 3
BENCH_SOURCE = Path(__file__).resolve().parent / "bpf" / "bench.bpf.c"
BENCH_OBJECT = build.BUILD_DIR / "bench.bpf.o"
MAX_FRAME = 256
ETH_HLEN = 14

LB_MAC, CLIENT_MAC = "02:00:00:00:00:01", "02:00:00:00:00:0c"
VIP = "10.0.0.2"
# A TCP service of each bypass mode, same backends (their port equals the service's).
BYPASS_VIPS = {"dsr": "10.0.0.3", "ipip": "10.0.0.4"}
CLIENT = "10.1.0.1"
# IPv6 twins of the bypass services, same backend hosts (IPv6 has no NAT yet).
BYPASS_VIPS6 = {"dsr": "fd00::3", "ipip": "fd00::4"}
CLIENT6 = "fd01::1"
ENCAP6 = "fd00::2"
IPV6_SADDR_LAST_WORD = ETH_HLEN + 8 + 12
# Enough backends that a million concurrent flows find SNAT ports: full NAT with one SNAT
# address has (ports in a CPU's slice) flows per backend and CPU.
BACKENDS = [str(ipaddress.IPv4Address("10.0.1.0") + i) for i in range(64)]
BACKENDS6 = [str(ipaddress.IPv6Address("fd00:1::") + i) for i in range(64)]
SNAT_PORTS = (20000, 59999)
STEADY_FLOWS = 1024
LOOPBACK = 1  # test runs without a context see the loopback device as ingress


class BenchFrame(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint32), ("new_client_each_time", ctypes.c_uint32),
                ("first_client", ctypes.c_uint32), ("saddr", ctypes.c_uint32),
                ("mem_mask", ctypes.c_uint32), ("saddr_offset", ctypes.c_uint32),
                ("data", ctypes.c_uint8 * MAX_FRAME)]


def frame(pkt) -> bytes:
    return bytes(pkt.__class__(bytes(pkt)))


def tcp(src, sport, dst, dport, flags, smac=CLIENT_MAC) -> bytes:
    ip = IPv6(src=src, dst=dst, hlim=64) if ":" in src else IP(src=src, dst=dst, ttl=64)
    return frame(Ether(src=smac, dst=LB_MAC) / ip / TCP(sport=sport, dport=dport, flags=flags) / (b"x" * 10))


@dataclass
class Figure:
    name: str
    runs_ns: list[float]
    checked: str = ""
    floor_ns: list[float] | None = None  # the floor's runs, each just before one of ours

    @property
    def median(self) -> float:
        return statistics.median(self.runs_ns)

    @property
    def ratio(self) -> float:
        return self.median / statistics.median(self.floor_ns) if self.floor_ns else 1.0

    def as_dict(self) -> dict:
        return {"name": self.name, "median_ns": round(self.median, 1), "min_ns": min(self.runs_ns),
                "max_ns": max(self.runs_ns), "ratio_to_floor": round(self.ratio, 2),
                "checked": self.checked}


@dataclass
class Results:
    repeat: int
    runs: int
    cpu: int
    figures: list[Figure] = field(default_factory=list)
    fill: list[Figure] = field(default_factory=list)


class Bench:
    def __init__(self, flows: int, hop: NextHop | None = None):
        """hop: where backends are (default: the loopback device, which test runs
        without a context see as the ingress interface)."""
        self.capacity = flows
        lib = self.lib = libbpf()
        build.compile_object(BENCH_OBJECT, source=BENCH_SOURCE, check=False)
        obj = lib.load_object(str(build.require_object()), {"xdplb_flows": flow_slots(flows)})
        self.xdplb = os.dup(lib.prog_fd(obj, abi.PROGRAM_NAME))
        fds = {name: os.dup(lib.map_fd(obj, name)) for name in abi.MAPS}
        lib.bpf_object__close(obj)
        self.dp = DataPlane(fds)
        self.settings = Settings(snat_addrs=[ipaddress.IPv4Address(VIP)], snat_port_min=SNAT_PORTS[0],
                                 snat_port_max=SNAT_PORTS[1], hash_seed=1,
                                 encap_source6=ipaddress.IPv6Address(ENCAP6))
        hops = {b: hop or NextHop(LOOPBACK, f"02:00:00:00:{i // 256:02x}:{i % 256:02x}", LB_MAC)
                for i, b in enumerate(BACKENDS)}
        hops |= {b: hops[b4] for b, b4 in zip(BACKENDS6, BACKENDS)}  # one host, both families
        backends = [Backend(ipaddress.IPv4Address(b), 80) for b in BACKENDS]
        services = [Service(ipaddress.IPv4Address(VIP), 80, proto, backends) for proto in ("tcp", "udp")]
        services += [Service(ipaddress.IPv4Address(vip), 80, "tcp", backends, forward=mode)
                     for mode, vip in BYPASS_VIPS.items()]
        backends6 = [Backend(ipaddress.IPv6Address(b), 80) for b in BACKENDS6]
        services += [Service(ipaddress.IPv6Address(vip), 80, "tcp", backends6, forward=mode)
                     for mode, vip in BYPASS_VIPS6.items()]
        self.dp.sync(plan.Wanted(self.settings, services, hops))
        self.slots = flow_slots(flows)
        obj = lib.load_object(str(BENCH_OBJECT), {"bench_mem": self.slots})
        self.progs = {name: os.dup(lib.prog_fd(obj, name))
                      for name in ("bench_reset", "bench_pass", "bench_macswap", "bench_sink", "bench_dram")}
        self.frame_fd = os.dup(lib.map_fd(obj, "bench_frame"))
        self.target_fd = os.dup(lib.map_fd(obj, "bench_target"))
        self.count_fd = os.dup(lib.map_fd(obj, "bench_count"))
        lib.bpf_object__close(obj)

    def run_once(self, data: bytes) -> tuple[int, bytes]:
        action, out, _ = self.lib.test_run(self.xdplb, data)
        return action, out

    def set_frame(self, data: bytes, target_fd: int, new_clients: bool = False) -> None:
        """The frame bench_reset restores before every run of target."""
        offset = IPV6_SADDR_LAST_WORD if data[12:14] == b"\x86\xdd" else ETH_HLEN + 12
        saddr = int.from_bytes(data[offset:offset + 4], sys.byteorder)  # kept in network order
        value = BenchFrame(len=len(data), new_client_each_time=int(new_clients),
                           first_client=int(ipaddress.IPv4Address("10.128.0.0")), saddr=saddr,
                           mem_mask=self.slots - 1, saddr_offset=offset)
        ctypes.memmove(value.data, data, len(data))
        self.lib.update(self.frame_fd, ctypes.c_uint32(0), value)
        self.lib.update(self.target_fd, ctypes.c_uint32(0), ctypes.c_uint32(target_fd))

    def measure(self, target_fd: int, data: bytes, repeat: int, runs: int,
                new_clients: bool = False) -> tuple[list[float], int, bytes]:
        """Runs the harness around target; returns ns per iteration for each run and the
        last run's action and output."""
        self.set_frame(data, target_fd, new_clients)
        out_ns = []
        action, out = 0, b""
        for _ in range(runs):
            action, out, ns = self.lib.test_run(self.progs["bench_reset"], data, repeat=repeat)
            out_ns.append(float(ns))
        return out_ns, action, out

    def against_floor(self, name: str, target_fd: int, data: bytes, repeat: int, runs: int,
                      new_clients: bool = False) -> tuple[Figure, int, bytes]:
        """Measures target with a run of the MAC-swap floor (same frame, same harness)
        before each of its runs: the ratio then holds even while the machine's speed
        drifts (a busy neighbour on a shared host)."""
        ns, floor = [], []
        action, out = 0, b""
        for _ in range(runs):
            floor += self.measure(self.progs["bench_macswap"], data, repeat, 1, new_clients)[0]
            one, action, out = self.measure(target_fd, data, repeat, 1, new_clients)
            ns += one
        return Figure(name, ns, floor_ns=floor), action, out

    def close(self) -> None:
        self.dp.close()
        for fd in [self.xdplb, self.frame_fd, self.target_fd, self.count_fd, *self.progs.values()]:
            os.close(fd)


def _checked_same(bench: Bench, data: bytes, action: int, out: bytes, expect_action: int) -> str:
    """The last iteration's output must be what one plain run of xdplb gives."""
    single_action, single_out = bench.run_once(data)
    if (action, out) != (single_action, single_out) or action != expect_action:
        raise RuntimeError(f"harness output differs from a single run (action {action} vs {single_action})")
    return "last iteration == single run"


def _bypass_backend(mode: str, out: bytes) -> str:
    """The backend a dsr frame went to (by its MAC, see Bench's next hops) or the outer
    destination of an ipip one."""
    if mode == "ipip":
        outer = Ether(out)[IPv6] if out[12:14] == b"\x86\xdd" else Ether(out)[IP]
        return outer.dst
    mac = Ether(out).dst.split(":")
    return BACKENDS[int(mac[4], 16) * 256 + int(mac[5], 16)]


def _bypass_check(mode: str, sent: bytes, out: bytes) -> str:
    """dsr changes the MACs only; ipip puts the IP packet, untouched, behind an outer header."""
    if mode == "dsr" and out[12:] == sent[12:]:
        return "only the MACs changed"
    if mode == "ipip" and out[12:14] == b"\x86\xdd":
        if out[ETH_HLEN + 6] == 41 and out[ETH_HLEN + 40:] == sent[ETH_HLEN:]:
            return "inner packet untouched"
    elif mode == "ipip" and Ether(out)[IP].proto == 4 and out[ETH_HLEN + 20:] == sent[ETH_HLEN:]:
        return "inner packet untouched"
    raise RuntimeError(f"{mode}: the forwarded frame is not what {mode} sends")


def run(repeat: int, runs: int, fill_sizes: list[int], cpu: int = 0) -> Results:
    os.sched_setaffinity(0, {cpu})
    flows = max(fill_sizes + [repeat * runs]) + 100_000
    bench = Bench(flows)
    try:
        res = Results(repeat, runs, cpu)
        syn = tcp(CLIENT, 40000, VIP, 80, "S")
        fig, _, _ = bench.against_floor("harness + XDP_PASS (harness cost)", bench.progs["bench_pass"], syn,
                                        repeat, runs)
        fig.checked = "-"
        res.figures.append(fig)
        floor, action, out = bench.measure(bench.progs["bench_macswap"], syn, repeat, runs)
        assert action == XDP_TX and out[:6] == syn[6:12]
        res.figures.append(Figure("harness + MAC-swap XDP_TX (floor)", floor, checked="macs swapped"))

        other = tcp(CLIENT, 40000, VIP, 22, "S")
        fig, action, out = bench.against_floor("non-service packet (TCP to VIP:22)", bench.xdplb, other, repeat, runs)
        fig.checked = _checked_same(bench, other, action, out, 2)
        res.figures.append(fig)

        bench.run_once(syn)  # establishes the flow
        ack = tcp(CLIENT, 40000, VIP, 80, "A")
        fig, action, out = bench.against_floor("established flow (TCP ACK)", bench.xdplb, ack, repeat, runs)
        fig.checked = _checked_same(bench, ack, action, out, XDP_TX)
        res.figures.append(fig)

        _, first = bench.run_once(tcp(CLIENT, 40001, VIP, 80, "S"))
        sent = Ether(first)
        reply = tcp(sent[IP].dst, 80, VIP, sent[TCP].sport, "A", smac="02:00:00:00:00:b0")
        fig, action, out = bench.against_floor("reply from a backend (TCP ACK)", bench.xdplb, reply, repeat, runs)
        fig.checked = _checked_same(bench, reply, action, out, XDP_TX)
        res.figures.append(fig)

        for mode, vip in BYPASS_VIPS.items():
            bench.run_once(tcp(CLIENT, 40000, vip, 80, "S"))
            ack = tcp(CLIENT, 40000, vip, 80, "A")
            fig, action, out = bench.against_floor(f"established flow (TCP ACK), {mode}", bench.xdplb, ack,
                                                   repeat, runs)
            fig.checked = _checked_same(bench, ack, action, out, XDP_TX) + "; " + _bypass_check(mode, ack, out)
            res.figures.append(fig)

        for mode, vip in BYPASS_VIPS6.items():
            bench.run_once(tcp(CLIENT6, 40000, vip, 80, "S"))
            ack = tcp(CLIENT6, 40000, vip, 80, "A")
            fig, action, out = bench.against_floor(f"established flow (TCP ACK), {mode}, IPv6", bench.xdplb, ack,
                                                   repeat, runs)
            fig.checked = _checked_same(bench, ack, action, out, XDP_TX) + "; " + _bypass_check(mode, ack, out)
            res.figures.append(fig)

        dgram = frame(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=80)
                      / (b"x" * 32))
        bench.run_once(dgram)
        fig, action, out = bench.against_floor("UDP datagram (established flow)", bench.xdplb, dgram, repeat, runs)
        fig.checked = _checked_same(bench, dgram, action, out, XDP_TX)
        res.figures.append(fig)

        before = bench.dp.flow_count() if repeat * runs < 200_000 else None
        fig, action, out = bench.against_floor("new flow (TCP SYN), table larger than the caches", bench.xdplb,
                                               syn, repeat, runs, new_clients=True)
        if action != XDP_TX or Ether(out)[IP].dst not in BACKENDS:
            raise RuntimeError("new-flow runs did not forward to a backend")
        fig.checked = f"each iteration a new client; forwarded to a backend; table of {flows:,} flows"
        if before is not None:
            grown = bench.dp.flow_count() - before
            fig.checked += f"; {grown // 2} flows created"
        res.figures.append(fig)
    finally:
        bench.close()

    # The same in each bypass mode, each in a table of its own as empty as the first one
    # was; then a segment of a connection the table does not know (stateless recovery).
    for mode, vip, client, family, backends in (
            [(m, v, CLIENT, "", BACKENDS) for m, v in BYPASS_VIPS.items()]
            + [(m, v, CLIENT6, ", IPv6", BACKENDS6) for m, v in BYPASS_VIPS6.items()]):
        bench = Bench(flows)
        try:
            fig, action, out = bench.against_floor(f"new flow (TCP SYN), {mode}{family}, table larger than the caches",
                                                   bench.xdplb, tcp(client, 40000, vip, 80, "S"), repeat, runs,
                                                   new_clients=True)
            # dsr: the backend named by its MAC, one host for both families (Bench's next hops).
            if action != XDP_TX or _bypass_backend(mode, out) not in (BACKENDS if mode == "dsr" else backends):
                raise RuntimeError(f"{mode} new-flow runs did not forward to a backend")
            fig.checked = f"each iteration a new client; forwarded to a backend; table of {flows:,} flows"
            res.figures.append(fig)
            recovered = bench.dp.counters()["recovered"]
            fig, action, out = bench.against_floor(f"unknown connection's ACK (stateless recovery), {mode}{family}",
                                                   bench.xdplb, tcp(client, 40000, vip, 80, "A"), repeat, runs,
                                                   new_clients=True)
            recovered = bench.dp.counters()["recovered"] - recovered
            if action != XDP_TX or recovered != repeat * runs:
                raise RuntimeError(f"{mode}: {recovered} of {repeat * runs} unknown ACKs recovered")
            fig.checked = "each iteration a new client; every one recovered through the ring, a flow created"
            res.figures.append(fig)
        finally:
            bench.close()

    bench = Bench(flows)
    try:
        fig, action, _ = bench.against_floor("floor + one random read of a table that size (memory latency)",
                                             bench.progs["bench_dram"], syn, repeat, runs, new_clients=True)
        assert action == XDP_TX
        fig.checked = f"{bench.slots * 64 >> 20} MB, the flow table's size"
        res.figures.append(fig)
    finally:
        bench.close()

    # A new flow in steady state, table in the caches: every slot of a small table has
    # been used, so each SYN scans its whole window and evicts the least recently seen
    # flow, as a full LRU map would.
    bench = Bench(STEADY_FLOWS)
    try:
        syn = tcp(CLIENT, 40000, VIP, 80, "S")
        bench.measure(bench.xdplb, syn, repeat, 1, new_clients=True)
        evicted = bench.dp.counters()["evicted"]
        fig, action, out = bench.against_floor(
            f"new flow (TCP SYN), table of {STEADY_FLOWS:,} flows, every slot live (in cache)", bench.xdplb, syn,
            repeat, runs, new_clients=True)
        if action != XDP_TX or Ether(out)[IP].dst not in BACKENDS:
            raise RuntimeError("steady-state new-flow runs did not forward to a backend")
        evicted = bench.dp.counters()["evicted"] - evicted
        fig.checked = f"{evicted / (repeat * runs):.1f} least recently seen entries evicted per SYN"
        res.figures.insert(len(res.figures) - 1, fig)
        for mode, vip in BYPASS_VIPS.items():
            syn = tcp(CLIENT, 40000, vip, 80, "S")
            bench.measure(bench.xdplb, syn, repeat, 1, new_clients=True)
            evicted = bench.dp.counters()["evicted"]
            fig, action, out = bench.against_floor(
                f"new flow (TCP SYN), {mode}, table of {STEADY_FLOWS:,} flows, every slot live (in cache)",
                bench.xdplb, syn, repeat, runs, new_clients=True)
            if action != XDP_TX or _bypass_backend(mode, out) not in BACKENDS:
                raise RuntimeError(f"{mode} steady-state new-flow runs did not forward to a backend")
            evicted = bench.dp.counters()["evicted"] - evicted
            fig.checked = f"{evicted / (repeat * runs):.1f} least recently seen entries evicted per SYN"
            res.figures.insert(len(res.figures) - 1, fig)
        for mode, vip in BYPASS_VIPS6.items():
            syn = tcp(CLIENT6, 40000, vip, 80, "S")
            bench.measure(bench.xdplb, syn, repeat, 1, new_clients=True)  # fills the LRU map
            fig, action, out = bench.against_floor(
                f"new flow (TCP SYN), {mode}, IPv6, LRU map of {bench.dp.flow_capacity():,} flows, full (in cache)",
                bench.xdplb, syn, repeat, runs, new_clients=True)
            if action != XDP_TX:
                raise RuntimeError(f"{mode} IPv6 steady-state new-flow runs did not forward to a backend")
            fig.checked = "each iteration a new client, forwarded; the map stays full (LRU eviction)"
            res.figures.insert(len(res.figures) - 1, fig)
    finally:
        bench.close()

    # Established-flow cost as the table fills: a fresh data plane per size, filled by
    # running new-flow SYNs through the program itself.
    for size in fill_sizes:
        bench = Bench(size + 10_000)
        try:
            bench.measure(bench.xdplb, tcp(CLIENT, 40000, VIP, 80, "S"), size, 1, new_clients=True)
            bench.run_once(tcp(CLIENT, 40000, VIP, 80, "S"))
            ack = tcp(CLIENT, 40000, VIP, 80, "A")
            fig, action, out = bench.against_floor(f"established flow, {size:,} flows in the table", bench.xdplb,
                                                   ack, repeat, runs)
            fig.checked = _checked_same(bench, ack, action, out, XDP_TX)
            res.fill.append(fig)
        finally:
            bench.close()
    return res
