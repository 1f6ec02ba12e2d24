# SPDX-License-Identifier: Apache-2.0
"""IPv6 dsr and ipip (ip6ip6) end to end on the lab (checksum offloads off, so every
receiver checks checksums): real clients over IPv6, backends holding the IPv6 VIP on lo
(and decapsulating, for ipip) as `xdplb lab up --forward` prepares them, and an IPv4
service of the same mode beside it on the same interface."""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time

import pytest

from xdplb import lab, netlink
from xdplb.namespaces import run_in_netns

from .conftest import BACKENDS, CLIENT_NS, LB_NS, NAMES, PREFIX, backends_ready, in_ns, udp_answerers, xdplb

VIP6 = str(lab.BYPASS_VIP6)
VIP4 = str(lab.BYPASS_VIP)
HOSTS = {h.name: h for h in lab.hosts(PREFIX, 3, 2)}
BACKENDS6 = [HOSTS[f"backend-{c}"].address6 for c in "ab"]
NAMES6 = {HOSTS[f"backend-{c}"].address6: f"backend-{c}" for c in "abc"}
CLIENT6 = HOSTS["client"].address6
SERVICE6 = f"[{VIP6}]:80/tcp"


@pytest.fixture(params=["dsr", "ipip"])
def dual_stack(request, testlab):
    """An IPv4 and an IPv6 service of one mode on the balancer's eth0, two backends each."""
    mode = request.param
    backends_ready(mode)
    try:
        xdplb("-n", LB_NS, "attach", "eth0", "--mode", "native", "--vip", VIP4, "--forward", mode,
              "--backends", ",".join(BACKENDS[:2]), "--flows", "65536")
        try:
            xdplb("-n", LB_NS, "service", "add", "eth0", SERVICE6, "--forward", mode)
            for b in BACKENDS6:
                xdplb("-n", LB_NS, "backend", "add", "eth0", SERVICE6, b)
            yield mode
        finally:
            xdplb("-n", LB_NS, "detach", "eth0", check=False)
    finally:
        backends_ready("nat")


