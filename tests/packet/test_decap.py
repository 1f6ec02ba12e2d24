# SPDX-License-Identifier: Apache-2.0
"""The backends' decapsulator (bpf/decap.bpf.c) through BPF_PROG_TEST_RUN: exact output
bytes for every outcome, one counter per packet, and generated frames checked against a
model of the decision written from the description (the docstring of expected())."""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.packet import Raw

from tests.conftest import require
from xdplb import build, decap, decap_abi
from xdplb.libbpf import ProgInfo, libbpf

from . import packets as P

XDP_DROP, XDP_PASS = 1, 2
ECN_ECT1, ECN_ECT0, ECN_CE = 1, 2, 3
BACKEND = "10.0.0.101"  # this host's address: the outer destination the balancer uses
BACKEND6 = "fd00::101"  # its IPv6 one
OTHER_HOST = "10.0.0.102"
LB = "10.0.0.2"  # the balancer's encap source
VIP = "10.0.0.50"
ETH = P.Ether(src=P.LB_MAC, dst=P.BACKEND_MAC)


@pytest.fixture(scope="module")
def decap_object(root):
    require(shutil.which(os.environ.get("CLANG", "clang")) is not None, "needs clang")
    return build.compile_object(build.DECAP_OBJECT, source=build.DECAP_SOURCE,
                                required_maps=decap_abi.MAPS).path


class Decapsulator:
    def __init__(self, path):
        lib = libbpf()
        obj = lib.load_object(str(path), {})
        try:
            self.prog_fd = os.dup(lib.prog_fd(obj, decap_abi.PROGRAM_NAME))
            self.fds = {name: os.dup(lib.map_fd(obj, name)) for name in decap_abi.MAPS}
        finally:
            lib.bpf_object__close(obj)

    def run(self, data: bytes) -> tuple[int, bytes]:
        action, out, _ = libbpf().test_run(self.prog_fd, data)
        return action, out

    def counters(self) -> dict[str, int]:
        return decap.counters(self.fds[decap_abi.STATS_MAP])

    def outcome(self, data: bytes) -> tuple[int, bytes, list[str]]:
        """Runs one frame: action, output, and which counters moved (by how much)."""
        before = self.counters()
        action, out = self.run(data)
        after = self.counters()
        moved = [name for name in after for _ in range(after[name] - before[name])]
        return action, out, moved

    def close(self):
        for fd in [self.prog_fd, *self.fds.values()]:
            os.close(fd)


@pytest.fixture(scope="module")
def dc(decap_object):
    d = Decapsulator(decap_object)
    decap.write_local(d.fds[decap_abi.LOCAL_MAP], [ipaddress.IPv4Address(BACKEND), ipaddress.IPv4Address("192.0.2.7"),
                                                   ipaddress.IPv6Address(BACKEND6)])
    yield d
    d.close()


def inner_syn() -> bytes:
    return P.build(P.IP(src=P.CLIENT, dst=VIP, id=7, flags="DF") / P.TCP(sport=40000, dport=80, flags="S", seq=1000))


def ipip(inner: bytes, dst: str = BACKEND, **outer) -> bytes:
    return P.build(ETH / P.IP(src=LB, dst=dst, proto=4, **outer) / Raw(inner))


# ---- exact outputs -----------------------------------------------------------------------

def test_ipip_to_this_host_passes_exactly_the_inner_frame(dc):
    inner = inner_syn()
    frame = ipip(inner)
    assert frame[12:14] == b"\x08\x00" and frame[14 + 9] == 4 and len(frame) == 14 + 20 + len(inner)
    action, out, moved = dc.outcome(frame)
    assert action == XDP_PASS
    assert out == frame[:14] + inner  # the same Ethernet header, then the inner packet byte for byte
    assert moved == ["decapsulated"]
    got = P.Ether(out)
    assert got[P.IP].dst == VIP and got[P.TCP].flags == "S" and got.src == P.LB_MAC and got.dst == P.BACKEND_MAC


