# SPDX-License-Identifier: Apache-2.0
"""Two seeds and a check on the ring: the flow table hashes with flow_seed, fixed for
the table's life, so a new hash_seed (a new Maglev ring, `apply --seed`) leaves every
open flow where it is; and a ring slot naming a backend of another service is refused."""
from __future__ import annotations

import ctypes
import dataclasses
import os
import socket

from xdplb import abi, hashing
from xdplb.libbpf import libbpf

from . import packets as P
from .conftest import XDP_PASS, XDP_TX, service
from .test_forwarding import from_backend, syn, to_client

BACKENDS = {P.BACKEND: P.BACKEND_MAC, P.BACKEND2: P.BACKEND2_MAC, "10.0.0.103": "02:00:00:00:00:b3"}


def config(harness) -> abi.Config:
    cfg = abi.Config()
    libbpf().lookup(harness.dp.fds["xdplb_config"], ctypes.c_uint32(0), cfg)
    return cfg


def ring_pick(harness, sport: int, seed: int) -> str:
    """The backend address the service's ring gives a new flow from CLIENT:sport."""
    ring = harness.dp.ring(harness.dp.service_ids()[f"{P.VIP}:80/tcp"])
    by_id = {i: addr.split(":")[0] for (_, addr), i in harness.dp.backend_ids().items()}
    return by_id[ring[hashing.flow_hash(P.CLIENT, sport, P.VIP, 80, socket.IPPROTO_TCP, seed) % len(ring)]]


def test_open_flows_keep_their_backend_across_a_new_hash_seed(harness):
    harness.configure([service(*BACKENDS)])
    old_seed = harness.settings.hash_seed
    assert config(harness).flow_seed == old_seed  # a new table takes the hash seed
    opened = {}
    for sport in range(41000, 41040):
        action, out = harness.run(syn(sport=sport))
        assert action == XDP_TX
        opened[sport] = (P.Ether(out)[P.IP].dst, P.Ether(out)[P.TCP].sport)

    new_seed = old_seed ^ 0x9E3779B9
    harness.sync(settings=dataclasses.replace(harness.settings, hash_seed=new_seed))
    cfg = config(harness)
    assert (cfg.hash_seed, cfg.flow_seed) == (new_seed, old_seed)
    # The new ring would send some of the open flows elsewhere: they stay.
    assert [s for s, (addr, _) in opened.items() if ring_pick(harness, s, new_seed) != addr]
    for sport, (addr, snat_port) in opened.items():
        ack = P.tcp(P.CLIENT, sport, P.VIP, 80, flags="A", seq=1001)
        expected = P.tcp(P.SNAT, snat_port, addr, 80, flags="A", seq=1001, smac=P.LB_MAC, dmac=BACKENDS[addr],
                         ttl=63)
        assert harness.run(ack) == (XDP_TX, expected), sport
        reply = from_backend(snat_port, flags="A", backend=addr, mac=BACKENDS[addr])
        assert harness.run(reply) == (XDP_TX, to_client(sport, flags="A")), sport
    # New flows go where the new seed's ring says.
    for sport in range(42000, 42040):
        action, out = harness.run(syn(sport=sport))
        assert (action, P.Ether(out)[P.IP].dst) == (XDP_TX, ring_pick(harness, sport, new_seed)), sport
    assert harness.dp.counters()["no_flow"] == 0


def test_a_ring_naming_another_services_backend_is_refused(harness):
    """Service :80's ring replaced by the ring of service :8080 (as a ring written from
    the wrong snapshot would be): its new flows find no backend of their own, pass to
    the kernel untouched, and are counted; :8080 is not disturbed."""
    harness.configure([service(P.BACKEND), service(P.BACKEND2, port=8080)])
    ids = harness.dp.service_ids()
    lib, rings = libbpf(), harness.dp.fds["xdplb_rings"]
    inner = ctypes.c_uint32()
    assert lib.lookup(rings, ctypes.c_uint32(ids[f"{P.VIP}:8080/tcp"]), inner)
    fd = lib.check(lib.bpf_map_get_fd_by_id(inner.value), "open ring")
    try:
        lib.update(rings, ctypes.c_uint32(ids[f"{P.VIP}:80/tcp"]), ctypes.c_uint32(fd))
    finally:
        os.close(fd)

    assert harness.run(syn()) == (XDP_PASS, syn())
    counters = harness.dp.counters()
    assert (counters["backend_mismatch"], counters["no_backend"], counters["pass"], counters["new_flow"]) == \
        (1, 1, 1, 0)
    to_8080 = P.tcp(P.CLIENT, 40001, P.VIP, 8080, flags="S")
    expected = P.tcp(P.SNAT, 20000, P.BACKEND2, 80, flags="S", smac=P.LB_MAC, dmac=P.BACKEND2_MAC, ttl=63)
    assert harness.run(to_8080) == (XDP_TX, expected)
    assert harness.dp.counters()["backend_mismatch"] == 1
