# SPDX-License-Identifier: Apache-2.0
"""Sustained new connections: HTTP with a new TCP connection per request (wrk, 1 thread,
32 connections, `Connection: close`) for minutes, directly to one backend, through xdplb
(full NAT) and through nftables (full NAT), one mode after the other on e2e's lab.

A few seconds of this can hide a pool or a timeout that runs out only after tens of
thousands of connections (a full-NAT SNAT pool once ran dry after ~45,000), so the
request rate is counted every second at the backends for the whole run, beside the
failed requests, the client's SYN retransmits and xdplb's counters.
"""
from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xdplb import namespaces

from . import e2e

MODES = ["direct", "xdplb", "xdplb-dsr", "nftables"]
CONNECTIONS = 32
FIRST_S, LAST_S = 15, 30  # the start-up and the steady-state windows of the table
# xdplb's counters shown in the table; newer data planes add some, older ones lack them.
COUNTERS = ["new_flow", "table_full", "evicted", "snat_exhausted", "snat_reused"]
CLIENT_TCP = ["TcpExtTCPSynRetrans", "TcpActiveOpens", "TcpAttemptFails"]
COLORS = {"direct": "#888888", "xdplb": "#2a7ab0", "xdplb-dsr": "#4a9ad0", "nftables": "#d08a2a"}  # as in benchmarks-e2e.png


@dataclass
class Run:
    mode: str
    per_second: list[int]  # requests counted at the backends, second by second
    wrk_requests: int = 0  # responses wrk completed
    errors: dict = field(default_factory=dict)  # wrk: connect, read, write, timeout, non2xx
    client_tcp: dict = field(default_factory=dict)  # the client's TCP counters over the run
    counters: dict = field(default_factory=dict)  # xdplb's counters over the run (xdplb only)
    leftover: dict = field(default_factory=dict)  # state found before the run (settle() clears it)

    def rate(self, start: int = 0, end: int | None = None) -> float:
        window = self.per_second[start:end]
        return sum(window) / len(window) if window else 0.0

    def mean(self) -> float:
        return self.rate()

    def first(self) -> float:
        return self.rate(0, FIRST_S)

    def last(self) -> float:
        return self.rate(-LAST_S)

    def failed(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict:
        return asdict(self) | {"mean_rps": self.mean(), "first_15s_rps": self.first(),
                               "last_30s_rps": self.last(), "failed": self.failed()}


@dataclass
class Results:
    seconds: int
    runs: list[Run]

    def by_mode(self) -> dict[str, Run]:
        return {r.mode: r for r in self.runs}

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "connections": CONNECTIONS, "runs": [r.as_dict() for r in self.runs]}


# ---- requests counted at the backends ------------------------------------------------

def _stub_requests() -> int:
    """nginx's request count (stub_status: third number of the third line), read on the
    loopback of the calling thread's namespace, so the lab's links carry none of it."""
    conn = http.client.HTTPConnection("127.0.0.1", e2e.STATUS_PORT, timeout=1)
    try:
        conn.request("GET", "/")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    return int(body.splitlines()[2].split()[2])


def _poll(ns: str, start: float, samples: int, out: list[int]) -> None:
    """Thread body: enters ns (setns changes this thread only), then reads the count at
    start, start + 1 s, ... on a fixed schedule, so a late read does not shift the rest."""
    namespaces.enter_netns(ns)
    for k in range(samples):
        time.sleep(max(0.0, start + k - time.monotonic()))
        out.append(_stub_requests())


def _per_second(counts: list[list[int]]) -> list[int]:
    """Requests per one-second bucket, summed over the backends; every read is itself a
    request, counted in the bucket it ends."""
    return [sum(c[k + 1] - c[k] - 1 for c in counts) for k in range(len(counts[0]) - 1)]


def _counted_at_backends(seconds: int, load):
    """Runs load() (which lasts `seconds`) while one thread per backend counts its
    requests every second; returns (requests per second, load's result)."""
    start, samples = time.monotonic() + 0.3, seconds + 1  # 0.3 s: the threads enter their namespaces
    counts = [[] for _ in e2e.BACKEND_NS]
    threads = [threading.Thread(target=_poll, args=(ns, start, samples, out), daemon=True)
               for ns, out in zip(e2e.BACKEND_NS, counts)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, start - time.monotonic()))
    result = load()
    for t in threads:
        t.join(timeout=max(0.0, start + samples + 5 - time.monotonic()))
    if any(len(c) != samples for c in counts):
        raise RuntimeError(f"stub_status reads missing: {[len(c) for c in counts]} of {samples}")
    return _per_second(counts), result


# ---- the client, wrk and xdplb ---------------------------------------------------------

def _wrk(target: str, seconds: int) -> tuple[int, dict]:
    """One wrk run, a new connection per request; returns (responses, errors by kind)."""
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "-H", "Connection: close",
           f"http://{target}:{e2e.HTTP_PORT}/"]
    out = subprocess.run(e2e._ns(e2e.CLIENT_NS, *cmd), capture_output=True, text=True, check=True,
                         timeout=seconds + 60).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups() if sock else (0,) * 4)))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors["non2xx"] = int(bad.group(1)) if bad else 0
    return total, errors


