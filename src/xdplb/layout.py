# SPDX-License-Identifier: Apache-2.0
"""How the wanted state is laid out in the maps (bpf/xdplb_abi.h, bpf/maps.h): the
encodings of settings, services, backends, rings, client rules and port flags, and
their decoding back into the model. No syscalls and no root: the planner and the unit
tests build on this, and only dataplane.py moves the results in and out of the kernel."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import ipaddress
import socket
import sys

from . import abi, clock, hashing, maglev, snatmemo
from .errors import UsageError, XdplbError
from .model import PROTOCOL_NAMES, PROTOCOLS, Backend, Service, Settings
from .netlink import NextHop

_BYTEORDER = sys.byteorder


def be32(addr: ipaddress.IPv4Address) -> int:
    """An address as the raw integer its network-order bytes make on this host."""
    return int.from_bytes(addr.packed, _BYTEORDER)


def from_be32(raw: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(raw.to_bytes(4, _BYTEORDER))


_V4_MAPPED = bytes(10) + b"\xff\xff"


def addr_words(addr) -> ctypes.Array:
    """An address as the data plane's 16 bytes (four be32): IPv6 as it is, IPv4 mapped
    (::ffff:a.b.c.d), so that addr[3] is the IPv4 address."""
    raw = addr.packed if addr.version == 6 else _V4_MAPPED + addr.packed
    return (abi.be32 * 4).from_buffer_copy(raw)


def from_words(words) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes(words)
    if raw[:12] == _V4_MAPPED:
        return ipaddress.IPv4Address(raw[12:])
    return ipaddress.IPv6Address(raw)


@functools.lru_cache(maxsize=8192)
def mac_bytes(mac: str):
    """A MAC as a struct field's value (shared between calls: never modify it; a field
    assignment copies it)."""
    return (ctypes.c_uint8 * 6)(*bytes.fromhex(mac.replace(":", "")))


def mac_text(raw) -> str:
    return ":".join(f"{x:02x}" for x in raw)


def flow_slots(flows: int) -> int:
    """Flow table slots for `flows` connections: two entries each, at most half the
    table, rounded up to a power of two (the data plane masks the hash)."""
    return 1 << max(4 * flows - 1, 1).bit_length()


def flow_capacity(slots: int) -> int:
    """Flows a table of `slots` is sized for (at half load)."""
    return slots // 4


def flow_capacity6(slots: int) -> int:
    """Entries of the IPv6 flow table (an LRU hash) beside an IPv4 table of `slots`:
    as many flows, and never fewer than an LRU map spreads over CPUs comfortably."""
    return max(flow_capacity(slots), 256)


# ---- settings ------------------------------------------------------------------------

def config_value(s: Settings, jiffy_ns: int, current: abi.Config | None, slots: int) -> abi.Config:
    """The config map's value for settings s. What is not a setting comes from the
    running value: the trace lease (only the trace command starts and ends one), the
    next-hop generation (flows compare against it) and the flow table's seed, which
    is fixed for the table's life so that a new hash seed (a Maglev setting) never
    hides the flows already stored."""
    shift = clock.tick_shift(jiffy_ns)
    touch = clock.to_ticks(clock.TOUCH_S, jiffy_ns, shift)

    def expiry(seconds: int) -> int:
        # Plus the slack of entries re-stamped only every TOUCH_S; 0 stays "never".
        return clock.to_ticks(seconds, jiffy_ns, shift) + touch if seconds else 0

    cfg = abi.Config(
        abi_version=abi.ABI_VERSION, hash_seed=s.hash_seed, snat_addr_count=len(s.snat_addrs),
        snat_addrs=(abi.be32 * abi.MAX_SNAT_ADDRS)(*map(be32, s.snat_addrs)), snat_port_min=s.snat_port_min,
        snat_port_max=s.snat_port_max, flow_mask=slots - 1,
        tcp_timeout_s=s.tcp_timeout_s, tcp_closing_timeout_s=s.tcp_closing_timeout_s,
        udp_timeout_s=s.udp_timeout_s, tcp_syn_timeout_s=s.tcp_syn_timeout_s,
        tcp_expiry_ticks=expiry(s.tcp_timeout_s), tcp_closing_expiry_ticks=expiry(s.tcp_closing_timeout_s),
        udp_expiry_ticks=expiry(s.udp_timeout_s), tcp_syn_expiry_ticks=expiry(s.tcp_syn_timeout_s),
        tick_shift=shift, ticks_per_s=clock.to_ticks(1, jiffy_ns, shift), touch_ticks=touch,
        encap_source=be32(s.encap_source or s.snat_addrs[0]) if s.snat_addrs else 0,
        encap_source6=addr_words(s.encap_source6) if s.encap_source6 else (abi.be32 * 4)())
    keep_running_fields(cfg, current)
    return cfg


def keep_running_fields(cfg: abi.Config, current: abi.Config | None) -> None:
    """Copies into cfg the fields of the running value that are state, not settings."""
    if current is None or not current.abi_version:
        cfg.flow_seed = cfg.hash_seed
        return
    cfg.flags, cfg.trace_until, cfg.hop_gen = current.flags, current.trace_until, current.hop_gen
    cfg.flow_seed = current.flow_seed


def settings_from(cfg: abi.Config, tracing: bool = False) -> Settings:
    return Settings(
        snat_addrs=[from_be32(a) for a in cfg.snat_addrs[:cfg.snat_addr_count]], snat_port_min=cfg.snat_port_min,
        snat_port_max=cfg.snat_port_max, hash_seed=cfg.hash_seed,
        tcp_timeout_s=cfg.tcp_timeout_s, tcp_closing_timeout_s=cfg.tcp_closing_timeout_s,
        udp_timeout_s=cfg.udp_timeout_s, tcp_syn_timeout_s=cfg.tcp_syn_timeout_s, trace=tracing,
        encap_source=from_be32(cfg.encap_source) if cfg.encap_source and cfg.snat_addr_count and
        cfg.encap_source != cfg.snat_addrs[0] else None,
        encap_source6=from_words(cfg.encap_source6) if any(cfg.encap_source6) else None)


# ---- services, backends, client rules ---------------------------------------------------

def service_key(vip, port: int, proto: str) -> abi.ServiceKey:
    return abi.ServiceKey(vip=be32(vip), port=socket.htons(port), proto=PROTOCOLS[proto])


def service_key6(vip, port: int, proto: str) -> abi.ServiceKey6:
    return abi.ServiceKey6(vip=addr_words(vip), port=socket.htons(port), proto=PROTOCOLS[proto])


_FORWARD_FLAGS = {"nat": 0, "dsr": abi.ServiceFlags.DSR, "ipip": abi.ServiceFlags.IPIP}


def forward_of(value: abi.Service) -> str:
    return next((mode for mode, flag in _FORWARD_FLAGS.items() if flag and value.flags & flag), "nat")


def service_value(svc: Service, svc_id: int) -> abi.Service:
    flags = abi.ServiceFlags.ALLOWLIST if svc.clients else 0
    if svc.not_allowed == "pass":
        flags |= abi.ServiceFlags.PASS_NOT_ALLOWED
    flags |= _FORWARD_FLAGS[svc.forward]
    return abi.Service(id=svc_id, ring_size=svc.ring_size, flags=flags, udp_timeout_s=svc.udp_timeout_s)


def backend_value(b: Backend, svc_id: int, hop: NextHop, cursor_id: int) -> abi.Backend:
    return abi.Backend(addr=addr_words(b.addr), port=socket.htons(b.port), weight=b.weight, service_id=svc_id,
                       flags=abi.BackendFlags.IN_USE, ifindex=hop.ifindex, dmac=mac_bytes(hop.dmac),
                       smac=mac_bytes(hop.smac), cursor_id=cursor_id)


def endpoint_of(b: abi.Backend) -> str:
    """As model.Backend.endpoint."""
    addr = from_words(b.addr)
    return f"{addr}:{socket.ntohs(b.port)}" if addr.version == 4 else f"[{addr}]:{socket.ntohs(b.port)}"


def endpoint_key(b: abi.Backend) -> tuple[bytes, int]:
    """A backend entry's address and port, comparable and hashable."""
    return bytes(b.addr), b.port


