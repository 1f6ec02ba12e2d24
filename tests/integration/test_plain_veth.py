# SPDX-License-Identifier: Apache-2.0
"""A network xdplb did not build: a client, the load balancer and a backend on a bridge,
through veths with the kernel's default offloads and no XDP program on any peer (a
container host). The lab hides both problems of native XDP on a veth by its own setup;
here `attach` in auto mode must still give a working balancer."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import require

from .conftest import start_server
from xdplb import lab

PREFIX = "xdplb-p"
BRIDGE_NS, CLIENT_NS, LB_NS, BACKEND_NS = (f"{PREFIX}-{r}" for r in ("bridge", "client", "lb", "backend"))
ADDRESSES = {CLIENT_NS: "10.43.0.10", LB_NS: "10.43.0.2", BACKEND_NS: "10.43.0.101"}
ADDRESSES6 = {CLIENT_NS: "fd43::10", LB_NS: "fd43::2", BACKEND_NS: "fd43::101"}
PORT = 8000


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def remove_namespaces() -> None:
    present = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for ns in (CLIENT_NS, LB_NS, BACKEND_NS, BRIDGE_NS):
        if ns in present:
            subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture(scope="module")
def plain_bridge(bpf_object, tmp_path_factory):
    for tool in ("ip", "curl", "nsenter"):
        require(shutil.which(tool) is not None, f"needs {tool}")
    remove_namespaces()
    server = None
    try:
        ip("netns", "add", BRIDGE_NS)
        ip("-n", BRIDGE_NS, "link", "add", "br0", "type", "bridge")
        ip("-n", BRIDGE_NS, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(ADDRESSES.items()):
            ip("netns", "add", ns)
            ip("-n", BRIDGE_NS, "link", "add", f"port{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", BRIDGE_NS, "link", "set", f"port{i}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "addr", "add", f"{ADDRESSES6[ns]}/64", "dev", "eth0", "nodad")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        directory = tmp_path_factory.mktemp("www")
        (directory / "index.html").write_text("hello from the backend\n")
        server = start_server(BACKEND_NS, PORT, str(directory), bind="::")
        yield
    finally:
        if server is not None:
            lab.stop_process(server)
        subprocess.run([sys.executable, "-m", "xdplb", "-n", LB_NS, "detach", "eth0"], capture_output=True)
        remove_namespaces()


def xdplb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xdplb", "-n", LB_NS, *args], capture_output=True, text=True,
                          timeout=60)


def curl(url: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/run/netns/{CLIENT_NS}", "curl", "-sS", "-m", "3", url],
                          capture_output=True, text=True)


def test_auto_chooses_generic_on_a_veth_and_every_request_is_answered(plain_bridge):
    backend = f"{ADDRESSES[BACKEND_NS]}:{PORT}"
    attached = xdplb("attach", "eth0", "--port", str(PORT), "--backends", backend, "--flows", "4096")
    assert attached.returncode == 0, attached.stderr
    output = attached.stdout + attached.stderr
    assert "generic mode" in output and "mode: generic (auto: eth0 is a veth" in output, output
    try:
        answers = [curl(f"http://{ADDRESSES[LB_NS]}:{PORT}/") for _ in range(20)]
        # Sent with checksum offload on: every receiver checked the checksums xdplb rewrote.
        assert [a.stdout for a in answers] == ["hello from the backend\n"] * 20, [a.stderr for a in answers]
        (entry,) = json.loads(xdplb("stats", "eth0", "--json", "--interval", "0").stdout)
        assert entry["counters"]["new_flow"] == 20, entry["counters"]
    finally:
        xdplb("detach", "eth0")


def test_native_on_a_veth_warns_about_both_causes(plain_bridge):
    backend = f"{ADDRESSES[BACKEND_NS]}:{PORT}"
    attached = xdplb("attach", "eth0", "--mode", "native", "--port", str(PORT), "--backends", backend,
                     "--flows", "4096")
    try:
        assert attached.returncode == 0, attached.stderr
        output = attached.stdout + attached.stderr
        assert "peer veth has an XDP program" in output and "checksum offload" in output, output
    finally:
        xdplb("detach", "eth0")


@pytest.mark.parametrize("forward", ["dsr", "ipip"])
def test_ipv6_dsr_and_ipip_on_a_plain_bridge(plain_bridge, forward):
    """As below for IPv6: the backend prepared with `xdplb decap attach --vip` (the VIP on
    lo as a /128, the decapsulator for ip6ip6), the VIP a second address of the balancer,
    whose own IPv6 address is the outer source."""
    vip = "fd43::3"
    ip("-n", LB_NS, "addr", "add", f"{vip}/128", "dev", "eth0", "nodad", "preferred_lft", "0")
    prepared = subprocess.run([sys.executable, "-m", "xdplb", "-n", BACKEND_NS, "decap", "attach", "eth0",
                               "--vip", vip], capture_output=True, text=True, timeout=60)
    try:
        assert prepared.returncode == 0, prepared.stderr
        attached = xdplb("attach", "eth0", "--vip", vip, "--port", str(PORT), "--backends",
                         f"[{ADDRESSES6[BACKEND_NS]}]:{PORT}", "--flows", "4096", "--forward", forward)
        assert attached.returncode == 0, attached.stderr
        try:
            answers = [curl(f"http://[{vip}]:{PORT}/") for _ in range(20)]
            assert [a.stdout for a in answers] == ["hello from the backend\n"] * 20, [a.stderr for a in answers]
            (entry,) = json.loads(xdplb("stats", "eth0", "--json", "--interval", "0").stdout)
            assert entry["counters"]["new_flow"] == 20, entry["counters"]
            assert (entry["services"][0]["name"], entry["services"][0]["forward"]) == (f"[{vip}]:{PORT}/tcp", forward)
        finally:
            xdplb("detach", "eth0")
    finally:
        subprocess.run([sys.executable, "-m", "xdplb", "-n", BACKEND_NS, "decap", "detach", "eth0"],
                       capture_output=True, timeout=60)
        ip("-n", LB_NS, "addr", "del", f"{vip}/128", "dev", "eth0")


@pytest.mark.parametrize("forward", ["dsr", "ipip"])
def test_dsr_and_ipip_on_a_plain_bridge(plain_bridge, forward):
    """The backend prepared with `xdplb decap attach --vip` (its VIP on lo, the ARP
    settings, the decapsulator), the VIP a second address of the balancer: replies go
    straight from the backend to the client, checksums checked by every receiver."""
    vip = "10.43.0.3"
    backend = f"{ADDRESSES[BACKEND_NS]}:{PORT}"
    ip("-n", LB_NS, "addr", "add", f"{vip}/32", "dev", "eth0")
    prepared = subprocess.run([sys.executable, "-m", "xdplb", "-n", BACKEND_NS, "decap", "attach", "eth0",
                               "--vip", vip], capture_output=True, text=True, timeout=60)
    try:
        assert prepared.returncode == 0, prepared.stderr
        attached = xdplb("attach", "eth0", "--vip", vip, "--port", str(PORT), "--backends", backend,
                         "--flows", "4096", "--forward", forward)
        assert attached.returncode == 0, attached.stderr
        try:
            answers = [curl(f"http://{vip}:{PORT}/") for _ in range(20)]
            assert [a.stdout for a in answers] == ["hello from the backend\n"] * 20, [a.stderr for a in answers]
            (entry,) = json.loads(xdplb("stats", "eth0", "--json", "--interval", "0").stdout)
            assert entry["counters"]["new_flow"] == 20, entry["counters"]
            assert entry["services"][0]["forward"] == forward
        finally:
            xdplb("detach", "eth0")
    finally:
        subprocess.run([sys.executable, "-m", "xdplb", "-n", BACKEND_NS, "decap", "detach", "eth0"],
                       capture_output=True, timeout=60)
        ip("-n", LB_NS, "addr", "del", f"{vip}/32", "dev", "eth0")
