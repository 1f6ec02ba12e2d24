# SPDX-License-Identifier: Apache-2.0
"""The road from a wanted state to the maps: a plan is a pure function of what the maps
hold now (Running, read by DataPlane.read_state) and what is wanted (Wanted), giving
the ordered writes that turn one into the other. DataPlane.execute carries them out.

Because the plan compares against what the maps really hold, down to each ring's
digest and each port flag, a plan computed after an interrupted run (a kill between
two writes) finishes that run's job; and a plan with no writes means nothing differs.

Order is what keeps packets right while the maps change:
- ports a reply may arrive on are flagged before the settings hand them out, and an
  old range's ports stay flagged while open flows use them;
- a service becomes visible (service table) only once its backends, allow-list and
  ring are in place, and leaves it before they are removed;
- a backend entry is cleared only after a ring without it is written (its flows keep
  forwarding from their own copy of its address);
- the next-hop generation is bumped after the backend entries it makes flows re-read.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field

from . import abi, layout
from .errors import UsageError
from .model import Service, Settings
from .netlink import NextHop


@dataclass
class Running:
    """What one interface's maps hold (see DataPlane.read_state)."""
    config: abi.Config | None  # None: never written (a program just loaded)
    flow_slots: int
    services: dict[tuple, abi.Service] = field(default_factory=dict)  # (vip, port, proto) -> value
    backends: dict[int, abi.Backend] = field(default_factory=dict)  # in-use entries by id
    clients: dict[int, set[tuple]] = field(default_factory=dict)  # service id -> rules
    rings: dict[int, int] = field(default_factory=dict)  # service id with a ring -> its digest (0: none)
    ports: bytes = bytes(abi.PORTS)
    jiffy_ns: int = 4_000_000
    # SNAT ports outside the wanted range that open flows still use; read (a flow-table
    # scan) only when the port flags show such ports (see needs_held_ports).
    held_ports: frozenset[int] = frozenset()

    def settings(self) -> Settings | None:
        return layout.settings_from(self.config) if self.config is not None else None

    def model(self) -> list[Service]:
        return layout.services_from(self.services, self.backends, self.clients)


@dataclass
class Wanted:
    settings: Settings
    services: list[Service]
    next_hops: dict[str, NextHop]  # backend address -> next hop


# ---- the writes ------------------------------------------------------------------------

@dataclass
class SetPorts:
    flags: bytes

    def describe(self) -> str:
        return "port flags"


@dataclass
class SetConfig:
    value: abi.Config

    def describe(self) -> str:
        return "settings"


@dataclass
class SetServiceTable:
    entries: dict[tuple, abi.Service]

    def describe(self) -> str:
        return f"service table ({len(self.entries)} services)"


@dataclass
class DeleteRing:
    service_id: int

    def describe(self) -> str:
        return f"remove the ring of service id {self.service_id}"


@dataclass
class SetRing:
    service_id: int
    values: object  # ctypes array of RING_ENTRIES u64 (layout.ring_values)
    digest: int
    name: str
    size: int

    def describe(self) -> str:
        return f"ring of {self.name}"


@dataclass
class SetClients:
    service_id: int
    add: list[tuple]
    remove: list[tuple]

    def describe(self) -> str:
        return f"allow-list of service id {self.service_id}"


@dataclass
class ZeroStats:
    kind: str  # "service" | "backend"
    index: int

    def describe(self) -> str:
        return f"counters of {self.kind} id {self.index}"


@dataclass
class SetBackend:
    backend_id: int
    value: abi.Backend

    def describe(self) -> str:
        return f"backend {layout.endpoint_of(self.value)} (id {self.backend_id})"


@dataclass
class ClearBackend:
    backend_id: int

    def describe(self) -> str:
        return f"retire backend id {self.backend_id}"


@dataclass
class StartCursor:
    cursor_id: int
    memo_key: str
    settings: Settings

    def describe(self) -> str:
        return f"SNAT cursor {self.cursor_id}"


@dataclass
class RememberCursors:
    cursors: list[tuple[int, str]]  # (cursor id, memo key)
    settings: Settings

    def describe(self) -> str:
        return "note where SNAT cursors stand"


