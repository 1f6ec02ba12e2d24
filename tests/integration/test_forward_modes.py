# SPDX-License-Identifier: Apache-2.0
"""dsr and ipip end to end on the lab (checksum offloads off, so every receiver checks
checksums): real clients and servers, backends prepared as `xdplb lab up --forward`
prepares them (the VIP on lo, the decapsulator for ipip)."""
from __future__ import annotations

import http.client

import pytest

from xdplb import lab

from .conftest import BACKENDS, CLIENT_NS, LB_NS, NAMES, backends_ready, in_ns, udp_answerers, xdplb

VIP = str(lab.BYPASS_VIP)  # not the balancer's own address (see lab.BYPASS_VIP)

CLIENT_ADDR = str(lab.SUBNET[lab.CLIENT_BASE])


@pytest.fixture(params=["dsr", "ipip"])
def forwarding(request, testlab):
    mode = request.param
    backends_ready(mode)
    try:
        xdplb("-n", LB_NS, "attach", "eth0", "--mode", "native", "--backends", ",".join(BACKENDS[:2]),
              "--flows", "65536", "--forward", mode, "--vip", VIP)
        try:
            yield mode
        finally:
            xdplb("-n", LB_NS, "detach", "eth0", check=False)
    finally:
        backends_ready("nat")


def fetch(conn_count: int) -> list[tuple[str, str]]:
    """(backend, the client address it saw) per request, a new connection each."""
    out = []
    for _ in range(conn_count):
        conn = http.client.HTTPConnection(VIP, 80, timeout=5)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            out.append((resp.getheader("X-Backend"), resp.getheader("X-Client")))
        finally:
            conn.close()
    return out


def test_new_connections_reach_both_backends_with_the_real_client_address(forwarding):
    answers = in_ns(CLIENT_NS, lambda: fetch(200))
    assert len(answers) == 200
    assert {b for b, _ in answers} == {NAMES[BACKENDS[0]], NAMES[BACKENDS[1]]}
    assert {c for _, c in answers} == {CLIENT_ADDR}, "the backend must see the client itself"
    status = xdplb("-n", LB_NS, "service", "list", "eth0").stdout
    assert f"{VIP}:80/tcp  {forwarding}  backends 2" in status


def test_udp_is_balanced_and_answered_from_the_vip(forwarding):
    xdplb("-n", LB_NS, "service", "add", "eth0", f"{VIP}:{lab.UDP_PORT}/udp", "--forward", forwarding)
    try:
        for b in BACKENDS[:2]:
            xdplb("-n", LB_NS, "backend", "add", "eth0", f"{VIP}:{lab.UDP_PORT}/udp", b)
        assert in_ns(CLIENT_NS, lambda: udp_answerers(VIP, lab.UDP_PORT)) == {NAMES[BACKENDS[0]], NAMES[BACKENDS[1]]}
    finally:
        xdplb("-n", LB_NS, "service", "del", "eth0", f"{VIP}:{lab.UDP_PORT}/udp", check=False)


def test_a_keepalive_connection_survives_detach_and_attach(forwarding):
    """Stateless recovery: the new program has no flow for the connection's next segment,
    which is not a SYN, and sends it where the ring says: the same backend."""
    def session():
        conn = http.client.HTTPConnection(VIP, 80, timeout=5)
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        first = resp.getheader("X-Backend")
        xdplb("-n", LB_NS, "detach", "eth0")
        xdplb("-n", LB_NS, "attach", "eth0", "--mode", "native", "--backends", ",".join(BACKENDS[:2]),
              "--flows", "65536", "--forward", forwarding, "--vip", VIP)
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


def test_an_upload_larger_than_the_path_mtu_completes(forwarding):
    """20 kB in full-size segments: with ipip each would exceed the 1500-byte link once
    encapsulated, so the balancer answers "fragmentation needed" and the client's TCP
    sends smaller segments; with dsr nothing grows. The lab server reads the body and
    says how much it got."""
    body = b"x" * 20_000

    def upload():
        conn = http.client.HTTPConnection(VIP, 80, timeout=10)
        try:
            conn.request("GET", "/", body=body, headers={"Content-Length": str(len(body))})
            resp = conn.getresponse()
            resp.read()
            return resp.status, resp.getheader("X-Received")
        finally:
            conn.close()
    assert in_ns(CLIENT_NS, upload) == (200, str(len(body)))
