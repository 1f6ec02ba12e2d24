# SPDX-License-Identifier: Apache-2.0
"""DataPlane.sync on real maps, killed part way: after a failure between any two writes
a second sync finds what is left to do (and says so), the maps end as an uninterrupted
sync leaves them, and an open connection keeps its backend and SNAT source throughout.
Also: changing the hash seed or the SNAT range keeps established connections."""
from __future__ import annotations

import ctypes
import dataclasses
import ipaddress

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from xdplb import abi, plan
from xdplb.netlink import NextHop

from . import packets as P
from .conftest import LOOPBACK, SNAT_PORTS, XDP_PASS, XDP_TX, service

FIRST = SNAT_PORTS[0]


class Killed(Exception):
    pass


def maps_view(harness) -> dict:
    """What the maps hold, by name: services, settings, port flags and every ring slot
    as an endpoint (backend ids may differ between two routes to the same state)."""
    dp = harness.dp
    ids = dp.service_ids()
    endpoints = {be_id: endpoint for (_, endpoint), be_id in dp.backend_ids().items()}
    rings = {name: [endpoints.get(i) for i in dp.ring(svc_id)] for name, svc_id in ids.items()}
    cfg = dp._config()
    return {"services": dp.services(), "settings": dp.read_settings(), "rings": rings,
            "ports": bytes(dp.lib.array_values(dp.fds["xdplb_ports"], ctypes.c_uint8, abi.PORTS)),
            "seed": (cfg.hash_seed, cfg.flow_seed), "hop_gen": cfg.hop_gen}


def established(harness, sport: int) -> bytes:
    """Opens a connection from CLIENT:sport; returns where its SYN went."""
    action, out = harness.run(P.tcp(P.CLIENT, sport, P.VIP, 80, flags="S", smac=P.CLIENT_MAC, dmac=P.LB_MAC))
    assert action == XDP_TX
    return out


def next_segment(harness, sport: int) -> tuple[int, bytes]:
    return harness.run(P.tcp(P.CLIENT, sport, P.VIP, 80, flags="A", seq=1001, smac=P.CLIENT_MAC, dmac=P.LB_MAC))


def addresses(frame: bytes) -> tuple:
    """(source, destination, source port, destination port, destination MAC) of a TCP frame."""
    pkt = Ether(frame)
    return pkt[IP].src, pkt[IP].dst, pkt[TCP].sport, pkt[TCP].dport, pkt.dst


def same_flow(syn_out: bytes, ack_out: bytes) -> bool:
    """The ACK went to the same backend from the same SNAT source as the SYN."""
    return addresses(syn_out) == addresses(ack_out)


def small(svc):
    """A service with a small ring: many plans per test, each building Maglev rings in Python."""
    return dataclasses.replace(svc, ring_size=251)


BEFORE = [small(service(P.BACKEND, P.BACKEND2)), small(service("10.0.0.103", port=81))]
AFTER = [small(service(P.BACKEND, "10.0.0.103", weights=[2, 1])), small(service(P.BACKEND2, port=82, proto="udp"))]


