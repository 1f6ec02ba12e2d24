# SPDX-License-Identifier: Apache-2.0
"""The IPv6 flow table (xdplb_flows6, an LRU hash map: bpf/ipv6.h) as the control plane
sees it: one entry per flow (dsr or ipip), keyed by the client's 5-tuple, read in
batches and judged with numpy as flowtable.py judges the IPv4 table, which DataPlane
merges these counts and listings with: an entry is live as the data plane judges it
(flow6_live), and its flags are the same TCP states."""
from __future__ import annotations

import ipaddress
import socket

import numpy as np

from . import abi, clock
from .flowtable import Connection, expiry_ticks, tcp_state
from .model import PROTOCOL_NAMES

_CLOSING = int(abi.FlowFlags.CLOSING)
_KEY, _FLOW = np.dtype(abi.FlowKey6), np.dtype(abi.Flow6)


class Flows6:
    def __init__(self, lib, fd: int):
        self.lib, self.fd = lib, fd

    def _scan(self, cfg: abi.Config, now: int | None):
        """Per batch: its keys and values (numpy copies), which entries are live, and
        how long each has been idle (ticks)."""
        if now is None:
            now = clock.now_ticks(cfg.tick_shift)
        for keys, values, n in self.lib.batches(self.fd, abi.FlowKey6, abi.Flow6):
            k = np.frombuffer(keys, _KEY, n).copy()
            v = np.frombuffer(values, _FLOW, n).copy()
            ticks = expiry_ticks(cfg, k["proto"], v["flags"] & 0xFF, v["udp_timeout_s"])
            idle = (np.uint32(now & 0xFFFFFFFF) - v["last_seen"]).view(np.int32)  # ticks_since()
            yield k, v, (ticks == 0) | (idle <= ticks), idle.clip(min=0)

    def count(self) -> int:
        return sum(n for _, _, n in self.lib.batches(self.fd, abi.FlowKey6, abi.Flow6))

    def census(self, cfg: abi.Config, now: int | None = None) -> tuple[dict[int, int], int]:
        """Per backend id, live flows not closing; and the entries of the table: one pass."""
        counts = np.zeros(1 << 16, dtype=np.int64)
        entries = 0
        for _, v, live, _ in self._scan(cfg, now):
            entries += len(v)
            counts += np.bincount(v["backend_id"][live & ((v["flags"] & _CLOSING) == 0)], minlength=1 << 16)
        found = np.flatnonzero(counts)
        return dict(zip(found.tolist(), counts[found].tolist())), entries

    def connections(self, cfg: abi.Config, now: int | None = None, service_ids=None,
                    backend_ids=None) -> list[Connection]:
        per_s = max(cfg.ticks_per_s, 1)
        out = []
        for k, v, live, idle in self._scan(cfg, now):
            keep = live
            if service_ids is not None:
                keep = keep & np.isin(v["service_id"], list(service_ids))
            if backend_ids is not None:
                keep = keep & np.isin(v["backend_id"], list(backend_ids))
            for key, flow, ticks in zip(k[keep], v[keep], idle[keep].tolist()):
                port = socket.ntohs(int(key["dport"]))
                out.append(Connection(
                    PROTOCOL_NAMES[int(key["proto"])], f"[{_addr(key['saddr'])}]:{socket.ntohs(int(key['sport']))}",
                    f"[{_addr(key['daddr'])}]:{port}", f"[{_addr(flow['daddr'])}]:{port}",
                    "ipip" if flow["encap"] else "dsr",
                    tcp_state(int(flow["flags"]) & 0xFF) if key["proto"] == socket.IPPROTO_TCP else "-",
                    round(ticks / per_s, 1), int(flow["service_id"]), int(flow["backend_id"])))
        return out

    def reset_flows(self, backend_id: int) -> int:
        """Forgets every flow of a backend; returns how many."""
        doomed = [abi.FlowKey6.from_buffer_copy(key.tobytes()) for k, v, _, _ in self._scan(_ANY_CONFIG, 0)
                  for key in k[v["backend_id"] == backend_id]]
        return sum(1 for key in doomed if self.lib.delete(self.fd, key))


def _addr(words) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(words.tobytes())


_ANY_CONFIG = abi.Config(ticks_per_s=1)  # a scan that needs no timeouts