@pytest.mark.parametrize("inner", [
    P.build(P.IP(src=P.CLIENT, dst=VIP) / P.UDP(sport=5000, dport=53) / b"query"),
    P.build(P.IP(src=P.CLIENT, dst=VIP) / P.ICMP(type=8, id=1, seq=1) / b"ping"),
    P.build(P.IP(src=P.CLIENT, dst=VIP) / P.TCP(sport=1, dport=80, flags="A") / (b"x" * 1400)),
    P.build(P.IP(src=P.CLIENT, dst=VIP, options=[P.IPOption_RR(routers=["0.0.0.0"])]) / P.UDP() / b"opt"),
], ids=["udp", "icmp", "tcp-1400", "inner-options"])
def test_any_inner_ipv4_packet_is_passed_as_it_is(dc, inner):
    frame = ipip(inner)
    action, out, moved = dc.outcome(frame)
    assert (action, out, moved) == (XDP_PASS, frame[:14] + inner, ["decapsulated"])


def test_the_second_local_address_is_also_this_host(dc):
    frame = ipip(inner_syn(), dst="192.0.2.7")
    assert dc.outcome(frame) == (XDP_PASS, frame[:14] + inner_syn(), ["decapsulated"])


def test_outer_header_with_options_goes_as_a_whole(dc):
    inner = inner_syn()
    frame = ipip(inner, options=[P.IPOption_RR(routers=["0.0.0.0"] * 3)])
    ihl = (frame[14] & 0xF) * 4
    assert ihl == 36
    assert dc.outcome(frame) == (XDP_PASS, frame[:14] + inner, ["decapsulated"])


def test_frame_padding_past_the_outer_length_stays_for_the_kernel_to_trim(dc):
    inner = P.build(P.IP(src=P.CLIENT, dst=VIP, proto=253))  # a bare header: 54 bytes in all
    frame = ipip(inner)
    padded = frame + b"\0" * (60 - len(frame))  # the minimum Ethernet frame
    assert len(frame) == 54
    assert dc.outcome(padded) == (XDP_PASS, padded[:14] + inner + b"\0" * 6, ["decapsulated"])


# ---- untouched ---------------------------------------------------------------------------

def test_ipip_to_another_host_is_untouched(dc):
    frame = ipip(inner_syn(), dst=OTHER_HOST)
    assert dc.outcome(frame) == (XDP_PASS, frame, ["not_local"])


@pytest.mark.parametrize("cut", [1, 10, 19])
def test_truncated_outer_header_is_untouched(dc, cut):
    frame = ipip(inner_syn())[:14 + cut]
    assert dc.outcome(frame) == (XDP_PASS, frame, ["malformed"])


def test_outer_options_cut_short_are_untouched(dc):
    frame = ipip(inner_syn(), options=[P.IPOption_RR(routers=["0.0.0.0"] * 3)])[:14 + 30]
    assert dc.outcome(frame) == (XDP_PASS, frame, ["malformed"])


@pytest.mark.parametrize("change", ["checksum", "tot_len_past_frame", "tot_len_below_header", "ihl_4", "version_6"])
def test_inconsistent_outer_header_is_untouched(dc, change):
    frame = bytearray(ipip(inner_syn()))
    ip = 14
    if change == "checksum":
        frame[ip + 10] ^= 0x01
    elif change == "tot_len_past_frame":
        struct.pack_into("!H", frame, ip + 2, len(frame) - 14 + 1)
    elif change == "tot_len_below_header":
        struct.pack_into("!H", frame, ip + 2, 19)
    elif change == "ihl_4":
        frame[ip] = 0x44
    elif change == "version_6":
        frame[ip] = 0x65
    if change != "checksum":
        fix_checksum(frame, ip, max(20, (frame[ip] & 0xF) * 4))
    frame = bytes(frame)
    assert dc.outcome(frame) == (XDP_PASS, frame, ["malformed"])


@pytest.mark.parametrize("flags,frag", [("MF", 0), (0, 100), ("MF", 100)], ids=["first", "last", "middle"])
def test_fragments_are_left_to_the_kernel(dc, flags, frag):
    frame = ipip(inner_syn(), flags=flags, frag=frag)
    assert dc.outcome(frame) == (XDP_PASS, frame, ["fragment"])


@pytest.mark.parametrize("inner", [b"", b"\x45" + b"\0" * 18, b"\x45\0\0\x14" + b"\0" * 10],
                         ids=["empty", "19-bytes", "14-bytes"])
def test_inner_shorter_than_an_ipv4_header_is_untouched(dc, inner):
    frame = ipip(inner)
    assert dc.outcome(frame) == (XDP_PASS, frame, ["inner_malformed"])


