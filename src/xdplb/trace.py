# SPDX-License-Identifier: Apache-2.0
"""Reading the data plane's trace lines from trace_pipe and decoding them.

The program prints only while the trace flag of its configuration is set (one
predictable branch when off) and a deadline in the same configuration lies ahead: the
reader renews that lease while it reads (follow's renew), so a reader that dies stops
tracing within seconds.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import select
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import abi
from .errors import PrerequisiteError

# A trace lease's length, and how often a reader renews it: a reader that dies leaves
# tracing on for at most LEASE_S (within XDPLB_TRACE_LEASE_MAX_TICKS whatever the tick).
LEASE_S = 3.0
RENEW_S = 1.0
TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
ACTIONS = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}
EVENTS = {
    abi.TraceEvent.NEW_FLOW: "new", abi.TraceEvent.FLOW: "flow", abi.TraceEvent.REPLY: "reply",
    abi.TraceEvent.NO_BACKEND: "no-backend", abi.TraceEvent.NOT_ALLOWED: "not-allowed",
    abi.TraceEvent.TTL_EXPIRED: "ttl-expired", abi.TraceEvent.FRAGMENT: "fragment",
    abi.TraceEvent.TABLE_FULL: "table-full", abi.TraceEvent.NO_FLOW: "no-flow",
    abi.TraceEvent.ICMP: "icmp-error", abi.TraceEvent.SNAT_EXHAUSTED: "snat-exhausted",
    abi.TraceEvent.TOO_BIG: "too-big",
}
TCP_FLAGS = "FSRPAUEC"
PROTOS = {6: "tcp", 17: "udp", 1: "icmp"}


@dataclass
class TraceRecord:
    ifindex: int
    proto: int
    tcp_flags: int
    saddr: str
    sport: int
    daddr: str
    dport: int
    out_daddr: str
    out_dport: int
    backend: int
    event: str
    action: str

    def flags_text(self) -> str:
        if self.proto != 6:
            return "-"
        return "".join(c for i, c in enumerate(TCP_FLAGS) if self.tcp_flags & (1 << i)) or "."

    def __str__(self) -> str:
        dest = f"-> {_endpoint(self.out_daddr, self.out_dport)}" if self.out_daddr not in ("0.0.0.0", "::") else ""
        backend = f"backend {self.backend}" if self.backend != abi.NO_BACKEND else "no backend"
        return (f"{_endpoint(self.saddr, self.sport)} -> {_endpoint(self.daddr, self.dport)} "
                f"{PROTOS.get(self.proto, self.proto)} [{self.flags_text()}] {self.event} {backend} {dest} "
                f"{self.action}").replace("  ", " ")


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _address(text: str, v6: bool) -> str:
    """An address as a line carries it: IPv4 as hexadecimal, IPv6 as %pI6 prints it."""
    return str(ipaddress.IPv6Address(text)) if v6 else str(ipaddress.IPv4Address(int(text, 16)))


def decode(line: str) -> TraceRecord | None:
    """Decodes one trace_pipe line, or None if it is not one of ours."""
    v6 = False
    tag = abi.TRACE_TAG + " "
    at = line.find(tag)
    if at < 0:
        v6, tag = True, abi.TRACE_TAG6 + " "
        at = line.find(tag)
    if at < 0:
        return None
    fields = line[at + len(tag):].split()
    if len(fields) != 12:
        return None
    try:
        (ifindex, proto, flags, saddr, sport, daddr, dport, odaddr, odport, backend, event,
         action) = fields
        return TraceRecord(
            ifindex=int(ifindex), proto=int(proto), tcp_flags=int(flags, 16),
            saddr=_address(saddr, v6), sport=int(sport), daddr=_address(daddr, v6), dport=int(dport),
            out_daddr=_address(odaddr, v6), out_dport=int(odport),
            backend=int(backend), event=EVENTS.get(int(event), f"event{event}"),
            action=ACTIONS.get(int(action), f"action{action}"))
    except ValueError:
        return None


def tracefs() -> Path:
    """The tracefs mount, mounting it at /sys/kernel/tracing when absent."""
    for path in TRACEFS_CANDIDATES:
        if (path / "trace_pipe").exists():
            return path
    path = TRACEFS_CANDIDATES[0]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tracefs", str(path).encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise PrerequisiteError(f"cannot mount tracefs on {path}: {os.strerror(err)}; "
                                f"mount it with: mount -t tracefs tracefs {path}")
    return path


def follow(ifindex: int | None, raw: bool = False, duration: float | None = None,
           stop=lambda: False, renew: Callable[[], None] | None = None) -> Iterator[str]:
    """Yields decoded lines (or raw ones) for interface ifindex (every interface when
    None) until duration elapses or stop() says so, calling renew() (the trace lease)
    every RENEW_S meanwhile. Renewed only while the caller takes lines: a reader that
    stops reading stops tracing too."""
    pipe = tracefs() / "trace_pipe"
    deadline = time.monotonic() + duration if duration else None
    renewed = time.monotonic()
    fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    pending = b""
    try:
        while not stop():
            if renew is not None and time.monotonic() - renewed >= RENEW_S:
                renew()
                renewed = time.monotonic()
            timeout = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
            ready, _, _ = select.select([fd], [], [], timeout)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    chunk = b""
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw_line in lines:
                    line = raw_line.decode(errors="replace")
                    record = decode(line)
                    if record is None or (ifindex is not None and record.ifindex != ifindex):
                        continue
                    yield line if raw else str(record)
            if deadline is not None and time.monotonic() >= deadline:
                return
    finally:
        os.close(fd)