def test_a_sync_killed_after_any_write_is_finished_by_the_next(harness):
    moved = dict(harness.hops)
    moved[P.BACKEND] = NextHop(LOOPBACK, "02:00:00:00:00:c1", P.LB_MAC)
    harness.sync(BEFORE)
    new_settings = dataclasses.replace(harness.settings, hash_seed=77, snat_port_min=21000, snat_port_max=21999)
    reference = None
    total = len(harness.dp.sync(plan.Wanted(new_settings, AFTER, moved), dry_run=True).ops)
    assert total > 10
    for cut in range(1, total + 1):
        harness.sync(BEFORE, dataclasses.replace(new_settings, hash_seed=harness.settings.hash_seed,
                                                 snat_port_min=SNAT_PORTS[0], snat_port_max=SNAT_PORTS[1]))
        p = harness.dp.sync(plan.Wanted(new_settings, AFTER, moved), dry_run=True)
        hop_gen = harness.dp._config().hop_gen

        def kill(i, cut=cut):
            if i + 1 == cut:
                raise Killed()
        if cut < len(p.ops):
            with pytest.raises(Killed):
                harness.dp.execute(p, after_each=kill)
            repair = harness.dp.sync(plan.Wanted(new_settings, AFTER, moved), "lo")
            assert repair.ops and repair.lines, f"cut after {cut}: the re-run saw nothing to do"
        else:
            harness.dp.execute(p)
        assert harness.dp.sync(plan.Wanted(new_settings, AFTER, moved), dry_run=True).ops == []
        view = maps_view(harness)
        assert view.pop("hop_gen") == hop_gen + 1, f"cut after {cut}: the moved next hop needs one new generation"
        reference = reference or view
        assert view == reference, f"cut after {cut} writes"


def test_an_open_connection_survives_an_interrupted_change_and_its_repair(harness):
    harness.configure([small(service(P.BACKEND))])
    syn_out = established(harness, 41000)
    wanted = plan.Wanted(harness.settings, BEFORE, harness.hops)
    p = harness.dp.sync(wanted, dry_run=True)
    for cut in range(1, len(p.ops)):
        harness.sync([small(service(P.BACKEND))])

        def kill(i, cut=cut):
            if i + 1 == cut:
                raise Killed()
        with pytest.raises(Killed):
            harness.dp.execute(harness.dp.sync(wanted, dry_run=True), after_each=kill)
        action, out = next_segment(harness, 41000)
        assert action == XDP_TX and same_flow(syn_out, out), f"cut after {cut}"
        harness.dp.sync(wanted)
        action, out = next_segment(harness, 41000)
        assert action == XDP_TX and same_flow(syn_out, out), f"repaired after cut {cut}"


def test_a_new_hash_seed_keeps_established_connections(harness):
    harness.configure([service(P.BACKEND, P.BACKEND2, "10.0.0.103")])
    opened = {sport: established(harness, sport) for sport in range(42000, 42032)}
    lines = harness.sync(settings=dataclasses.replace(harness.settings, hash_seed=harness.settings.hash_seed + 1)).lines
    assert lines == [f"lo: ~ seed {harness.settings.hash_seed - 1} -> {harness.settings.hash_seed}"]
    for sport, syn_out in opened.items():
        action, out = next_segment(harness, sport)
        assert action == XDP_TX and same_flow(syn_out, out), sport


def test_a_new_snat_range_keeps_established_connections_until_they_end(harness):
    harness.configure([service(P.BACKEND)])
    syn_out = established(harness, 43000)
    snat_port = addresses(syn_out)[2]
    assert SNAT_PORTS[0] <= snat_port <= SNAT_PORTS[1]
    harness.sync(settings=dataclasses.replace(harness.settings, snat_port_min=30000, snat_port_max=30999))
    # The backend's reply to the old SNAT port still reaches the client...
    reply = P.tcp(P.BACKEND, 80, P.SNAT, snat_port, flags="SA", seq=5000, ack=1001, smac=P.BACKEND_MAC, dmac=P.LB_MAC)
    action, out = harness.run(reply)
    assert action == XDP_TX and addresses(out)[2:4] == (80, 43000)
    # ... while new connections take the new range.
    new_out = established(harness, 43001)
    assert 30000 <= addresses(new_out)[2] <= 30999
    # Once the old flows are gone (here: reset by the control plane), the old range is released.
    be_id = harness.dp.backend_ids()[(0, f"{P.BACKEND}:80")]
    harness.dp.reset_flows(be_id)
    p = harness.sync()
    assert p.lines == ["lo: repair port flags"]
    action, _ = harness.run(reply)
    assert action == XDP_PASS
    assert ipaddress.IPv4Address(P.SNAT) in harness.dp.read_settings().snat_addrs
