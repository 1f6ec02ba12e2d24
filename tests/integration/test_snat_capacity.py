# SPDX-License-Identifier: Apache-2.0
"""How many connections full NAT sustains: a SNAT source (address, port) towards a
backend is given to a new flow again as soon as the backend would accept the new SYN on
it (RFC 6191), and a handshake nobody completes holds its source only for
`timeouts.tcp_syn` (5 s by default). A pool that never gives a closing flow's source
back runs dry after (addresses x ports) connections per backend and then drops every
SYN, which only a run longer than the pool's life shows."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import require
from xdplb import cli, lab

from .conftest import BACKENDS, CLIENT_NS, LB_NS, NAMES, PREFIX, VIP, get, in_ns, lb_counters, xdplb

pytestmark = [pytest.mark.root, pytest.mark.integration]

A, B = BACKENDS[:2]
BACKEND_NS = {A: f"{PREFIX}-backend-a", B: f"{PREFIX}-backend-b"}

# The sustained run: nginx on the backends (the lab's Python servers manage about 1,000
# new connections per second and leave HTTP/1.1 connections open after a
# `Connection: close` request, which wrk counts as read errors), on ports no other test
# uses, through the default SNAT range (10000-32767: nginx goes through it several
# times per backend in the run).
SUSTAIN_S = 60
CONNECTIONS = 32
HTTP_PORT = 8088
STATUS_PORT = 8089  # stub_status, on each backend's loopback

# The flood: 2000 SYNs from addresses of the lab's subnet that no host owns (clients
# are .10-.18, backends .101-.126; other tests add .250 and .251), against a pool of
# 256 ports per backend in a range no other test uses.
FLOOD_SYNS = 2000
FLOOD_SOURCES = [str(lab.SUBNET[i]) for i in range(150, 250)]
FLOOD_SNAT_PORTS = (6000, 6255)
SYN_TIMEOUT_S = 5  # timeouts.tcp_syn's default
RECOVERY_S = 12  # after the flood: tcp_syn plus room for the backends' SYN-ACK retries


def nsenter(netns: str, *cmd: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}", *cmd]


def tcp_counters(netns: str) -> dict[str, int]:
    """A namespace's TCP counters (TcpExtTCPSynRetrans, TcpActiveOpens, ...): in
    /proc/net/netstat and /proc/net/snmp each group is a line of names and a line of values."""
    text = subprocess.run(nsenter(netns, "cat", "/proc/net/netstat", "/proc/net/snmp"), capture_output=True,
                          text=True, check=True).stdout.splitlines()
    out = {}
    for names, values in zip(text[::2], text[1::2]):
        group, *keys = names.split()
        out.update({group.rstrip(":") + k: int(v) for k, v in zip(keys, values.split()[1:])})
    return out


def tcp_changes(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The TCP counters that tell why a connection or a SYN was lost, where they moved."""
    telling = re.compile(r"PAWS|Listen|Rst|Challenge|TW|Retrans|Timeouts|Drop|Reject|AttemptFails|Skipped|Syncookies")
    return {k: v - before.get(k, 0) for k, v in after.items() if telling.search(k) and v != before.get(k, 0)}


def softnet_drops() -> int:
    """Frames the kernel dropped for a full backlog queue (all CPUs; the lab's veths use it)."""
    lines = Path("/proc/net/softnet_stat").read_text().splitlines()
    return sum(int(line.split()[1], 16) for line in lines)


def stats_cli() -> dict:
    """`xdplb stats eth0 --json` on the load balancer, as a user runs it."""
    (entry,) = json.loads(xdplb("-n", LB_NS, "stats", "eth0", "--json", "--interval", "0").stdout)
    return entry


def stats_fast() -> dict:
    """The same through the CLI in-process (no interpreter start-up), for reads that must
    land within a second or two of an event."""
    r = in_ns(LB_NS, lambda: CliRunner().invoke(cli.main, ["stats", "eth0", "--json", "--interval", "0"]))
    assert r.exit_code == 0, r.output
    (entry,) = json.loads(r.output)
    return entry


def grew(before: dict, after: dict) -> dict:
    """Counters that changed between two stats entries (names missing before count from 0)."""
    a, b = before["counters"], after["counters"]
    return {k: v - a.get(k, 0) for k, v in b.items() if v != a.get(k, 0)}


def backend_flows(entry: dict) -> dict[str, int]:
    return {b["address"]: b["new_flows"] for s in entry["services"] for b in s["backends"]}


