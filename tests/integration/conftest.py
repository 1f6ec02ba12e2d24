# SPDX-License-Identifier: Apache-2.0
"""The lab for integration tests: its own namespaces (prefix xdplb-t), real servers,
the CLI run as a subprocess the way a user types it, real clients."""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from tests.conftest import require
from xdplb import lab
from xdplb.namespaces import enter_netns

PREFIX = "xdplb-t"
LB_NS = f"{PREFIX}-lb"
CLIENT_NS = f"{PREFIX}-client"
CLIENT2_NS = f"{PREFIX}-client2"
VIP = str(lab.LB_ADDR)
BACKENDS = [str(lab.SUBNET[lab.BACKEND_BASE + i]) for i in range(3)]
NAMES = {addr: f"backend-{c}" for addr, c in zip(BACKENDS, "abc")}


def xdplb(*args, exec_in: str | None = None, check: bool = True, timeout: float = 60):
    """Runs the CLI as a user would; exec_in runs it under `ip netns exec NS`."""
    cmd = [sys.executable, "-m", "xdplb", *args]
    if exec_in:
        cmd = ["ip", "netns", "exec", exec_in, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    return proc


class NsThread(threading.Thread):
    """A thread that enters a network namespace, runs fn and keeps its result."""

    def __init__(self, netns: str, fn):
        super().__init__(daemon=True)
        self.netns, self.fn, self.result, self.error = netns, fn, None, None

    def run(self):
        try:
            enter_netns(self.netns)
            self.result = self.fn()
        except BaseException as exc:  # reported by the test
            self.error = exc


def in_ns(netns: str, fn):
    t = NsThread(netns, fn)
    t.start()
    t.join(120)
    if t.error:
        raise t.error
    return t.result


def lb_counters() -> dict:
    """The LB's non-zero action counters and its veth's XDP drop and error counts: said by
    assertions about traffic, so a rare failure shows what the data plane did and whether
    the veth lost transmitted frames."""
    out = xdplb("-n", LB_NS, "stats", "eth0", "--json", "--interval", "0", check=False).stdout
    try:
        counters = {k: v for k, v in json.loads(out)[0]["counters"].items() if v}
    except (ValueError, LookupError):
        counters = {"stats": out.strip()}
    nic = subprocess.run(["nsenter", f"--net=/run/netns/{LB_NS}", "ethtool", "-S", "eth0"],
                         capture_output=True, text=True).stdout
    for line in nic.splitlines():
        name, _, value = line.strip().partition(": ")
        if ("drop" in name or "error" in name) and value.strip() not in ("", "0"):
            counters[f"eth0 {name}"] = value.strip()
    return counters


def get(host: str = VIP, port: int = 80, timeout: float = 5) -> str:
    """One request on a new connection that the server closes first, so the backend
    holds the TIME_WAIT (the case that exposes SNAT port reuse)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, body
        return resp.getheader("X-Backend") or body
    finally:
        conn.close()


@dataclass
class KeepAliveResult:
    backends: list[str]
    errors: list[str]


def keepalive_client(requests: int, pause: float = 0.0, stop=None) -> KeepAliveResult:
    """One keep-alive connection doing `requests` requests (or until stop is set)."""
    out = KeepAliveResult([], [])
    conn = http.client.HTTPConnection(VIP, 80, timeout=10)
    try:
        n = 0
        while n < requests and not (stop and stop.is_set()):
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                out.backends.append(resp.getheader("X-Backend"))
            except Exception as exc:  # counted as a failed request
                out.errors.append(repr(exc))
                break
            n += 1
            if pause:
                time.sleep(pause)
    finally:
        conn.close()
    return out


def start_server(netns: str, port: int, directory: str, bind: str = "0.0.0.0") -> subprocess.Popen:
    """A plain HTTP server of the test's own (not a lab backend), in a namespace; bound
    to "::", it answers both families (http.server makes that socket dual-stack)."""
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-m", "http.server",
                             str(port), "--bind", bind, "--directory", directory],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        r = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "ss", "-Hltn", f"sport = :{port}"],
                           capture_output=True, text=True)
        if r.stdout.strip():
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"test server on {netns}:{port} did not start")


def udp_answerers(vip: str, port: int, count: int = 40) -> set[str]:
    """Who answered: one datagram to vip:port from each of `count` client ports (run it in
    the client's namespace). The socket is connected, so only answers from the VIP count."""
    family, anywhere = (socket.AF_INET6, "::") if ":" in vip else (socket.AF_INET, "0.0.0.0")
    seen = set()
    for client_port in range(41000, 41000 + count):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((anywhere, client_port))
            s.settimeout(3)
            s.connect((vip, port))
            s.send(b"ping")
            seen.add(s.recv(200).split(b" ")[0].decode())
    return seen


def backends_ready(forward: str) -> None:
    """Prepares the lab's backends for services of one forwarding mode (lab.prepare_backend)."""
    for host in lab.existing_hosts(PREFIX):
        if host.role == "backend":
            lab.prepare_backend(host, forward)


def xdp_on(netns: str, ifname: str = "eth0") -> str:
    return subprocess.run(["ip", "-n", netns, "-d", "link", "show", ifname], capture_output=True,
                          text=True).stdout


@pytest.fixture(scope="session")
def testlab(bpf_object):
    for tool in ("ip", "ethtool", "nsenter", "curl"):
        require(shutil.which(tool) is not None, f"needs {tool}")
    lab.down(PREFIX)
    try:
        lab.up(backends=3, clients=2, prefix=PREFIX)
        yield
    finally:
        xdplb("-n", LB_NS, "detach", "eth0", check=False)
        lab.down(PREFIX)


@pytest.fixture
def attached(testlab):
    """xdplb on the lab's load balancer with backends a and b, in native mode (the lab
    prepares its veths for it); detached afterwards. Tests that attach by themselves use
    auto, which is generic on a veth: both modes are covered."""
    xdplb("-n", LB_NS, "attach", "eth0", "--mode", "native", "--backends", ",".join(BACKENDS[:2]),
          "--flows", "65536")
    try:
        yield
    finally:
        xdplb("-n", LB_NS, "detach", "eth0", check=False)


