# SPDX-License-Identifier: Apache-2.0
"""`xdplb serve` in the lab: health checks under load, reloads, upgrades, a killed
control process, and the metrics endpoint parsed by Prometheus' own parser."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xdplb import __version__, abi, lab

from .conftest import (BACKENDS, CLIENT2_NS, CLIENT_NS, LB_NS, NAMES, PREFIX, VIP, NsThread, get, in_ns,
                       keepalive_client, xdplb)

A, B, C = BACKENDS
INTERVAL, FALL, RISE = 0.3, 2, 2
METRICS_PORT = 19433


def config_text(weights=(1, 1)) -> str:
    return f"""
[interfaces.eth0]
flows = 65536

[[interfaces.eth0.services]]
vip = "{VIP}"
port = 80
backends = [ {{ address = "{A}", weight = {weights[0]} }}, {{ address = "{B}", weight = {weights[1]} }} ]
health = {{ type = "http", path = "/", interval = {INTERVAL}, timeout = 0.2, rise = {RISE}, fall = {FALL} }}
"""


class Serve:
    """An `xdplb serve` process of the test's own, with its log collected."""

    def __init__(self, path: Path, *extra: str):
        self.log_path = path.with_suffix(".log")
        self.proc = subprocess.Popen([sys.executable, "-m", "xdplb", "-n", LB_NS, "serve", str(path),
                                      "--metrics", f"127.0.0.1:{METRICS_PORT}", *extra],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log_path, "w"))
        self.wait_for("event=started")

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 15, after: int = 0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log()[after:]):
                return time.monotonic()
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited ({self.proc.returncode}): {self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in serve's log within {timeout}s:\n{self.log()}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def served(testlab, tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text(config_text())
    server = Serve(path)
    try:
        yield server, path
    finally:
        server.stop()
        xdplb("-n", LB_NS, "detach", "eth0", check=False)
        lab.up(backends=3, clients=2, prefix=PREFIX)  # restarts any server a test stopped


def scrape() -> dict:
    text = in_ns(LB_NS, lambda: urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics",
                                                       timeout=5).read().decode())
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def service_labels() -> tuple:
    return (("interface", "eth0"), ("port", "80"), ("proto", "tcp"), ("service", f"{VIP}:80/tcp"), ("vip", VIP))


def backend_labels(backend: str) -> tuple:
    return tuple(sorted(service_labels() + (("backend", f"{backend}:80"),)))