def pool_size(entry: dict) -> int:
    lo, hi = map(int, entry["snat"]["ports"].split("-"))
    return len(entry["snat"]["addresses"]) * (hi - lo + 1)


@contextlib.contextmanager
def lb_attached(*args: str):
    xdplb("-n", LB_NS, "attach", "eth0", *args)
    try:
        yield
    finally:
        xdplb("-n", LB_NS, "detach", "eth0", check=False)


def _stop_nginx(proc: subprocess.Popen) -> None:
    """Ends an nginx we started (nsenter execs it: proc is the master) in a session of its
    own. SIGTERM: the master ends its workers and exits after them. If it lingers, its
    process group goes, killed while the unreaped master still holds the group's id."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def nginx(netns: str, name: str, workdir: Path):
    """nginx answering `hello from NAME` on HTTP_PORT, with stub_status on the loopback."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server {{ listen {HTTP_PORT} reuseport backlog=4096; location / {{ return 200 "hello from {name}\\n"; }} }}
  server {{ listen 127.0.0.1:{STATUS_PORT}; location / {{ stub_status; }} }}
}}
""")
    proc = subprocess.Popen(nsenter(netns, "nginx", "-e", str(workdir / "error.log"), "-c", str(conf)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while served(netns) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (workdir / "error.log").read_text() if (workdir / "error.log").exists() else ""
                raise AssertionError(f"nginx in {netns} did not start (exit {proc.poll()}): {log}")
            time.sleep(0.05)
        yield proc
    finally:
        _stop_nginx(proc)


def served(netns: str) -> int | None:
    """Requests nginx in netns has answered (stub_status: third number of the third line)."""
    r = subprocess.run(nsenter(netns, "curl", "-sS", "-m", "2", f"http://127.0.0.1:{STATUS_PORT}/"),
                       capture_output=True, text=True)
    try:
        return int(r.stdout.splitlines()[2].split()[2])
    except (IndexError, ValueError):
        return None


def wrk_errors(out: str) -> dict[str, int]:
    """wrk's failed requests by kind; it prints these lines only when there are some."""
    errors = {}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors.update(zip(("connect", "read", "write", "timeout"), map(int, sock.groups())))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        errors["non_2xx_3xx"] = int(bad.group(1))
    return {k: v for k, v in errors.items() if v}


