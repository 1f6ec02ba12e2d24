# SPDX-License-Identifier: Apache-2.0
"""Python twin of bpf/hash.h (the flow hash), and the seeds of the Maglev permutations.

The flow hash must give the same value as the data plane's, bit for bit: the packet
tests compare the backend the program picks with the one predicted here.
"""
from __future__ import annotations

import hashlib
import ipaddress

MASK = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & MASK


def _mix(h: int, k: int) -> int:
    k = (k * 0xCC9E2D51) & MASK
    k = _rotl(k, 15)
    k = (k * 0x1B873593) & MASK
    h ^= k
    h = _rotl(h, 13)
    return (h * 5 + 0xE6546B64) & MASK


def _finish(h: int, length: int) -> int:
    h ^= length
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK
    return h ^ (h >> 16)


def flow_hash(saddr: str, sport: int, daddr: str, dport: int, proto: int, seed: int) -> int:
    h = seed & MASK
    h = _mix(h, int(ipaddress.IPv4Address(saddr)))
    h = _mix(h, int(ipaddress.IPv4Address(daddr)))
    h = _mix(h, (sport << 16) | dport)
    h = _mix(h, proto)
    return _finish(h, 16)


def backend_permutation(name: str, seed: int, size: int) -> tuple[int, int]:
    """Maglev's (offset, skip) for a backend: derived from its name and the configured
    seed only, so every node computes the same table."""
    digest = hashlib.blake2b(name.encode(), digest_size=16, key=seed.to_bytes(8, "little")).digest()
    h1, h2 = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
    return h1 % size, h2 % (size - 1) + 1
