# SPDX-License-Identifier: Apache-2.0
"""Tiny XDP programs built from raw instructions (no compiler needed): a pass-through
for the peer of a veth (native XDP_TX on a veth delivers only to a peer with XDP), and
the clock the control plane reads the data plane's time with."""
from __future__ import annotations

import os

from pyroute2 import IPRoute

from .libbpf import libbpf

BPF_PROG_TYPE_XDP = 6
XDP_PASS = 2
# r0 = XDP_PASS; exit
PASS_INSNS = bytes([0xB7, 0, 0, 0, XDP_PASS, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])
PASS_NAME = "xdplb_pass"
BPF_FUNC_JIFFIES64 = 118
CLOCK_NAME = "xdplb_clock"


def clock_insns(shift: int) -> bytes:
    """call bpf_jiffies64; r0 >>= shift; exit. A test run returns the low 32 bits of r0:
    the data plane's tick, truncated exactly as it truncates it."""
    return bytes([0x85, 0, 0, 0, *BPF_FUNC_JIFFIES64.to_bytes(4, "little"),
                  0x77, 0, 0, 0, shift, 0, 0, 0,
                  0x95, 0, 0, 0, 0, 0, 0, 0])


def load_pass_program() -> int:
    lib = libbpf()
    fd = lib.bpf_prog_load(BPF_PROG_TYPE_XDP, PASS_NAME.encode(), b"GPL", PASS_INSNS, len(PASS_INSNS) // 8, None)
    return lib.check(fd, "load pass-through XDP program")


def load_clock_program(shift: int) -> int:
    lib = libbpf()
    insns = clock_insns(shift)
    fd = lib.bpf_prog_load(BPF_PROG_TYPE_XDP, CLOCK_NAME.encode(), b"GPL", insns, len(insns) // 8, None)
    return lib.check(fd, "load the clock program")


def attach_pass_program(namespace: str, ifname: str) -> None:
    """Attaches the pass-through program (native mode) unless something is there."""
    with IPRoute(netns=namespace) as ipr:
        link = ipr.link("get", ifname=ifname)[0]
        xdp = link.get_attr("IFLA_XDP")
        if xdp is not None and xdp.get_attr("IFLA_XDP_PROG_ID"):
            return
        fd = load_pass_program()
        try:
            ipr.link("set", index=link["index"],
                     xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", 1 << 2)]})
        finally:
            os.close(fd)