def next_hop_of(b: abi.Backend) -> NextHop:
    return NextHop(b.ifindex, mac_text(b.dmac), mac_text(b.smac))


def client_rules(networks: list) -> set[tuple]:
    """A service's allow-list as the (network address, prefix length) pairs of its rules."""
    return {(n.network_address, n.prefixlen) for n in networks}


def client_key(svc_id: int, rule: tuple) -> abi.ClientKey | abi.ClientKey6:
    """The key of a rule in xdplb_clients, or xdplb_clients6 for an IPv6 network."""
    addr, plen = rule
    if addr.version == 6:
        return abi.ClientKey6(prefixlen=32 + plen, service_id=socket.htonl(svc_id), addr=addr_words(addr))
    return abi.ClientKey(prefixlen=32 + plen, service_id=socket.htonl(svc_id), addr=be32(addr))


def client_rule_of(key: abi.ClientKey | abi.ClientKey6) -> tuple[int, tuple]:
    """(service id, rule) of a key of xdplb_clients or xdplb_clients6."""
    addr = ipaddress.IPv6Address(bytes(key.addr)) if isinstance(key, abi.ClientKey6) else from_be32(key.addr)
    return socket.ntohl(key.service_id), (addr, key.prefixlen - 32)


def service_table(entries: list[tuple[abi.ServiceKey, abi.Service]]) -> ctypes.Array:
    """The service table's slots: linear probing from service_hash, as the data plane
    searches it (bpf/xdplb.bpf.c, find_service)."""
    slots = (abi.ServiceSlot * abi.SERVICE_SLOTS)()
    for key, value in entries:
        home = hashing.service_hash(str(from_be32(key.vip)), socket.ntohs(key.port), key.proto)
        for probe in range(abi.SERVICE_PROBES):
            slot = slots[(home + probe) % abi.SERVICE_SLOTS]
            if not slot.key.proto:
                slot.key, slot.svc = key, value
                break
        else:
            raise XdplbError(f"service {from_be32(key.vip)}:{socket.ntohs(key.port)} collides with "
                             f"{abi.SERVICE_PROBES} others in the service table; report this as a bug")
    return slots