@pytest.mark.parametrize("change", ["version_6", "ihl_4", "tot_len_past_outer", "tot_len_below_header"])
def test_inner_that_is_no_ipv4_packet_is_untouched(dc, change):
    inner = bytearray(inner_syn())
    if change == "version_6":
        inner[0] = 0x65
    elif change == "ihl_4":
        inner[0] = 0x44
    elif change == "tot_len_past_outer":
        struct.pack_into("!H", inner, 2, len(inner) + 1)
    else:
        struct.pack_into("!H", inner, 2, 19)
    frame = ipip(bytes(inner)) + b"\0" * 8  # padding must not count as inner bytes
    assert dc.outcome(frame) == (XDP_PASS, frame, ["inner_malformed"])


@pytest.mark.parametrize("frame", [
    P.tcp(P.CLIENT, 40000, BACKEND, 80),
    P.udp(P.CLIENT, 5000, BACKEND, 53),
    P.build(P.Ether(src=P.LB_MAC, dst="ff:ff:ff:ff:ff:ff") / P.ARP(psrc=LB, pdst=BACKEND)),
    P.build(P.Ether(src=P.LB_MAC, dst=P.BACKEND_MAC) / P.IPv6(src="fd00::2", dst="fd00::65", nh=4) / Raw(inner_syn())),
    P.build(P.Ether(src=P.LB_MAC, dst=P.BACKEND_MAC) / P.IP(src=LB, dst=BACKEND, proto=41) / P.IPv6() / b"6in4"),
    P.build(P.Ether(src=P.LB_MAC, dst=P.BACKEND_MAC, type=0x8100) / b"\x00\x05\x08\x00" / P.IP(src=LB, dst=BACKEND, proto=4) / Raw(inner_syn())),
    P.build(P.Ether(src=P.LB_MAC, dst=P.BACKEND_MAC, type=0x0800)),
], ids=["tcp", "udp", "arp", "ipv4-in-ipv6", "ipv6-in-ipv4", "vlan-tagged-ipip", "ether-only"])
def test_everything_else_is_untouched(dc, frame):
    expected = "malformed" if len(frame) == 14 else "not_ipip"
    assert dc.outcome(frame) == (XDP_PASS, frame, [expected])


def test_nothing_is_decapsulated_without_local_addresses(decap_object):
    d = Decapsulator(decap_object)
    try:
        frame = ipip(inner_syn())
        assert d.outcome(frame) == (XDP_PASS, frame, ["not_local"])
    finally:
        d.close()


def test_counters_count_each_packet_once_by_outcome(decap_object):
    d = Decapsulator(decap_object)
    try:
        decap.write_local(d.fds[decap_abi.LOCAL_MAP], [ipaddress.IPv4Address(BACKEND)])
        frames = ([ipip(inner_syn())] * 3 + [ipip(inner_syn(), dst=OTHER_HOST)] * 2 + [ipip(b"")]
                  + [ipip(inner_syn())[:20]] + [ipip(inner_syn(), flags="MF")] + [P.tcp(P.CLIENT, 1, BACKEND, 80)] * 4)
        for f in frames:
            assert d.run(f)[0] == XDP_PASS
        assert d.run(ipip(inner_syn(), tos=ECN_CE))[0] == XDP_DROP
        assert d.counters() == {"decapsulated": 3, "not_ipip": 4, "not_local": 2, "malformed": 1,
                                "inner_malformed": 1, "fragment": 1, "error": 0, "ecn_drop": 1}
    finally:
        d.close()


def test_local_addresses_are_replaced_not_added_to(decap_object):
    d = Decapsulator(decap_object)
    try:
        fd = d.fds[decap_abi.LOCAL_MAP]
        decap.write_local(fd, [ipaddress.IPv4Address(a) for a in (BACKEND, "192.0.2.7")])
        decap.write_local(fd, [ipaddress.IPv4Address(a) for a in (OTHER_HOST, "192.0.2.7")])
        assert decap.read_local(fd) == [ipaddress.IPv4Address("10.0.0.102"), ipaddress.IPv4Address("192.0.2.7")]
        frame = ipip(inner_syn())
        assert d.outcome(frame) == (XDP_PASS, frame, ["not_local"])
    finally:
        d.close()


# ---- ECN (RFC 6040) ------------------------------------------------------------------------

