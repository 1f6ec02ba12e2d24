# SPDX-License-Identifier: Apache-2.0
"""Health checks of backends: TCP connect, HTTP(S) GET, UDP request/answer, or a command.

One thread per target (for serve: a checked backend of a service on an interface)
probes every `interval`; `fall` failures in a row mark a backend down and `rise`
successes mark it up again. Backends start up, so a restart of `xdplb serve` does not
empty the rings while the first probes run.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass


KINDS = ("tcp", "http", "udp", "command")
CHECK_KEYS = {"type", "port", "path", "expect_status", "send", "expect", "command", "interval",
              "timeout", "rise", "fall", "tls", "server_name", "verify"}


@dataclass(frozen=True)
class CheckSpec:
    type: str = "tcp"
    port: int | None = None  # default: the backend's port
    path: str = "/"
    expect_status: int = 200
    tls: bool = False  # http: HTTPS
    server_name: str = ""  # https: SNI and the name the certificate must have (default: the address)
    verify: bool = True  # https: check the certificate against the system's CAs
    send: str = "ping"  # udp: datagram to send
    expect: str = ""  # udp: the answer must contain this
    command: tuple[str, ...] = ()  # command: argv; {address} and {port} are filled in
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3


def parse_check(where: str, table, fail) -> CheckSpec | None:
    """Validates a service's `health = { ... }` table, reporting problems through fail()."""
    if not isinstance(table, dict):
        fail(where, "must be a table like { type = \"http\", path = \"/\" }")
        return None
    ok = True
    for key in table:
        if key not in CHECK_KEYS:
            fail(f"{where}.{key}", f"unknown key; allowed: {', '.join(sorted(CHECK_KEYS))}")
            ok = False
    kind = table.get("type", CheckSpec.type)
    if kind not in KINDS:
        fail(f"{where}.type", f"must be one of {', '.join(KINDS)}, not {kind!r}")
        ok = False
    numbers = {"interval": (0.05, 3600.0), "timeout": (0.01, 600.0)}
    # Whole numbers only: port = 80.5 would reach socket.connect() in the checker thread.
    whole = {"rise": (1, 100), "fall": (1, 100), "port": (1, 65535), "expect_status": (100, 599)}
    values = {}
    for key, (low, high) in (numbers | whole).items():
        if key in table:
            v = table[key]
            kinds = int if key in whole else (int, float)
            if isinstance(v, bool) or not isinstance(v, kinds) or not low <= v <= high:
                fail(f"{where}.{key}", f"must be a {'whole ' if key in whole else ''}number from {low} to {high}, "
                                       f"not {v!r}")
                ok = False
            values[key] = v
    if kind == "command":
        cmd = table.get("command")
        if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
            fail(f"{where}.command", "give the command as a list of strings, like [\"check\", \"{address}\"]")
            ok = False
        else:
            values["command"] = tuple(cmd)
    for key in ("tls", "verify"):
        if key in table:
            if not isinstance(table[key], bool):
                fail(f"{where}.{key}", f"must be true or false, not {table[key]!r}")
                ok = False
            values[key] = table[key]
    if (table.get("tls") is not None or "server_name" in table or "verify" in table) and kind != "http":
        fail(where, "tls, server_name and verify apply to type = \"http\" only")
        ok = False
    for key, example in (("path", '"/healthz"'), ("send", '"ping"'), ("expect", '"pong"'),
                         ("server_name", '"www.example.com"')):
        if key in table:
            if not isinstance(table[key], str):
                fail(f"{where}.{key}", f"must be a string like {example}, not {table[key]!r}")
                ok = False
            values[key] = table[key]
    if not ok:
        return None
    spec = CheckSpec(type=kind, **values)
    if spec.timeout >= spec.interval:
        fail(f"{where}.timeout", f"must be shorter than the interval ({spec.interval:g}s)")
        return None
    return spec


class _BackendHTTPS(http.client.HTTPSConnection):
    """HTTPS to one backend's address, whatever the name resolves to: the name is for SNI,
    the certificate's check and the Host header."""

    def __init__(self, address: str, port: int, name: str, timeout: float, verify: bool):
        context = ssl.create_default_context()
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        super().__init__(name, port, timeout=timeout, context=context)
        self.backend_address = address
        self.tls_context = context

    def connect(self) -> None:
        sock = socket.create_connection((self.backend_address, self.port), self.timeout)
        self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)


