# SPDX-License-Identifier: Apache-2.0
"""Mistakes that need root to make: each gives a one-line error (plus the verifier's
lines for a rejected program), a non-zero exit, and leaves the interface as it was."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from xdplb import build
from xdplb.lab import attach_pass_program

NS = "xdplb-t-bad"
PEER_NS = "xdplb-t-badpeer"
PINS = Path("/sys/fs/bpf/xdplb") / NS


@pytest.fixture(scope="module")
def bare_ns(bpf_object):
    """A namespace whose eth0 (10.77.0.1/24) reaches one other host (10.77.0.2), plus an
    interface that is down."""
    for name in (NS, PEER_NS):
        if name in netns.listnetns():
            netns.remove(name)
        netns.create(name)
    try:
        with IPRoute(netns=NS) as ipr:
            ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": PEER_NS})
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address="10.77.0.1", prefixlen=24)
            for name in ("eth0", "lo"):
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
            ipr.link("add", ifname="down0", kind="veth", peer={"ifname": "down1"})
        with IPRoute(netns=PEER_NS) as ipr:
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address="10.77.0.2", prefixlen=24)
            ipr.link("set", index=eth0, state="up")
        yield
    finally:
        netns.remove(NS)
        netns.remove(PEER_NS)


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "xdplb", "-n", NS, *args], capture_output=True,
                          text=True, env=env, timeout=60)


def xdp_prog_id(ifname="eth0") -> int:
    with IPRoute(netns=NS) as ipr:
        xdp = ipr.link("get", ifname=ifname)[0].get_attr("IFLA_XDP")
        return (xdp.get_attr("IFLA_XDP_PROG_ID") or 0) if xdp is not None else 0


def assert_one_line_error(proc, code, text):
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert text in lines[0]


def assert_untouched():
    assert xdp_prog_id() == 0
    assert not PINS.exists()


@pytest.mark.parametrize("args,code,text", [
    (["attach", "nosuch0", "--backends", "10.77.0.2"], 1, "no interface named 'nosuch0'"),
    (["attach", "down0", "--backends", "10.77.0.2"], 2, "down0 is down; bring it up"),
    (["attach", "eth0", "--backends", "10.77.0.9"], 1, "backend 10.77.0.9: no ARP answer"),
    (["attach", "eth0", "--backends", "10.77.0.1"], 2, "is an address of this host"),
    (["attach", "eth0", "--backends", "10.77.0.2", "--proto", "sctp"], 2, "Invalid value for '--proto'"),
    (["attach", "eth0", "--backends", "10.78.0.2"], 1, "no route to backend 10.78.0.2"),
    (["attach", "eth0", "--backends", "10.77.0.2", "--snat-ports", "30000-40000"], 2,
     "overlap this host's ephemeral ports"),
    (["attach", "eth0", "--vip", "fd00::1", "--backends", "fd00::2"], 2,
     "IPv6 services forward with --forward dsr or ipip only so far"),
    (["attach", "eth0", "--backends", "[fd00::2]:80"], 2, "backend [fd00::2]:80 is IPv6 but the VIP is IPv4"),
    (["attach", "eth0", "--backends", "fd00::2:80"], 2, "ambiguous: it reads as the IPv6 address fd00::2:80"),
])
def test_bad_attach_leaves_nothing(bare_ns, args, code, text):
    proc = run(*args)
    assert_one_line_error(proc, code, text)
    assert_untouched()


def test_foreign_program_is_kept_unless_forced(bare_ns):
    attach_pass_program(NS, "eth0")
    foreign = xdp_prog_id()
    try:
        proc = run("attach", "eth0", "--backends", "10.77.0.2", "--flows", "4096")
        assert_one_line_error(proc, 1, "already has XDP program")
        assert "--force" in proc.stderr
        assert xdp_prog_id() == foreign and not PINS.exists()
        proc = run("detach", "eth0")
        assert_one_line_error(proc, 1, "which is not xdplb's; leaving it")
        assert xdp_prog_id() == foreign

        proc = run("attach", "eth0", "--backends", "10.77.0.2", "--flows", "4096", "--force")
        assert proc.returncode == 0, proc.stderr
        assert xdp_prog_id() not in (0, foreign)
        assert run("detach", "eth0").returncode == 0
        assert_untouched()
    finally:
        subprocess.run(["ip", "-n", NS, "link", "set", "eth0", "xdp", "off"], check=False)


def test_verifier_rejection_shows_the_log_and_leaves_nothing(bare_ns, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(build.BPF_DIR, root / "bpf")
    source = root / "bpf" / "xdplb.bpf.c"
    text = source.read_text()
    # An unchecked packet read: the verifier must refuse it.
    text = text.replace("\tswitch (parse_packet(ctx, &pkt)) {",
                        "\tif (*(volatile __u32 *)(long)ctx->data == 7)\n\t\treturn XDP_DROP;\n"
                        "\tswitch (parse_packet(ctx, &pkt)) {")
    source.write_text(text)
    env = dict(os.environ, XDPLB_ROOT=str(root))
    built = subprocess.run([sys.executable, "-m", "xdplb", "build"], capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stderr
    proc = run("attach", "eth0", "--backends", "10.77.0.2", "--flows", "4096", env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "the kernel's verifier rejected the XDP program" in lines[0]
    assert any("invalid access to packet" in l for l in lines[1:]), proc.stderr
    assert len(lines) <= 1 + 20
    assert_untouched()
