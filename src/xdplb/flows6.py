# SPDX-License-Identifier: Apache-2.0
"""The IPv6 flow table (xdplb_flows6, an LRU hash map: bpf/ipv6.h) as the control plane
sees it: one entry per flow (dsr or ipip), keyed by the client's 5-tuple, read in batches. The
counts and listings match the IPv4 table's (flowtable.py), which DataPlane merges them
with: an entry is live as the data plane judges it (flow6_live), and its flags are the
same TCP states."""
from __future__ import annotations

import socket

from . import abi, clock
from .flowtable import Connection, expiry_ticks, tcp_state
from .layout import from_words
from .model import PROTOCOL_NAMES

_CLOSING = int(abi.FlowFlags.CLOSING)


def _idle(now: int, last_seen: int) -> int:
    """ticks_since(): signed, another CPU may have stamped the entry after `now`."""
    delta = (now - last_seen) & 0xFFFFFFFF
    return delta - (1 << 32) if delta & 0x80000000 else delta


class Flows6:
    def __init__(self, lib, fd: int):
        self.lib, self.fd = lib, fd

    def _live(self, cfg: abi.Config, now: int | None):
        """(key, value, idle ticks) of every entry not idle past its timeout."""
        if now is None:
            now = clock.now_ticks(cfg.tick_shift)
        for key, value in self.lib.items(self.fd, abi.FlowKey6, abi.Flow6):
            ticks = int(expiry_ticks(cfg, key.proto, value.flags & 0xFF, value.udp_timeout_s))
            idle = _idle(now, value.last_seen)
            if ticks == 0 or idle <= ticks:
                yield key, value, max(idle, 0)

    def count(self) -> int:
        return sum(1 for _ in self.lib.items(self.fd, abi.FlowKey6, abi.Flow6))

    def census(self, cfg: abi.Config, now: int | None = None) -> tuple[dict[int, int], int]:
        """Per backend id, live flows not closing; and the entries of the table."""
        counts: dict[int, int] = {}
        for _, value, _ in self._live(cfg, now):
            if not value.flags & _CLOSING:
                counts[value.backend_id] = counts.get(value.backend_id, 0) + 1
        return counts, self.count()

    def connections(self, cfg: abi.Config, now: int | None = None, service_ids=None,
                    backend_ids=None) -> list[Connection]:
        per_s = max(cfg.ticks_per_s, 1)
        out = []
        for key, value, idle in self._live(cfg, now):
            if service_ids is not None and value.service_id not in service_ids:
                continue
            if backend_ids is not None and value.backend_id not in backend_ids:
                continue
            out.append(Connection(
                PROTOCOL_NAMES[key.proto], f"[{from_words(key.saddr)}]:{socket.ntohs(key.sport)}",
                f"[{from_words(key.daddr)}]:{socket.ntohs(key.dport)}",
                f"[{from_words(value.daddr)}]:{socket.ntohs(key.dport)}", "ipip" if value.encap else "dsr",
                tcp_state(value.flags & 0xFF) if key.proto == socket.IPPROTO_TCP else "-",
                round(idle / per_s, 1), value.service_id, value.backend_id))
        return out

    def reset_flows(self, backend_id: int) -> int:
        """Forgets every flow of a backend; returns how many."""
        doomed = [key for key, value in self.lib.items(self.fd, abi.FlowKey6, abi.Flow6)
                  if value.backend_id == backend_id]
        return sum(1 for key in doomed if self.lib.delete(self.fd, key))
