# SPDX-License-Identifier: Apache-2.0
import ipaddress

import pytest

from xdplb import abi, hashing, model, trace
from xdplb.errors import UsageError


def test_backends_parse_with_default_and_explicit_ports():
    got = model.parse_backends("10.0.0.1, 10.0.0.2:8080", 80)
    assert got == [model.Backend(ipaddress.IPv4Address("10.0.0.1"), 80),
                   model.Backend(ipaddress.IPv4Address("10.0.0.2"), 8080)]


def test_backend_weights():
    got = model.parse_backends("10.0.0.1=3,10.0.0.2:8080=0", 80)
    assert [(b.port, b.weight) for b in got] == [(80, 3), (8080, 0)]
    with pytest.raises(UsageError, match="bad weight"):
        model.parse_backends("10.0.0.1=x", 80)


def test_backend_names_resolve():
    assert model.parse_backend("localhost", 80).addr == ipaddress.IPv4Address("127.0.0.1")


@pytest.mark.parametrize("text,message", [
    ("10.0.0.300", "bad backend '10.0.0.300'"),
    ("10.0.0.1:0", "bad backend port '0'"),
    ("10.0.0.1,", "empty backend"),
    ("10.0.0.1,10.0.0.1", "listed twice"),
])
def test_bad_backends_name_the_problem(text, message):
    with pytest.raises(UsageError, match=message):
        model.parse_backends(text, 80)


def test_port_range_and_networks():
    assert model.parse_port_range("10000-20000") == (10000, 20000)
    with pytest.raises(UsageError, match="too small"):
        model.parse_port_range("10000-10010")
    assert model.parse_networks("10.0.0.0/8,192.168.1.7/24") == [
        ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Network("192.168.1.0/24")]
    with pytest.raises(UsageError, match="bad client network"):
        model.parse_networks("10.0.0.0/33")


def murmur3_32(data: bytes, seed: int) -> int:
    """Textbook MurmurHash3 x86_32 (Appleby), written independently of xdplb.hashing."""
    c1, c2, h = 0xCC9E2D51, 0x1B873593, seed
    for i in range(0, len(data) - len(data) % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * c1) & 0xFFFFFFFF
        k = ((k << 15) | (k >> 17)) & 0xFFFFFFFF
        k = (k * c2) & 0xFFFFFFFF
        h ^= k
        h = ((h << 13) | (h >> 19)) & 0xFFFFFFFF
        h = (h * 5 + 0xE6546B64) & 0xFFFFFFFF
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_murmur_reference_matches_published_vectors():
    assert murmur3_32(b"", 0) == 0
    assert murmur3_32(b"", 1) == 0x514E28B7
    assert murmur3_32(b"\x00\x00\x00\x00", 0) == 0x2362F9DE


def test_flow_hash_is_murmur3_of_the_tuple_words():
    words = [int(ipaddress.IPv4Address("10.0.0.1")), int(ipaddress.IPv4Address("10.0.0.2")),
             (1000 << 16) | 80, 6]
    data = b"".join(w.to_bytes(4, "little") for w in words)
    assert hashing.flow_hash("10.0.0.1", 1000, "10.0.0.2", 80, 6, 77) == murmur3_32(data, 77)


def test_trace_line_decodes():
    line = ("curl-123 [001] ..s21 100.0: bpf_trace_printk: xdplb1 3 6 2 a2a000a 40346 a2a0002 80 "
            "a2a0066 80 1 0 3")
    rec = trace.decode(line)
    assert rec.saddr == "10.42.0.10" and rec.daddr == "10.42.0.2" and rec.out_daddr == "10.42.0.102"
    assert str(rec) == "10.42.0.10:40346 -> 10.42.0.2:80 tcp [S] new backend 1 -> 10.42.0.102:80 TX"


def test_trace_ignores_foreign_lines():
    assert trace.decode("sshd-1 [000] bpf_trace_printk: hello 1 2 3") is None
    assert trace.decode(f"x: {abi.TRACE_TAG} 1 2") is None
