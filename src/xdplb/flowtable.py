# SPDX-License-Identifier: Apache-2.0
"""The flow table (the xdplb_flows array, bpf/flows.h) as the control plane sees it: a
shared mapping of the map, read whole with numpy for counts and scans, and the two
writes the control plane makes into the data plane's table: killing the flows of one
backend, and moving next-hop generation bytes out of the way of a bump.

The data plane's writer protocol (bpf/flows.h, flow_claim): a writer moves a slot's seq
from even to odd with compare-and-swap (a full barrier on x86 and arm64), stores the
key, the whole flow and last_seen with plain stores, then adds 1 to seq (again a full
barrier). Readers copy what they need between two reads of seq. Besides, the 32-bit
word holding flow.flags, flow.hop_gen and flow.udp_timeout_s changes without the lock,
by compare-and-swap of the whole word (flow_flags_update in bpf/tcpstate.h,
check_backend_hop in bpf/xdplb.bpf.c). The scans here read without the lock: a slot
being rewritten meanwhile is counted as it was or as it becomes, which is all a count
needs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import mmap
import socket
import sys
from dataclasses import dataclass

import numpy as np

from . import abi, clock
from .errors import PrerequisiteError
from .model import PROTOCOL_NAMES

_DEAD, _REPLY, _CLOSING = int(abi.FlowFlags.DEAD), int(abi.FlowFlags.REPLY), int(abi.FlowFlags.CLOSING)
_HANDSHAKE, _RESET = int(abi.FlowFlags.HANDSHAKE), int(abi.FlowFlags.RESET)
_FIN_CLIENT, _FIN_BACKEND = int(abi.FlowFlags.FIN_CLIENT), int(abi.FlowFlags.FIN_BACKEND)

SLOT_SIZE = ctypes.sizeof(abi.FlowSlot)
_KEY = abi.FlowSlot.key.offset
_FLOW = abi.FlowSlot.flow.offset
_SEQ = abi.FlowSlot.seq.offset
_FLAGS = _FLOW + abi.Flow.flags.offset
_HOP_GEN = _FLOW + abi.Flow.hop_gen.offset
_BACKEND_ID = _FLOW + abi.Flow.backend_id.offset
# The word that flow_flags_update() swaps: flags, hop_gen, udp_timeout_s.
_FLAGS_WORD = _FLAGS
assert _FLAGS_WORD % 4 == 0 and abi.Flow.udp_timeout_s.offset == abi.Flow.flags.offset + 2
_FLAGS_SHIFT = 0 if sys.byteorder == "little" else 24  # FLOW_FLAGS_SHIFT in bpf/tcpstate.h


def _be(ctype) -> str:
    return {1: "u1", 2: ">u2", 4: ">u4"}[ctypes.sizeof(ctype)]


def _host(ctype) -> str:
    return {1: "u1", 2: "=u2", 4: "=u4"}[ctypes.sizeof(ctype)]


# The fields the scans read, at their offsets in a slot (abi.FlowSlot); network-order
# fields (__be*) read big-endian, so that they come out as numbers.
SLOT_DTYPE = np.dtype({
    "names": ["seq", "last_seen", "saddr", "daddr", "sport", "dport", "proto", "key",
              "backend_id", "flags", "hop_gen", "udp_timeout_s",
              "to_saddr", "to_daddr", "to_sport", "to_dport", "service_id", "l3_csum_delta", "l4_csum_delta"],
    "formats": ["=u4", "=u4", _be(abi.be32), _be(abi.be32), _be(abi.be16), _be(abi.be16), "u1",
                f"V{ctypes.sizeof(abi.FlowKey)}",
                _host(abi.u16), "u1", "u1", _host(abi.u16),
                _be(abi.be32), _be(abi.be32), _be(abi.be16), _be(abi.be16), _host(abi.u16), _host(abi.u16),
                _host(abi.u16)],
    "offsets": [_SEQ, abi.FlowSlot.last_seen.offset, _KEY + abi.FlowKey.saddr.offset,
                _KEY + abi.FlowKey.daddr.offset, _KEY + abi.FlowKey.sport.offset,
                _KEY + abi.FlowKey.dport.offset, _KEY + abi.FlowKey.proto.offset, _KEY,
                _BACKEND_ID, _FLAGS, _HOP_GEN, _FLOW + abi.Flow.udp_timeout_s.offset,
                _FLOW + abi.Flow.saddr.offset, _FLOW + abi.Flow.daddr.offset, _FLOW + abi.Flow.sport.offset,
                _FLOW + abi.Flow.dport.offset, _FLOW + abi.Flow.service_id.offset,
                _FLOW + abi.Flow.l3_csum_delta.offset, _FLOW + abi.Flow.l4_csum_delta.offset],
    "itemsize": SLOT_SIZE,
})


# Scans take the table in chunks small enough (1 MB) for the caches: a slot's proto and
# flags are then read from memory once, the copy of a used slot comes from the cache, and
# a scan of the default 4M-slot table (256 MB) costs one pass over memory.
CHUNK_SLOTS = 16384
# proto and flags as (32-bit word of the slot, bit shift in it): one strided read each.
_PROTO_WORD = (_KEY + abi.FlowKey.proto.offset) // 4
_FLAGS_BYTE_WORD = _FLAGS // 4
assert sys.byteorder == "little", "the chunked scan reads bytes out of little-endian words"
_PROTO_SHIFT = (_KEY + abi.FlowKey.proto.offset) % 4 * 8
_FLAGS_BYTE_SHIFT = _FLAGS % 4 * 8


def expiry_ticks(cfg: abi.Config, proto, flags, udp_timeout_s):
    """The data plane's flow_expiry_ticks() (bpf/flows.h), elementwise over arrays (or
    scalars): ticks after which an entry idle since last_seen is free; 0: never."""
    every = np.arange(256)  # a TCP entry's expiry depends on its flags only: a table of them
    tcp_by_flags = np.where(((every & _HANDSHAKE) != 0) | ((every & (_RESET | _FIN_BACKEND)) == _RESET),
                            cfg.tcp_syn_expiry_ticks,
                            np.where((every & _CLOSING) != 0, cfg.tcp_closing_expiry_ticks, cfg.tcp_expiry_ticks))
    udp = np.asarray(udp_timeout_s, dtype=np.int64)
    udp = np.where(udp != 0, udp * cfg.ticks_per_s + cfg.touch_ticks, cfg.udp_expiry_ticks)
    return np.where(np.asarray(proto) == socket.IPPROTO_TCP, tcp_by_flags[np.asarray(flags)], udp).astype(np.int64)


def _closed(flags):
    """Closed by the backend and then by the client: tuple_reusable()'s condition."""
    return ((flags & _FIN_BACKEND) != 0) & ((flags & (_FIN_CLIENT | _RESET)) != 0)