@dataclass
class MarkHopsPending:
    """Before next hops are rewritten: a run cut after them still leaves a sign that
    the generation must be bumped (the flag, which the data plane ignores)."""

    def describe(self) -> str:
        return "mark next hops as changing"


@dataclass
class BumpHopGen:
    """After next hops are rewritten: flows copied before look their backend up again."""

    def describe(self) -> str:
        return "next-hop generation"


# Writes that change nothing a user configured: never reported as a repair.
_BOOKKEEPING = (ZeroStats, StartCursor, RememberCursors)


@dataclass
class Plan:
    ops: list = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # what changes, for people

    def __bool__(self) -> bool:
        return bool(self.ops)


def needs_held_ports(running: Running, wanted: Wanted) -> bool:
    """Whether the plan must know which ports outside the wanted SNAT range open flows
    still use: the port flags mark some (an earlier range)."""
    s = wanted.settings
    return layout.snat_ports_outside(running.ports, (s.snat_port_min, s.snat_port_max))


def make(running: Running, wanted: Wanted, ifname: str = "") -> Plan:
    if len(wanted.services) > abi.MAX_SERVICES:
        raise UsageError(f"{len(wanted.services)} services: at most {abi.MAX_SERVICES} per interface")
    return _Planner(running, wanted, ifname).plan()