class Load:
    """Keep-alive clients (one connection each, until stopped) in both client namespaces."""

    def __init__(self, per_ns: int = 10):
        self.stop = threading.Event()
        self.results: list = []
        self.lock = threading.Lock()
        self.threads = [NsThread(ns, self._clients(per_ns)) for ns in (CLIENT_NS, CLIENT2_NS)]
        for t in self.threads:
            t.start()

    def _clients(self, n):
        def body():
            def one():
                r = keepalive_client(1_000_000, 0.01, self.stop)
                with self.lock:
                    self.results.append(r)
            workers = [threading.Thread(target=one) for _ in range(n)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(120)
        return body

    def finish(self) -> list:
        self.stop.set()
        for t in self.threads:
            t.join(120)
            assert t.error is None
        return self.results


def test_a_dead_backend_is_taken_out_and_comes_back(served):
    server, _ = served
    load = Load()
    time.sleep(1.0)
    pidfile = lab.STATE_DIR / PREFIX / f"{PREFIX}-backend-a.pid"
    os.killpg(int(pidfile.read_text()), signal.SIGTERM)
    killed = time.monotonic()
    down_at = server.wait_for(rf"event=backend_down .*backend={A}:80")
    assert down_at - killed <= INTERVAL * (FALL + 1) + 1.0
    server.wait_for(rf"event=flows_reset .*backend={A}:80")  # logged once the ring no longer has it
    # New connections now only go to b.
    fresh = in_ns(CLIENT_NS, lambda: [get() for _ in range(30)])
    assert set(fresh) == {NAMES[B]}
    results = load.finish()
    on_b = [r for r in results if r.backends and r.backends[0] == NAMES[B]]
    assert on_b and all(not r.errors for r in on_b)
    assert all(len(set(r.backends)) <= 1 for r in results)
    assert scrape()[("xdplb_backend_up", backend_labels(A))] == 0

    size = len(server.log())
    lab.up(backends=3, clients=2, prefix=PREFIX)
    server.wait_for(rf"event=backend_up .*backend={A}:80", after=size)
    server.wait_for(rf"backend {A}:80 weight 0 -> 1", after=size)  # the ring has it again
    assert NAMES[A] in in_ns(CLIENT_NS, lambda: {get() for _ in range(40)})
    assert scrape()[("xdplb_backend_up", backend_labels(A))] == 1


def test_sighup_applies_a_good_file_and_refuses_a_broken_one(served):
    server, path = served
    path.write_text(config_text(weights=(1, 0)))
    size = len(server.log())
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for("event=reloaded", after=size)
    assert f"~ backend {B}:80 weight 1 -> 0" in server.log()[size:]
    assert set(in_ns(CLIENT_NS, lambda: [get() for _ in range(20)])) == {NAMES[A]}
    m = scrape()
    assert m[("xdplb_reloads_total", (("result", "applied"),))] == 1
    assert abs(m[("xdplb_last_reload_timestamp_seconds", ())] - time.time()) < 60

    path.write_text(config_text() + "\nthis is not toml\n")
    size = len(server.log())
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for("event=reload_failed", after=size)
    assert "not valid TOML" in server.log()[size:]
    assert server.proc.poll() is None
    assert scrape()[("xdplb_reloads_total", (("result", "failed"),))] == 1
    exported = xdplb("-n", LB_NS, "export", "eth0").stdout
    assert f'{{ address = "{B}", port = 80, weight = 0 }}' in exported
    assert set(in_ns(CLIENT_NS, lambda: [get() for _ in range(20)])) == {NAMES[A]}


def test_sighup_with_wrong_typed_values_is_refused_and_serve_keeps_forwarding(served):
    """clients = 10 used to raise TypeError in the reload (ending serve), and a health port
    of 80.5 to raise in the udp checker's thread (ending that backend's checks)."""
    server, path = served
    path.write_text(config_text().replace("port = 80\n", "port = 80\nclients = 10\n", 1)
                    .replace('type = "http"', 'type = "udp", port = 80.5'))
    size = len(server.log())
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for("event=reload_failed", after=size)
    log = server.log()[size:]
    assert "interfaces.eth0.services[0].clients: must be an array of CIDR strings like" in log
    assert "interfaces.eth0.services[0].health.port: must be a whole number from 1 to 65535, not 80.5" in log
    time.sleep(INTERVAL * (FALL + 2))  # the running checks go on as they were
    assert server.proc.poll() is None
    assert "Traceback" not in server.log() and "event=backend_down" not in server.log()
    assert set(in_ns(CLIENT_NS, lambda: [get() for _ in range(20)])) == {NAMES[A], NAMES[B]}
    assert scrape()[("xdplb_backend_up", backend_labels(A))] == 1


def test_upgrade_under_load_keeps_every_connection(served):
    before = int(re.search(r"program (\d+)", xdplb("-n", LB_NS, "status", "eth0").stdout).group(1))
    load = Load()
    time.sleep(1.0)
    out = xdplb("-n", LB_NS, "upgrade", "eth0").stdout
    time.sleep(1.0)
    results = load.finish()
    after = int(re.search(r"program (\d+)", xdplb("-n", LB_NS, "status", "eth0").stdout).group(1))
    assert after != before and f"program {before} -> {after}" in out
    assert len(results) == 20
    assert all(not r.errors for r in results), [r.errors for r in results if r.errors]
    assert all(len(set(r.backends)) == 1 and len(r.backends) > 50 for r in results)


def test_kill_9_of_serve_leaves_traffic_flowing_and_a_restart_picks_it_up(served, tmp_path):
    server, path = served
    load = Load()
    time.sleep(0.5)
    server.stop(signal.SIGKILL)
    time.sleep(1.5)
    results = load.finish()
    assert all(not r.errors for r in results)
    assert in_ns(CLIENT_NS, get).startswith("backend-")
    again = Serve(path)
    try:
        log = again.log()
        assert "event=change" not in log  # the running state already matched
        assert "event=upgraded" in log
        assert in_ns(CLIENT_NS, get).startswith("backend-")
    finally:
        again.stop()
    assert "event=stopped forwarding=yes" in again.log()
    assert in_ns(CLIENT_NS, get).startswith("backend-")


def test_metrics_parse_and_count_what_clients_did(served):
    in_ns(CLIENT_NS, lambda: [get() for _ in range(25)])
    m = scrape()
    assert m[("xdplb_service_flows_total", service_labels())] == 25
    flows = [m[("xdplb_backend_flows_total", backend_labels(b))] for b in (A, B)]
    assert sum(flows) == 25
    assert m[("xdplb_backend_weight", backend_labels(A))] == 1
    eth0 = (("interface", "eth0"),)
    assert m[("xdplb_flow_events_total", (("event", "new_flow"), ("interface", "eth0")))] == 25
    actions = {dict(labels)["action"]: v for (name, labels), v in m.items() if name == "xdplb_actions_total"}
    assert set(actions) == {"pass", "tx", "redirect", "drop"} and actions["tx"] > 0
    assert not any(name == "xdplb_packet_reasons_total" and dict(labels)["reason"] in actions
                   for name, labels in m)  # an action is never counted as a reason too
    assert m[("xdplb_flow_table_capacity", eth0)] == 65536
    assert m[("xdplb_flow_table_entries", eth0)] >= 2 * 25  # both entries of every flow, closed ones included
    [(_, info)] = [(n, dict(labels)) for n, labels in m if n == "xdplb_build_info"]
    assert info["version"] == __version__ and info["abi"] == str(abi.ABI_VERSION)
    assert m[("process_cpu_seconds_total", ())] > 0
    # Every connection took a SNAT source towards its backend, which its closed flow holds.
    held = {(labels, name): v for (name, labels), v in m.items()
            if name in ("xdplb_snat_ports_in_use", "xdplb_snat_ports_time_wait")}
    assert sum(held.values()) == 25
    assert {dict(labels)["backend"] for labels, _ in held} <= {f"{A}:80/tcp", f"{B}:80/tcp"}
    assert m[("xdplb_snat_exhausted_total", (("interface", "eth0"),))] == 0
    assert m[("xdplb_snat_ports_capacity", (("interface", "eth0"),))] > 0
    deadline = time.monotonic() + 5
    checks = 0
    while not checks and time.monotonic() < deadline:
        checks = sum(v for (name, _), v in scrape().items() if name == "xdplb_health_check_duration_seconds_count")
        time.sleep(0.2)
    assert checks > 0


def test_detach_on_exit(testlab, tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text(config_text())
    server = Serve(path, "--detach-on-exit")
    try:
        assert in_ns(CLIENT_NS, get).startswith("backend-")
    finally:
        server.stop()
    assert "event=stopped forwarding=no" in server.log()
    status = xdplb("-n", LB_NS, "status", "eth0").stdout
    assert "not attached" in status


def test_a_backend_rebuilt_with_a_new_mac_keeps_its_connections(served):
    """Backend a comes back with another MAC (as a rebuilt VM would). Once the kernel
    has learnt it (here the test writes the neighbour entry that ARP would), serve
    writes the new next hop and the established keep-alive connections carry on."""
    server, _ = served
    backend_ns = f"{PREFIX}-backend-a"

    def mac() -> str:
        out = subprocess.run(["ip", "-n", backend_ns, "-j", "link", "show", "eth0"], capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out)[0]["address"]

    def move_to(address: str) -> None:
        subprocess.run(["ip", "-n", backend_ns, "link", "set", "dev", "eth0", "address", address], check=True)
        subprocess.run(["ip", "-n", LB_NS, "neigh", "replace", A, "lladdr", address, "dev", "eth0",
                        "nud", "reachable"], check=True)

    old, new = mac(), "02:42:00:00:00:a9"
    load = Load(per_ns=5)
    try:
        time.sleep(1.0)
        size = len(server.log())
        move_to(new)
        server.wait_for(rf"event=next_hop_changed .*backend {A}:80 next hop {old} .*-> {new}", after=size)
        time.sleep(1.0)
    finally:
        results = load.finish()
        move_to(old)
    on_a = [r for r in results if NAMES[A] in r.backends]
    assert on_a and all(len(set(r.backends)) == 1 for r in results)
    assert all(not r.errors for r in results), [r.errors for r in results if r.errors]


def test_a_taken_metrics_port_is_refused_before_anything_changes(testlab, tmp_path):
    """serve binds its metrics port first: when another process holds it, serve says so
    and exits with the interface as it was (nothing attached)."""
    path = tmp_path / "lb.toml"
    path.write_text(config_text())

    def hold_port():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", METRICS_PORT))
        s.listen()
        return s
    holder = in_ns(LB_NS, hold_port)
    try:
        proc = subprocess.run([sys.executable, "-m", "xdplb", "-n", LB_NS, "serve", str(path),
                               "--metrics", f"127.0.0.1:{METRICS_PORT}"], capture_output=True, text=True, timeout=30)
    finally:
        holder.close()
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: cannot serve metrics on 127.0.0.1:{METRICS_PORT}: Address already in use; give another "
        "--metrics HOST:PORT"]
    assert "not attached" in xdplb("-n", LB_NS, "status", "eth0").stdout


def test_serve_tells_systemd_when_it_is_ready_alive_and_stopping(testlab, tmp_path):
    """Type=notify: READY=1 once the file is applied (traffic flows by then), WATCHDOG=1
    at half the watchdog period while the loop turns, STOPPING=1 on SIGTERM."""
    path = tmp_path / "lb.toml"
    path.write_text(config_text())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="400000")
    proc = subprocess.Popen([sys.executable, "-m", "xdplb", "-n", LB_NS, "serve", str(path), "--metrics",
                             f"127.0.0.1:{METRICS_PORT}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert listener.recv(200).decode().splitlines() == ["READY=1", "STATUS=serving 1 interfaces"]
        assert in_ns(CLIENT_NS, get).startswith("backend-")  # ready means forwarding
        assert [listener.recv(200) for _ in range(3)] == [b"WATCHDOG=1"] * 3
        proc.send_signal(signal.SIGTERM)
        while (message := listener.recv(200)) == b"WATCHDOG=1":
            pass
        assert message == b"STOPPING=1"
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
        xdplb("-n", LB_NS, "detach", "eth0", check=False)


def test_an_ipv6_service_is_health_checked_served_and_labelled(testlab, tmp_path):
    """A dsr IPv6 service beside the IPv4 one (the lab's backends hold its VIP on lo in
    every mode): serve checks its backends over IPv6, takes a dead one out, and the
    metrics name it in brackets."""
    hosts = {h.name: h for h in lab.hosts(PREFIX, 3, 2)}
    a6, b6 = hosts["backend-a"].address6, hosts["backend-b"].address6
    vip6 = str(lab.BYPASS_VIP6)
    path = tmp_path / "lb.toml"
    path.write_text(config_text() + f"""
[[interfaces.eth0.services]]
vip = "{vip6}"
port = 80
forward = "dsr"
backends = [ {{ address = "{a6}" }}, {{ address = "{b6}" }} ]
health = {{ type = "http", path = "/", interval = {INTERVAL}, timeout = 0.2, rise = {RISE}, fall = {FALL} }}
""")
    server = Serve(path)
    try:
        def fetch6(n):
            out = set()
            for _ in range(n):
                conn = http.client.HTTPConnection(vip6, 80, timeout=5)
                conn.request("GET", "/", headers={"Connection": "close"})
                resp = conn.getresponse()
                resp.read()
                out.add(resp.getheader("X-Backend"))
                conn.close()
            return out
        assert in_ns(CLIENT_NS, lambda: fetch6(40)) == {NAMES[A], NAMES[B]}
        pidfile = lab.STATE_DIR / PREFIX / f"{PREFIX}-backend-a.pid"
        os.killpg(int(pidfile.read_text()), signal.SIGTERM)
        server.wait_for(rf"event=backend_down .*backend=\[{a6}\]:80")
        server.wait_for(rf"event=flows_reset .*backend=\[{a6}\]:80")
        assert in_ns(CLIENT_NS, lambda: fetch6(20)) == {NAMES[B]}
        labels = tuple(sorted((("interface", "eth0"), ("port", "80"), ("proto", "tcp"),
                               ("service", f"[{vip6}]:80/tcp"), ("vip", vip6), ("backend", f"[{a6}]:80"))))
        assert scrape()[("xdplb_backend_up", labels)] == 0
    finally:
        server.stop()
        xdplb("-n", LB_NS, "detach", "eth0", check=False)
        lab.up(backends=3, clients=2, prefix=PREFIX)  # restarts the server the test stopped
