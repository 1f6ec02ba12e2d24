# SPDX-License-Identifier: Apache-2.0
"""End to end in a lab of its own: HTTP (wrk, keep-alive and a new connection per
request) and TCP throughput (iperf3) directly to one backend, through xdplb in each
forwarding mode (nat, dsr, ipip), through nftables DNAT/SNAT and through HAProxy,
interleaved round by round on one topology.

Backends run nginx on port 8080 and iperf3 on 5201. Besides requests/s, the whole
machine's CPU time per request above the direct run shows what the load balancer costs
even when the client or the backends are the bottleneck (they share the 2 CPUs); for
xdplb, the run time of its XDP program per request (kernel.bpf_stats_enabled, on only
during the benchmark) is the balancer's own share.
"""
from __future__ import annotations

import contextlib
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from xdplb import lab, netlink
from xdplb.libbpf import libbpf

PREFIX = "xdplb-b"
LB_NS, CLIENT_NS = f"{PREFIX}-lb", f"{PREFIX}-client"
BACKEND_NS = [f"{PREFIX}-backend-a", f"{PREFIX}-backend-b"]
BACKENDS = [str(lab.SUBNET[lab.BACKEND_BASE + i]) for i in range(2)]
VIP = str(lab.LB_ADDR)
BYPASS_VIP = str(lab.BYPASS_VIP)  # dsr and ipip: not the balancer's own address, on the backends' lo
BYPASS_VIP6 = str(lab.BYPASS_VIP6)
BACKENDS6 = [str(lab.SUBNET6[lab.BACKEND_BASE + i]) for i in range(2)]
HTTP_PORT, IPERF_PORT = 8080, 5201
STATUS_PORT = 8081  # nginx stub_status, on each backend's loopback only (counts requests there)
STATE = Path("/run/xdplb/bench")
MODES = ["direct", "xdplb", "xdplb-dsr", "xdplb-ipip", "direct-ipv6", "xdplb-dsr-ipv6", "nftables", "haproxy"]
FORWARD = {"xdplb": "nat", "xdplb-dsr": "dsr", "xdplb-ipip": "ipip", "xdplb-dsr-ipv6": "dsr"}
IPV6_MODES = {"direct-ipv6", "xdplb-dsr-ipv6"}  # clients reach the service (and it the backends) over IPv6
TESTS = ["keepalive", "newconn", "iperf3"]


@dataclass
class Sample:
    value: float  # requests/s, or Gbit/s for iperf3
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_us_per_req: float = 0.0
    xdp_ns_per_req: float = 0.0  # the balancer's XDP program, xdplb modes only


@dataclass
class Results:
    seconds: int
    rounds: int
    samples: dict = field(default_factory=dict)  # (mode, test) -> [Sample]

    def median(self, mode: str, test: str, attr: str = "value") -> float:
        return statistics.median(getattr(s, attr) for s in self.samples[(mode, test)])

    def spread(self, mode: str, test: str) -> tuple[float, float]:
        values = [s.value for s in self.samples[(mode, test)]]
        return min(values), max(values)


def _ns(ns: str, *cmd: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", *cmd]


def _start(ns: str, *cmd: str) -> subprocess.Popen:
    return subprocess.Popen(_ns(ns, *cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _nginx_conf(ns: str, name: str) -> Path:
    d = STATE / ns
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{ listen {HTTP_PORT} reuseport backlog=4096; listen [::]:{HTTP_PORT} ipv6only=on reuseport backlog=4096;
            location / {{ return 200 "hello from {name}\\n"; }} }}
  server {{ listen 127.0.0.1:{STATUS_PORT}; location / {{ stub_status; }} }}
}}
""")
    return conf


def _haproxy_conf() -> Path:
    d = STATE / LB_NS
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "haproxy.cfg"
    conf.write_text(f"""
global
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend http
  bind {VIP}:{HTTP_PORT}
  default_backend web
backend web
  balance roundrobin
  server a {BACKENDS[0]}:{HTTP_PORT}
  server b {BACKENDS[1]}:{HTTP_PORT}
frontend iperf
  bind {VIP}:{IPERF_PORT}
  default_backend bulk
backend bulk
  server a {BACKENDS[0]}:{IPERF_PORT}
