# SPDX-License-Identifier: Apache-2.0
"""Python twin of bpf/hash.h (the flow and service hashes), and the seeds of the Maglev
permutations.

The flow hash must give the same value as the data plane's, bit for bit: the packet
tests compare the backend the program picks with the one predicted here.
"""
from __future__ import annotations

import hashlib
import ipaddress

M64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """SplitMix64's finalizer."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def tuple_hash(addrs: int, rest: int, seed: int) -> int:
    return mix64(addrs ^ (((rest + seed) * 0x9E3779B97F4A7C15) & M64)) >> 32


def flow_hash(saddr: str, sport: int, daddr: str, dport: int, proto: int, seed: int) -> int:
    addrs = int(ipaddress.IPv4Address(saddr)) << 32 | int(ipaddress.IPv4Address(daddr))
    return tuple_hash(addrs, sport << 32 | dport << 16 | proto, seed)


def addr6_fold(addr: str) -> int:
    value = int(ipaddress.IPv6Address(addr))
    return (mix64(value >> 64) + (value & M64)) & M64


def flow_hash6(saddr: str, sport: int, daddr: str, dport: int, proto: int, seed: int) -> int:
    """The IPv6 flow hash (bpf/hash.h flow_hash6): every bit of both addresses."""
    return tuple_hash(mix64(addr6_fold(saddr)) ^ addr6_fold(daddr), sport << 32 | dport << 16 | proto, seed)


def service_hash(vip: str, port: int, proto: int) -> int:
    """Home slot (before masking) of a service in the service table."""
    return tuple_hash(int(ipaddress.IPv4Address(vip)), port << 8 | proto, 0)


def backend_permutation(name: str, seed: int, size: int) -> tuple[int, int]:
    """Maglev's (offset, skip) for a backend: derived from its name and the configured
    seed only, so every node computes the same table."""
    digest = hashlib.blake2b(name.encode(), digest_size=16, key=seed.to_bytes(8, "little")).digest()
    h1, h2 = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
    return h1 % size, h2 % (size - 1) + 1
