# SPDX-License-Identifier: Apache-2.0
"""Runtime control on a running data plane: the CLI's output and errors (CliRunner,
in the load balancer's namespace), and changes under load."""
from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time

from click.testing import CliRunner

from xdplb import abi, cli, loader
from xdplb import trace as trace_mod

from .conftest import BACKENDS, CLIENT2_NS, CLIENT_NS, LB_NS, NAMES, VIP, NsThread, get, in_ns, xdplb

A, B, C = BACKENDS


def run(*args):
    """The CLI in-process (CliRunner), in a thread inside the load balancer's namespace."""
    return in_ns(LB_NS, lambda: CliRunner().invoke(cli.main, list(args)))


def lines(result) -> list[str]:
    return result.output.strip().splitlines()


def test_service_and_backend_commands(attached):
    r = run("service", "add", "eth0", f"{VIP}:8080")
    assert (r.exit_code, lines(r)) == (0, [f"eth0: + service {VIP}:8080/tcp -> no backends"])
    r = run("service", "add", "eth0", f"{VIP}:8080/tcp")
    assert r.exit_code == 2 and f"service {VIP}:8080/tcp already exists" in r.output

    r = run("backend", "add", "eth0", f"{VIP}:8080", f"{C}:80", "--weight", "2")
    assert lines(r) == [f"eth0: service {VIP}:8080/tcp: + backend {C}:80 weight 2"]
    assert in_ns(CLIENT_NS, lambda: get(port=8080)) == NAMES[C]
    r = run("backend", "list", "eth0", f"{VIP}:8080", "--json")
    assert json.loads(r.output) == [{"address": C, "port": 80, "weight": 2, "active_flows": 0, "new_flows": 1}]

    r = run("backend", "set", "eth0", f"{VIP}:8080", f"{C}:80", "--weight", "0")
    assert lines(r) == [f"eth0: service {VIP}:8080/tcp: ~ backend {C}:80 weight 2 -> 0"]
    r = run("backend", "del", "eth0", f"{VIP}:8080", "10.42.0.9")
    assert r.exit_code == 1  # not found: the command was well formed
    assert lines(r) == [f"Error: no backend 10.42.0.9:8080 in {VIP}:8080/tcp (backends: {C}:80)"]
    r = run("service", "list", "eth0")
    assert lines(r) == [f"{VIP}:80/tcp  nat  backends 2  clients any  ring 65537",
                        f"{VIP}:8080/tcp  nat  backends 1  clients any  ring 65537"]
    r = run("service", "del", "eth0", f"{VIP}:8080")
    assert lines(r) == [f"eth0: - service {VIP}:8080/tcp"]
    r = run("service", "del", "eth0", f"{VIP}:9999")
    assert r.exit_code == 1 and f"no service {VIP}:9999/tcp here (services: {VIP}:80/tcp)" in r.output
    r = run("service", "add", "eth0", VIP)
    assert r.exit_code == 2 and "bad service" in r.output


def test_unreachable_backend_changes_nothing(attached):
    before = run("backend", "list", "eth0", f"{VIP}:80", "--json").output
    r = run("backend", "add", "eth0", f"{VIP}:80", "10.42.0.9")
    assert r.exit_code == 1
    assert lines(r) == ["Error: backend 10.42.0.9: no ARP answer from 10.42.0.9 on eth0; "
                        "check that it is up and reachable (ping 10.42.0.9)"]
    assert run("backend", "list", "eth0", f"{VIP}:80", "--json").output == before


def test_commands_on_an_interface_without_xdplb(testlab):
    for args in (["backend", "list", "eth0", f"{VIP}:80"], ["service", "list", "eth0"], ["stats", "eth0"],
                 ["export", "eth0"], ["service", "add", "eth0", f"{VIP}:81"]):
        r = run(*args)
        assert r.exit_code == 1, args
        assert lines(r) == ["Error: xdplb is not attached to eth0; attach it first: "
                            "xdplb attach eth0 --backends ADDR,..."]