""")
    return conf


NFT_RULES = f"""
table ip xdplb_bench {{
  chain pre {{
    type nat hook prerouting priority dstnat;
    ip daddr {VIP} tcp dport {HTTP_PORT} dnat to numgen inc mod 2 map {{ 0 : {BACKENDS[0]}, 1 : {BACKENDS[1]} }}
    ip daddr {VIP} tcp dport {IPERF_PORT} dnat to {BACKENDS[0]}
  }}
  chain post {{
    type nat hook postrouting priority srcnat;
    ip daddr {{ {BACKENDS[0]}, {BACKENDS[1]} }} masquerade
  }}
}}
"""

# The default timeouts: a closed flow is remembered (tcp_closing, 120 s) for as long as
# the backend may hold its tuple in TIME_WAIT, which is what lets a newer SYN take its
# SNAT source safely; a shorter tcp_closing hands sources back blindly.
# Native mode: the lab gives the peer veths an XDP program and turns checksum offload off
# (auto would choose generic on a veth).
def xdplb_config(forward: str, ipv6: bool = False) -> str:
    vip = VIP if forward == "nat" else BYPASS_VIP6 if ipv6 else BYPASS_VIP
    backends = BACKENDS6 if ipv6 else BACKENDS
    return f"""
[interfaces.eth0]
mode = "native"
flows = 262144

[[interfaces.eth0.services]]
vip = "{vip}"
port = {HTTP_PORT}
forward = "{forward}"
backends = [ {{ address = "{backends[0]}" }}, {{ address = "{backends[1]}" }} ]

[[interfaces.eth0.services]]
vip = "{vip}"
port = {IPERF_PORT}
forward = "{forward}"
backends = [ {{ address = "{backends[0]}" }} ]
"""


class Mode:
    """Sets a mode up on the load balancer (and the backends, for dsr and ipip), and tears
    it down again."""

    def __init__(self, name: str, backends: list):
        self.name = name
        self.backends = backends  # the lab's backend hosts
        self.proc = None

    def target(self) -> str:
        if self.name == "direct":
            return BACKENDS[0]
        if self.name == "direct-ipv6":
            return BACKENDS6[0]
        if self.name in IPV6_MODES:
            return BYPASS_VIP6
        return BYPASS_VIP if FORWARD.get(self.name, "nat") != "nat" else VIP

    def __enter__(self):
        if self.name in FORWARD:
            for host in self.backends:
                lab.prepare_backend(host, FORWARD[self.name])
            path = STATE / "xdplb.toml"
            path.write_text(xdplb_config(FORWARD[self.name], self.name in IPV6_MODES))
            subprocess.run([sys.executable, "-m", "xdplb", "-n", LB_NS, "apply", str(path)], check=True,
                           capture_output=True)
        elif self.name == "nftables":
            subprocess.run(["ip", "netns", "exec", LB_NS, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
            subprocess.run(["ip", "netns", "exec", LB_NS, "nft", "-f", "-"], input=NFT_RULES.encode(), check=True)
        elif self.name == "haproxy":
            self.proc = _start(LB_NS, "haproxy", "-db", "-f", str(_haproxy_conf()))
            _wait_port(CLIENT_NS, VIP, HTTP_PORT)
        return self

    def __exit__(self, *exc):
        if self.name in FORWARD:
            subprocess.run([sys.executable, "-m", "xdplb", "-n", LB_NS, "detach", "eth0"], capture_output=True)
            for host in self.backends:
                lab.prepare_backend(host, "nat")
        elif self.name == "nftables":
            subprocess.run(["ip", "netns", "exec", LB_NS, "nft", "delete", "table", "ip", "xdplb_bench"],
                           capture_output=True)
            subprocess.run(["ip", "netns", "exec", LB_NS, "sysctl", "-qw", "net.ipv4.ip_forward=0"])
        elif self.proc:
            lab.stop_process(self.proc)
        settle()

    def xdp_run_ns(self) -> int | None:
        """Total run time so far of the XDP program on the balancer's eth0 (None in the
        modes without one)."""
        if self.name not in FORWARD:
            return None
        return program_run_ns(netlink.get_link("eth0", netns=LB_NS).xdp_prog_id)


def program_run_ns(prog_id: int) -> int:
    """A BPF program's accumulated run time: its fdinfo's run_time_ns, counted while
    kernel.bpf_stats_enabled is 1."""
    import os
    fd = libbpf().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        raise RuntimeError(f"BPF program {prog_id} is gone")
    try:
        info = Path(f"/proc/self/fdinfo/{fd}").read_text()
    finally:
        os.close(fd)
    return int(re.search(r"^run_time_ns:\s+(\d+)", info, re.M).group(1))


@contextlib.contextmanager
def bpf_stats():
    """BPF run-time accounting on for the duration (it is machine-wide, and costs a little
    on every program run), then back as it was."""
    knob = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = knob.read_text().strip()
    knob.write_text("1")
    try:
        yield
    finally:
        knob.write_text(before)


def settle() -> None:
    """Clears what one run leaves for the next: TIME_WAIT sockets everywhere (a later run
    would collide with them) and the load balancer's conntrack entries."""
    for ns in [CLIENT_NS, LB_NS, *BACKEND_NS]:
        subprocess.run(_ns(ns, "ss", "-K", "state", "time-wait"), capture_output=True)
    subprocess.run(_ns(LB_NS, "conntrack", "-F"), capture_output=True)
    time.sleep(1.0)