@dataclass(frozen=True, order=True)
class SnatUse:
    """SNAT sources held towards one backend endpoint from one SNAT address: by open
    flows (a handshake, an established or half-closed connection) and by closed flows
    whose backend may still hold the tuple in TIME_WAIT (taken over by a newer SYN)."""
    snat: str
    backend: str  # address:port/proto
    open: int
    time_wait: int


@dataclass(frozen=True)
class Connection:
    """A flow as `xdplb flows` shows it."""
    proto: str
    client: str  # address:port
    vip: str  # address:port
    backend: str  # address:port
    via: str  # full NAT: the SNAT source (address:port); else the mode
    state: str
    idle_s: float
    service_id: int
    backend_id: int

    @classmethod
    def of(cls, row, idle_s: float) -> "Connection":
        ip = ipaddress.IPv4Address
        if row["l3_csum_delta"]:
            via = f"{ip(int(row['to_saddr']))}:{int(row['to_sport'])}"
        else:
            via = "ipip" if row["l4_csum_delta"] else "dsr"
        return cls(PROTOCOL_NAMES[int(row["proto"])], f"{ip(int(row['saddr']))}:{int(row['sport'])}",
                   f"{ip(int(row['daddr']))}:{int(row['dport'])}",
                   f"{ip(int(row['to_daddr']))}:{int(row['to_dport'])}", via, tcp_state(int(row["flags"]))
                   if row["proto"] == socket.IPPROTO_TCP else "-", round(idle_s, 1), int(row["service_id"]),
                   int(row["backend_id"]))


