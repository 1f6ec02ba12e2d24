# SPDX-License-Identifier: Apache-2.0
"""End to end in the lab: real HTTP servers, real clients, the CLI as a subprocess."""
from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xdplb import lab
from xdplb.lab import stop_process as stop

from .conftest import (BACKENDS, CLIENT2_NS, CLIENT_NS, LB_NS, NAMES, NsThread, VIP, get, in_ns, lb_counters,
                       keepalive_client, start_server, xdp_on, xdplb)

PINS = Path("/sys/fs/bpf/xdplb")


def test_200_requests_all_answered_by_both_backends(attached):
    seen = in_ns(CLIENT_NS, lambda: collections.Counter(get() for _ in range(200)))
    assert sum(seen.values()) == 200
    assert set(seen) == {NAMES[BACKENDS[0]], NAMES[BACKENDS[1]]}
    assert min(seen.values()) >= 60, seen  # fair share: 100 +- 3 standard deviations


def test_curl_through_the_vip(attached):
    out = subprocess.run(["ip", "netns", "exec", CLIENT_NS, "curl", "-sS", "-m", "5", f"http://{VIP}/"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("hello from backend-")


def test_each_keepalive_connection_stays_on_one_backend(attached):
    results = in_ns(CLIENT_NS, lambda: [keepalive_client(50) for _ in range(8)])
    for r in results:
        assert not r.errors
        assert len(r.backends) == 50
        assert len(set(r.backends)) == 1


def test_two_client_namespaces_at_once(attached):
    threads = [NsThread(ns, lambda: [get() for _ in range(100)]) for ns in (CLIENT_NS, CLIENT2_NS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert t.error is None, lb_counters()
        assert len(t.result) == 100


def test_lb_host_keeps_its_other_ports_and_gets_the_vip_back_after_detach(testlab, tmp_path):
    (tmp_path / "index.html").write_text("the load balancer itself\n")
    own_80 = start_server(LB_NS, 80, str(tmp_path))
    own_8080 = start_server(LB_NS, 8080, str(tmp_path))
    try:
        xdplb("-n", LB_NS, "attach", "eth0", "--backends", ",".join(BACKENDS[:2]), "--flows", "65536")
        assert in_ns(CLIENT_NS, get).startswith("backend-")
        # The host's other port is untouched while attached...
        assert "the load balancer itself" in in_ns(CLIENT_NS, lambda: _body(8080))
        # ...and so is ping and ARP (ping needs ARP first).
        subprocess.run(["ip", "netns", "exec", CLIENT_NS, "ping", "-c", "1", "-W", "2", VIP], check=True,
                       capture_output=True)
        xdplb("-n", LB_NS, "detach", "eth0")
        assert "the load balancer itself" in in_ns(CLIENT_NS, lambda: _body(80))
        assert "prog/xdp" not in xdp_on(LB_NS)
        assert not (PINS / LB_NS).exists()
    finally:
        xdplb("-n", LB_NS, "detach", "eth0", check=False)
        stop(own_80)
        stop(own_8080)


def _body(port: int) -> str:
    import http.client
    conn = http.client.HTTPConnection(VIP, port, timeout=5)
    conn.request("GET", "/")
    body = conn.getresponse().read().decode()
    conn.close()
    return body


@pytest.mark.parametrize("how", ["-n", "ip netns exec"])
def test_attach_status_trace_detach_both_ways(testlab, how):
    def run(*args, check=True):
        if how == "-n":
            return xdplb("-n", LB_NS, *args, check=check)
        return xdplb(*args, exec_in=LB_NS, check=check)

    # As `xdplb lab up` says: the lab prepares its veths for native XDP.
    out = run("attach", "eth0", "--mode", "native", "--backends", ",".join(BACKENDS[:2]), "--flows", "65536").stdout
    assert "attached to eth0" in out and "native mode" in out
    try:
        assert "prog/xdp" in xdp_on(LB_NS)
        assert (PINS / LB_NS / "eth0" / "xdplb_flows").exists()
        in_ns(CLIENT_NS, get)
        status = json.loads(run("status", "--json").stdout)
        assert len(status) == 1 and status[0]["interface"] == "eth0"
        svc = status[0]["services"][0]
        assert svc["vip"] == VIP and svc["port"] == 80 and svc["new_flows"] >= 1
        assert sorted(b["address"] for b in svc["backends"]) == BACKENDS[:2]
        human = run("status", "eth0").stdout
        assert f"service {VIP}:80/tcp" in human

        cmd = [sys.executable, "-m", "xdplb", "trace", "eth0", "--duration", "4"]
        cmd = ["ip", "netns", "exec", LB_NS, *cmd] if how != "-n" else cmd[:3] + ["-n", LB_NS] + cmd[3:]
        tracer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        in_ns(CLIENT_NS, get)
        out, err = tracer.communicate(timeout=20)
        assert tracer.returncode == 0, err
        lines = out.splitlines()
        assert any(" new backend " in l and "[S]" in l and l.endswith("TX") for l in lines), out
        assert any(" reply backend " in l for l in lines), out
        # Tracing is off again afterwards.
        assert json.loads(run("status", "--json").stdout)[0]["trace"] is False
    finally:
        out = run("detach", "eth0").stdout
    assert "detached xdplb" in out
    assert "prog/xdp" not in xdp_on(LB_NS)
    assert not (PINS / LB_NS).exists()
    again = run("detach", "eth0")
    assert again.returncode == 0 and "nothing attached" in again.stdout


def test_reattach_updates_in_place_and_keeps_connections(attached):
    before = json.loads(xdplb("-n", LB_NS, "status", "--json").stdout)[0]["program_id"]
    results: list = []

    def client():
        import threading
        stop_event = threading.Event()
        t = threading.Thread(target=lambda: results.append(keepalive_client(10_000, 0.01, stop_event)))
        t.start()
        time.sleep(0.5)
        xdplb("-n", LB_NS, "attach", "eth0", "--backends", BACKENDS[2], "--flows", "65536")
        time.sleep(0.5)
        fresh = [get() for _ in range(10)]
        stop_event.set()
        t.join(10)
        return fresh

    fresh = in_ns(CLIENT_NS, client)
    after = json.loads(xdplb("-n", LB_NS, "status", "--json").stdout)[0]
    assert after["program_id"] == before
    assert [b["address"] for b in after["services"][0]["backends"]] == [BACKENDS[2]]
    assert set(fresh) == {NAMES[BACKENDS[2]]}
    (r,) = results
    assert not r.errors and len(r.backends) > 20
    assert len(set(r.backends)) == 1 and r.backends[0] != NAMES[BACKENDS[2]]


def netstat(ns: str) -> dict:
    text = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "cat", "/proc/net/netstat"], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    out = {}
    for names, values in zip(text[::2], text[1::2]):
        prefix = names.split(":")[0]
        out.update({f"{prefix}.{k}": int(v) for k, v in zip(names.split()[1:], values.split()[1:])})
    return out


def time_wait_ports(ns: str, peer: str) -> set[int]:
    """The ports of `peer` that this namespace holds TIME_WAIT entries for."""
    text = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "ss", "-Htan", "state", "time-wait"],
                          capture_output=True, text=True, check=True).stdout
    out = set()
    for line in text.splitlines():
        addr, _, port = line.split()[-1].rpartition(":")
        if addr == peer:
            out.add(int(port))
    return out


def test_thousands_of_short_connections_without_syn_retransmits(testlab):
    """Port allocation never lands a new flow on a backend's TIME_WAIT tuple (PAWS
    would drop the SYN and the client would retransmit after a second). Two clients
    take turns: their TCP timestamps come from different clocks, so a tuple of one
    reused for the other is what PAWS rejects. The range is one no other test uses."""
    xdplb("-n", LB_NS, "attach", "eth0", "--backends", ",".join(BACKENDS[:2]), "--flows", "65536",
          "--snat-ports", "61000-65535")
    try:
        before = {ns: netstat(ns)["TcpExt.TCPSynRetrans"] for ns in (CLIENT_NS, CLIENT2_NS)}
        threads = [NsThread(ns, lambda: [get() for _ in range(1500)]) for ns in (CLIENT_NS, CLIENT2_NS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
            assert t.error is None and len(t.result) == 1500
        for ns in (CLIENT_NS, CLIENT2_NS):
            assert netstat(ns)["TcpExt.TCPSynRetrans"] - before[ns] == 0, ns
    finally:
        xdplb("-n", LB_NS, "detach", "eth0")


def test_the_lbs_own_connections_and_balanced_flows_at_the_same_time(attached):
    """The load balancer's own TCP (an admin's requests to a backend) shares its address
    with the SNAT'd flows; its ephemeral ports are outside the SNAT range, so neither
    kind disturbs the other."""
    own = NsThread(LB_NS, lambda: [get(BACKENDS[0]) for _ in range(300)])
    balanced = NsThread(CLIENT_NS, lambda: [get() for _ in range(300)])
    for t in (own, balanced):
        t.start()
    for t in (own, balanced):
        t.join(120)
        assert t.error is None and len(t.result) == 300
    assert set(own.result) == {NAMES[BACKENDS[0]]}


def test_a_new_program_gives_out_snat_ports_where_the_last_one_stopped(testlab):
    """The backends still hold TIME_WAIT entries for the ports the previous program gave
    out. Three attach, 20 connections, detach rounds, with the two clients taking turns
    (their TCP timestamps come from different clocks, so a reused tuple is rejected by
    PAWS): each backend's ports form one unbroken run across the rounds, every
    connection is one new flow, and no SYN is rejected or retried."""
    lo, hi = 5000, 5999  # a range no other test uses
    backend_ns = {b: f"{LB_NS.rsplit('-', 1)[0]}-backend-{c}" for b, c in zip(BACKENDS[:2], "ab")}
    tw_before = {b: time_wait_ports(ns, VIP) for b, ns in backend_ns.items()}
    paws_before = sum(netstat(ns)["TcpExt.PAWSTimewait"] for ns in backend_ns.values())
    retrans_before = {ns: netstat(ns)["TcpExt.TCPSynRetrans"] for ns in (CLIENT_NS, CLIENT2_NS)}
    answered = collections.Counter()
    for client in (CLIENT2_NS, CLIENT_NS, CLIENT2_NS):
        xdplb("-n", LB_NS, "attach", "eth0", "--backends", ",".join(BACKENDS[:2]), "--flows", "65536",
              "--snat-ports", f"{lo}-{hi}")
        try:
            names = in_ns(client, lambda: [get() for _ in range(20)])
            assert lb_counters().get("new_flow") == 20, lb_counters()
        finally:
            xdplb("-n", LB_NS, "detach", "eth0")
        answered.update(names)
    assert sum(netstat(ns)["TcpExt.PAWSTimewait"] for ns in backend_ns.values()) == paws_before
    for ns in (CLIENT_NS, CLIENT2_NS):
        assert netstat(ns)["TcpExt.TCPSynRetrans"] == retrans_before[ns], ns
    span = hi - lo + 1
    for backend, ns in backend_ns.items():
        # Not every connection leaves a TIME_WAIT on the backend (measured: 26 of 36 at
        # worst, when the client's close crosses the backend's). A port given out twice
        # would meet its TIME_WAIT and be rejected (PAWS, checked above), so the count is
        # only a sanity bound; the run below is the point.
        ports = time_wait_ports(ns, VIP) - tw_before[backend]
        served = answered[NAMES[backend]]
        assert served // 2 <= len(ports) <= served
        window = min(max((q - p) % span for q in ports) + 1 for p in ports)
        assert window <= served, f"{backend}: ports {sorted(ports)} are not one run"


def test_a_pool_of_snat_addresses_is_used_in_turn(testlab):
    """With two SNAT addresses every backend sees connections from both, alternately
    (twice the tuples before a TIME_WAIT one comes round again), and each one works;
    switching to the pool does not walk into the TIME_WAIT left by the single address."""
    extra = str(lab.SUBNET[250])
    subprocess.run(["ip", "-n", LB_NS, "addr", "add", f"{extra}/24", "dev", "eth0"], check=True)
    backend_ns = {b: f"{LB_NS.rsplit('-', 1)[0]}-backend-{c}" for b, c in zip(BACKENDS[:2], "ab")}
    before = {(b, peer): time_wait_ports(ns, peer) for b, ns in backend_ns.items() for peer in (VIP, extra)}
    paws_before = sum(netstat(ns)["TcpExt.PAWSTimewait"] for ns in backend_ns.values())
    try:
        stray = str(lab.SUBNET[251])
        out = xdplb("-n", LB_NS, "attach", "eth0", "--backends", ",".join(BACKENDS[:2]), "--flows", "65536",
                    "--snat", f"{VIP},{stray}").stdout
        try:
            assert f"SNAT address {stray} is not an address of this host" in out
            assert VIP + " is not" not in out
            out = xdplb("-n", LB_NS, "attach", "eth0", "--backends", ",".join(BACKENDS[:2]),
                        "--snat", f"{VIP},{extra}").stdout
            assert "is not an address" not in out
            status = json.loads(xdplb("-n", LB_NS, "status", "eth0", "--json").stdout)[0]
            assert status["snat"]["addresses"] == [VIP, extra]
            names = in_ns(CLIENT_NS, lambda: [get() for _ in range(40)])
            assert lb_counters().get("new_flow") == 40
        finally:
            xdplb("-n", LB_NS, "detach", "eth0")
    finally:
        subprocess.run(["ip", "-n", LB_NS, "addr", "del", f"{extra}/24", "dev", "eth0"], check=True)
    # The pool went on with the ports earlier tests' single address left off at.
    assert sum(netstat(ns)["TcpExt.PAWSTimewait"] for ns in backend_ns.values()) == paws_before
    for backend, ns in backend_ns.items():
        used = {peer: time_wait_ports(ns, peer) - before[(backend, peer)] for peer in (VIP, extra)}
        served = names.count(NAMES[backend])
        # A connection the client closes first leaves no TIME_WAIT on the backend; how often
        # depends on timing (14 of 20 seen): a bound only, PAWS above is the real check.
        total = len(used[VIP]) + len(used[extra])
        assert served // 2 <= total <= served, used
        assert abs(len(used[VIP]) - len(used[extra])) <= 1 + served - total, used  # alternately
