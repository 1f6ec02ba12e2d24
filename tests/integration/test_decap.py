# SPDX-License-Identifier: Apache-2.0
"""A backend of ipip services, as a user sets it up: `xdplb decap attach eth0 --vip VIP`
on a namespace whose kernel has no ipip module. A "balancer" namespace plays the load
balancer's part by hand: it sends IPIP-encapsulated packets from a client address
through a packet socket and watches what the backend's kernel answers (the answers
go straight to the client, through the backend's default route, which leads back to the
balancer's namespace). A real TCP server listens on the VIP."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from tests.conftest import require
from xdplb import build, decap_abi, lab

from .conftest import in_ns

BAL_NS, BE_NS = "xdplb-dc-bal", "xdplb-dc-backend"
BAL_ADDR, BE_ADDR, VIP, VIP2 = "10.44.0.1", "10.44.0.101", "10.44.0.2", "10.44.0.3"
CLIENT = "198.51.100.10"  # not on any interface: reached through the backend's default route
PORT = 8080
ETH_P_ALL = 0x0003
SYSCTLS = [f"net/ipv4/conf/{dev}/{name}" for dev in ("all", "lo", "eth0") for name in ("arp_ignore", "arp_announce")]
PIN_DIR = Path("/sys/fs/bpf/xdplb") / BE_NS / "eth0:decap"

# Accepts connections on VIP:PORT and answers each one's first bytes with "echo:" + them.
ECHO_SERVER = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(({VIP!r}, {PORT}))
s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"echo:" + c.recv(100))
    c.close()
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def remove_namespaces() -> None:
    present = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for ns in (BAL_NS, BE_NS):
        if ns in present:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def xdplb(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "xdplb", "-n", BE_NS, "decap", *args], capture_output=True,
                          text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"xdplb decap {' '.join(args)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    return proc


def mac(ns: str, ifname: str = "eth0") -> str:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", ifname], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)[0]["address"]


def lo_addresses() -> list[tuple[str, int]]:
    out = subprocess.run(["ip", "-n", BE_NS, "-j", "-4", "addr", "show", "dev", "lo"], capture_output=True,
                         text=True, check=True).stdout
    return sorted((a["local"], a["prefixlen"]) for a in json.loads(out)[0]["addr_info"])


def sysctls() -> dict[str, str]:
    return in_ns(BE_NS, lambda: {name: Path("/proc/sys", name).read_text().strip() for name in SYSCTLS})


def host_state():
    return lo_addresses(), sysctls()


def status() -> dict:
    return json.loads(xdplb("status", "eth0", "--json").stdout)["interfaces"][0]


class Balancer:
    """A packet socket on the balancer namespace's eth0: sends IPIP to the backend and
    picks the backend's answers to the client out of what arrives."""

    def __init__(self):
        def open_socket():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind(("eth0", 0))
            return s
        self.sock = in_ns(BAL_NS, open_socket)  # a socket stays in the namespace it was made in
        self.eth = Ether(src=mac(BAL_NS), dst=mac(BE_NS))

    def send(self, inner, outer_dst: str = BE_ADDR) -> None:
        self.sock.send(bytes(self.eth / IP(src=BAL_ADDR, dst=outer_dst) / inner))

    def answer(self, match, timeout: float = 3.0):
        """The first frame from VIP to CLIENT for which match(ip) holds, or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                frame = Ether(self.sock.recv(65535))
            except socket.timeout:
                return None
            if IP in frame and frame[IP].src == VIP and frame[IP].dst == CLIENT and match(frame[IP]):
                return frame[IP]
        return None

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def topology():
    require(os.geteuid() == 0, "needs root")
    for tool in ("ip", "nsenter"):
        require(shutil.which(tool) is not None, f"needs {tool}")
    require(shutil.which(os.environ.get("CLANG", "clang")) is not None, "needs clang")
    build.compile_object(build.DECAP_OBJECT, source=build.DECAP_SOURCE, required_maps=decap_abi.MAPS)
    remove_namespaces()
    try:
        ip("netns", "add", BAL_NS)
        ip("netns", "add", BE_NS)
        ip("-n", BAL_NS, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", BE_NS)
        for ns, addr in ((BAL_NS, BAL_ADDR), (BE_NS, BE_ADDR)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", BE_NS, "route", "add", "default", "via", BAL_ADDR)
        yield
    finally:
        subprocess.run([sys.executable, "-m", "xdplb", "-n", BE_NS, "decap", "detach", "eth0"], capture_output=True)
        remove_namespaces()


@pytest.fixture
def backend(topology):
    """The decapsulator in generic mode with the VIP, and the echo server on the VIP."""
    xdplb("attach", "eth0", "--vip", VIP, "--mode", "generic")
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{BE_NS}", sys.executable, "-c", ECHO_SERVER],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        yield
    finally:
        lab.stop_process(server)
        xdplb("detach", "eth0", check=False)


@pytest.fixture
def balancer(topology):
    b = Balancer()
    yield b
    b.close()


def test_a_tcp_connection_through_ipip_is_answered_from_the_vip(backend, balancer):
    sport = 40001
    balancer.send(IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=PORT, flags="S", seq=1000))
    synack = balancer.answer(lambda p: TCP in p and p[TCP].dport == sport and p[TCP].flags == "SA")
    assert synack is not None, status()
    assert synack[TCP].sport == PORT and synack[TCP].ack == 1001
    balancer.send(IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=PORT, flags="PA", seq=1001,
                                                ack=synack[TCP].seq + 1) / b"hello")
    data = balancer.answer(lambda p: TCP in p and p[TCP].dport == sport and len(p[TCP].payload) > 0)
    assert data is not None, status()
    assert bytes(data[TCP].payload) == b"echo:hello"
    assert status()["counters"]["decapsulated"] >= 2


def test_ping_and_udp_to_the_vip_are_answered(backend, balancer):
    balancer.send(IP(src=CLIENT, dst=VIP) / ICMP(type=8, id=7, seq=1) / b"ping")
    reply = balancer.answer(lambda p: ICMP in p and p[ICMP].type == 0 and p[ICMP].id == 7)
    assert reply is not None and bytes(reply[ICMP].payload) == b"ping", status()
    # No one listens on this UDP port: the kernel's answer (port unreachable) shows the
    # datagram was delivered to the VIP.
    balancer.send(IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=9) / b"x")
    unreachable = balancer.answer(lambda p: ICMP in p and p[ICMP].type == 3 and p[ICMP].code == 3)
    assert unreachable is not None, status()


def test_ipip_for_another_host_is_not_decapsulated(backend, balancer):
    before = status()["counters"]
    balancer.send(IP(src=CLIENT, dst=VIP) / TCP(sport=40002, dport=PORT, flags="S"), outer_dst="10.44.0.99")
    assert balancer.answer(lambda p: TCP in p and p[TCP].dport == 40002, timeout=1.0) is None
    after = status()["counters"]
    assert after["not_local"] == before["not_local"] + 1
    assert after["decapsulated"] == before["decapsulated"]


def test_status_shows_program_mode_vips_addresses_and_counters(backend):
    entry = status()
    assert isinstance(entry["program_id"], int) and entry["mode"] == "generic"
    assert entry["vips"] == [VIP] and entry["local_addresses"] == [VIP, BE_ADDR]
    assert entry["addresses_changed"] is False
    assert set(entry["counters"]) == set(decap_abi.COUNTERS)
    assert {"prog", *decap_abi.MAPS} <= {p.name for p in PIN_DIR.iterdir()}
    text = xdplb("status").stdout
    assert f"eth0: decap program {entry['program_id']}, generic mode, VIPs on lo: {VIP}" in text
    assert "sysctls: net.ipv4.conf.all.arp_ignore 1 (was 0), net.ipv4.conf.all.arp_announce 2 (was 0)" in text


def test_detach_leaves_lo_and_the_sysctls_exactly_as_before(topology):
    # A host prepared before: one VIP already on lo, arp_announce already 1.
    ip("-n", BE_NS, "addr", "add", f"{VIP2}/32", "dev", "lo")
    in_ns(BE_NS, lambda: Path("/proc/sys/net/ipv4/conf/all/arp_announce").write_text("1\n"))
    try:
        before = host_state()
        out = xdplb("attach", "eth0", "--vip", f"{VIP},{VIP2}", "--mode", "generic").stdout
        assert f"added {VIP}/32 to lo" in out and f"{VIP2} is on lo already" in out
        lo, values = host_state()
        assert (VIP, 32) in lo and (VIP2, 32) in lo
        assert values["net/ipv4/conf/all/arp_ignore"] == "1" and values["net/ipv4/conf/all/arp_announce"] == "2"
        assert {k: v for k, v in values.items() if "/all/" not in k} == \
            {k: v for k, v in before[1].items() if "/all/" not in k}  # lo's and eth0's own stay
        out = xdplb("detach", "eth0").stdout
        assert "arp_announce: 2 -> 1 (restored)" in out
        assert host_state() == before
        assert not PIN_DIR.exists()
        assert "eth0" not in xdplb("status").stdout
    finally:
        xdplb("detach", "eth0", check=False)
        ip("-n", BE_NS, "addr", "del", f"{VIP2}/32", "dev", "lo")
        in_ns(BE_NS, lambda: Path("/proc/sys/net/ipv4/conf/all/arp_announce").write_text("0\n"))


def test_native_mode_decapsulates_on_a_veth_too(topology, balancer):
    xdplb("attach", "eth0", "--vip", VIP, "--mode", "native")
    try:
        balancer.send(IP(src=CLIENT, dst=VIP) / ICMP(type=8, id=9, seq=1) / b"native")
        reply = balancer.answer(lambda p: ICMP in p and p[ICMP].type == 0 and p[ICMP].id == 9)
        assert reply is not None, status()
        assert status()["mode"] == "native"
    finally:
        xdplb("detach", "eth0")


@pytest.mark.parametrize("args,code,message", [
    (["attach", "eth9"], 1, "no interface named 'eth9'"),
    (["attach", "eth0", "--vip", "10.44.0.300"], 2, "bad VIP '10.44.0.300'"),
    (["attach", "eth0", "--vip", BE_ADDR], 2, f"VIP {BE_ADDR} is an address of eth0"),
    (["attach", "eth0", "--vip", "127.0.0.2"], 2, "not an address a service can have"),
    (["detach", "eth9"], 1, "no interface named 'eth9'"),
], ids=["no-interface", "bad-vip", "vip-is-eth0s", "loopback-vip", "detach-no-interface"])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(topology, args, code, message):
    before = host_state()
    proc = xdplb(*args, check=False)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert host_state() == before
    assert "decap program" not in xdplb("status").stdout


def test_a_down_interface_and_a_foreign_program_are_refused(topology):
    ip("-n", BE_NS, "link", "add", "dc0", "type", "veth", "peer", "name", "dc1")
    try:
        proc = xdplb("attach", "dc0", check=False)
        assert proc.returncode == 2 and "dc0 is down; bring it up with: ip link set dc0 up" in proc.stderr
        ip("-n", BE_NS, "link", "set", "dc0", "up")
        lab.attach_pass_program(BE_NS, "dc0")
        proc = xdplb("attach", "dc0", check=False)
        assert proc.returncode == 1 and "(xdplb_pass), which is not xdplb's decapsulator" in proc.stderr
        assert "--force" in proc.stderr
        proc = xdplb("detach", "dc0", check=False)
        assert proc.returncode == 1 and "leaving it" in proc.stderr
        xdplb("attach", "dc0", "--force", "--mode", "native")
        assert "decap program" in xdplb("status", "dc0").stdout
        assert "detached the decapsulator" in xdplb("detach", "dc0").stdout
    finally:
        ip("-n", BE_NS, "link", "del", "dc0")


def test_attach_again_refreshes_addresses_and_keeps_the_program(topology):
    xdplb("attach", "eth0", "--vip", VIP, "--mode", "generic")
    try:
        first = status()
        ip("-n", BE_NS, "addr", "add", "10.44.1.101/24", "dev", "eth0")
        assert status()["addresses_changed"] is True
        assert "addresses changed since" in xdplb("status").stdout
        out = xdplb("attach", "eth0").stdout  # no --vip: the VIPs stay
        assert "updated on eth0" in out
        again = status()
        assert again["program_id"] == first["program_id"] and again["vips"] == [VIP]
        assert again["local_addresses"] == [VIP, BE_ADDR, "10.44.1.101"] and again["addresses_changed"] is False
        proc = xdplb("attach", "eth0", "--mode", "native", check=False)
        assert proc.returncode == 2 and "runs on eth0 in generic mode" in proc.stderr
    finally:
        xdplb("detach", "eth0")
        ip("-n", BE_NS, "addr", "del", "10.44.1.101/24", "dev", "eth0")