class _Planner:
    def __init__(self, running: Running, wanted: Wanted, ifname: str):
        self.r, self.w, self.ifname = running, wanted, ifname
        self.ops: list = []
        self.backends = dict(running.backends)  # as the maps will be after self.ops
        self.rings = dict(running.rings)
        self.clients = {k: set(v) for k, v in running.clients.items()}
        self.hop_lines: list[str] = []
        self.old_settings = running.settings() or wanted.settings

    def plan(self) -> Plan:
        s = self.w.settings
        final_ports = layout.port_flags(self.w.services, (s.snat_port_min, s.snat_port_max), self.r.held_ports)
        # Flag new ports before anything can send to them; unflag only at the end.
        ports = layout.union(self.r.ports, final_ports)
        if ports != self.r.ports:
            self.ops.append(SetPorts(ports))
        cfg = layout.config_value(s, self.r.jiffy_ns, self.r.config, self.r.flow_slots)
        if self.r.config is None or bytes(cfg) != bytes(self.r.config):
            self.ops.append(SetConfig(cfg))
        wanted = {(svc.vip, svc.port, svc.proto): svc for svc in self.w.services}
        staying = {k: v for k, v in self.r.services.items() if k in wanted}
        if len(staying) < len(self.r.services):
            self.ops.append(SetServiceTable(staying))
            for key, value in self.r.services.items():
                if key not in wanted:
                    self._remove(value.id)
        table = self._services(wanted, staying)
        if {k: bytes(v) for k, v in table.items()} != {k: bytes(v) for k, v in staying.items()}:
            self.ops.append(SetServiceTable(table))
        self._leftovers({v.id for v in table.values()})
        pending = self.r.config is not None and self.r.config.flags & abi.ConfigFlags.HOPS_PENDING
        if self.hop_lines or pending:
            self.ops.append(BumpHopGen())
        if final_ports != ports:
            self.ops.append(SetPorts(final_ports))
        return Plan(self.ops, self._lines())

    def _protos(self) -> dict[int, str]:
        return {v.id: key[2] for key, v in self.r.services.items()}

    def _remember(self, ids: list[int]) -> None:
        protos = self._protos()
        cursors = [(b.cursor_id, layout.memo_key(self.old_settings, layout.from_words(b.addr),
                                                 socket.ntohs(b.port), protos[b.service_id]))
                   for b in (self.backends[i] for i in ids) if b.service_id in protos]
        if cursors:
            self.ops.append(RememberCursors(cursors, self.old_settings))

    def _clear(self, ids: list[int]) -> None:
        for i in ids:
            self.ops.append(ClearBackend(i))
            del self.backends[i]

    def _remove(self, svc_id: int) -> None:
        """A service that goes (already out of the service table): its ring, allow-list and backends."""
        ids = [i for i, b in self.backends.items() if b.service_id == svc_id]
        self._remember(ids)
        if svc_id in self.rings:
            self.ops.append(DeleteRing(svc_id))
            del self.rings[svc_id]
        if self.clients.get(svc_id):
            self.ops.append(SetClients(svc_id, [], sorted(self.clients.pop(svc_id))))
        self._clear(ids)

    def _services(self, wanted: dict[tuple, Service], staying: dict[tuple, abi.Service]) -> dict[tuple, abi.Service]:
        used = {v.id for v in staying.values()}
        free_svc = (i for i in range(abi.MAX_SERVICES) if i not in used)
        taken = {i for i, b in self.backends.items() if b.service_id in used}
        self.cursors = layout.Cursors([self.backends[i] for i in taken], self._protos(),
                                      {b.cursor_id for b in self.backends.values()})
        table = {}
        for key, svc in wanted.items():
            existing = staying.get(key)
            svc_id = existing.id if existing else next(free_svc)
            if existing is None:
                self.ops.append(ZeroStats("service", svc_id))
            ids, retired = self._backends(svc_id, svc)
            have = self.clients.get(svc_id, set())
            want = layout.client_rules(svc.clients)
            if have != want:
                self.ops.append(SetClients(svc_id, sorted(want - have), sorted(have - want)))
                self.clients[svc_id] = want
            digest = layout.ring_digest(svc, ids, self.w.settings.hash_seed)
            if self.rings.get(svc_id) != digest:
                values, digest = layout.ring_values(svc, ids, self.w.settings.hash_seed)
                self.ops.append(SetRing(svc_id, values, digest, svc.name, svc.ring_size))
                self.rings[svc_id] = digest
            self._remember(retired)
            self._clear(retired)
            table[key] = layout.service_value(svc, svc_id)
        return table

    def _backends(self, svc_id: int, svc: Service) -> tuple[dict[str, int], list[int]]:
        """Writes the service's new and changed backends; returns their ids by endpoint,
        and the ids of those that left (cleared by the caller once the ring is swapped)."""
        mine = {layout.endpoint_of(b): i for i, b in self.backends.items() if b.service_id == svc_id}
        ids = {}
        for b in svc.backends:
            be_id = mine.pop(b.endpoint, None)
            if be_id is None:
                # Not an id any entry holds now: not even one left by an interrupted run,
                # which a service further on may still take back as its own.
                be_id = next((i for i in range(abi.MAX_BACKENDS) if i not in self.backends), None)
                if be_id is None:
                    raise UsageError(f"more than {abi.MAX_BACKENDS} backends on this interface")
                self.ops.append(ZeroStats("backend", be_id))
            addr, port = bytes(layout.addr_words(b.addr)), socket.htons(b.port)
            cursor_id, fresh = self.cursors.get(addr, port, svc.proto)
            if fresh:
                self.ops.append(StartCursor(cursor_id, layout.memo_key(self.w.settings, b.addr, b.port, svc.proto),
                                            self.w.settings))
            hop = self.w.next_hops[b.host]
            value = layout.backend_value(b, svc_id, hop, cursor_id)
            old = self.backends.get(be_id)
            if old is None or bytes(old) != bytes(value):
                if old is not None and layout.endpoint_key(old) == (addr, port) and layout.next_hop_of(old) != hop:
                    was = layout.next_hop_of(old)
                    if not self.hop_lines:
                        self.ops.append(MarkHopsPending())
                    self.hop_lines.append(f"{self.ifname}: backend {b.endpoint} next hop {was.dmac} (if {was.ifindex}) "
                                          f"-> {hop.dmac} (if {hop.ifindex})")
                self.ops.append(SetBackend(be_id, value))
                self.backends[be_id] = value
            ids[b.endpoint] = be_id
        return ids, list(mine.values())

    def _leftovers(self, final_ids: set[int]) -> None:
        """Rings, backends and allow-lists of services that are not in the service table:
        left by an interrupted run."""
        for svc_id in sorted(set(self.rings) - final_ids):
            self.ops.append(DeleteRing(svc_id))
            del self.rings[svc_id]
        for svc_id in sorted(set(self.clients) - final_ids):
            if self.clients[svc_id]:
                self.ops.append(SetClients(svc_id, [], sorted(self.clients[svc_id])))
            del self.clients[svc_id]
        self._clear([i for i, b in self.backends.items() if b.service_id not in final_ids])

    def _lines(self) -> list[str]:
        old = self.r.settings()
        lines = diff_settings(self.ifname, old, self.w.settings) if old is not None else []
        lines += diff_services(self.ifname, self.r.model(), self.w.services)
        lines += self.hop_lines
        if not lines:
            lines = [f"{self.ifname}: repair {op.describe()}" for op in self.ops
                     if not isinstance(op, _BOOKKEEPING)]
        return lines


