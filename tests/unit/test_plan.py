# SPDX-License-Identifier: Apache-2.0
"""The planner without root: plans computed from a model of the maps, carried out on
that model with the data plane's invariants checked after every write, then planned
again. A converged state plans no writes; a run cut after any write is finished by the
next plan."""
from __future__ import annotations

import ctypes
import dataclasses
import ipaddress

import pytest

from xdplb import abi, layout, plan
from xdplb.model import Backend, Service, Settings
from xdplb.netlink import NextHop

VIP = ipaddress.IPv4Address("10.0.0.2")
JIFFY = 4_000_000
SLOTS = 1 << 12


def addr(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def svc(port: int, *backends: str, weights=None, proto="tcp", ring_size=13, clients=()) -> Service:
    weights = weights or [1] * len(backends)
    return Service(VIP, port, proto, [Backend(addr(b), 80, w) for b, w in zip(backends, weights)],
                   [ipaddress.IPv4Network(c) for c in clients], ring_size)


def hops(*extra: str, moved=()) -> dict:
    out = {f"10.0.1.{i}": NextHop(2, f"02:00:00:00:01:{i:02x}", "02:00:00:00:00:01") for i in range(1, 9)}
    for a in moved:
        out[a] = NextHop(3, "02:00:00:00:09:09", "02:00:00:00:00:03")
    return out


SETTINGS = Settings(snat_addrs=[addr("10.0.0.2")], snat_port_min=20000, snat_port_max=20999)


def empty() -> plan.Running:
    return plan.Running(config=None, flow_slots=SLOTS, jiffy_ns=JIFFY)


class Model:
    """The maps as the planner sees them, changed write by write as DataPlane.execute
    changes the real ones, with the ring contents kept to check what the data plane
    could read between two writes."""

    def __init__(self, running: plan.Running):
        self.r = running
        self.ring_slots: dict[int, list[int]] = {}  # service id -> backend id per slot

    def copy(self) -> "Model":
        r = self.r
        m = Model(dataclasses.replace(
            r, services={k: abi.Service.from_buffer_copy(v) for k, v in r.services.items()},
            backends={k: abi.Backend.from_buffer_copy(v) for k, v in r.backends.items()},
            clients={k: set(v) for k, v in r.clients.items()}, rings=dict(r.rings),
            config=abi.Config.from_buffer_copy(r.config) if r.config is not None else None))
        m.ring_slots = {k: list(v) for k, v in self.ring_slots.items()}
        return m

    def write(self, op) -> None:
        r = self.r
        if isinstance(op, plan.SetPorts):
            r.ports = op.flags
        elif isinstance(op, plan.SetConfig):
            r.config = abi.Config.from_buffer_copy(op.value)
        elif isinstance(op, plan.SetServiceTable):
            r.services = {k: abi.Service.from_buffer_copy(v) for k, v in op.entries.items()}
        elif isinstance(op, plan.DeleteRing):
            del r.rings[op.service_id]
            self.ring_slots.pop(op.service_id, None)
        elif isinstance(op, plan.SetRing):
            r.rings[op.service_id] = op.values[layout.RING_DIGEST_ENTRY] >> layout.RING_DIGEST_SHIFT
            assert r.rings[op.service_id] == op.digest
            self.ring_slots[op.service_id] = layout.unpack_ring(op.values, op.size)
        elif isinstance(op, plan.SetClients):
            rules = r.clients.setdefault(op.service_id, set())
            rules -= set(op.remove)
            rules |= set(op.add)
            if not rules:
                del r.clients[op.service_id]
        elif isinstance(op, plan.SetBackend):
            r.backends[op.backend_id] = abi.Backend.from_buffer_copy(op.value)
        elif isinstance(op, plan.ClearBackend):
            del r.backends[op.backend_id]
        elif isinstance(op, plan.MarkHopsPending):
            r.config.flags |= abi.ConfigFlags.HOPS_PENDING
        elif isinstance(op, plan.BumpHopGen):
            r.config.hop_gen += 1
            r.config.flags &= ~int(abi.ConfigFlags.HOPS_PENDING)
        else:
            assert isinstance(op, (plan.ZeroStats, plan.StartCursor, plan.RememberCursors)), op
        self.check()

    def check(self) -> None:
        """What a packet could see between two writes is consistent: every service in the
        table has its port flagged and a ring, and its ring names only live backends of
        that very service."""
        r = self.r
        for (vip, port, proto), value in r.services.items():
            flag = abi.PortFlags.TCP_SERVICE if proto == "tcp" else abi.PortFlags.UDP_SERVICE
            assert r.ports[port] & flag, f"service port {port} not flagged"
            assert value.id in r.rings, f"service {port} visible without a ring"
            for be_id in set(self.ring_slots.get(value.id, ())) - {abi.NO_BACKEND}:
                b = r.backends.get(be_id)
                assert b is not None and b.service_id == value.id, f"ring of {port} names backend {be_id}"
        if r.config is not None:
            lo, hi = r.config.snat_port_min, r.config.snat_port_max
            assert all(r.ports[p] & abi.PortFlags.SNAT for p in range(lo, hi + 1)), "SNAT port unflagged"

    def run(self, p: plan.Plan, stop_after: int | None = None) -> "Model":
        for i, op in enumerate(p.ops):
            if stop_after is not None and i >= stop_after:
                break
            self.write(op)
        return self


def converged(wanted: plan.Wanted, start: Model | None = None) -> Model:
    m = start or Model(empty())
    m.run(plan.make(m.r, wanted, "eth0"))
    again = plan.make(m.r, wanted, "eth0")
    assert again.ops == [] and again.lines == [], again
    return m


def kinds(p: plan.Plan) -> list[str]:
    return [type(op).__name__ for op in p.ops]


def test_first_plan_builds_everything_in_order():
    wanted = plan.Wanted(SETTINGS, [svc(80, "10.0.1.1", "10.0.1.2")], hops())
    p = plan.make(empty(), wanted, "eth0")
    assert kinds(p) == ["SetPorts", "SetConfig", "ZeroStats", "ZeroStats", "StartCursor", "SetBackend",
                        "ZeroStats", "StartCursor", "SetBackend", "SetRing", "SetServiceTable"]
    assert p.lines == ["eth0: + service 10.0.0.2:80/tcp -> 10.0.1.1:80 weight 1, 10.0.1.2:80 weight 1"]
    converged(wanted)


@pytest.mark.parametrize("change", ["add", "remove", "drain", "weight", "seed", "snat_range", "service_add",
                                    "service_del", "clients", "ring_size", "next_hop"])
def test_each_change_converges_and_touches_only_what_it_must(change):
    before = plan.Wanted(SETTINGS, [svc(80, "10.0.1.1", "10.0.1.2"), svc(81, "10.0.1.3")], hops())
    m = converged(before)
    services = [svc(80, "10.0.1.1", "10.0.1.2"), svc(81, "10.0.1.3")]
    settings, next_hops = SETTINGS, hops()
    if change == "add":
        services[0] = svc(80, "10.0.1.1", "10.0.1.2", "10.0.1.4")
    elif change == "remove":
        services[0] = svc(80, "10.0.1.1")
    elif change == "drain":
        services[0] = svc(80, "10.0.1.1", "10.0.1.2", weights=[1, 0])
    elif change == "weight":
        services[0] = svc(80, "10.0.1.1", "10.0.1.2", weights=[1, 3])
    elif change == "seed":
        settings = dataclasses.replace(SETTINGS, hash_seed=7)
    elif change == "snat_range":
        settings = dataclasses.replace(SETTINGS, snat_port_min=30000, snat_port_max=30999)
    elif change == "service_add":
        services.append(svc(82, "10.0.1.5"))
    elif change == "service_del":
        services = services[:1]
    elif change == "clients":
        services[1] = svc(81, "10.0.1.3", clients=["10.9.0.0/16"])
    elif change == "ring_size":
        services[1] = svc(81, "10.0.1.3", ring_size=17)
    elif change == "next_hop":
        next_hops = hops(moved=["10.0.1.3"])
    wanted = plan.Wanted(settings, services, next_hops)
    p = plan.make(m.r, wanted, "eth0")
    rings = [op.name for op in p.ops if isinstance(op, plan.SetRing)]
    expected_rings = {"add": ["10.0.0.2:80/tcp"], "remove": ["10.0.0.2:80/tcp"], "drain": ["10.0.0.2:80/tcp"],
                      "weight": ["10.0.0.2:80/tcp"], "seed": ["10.0.0.2:80/tcp", "10.0.0.2:81/tcp"],
                      "snat_range": [], "service_add": ["10.0.0.2:82/tcp"], "service_del": [], "clients": [],
                      "ring_size": ["10.0.0.2:81/tcp"], "next_hop": []}
    assert rings == expected_rings[change]
    assert ("BumpHopGen" in kinds(p)) == (change == "next_hop")
    assert p.lines
    converged(wanted, m)


def test_lines_say_what_changes():
    m = converged(plan.Wanted(SETTINGS, [svc(80, "10.0.1.1", "10.0.1.2")], hops()))
    wanted = plan.Wanted(dataclasses.replace(SETTINGS, hash_seed=9),
                         [svc(80, "10.0.1.1", "10.0.1.4", weights=[2, 1])], hops(moved=["10.0.1.1"]))
    assert plan.make(m.r, wanted, "eth0").lines == [
        "eth0: ~ seed 24301 -> 9",
        "eth0: service 10.0.0.2:80/tcp: - backend 10.0.1.2:80",
        "eth0: service 10.0.0.2:80/tcp: + backend 10.0.1.4:80 weight 1",
        "eth0: service 10.0.0.2:80/tcp: ~ backend 10.0.1.1:80 weight 1 -> 2",
        "eth0: backend 10.0.1.1:80 next hop 02:00:00:00:01:01 (if 2) -> 02:00:00:00:09:09 (if 3)",
    ]


CHANGES = [
    (plan.Wanted(SETTINGS, [svc(80, "10.0.1.1", "10.0.1.2"), svc(81, "10.0.1.3")], hops()),
     plan.Wanted(dataclasses.replace(SETTINGS, hash_seed=3, snat_port_min=21000, snat_port_max=21999),
                 [svc(81, "10.0.1.3", "10.0.1.4", clients=["10.9.0.0/16"]), svc(82, "10.0.1.5", "10.0.1.1", proto="udp")],
                 hops(moved=["10.0.1.3"]))),
    (plan.Wanted(SETTINGS, [svc(80, "10.0.1.1")], hops()),
     plan.Wanted(SETTINGS, [svc(80, "10.0.1.2", "10.0.1.3"), svc(83, "10.0.1.1")], hops())),
    (plan.Wanted(SETTINGS, [svc(80, "10.0.1.1", "10.0.1.2", clients=["10.1.0.0/16"])], hops()),
     plan.Wanted(SETTINGS, [], hops())),
]


@pytest.mark.parametrize("before,after", CHANGES)
def test_an_interrupted_run_is_finished_by_the_next_plan(before, after):
    """Cut after every write in turn: the maps stay consistent for packets, and a plan
    from what they then hold leads to exactly where the uninterrupted run leads."""
    start = converged(before)
    full = start.copy().run(plan.make(start.r, after, "eth0"))
    n = len(plan.make(start.r, after, "eth0").ops)
    assert n > 3
    for cut in range(n):
        m = start.copy().run(plan.make(start.r, after, "eth0"), stop_after=cut)
        p = plan.make(m.r, after, "eth0")
        assert p.ops, f"cut after {cut} writes: nothing left to do?"
        assert p.lines, f"cut after {cut} writes: a repair must be reported"
        m.run(p)
        assert plan.make(m.r, after, "eth0").ops == []
        assert _same(m, full), f"cut after {cut} writes"


def _same(a: Model, b: Model) -> bool:
    """The same services, settings, port flags and rings (slot by slot, as endpoints):
    backend and cursor ids may differ, as a re-run does not reuse ids that half-written
    entries hold until it clears them."""
    return (a.r.model() == b.r.model() and bytes(a.r.config) == bytes(b.r.config) and a.r.ports == b.r.ports
            and _rings(a) == _rings(b))


def _rings(m: Model) -> dict:
    names = {v.id: key for key, v in m.r.services.items()}
    return {names[svc_id]: [layout.endpoint_of(m.r.backends[i]) if i != abi.NO_BACKEND else None for i in slots]
            for svc_id, slots in m.ring_slots.items()}


def test_an_old_snat_range_stays_flagged_while_flows_use_it():
    m = converged(plan.Wanted(SETTINGS, [svc(80, "10.0.1.1")], hops()))
    moved = plan.Wanted(dataclasses.replace(SETTINGS, snat_port_min=30000, snat_port_max=30999),
                        [svc(80, "10.0.1.1")], hops())
    assert plan.needs_held_ports(m.r, moved)
    m.r.held_ports = frozenset({20005, 20777})
    m.run(plan.make(m.r, moved, "eth0"))
    snat = abi.PortFlags.SNAT
    assert [p for p in range(65536) if m.r.ports[p] & snat and not 30000 <= p <= 30999] == [20005, 20777]
    # Once those flows are gone, the next plan unflags them.
    m.r.held_ports = frozenset()
    p = plan.make(m.r, moved, "eth0")
    assert kinds(p) == ["SetPorts"] and p.lines == ["eth0: repair port flags"]
    m.run(p)
    assert not plan.needs_held_ports(m.r, moved)


def test_the_flow_seed_outlives_a_new_hash_seed():
    m = converged(plan.Wanted(SETTINGS, [svc(80, "10.0.1.1")], hops()))
    first = m.r.config.flow_seed
    m.run(plan.make(m.r, plan.Wanted(dataclasses.replace(SETTINGS, hash_seed=99), [svc(80, "10.0.1.1")], hops())))
    assert (m.r.config.hash_seed, m.r.config.flow_seed) == (99, first)


def test_too_many_services_is_refused_before_any_write():
    wanted = plan.Wanted(SETTINGS, [svc(p, "10.0.1.1") for p in range(1, abi.MAX_SERVICES + 2)], hops())
    with pytest.raises(plan.UsageError, match="at most 512"):
        plan.make(empty(), wanted)


def test_ring_digest_lives_outside_the_slots_the_data_plane_reads():
    s = svc(80, "10.0.1.1", "10.0.1.2", ring_size=abi.RING_SLOTS)
    values, digest = layout.ring_values(s, {"10.0.1.1:80": 0, "10.0.1.2:80": 1}, 5)
    slots = layout.unpack_ring(values, abi.RING_SLOTS)
    assert set(slots) == {0, 1}
    assert values[layout.RING_DIGEST_ENTRY] >> layout.RING_DIGEST_SHIFT == digest != 0
    assert ctypes.sizeof(values) == abi.RING_ENTRIES * 8