def test_sustained_close_per_request(testlab, tmp_path):
    """A new connection per request at full speed for a minute, through a SNAT pool that
    every backend goes through several times: no request fails, no SYN is retried, no
    SYN is dropped for want of a source, and both backends keep answering."""
    for tool in ("wrk", "nginx"):
        require(shutil.which(tool) is not None, f"needs {tool}")
    target = f"http://{VIP}:{HTTP_PORT}/"
    with contextlib.ExitStack() as stack:
        for addr, ns in BACKEND_NS.items():
            stack.enter_context(nginx(ns, NAMES[addr], tmp_path / ns))
        stack.enter_context(lb_attached("--port", str(HTTP_PORT), "--backends", f"{A}:{HTTP_PORT},{B}:{HTTP_PORT}",
                                        "--flows", "262144"))
        warm = subprocess.run(nsenter(CLIENT_NS, "curl", "-sS", "-m", "5", target), capture_output=True, text=True)
        assert warm.stdout.startswith("hello from backend-"), warm.stderr + warm.stdout

        before, tcp_before = stats_cli(), tcp_counters(CLIENT_NS)
        backends_before = {ns: tcp_counters(ns) for ns in BACKEND_NS.values()}
        answered_before = {addr: served(ns) for addr, ns in BACKEND_NS.items()}
        softnet_before = softnet_drops()
        started = time.monotonic()
        run = subprocess.run(nsenter(CLIENT_NS, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{SUSTAIN_S}s",
                                     "-H", "Connection: close", target),
                             capture_output=True, text=True, timeout=SUSTAIN_S + 60)
        elapsed = time.monotonic() - started
        after, tcp_after = stats_cli(), tcp_counters(CLIENT_NS)
        softnet = softnet_drops() - softnet_before
        backends_tcp = {ns: tcp_changes(backends_before[ns], tcp_counters(ns)) for ns in BACKEND_NS.values()}
        answered = {addr: (served(ns) or 0) - (answered_before[addr] or 0) for addr, ns in BACKEND_NS.items()}
        now = lb_counters()

    counters = grew(before, after)
    flows = {addr: n - backend_flows(before)[addr] for addr, n in backend_flows(after).items()}
    tcp = {"TcpActiveOpens": tcp_after["TcpActiveOpens"] - tcp_before["TcpActiveOpens"],
           "TcpExtTCPSynRetrans": 0} | tcp_changes(tcp_before, tcp_after)
    pool = pool_size(after)
    found = re.search(r"(\d+) requests in", run.stdout)
    requests = int(found.group(1)) if found else 0
    errors = wrk_errors(run.stdout)

    problems = []
    if run.returncode != 0 or not found:
        problems.append(f"wrk failed ({run.returncode})")
    if errors:
        problems.append(f"failed requests: {errors}")
    if tcp["TcpExtTCPSynRetrans"]:
        problems.append(f"the client retransmitted {tcp['TcpExtTCPSynRetrans']} SYNs")
    for name in ("table_full", "snat_exhausted"):
        if counters.get(name):
            problems.append(f"{name} grew by {counters[name]}")
    for addr in (A, B):
        # Every backend got more new flows than there are sources: sources were reused.
        if flows.get(addr, 0) <= pool:
            problems.append(f"{NAMES[addr]} got {flows.get(addr, 0)} new flows, not more than the pool ({pool})")
        if answered[addr] <= pool:
            problems.append(f"{NAMES[addr]} answered {answered[addr]} requests, not more than the pool ({pool})")
    report = (f"{requests} requests in {elapsed:.1f} s ({requests / max(elapsed, 1e-9):.0f}/s); "
              f"SNAT pool {pool} sources per backend ({after['snat']})\n"
              f"new flows per backend {flows}; answered per backend {answered}\n"
              f"LB counters over the run {counters}\nLB at the end {now}\nclient TCP over the run {tcp}\n"
              f"backends' TCP over the run {backends_tcp}\nbacklog drops (softnet_stat, all CPUs) {softnet}\n"
              f"wrk:\n{run.stdout}{run.stderr}")
    print(report)
    assert not problems, "; ".join(problems) + "\n" + report


def spoofed_syns(count: int, src_mac: str, dst_mac: str, seed: int = 6191) -> list[bytes]:
    """Ethernet frames of TCP SYNs to VIP:80 from FLOOD_SOURCES, random distinct source
    ports, valid checksums (scapy computes them)."""
    from scapy.compat import raw
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    rng = random.Random(seed)
    tuples = set()
    while len(tuples) < count:
        tuples.add((rng.choice(FLOOD_SOURCES), rng.randrange(1024, 65536)))
    return [raw(Ether(src=src_mac, dst=dst_mac) / IP(src=addr, dst=VIP, ttl=64)
                / TCP(sport=port, dport=80, flags="S", seq=rng.getrandbits(32), window=64240,
                      options=[("MSS", 1460)]))
            for addr, port in sorted(tuples)]


def send_frames(frames: list[bytes], ifname: str = "eth0") -> float:
    """Sends raw frames on ifname of the calling thread's namespace; returns the seconds
    it took. A short pause every 100 frames keeps the veth queues from overflowing."""
    started = time.monotonic()
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        for i, frame in enumerate(frames):
            s.send(frame)
            if i % 100 == 99:
                time.sleep(0.002)
    return time.monotonic() - started


def mac_of(netns: str, ifname: str = "eth0") -> str:
    out = subprocess.run(["ip", "-n", netns, "-j", "link", "show", ifname], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)[0]["address"]


def connect_once(timeout: float) -> str:
    """One connection attempt to VIP:80: 'connected' or what went wrong."""
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((VIP, 80))
        return "connected"
    except OSError as exc:
        return repr(exc)
    finally:
        s.close()


def syn_recv(netns: str) -> int:
    """How many half-open connections (SYN_RECV) a namespace holds."""
    out = subprocess.run(nsenter(netns, "ss", "-Htn", "state", "syn-recv"), capture_output=True, text=True).stdout
    return len(out.splitlines())


def requests_until_failures(n: int, failures: int, timeout: float) -> list[str]:
    """Up to n requests on new connections (which backend answered, or the error); stops
    after `failures` failed ones."""
    out = []
    for _ in range(n):
        try:
            out.append(get(timeout=timeout))
        except Exception as exc:  # reported by the test
            out.append(f"failed: {exc!r}")
        if sum(r.startswith("failed") for r in out) >= failures:
            break
    return out


