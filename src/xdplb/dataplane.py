# SPDX-License-Identifier: Apache-2.0
"""Typed I/O on one interface's data plane maps: reading what they hold (read_state)
and carrying out a plan's writes (execute), plus counters, the trace lease and the
flow table. What to write, and in which order, is plan.py's; how values are encoded
is layout.py's.

The maps are the single source of truth for what is configured: services, backends
(with weights) and allow-lists are read back from them, so status works from any shell
and a re-run of a command changes only what differs.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import secrets
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import abi, clock, layout, plan, snatmemo, trace
from .errors import XdplbError
from .layout import from_words
from .libbpf import BPF_ANY, Libbpf, MapInfo, array_stride, libbpf
from .model import Service, Settings, host_text
from .netlink import NextHop

if TYPE_CHECKING:
    from .flowtable import FlowTable, SnatUse

_IN_USE = int(abi.BackendFlags.IN_USE)


_SLOT_PROTO = abi.ServiceSlot.key.offset + abi.ServiceKey.proto.offset
# Mapped arrays are read entry by entry at the kernel's stride (a multiple of 8), and a
# flag is read as the low byte of its field.
assert all(ctypes.sizeof(t) == array_stride(ctypes.sizeof(t)) for t in (abi.Backend, abi.ServiceSlot))
assert sys.byteorder == "little"


def _entries_with(memory, size: int, count: int, offset: int, mask: int) -> list[int]:
    """Indexes of the entries of a mapped array (entries of `size` bytes) whose byte at
    `offset` has a bit of `mask` set: a strided slice, not a Python object per entry."""
    marks = memory[offset:size * count:size]
    return [i for i, b in enumerate(marks) if b & mask]


@dataclass
class Traffic:
    packets: int = 0
    bytes: int = 0
    new_flows: int = 0


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
        self._mapped: FlowTable | None = None  # the flow table, mapped by the first scan
        self._arrays: dict[str, mmap.mmap] = {}  # mappable arrays, mapped at first use

    def close(self) -> None:
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None
        for memory in self._arrays.values():
            memory.close()
        self._arrays = {}
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    # ---- reading what the maps hold -----------------------------------------------
    def _config(self) -> abi.Config:
        cfg = abi.Config()
        self.lib.lookup(self.fds["xdplb_config"], ctypes.c_uint32(0), cfg)
        return cfg

    def _write_config(self, cfg: abi.Config) -> None:
        self.lib.update(self.fds["xdplb_config"], ctypes.c_uint32(0), cfg)

    def read_settings(self) -> Settings:
        cfg = self._config()
        return layout.settings_from(cfg, self._tracing(cfg))

    def read_abi_version(self) -> int:
        return self._config().abi_version

    def _array(self, name: str, value_type, entries: int) -> mmap.mmap:
        """One of the program's mappable arrays (bpf/maps.h), mapped once for the life of
        this object."""
        memory = self._arrays.get(name)
        if memory is None:
            memory = self._arrays[name] = self.lib.map_memory(self.fds[name], ctypes.sizeof(value_type), entries)
        return memory

    def _service_entries(self) -> dict[tuple, abi.Service]:
        fd = self._inner_fd("xdplb_services", 0)
        if fd is None:
            return self._service_entries6()
        try:
            memory = self.lib.map_memory(fd, ctypes.sizeof(abi.ServiceSlot), abi.SERVICE_SLOTS)
        finally:
            os.close(fd)
        with memory:
            used = _entries_with(memory, ctypes.sizeof(abi.ServiceSlot), abi.SERVICE_SLOTS, _SLOT_PROTO, 0xFF)
            slots = [abi.ServiceSlot.from_buffer_copy(memory, i * ctypes.sizeof(abi.ServiceSlot)) for i in used]
        return {layout.table_key(s.key): abi.Service.from_buffer_copy(s.svc) for s in slots} | self._service_entries6()

    def _service_entries6(self) -> dict[tuple, abi.Service]:
        fd = self.fds["xdplb_services6"]
        out = {}
        for key in self.lib.keys(fd, abi.ServiceKey6):
            value = abi.Service()
            if self.lib.lookup(fd, key, value):
                out[layout.table_key6(key)] = value
        return out

    def _backend_entries(self) -> dict[int, abi.Backend]:
        memory = self._array("xdplb_backends", abi.Backend, abi.MAX_BACKENDS)
        size = ctypes.sizeof(abi.Backend)
        return {i: abi.Backend.from_buffer_copy(memory, i * size)
                for i in _entries_with(memory, size, abi.MAX_BACKENDS, abi.Backend.flags.offset, _IN_USE)}

    def _client_rules(self) -> dict[int, set[tuple]]:
        out: dict[int, set] = {}
        for name, key_type in (("xdplb_clients", abi.ClientKey), ("xdplb_clients6", abi.ClientKey6)):
            for key in self.lib.keys(self.fds[name], key_type):
                svc_id, rule = layout.client_rule_of(key)
                out.setdefault(svc_id, set()).add(rule)
        return out

    def _inner_fd(self, outer: str, index: int) -> int | None:
        inner_id = ctypes.c_uint32()
        if not self.lib.lookup(self.fds[outer], ctypes.c_uint32(index), inner_id):
            return None
        return self.lib.check(self.lib.bpf_map_get_fd_by_id(inner_id.value), f"open {outer}[{index}]")

    def _ring_digests(self) -> dict[int, int]:
        out = {}
        value = ctypes.c_uint64()
        for svc_id in range(abi.MAX_SERVICES):
            fd = self._inner_fd("xdplb_rings", svc_id)
            if fd is None:
                continue
            try:
                self.lib.lookup(fd, ctypes.c_uint32(layout.RING_DIGEST_ENTRY), value)
            finally:
                os.close(fd)
            out[svc_id] = value.value >> layout.RING_DIGEST_SHIFT
        return out

    def read_state(self) -> plan.Running:
        cfg = self._config()
        return plan.Running(
            config=cfg if cfg.abi_version else None, flow_slots=self.flow_slot_count(),
            services=self._service_entries(), backends=self._backend_entries(), clients=self._client_rules(),
            rings=self._ring_digests(),
            ports=self.port_flags(),
            jiffy_ns=clock.jiffy_ns())

    def sync(self, wanted: plan.Wanted, ifname: str = "", dry_run: bool = False) -> plan.Plan:
        """Plans the way from what the maps hold to `wanted` and, unless dry_run,
        carries it out: the one road by which services, backends, rings and settings
        are written."""
        running = self.read_state()
        if plan.needs_held_ports(running, wanted):
            running.held_ports = self.held_snat_ports()
        p = plan.make(running, wanted, ifname)
        if not dry_run:
            self.execute(p)
        return p

    def services(self) -> list[Service]:
        return layout.services_from(self._service_entries(), self._backend_entries(), self._client_rules())

    def service_ids(self) -> dict[str, int]:
        return {f"{host_text(vip)}:{port}/{proto}": v.id for (vip, port, proto), v in self._service_entries().items()}

    def backend_ids(self) -> dict[tuple[int, str], int]:
        """(service id, "addr:port") -> backend id."""
        return {(b.service_id, layout.endpoint_of(b)): i for i, b in self._backend_entries().items()}

    def next_hops(self) -> dict[str, NextHop]:
        """The next hops the running backends were written with."""
        return {str(from_words(b.addr)): layout.next_hop_of(b) for b in self._backend_entries().values()}

    def ring(self, svc_id: int) -> list[int]:
        """The backend id of every slot of a service's ring (for status and tests)."""
        fd = self._inner_fd("xdplb_rings", svc_id)
        if fd is None:
            return []
        size = next(v.ring_size for v in self._service_entries().values() if v.id == svc_id)
        try:
            entries = -(-size // abi.RING_SLOTS_PER_ENTRY)
            return layout.unpack_ring(self.lib.array_values(fd, ctypes.c_uint64, entries), size)
        finally:
            os.close(fd)

    def cursor_id(self, backend_id: int) -> int:
        """The SNAT cursor (index into xdplb_port_cur) a backend entry uses."""
        return self._backend_entries()[backend_id].cursor_id

    # ---- carrying out a plan ---------------------------------------------------------
    def execute(self, p: plan.Plan, after_each=None) -> None:
        """Carries out the plan's writes in order. after_each(i) runs after write i (a
        hook for the fault-injection tests)."""
        for i, op in enumerate(p.ops):
            getattr(self, f"_do_{type(op).__name__}")(op)
            if after_each is not None:
                after_each(i)

    def port_flags(self) -> bytes:
        """xdplb_ports, one byte per port."""
        return self._array("xdplb_ports", ctypes.c_uint8, abi.PORTS)[::array_stride(1)]

    def _do_SetPorts(self, op: plan.SetPorts) -> None:
        self._array("xdplb_ports", ctypes.c_uint8, abi.PORTS)[::array_stride(1)] = op.flags

    def _do_SetConfig(self, op: plan.SetConfig) -> None:
        value = abi.Config.from_buffer_copy(op.value)
        current = self._config()
        layout.keep_running_fields(value, current)  # as they are now, not when planned
        if not self._tracing(current):  # an expired lease goes with the next write
            value.flags &= ~int(abi.ConfigFlags.TRACE) & 0xFFFFFFFF
            value.trace_until = 0
        self._write_config(value)

    def _do_SetServiceTable(self, op: plan.SetServiceTable) -> None:
        """Builds the IPv4 service table and swaps it in with one update; brings the IPv6
        services' map to the same entries, one update or delete per service that differs."""
        self._set_services6({key: value for key, value in op.entries.items() if key[0].version == 6})
        slots = layout.service_table([(layout.service_key(*key), value) for key, value in op.entries.items()
                                      if key[0].version == 4])
        fd = self.lib.create_array("xdplb_svc_table", ctypes.sizeof(abi.ServiceSlot), abi.SERVICE_SLOTS)
        try:
            with self.lib.map_memory(fd, ctypes.sizeof(abi.ServiceSlot), abi.SERVICE_SLOTS) as memory:
                memory[:ctypes.sizeof(slots)] = bytes(slots)
            self.lib.update(self.fds["xdplb_services"], ctypes.c_uint32(0), ctypes.c_uint32(fd))
        finally:
            os.close(fd)

    def _set_services6(self, entries: dict[tuple, abi.Service]) -> None:
        fd = self.fds["xdplb_services6"]
        have = self._service_entries6()
        for key in have.keys() - entries.keys():
            self.lib.delete(fd, layout.service_key6(*key))
        for key, value in entries.items():
            if key not in have or bytes(have[key]) != bytes(value):
                self.lib.update(fd, layout.service_key6(*key), value)

    def _do_DeleteRing(self, op: plan.DeleteRing) -> None:
        self.lib.delete(self.fds["xdplb_rings"], ctypes.c_uint32(op.service_id))

    def _do_SetRing(self, op: plan.SetRing) -> None:
        """Writes a service's ring in place (see xdplb_rings in bpf/maps.h), the entry
        holding the digest last: a writer killed half-way leaves the old digest, and the
        next plan writes the ring again. A service's first ring is filled before it is
        put in xdplb_rings."""
        fd = self._inner_fd("xdplb_rings", op.service_id)
        new = fd is None
        if new:
            fd = self.lib.create_array(f"xdplb_ring{op.service_id}"[:15], ctypes.sizeof(ctypes.c_uint64),
                                       abi.RING_ENTRIES)
        try:
            with self.lib.map_memory(fd, ctypes.sizeof(ctypes.c_uint64), abi.RING_ENTRIES) as memory:
                values = memoryview(op.values).cast("B")
                last = layout.RING_DIGEST_ENTRY * ctypes.sizeof(ctypes.c_uint64)
                memory[:last] = values[:last]
                memory[last:len(values)] = values[last:]
            if new:
                self.lib.update(self.fds["xdplb_rings"], ctypes.c_uint32(op.service_id), ctypes.c_uint32(fd))
        finally:
            os.close(fd)

    def _do_SetClients(self, op: plan.SetClients) -> None:
        def fd(rule) -> int:
            return self.fds["xdplb_clients6" if rule[0].version == 6 else "xdplb_clients"]
        for rule in op.remove:
            self.lib.delete(fd(rule), layout.client_key(op.service_id, rule))
        for rule in op.add:
            self.lib.update(fd(rule), layout.client_key(op.service_id, rule), ctypes.c_uint8(1))

    def _do_ZeroStats(self, op: plan.ZeroStats) -> None:
        name = "xdplb_svc_stats" if op.kind == "service" else "xdplb_be_stats"
        size = (ctypes.sizeof(abi.Traffic) + 7) // 8 * 8
        self.lib.update(self.fds[name], ctypes.c_uint32(op.index), ctypes.create_string_buffer(size * self.ncpus),
                        BPF_ANY)

    def _do_SetBackend(self, op: plan.SetBackend) -> None:
        self.lib.update(self.fds["xdplb_backends"], ctypes.c_uint32(op.backend_id), op.value)

    def _do_ClearBackend(self, op: plan.ClearBackend) -> None:
        self.lib.update(self.fds["xdplb_backends"], ctypes.c_uint32(op.backend_id), abi.Backend())

    def _do_StartCursor(self, op: plan.StartCursor) -> None:
        """Starts a new endpoint's SNAT source search where the last program to use this
        tuple space left off, else at a random place: a fixed start would walk into
        the TIME_WAIT entries of the ports used before every restart."""
        s = op.settings
        port = self.memo.recall(op.memo_key)
        if port is not None and s.snat_port_min <= port <= s.snat_port_max:
            start = snatmemo.cursor_at(port, len(s.snat_addrs), s.snat_port_min)
        else:
            start = secrets.randbelow(1 << 32)
        self.lib.update(self.fds["xdplb_port_cur"], ctypes.c_uint32(op.cursor_id), ctypes.c_uint32(start))

    def _do_RememberCursors(self, op: plan.RememberCursors) -> None:
        s = op.settings
        cursor = ctypes.c_uint32()
        ports = {}
        for cursor_id, key in op.cursors:
            self.lib.lookup(self.fds["xdplb_port_cur"], ctypes.c_uint32(cursor_id), cursor)
            ports[key] = snatmemo.next_port(cursor.value, len(s.snat_addrs), s.snat_port_min, s.snat_port_max)
        try:
            self.memo.remember(ports)
        except OSError:
            pass  # only an aid against TIME_WAIT collisions: never a reason to fail a change

    def _do_MarkHopsPending(self, op: plan.MarkHopsPending) -> None:
        cfg = self._config()
        cfg.flags |= abi.ConfigFlags.HOPS_PENDING
        self._write_config(cfg)

    def _do_BumpHopGen(self, op: plan.BumpHopGen) -> None:
        """After the backend entries: a flow that sees the new generation sees them too."""
        cfg = self._config()
        cfg.hop_gen = (cfg.hop_gen + 1) & 0xFFFFFFFF
        self._flows().before_hop_bump(cfg.hop_gen)  # before: no moment where a wrapped generation looks current
        cfg.flags &= ~int(abi.ConfigFlags.HOPS_PENDING) & 0xFFFFFFFF
        self._write_config(cfg)

    def remember_snat_ports(self) -> None:
        """Records where every backend's SNAT cursor stands (before a detach)."""
        backends = self._backend_entries()
        protos = {v.id: key[2] for key, v in self._service_entries().items()}
        settings = self.read_settings()
        self._do_RememberCursors(plan.RememberCursors(
            [(b.cursor_id, layout.memo_key(settings, from_words(b.addr), socket.ntohs(b.port), protos[b.service_id]))
             for b in backends.values() if b.service_id in protos], settings))

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
        deadline change (the config map is one value: callers hold the interface lock)."""
        cfg = self._config()
        until = clock.now_ticks(cfg.tick_shift) + min(math.ceil(seconds * cfg.ticks_per_s),
                                                       abi.TRACE_LEASE_MAX_TICKS)
        cfg.flags |= abi.ConfigFlags.TRACE
        cfg.trace_until = until & 0xFFFFFFFF
        self._write_config(cfg)

    def end_trace(self) -> None:
        cfg = self._config()
        cfg.flags &= ~int(abi.ConfigFlags.TRACE) & 0xFFFFFFFF
        cfg.trace_until = 0
        self._write_config(cfg)

    def set_trace(self, on: bool) -> None:
        """Starts a trace lease (see renew_trace) or ends it."""
        self.renew_trace() if on else self.end_trace()

    # ---- counters ----------------------------------------------------------------
    def _percpu(self, name: str, index: int, ctype):
        size = (ctypes.sizeof(ctype) + 7) // 8 * 8
        buf = ctypes.create_string_buffer(size * self.ncpus)
        self.lib.lookup(self.fds[name], ctypes.c_uint32(index), buf)
        return [ctype.from_buffer_copy(buf.raw[i * size:i * size + ctypes.sizeof(ctype)])
                for i in range(self.ncpus)]

    def counters(self) -> dict[str, int]:
        return {c.name.lower(): sum(v.value for v in self._percpu("xdplb_counters", c, ctypes.c_uint64))
                for c in abi.Counter if c != abi.Counter.MAX}

    def traffic(self, kind: str, index: int) -> Traffic:
        per_cpu = self._percpu("xdplb_svc_stats" if kind == "service" else "xdplb_be_stats",
                               index, abi.Traffic)
        return Traffic(sum(t.packets for t in per_cpu), sum(t.bytes for t in per_cpu),
                       sum(t.new_flows for t in per_cpu))

    # ---- the flow table (flowtable.py) ---------------------------------------------
    def flow_slot_count(self) -> int:
        return self.lib.obj_info(self.fds["xdplb_flows"], MapInfo()).max_entries

    def flow_capacity(self) -> int:
        return layout.flow_capacity(self.flow_slot_count())

    def flow_table(self) -> FlowTable:
        """The flow table mapped into this process (close it, or use it in a with)."""
        # Imported here, not at the top: numpy starts native threads when imported, and a
        # process with threads can no longer join another mount namespace (setns), which
        # the CLI does first under `ip netns exec` (namespaces.join_host_mounts).
        from .flowtable import FlowTable
        return FlowTable(self.fds["xdplb_flows"], self.flow_slot_count())

    def _flows(self) -> FlowTable:
        """The flow table, mapped once for the life of this object: a long-lived reader
        (serve's scrapes) pays for the mapping's page faults once, not at every scan."""
        if self._mapped is None:
            self._mapped = self.flow_table()
        return self._mapped

    def _flows6(self):
        from .flows6 import Flows6
        return Flows6(self.lib, self.fds["xdplb_flows6"])

    def flow_count(self) -> int:
        """Entries in the flow tables (two per IPv4 NAT flow), expired ones included."""
        return self._flows().count() + self._flows6().count()

    def active_flows(self) -> dict[int, int]:
        """Per backend id: client-side flows neither closing nor idle past their timeout."""
        return self.flow_census()[0]

    def connections(self, service_ids=None, backend_ids=None, limit: int = 0):
        """The live connections (flowtable.Connection) of both families, most recently
        seen first, and how many matched in all."""
        cfg = self._config()
        four, total = self._flows().connections(cfg, None, service_ids, backend_ids, limit)
        six = self._flows6().connections(cfg, None, service_ids, backend_ids)
        if not six:
            return four, total
        both = sorted(four + six, key=lambda c: c.idle_s)
        return (both[:limit] if limit else both), total + len(six)

    def flow_census(self) -> tuple[dict[int, int], int]:
        """active_flows() and flow_count() from one scan of each table."""
        cfg = self._config()
        active, entries = self._flows().census(cfg)
        active6, entries6 = self._flows6().census(cfg)
        for backend_id, n in active6.items():
            active[backend_id] = active.get(backend_id, 0) + n
        return active, entries + entries6

    def snat_usage(self) -> list[SnatUse]:
        return self._flows().snat_usage(self._config())

    def held_snat_ports(self) -> frozenset[int]:
        return self._flows().held_snat_ports(self._config())

    def reset_flows(self, backend_id: int) -> int:
        """Forgets every flow (both directions) of a backend. Their next packets find no
        flow: a client's TCP segment is then answered with a reset by the kernel, so
        clients of a dead backend learn at once instead of timing out."""
        return self._flows().reset_flows(backend_id) + self._flows6().reset_flows(backend_id)
