# SPDX-License-Identifier: Apache-2.0
"""Live throughput: BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES sends real frames
out of a veth (XDP_TX), and a counting XDP program on the peer proves how many arrived.

Both the program under test and the floor run behind bench_reset, so every frame is the
original one (in live mode the page pool hands back frames as the last run left them).
"""
from __future__ import annotations

import ctypes
import statistics
import subprocess
import time
from dataclasses import dataclass

from pyroute2 import IPRoute, netns

from xdplb.libbpf import BPF_F_TEST_XDP_LIVE_FRAMES, libbpf
from xdplb.namespaces import run_in_netns
from xdplb.netlink import NextHop

from .perpacket import BENCH_OBJECT, BYPASS_VIPS, BYPASS_VIPS6, CLIENT, CLIENT6, VIP, Bench, tcp

NS = "xdplb-b-live"
BATCH = 64


class XdpMd(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint32), ("data_end", ctypes.c_uint32), ("data_meta", ctypes.c_uint32),
                ("ingress_ifindex", ctypes.c_uint32), ("rx_queue_index", ctypes.c_uint32),
                ("egress_ifindex", ctypes.c_uint32)]


@dataclass
class Rate:
    name: str
    mpps: list[float]
    delivered: float  # fraction of sent frames counted on the far side

    @property
    def median(self) -> float:
        return statistics.median(self.mpps)

    def as_dict(self) -> dict:
        return {"name": self.name, "median_mpps": round(self.median, 3), "min_mpps": round(min(self.mpps), 3),
                "max_mpps": round(max(self.mpps), 3), "delivered": round(self.delivered, 4)}


def _topology() -> tuple[int, str]:
    """A namespace with veth lb0 <-> sink0; returns lb0's ifindex and MAC."""
    if NS in netns.listnetns():
        netns.remove(NS)
    netns.create(NS)
    # No IPv6 on these links: its router solicitations would be counted as delivered frames.
    subprocess.run(["ip", "netns", "exec", NS, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1"], check=True)
    with IPRoute(netns=NS) as ipr:
        ipr.link("add", ifname="lb0", kind="veth", peer={"ifname": "sink0"})
        for name in ("lb0", "sink0"):
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        link = ipr.link("get", ifname="lb0")[0]
        return link["index"], link.get_attr("IFLA_ADDRESS")


def run(repeat: int, runs: int) -> list[Rate]:
    lib = libbpf()
    lb_index, lb_mac = _topology()
    try:
        bench = Bench(100_000, hop=NextHop(lb_index, "02:00:00:00:00:b0", lb_mac))
        sink_obj = lib.load_object(str(BENCH_OBJECT), {})
        try:
            sink_fd = lib.prog_fd(sink_obj, "bench_sink")
            sink_count = lib.map_fd(sink_obj, "bench_count")
            with IPRoute(netns=NS) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="sink0")[0],
                         xdp={"attrs": [("IFLA_XDP_FD", sink_fd), ("IFLA_XDP_FLAGS", 1 << 2)]})
            cases = [("MAC-swap XDP_TX (floor)", bench.progs["bench_macswap"], tcp(CLIENT, 40000, VIP, 80, "A"))]
            for mode, vip in (("nat", VIP), *BYPASS_VIPS.items()):
                bench.run_once(tcp(CLIENT, 40000, vip, 80, "S"))  # every live frame is an established-flow packet
                cases.append((f"xdplb, established flow, {mode}", bench.xdplb, tcp(CLIENT, 40000, vip, 80, "A")))
            for mode, vip in BYPASS_VIPS6.items():
                bench.run_once(tcp(CLIENT6, 40000, vip, 80, "S"))
                cases.append((f"xdplb, established flow, {mode}, IPv6", bench.xdplb,
                               tcp(CLIENT6, 40000, vip, 80, "A")))
            out = []
            for name, target, frame in cases:
                ctx = bytes(XdpMd(data_end=len(frame), ingress_ifindex=lb_index))  # data_end: the frame length
                rates, sent, got = [], 0, 0
                for _ in range(runs):
                    before = _total(lib, sink_count, bench.dp.ncpus)
                    bench.set_frame(frame, target)

                    def send():
                        start = time.perf_counter()
                        lib.test_run(bench.progs["bench_reset"], frame, repeat=repeat, ctx=ctx,
                                     flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=BATCH)
                        return time.perf_counter() - start
                    elapsed = run_in_netns(NS, send)
                    time.sleep(0.05)
                    got += _total(lib, sink_count, bench.dp.ncpus) - before
                    sent += repeat
                    rates.append(repeat / elapsed / 1e6)
                out.append(Rate(name, rates, got / sent))
            return out
        finally:
            lib.bpf_object__close(sink_obj)
            bench.close()
    finally:
        netns.remove(NS)


def _total(lib, fd: int, ncpus: int) -> int:
    values = (ctypes.c_uint64 * ncpus)()
    lib.lookup(fd, ctypes.c_uint32(0), values)
    return sum(values)