def tcp_state(flags: int) -> str:
    """A TCP flow's state as the balancer knows it, in ipvsadm's words where they fit."""
    if flags & _HANDSHAKE:
        return "SYN_RECV"
    if flags & _RESET:
        return "CLOSE"
    fins = flags & (_FIN_CLIENT | _FIN_BACKEND)
    if fins == _FIN_CLIENT | _FIN_BACKEND:
        return "TIME_WAIT"
    return "FIN_WAIT" if fins or flags & _CLOSING else "ESTABLISHED"


@dataclass(frozen=True)
class SlotRef:
    """A slot as a scan saw it: what a later write checks it still holds."""
    index: int
    seq: int
    key: bytes
    backend_id: int


class _Atomics:
    """The compare-and-swap and fetch-and-op the data plane uses on the table, from
    libatomic (the same lock-free instructions for 32-bit words on x86 and arm64)."""

    SEQ_CST = 5  # __ATOMIC_SEQ_CST

    def __init__(self):
        name = ctypes.util.find_library("atomic") or "libatomic.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            raise PrerequisiteError("libatomic is missing (resetting flows needs it): install it with "
                                    "apt-get install libatomic1") from None
        # getattr: a name starting with two underscores would be mangled in a class body.
        self.cas = getattr(lib, "__atomic_compare_exchange_4")
        self.cas.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32,
                             ctypes.c_int, ctypes.c_int]
        self.cas.restype = ctypes.c_bool
        self.fetch_or = getattr(lib, "__atomic_fetch_or_4")
        self.fetch_add = getattr(lib, "__atomic_fetch_add_4")
        for f in (self.fetch_or, self.fetch_add):
            f.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
            f.restype = ctypes.c_uint32

    def compare_and_swap(self, address: int, old: int, new: int) -> bool:
        return self.cas(address, ctypes.byref(ctypes.c_uint32(old)), new, self.SEQ_CST, self.SEQ_CST)