def services_from(table: dict[tuple, abi.Service], backends: dict[int, abi.Backend],
                  clients: dict[int, set[tuple]]) -> list[Service]:
    """The model of what the maps hold: the services of the service table with their
    backends and allow-lists."""
    out = []
    for (vip, port, proto), value in sorted(table.items(), key=lambda kv: (kv[0][0].version, kv[0])):
        members = sorted(Backend(from_words(b.addr), socket.ntohs(b.port), b.weight)
                         for b in backends.values() if b.service_id == value.id)
        nets = sorted(ipaddress.ip_network((addr, plen)) for addr, plen in clients.get(value.id, ()))
        out.append(Service(vip, port, proto, members, nets, value.ring_size, value.udp_timeout_s,
                           "pass" if value.flags & abi.ServiceFlags.PASS_NOT_ALLOWED else "drop",
                           forward_of(value)))
    return out


def table_key(key: abi.ServiceKey) -> tuple:
    return from_be32(key.vip), socket.ntohs(key.port), PROTOCOL_NAMES[key.proto]


def table_key6(key: abi.ServiceKey6) -> tuple:
    return ipaddress.IPv6Address(bytes(key.vip)), socket.ntohs(key.port), PROTOCOL_NAMES[key.proto]


# ---- rings -------------------------------------------------------------------------