@pytest.mark.parametrize("outer_ecn,inner_ecn,after", [
    (ECN_CE, ECN_ECT0, ECN_CE), (ECN_CE, ECN_ECT1, ECN_CE), (ECN_CE, ECN_CE, ECN_CE),
    (ECN_ECT1, ECN_ECT0, ECN_ECT1),
    (ECN_ECT0, ECN_ECT1, ECN_ECT1), (ECN_ECT0, 0, 0), (ECN_ECT1, 0, 0), (0, ECN_ECT0, ECN_ECT0), (0, ECN_CE, ECN_CE),
])
def test_congestion_marks_on_the_outer_header_reach_the_inner_packet(dc, outer_ecn, inner_ecn, after):
    """A router between the balancer and this host marks the outer header; the inner
    packet gets the mark (its DSCP and everything else kept, its checksum right)."""
    def inner(ecn):
        return P.build(P.IP(src=P.CLIENT, dst=VIP, tos=0xb8 | ecn, id=7) / P.TCP(sport=1, dport=80, flags="A"))
    frame = ipip(inner(inner_ecn), tos=0xb8 | outer_ecn)
    action, out, moved = dc.outcome(frame)
    assert (action, out, moved) == (XDP_PASS, frame[:14] + inner(after), ["decapsulated"])


def test_congestion_mark_on_a_packet_that_cannot_carry_it_drops_it(dc):
    frame = ipip(P.build(P.IP(src=P.CLIENT, dst=VIP, tos=0xb8) / P.UDP(sport=1, dport=53) / b"q"), tos=ECN_CE)
    action, _, moved = dc.outcome(frame)
    assert (action, moved) == (XDP_DROP, ["ecn_drop"])


# ---- the contract with Python ------------------------------------------------------------

def test_python_mirror_matches_the_header_and_the_object(dc):
    text = re.sub(r"/\*.*?\*/", "", (build.BPF_DIR / "decap_abi.h").read_text(), flags=re.S)
    enum = re.search(r"enum xdplb_dc_counter \{(.*?)\};", text, re.S).group(1)
    names = [n.strip() for n in enum.split(",") if n.strip()]
    assert names == [f"XDPLB_DC_{c.upper()}" for c in decap_abi.COUNTERS] + ["XDPLB_DC_MAX"]
    assert int(re.search(r"#define XDPLB_DC_MAX_LOCAL (\d+)", text).group(1)) == decap_abi.MAX_LOCAL
    assert libbpf().obj_info(dc.prog_fd, ProgInfo()).name.decode() == decap_abi.PROGRAM_NAME


# ---- generated frames --------------------------------------------------------------------

LOCAL = {ipaddress.IPv4Address(BACKEND).packed, ipaddress.IPv4Address("192.0.2.7").packed}