def fetch(host: str, count: int, keepalive: bool = False) -> list[tuple[str, str]]:
    """(backend, the client address it saw) per request."""
    out = []
    conn = None
    for _ in range(count):
        if conn is None or not keepalive:
            conn = http.client.HTTPConnection(host, 80, timeout=5)
        conn.request("GET", "/", headers={} if keepalive else {"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        out.append((resp.getheader("X-Backend"), resp.getheader("X-Client")))
        if not keepalive:
            conn.close()
    conn.close()
    return out


def test_new_ipv6_connections_reach_both_backends_with_the_real_client_address(dual_stack):
    answers = in_ns(CLIENT_NS, lambda: fetch(VIP6, 200))
    assert {b for b, _ in answers} == {NAMES6[BACKENDS6[0]], NAMES6[BACKENDS6[1]]}
    assert {c for _, c in answers} == {CLIENT6}, "the backend must see the client itself"
    (entry,) = json.loads(xdplb("-n", LB_NS, "stats", "eth0", "--json").stdout)
    assert entry["counters"]["new_flow"] >= 200
    listed = xdplb("-n", LB_NS, "service", "list", "eth0").stdout
    assert f"{SERVICE6}  {dual_stack}  backends 2" in listed and f"{VIP4}:80/tcp  {dual_stack}  backends 2" in listed
    if dual_stack == "ipip":  # each backend's decapsulator took the outer IPv6 headers off
        decapsulated = sum(json.loads(xdplb("-n", f"{PREFIX}-{NAMES6[b]}", "decap", "status", "--json").stdout)
                           ["interfaces"][0]["counters"]["decapsulated"] for b in BACKENDS6)
        assert decapsulated >= 200


def test_both_families_are_balanced_at_once_on_one_interface(dual_stack):
    def both():
        return fetch(VIP4, 40), fetch(VIP6, 40)
    four, six = in_ns(CLIENT_NS, both)
    assert {b for b, _ in four} == {NAMES[BACKENDS[0]], NAMES[BACKENDS[1]]}
    assert {b for b, _ in six} == {NAMES6[BACKENDS6[0]], NAMES6[BACKENDS6[1]]}


def test_the_client_resolves_the_ipv6_vip_to_the_balancer_not_a_backend(dual_stack):
    """Backends hold the VIP on lo; Linux answers neighbour solicitations only for the
    addresses of the interface asked on, so the balancer's answer is the only one."""
    in_ns(CLIENT_NS, lambda: fetch(VIP6, 1))
    lb_mac = run_in_netns(LB_NS, lambda: netlink.get_link("eth0").mac)
    known = run_in_netns(CLIENT_NS, lambda: netlink.next_hops_now([VIP6]))
    assert known[VIP6].dmac == lb_mac


def test_an_ipv6_upload_larger_than_the_path_mtu_completes(dual_stack):
    """20 kB in full-size segments: with ipip each would exceed the 1500-byte link once
    encapsulated, so the balancer answers "packet too big" and the client's TCP sends
    smaller segments; with dsr nothing grows."""
    body = b"x" * 20_000

    def upload():
        conn = http.client.HTTPConnection(VIP6, 80, timeout=10)
        conn.request("GET", "/", body=body, headers={"Content-Length": str(len(body))})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp.getheader("X-Received")
    assert in_ns(CLIENT_NS, upload) == str(len(body))
    if dual_stack == "ipip":
        (entry,) = json.loads(xdplb("-n", LB_NS, "stats", "eth0", "--json").stdout)
        assert entry["counters"]["frag_needed"] >= 1


def test_ipv6_udp_is_balanced_and_answered_from_the_vip(dual_stack):
    service = f"[{VIP6}]:{lab.UDP_PORT}/udp"
    xdplb("-n", LB_NS, "service", "add", "eth0", service, "--forward", dual_stack)
    for b in BACKENDS6:
        xdplb("-n", LB_NS, "backend", "add", "eth0", service, b)
    assert in_ns(CLIENT_NS, lambda: udp_answerers(VIP6, lab.UDP_PORT)) == {NAMES6[BACKENDS6[0]], NAMES6[BACKENDS6[1]]}


def test_an_ipv6_keepalive_connection_survives_detach_and_attach(dual_stack):
    """Stateless recovery: the new program has no flow for the connection's next segment
    and sends it where the ring says, which the same configuration makes the same backend."""
    def session():
        conn = http.client.HTTPConnection(VIP6, 80, timeout=5)
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        first = resp.getheader("X-Backend")
        xdplb("-n", LB_NS, "detach", "eth0")
        xdplb("-n", LB_NS, "attach", "eth0", "--mode", "native", "--vip", VIP6, "--forward", dual_stack,
              "--backends", ",".join(BACKENDS6), "--flows", "65536")
        later = []
        for _ in range(3):
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            later.append(resp.getheader("X-Backend"))
        conn.close()
        return first, later
    first, later = in_ns(CLIENT_NS, session)
    assert later == [first] * 3


def test_an_ipv6_service_survives_export_and_apply(dual_stack, tmp_path):
    exported = xdplb("-n", LB_NS, "export").stdout
    assert f'vip = "{VIP6}"' in exported
    path = tmp_path / "lb.toml"
    path.write_text(exported)
    assert "no changes" in (dry := xdplb("-n", LB_NS, "apply", str(path), "--dry-run", check=False)).stdout + dry.stderr
    assert dry.returncode == 0


def test_trace_shows_ipv6_packets(dual_stack):
    """The kernel prints IPv6 addresses itself (%pI6), and trace decodes them."""
    tracer = subprocess.Popen([sys.executable, "-m", "xdplb", "-n", LB_NS, "trace", "eth0", "--duration", "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        in_ns(CLIENT_NS, lambda: fetch(VIP6, 2))
        out, err = tracer.communicate(timeout=20)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    lines = [line for line in out.splitlines() if line.startswith(f"[{CLIENT6}]:")]
    assert any(f" -> [{VIP6}]:80 tcp [S] new backend " in line and any(f"-> [{b}]:80 " in line for b in BACKENDS6)
               for line in lines), out + err
