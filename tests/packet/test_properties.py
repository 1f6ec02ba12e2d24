# SPDX-License-Identifier: Apache-2.0
"""Invariants over generated packets (hypothesis): whatever arrives, the program never
aborts; what it passes is untouched; what it transmits has a correct length and valid
IP and L4 checksums (recomputed by scapy)."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from . import packets as P
from .conftest import XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, service

SETTINGS = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

addresses = st.sampled_from([P.VIP, P.CLIENT, P.BACKEND, "10.0.0.3", "192.0.2.1"])
ports = st.one_of(st.just(80), st.integers(1, 65535), st.integers(20000, 20999))


@st.composite
def l4_packets(draw):
    proto = draw(st.sampled_from(["tcp", "udp"]))
    src, dst = draw(addresses), draw(addresses)
    sport, dport = draw(ports), draw(ports)
    ttl = draw(st.integers(0, 255))
    payload = draw(st.binary(max_size=64))
    ip = P.IP(src=src, dst=dst, ttl=ttl, id=draw(st.integers(0, 65535)))
    if draw(st.booleans()):
        ip.options = [P.IPOption_RR(routers=["0.0.0.0"] * draw(st.integers(1, 3)))]
    if draw(st.integers(0, 9)) == 0:
        ip.flags = "MF"
    if proto == "tcp":
        l4 = P.TCP(sport=sport, dport=dport, flags=draw(st.integers(0, 255)), seq=draw(st.integers(0, 2**32 - 1)))
    else:
        l4 = P.UDP(sport=sport, dport=dport)
    return P.build(P.Ether(src=P.CLIENT_MAC, dst=P.LB_MAC) / ip / l4 / payload)


def check_invariants(data: bytes, action: int, out: bytes) -> None:
    assert action != XDP_ABORTED
    assert action in (XDP_PASS, XDP_TX, XDP_REDIRECT, XDP_DROP)
    if action == XDP_PASS:
        assert out == data
    if action in (XDP_TX, XDP_REDIRECT):
        assert len(out) == len(data)
        got = P.Ether(out)
        ip = got[P.IP]
        assert ip.len == len(out) - 14 or len(out) - 14 > ip.len  # frame may carry padding
        fresh = P.Ether(out)
        del fresh[P.IP].chksum
        l4 = fresh[P.IP].payload
        keep_zero_udp = isinstance(l4, P.UDP) and got[P.UDP].chksum == 0
        if not keep_zero_udp:
            del l4.chksum
        fresh = P.Ether(bytes(fresh))
        assert got[P.IP].chksum == fresh[P.IP].chksum
        assert got[P.IP].payload.chksum == fresh[P.IP].payload.chksum


@SETTINGS
@given(pkt=l4_packets())
def test_generated_packets_keep_invariants(harness, pkt):
    harness.configure([service(P.BACKEND), service(P.BACKEND2, proto="udp")])
    action, out = harness.run(pkt)
    check_invariants(pkt, action, out)


@SETTINGS
@given(pkt=l4_packets(), cut=st.integers(0, 120))
def test_truncated_packets_are_never_forwarded_corrupted(harness, pkt, cut):
    harness.configure([service(P.BACKEND), service(P.BACKEND2, proto="udp")])
    data = pkt[:cut] if cut < len(pkt) else pkt
    action, out = harness.run(data if len(data) >= 14 else pkt)
    check_invariants(data if len(data) >= 14 else pkt, action, out)


@SETTINGS
@given(data=st.binary(min_size=14, max_size=200))
def test_random_bytes_pass_or_forward_valid(harness, data):
    harness.configure([service(P.BACKEND)])
    action, out = harness.run(data)
    check_invariants(data, action, out)


@SETTINGS
@given(dport=st.integers(1, 65535).filter(lambda p: p != 80 and not 20000 <= p <= 20999),
       proto=st.sampled_from(["tcp", "udp"]))
def test_packets_not_for_a_service_pass_untouched(harness, dport, proto):
    harness.configure([service(P.BACKEND)])
    pkt = P.tcp(P.CLIENT, 1234, P.VIP, dport) if proto == "tcp" else P.udp(P.CLIENT, 1234, P.VIP, dport)
    action, out = harness.run(pkt)
    assert (action, out) == (XDP_PASS, pkt)
