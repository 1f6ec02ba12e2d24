# SPDX-License-Identifier: Apache-2.0
"""Tiny XDP programs built from raw instructions (no compiler needed): a pass-through
for the peer of a veth (native XDP_TX on a veth delivers only to a peer with XDP)."""
from __future__ import annotations

import os

from pyroute2 import IPRoute

from .libbpf import libbpf

BPF_PROG_TYPE_XDP = 6
XDP_PASS = 2
# r0 = XDP_PASS; exit
PASS_INSNS = bytes([0xB7, 0, 0, 0, XDP_PASS, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])
PASS_NAME = "xdplb_pass"


def load_pass_program() -> int:
    lib = libbpf()
    fd = lib.bpf_prog_load(BPF_PROG_TYPE_XDP, PASS_NAME.encode(), b"GPL", PASS_INSNS, len(PASS_INSNS) // 8, None)
    return lib.check(fd, "load pass-through XDP program")


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