class FlowTable:
    """The xdplb_flows map of one data plane, mapped into this process. fd stays the
    caller's (the mapping holds its own reference to the map)."""

    def __init__(self, fd: int, slot_count: int):
        self.slot_count = slot_count
        self._map = mmap.mmap(fd, slot_count * SLOT_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._rows = np.frombuffer(self._map, dtype=SLOT_DTYPE)
        self._slots = np.frombuffer(self._map, dtype=f"V{SLOT_SIZE}")  # whole slots, for copying
        self._words = np.frombuffer(self._map, dtype=np.uint32).reshape(slot_count, SLOT_SIZE // 4)
        self._anchor = ctypes.c_char.from_buffer(self._map)  # for the slots' addresses
        self._address = ctypes.addressof(self._anchor)
        self._atomics: _Atomics | None = None  # loaded by the first kill

    def close(self) -> None:
        if self._map is None:
            return
        self._rows = self._slots = self._words = self._anchor = None  # they export the mapping, which cannot close under them
        self._map.close()
        self._map = None

    def __enter__(self) -> "FlowTable":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading --------------------------------------------------------------------
    def _used_in(self, start: int) -> np.ndarray:
        """Indexes (from start) of the slots of one chunk holding an entry that is not dead."""
        words = self._words[start:start + CHUNK_SLOTS]
        proto = (words[:, _PROTO_WORD] >> _PROTO_SHIFT) & 0xFF
        dead = (words[:, _FLAGS_BYTE_WORD] >> _FLAGS_BYTE_SHIFT) & _DEAD
        return np.flatnonzero((proto != 0) & (dead == 0))

    def _used(self):
        """Indexes of the slots holding an entry that is not dead."""
        parts = [used + start for start in range(0, self.slot_count, CHUNK_SLOTS)
                 if (used := self._used_in(start)).size]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _live(self, cfg: abi.Config, now: int | None):
        """Per chunk with entries: a copy of its used slots, one row each, and which of
        them are not idle past their timeout as the data plane judges it (slot_expired
        in bpf/flows.h)."""
        if now is None:
            now = clock.now_ticks(cfg.tick_shift)
        for start in range(0, self.slot_count, CHUNK_SLOTS):
            used = self._used_in(start)
            if not used.size:
                continue
            # Whole slots copied (from the cache, the chunk was just read), fields taken
            # from the copy: much faster than picking fields out of the shared mapping.
            rows = np.take(self._slots[start:start + CHUNK_SLOTS], used).view(SLOT_DTYPE)
            ticks = expiry_ticks(cfg, rows["proto"], rows["flags"], rows["udp_timeout_s"])
            idle = (np.uint32(now & 0xFFFFFFFF) - rows["last_seen"]).view(np.int32)  # ticks_since()
            yield rows, (ticks == 0) | (idle <= ticks)

    def count(self) -> int:
        """Entries in the table (two per flow), expired ones included."""
        return sum(self._used_in(start).size for start in range(0, self.slot_count, CHUNK_SLOTS))

    def slots(self):
        """(index, last_seen, proto, backend_id, flags) of every entry, expired ones
        included (for tests and debugging)."""
        used = self._used()
        rows = self._rows[used]
        return list(zip(used.tolist(), rows["last_seen"].tolist(), rows["proto"].tolist(),
                        rows["backend_id"].tolist(), rows["flags"].tolist()))

    def slot(self, index: int) -> abi.FlowSlot:
        """A copy of one slot as it is now, read without the lock (for tests and
        debugging)."""
        return abi.FlowSlot.from_buffer_copy(self._map, index * SLOT_SIZE)

    def active_flows(self, cfg: abi.Config, now: int | None = None) -> dict[int, int]:
        """Per backend id: client-side flows neither closing nor idle past their timeout
        (the data plane's own notion of a live flow). cfg: the config map's value; now:
        the data plane's tick (read from the kernel when None)."""
        return self.census(cfg, now)[0]

    def census(self, cfg: abi.Config, now: int | None = None) -> tuple[dict[int, int], int]:
        """active_flows() and count() from one pass over the table."""
        counts = np.zeros(1 << 16, dtype=np.int64)  # backend ids are 16 bits
        entries = 0
        for rows, live in self._live(cfg, now):
            entries += len(rows)
            counts += np.bincount(rows["backend_id"][live & ((rows["flags"] & (_REPLY | _CLOSING)) == 0)],
                                  minlength=1 << 16)
        found = np.flatnonzero(counts)
        return dict(zip(found.tolist(), counts[found].tolist())), entries

    def connections(self, cfg: abi.Config, now: int | None = None, service_ids=None, backend_ids=None,
                    limit: int = 0) -> tuple[list[Connection], int]:
        """The live connections, one per flow (its client-side entry), at most `limit`
        of them (0: all), optionally only those of some services or backends; and how
        many matched in all. Most recently seen first."""
        if now is None:
            now = clock.now_ticks(cfg.tick_shift)
        parts = []
        for rows, live in self._live(cfg, now):
            keep = live & ((rows["flags"] & _REPLY) == 0)
            if service_ids is not None:
                keep &= np.isin(rows["service_id"], list(service_ids))
            if backend_ids is not None:
                keep &= np.isin(rows["backend_id"], list(backend_ids))
            if keep.any():
                parts.append(rows[keep])
        if not parts:
            return [], 0
        rows = np.concatenate(parts)
        idle = (np.uint32(now & 0xFFFFFFFF) - rows["last_seen"]).view(np.int32).clip(min=0)
        order = np.argsort(idle, kind="stable")
        if limit:
            order = order[:limit]
        per_s = max(cfg.ticks_per_s, 1)
        return [Connection.of(r, float(i) / per_s) for r, i in zip(rows[order], idle[order].tolist())], len(rows)

    def _backend_sides(self, cfg: abi.Config, now: int | None, *fields: str) -> list:
        """The given fields of the backend-side entries not expired."""
        parts = [[] for _ in fields]
        for rows, live in self._live(cfg, now):
            keep = live & ((rows["flags"] & _REPLY) != 0)
            for part, f in zip(parts, fields):
                part.append(rows[f][keep])
        return [np.concatenate(part) if part else np.zeros(0, dtype=SLOT_DTYPE.fields[f][0])
                for part, f in zip(parts, fields)]

    def snat_usage(self, cfg: abi.Config, now: int | None = None) -> list[SnatUse]:
        """SNAT sources held per (SNAT address, backend endpoint), from the backend-side
        entries that have not expired. A backend-side key is (backend address, SNAT
        address, backend port, SNAT port)."""
        daddr, saddr, sport, proto, flags = self._backend_sides(cfg, now, "daddr", "saddr", "sport", "proto",
                                                                 "flags")
        # Grouped by one integer per entry: the (SNAT address, backend address) pair's
        # rank, then backend port, protocol and closed or not.
        pairs, pair = np.unique(daddr.astype(np.uint64) << 32 | saddr, return_inverse=True)
        groups = (pair.astype(np.uint64) << 25 | sport.astype(np.uint64) << 9 | proto.astype(np.uint64) << 1
                  | _closed(flags))
        found, counts = np.unique(groups, return_counts=True)
        held: dict[tuple, list[int]] = {}
        for group, n in zip(found.tolist(), counts.tolist()):
            snat_addr = int(pairs[group >> 25])
            where = (snat_addr >> 32, snat_addr & 0xFFFFFFFF, group >> 9 & 0xFFFF, group >> 1 & 0xFF)
            held.setdefault(where, [0, 0])[group & 1] += n
        return sorted(SnatUse(str(ipaddress.IPv4Address(snat)),
                              f"{ipaddress.IPv4Address(addr)}:{port}/{PROTOCOL_NAMES[proto]}", n[0], n[1])
                      for (snat, addr, port, proto), n in held.items())

    def held_snat_ports(self, cfg: abi.Config, now: int | None = None) -> frozenset[int]:
        """SNAT ports that backend-side entries not yet expired still use: replies may
        arrive on them whatever the configured range now is."""
        [dport] = self._backend_sides(cfg, now, "dport")
        return frozenset(np.flatnonzero(np.bincount(dport, minlength=abi.PORTS)).tolist())

    # ---- resetting the flows of a backend ----------------------------------------------
    def backend_slots(self, backend_id: int) -> list[SlotRef]:
        """The entries (both directions, expired or not) of a backend's flows, as they
        are now: the first step of reset_flows."""
        used = self._used()
        candidates = used[self._rows["backend_id"][used] == backend_id]
        found = self._rows[candidates]
        return [SlotRef(index, seq, bytes(key), backend_id)
                for index, seq, key in zip(candidates.tolist(), found["seq"].tolist(), found["key"].tolist())
                if not seq & 1]

    def kill(self, refs: list[SlotRef]) -> int:
        """Marks dead each slot that still holds what the scan saw; returns how many
        client-side entries (flows) it killed.

        Each kill is a writer of the data plane's protocol: seq goes from the value
        the scan saw to odd by compare-and-swap, which fails if any writer took the
        slot since (every claim moves seq on; an odd seq is a writer at work). Holding
        it, key and backend are compared again (the scan read them without the lock),
        DEAD is set by an atomic or into the flags word, and seq is made even again.
        The data plane cannot claim the slot meanwhile, so the mark cannot land on a
        newcomer; while it is held, readers skip the slot as they do any slot being
        written, so the flow is gone a moment early (it is being killed), and a new
        flow that chose this slot finds it busy and looks elsewhere or is dropped as
        table_full (microseconds). A process killed while it holds a slot leaves that
        one slot odd: never read nor reused again.

        Why not a plain store of the flags byte, re-checked before and after: a store
        racing a claim lands before the claim's store of the whole flow (which then
        replaces it: harmless) or after it, marking the newcomer dead. x86 (TSO) keeps
        our stores in order with our earlier loads but lets a later load pass a store
        still in the store buffer, and arm64 orders neither without barriers, so a
        re-read of seq after the store cannot tell which came first; Python has no
        fence to put between them. A read-modify-write of the byte can also undo bits
        that flow_flags_update() swapped in between (a FIN seen, say): harmless for a
        dead slot, which nothing reads as a flow again, and that swap never loses
        DEAD (its compare fails on the changed word and it starts again from it, or
        gives up, leaving DEAD). The atomic or here loses neither."""
        if not refs:
            return 0
        if self._atomics is None:
            self._atomics = _Atomics()
        atomics = self._atomics
        table = self._map
        killed = 0
        for ref in refs:
            base = ref.index * SLOT_SIZE
            address = self._address + base
            held = False
            try:
                held = not ref.seq & 1 and atomics.compare_and_swap(address + _SEQ, ref.seq, ref.seq + 1)
                if not held:
                    continue
                flags = table[base + _FLAGS]
                if (table[base + _KEY:base + _KEY + ctypes.sizeof(abi.FlowKey)] != ref.key
                        or int.from_bytes(table[base + _BACKEND_ID:base + _BACKEND_ID + 2], sys.byteorder)
                        != ref.backend_id or flags & _DEAD):
                    continue
                atomics.fetch_or(address + _FLAGS_WORD, _DEAD << _FLAGS_SHIFT, atomics.SEQ_CST)
                killed += not flags & _REPLY
            finally:
                if held:
                    atomics.fetch_add(address + _SEQ, 1, atomics.SEQ_CST)
        return killed

    def reset_flows(self, backend_id: int) -> int:
        """Forgets every flow (both directions) of a backend; returns how many. Their
        next packets find no flow: a client's TCP segment is then answered with a reset
        by the kernel, so clients of a dead backend learn at once instead of timing out.
        A slot taken by another flow between the scan and the kill is left alone."""
        return self.kill(self.backend_slots(backend_id))

    # ---- next-hop generations ---------------------------------------------------------
    def before_hop_bump(self, next_gen: int) -> int:
        """Call before writing next_gen into xdplb_config.hop_gen (after the backend
        entries it announces). A client-side entry keeps one byte of the generation its
        next hop was last known right in (follow_backend_hop in bpf/xdplb.bpf.c), so an
        entry 256 generations old looks current again and would keep a stale next hop:
        every client-side entry whose byte is next_gen's is moved half a cycle away,
        which makes it look its backend up at its next packet. Returns how many.

        Before the bump, not after: no window in which the wrapped bytes look current,
        and a bump that never happens (the process dies first) leaves only entries that
        look stale, which costs each a lookup. Nothing else gives an entry next_gen's
        byte before the bump: the data plane writes only the generation it reads (new
        flows, and entries it finds right), which is still next_gen - 1.

        A plain one-byte store, without the slot's lock: whatever it races with, it can
        only make an entry look stale, never current. Against a claim it lands before
        the new flow's store (replaced) or after it (the new flow looks its backend up
        once more and takes the generation back); against the data plane's swap of the
        flags word (check_backend_hop, flow_flags_update) it lands before the swap (whose
        compare then fails: it is tried again later, or at the next packet) or after it
        (the byte alone is replaced: stores to distinct bytes never tear one another on
        x86 or arm64, and the swap is atomic on the whole word). On a backend-side entry
        it is ignored (only client sides follow next hops)."""
        target, stale = next_gen & 0xFF, (next_gen + 128) & 0xFF
        rows = self._rows
        moved = np.flatnonzero((rows["hop_gen"] == target) & (rows["proto"] != 0)
                               & ((rows["flags"] & (_DEAD | _REPLY)) == 0))
        table = self._map
        for index in moved.tolist():
            table[index * SLOT_SIZE + _HOP_GEN] = stale
        return len(moved)
