# SPDX-License-Identifier: Apache-2.0
"""Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4) with weights.

Each backend walks its own permutation of the table and claims the first free slot on
its turn; weights set how often a backend gets a turn (weight 0: never, so it receives
no new flows). Removing one of N backends moves about 1/N of the slots.
"""
from __future__ import annotations

from .hashing import backend_permutation

EMPTY = -1


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def populate(backends: list[tuple[str, int]], size: int, seed: int) -> list[int]:
    """backends: (name, weight) pairs. Returns, per slot, the index of a backend in
    that list, or EMPTY everywhere when no backend has a weight."""
    if not is_prime(size):
        raise ValueError(f"Maglev table size {size} is not prime")
    active = [(i, w) for i, (_, w) in enumerate(backends) if w > 0]
    table = [EMPTY] * size
    if not active:
        return table
    perms = {i: backend_permutation(backends[i][0], seed, size) for i, _ in active}
    position = {i: 0 for i, _ in active}
    top = max(w for _, w in active)
    credit = {i: 0.0 for i, _ in active}
    filled = 0
    while True:
        for i, weight in active:
            credit[i] += weight / top
            if credit[i] < 1.0:
                continue
            credit[i] -= 1.0
            offset, skip = perms[i]
            j = position[i]
            slot = (offset + j * skip) % size
            while table[slot] != EMPTY:
                j += 1
                slot = (offset + j * skip) % size
            table[slot] = i
            position[i] = j + 1
            filled += 1
            if filled == size:
                return table
