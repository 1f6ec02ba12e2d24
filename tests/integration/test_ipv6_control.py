# SPDX-License-Identifier: Apache-2.0
"""IPv6 in the control plane, before the data plane balances it: the lab's hosts have
unique-local addresses, next hops come from the IPv6 route and neighbour tables (neighbour
discovery, as ARP for IPv4), and every kind of health check works over IPv6. A service
with an IPv6 address is still refused (see test_bad_input and control.family_problems)."""
from __future__ import annotations

import socket
import threading

from xdplb import health, lab, netlink
from xdplb.namespaces import run_in_netns

from .conftest import LB_NS, PREFIX, xdplb

HOSTS = {h.name: h for h in lab.hosts(PREFIX, 3, 2)}
BACKEND_A, BACKEND_B = HOSTS["backend-a"], HOSTS["backend-b"]


def _mac_in(namespace: str) -> str:
    return run_in_netns(namespace, lambda: netlink.get_link("eth0").mac)


def test_next_hops_of_ipv6_backends_come_from_neighbour_discovery(testlab):
    def resolve():
        eth0 = netlink.get_link("eth0")
        return eth0, netlink.resolve_next_hops([BACKEND_A.address6, BACKEND_B.address6, BACKEND_A.address])
    eth0, hops = run_in_netns(LB_NS, resolve)
    for host in (BACKEND_A, BACKEND_B):
        assert hops[host.address6] == netlink.NextHop(eth0.index, _mac_in(host.namespace), eth0.mac)
    assert hops[BACKEND_A.address] == hops[BACKEND_A.address6]  # one host, both families
    known = run_in_netns(LB_NS, lambda: netlink.next_hops_now([BACKEND_A.address6, "fd42:42::ff"]))
    assert list(known) == [BACKEND_A.address6]  # what the tables know now, without waiting
    assert run_in_netns(LB_NS, lambda: netlink.on_link_ifindex(BACKEND_B.address6)) == eth0.index


def test_an_ipv6_backend_nobody_answers_for_is_named(testlab):
    def resolve():
        return netlink.resolve_next_hops(["fd42:42::fe"])
    try:
        run_in_netns(LB_NS, resolve)
    except netlink.XdplbError as exc:
        assert str(exc) == ("backend fd42:42::fe: no neighbour discovery answer from fd42:42::fe on eth0; "
                            "check that it is up and reachable (ping fd42:42::fe)")
    else:
        raise AssertionError("an address nobody holds resolved")


def _udp_echo(address: str, ready: threading.Event, stop: threading.Event) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind((address, 5354))
        s.settimeout(0.1)
        ready.set()
        while not stop.is_set():
            try:
                data, peer = s.recvfrom(100)
            except socket.timeout:
                continue
            s.sendto(b"echo " + data, peer)


def test_every_kind_of_health_check_works_over_ipv6(testlab):
    """The lab server answers HTTP on IPv6 too; UDP is answered by an echo of this test's
    own in the backend's namespace."""
    ready, stop = threading.Event(), threading.Event()
    echo = threading.Thread(target=run_in_netns, args=(BACKEND_A.namespace, lambda: _udp_echo(
        BACKEND_A.address6, ready, stop)))
    echo.start()
    try:
        assert ready.wait(5)
        specs = {kind: health.parse_check("health", table, lambda *a: (_ for _ in ()).throw(AssertionError(a)))
                 for kind, table in {"tcp": {"type": "tcp"}, "http": {"type": "http", "path": "/"},
                                     "udp": {"type": "udp", "port": 5354, "send": "ping", "expect": "echo ping"},
                                     "command": {"type": "command",
                                                 "command": ["ping", "-6", "-c1", "-W2", "{address}"]}}.items()}

        def probe_all(address):
            return {kind: health.probe(spec, address, lab.HTTP_PORT) for kind, spec in specs.items()}
        up = run_in_netns(LB_NS, lambda: probe_all(BACKEND_A.address6))
        assert up == {"tcp": (True, "connected"), "http": (True, "HTTP 200"), "udp": (True, "answered"),
                      "command": (True, "exit status 0")}
        down = run_in_netns(LB_NS, lambda: probe_all("fd42:42::fd"))  # nobody holds it
        assert not any(ok for ok, _ in down.values()), down
    finally:
        stop.set()
        echo.join()


def test_the_lab_lists_both_addresses_of_each_host(testlab):
    out = xdplb("lab", "status", "--prefix", PREFIX).stdout
    for host in HOSTS.values():
        assert f"{host.address:12} {host.address6:16}" in out