def probe(spec: CheckSpec, address: str, port: int) -> tuple[bool, str]:
    """One check; returns (healthy, reason)."""
    port = spec.port or port
    try:
        if spec.type == "tcp":
            with socket.create_connection((address, port), timeout=spec.timeout):
                return True, "connected"
        if spec.type == "http":
            conn = (_BackendHTTPS(address, port, spec.server_name or address, spec.timeout, spec.verify)
                    if spec.tls else http.client.HTTPConnection(address, port, timeout=spec.timeout))
            try:
                conn.request("GET", spec.path, headers={"Connection": "close", "User-Agent": "xdplb-health"})
                status = conn.getresponse().status
            finally:
                conn.close()
            return status == spec.expect_status, f"HTTP {status}"
        if spec.type == "udp":
            with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(spec.timeout)
                s.connect((address, port))
                s.send(spec.send.encode())
                answer = s.recv(4096).decode(errors="replace")
            return spec.expect in answer, "answered" if spec.expect in answer else f"unexpected answer {answer[:40]!r}"
        argv = [a.replace("{address}", address).replace("{port}", str(port)) for a in spec.command]
        proc = subprocess.run(argv, capture_output=True, timeout=spec.timeout)
        return proc.returncode == 0, f"exit status {proc.returncode}"
    except (OSError, http.client.HTTPException, subprocess.TimeoutExpired) as exc:
        return False, type(exc).__name__ + (f": {exc}" if str(exc) else "")


@dataclass
class BackendHealth:
    up: bool = True
    streak: int = 0  # consecutive results that disagree with `up`


class Checker:
    """Runs the checks of a set of targets; on_change(target, up, reason) is called from
    a checker thread whenever a backend's state flips. observe(target, seconds, ok) is
    called after every probe (for latency metrics). on_error(target, exc) is called when
    a check raises something unexpected (a bug, not a failed backend)."""

    def __init__(self, on_change, observe=lambda target, seconds, ok: None, on_error=lambda target, exc: None):
        self.on_change = on_change
        self.observe = observe
        self.on_error = on_error
        self.state: dict[tuple, BackendHealth] = {}
        self.specs: dict[tuple, CheckSpec] = {}
        self._stops: dict[tuple, threading.Event] = {}
        self.lock = threading.Lock()

    def set_targets(self, targets: dict[tuple, tuple[CheckSpec, str, int]]) -> None:
        """targets: key -> (spec, address, port). Keeps the state of targets that stay."""
        with self.lock:
            for key in list(self._stops):
                if key not in targets or self.specs[key] != targets[key][0]:
                    self._stops.pop(key).set()
                    self.specs.pop(key, None)
                    if key not in targets:
                        self.state.pop(key, None)
            for key, (spec, address, port) in targets.items():
                if key in self._stops:
                    continue
                self.state.setdefault(key, BackendHealth())
                self.specs[key] = spec
                stop = threading.Event()
                self._stops[key] = stop
                threading.Thread(target=self._run, args=(key, spec, address, port, stop), daemon=True,
                                 name=f"health {key}").start()

    def is_up(self, key) -> bool:
        with self.lock:
            return self.state.get(key, BackendHealth()).up

    def stop(self) -> None:
        with self.lock:
            for stop in self._stops.values():
                stop.set()
            self._stops.clear()

    def _run(self, key, spec: CheckSpec, address: str, port: int, stop: threading.Event) -> None:
        while not stop.wait(spec.interval):
            try:
                self._check(key, spec, address, port, stop)
            except Exception as exc:  # the thread must outlive any one check
                # Neither up nor down: a bug in a check says nothing about the backend, and
                # counting it as a failure would take every backend out of its ring.
                try:
                    self.on_error(key, exc)
                except Exception:  # nowhere left to report it
                    pass

    def _check(self, key, spec: CheckSpec, address: str, port: int, stop: threading.Event) -> None:
        """One probe and its effect on the backend's state."""
        started = time.monotonic()
        ok, reason = probe(spec, address, port)
        elapsed = time.monotonic() - started
        self.observe(key, elapsed, ok)
        flipped = None
        with self.lock:
            if stop.is_set():
                return
            h = self.state[key]
            if ok == h.up:
                h.streak = 0
            else:
                h.streak += 1
                if h.streak >= (spec.rise if ok else spec.fall):
                    h.up, h.streak = ok, 0
                    flipped = ok
        if flipped is not None:
            self.on_change(key, flipped, reason)

