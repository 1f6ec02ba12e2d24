# SPDX-License-Identifier: Apache-2.0
"""Where each backend's SNAT ports left off, kept across a detach and the next attach.

A backend holds a TIME_WAIT entry for every connection it closed first, for a minute
(Linux) or up to four (2 MSL elsewhere). A new program's port cursors know nothing of
the old one's, so starting them at random after a re-attach lands, now and then, inside
a run of ports still in TIME_WAIT: the backend rejects those SYNs (PAWS) with a stale
ACK, the client resets and retries a second later, and the flow is counted twice.
Continuing each backend's cursor where the last program stopped keeps re-attaching as
safe as running on.

The memo is a small JSON file under /run (gone at reboot, like the reason for it). It
notes, per backend, protocol and port range, the next SNAT port: every address of a
pool walks the same port sequence (bpf: next_snat_source), so continuing the port
keeps clear of every address's recent tuples, whatever the pool was and now is.
Entries older than HORIZON_S are of no use and are dropped.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

PATH = Path("/run/xdplb/snat-cursors.json")
HORIZON_S = 240.0  # 2 MSL of the most patient TCP stacks; Linux needs only 60


def key(port_min: int, port_max: int, backend_addr, backend_port: int, proto: str) -> str:
    """The range is part of the key: switching to another range and back finds the
    first range's place still noted."""
    return f"{port_min}-{port_max}>{backend_addr}:{backend_port}/{proto}"


def next_port(cursor: int, addrs: int, port_min: int, port_max: int) -> int:
    """The first port no address of the pool has had yet from this cursor. The cursor
    hands out address c % addrs with port c // addrs: partway through a port's turn,
    some addresses already had it, so the next port is the one after."""
    return port_min + (cursor + addrs - 1) // addrs % (port_max - port_min + 1)


def cursor_at(port: int, addrs: int, port_min: int) -> int:
    """A cursor that hands out port to the pool's first address next."""
    return (port - port_min) * addrs


def _now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _fresh(at, now: float) -> bool:
    """Recorded within the horizon (and not in the future: the clock restarts at boot)."""
    return isinstance(at, (int, float)) and 0 <= now - at < HORIZON_S


class Memo:
    def __init__(self, path: Path | None = None, clock=_now):
        self.path = path or PATH
        self.clock = clock

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def remember(self, ports: dict[str, int]) -> None:
        """Records, per key, the next SNAT port."""
        if not ports:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            now = self.clock()
            kept = {k: v for k, v in self._read().items() if isinstance(v, dict) and _fresh(v.get("at"), now)}
            kept.update({k: {"port": int(p), "at": now} for k, p in ports.items()})
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(kept, sort_keys=True))
            tmp.replace(self.path)

    def recall(self, k: str) -> int | None:
        """The port noted for key k, if it was noted recently enough to matter."""
        entry = self._read().get(k)
        if not isinstance(entry, dict):
            return None
        port = entry.get("port")
        if not isinstance(port, int) or not 0 < port < 65536:
            return None
        return port if _fresh(entry.get("at"), self.clock()) else None