def _client_tcp() -> dict[str, int]:
    """The client namespace's TCP counters: /proc/net/netstat and /proc/net/snmp hold, per
    group, a line of names and a line of values."""
    out = subprocess.run(e2e._ns(e2e.CLIENT_NS, "cat", "/proc/net/netstat", "/proc/net/snmp"),
                         capture_output=True, text=True, check=True).stdout.splitlines()
    values = {}
    for names, numbers in zip(out[::2], out[1::2]):
        group, *keys = names.split()
        values.update({group.rstrip(":") + k: int(v) for k, v in zip(keys, numbers.split()[1:])})
    return {k: values.get(k, 0) for k in CLIENT_TCP}


def _xdplb_counters() -> dict[str, int]:
    """xdplb's counters by name, as `xdplb stats --json` gives them ({} if it fails)."""
    r = subprocess.run([sys.executable, "-m", "xdplb", "-n", e2e.LB_NS, "stats", "--json", "--interval", "0"],
                       capture_output=True, text=True)
    entries = json.loads(r.stdout) if r.returncode == 0 else []
    return entries[0]["counters"] if entries else {}


def _delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items()}


def _leftover() -> dict:
    """What earlier runs left that would disturb this one (settle() should leave none):
    TIME_WAIT sockets on the client and the backends, conntrack entries on the LB."""
    tw = sum(len(subprocess.run(e2e._ns(ns, "ss", "-Htan", "state", "time-wait"), capture_output=True,
                                text=True).stdout.splitlines()) for ns in [e2e.CLIENT_NS, *e2e.BACKEND_NS])
    ct = subprocess.run(e2e._ns(e2e.LB_NS, "conntrack", "-C"), capture_output=True, text=True).stdout.strip()
    return {"time_wait": tw, "conntrack": int(ct) if ct.isdigit() else 0}


def _run_mode(mode: str, seconds: int, backends: list) -> Run:
    leftover = _leftover()
    with e2e.Mode(mode, backends) as m:  # its exit settles: TIME_WAIT killed, conntrack flushed
        e2e._wait_port(e2e.CLIENT_NS, m.target(), e2e.HTTP_PORT)
        xdplb_before = _xdplb_counters() if mode in e2e.FORWARD else {}
        tcp_before = _client_tcp()
        per_second, (total, errors) = _counted_at_backends(seconds, lambda: _wrk(m.target(), seconds))
        tcp = _delta(tcp_before, _client_tcp())
        counters = _delta(xdplb_before, _xdplb_counters()) if mode in e2e.FORWARD else {}
    return Run(mode, per_second, total, errors, tcp, counters, leftover)


def run(seconds: int) -> Results:
    """One run per mode (at 120 s, drift between them matters less than at 5 s)."""
    with e2e.lab_with_servers() as backends:
        e2e.settle()
        return Results(seconds, [_run_mode(mode, seconds, backends) for mode in MODES])


# ---- report ---------------------------------------------------------------------------

def _ratios(run: Run, base: Run | None) -> str:
    if base is None or not base.mean() or not base.last():
        return "-"
    return f"{run.mean() / base.mean():.2f}x / {run.last() / base.last():.2f}x"


def _counters_cell(run: Run) -> str:
    if run.mode not in e2e.FORWARD:
        return "-"
    return ", ".join(f"{k} {run.counters[k]:,}" if k in run.counters else f"{k} n/a" for k in COUNTERS)


def _failed_cell(run: Run) -> str:
    kinds = ", ".join(f"{k} {v:,}" for k, v in run.errors.items() if v)
    return f"{run.failed():,}" + (f" ({kinds})" if kinds else "")


def table(res: Results) -> list[str]:
    modes = res.by_mode()
    lines = [f"One run of {res.seconds} s per mode, in this order, one after the other; wrk: 1 thread, "
             f"{CONNECTIONS} connections, `Connection: close` (a new TCP connection per request). Requests are "
             "counted each second at the backends (nginx stub_status); *first 15 s* and *last 30 s* are means "
             "over those windows. Ratios: mean / last 30 s. *Failed*: wrk's socket errors plus non-2xx "
             "responses. *SYN retrans*: the client's TcpExtTCPSynRetrans over the run. Counters: xdplb's, "
             "over the run (n/a: this data plane has no such counter).", "",
             "| mode | requests | mean req/s | first 15 s | last 30 s | vs direct | vs nftables | failed "
             "| SYN retrans | xdplb counters |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in res.runs:
        lines.append(f"| {r.mode} | {sum(r.per_second):,} | {r.mean():,.0f} | {r.first():,.0f} | {r.last():,.0f} | "
                     f"{_ratios(r, modes.get('direct'))} | {_ratios(r, modes.get('nftables'))} | "
                     f"{_failed_cell(r)} | {r.client_tcp.get('TcpExtTCPSynRetrans', 0):,} | {_counters_cell(r)} |")
    return lines


def plot(res: Results, path: Path) -> bool:
    plt = e2e.pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for r in res.runs:
        ax.plot(range(1, len(r.per_second) + 1), r.per_second, label=r.mode, color=COLORS.get(r.mode), linewidth=1.2)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("requests/s (at the backends)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title(f"New TCP connection per request, sustained for {res.seconds} s per mode "
                 f"(wrk, {CONNECTIONS} connections)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
