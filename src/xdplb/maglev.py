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
    offsets, skips, weights, owners = [], [], [], []
    for i, w in active:
        offset, skip = backend_permutation(backends[i][0], seed, size)
        offsets.append(offset)
        skips.append(skip)
        weights.append(w / max(w for _, w in active))
        owners.append(i)
    # The hot loop of the control plane: plain lists and locals only.
    position = [0] * len(owners)
    credit = [0.0] * len(owners)
    uniform = all(w == 1.0 for w in weights)
    filled = 0
    while True:
        for k in range(len(owners)):
            if not uniform:
                credit[k] += weights[k]
                if credit[k] < 1.0:
                    continue
                credit[k] -= 1.0
            offset, skip, j = offsets[k], skips[k], position[k]
            slot = (offset + j * skip) % size
            while table[slot] != EMPTY:
                j += 1
                slot = (offset + j * skip) % size
            table[slot] = owners[k]
            position[k] = j + 1
            filled += 1
            if filled == size:
                return table