def test_syn_flood_frees_sources(testlab):
    """2000 spoofed SYNs take every source of a 256-port pool towards each backend; a real
    client then finds none (snat_exhausted). The handshakes never complete, so their
    sources come free after timeouts.tcp_syn: 12 s after the flood the real client's
    connections all work, at once. The backends' SYN-ACKs to the spoofed addresses end in
    the client's namespace, which drops them (not its addresses)."""
    lo, hi = FLOOD_SNAT_PORTS
    frames = spoofed_syns(FLOOD_SYNS, mac_of(CLIENT_NS), mac_of(LB_NS))
    with lb_attached("--backends", f"{A},{B}", "--flows", "65536", "--snat-ports", f"{lo}-{hi}"):
        before = stats_fast()
        took = in_ns(CLIENT_NS, lambda: send_frames(frames))
        flood_end = time.monotonic()
        time.sleep(0.1)
        flooded = stats_fast()
        attempt_at = time.monotonic() - flood_end
        attempt = in_ns(CLIENT_NS, lambda: connect_once(1.5))  # its SYN, then one retry after 1 s
        attempted = stats_fast()
        time.sleep(max(0.0, flood_end + RECOVERY_S - time.monotonic()))
        half_open = {NAMES[a]: syn_recv(ns) for a, ns in BACKEND_NS.items()}
        tcp_before, late_before = tcp_counters(CLIENT_NS), stats_fast()
        late_at = time.monotonic() - flood_end
        late = in_ns(CLIENT_NS, lambda: requests_until_failures(6, 1, 4.0))
        late_after, tcp_after = stats_fast(), tcp_counters(CLIENT_NS)
        now = lb_counters()

    flood = grew(before, flooded)
    by_backend = {NAMES[a]: n - backend_flows(before)[a] for a, n in backend_flows(flooded).items()}
    on_attempt, on_late = grew(flooded, attempted), grew(late_before, late_after)
    syn_retrans = tcp_after["TcpExtTCPSynRetrans"] - tcp_before["TcpExtTCPSynRetrans"]
    client_tcp = tcp_changes(tcp_before, tcp_after)
    report = (f"flood: {FLOOD_SYNS} SYNs in {took:.2f} s; LB counters {flood}; new flows per backend "
              f"{by_backend} (pool {pool_size(flooded)} per backend)\n"
              f"real connection {attempt_at:.1f} s after the flood: {attempt}; LB counters {on_attempt}\n"
              f"{late_at:.1f} s after the flood: half-open connections on the backends {half_open}; requests "
              f"{late}; LB counters {on_late}; client TCP {client_tcp}\n"
              f"LB at the end {now}\nall counters at the end {late_after['counters']}")
    print(report)

    # The frames reached the data plane: each SYN became a flow or was dropped for want of a source.
    reached = flood.get("new_flow", 0) + flood.get("snat_exhausted", 0) + flood.get("table_full", 0)
    assert reached >= FLOOD_SYNS * 0.99, f"the flood did not reach the load balancer\n{report}"

    problems = []
    if "snat_exhausted" not in attempted["counters"]:
        problems.append(f"no counter snat_exhausted (counters: {sorted(attempted['counters'])})")
    elif not on_attempt.get("snat_exhausted"):
        problems.append("right after the flood the real client's SYN was not dropped for want of a SNAT source "
                        f"(snat_exhausted did not grow; the attempt: {attempt})")
    if on_attempt.get("table_full"):
        problems.append(f"table_full grew by {on_attempt['table_full']} for the real client's SYN "
                        "(snat_exhausted replaces it for a pool that has no free source)")
    answered = [r for r in late if r in (NAMES[A], NAMES[B])]
    if len(answered) != 6:
        problems.append(f"{RECOVERY_S} s after the flood only {len(answered)} of 6 requests were answered: {late} "
                        f"(half-open connections the backends still held: {half_open})")
    if on_late.get("snat_exhausted") or on_late.get("table_full"):
        problems.append(f"{RECOVERY_S} s after the flood SYNs still found no free source ({on_late}): the "
                        f"handshake-only flows should have freed theirs after tcp_syn ({SYN_TIMEOUT_S} s)")
    if syn_retrans:
        problems.append(f"{RECOVERY_S} s after the flood the real client retransmitted {syn_retrans} SYNs")
    assert not problems, "; ".join(problems) + "\n" + report
