# SPDX-License-Identifier: Apache-2.0
"""Reading and writing one interface's data plane maps.

The maps are the single source of truth for what is configured: services, backends
(with weights) and allow-lists are read back from them, so status works from any shell
and a re-run of attach changes only what differs.
"""
from __future__ import annotations

import ctypes
import functools
import ipaddress
import math
import mmap
import os
import secrets
import socket
import struct
from dataclasses import dataclass

from . import abi, clock, hashing, maglev, snatmemo, trace
from .errors import UsageError, XdplbError
from .libbpf import BPF_ANY, Libbpf, MapInfo, libbpf
from .model import PROTOCOL_NAMES, PROTOCOLS, Backend, Service, Settings
from .netlink import NextHop



def be32(addr: ipaddress.IPv4Address) -> int:
    """An address as the raw integer its network-order bytes make on this host."""
    return int.from_bytes(addr.packed, "little" if _LITTLE else "big")


def from_be32(raw: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(raw.to_bytes(4, "little" if _LITTLE else "big"))


_LITTLE = socket.htons(1) != 1


def mac_bytes(mac: str):
    return (ctypes.c_uint8 * 6)(*bytes.fromhex(mac.replace(":", "")))


def _mac(raw) -> str:
    return ":".join(f"{x:02x}" for x in raw)


_IN_USE = int(abi.BackendFlags.IN_USE)
_DEAD, _REPLY, _CLOSING = int(abi.FlowFlags.DEAD), int(abi.FlowFlags.REPLY), int(abi.FlowFlags.CLOSING)
_HANDSHAKE, _RESET = int(abi.FlowFlags.HANDSHAKE), int(abi.FlowFlags.RESET)
_FIN_CLIENT, _FIN_BACKEND = int(abi.FlowFlags.FIN_CLIENT), int(abi.FlowFlags.FIN_BACKEND)


def _closed(flags: int) -> bool:
    """Closed by the backend and then by the client: tuple_reusable()'s condition."""
    return bool(flags & _FIN_BACKEND and flags & (_FIN_CLIENT | _RESET))
_FLAGS_OFFSET = abi.FlowSlot.flow.offset + abi.Flow.flags.offset
# last_seen, key.proto, flow.service_id, flow.backend_id, flow.flags, flow.udp_timeout_s out
# of each 64-byte slot
assert abi.Flow.backend_id.offset == abi.Flow.service_id.offset + 2
assert abi.Flow.udp_timeout_s.offset == abi.Flow.flags.offset + 2 == ctypes.sizeof(abi.Flow) - 2
_SLOT_FIELDS = struct.Struct(
    f"<{abi.FlowSlot.last_seen.offset}xI"
    f"{abi.FlowSlot.key.offset + abi.FlowKey.proto.offset - abi.FlowSlot.last_seen.offset - 4}xB"
    f"{abi.FlowSlot.flow.offset + abi.Flow.service_id.offset - abi.FlowSlot.key.offset - abi.FlowKey.proto.offset - 1}xHH"
    f"BxH")
assert _SLOT_FIELDS.size == ctypes.sizeof(abi.FlowSlot)
# last_seen, the key's saddr, daddr, sport, proto, flow.flags and flow.udp_timeout_s: a
# backend-side entry's key is (backend, SNAT address, backend port, SNAT port).
_SLOT_KEYS = struct.Struct(
    f"<{abi.FlowSlot.last_seen.offset}xI{abi.FlowSlot.key.offset - abi.FlowSlot.last_seen.offset - 4}x"
    f"IIH{abi.FlowKey.proto.offset - abi.FlowKey.dport.offset}xB"
    f"{_FLAGS_OFFSET - abi.FlowSlot.key.offset - abi.FlowKey.proto.offset - 1}xBxH")
assert _SLOT_KEYS.size == ctypes.sizeof(abi.FlowSlot)


def _expiry_ticks(cfg: abi.Config, proto: int, flags: int, udp_timeout_s: int = 0) -> int:
    """The data plane's flow_expiry_ticks() (bpf/flows.h)."""
    if proto != socket.IPPROTO_TCP:
        return udp_timeout_s * cfg.ticks_per_s + cfg.touch_ticks if udp_timeout_s else cfg.udp_expiry_ticks
    if flags & _HANDSHAKE or flags & (_RESET | _FIN_BACKEND) == _RESET:
        return cfg.tcp_syn_expiry_ticks
    return cfg.tcp_closing_expiry_ticks if flags & _CLOSING else cfg.tcp_expiry_ticks


@dataclass(frozen=True, order=True)
class SnatUse:
    """SNAT sources held towards one backend endpoint from one SNAT address: by open
    flows (a handshake, an established or half-closed connection) and by closed flows
    whose backend may still hold the tuple in TIME_WAIT (taken over by a newer SYN)."""
    snat: str
    backend: str  # address:port/proto
    open: int
    time_wait: int


def flow_slots(flows: int) -> int:
    """Flow table slots for `flows` connections: two entries each, at most half the
    table, rounded up to a power of two (the data plane masks the hash)."""
    return 1 << max(4 * flows - 1, 1).bit_length()


@functools.lru_cache(maxsize=8)
def _indexes(n: int):
    """0..n-1 as a C array: the keys of a batch update of a whole array map."""
    return (ctypes.c_uint32 * n)(*range(n))


def service_table(entries: list[tuple[abi.ServiceKey, abi.Service]]) -> ctypes.Array:
    """The service table's slots: linear probing from service_hash, as the data plane
    searches it (bpf/xdplb.bpf.c, find_service)."""
    slots = (abi.ServiceSlot * abi.SERVICE_SLOTS)()
    for key, value in entries:
        home = hashing.service_hash(str(from_be32(key.vip)), socket.ntohs(key.port), key.proto)
        for probe in range(abi.SERVICE_PROBES):
            slot = slots[(home + probe) % abi.SERVICE_SLOTS]
            if not slot.key.proto:
                slot.key, slot.svc = key, value
                break
        else:
            raise XdplbError(f"service {from_be32(key.vip)}:{socket.ntohs(key.port)} collides with "
                             f"{abi.SERVICE_PROBES} others in the service table; report this as a bug")
    return slots


def pack_ring(slots: list[int]) -> ctypes.Array:
    """Ring slots (backend ids) as the ring map's values: four 16-bit ids per 64-bit
    value, slot 0 in the lowest bits (bpf/maps.h, xdplb_ring)."""
    per = abi.RING_SLOTS_PER_ENTRY
    padded = slots + [abi.NO_BACKEND] * (-len(slots) % per)
    return (ctypes.c_uint64 * (len(padded) // per))(
        *[sum(padded[i + j] << (16 * j) for j in range(per)) for i in range(0, len(padded), per)])


def unpack_ring(values, size: int) -> list[int]:
    per = abi.RING_SLOTS_PER_ENTRY
    return [(values[slot // per] >> (16 * (slot % per))) & 0xFFFF for slot in range(size)]


def _memo_key(s: Settings, addr, port: int, proto: str) -> str:
    return snatmemo.key(s.snat_port_min, s.snat_port_max, addr, port, proto)


def _protocols(entries: dict[tuple, abi.Service]) -> dict[int, str]:
    """Service id -> protocol name, from _service_entries()."""
    return {v.id: proto for (_, _, proto), v in entries.items()}


def _ring_inputs(svc: Service) -> tuple:
    return svc.ring_size, sorted((b.endpoint, b.weight) for b in svc.backends)


@dataclass
class Traffic:
    packets: int = 0
    bytes: int = 0
    new_flows: int = 0


class _Cursors:
    """SNAT cursor ids during one apply: one per tuple space (backend address, port and
    protocol), shared by every backend entry with that endpoint, so that a backend in
    two services gets its sources from one sequence. Ids in use before the apply are
    not handed out again within it."""

    def __init__(self, staying: list[abi.Backend], protos: dict[int, str], taken: set[int]):
        self.ids = {(b.addr, b.port, protos[b.service_id]): b.cursor_id for b in staying}
        self.taken = set(taken)

    def get(self, addr: int, port: int, proto: str) -> tuple[int, bool]:
        """The cursor id for an endpoint, and whether it is new (to be started)."""
        key = (addr, port, proto)
        if key in self.ids:
            return self.ids[key], False
        try:
            free = next(i for i in range(abi.MAX_BACKENDS) if i not in self.taken)
        except StopIteration:
            raise UsageError(f"more than {abi.MAX_BACKENDS} backend endpoints on this interface") from None
        self.taken.add(free)
        self.ids[key] = free
        return free, True


class DataPlane:
    """The maps of one attached (or about to be attached) program, by name."""

    def __init__(self, fds: dict[str, int], lib: Libbpf | None = None,
                 memo: snatmemo.Memo | None = None):
        missing = set(abi.MAPS) - set(fds)
        if missing:
            raise XdplbError(f"the attached program lacks maps {sorted(missing)}: it was built "
                             "from another version; detach it and attach again")
        self.fds = fds
        self.lib = lib or libbpf()
        self.memo = memo or snatmemo.Memo()
        self.ncpus = self.lib.libbpf_num_possible_cpus()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    # ---- settings ----------------------------------------------------------------
    def _config(self) -> abi.Config:
        cfg = abi.Config()
        self.lib.lookup(self.fds["xdplb_config"], ctypes.c_uint32(0), cfg)
        return cfg

    def write_settings(self, s: Settings) -> None:
        """Writes the settings. s.trace is ignored: a live trace lease is kept (only the
        trace command starts and ends one), an expired one is cleared."""
        jiffy = clock.jiffy_ns()
        shift = clock.tick_shift(jiffy)
        touch = clock.to_ticks(clock.TOUCH_S, jiffy, shift)
        current = self._config()
        tracing = self._tracing(current)

        def expiry(seconds: int) -> int:
            # Plus the slack of entries re-stamped only every TOUCH_S; 0 stays "never".
            return clock.to_ticks(seconds, jiffy, shift) + touch if seconds else 0

        cfg = abi.Config(
            abi_version=abi.ABI_VERSION, flags=abi.ConfigFlags.TRACE if tracing else 0,
            trace_until=current.trace_until if tracing else 0,
            hash_seed=s.hash_seed, snat_addr_count=len(s.snat_addrs),
            snat_addrs=(abi.be32 * abi.MAX_SNAT_ADDRS)(*map(be32, s.snat_addrs)), snat_port_min=s.snat_port_min,
            snat_port_max=s.snat_port_max, flow_mask=self.flow_slot_count() - 1,
            tcp_timeout_s=s.tcp_timeout_s, tcp_closing_timeout_s=s.tcp_closing_timeout_s,
            udp_timeout_s=s.udp_timeout_s, tcp_syn_timeout_s=s.tcp_syn_timeout_s,
            tcp_expiry_ticks=expiry(s.tcp_timeout_s), tcp_closing_expiry_ticks=expiry(s.tcp_closing_timeout_s),
            udp_expiry_ticks=expiry(s.udp_timeout_s), tcp_syn_expiry_ticks=expiry(s.tcp_syn_timeout_s),
            tick_shift=shift, ticks_per_s=clock.to_ticks(1, jiffy, shift), touch_ticks=touch,
            hop_gen=current.hop_gen)  # not a setting: flows compare against it
        self.lib.update(self.fds["xdplb_config"], ctypes.c_uint32(0), cfg)

    def read_settings(self) -> Settings:
        cfg = self._config()
        return Settings(
            snat_addrs=[from_be32(a) for a in cfg.snat_addrs[:cfg.snat_addr_count]], snat_port_min=cfg.snat_port_min,
            snat_port_max=cfg.snat_port_max, hash_seed=cfg.hash_seed,
            tcp_timeout_s=cfg.tcp_timeout_s, tcp_closing_timeout_s=cfg.tcp_closing_timeout_s,
            udp_timeout_s=cfg.udp_timeout_s, tcp_syn_timeout_s=cfg.tcp_syn_timeout_s,
            trace=self._tracing(cfg))

    def read_abi_version(self) -> int:
        return self._config().abi_version

    # ---- tracing: a lease the trace command renews while it reads ----------------
    @staticmethod
    def _tracing(cfg: abi.Config) -> bool:
        """Whether the data plane traces now: the flag, and a deadline no further ahead
        than the data plane accepts (trace_line() in bpf/xdplb.bpf.c)."""
        if not cfg.flags & abi.ConfigFlags.TRACE:
            return False
        left = (cfg.trace_until - clock.now_ticks(cfg.tick_shift)) & 0xFFFFFFFF
        return 0 < left <= abi.TRACE_LEASE_MAX_TICKS

    def renew_trace(self, seconds: float = trace.LEASE_S) -> None:
        """Traces from now until `seconds` from now. The trace command renews this every
        trace.RENEW_S while it reads, so a reader that dies (SIGKILL, a closed terminal)
        leaves tracing on for at most `seconds`, with no cleanup. Only the flag and the
        deadline change (read, changed, written back at once: the config map is one
        value)."""
        cfg = self._config()
        until = clock.now_ticks(cfg.tick_shift) + min(math.ceil(seconds * cfg.ticks_per_s),
                                                       abi.TRACE_LEASE_MAX_TICKS)
        cfg.flags |= abi.ConfigFlags.TRACE
        cfg.trace_until = until & 0xFFFFFFFF
        self.lib.update(self.fds["xdplb_config"], ctypes.c_uint32(0), cfg)

    def end_trace(self) -> None:
        cfg = self._config()
        cfg.flags &= ~int(abi.ConfigFlags.TRACE) & 0xFFFFFFFF
        cfg.trace_until = 0
        self.lib.update(self.fds["xdplb_config"], ctypes.c_uint32(0), cfg)

    def set_trace(self, on: bool) -> None:
        """Starts a trace lease (see renew_trace) or ends it."""
        self.renew_trace() if on else self.end_trace()

    # ---- reading the configured services -----------------------------------------
    def _service_entries(self) -> dict[tuple, abi.Service]:
        table_id = ctypes.c_uint32()
        if not self.lib.lookup(self.fds["xdplb_services"], ctypes.c_uint32(0), table_id):
            return {}
        fd = self.lib.check(self.lib.bpf_map_get_fd_by_id(table_id.value), "open the service table")
        try:
            slots = self.lib.array_values(fd, abi.ServiceSlot, abi.SERVICE_SLOTS)
        finally:
            os.close(fd)
        return {(from_be32(s.key.vip), socket.ntohs(s.key.port), PROTOCOL_NAMES[s.key.proto]): s.svc
                for s in slots if s.key.proto}

    def _write_service_table(self, entries: dict[tuple, abi.Service]) -> None:
        """Builds the service table and swaps it in with one update."""
        slots = service_table([(self._service_key(*key), value) for key, value in entries.items()])
        fd = self.lib.create_array("xdplb_svc_table", ctypes.sizeof(abi.ServiceSlot), abi.SERVICE_SLOTS)
        try:
            self.lib.update_batch(fd, _indexes(len(slots)), slots, len(slots))
            self.lib.update(self.fds["xdplb_services"], ctypes.c_uint32(0), ctypes.c_uint32(fd))
        finally:
            os.close(fd)

    def _backend_entries(self) -> dict[int, abi.Backend]:
        values = self.lib.array_values(self.fds["xdplb_backends"], abi.Backend, abi.MAX_BACKENDS)
        return {i: v for i, v in enumerate(values) if v.flags & _IN_USE}

    def _client_rules(self) -> dict[int, list[ipaddress.IPv4Network]]:
        out: dict[int, list] = {}
        for key in self.lib.keys(self.fds["xdplb_clients"], abi.ClientKey):
            svc_id = socket.ntohl(key.service_id)
            net = ipaddress.IPv4Network(f"{from_be32(key.addr)}/{key.prefixlen - 32}")
            out.setdefault(svc_id, []).append(net)
        return out

    def services(self) -> list[Service]:
        backends = self._backend_entries()
        rules = self._client_rules()
        out = []
        for (vip, port, proto), value in sorted(self._service_entries().items()):
            members = sorted(Backend(from_be32(b.addr), socket.ntohs(b.port), b.weight)
                             for b in backends.values() if b.service_id == value.id)
            out.append(Service(vip, port, proto, members, sorted(rules.get(value.id, [])),
                               value.ring_size, value.udp_timeout_s,
                               "pass" if value.flags & abi.ServiceFlags.PASS_NOT_ALLOWED else "drop"))
        return out

    def service_ids(self) -> dict[str, int]:
        return {f"{vip}:{port}/{proto}": v.id for (vip, port, proto), v in self._service_entries().items()}

    def backend_ids(self) -> dict[tuple[int, str], int]:
        """(service id, "addr:port") -> backend id."""
        return {(b.service_id, f"{from_be32(b.addr)}:{socket.ntohs(b.port)}"): i
                for i, b in self._backend_entries().items()}

    # ---- writing -----------------------------------------------------------------
    def apply(self, wanted: list[Service], next_hops: dict[str, NextHop], seed: int,
              snat_range: tuple[int, int], rebuild_rings: bool = False) -> None:
        """Makes the maps hold exactly `wanted`, writing only what differs. Ids of
        services and backends that stay are kept, so their flows, counters and SNAT
        cursors carry on. Order matters: a service becomes visible only once its
        backends and ring are in place; a backend is retired only after a ring without
        it has been swapped in."""
        if len(wanted) > abi.MAX_SERVICES:
            raise UsageError(f"{len(wanted)} services: at most {abi.MAX_SERVICES} per interface")
        current = self._service_entries()
        backends = self._backend_entries()
        settings = self.read_settings()
        protos = _protocols(current)
        running = {s.name: s for s in self.services()}
        wanted_keys = {(s.vip, s.port, s.proto): s for s in wanted}
        used_svc = {v.id for k, v in current.items() if k in wanted_keys}

        # Services that go: out of the table first, then their rings and backends (whose
        # ids new services may take below).
        staying = {k: v for k, v in current.items() if k in wanted_keys}
        if len(staying) < len(current):
            self._write_service_table(staying)
            for key, value in current.items():
                if key not in wanted_keys:
                    self._remember_snat_ports(settings, backends, protos,
                                              [i for i, b in backends.items() if b.service_id == value.id])
                    self._remove_service(value, backends)

        free_svc = (i for i in range(abi.MAX_SERVICES) if i not in used_svc)
        table: dict[tuple, abi.Service] = {}
        taken_be = {i for i, b in backends.items()
                    if any(v.id == b.service_id for k, v in current.items() if k in wanted_keys)}
        free_be = (i for i in range(abi.MAX_BACKENDS) if i not in taken_be)
        cursors = _Cursors([backends[i] for i in taken_be], protos, {b.cursor_id for b in backends.values()})
        for key, svc in wanted_keys.items():
            existing = current.get(key)
            svc_id = existing.id if existing else next(free_svc)
            if existing is None:
                self._zero_stats("xdplb_svc_stats", svc_id)
            ids, retired = self._write_backends(svc_id, svc, backends, next_hops, free_be, cursors, settings)
            self._write_clients(svc_id, svc.clients)
            before = running.get(svc.name)
            if rebuild_rings or before is None or _ring_inputs(before) != _ring_inputs(svc):
                self._write_ring(svc_id, svc, ids, seed)
            self._remember_snat_ports(settings, backends, protos, retired)
            for be_id in retired:
                self.lib.update(self.fds["xdplb_backends"], ctypes.c_uint32(be_id), abi.Backend())
            flags = abi.ServiceFlags.ALLOWLIST if svc.clients else 0
            if svc.not_allowed == "pass":
                flags |= abi.ServiceFlags.PASS_NOT_ALLOWED
            table[key] = abi.Service(id=svc_id, ring_size=svc.ring_size, flags=flags, udp_timeout_s=svc.udp_timeout_s)
        if {k: bytes(v) for k, v in table.items()} != {k: bytes(v) for k, v in staying.items()}:
            self._write_service_table(table)
        self._write_ports(wanted, snat_range)

    def next_hops(self) -> dict[str, NextHop]:
        """The next hops the running backends were written with."""
        return {str(from_be32(b.addr)): NextHop(b.ifindex, _mac(b.dmac), _mac(b.smac))
                for b in self._backend_entries().values()}

    def update_next_hops(self, hops: dict[str, NextHop]) -> list[str]:
        """Rewrites the next hop of the backends whose address is in hops with another
        one (their flows follow, see follow_backend_hop); returns a line per change."""
        out = []
        for i, b in self._backend_entries().items():
            addr = str(from_be32(b.addr))
            hop = hops.get(addr)
            if hop is None:
                continue
            value = abi.Backend.from_buffer_copy(b)
            value.ifindex, value.dmac, value.smac = hop.ifindex, mac_bytes(hop.dmac), mac_bytes(hop.smac)
            if bytes(value) != bytes(b):
                self.lib.update(self.fds["xdplb_backends"], ctypes.c_uint32(i), value)
                out.append(f"backend {addr}:{socket.ntohs(b.port)} next hop {_mac(b.dmac)} (if {b.ifindex}) "
                           f"-> {hop.dmac} (if {hop.ifindex})")
        if out:  # after the entries: a flow that sees the new generation sees them too
            cfg = self._config()
            cfg.hop_gen = (cfg.hop_gen + 1) & 0xFFFFFFFF
            self.lib.update(self.fds["xdplb_config"], ctypes.c_uint32(0), cfg)
        return out

    @staticmethod
    def _service_key(vip, port, proto) -> abi.ServiceKey:
        return abi.ServiceKey(vip=be32(vip), port=socket.htons(port), proto=PROTOCOLS[proto])

    def _remove_service(self, value: abi.Service, backends: dict[int, abi.Backend]) -> None:
        self.lib.delete(self.fds["xdplb_rings"], ctypes.c_uint32(value.id))
        self._write_clients(value.id, [])
        for i, b in backends.items():
            if b.service_id == value.id:
                self.lib.update(self.fds["xdplb_backends"], ctypes.c_uint32(i), abi.Backend())

    def _write_backends(self, svc_id: int, svc: Service, backends: dict[int, abi.Backend],
                        next_hops: dict[str, NextHop], free_ids, cursors: _Cursors,
                        settings: Settings) -> tuple[list[int], list[int]]:
        """Writes the service's new and changed backends; returns their ids in
        svc.backends order, and the ids of backends that left. Those keep forwarding
        their flows (the flow table holds their address); the caller retires their
        slot once the ring no longer names them."""
        mine = {f"{from_be32(b.addr)}:{socket.ntohs(b.port)}": i
                for i, b in backends.items() if b.service_id == svc_id}
        ids = []
        for b in svc.backends:
            be_id = mine.pop(b.endpoint, None)
            if be_id is None:
                try:
                    be_id = next(free_ids)
                except StopIteration:
                    raise UsageError(f"more than {abi.MAX_BACKENDS} backends on this interface") from None
                self._zero_stats("xdplb_be_stats", be_id)
            cursor_id, fresh = cursors.get(be32(b.addr), socket.htons(b.port), svc.proto)
            if fresh:
                self._start_port_cursor(cursor_id, _memo_key(settings, b.addr, b.port, svc.proto), settings)
            hop = next_hops[str(b.addr)]
            value = abi.Backend(addr=be32(b.addr), port=socket.htons(b.port), weight=b.weight,
                                service_id=svc_id, flags=abi.BackendFlags.IN_USE,
                                ifindex=hop.ifindex, dmac=mac_bytes(hop.dmac), smac=mac_bytes(hop.smac),
                                cursor_id=cursor_id)
            if be_id not in backends or bytes(backends[be_id]) != bytes(value):
                self.lib.update(self.fds["xdplb_backends"], ctypes.c_uint32(be_id), value)
            ids.append(be_id)
        return ids, list(mine.values())

    def _write_ring(self, svc_id: int, svc: Service, ids: list[int], seed: int) -> None:
        """Builds a new ring and swaps it in with one update of xdplb_rings. Backends
        take their turns in address order, so the ring does not depend on how the
        user listed them."""
        order = sorted(range(len(svc.backends)), key=lambda i: (svc.backends[i].addr, svc.backends[i].port))
        table = maglev.populate([(svc.backends[i].endpoint, svc.backends[i].weight) for i in order],
                                svc.ring_size, seed)
        values = pack_ring([abi.NO_BACKEND if slot == maglev.EMPTY else ids[order[slot]] for slot in table])
        fd = self.lib.create_array(f"xdplb_ring{svc_id}"[:15], ctypes.sizeof(ctypes.c_uint64), abi.RING_ENTRIES)
        try:
            self.lib.update_batch(fd, _indexes(len(values)), values, len(values))
            self.lib.update(self.fds["xdplb_rings"], ctypes.c_uint32(svc_id), ctypes.c_uint32(fd))
        finally:
            os.close(fd)

    def ring(self, svc_id: int) -> list[int]:
        """The backend id of every slot of a service's ring (for status and tests)."""
        inner_id = ctypes.c_uint32()
        if not self.lib.lookup(self.fds["xdplb_rings"], ctypes.c_uint32(svc_id), inner_id):
            return []
        size = next(v.ring_size for v in self._service_entries().values() if v.id == svc_id)
        fd = self.lib.check(self.lib.bpf_map_get_fd_by_id(inner_id.value), "open ring")
        try:
            entries = -(-size // abi.RING_SLOTS_PER_ENTRY)
            return unpack_ring(self.lib.array_values(fd, ctypes.c_uint64, entries), size)
        finally:
            os.close(fd)

    def _write_clients(self, svc_id: int, networks: list[ipaddress.IPv4Network]) -> None:
        fd = self.fds["xdplb_clients"]
        wanted = {(n.network_address, n.prefixlen) for n in networks}
        for key in list(self.lib.keys(fd, abi.ClientKey)):
            if socket.ntohl(key.service_id) != svc_id:
                continue
            have = (from_be32(key.addr), key.prefixlen - 32)
            if have in wanted:
                wanted.discard(have)
            else:
                self.lib.delete(fd, key)
        for addr, plen in wanted:
            key = abi.ClientKey(prefixlen=32 + plen, service_id=socket.htonl(svc_id), addr=be32(addr))
            self.lib.update(fd, key, ctypes.c_uint8(1))

    def _write_ports(self, services: list[Service], snat_range: tuple[int, int]) -> None:
        lo, hi = snat_range
        flags = bytearray(abi.PORTS)
        flags[lo:hi + 1] = bytes([int(abi.PortFlags.SNAT)]) * (hi + 1 - lo)
        for s in services:
            flags[s.port] |= int(abi.PortFlags.TCP_SERVICE if s.proto == "tcp" else abi.PortFlags.UDP_SERVICE)
        current = self.lib.array_values(self.fds["xdplb_ports"], ctypes.c_uint8, abi.PORTS)
        if bytes(current) == bytes(flags):
            return
        values = (ctypes.c_uint8 * abi.PORTS).from_buffer_copy(flags)
        self.lib.update_batch(self.fds["xdplb_ports"], _indexes(abi.PORTS), values, abi.PORTS)

    # ---- counters ----------------------------------------------------------------
    def _percpu(self, name: str, index: int, ctype):
        size = (ctypes.sizeof(ctype) + 7) // 8 * 8
        buf = ctypes.create_string_buffer(size * self.ncpus)
        self.lib.lookup(self.fds[name], ctypes.c_uint32(index), buf)
        return [ctype.from_buffer_copy(buf.raw[i * size:i * size + ctypes.sizeof(ctype)])
                for i in range(self.ncpus)]

    # ---- SNAT port cursors (see snatmemo) ------------------------------------------
    def _start_port_cursor(self, cursor_id: int, memo_key: str, settings: Settings) -> None:
        """Starts a new endpoint's SNAT source search where the last program to use this
        tuple space left off, else at a random place: a fixed start would walk into
        the TIME_WAIT entries of the ports used before every restart."""
        port = self.memo.recall(memo_key)
        if port is not None and settings.snat_port_min <= port <= settings.snat_port_max:
            start = snatmemo.cursor_at(port, len(settings.snat_addrs), settings.snat_port_min)
        else:
            start = secrets.randbelow(1 << 32)
        self.lib.update(self.fds["xdplb_port_cur"], ctypes.c_uint32(cursor_id), ctypes.c_uint32(start))

    def _remember_snat_ports(self, settings: Settings, backends: dict[int, abi.Backend],
                             protos: dict[int, str], ids) -> None:
        cursor = ctypes.c_uint32()
        ports = {}
        for i in ids:
            b = backends.get(i)
            if b is None or b.service_id not in protos:
                continue
            self.lib.lookup(self.fds["xdplb_port_cur"], ctypes.c_uint32(b.cursor_id), cursor)
            k = _memo_key(settings, from_be32(b.addr), socket.ntohs(b.port), protos[b.service_id])
            ports[k] = snatmemo.next_port(cursor.value, len(settings.snat_addrs), settings.snat_port_min,
                                          settings.snat_port_max)
        try:
            self.memo.remember(ports)
        except OSError:
            pass  # only an aid against TIME_WAIT collisions: never a reason to fail a change

    def cursor_id(self, backend_id: int) -> int:
        """The SNAT cursor (index into xdplb_port_cur) a backend entry uses."""
        return self._backend_entries()[backend_id].cursor_id

    def remember_snat_ports(self) -> None:
        """Records where every backend's SNAT cursor stands (before a detach)."""
        backends = self._backend_entries()
        self._remember_snat_ports(self.read_settings(), backends, _protocols(self._service_entries()), list(backends))

    def _zero_stats(self, name: str, index: int) -> None:
        size = (ctypes.sizeof(abi.Traffic) + 7) // 8 * 8
        self.lib.update(self.fds[name], ctypes.c_uint32(index),
                        ctypes.create_string_buffer(size * self.ncpus), BPF_ANY)

    def counters(self) -> dict[str, int]:
        return {c.name.lower(): sum(v.value for v in self._percpu("xdplb_counters", c, ctypes.c_uint64))
                for c in abi.Counter if c != abi.Counter.MAX}

    def traffic(self, kind: str, index: int) -> Traffic:
        per_cpu = self._percpu("xdplb_svc_stats" if kind == "service" else "xdplb_be_stats",
                               index, abi.Traffic)
        return Traffic(sum(t.packets for t in per_cpu), sum(t.bytes for t in per_cpu),
                       sum(t.new_flows for t in per_cpu))

    # ---- the flow table, read and reset through mmap ------------------------------
    def flow_slot_count(self) -> int:
        return self.lib.obj_info(self.fds["xdplb_flows"], MapInfo()).max_entries

    def _flow_table(self) -> mmap.mmap:
        size = self.flow_slot_count() * ctypes.sizeof(abi.FlowSlot)
        return mmap.mmap(self.fds["xdplb_flows"], size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _slots(self):
        """(index, last_seen, proto, backend_id, flags) of every used slot."""
        for index, last_seen, proto, backend_id, flags, _ in self._slot_rows():
            yield index, last_seen, proto, backend_id, flags

    def _slot_rows(self):
        """(index, last_seen, proto, backend_id, flags, udp_timeout_s) of every used slot."""
        with self._flow_table() as table:
            for index, (last_seen, proto, _, backend_id, flags, udp_timeout) in \
                    enumerate(_SLOT_FIELDS.iter_unpack(table)):
                if proto and not flags & _DEAD:
                    yield index, last_seen, proto, backend_id, flags, udp_timeout

    def flow_count(self) -> int:
        """Entries in the flow table (two per flow), expired ones included."""
        return sum(1 for _ in self._slots())

    def reset_flows(self, backend_id: int) -> int:
        """Forgets every flow (both directions) of a backend. Their next packets find no
        flow: a client's TCP segment is then answered with a reset by the kernel, so
        clients of a dead backend learn at once instead of timing out. Only the flags
        byte is written (one store), so the data plane never sees a torn slot."""
        doomed = [index for index, _, _, be, _ in self._slots() if be == backend_id]
        with self._flow_table() as table:
            for index in doomed:
                at = index * ctypes.sizeof(abi.FlowSlot) + _FLAGS_OFFSET
                table[at] = table[at] | _DEAD
        return len(doomed) // 2

    def snat_usage(self) -> list[SnatUse]:
        """SNAT sources held per (SNAT address, backend endpoint), from the backend-side
        entries of the flow table that have not expired."""
        cfg = self._config()
        now = clock.now_ticks(cfg.tick_shift)
        counts: dict[tuple, list[int]] = {}
        with self._flow_table() as table:
            for last_seen, saddr, daddr, sport, proto, flags, udp_timeout in _SLOT_KEYS.iter_unpack(table):
                if not proto or not flags & _REPLY or flags & _DEAD:
                    continue
                ticks = _expiry_ticks(cfg, proto, flags, udp_timeout)
                if ticks and clock.ticks_since(now, last_seen) > ticks:
                    continue
                key = (daddr, saddr, sport, proto)
                counts.setdefault(key, [0, 0])[1 if _closed(flags) else 0] += 1
        return sorted(SnatUse(str(from_be32(daddr)), f"{from_be32(saddr)}:{socket.ntohs(sport)}/{PROTOCOL_NAMES[proto]}",
                              held[0], held[1])
                      for (daddr, saddr, sport, proto), held in counts.items())

    def flow_capacity(self) -> int:
        """Flows the table is sized for (at half load)."""
        return self.flow_slot_count() // 4

    def active_flows(self) -> dict[int, int]:
        """Per backend id: client-side flows neither closing nor idle past their timeout
        (the data plane's own notion of a live flow)."""
        cfg = self._config()
        now = clock.now_ticks(cfg.tick_shift)
        out: dict[int, int] = {}
        for _, last_seen, proto, backend_id, flags, udp_timeout in self._slot_rows():
            if flags & (_REPLY | _CLOSING):
                continue
            ticks = _expiry_ticks(cfg, proto, flags, udp_timeout)
            if ticks and clock.ticks_since(now, last_seen) > ticks:
                continue
            out[backend_id] = out.get(backend_id, 0) + 1
        return out
