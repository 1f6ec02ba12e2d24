# SPDX-License-Identifier: Apache-2.0
"""Where each backend's SNAT ports left off, kept across a detach and the next attach.

A backend holds a TIME_WAIT entry for every connection it closed first, for a minute
(Linux) or up to four (2 MSL elsewhere). A new program's port cursors know nothing of
the old one's, so starting them at random after a re-attach lands, now and then, inside
a run of ports still in TIME_WAIT: the backend rejects those SYNs (PAWS) with a stale
ACK, the client resets and retries a second later, and the flow is counted twice.
Continuing each backend's cursor where the last program stopped keeps re-attaching as
safe as running on.

The memo is a small JSON file under /run (gone at reboot, like the reason for it), keyed
by the tuple space a cursor walks: SNAT address and port range, backend address and
port, protocol.
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


def key(snat_addr, port_min: int, port_max: int, backend_addr, backend_port: int, proto: str) -> str:
    """The range is part of the key: a test or an operator switching to another range
    and back finds the first range's place still noted."""
    return f"{snat_addr}:{port_min}-{port_max}>{backend_addr}:{backend_port}/{proto}"


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

    def remember(self, next_ports: dict[str, int]) -> None:
        """Records, per key, the next SNAT port the cursor would have handed out."""
        if not next_ports:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            now = self.clock()
            kept = {k: v for k, v in self._read().items() if isinstance(v, dict) and _fresh(v.get("at"), now)}
            kept.update({k: {"port": int(p), "at": now} for k, p in next_ports.items()})
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(kept, sort_keys=True))
            tmp.replace(self.path)

    def recall(self, k: str) -> int | None:
        """The next port for key k, if it was recorded recently enough to matter."""
        entry = self._read().get(k)
        if not isinstance(entry, dict):
            return None
        port = entry.get("port")
        if not isinstance(port, int):
            return None
        return port if _fresh(entry.get("at"), self.clock()) else None


def cursor_for(next_port: int | None, port_min: int, port_max: int, fallback: int) -> int:
    """The data plane's cursor (an offset into the range) that hands out next_port
    first; fallback when there is none or the range no longer holds it."""
    if next_port is None or not port_min <= next_port <= port_max:
        return fallback
    return next_port - port_min


def next_port(cursor: int, port_min: int, port_max: int) -> int:
    """The port a cursor value hands out next (as next_snat_port() in the data plane)."""
    return port_min + cursor % (port_max - port_min + 1)
