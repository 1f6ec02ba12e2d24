# SPDX-License-Identifier: Apache-2.0
"""Flows in the lab while the backend set changes, and a UDP service."""
from __future__ import annotations

import collections
import socket
import threading
import time

from .conftest import (BACKENDS, CLIENT2_NS, CLIENT_NS, LB_NS, NAMES, VIP, NsThread, get, in_ns,
                       keepalive_client, xdplb)

CLIENTS_PER_NS = 25


def test_fifty_keepalive_clients_while_backends_change(attached):
    """50 keep-alive connections from two namespaces keep working while backend c is
    added and backend a is drained (weight 0): no request fails, no connection moves,
    and a receives no new connection once drained."""
    stop = threading.Event()

    def clients():
        out: list = []
        workers = [threading.Thread(target=lambda: out.append(keepalive_client(100_000, 0.01, stop)))
                   for _ in range(CLIENTS_PER_NS)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        return out

    runners = [NsThread(ns, clients) for ns in (CLIENT_NS, CLIENT2_NS)]
    for r in runners:
        r.start()
    time.sleep(1.5)
    a, b, c = BACKENDS
    xdplb("-n", LB_NS, "attach", "eth0", "--backends", f"{a},{b},{c}", "--flows", "65536")
    time.sleep(1.5)
    xdplb("-n", LB_NS, "attach", "eth0", "--backends", f"{a}=0,{b},{c}", "--flows", "65536")
    time.sleep(0.5)
    fresh = in_ns(CLIENT_NS, lambda: collections.Counter(get() for _ in range(60)))
    time.sleep(1.0)
    stop.set()
    for r in runners:
        r.join(120)
        assert r.error is None
    results = [res for r in runners for res in r.result]
    assert len(results) == 2 * CLIENTS_PER_NS
    assert sum(len(res.errors) for res in results) == 0, [res.errors for res in results if res.errors]
    for res in results:
        assert len(res.backends) > 50
        assert len(set(res.backends)) == 1
    # The long connections started on a and b and stayed there, a included.
    assert {res.backends[0] for res in results} == {NAMES[a], NAMES[b]}
    assert NAMES[a] not in fresh and set(fresh) == {NAMES[b], NAMES[c]}


def test_udp_service_is_balanced_per_flow(attached):
    xdplb("-n", LB_NS, "attach", "eth0", "--backends", ",".join(BACKENDS[:2]), "--proto", "udp",
          "--port", "5353", "--flows", "65536")

    def flows():
        answers = []
        for i in range(40):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.connect((VIP, 5353))
                seen = set()
                for j in range(3):
                    s.send(f"flow {i} datagram {j}".encode())
                    reply = s.recv(2048).decode()
                    assert reply.endswith(f"flow {i} datagram {j}")
                    seen.add(reply.split(" ")[0])
                answers.append(seen)
        return answers

    answers = in_ns(CLIENT_NS, flows)
    assert all(len(seen) == 1 for seen in answers)
    assert set().union(*answers) == {NAMES[BACKENDS[0]], NAMES[BACKENDS[1]]}
    # The TCP service on port 80 is still there beside it.
    assert in_ns(CLIENT_NS, get).startswith("backend-")