def ones_sum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data[: len(data) // 2 * 2]))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def fix_checksum(frame: bytearray, at: int, length: int) -> None:
    struct.pack_into("!H", frame, at + 10, 0)
    struct.pack_into("!H", frame, at + 10, ~ones_sum(bytes(frame[at:at + length])) & 0xFFFF)


def expected(frame: bytes) -> str:
    """The decision as described: IPv4 with protocol 4, a complete and consistent outer
    header with a valid checksum, to a local address, not a fragment, holding a complete
    IPv4 header whose length fits in the outer payload: decapsulated. Else the reason.
    The same for IPv6 in IPv6 (next header 41, no header checksum, no fragments)."""
    if frame[12:14] == b"\x86\xdd":
        return expected6(frame[14:])
    if frame[12:14] != b"\x08\x00":
        return "not_ipip"
    ip = frame[14:]
    if len(ip) < 20:
        return "malformed"
    if ip[9] != 4:
        return "not_ipip"
    hl, tot = (ip[0] & 0xF) * 4, int.from_bytes(ip[2:4], "big")
    if ip[0] >> 4 != 4 or hl < 20 or hl > len(ip) or tot < hl or tot > len(ip) or ones_sum(ip[:hl]) != 0xFFFF:
        return "malformed"
    if ip[16:20] not in LOCAL:
        return "not_local"
    if int.from_bytes(ip[6:8], "big") & 0x3FFF:
        return "fragment"
    inner = ip[hl:]
    if len(inner) < 20 or inner[0] >> 4 != 4 or inner[0] & 0xF < 5:
        return "inner_malformed"
    inner_tot = int.from_bytes(inner[2:4], "big")
    if inner_tot < (inner[0] & 0xF) * 4 or inner_tot > tot - hl:
        return "inner_malformed"
    if ip[1] & 3 == ECN_CE and not inner[1] & 3:
        return "ecn_drop"
    return "decapsulated"


def expected6(ip: bytes) -> str:
    if len(ip) < 40 or ip[0] >> 4 != 6:
        return "malformed"
    if ip[6] != 41:
        return "not_ipip"
    payload = int.from_bytes(ip[4:6], "big")
    if 40 + payload > len(ip):
        return "malformed"
    if ip[24:40] != ipaddress.IPv6Address(BACKEND6).packed:
        return "not_local"
    inner = ip[40:]
    if len(inner) < 40 or inner[0] >> 4 != 6 or 40 + int.from_bytes(inner[4:6], "big") > payload:
        return "inner_malformed"
    if (ip[1] >> 4) & 3 == ECN_CE and not (inner[1] >> 4) & 3:
        return "ecn_drop"
    return "decapsulated"


def inner_after_ecn6(outer: bytes, inner: bytes) -> bytes:
    """inner_after_ecn for IPv6: the ECN bits of the traffic class (bits 4-5 of byte 1)."""
    out, ecn = (outer[1] >> 4) & 3, (inner[1] >> 4) & 3
    if out == ECN_CE:
        ecn = ECN_CE
    elif out == ECN_ECT1 and ecn == ECN_ECT0:
        ecn = ECN_ECT1
    return inner[:1] + bytes([inner[1] & 0xCF | ecn << 4]) + inner[2:]


@st.composite
def frames6(draw):
    """IPv6-in-IPv6 frames close to valid, each field sometimes off."""
    inner = draw(st.one_of(
        st.builds(lambda tc, payload: P.build(P.IPv6(src="fd00:1::10", dst="fd00::2", tc=tc) / P.UDP() / payload),
                  st.integers(0, 255), st.binary(max_size=40)),
        st.binary(max_size=60)))
    tc = draw(st.sampled_from([0, 0, ECN_ECT1, ECN_ECT0, ECN_CE, 0xb8 | ECN_CE]))
    dst = ipaddress.IPv6Address(draw(st.sampled_from([BACKEND6, "fd00::999"]))).packed
    outer = bytearray(struct.pack("!IHBB16s16s", 6 << 28 | tc << 20 | 0x12345, len(inner), 41, 64,
                                  ipaddress.IPv6Address("fd00::1").packed, dst))
    if draw(st.integers(0, 9)) == 0:
        outer[6] = draw(st.sampled_from([4, 6, 17, 0, 59]))
    if draw(st.integers(0, 9)) == 0:
        outer[0] = draw(st.integers(0, 255))
    if draw(st.integers(0, 9)) == 0:
        struct.pack_into("!H", outer, 4, draw(st.integers(0, 0xFFFF)))
    frame = bytes.fromhex("0200000000b1" "020000000001" "86dd") + bytes(outer) + inner
    if draw(st.integers(0, 7)) == 0:
        frame = frame[:draw(st.integers(14, len(frame)))]
    if draw(st.integers(0, 4)) == 0:
        frame += draw(st.binary(min_size=1, max_size=20))
    return frame


def inner_after_ecn(outer_tos: int, inner: bytes) -> bytes:
    """RFC 6040's decapsulation, written from the RFC's table: CE outside marks an
    ECN-capable inner packet CE; ECT(1) outside turns ECT(0) inside into ECT(1). The inner
    checksum is recomputed from scratch, whatever it was (an incremental update keeps a
    wrong one wrong)."""
    out, ecn = outer_tos & 3, inner[1] & 3
    new = 3 if out == ECN_CE else 1 if (out, ecn) == (ECN_ECT1, ECN_ECT0) else ecn
    if new == ecn:
        return inner
    changed = bytearray(inner)
    changed[1] = inner[1] & ~3 | new
    old_word, new_word = int.from_bytes(inner[0:2], "big"), int.from_bytes(changed[0:2], "big")
    check = int.from_bytes(inner[10:12], "big")
    total = (~check & 0xFFFF) + (~old_word & 0xFFFF) + new_word  # RFC 1624, eqn. 3
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    changed[10:12] = (~total & 0xFFFF).to_bytes(2, "big")
    return bytes(changed)


@st.composite
def frames(draw):
    """Mostly IPIP frames close to valid, each field sometimes off, so that every branch
    is taken; sometimes cut short or padded."""
    inner = draw(st.one_of(
        st.builds(lambda n, tos, payload: P.build(P.IP(src=P.CLIENT, dst=VIP, ttl=n, tos=tos) / P.UDP() / payload),
                  st.integers(1, 255), st.integers(0, 255), st.binary(max_size=40)),
        st.just(inner_syn()),
        st.binary(max_size=60)))
    options = draw(st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x07\x0b\x04" + b"\0" * 9]))
    hl = 20 + len(options)
    dst = ipaddress.IPv4Address(draw(st.sampled_from([BACKEND, "192.0.2.7", OTHER_HOST]))).packed
    tos = draw(st.sampled_from([0, 0, 0, ECN_ECT1, ECN_ECT0, ECN_CE, 0xb8 | ECN_CE]))
    outer = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | hl // 4, tos, hl + len(inner), 1, 0, 64, 4, 0,
                                  ipaddress.IPv4Address(LB).packed, dst) + options)
    if draw(st.integers(0, 9)) == 0:
        outer[9] = draw(st.sampled_from([6, 17, 41, 0, 255]))
    if draw(st.integers(0, 9)) == 0:
        outer[0] = draw(st.integers(0, 255))
    if draw(st.integers(0, 9)) == 0:
        struct.pack_into("!H", outer, 2, draw(st.integers(0, 0xFFFF)))
    if draw(st.integers(0, 5)) == 0:
        struct.pack_into("!H", outer, 6, draw(st.sampled_from([0x2000, 0x0001, 0x4000, 0x8000])))
    fix_checksum(outer, 0, hl)
    if draw(st.integers(0, 9)) == 0:
        outer[10] ^= draw(st.integers(1, 255))
    ethertype = draw(st.sampled_from([b"\x08\x00"] * 8 + [b"\x86\xdd", b"\x08\x06"]))
    frame = bytes.fromhex("0200000000b1" "020000000001") + ethertype + bytes(outer) + inner
    if draw(st.integers(0, 7)) == 0:
        frame = frame[:draw(st.integers(14, len(frame)))]
    if draw(st.integers(0, 4)) == 0:
        frame += draw(st.binary(min_size=1, max_size=20))
    return frame


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=st.one_of(frames(), frames(), frames(), frames6(), st.binary(min_size=14, max_size=120)))
def test_generated_frames_are_untouched_or_lose_exactly_the_outer_header(dc, frame):
    action, out, moved = dc.outcome(frame)
    want = expected(frame)
    assert moved == [want]
    assert action == (XDP_DROP if want == "ecn_drop" else XDP_PASS)
    if want == "decapsulated" and frame[12:14] == b"\x86\xdd":
        assert out == frame[:14] + inner_after_ecn6(frame[14:], frame[54:])
    elif want == "decapsulated":
        hl = (frame[14] & 0xF) * 4
        assert out == frame[:14] + inner_after_ecn(frame[15], frame[14 + hl:])
    elif want != "ecn_drop":
        assert out == frame


