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
by the tuple space a cursor walks: SNAT addresses and port range, backend address and
port, protocol. A value is the cursor's place in its cycle (addresses x ports).
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


def key(snat_addrs, port_min: int, port_max: int, backend_addr, backend_port: int, proto: str) -> str:
    """The pool is part of the key: switching to another pool and back finds the first
    one's place still noted."""
    return f"{','.join(map(str, snat_addrs))}:{port_min}-{port_max}>{backend_addr}:{backend_port}/{proto}"


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

    def remember(self, places: dict[str, int]) -> None:
        """Records, per key, where the cursor stands in its cycle."""
        if not places:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            now = self.clock()
            kept = {k: v for k, v in self._read().items() if isinstance(v, dict) and _fresh(v.get("at"), now)}
            kept.update({k: {"place": int(p), "at": now} for k, p in places.items()})
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(kept, sort_keys=True))
            tmp.replace(self.path)

    def recall(self, k: str) -> int | None:
        """The place noted for key k, if it was noted recently enough to matter."""
        entry = self._read().get(k)
        if not isinstance(entry, dict):
            return None
        place = entry.get("place")
        if not isinstance(place, int) or place < 0:
            return None
        return place if _fresh(entry.get("at"), self.clock()) else None