# ---- describing a change ---------------------------------------------------------------

def diff_services(ifname: str, running: list[Service], wanted: list[Service]) -> list[str]:
    """Human lines for what changes from running to wanted."""
    out = []
    have = {s.name: s for s in running}
    want = {s.name: s for s in wanted}
    for name in sorted(have.keys() - want.keys()):
        out.append(f"{ifname}: - service {name}")
    for name in sorted(want.keys() - have.keys()):
        s = want[name]
        out.append(f"{ifname}: + service {name} -> "
                   + (", ".join(f"{b.endpoint} weight {b.weight}" for b in s.backends) or "no backends"))
    for name in sorted(want.keys() & have.keys()):
        out += _diff_service(f"{ifname}: service {name}", have[name], want[name])
    return out


def _diff_service(where: str, old: Service, new: Service) -> list[str]:
    out = []
    ob = {b.endpoint: b for b in old.backends}
    nb = {b.endpoint: b for b in new.backends}
    for ep in sorted(ob.keys() - nb.keys()):
        out.append(f"{where}: - backend {ep}")
    for ep in sorted(nb.keys() - ob.keys()):
        out.append(f"{where}: + backend {ep} weight {nb[ep].weight}")
    for ep in sorted(nb.keys() & ob.keys()):
        if ob[ep].weight != nb[ep].weight:
            out.append(f"{where}: ~ backend {ep} weight {ob[ep].weight} -> {nb[ep].weight}")
    if sorted(old.clients) != sorted(new.clients):
        fmt = lambda nets: ", ".join(map(str, nets)) or "any"  # noqa: E731
        out.append(f"{where}: ~ clients {fmt(old.clients)} -> {fmt(new.clients)}")
    if old.forward != new.forward:
        out.append(f"{where}: ~ forward {old.forward} -> {new.forward}")
    if old.not_allowed != new.not_allowed:
        out.append(f"{where}: ~ not_allowed {old.not_allowed} -> {new.not_allowed}")
    if old.ring_size != new.ring_size:
        out.append(f"{where}: ~ ring_size {old.ring_size} -> {new.ring_size}")
    if old.udp_timeout_s != new.udp_timeout_s:
        fmt = lambda t: f"{t} s" if t else "the interface's"  # noqa: E731
        out.append(f"{where}: ~ udp_timeout {fmt(old.udp_timeout_s)} -> {fmt(new.udp_timeout_s)}")
    return out


def diff_settings(ifname: str, old: Settings, new: Settings) -> list[str]:
    out = []
    pairs = [("snat", ",".join(map(str, old.snat_addrs)), ",".join(map(str, new.snat_addrs))),
             ("snat_ports", f"{old.snat_port_min}-{old.snat_port_max}", f"{new.snat_port_min}-{new.snat_port_max}"),
             ("encap_source", old.encap_source or "the SNAT address", new.encap_source or "the SNAT address"),
             ("encap_source (IPv6)", old.encap_source6 or "none", new.encap_source6 or "none"),
             ("seed", old.hash_seed, new.hash_seed),
             *[(f"timeouts.{key}", old.timeouts()[key], new.timeouts()[key]) for key in old.timeouts()]]
    for key, a, b in pairs:
        if a != b:
            out.append(f"{ifname}: ~ {key} {a} -> {b}")
    return out