def ip6ip6(inner: bytes, dst: str = BACKEND6, tc: int = 0) -> bytes:
    outer = P.IPv6(src="fd00::1", dst=dst, nh=41, hlim=64, tc=tc, plen=len(inner))
    return P.build(ETH / outer) + inner


def test_ip6ip6_to_this_host_loses_its_outer_header_and_nothing_else(dc):
    inner = P.build(P.IPv6(src="fd00:1::10", dst="fd00::2") / P.TCP(sport=40000, dport=80, flags="S"))
    frame = ip6ip6(inner)
    assert dc.outcome(frame) == (XDP_PASS, frame[:12] + b"\x86\xdd" + inner, ["decapsulated"])
    other = ip6ip6(inner, dst="fd00::999")
    assert dc.outcome(other) == (XDP_PASS, other, ["not_local"])
    # Congestion marked on the way (RFC 6040) reaches the inner packet.
    ect0 = P.build(P.IPv6(src="fd00:1::10", dst="fd00::2", tc=ECN_ECT0) / P.UDP() / b"x")
    assert dc.outcome(ip6ip6(ect0, tc=ECN_CE))[1][14:] == inner_after_ecn6(bytes([0x60, ECN_CE << 4]), ect0)
    assert P.IPv6(dc.outcome(ip6ip6(ect0, tc=ECN_CE))[1][14:]).tc & 3 == ECN_CE
    not_ect = P.build(P.IPv6(src="fd00:1::10", dst="fd00::2") / P.UDP() / b"x")
    assert dc.outcome(ip6ip6(not_ect, tc=ECN_CE))[0] == XDP_DROP