def test_export_apply_round_trip_dry_run_and_idempotence(attached, tmp_path):
    exported = run("export", "eth0").output
    path = tmp_path / "lb.toml"
    path.write_text(exported)
    assert lines(run("apply", str(path))) == ["no changes: the running state matches"]
    r = run("apply", str(path), "--dry-run")
    assert r.exit_code == 0 and lines(r) == ["no changes: the running state matches"]
    path.write_text(exported.replace(f'{{ address = "{B}", port = 80, weight = 1 }}',
                                     f'{{ address = "{B}", port = 80, weight = 4 }}'))
    r = run("apply", str(path), "--dry-run")
    assert r.exit_code == 3  # changes pending
    assert lines(r) == [f"would: eth0: service {VIP}:80/tcp: ~ backend {B}:80 weight 1 -> 4"]
    assert run("export", "eth0").output == exported
    r = run("apply", str(path))
    assert lines(r) == [f"eth0: service {VIP}:80/tcp: ~ backend {B}:80 weight 1 -> 4"]
    assert lines(run("apply", str(path))) == ["no changes: the running state matches"]
    assert run("export", "eth0").output == path.read_text()


def test_a_bad_config_applies_nothing(attached, tmp_path):
    exported = run("export", "eth0").output
    path = tmp_path / "bad.toml"
    path.write_text(exported.replace('weight = 1 }', 'weight = 1, wieght = 2 }', 1).replace("flows = 65536", "flows = 4096"))
    r = run("apply", str(path))
    assert r.exit_code == 1
    assert "2 problems, nothing applied" in r.output
    assert "interfaces.eth0.services[0].backends[0].wieght: unknown key (did you mean 'weight'?)" in r.output
    assert "interfaces.eth0.flows: the running flow table holds 65536 flows" in r.output
    assert run("export", "eth0").output == exported