def _host(addr: str) -> str:
    """An address as a URL's host: IPv6 in brackets."""
    return f"[{addr}]" if ":" in addr else addr


def _wait_port(ns: str, host: str, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(_ns(ns, "curl", "-s", "-o", "/dev/null", "-m", "1", f"http://{_host(host)}:{port}/"))
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{host}:{port} did not answer from {ns}")


def _busy_seconds() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / 100.0  # USER_HZ


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _wrk(mode: Mode, seconds: int, close: bool) -> Sample:
    target = mode.target()
    cmd = ["wrk", "-t1", "-c16", f"-d{seconds}s", "--latency", f"http://{_host(target)}:{HTTP_PORT}/"]
    if close:
        cmd[1:1] = ["-H", "Connection: close"]
    before, xdp_before = _busy_seconds(), mode.xdp_run_ns()
    out = subprocess.run(_ns(CLIENT_NS, *cmd), capture_output=True, text=True, check=True).stdout
    busy, xdp_after = _busy_seconds() - before, mode.xdp_run_ns()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad and int(bad.group(1)):
        raise RuntimeError(f"wrk got {bad.group(1)} error responses through {target}")
    pct = {m.group(1): float(m.group(2)) * _UNITS[m.group(3)]
           for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    xdp = (xdp_after - xdp_before) / max(total, 1) if xdp_before is not None else 0.0
    return Sample(rps, pct.get("50", 0.0), pct.get("99", 0.0), busy * 1e6 / max(total, 1), xdp)


def _iperf(target: str, seconds: int) -> Sample:
    import json
    out = subprocess.run(_ns(CLIENT_NS, "iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"),
                         capture_output=True, text=True, check=True).stdout
    bps = json.loads(out)["end"]["sum_received"]["bits_per_second"]
    return Sample(bps / 1e9)


@contextlib.contextmanager
def lab_with_servers():
    """The lab with nginx and iperf3 on every backend, torn down on the way out even on
    failure (servers by PID, xdplb detached, namespaces removed)."""
    lab.down(PREFIX)
    servers = []
    try:
        hosts = lab.up(backends=2, clients=1, prefix=PREFIX)
        subprocess.run(["ip", "netns", "exec", CLIENT_NS, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"], check=True)
        for ns, name in zip(BACKEND_NS, ("backend-a", "backend-b")):
            servers.append(_start(ns, "nginx", "-c", str(_nginx_conf(ns, name))))
            servers.append(_start(ns, "iperf3", "-s", "-p", str(IPERF_PORT)))
        for b in BACKENDS:
            _wait_port(CLIENT_NS, b, HTTP_PORT)
        yield [h for h in hosts if h.role == "backend"]
    finally:
        for proc in servers:
            lab.stop_process(proc)
        subprocess.run([sys.executable, "-m", "xdplb", "-n", LB_NS, "detach", "eth0"], capture_output=True)
        lab.down(PREFIX)


def run(seconds: int, rounds: int) -> Results:
    with lab_with_servers() as backends, bpf_stats():
        res = Results(seconds, rounds)
        for _ in range(rounds):
            for mode in MODES:  # interleaved: drift hits every mode alike
                with Mode(mode, backends) as m:
                    _wait_port(CLIENT_NS, m.target(), HTTP_PORT)
                    res.samples.setdefault((mode, "keepalive"), []).append(_wrk(m, seconds, False))
                    settle()
                    res.samples.setdefault((mode, "newconn"), []).append(_wrk(m, seconds, True))
                    settle()
                    res.samples.setdefault((mode, "iperf3"), []).append(_iperf(m.target(), seconds))
        return res


def table(res: Results) -> list[str]:
    lines = [f"{res.rounds} interleaved rounds of {res.seconds} s per test, medians (min-max). wrk: 1 thread, "
             "16 connections; iperf3: one TCP stream to backend a, client to server. xdplb is xdplb-nat; dsr "
             "and ipip serve a VIP that the backends hold on lo. CPU/req: whole machine, above direct. XDP ns/req: "
             "the run time of the balancer's XDP program per request (both directions in nat, the client's "
             "only in dsr and ipip). The -ipv6 modes run over IPv6 (the same hosts' fd42:42::/64 addresses); "
             "the others over IPv4.", "",
             "| mode | keep-alive req/s | p50 / p99 ms | CPU us/req | XDP ns/req | new-conn req/s | p50 / p99 ms "
             "| CPU us/req | XDP ns/req | iperf3 Gbit/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base_ka = res.median("direct", "keepalive", "cpu_us_per_req")
    base_nc = res.median("direct", "newconn", "cpu_us_per_req")

    def xdp(mode: str, test: str) -> str:
        return f"{res.median(mode, test, 'xdp_ns_per_req'):,.0f}" if mode in FORWARD else "-"
    for mode in MODES:
        ka, nc, ip = (res.spread(mode, t) for t in TESTS)
        lines.append(
            f"| {mode} | {res.median(mode, 'keepalive'):,.0f} ({ka[0]:,.0f}-{ka[1]:,.0f}) | "
            f"{res.median(mode, 'keepalive', 'p50_ms'):.2f} / {res.median(mode, 'keepalive', 'p99_ms'):.2f} | "
            f"{res.median(mode, 'keepalive', 'cpu_us_per_req') - base_ka:+.1f} | {xdp(mode, 'keepalive')} | "
            f"{res.median(mode, 'newconn'):,.0f} ({nc[0]:,.0f}-{nc[1]:,.0f}) | "
            f"{res.median(mode, 'newconn', 'p50_ms'):.2f} / {res.median(mode, 'newconn', 'p99_ms'):.2f} | "
            f"{res.median(mode, 'newconn', 'cpu_us_per_req') - base_nc:+.1f} | {xdp(mode, 'newconn')} | "
            f"{res.median(mode, 'iperf3'):.2f} ({ip[0]:.2f}-{ip[1]:.2f}) |")
    lines.append("")
    for ours in FORWARD:
        others = ("direct-ipv6", "xdplb-dsr") if ours in IPV6_MODES else ("direct", "nftables", "haproxy")
        for other in others:
            ratios = ", ".join(f"{t} {res.median(ours, t) / res.median(other, t):.2f}x" for t in TESTS)
            lines.append(f"{ours} / {other}: {ratios}.  ")
    return lines


def pyplot():
    """matplotlib's pyplot drawing to files, or None without matplotlib (the bench extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(res: Results, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    labels = {"keepalive": "HTTP keep-alive (req/s)", "newconn": "HTTP new connection (req/s)",
              "iperf3": "TCP throughput (Gbit/s)"}
    for ax, test in zip(axes, TESTS):
        meds = [res.median(m, test) for m in MODES]
        lows = [meds[i] - res.spread(m, test)[0] for i, m in enumerate(MODES)]
        highs = [res.spread(m, test)[1] - meds[i] for i, m in enumerate(MODES)]
        ax.bar(MODES, meds, yerr=[lows, highs], capsize=4,
               color=["#888888", "#2a7ab0", "#4a9ad0", "#7abae0", "#d08a2a", "#8a5ab0"])
        ax.set_title(labels[test], fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=30)
    fig.suptitle("xdplb vs. the alternatives, same lab, same run (bars: median, whiskers: min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
