# SPDX-License-Identifier: Apache-2.0
"""Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4) with weights.

Each backend walks its own permutation of the table and claims the first free slot on
its turn; weights set how often a backend gets a turn (weight 0: never, so it receives
no new flows). Removing one of N backends moves about 1/N of the slots.
"""
from __future__ import annotations

import ctypes

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


def _turns(backends: list[tuple[str, int]], size: int, seed: int):
    """Per backend with a weight: its index in `backends`, Maglev offset and skip, and
    weight over the largest; and whether all weights are equal."""
    active = [(i, w) for i, (_, w) in enumerate(backends) if w > 0]
    top = max((w for _, w in active), default=1)
    owners, offsets, skips, weights = [], [], [], []
    for i, w in active:
        offset, skip = backend_permutation(backends[i][0], seed, size)
        owners.append(i)
        offsets.append(offset)
        skips.append(skip)
        weights.append(w / top)
    return owners, offsets, skips, weights, all(w == 1.0 for w in weights)


def populate_reference(backends: list[tuple[str, int]], size: int, seed: int) -> list[int]:
    """backends: (name, weight) pairs. Returns, per slot, the index of a backend in
    that list, or EMPTY everywhere when no backend has a weight. The specification of
    the native fill (native/maglev.c), which the tests hold it to."""
    if not is_prime(size):
        raise ValueError(f"Maglev table size {size} is not prime")
    table = [EMPTY] * size
    owners, offsets, skips, weights, uniform = _turns(backends, size, seed)
    if not owners:
        return table
    # The hot loop of the control plane: plain lists and locals only.
    position = [0] * len(owners)
    credit = [0.0] * len(owners)
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


def _fill_native(lib, backends: list[tuple[str, int]], size: int, seed: int):
    """The table as a C int array of turn indexes (see native/maglev.c), and the owners
    they stand for; None when no backend has a weight."""
    if not is_prime(size):
        raise ValueError(f"Maglev table size {size} is not prime")
    owners, offsets, skips, weights, uniform = _turns(backends, size, seed)
    if not owners:
        return None, owners
    n = len(owners)
    table = _empty_table(size)
    rc = lib.xdplb_maglev_fill(n, (ctypes.c_longlong * n)(*offsets), (ctypes.c_longlong * n)(*skips),
                               (ctypes.c_double * n)(*weights), int(uniform), size, table,
                               (ctypes.c_longlong * n)(), (ctypes.c_double * n)())
    if rc:
        raise RuntimeError(f"Maglev fill of {size} slots failed")
    return table, owners


def _empty_table(size: int):
    table = (ctypes.c_int * size)()
    ctypes.memset(table, 0xFF, ctypes.sizeof(table))  # -1 (EMPTY) in every slot
    return table


def populate(backends: list[tuple[str, int]], size: int, seed: int) -> list[int]:
    """populate_reference's result, computed by the native fill when it is built."""
    lib = native()
    if lib is None:
        return populate_reference(backends, size, seed)
    table, owners = _fill_native(lib, backends, size, seed)
    if table is None:
        return [EMPTY] * size
    return [owners[k] for k in table]


def ring_slots(backends: list[tuple[str, int]], ids: list[int], size: int, seed: int, no_backend: int,
               out) -> None:
    """Writes a ring's slots into out (a buffer of 16-bit slots, at least size rounded up
    to four): ids[i] where backend i owns the slot, no_backend where nobody does and in
    the padding. What packing populate()'s table gives, without a Python loop per slot."""
    lib = native()
    if lib is None:
        padded = [no_backend if t == EMPTY else ids[t] for t in populate_reference(backends, size, seed)]
        padded += [no_backend] * (-size % 4)
        slots = (ctypes.c_uint16 * len(padded))(*padded)
        ctypes.memmove(out, slots, ctypes.sizeof(slots))
        return
    table, owners = _fill_native(lib, backends, size, seed)
    if table is None:
        table = _empty_table(size)
    by_turn = (ctypes.c_uint16 * max(len(owners), 1))(*[ids[i] for i in owners])
    lib.xdplb_maglev_ring_ids(size, table, by_turn, no_backend, out)


_UNLOADED = object()
_native = _UNLOADED


def native():
    """The native fill (built by `xdplb build` next to the BPF objects), or None when it
    is not built. Loaded once."""
    global _native
    if _native is _UNLOADED:
        from .build import NATIVE_MAGLEV
        try:
            lib = ctypes.CDLL(str(NATIVE_MAGLEV))
        except OSError:
            _native = None
            return None
        lib.xdplb_maglev_fill.restype = ctypes.c_int
        lib.xdplb_maglev_fill.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_void_p]
        lib.xdplb_maglev_ring_ids.restype = None
        lib.xdplb_maglev_ring_ids.argtypes = [ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_ushort, ctypes.c_void_p]
        _native = lib
    return _native