def test_stats_json_and_watch(attached):
    in_ns(CLIENT_NS, lambda: [get() for _ in range(20)])
    (entry,) = json.loads(run("stats", "eth0", "--json", "--interval", "0.2").output)
    svc = entry["services"][0]
    assert svc["new_flows"] == 20 and sum(b["new_flows"] for b in svc["backends"]) == 20
    assert {"active_flows", "packets_per_s", "bytes_per_s"} <= set(svc) and svc["packets_per_s"] is not None
    # Without --interval: one sample, so no rates; the time is the wall clock's.
    before = time.time()
    (entry,) = json.loads(run("stats", "eth0", "--json").output)
    assert entry["services"][0]["packets_per_s"] is None and entry["services"][0]["new_flows"] == 20
    assert before <= entry["sampled_at"] <= time.time() and not any(k.startswith("_") for k in entry)
    watch = subprocess.Popen([sys.executable, "-m", "xdplb", "-n", LB_NS, "stats", "eth0", "--watch", "0.5"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=10)
    assert watch.returncode == 0, err
    assert out.count("(every 0.5s; Ctrl-C to stop)") >= 2 and f"{VIP}:80/tcp" in out


class Connections:
    """Clients that keep opening keep-alive connections (30 requests each), recording
    when each started and which backends answered it."""

    def __init__(self):
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done: list[tuple[float, set[str]]] = []
        self.errors: list[str] = []

    def client(self):
        while not self.stop.is_set():
            started = time.monotonic()
            seen = set()
            conn = http.client.HTTPConnection(VIP, 80, timeout=10)
            try:
                for _ in range(30):
                    conn.request("GET", "/")
                    resp = conn.getresponse()
                    resp.read()
                    seen.add(resp.getheader("X-Backend"))
                    time.sleep(0.01)
            except Exception as exc:  # a failed request is what the test counts
                with self.lock:
                    self.errors.append(repr(exc))
            finally:
                conn.close()
            with self.lock:
                self.done.append((started, seen))

    def run_in(self, netns: str, n: int):
        def body():
            workers = [threading.Thread(target=self.client) for _ in range(n)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(120)
        t = NsThread(netns, body)
        t.start()
        return t


def test_changes_under_fifty_keepalive_clients(attached, tmp_path):
    load = Connections()
    threads = [load.run_in(CLIENT_NS, 25), load.run_in(CLIENT2_NS, 25)]
    time.sleep(1.5)
    xdplb("-n", LB_NS, "backend", "add", "eth0", f"{VIP}:80", C)
    time.sleep(1.0)
    xdplb("-n", LB_NS, "backend", "set", "eth0", f"{VIP}:80", A, "--weight", "0")
    a_drained = time.monotonic()
    time.sleep(1.0)
    drain = subprocess.Popen([sys.executable, "-m", "xdplb", "-n", LB_NS, "backend", "del", "eth0", f"{VIP}:80",
                              B, "--drain", "--timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    first = drain.stderr.readline()  # "draining: N flows left" comes once weight 0 is in place
    b_drained = time.monotonic()
    drain_out, drain_err = drain.communicate(timeout=60)
    b_removed = time.monotonic()
    config = tmp_path / "lb.toml"
    config.write_text(xdplb("-n", LB_NS, "export", "eth0").stdout
                      .replace(f'{{ address = "{A}", port = 80, weight = 0 }},\n', "")
                      .replace(f'{{ address = "{C}", port = 80, weight = 1 }}',
                               f'{{ address = "{C}", port = 80, weight = 1 }},\n  {{ address = "{B}", port = 80, weight = 2 }}'))
    applied = xdplb("-n", LB_NS, "apply", str(config)).stdout
    time.sleep(1.5)
    load.stop.set()
    for t in threads:
        t.join(60)
        assert t.error is None

    assert f"- backend {A}:80" in applied and f"+ backend {B}:80 weight 2" in applied
    assert drain.returncode == 0 and first.startswith("draining:"), first + drain_err
    assert f"- backend {B}:80" in drain_out
    assert "warning" not in drain_err, drain_err
    assert b_removed - b_drained < 30
    assert load.errors == []
    assert all(len(seen) == 1 for _, seen in load.done)
    margin = 0.2  # a SYN already on the wire when the ring changed
    assert not [1 for start, seen in load.done if start > a_drained + margin and NAMES[A] in seen]
    assert not [1 for start, seen in load.done if b_drained + margin < start < b_removed and NAMES[B] in seen]
    assert any(NAMES[C] in seen for _, seen in load.done)
    # Every connection the clients made is one new flow in the service's counters.
    (entry,) = json.loads(xdplb("-n", LB_NS, "stats", "eth0", "--json", "--interval", "0").stdout)
    assert entry["services"][0]["new_flows"] == len(load.done), json.dumps(entry["counters"])


def _tracing() -> bool:
    return json.loads(run("status", "eth0", "--json").output)[0]["trace"]


def _trace_flag_left() -> bool:
    """The raw trace flag in the config map (status reports only a live lease)."""
    def read():
        found = loader.find("eth0")
        try:
            return bool(found.dataplane._config().flags & abi.ConfigFlags.TRACE)
        finally:
            found.dataplane.close()
    return in_ns(LB_NS, read)


def _start_tracer() -> subprocess.Popen:
    tracer = subprocess.Popen([sys.executable, "-m", "xdplb", "-n", LB_NS, "trace", "eth0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert "tracing eth0" in tracer.stderr.readline()
    return tracer


def test_a_killed_trace_stops_tracing_within_its_lease(attached):
    """SIGKILL runs no cleanup: the flag stays, the lease it stopped renewing runs out.
    A closed terminal (SIGHUP) switches tracing off at once."""
    tracer = _start_tracer()
    try:
        time.sleep(trace_mod.LEASE_S + 1)  # renewed while it runs
        assert _tracing()
        tracer.kill()
        tracer.wait(10)
        deadline = time.monotonic() + trace_mod.LEASE_S + 2
        while _tracing():
            assert time.monotonic() < deadline, "tracing still on after the lease should have run out"
            time.sleep(0.2)
        assert _trace_flag_left()

        tracer = _start_tracer()
        assert _tracing()
        tracer.send_signal(signal.SIGHUP)
        assert tracer.wait(10) == 0
        assert not _tracing() and not _trace_flag_left()
    finally:
        tracer.kill()
        tracer.wait(10)


def test_changes_to_one_interface_wait_for_each_other(attached):
    """A change holds the interface's lock from reading the maps to its last write: a
    second command, entered with -n or under `ip netns exec`, waits for it, then plans
    from what the first one wrote."""
    from xdplb import locking
    held, release = threading.Event(), threading.Event()

    def hold():
        with locking.interface("eth0"):
            held.set()
            release.wait(30)
    holder = NsThread(LB_NS, hold)
    holder.start()
    assert held.wait(10)
    cmds = [[sys.executable, "-m", "xdplb", "-n", LB_NS, "service", "add", "eth0", f"{VIP}:8081"],
            ["ip", "netns", "exec", LB_NS, sys.executable, "-m", "xdplb", "service", "add", "eth0", f"{VIP}:8082"]]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in cmds]
    try:
        time.sleep(2)
        assert [p.poll() for p in procs] == [None, None], "a change went ahead while the interface was locked"
    finally:
        release.set()
        holder.join(10)
    try:
        outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        assert outputs == [f"eth0: + service {VIP}:8081/tcp -> no backends",
                           f"eth0: + service {VIP}:8082/tcp -> no backends"]
        r = run("backend", "add", "eth0", f"{VIP}:8081", f"{C}:80")
        assert r.exit_code == 0, r.output
        status = json.loads(run("status", "eth0", "--json").output)[0]
        ids = {s["port"]: [b["id"] for b in s["backends"]] for s in status["services"]}
        assert len({i for v in ids.values() for i in v}) == sum(len(v) for v in ids.values()), ids
    finally:
        for port in (8081, 8082):
            run("service", "del", "eth0", f"{VIP}:{port}")


def test_a_long_lived_reader_keeps_the_maps_open_until_the_program_changes(attached):
    """serve's scrapes read through report.Readers: the same attachment (its flow table
    mapped once) from one read to the next, a new one after a detach and attach."""
    from xdplb import report

    def reads():
        readers = report.Readers()
        try:
            [(_, first)] = list(readers.each("eth0"))
            [(_, again)] = list(readers.each("eth0"))
            stats = report.stats("eth0", readers)
            same = first is again and stats[0]["program_id"] == first.prog_id
            xdplb("-n", LB_NS, "detach", "eth0")
            xdplb("-n", LB_NS, "attach", "eth0", "--mode", "native", "--backends", BACKENDS[0], "--flows", "65536")
            [(_, renewed)] = list(readers.each("eth0"))
            return same, first.prog_id, renewed.prog_id, first.dataplane.fds, renewed is not first
        finally:
            readers.close()
    same, old_id, new_id, old_fds, replaced = in_ns(LB_NS, reads)
    assert same and replaced and new_id != old_id
    assert old_fds == {}  # the old attachment's maps were closed when it was replaced


def test_flows_lists_open_connections(attached):
    """`xdplb flows`: each open connection once, as the client, the balancer and the
    backend know it; filters and the limit."""
    import socket as socket_mod

    def open_connections(n):
        out = []
        for _ in range(n):
            s = socket_mod.create_connection((VIP, 80), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(4096)  # served: the handshake is over on both sides
            out.append(s)
        return out
    conns = in_ns(CLIENT_NS, lambda: open_connections(2))
    try:
        clients = {f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in conns}
        (entry,) = json.loads(run("flows", "eth0", "--json").output)
        mine = [c for c in entry["connections"] if c["client"] in clients]
        assert len(mine) == 2 and entry["total"] >= 2
        for c in mine:
            host, port = c["via"].rsplit(":", 1)
            assert (c["proto"], c["vip"], c["state"]) == ("tcp", f"{VIP}:80", "ESTABLISHED")
            assert c["backend"] in {f"{b}:80" for b in BACKENDS[:2]} and host == VIP and 10000 <= int(port) <= 32767
            assert 0 <= c["idle_s"] < 60
        backend = mine[0]["backend"]
        (only,) = json.loads(run("flows", "eth0", "--service", f"{VIP}:80", "--backend", backend, "--json").output)
        assert {c["backend"] for c in only["connections"]} == {backend}
        (one,) = json.loads(run("flows", "eth0", "--limit", "1", "--json").output)
        assert one["shown"] == 1 and one["total"] == entry["total"]
        text = run("flows", "eth0").output
        assert all(client in text for client in clients) and "ESTABLISHED" in text
        r = run("flows", "eth0", "--service", f"{VIP}:81")
        assert r.exit_code == 1 and f"no service {VIP}:81/tcp here" in r.output
    finally:
        for s in conns:
            s.close()