# Each ring map holds RING_ENTRIES values of four slots, so slots past RING_SLOTS exist
# but are never read (the data plane takes hash % ring_size <= RING_SLOTS). The top 32
# bits of the last value hold a digest of what the ring was built from: a plan can
# then tell a ring left stale by an interrupted change without rebuilding it.
RING_DIGEST_ENTRY = abi.RING_ENTRIES - 1
RING_DIGEST_SHIFT = 32
assert (RING_DIGEST_ENTRY * abi.RING_SLOTS_PER_ENTRY + RING_DIGEST_SHIFT // 16) >= abi.RING_SLOTS


def _backend_order(b: Backend) -> tuple:
    """Backends in address order (as Backend's own ordering, without its slow compares);
    one address and port appears once in a service."""
    return int(b.addr), b.port, b.weight


def ring_digest(svc: Service, ids: dict[str, int], seed: int) -> int:
    """32 bits (never 0) of the ring's inputs: size, seed, and each backend's endpoint,
    weight and id."""
    text = f"{svc.ring_size}/{seed}/" + ",".join(
        f"{b.endpoint}={b.weight}@{ids[b.endpoint]}" for b in sorted(svc.backends, key=_backend_order))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") or 1


def pack_ring(slots: list[int]) -> ctypes.Array:
    """Ring slots (backend ids) as the ring map's values: four 16-bit ids per 64-bit
    value, slot 0 in the lowest bits (bpf/maps.h, xdplb_ring)."""
    per = abi.RING_SLOTS_PER_ENTRY
    padded = slots + [abi.NO_BACKEND] * (-len(slots) % per)
    return (ctypes.c_uint64 * (len(padded) // per))(
        *[sum(padded[i + j] << (16 * j) for j in range(per)) for i in range(0, len(padded), per)])


def unpack_ring(values, size: int) -> list[int]:
    per = abi.RING_SLOTS_PER_ENTRY
    return [(values[slot // per] >> (16 * (slot % per))) & 0xFFFF for slot in range(size)]


def ring_values(svc: Service, ids: dict[str, int], seed: int) -> tuple[ctypes.Array, int]:
    """A whole ring map's values, the digest in place. Backends take their turns in
    address order, so the ring does not depend on how the user listed them."""
    order = sorted(svc.backends, key=_backend_order)
    values = (ctypes.c_uint64 * abi.RING_ENTRIES)()
    # Slot i is the i-th 16-bit word in memory only on a little-endian host.
    assert sys.byteorder == "little", "ring packing assumes a little-endian host"
    maglev.ring_slots([(b.endpoint, b.weight) for b in order], [ids[b.endpoint] for b in order], svc.ring_size,
                      seed, abi.NO_BACKEND, values)
    digest = ring_digest(svc, ids, seed)
    keep = (1 << RING_DIGEST_SHIFT) - 1  # the slots below the digest (padding above them is never read)
    values[RING_DIGEST_ENTRY] = values[RING_DIGEST_ENTRY] & keep | digest << RING_DIGEST_SHIFT
    return values, digest


# ---- port flags ----------------------------------------------------------------------

def port_flags(services: list[Service], snat_range: tuple[int, int], held: frozenset[int] = frozenset()) -> bytes:
    """xdplb_ports: which destination ports are SNAT ports (the range, plus ports of an
    earlier range that open flows still use) and which are service ports."""
    lo, hi = snat_range
    flags = bytearray(abi.PORTS)
    snat = int(abi.PortFlags.SNAT)
    flags[lo:hi + 1] = bytes([snat]) * (hi + 1 - lo)
    for port in held:
        flags[port] |= snat
    for s in services:
        flags[s.port] |= int(abi.PortFlags.TCP_SERVICE if s.proto == "tcp" else abi.PortFlags.UDP_SERVICE)
    return bytes(flags)


def snat_ports_outside(flags: bytes, snat_range: tuple[int, int]) -> bool:
    """Whether flags mark SNAT ports outside the range (left from an earlier range)."""
    lo, hi = snat_range
    outside = flags[:lo] + flags[hi + 1:]
    return outside.translate(_SNAT_BIT).count(0) != len(outside)  # bytes at C speed, not a loop


_SNAT_BIT = bytes(i & int(abi.PortFlags.SNAT) for i in range(256))  # a byte -> its SNAT flag


def union(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")


# ---- SNAT cursors --------------------------------------------------------------------

def memo_key(s: Settings, addr, port: int, proto: str) -> str:
    return snatmemo.key(s.snat_port_min, s.snat_port_max, addr, port, proto)


class Cursors:
    """SNAT cursor ids during one plan: one per tuple space (backend address, port and
    protocol), shared by every backend entry with that endpoint, so that a backend in
    two services gets its sources from one sequence. Ids in use before the plan are
    not handed out again within it."""

    def __init__(self, staying: list[abi.Backend], protos: dict[int, str], taken: set[int]):
        self.ids = {(*endpoint_key(b), protos[b.service_id]): b.cursor_id for b in staying}
        self.taken = set(taken)

    def get(self, addr: bytes, port: int, proto: str) -> tuple[int, bool]:
        """The cursor id for an endpoint (as endpoint_key), and whether it is new (to be started)."""
        key = (addr, port, proto)
        if key in self.ids:
            return self.ids[key], False
        try:
            free = next(i for i in range(abi.MAX_BACKENDS) if i not in self.taken)
        except StopIteration:
            raise UsageError(f"more than {abi.MAX_BACKENDS} backend endpoints on this interface") from None
        self.taken.add(free)
        self.ids[key] = free
        return free, True
