# SPDX-License-Identifier: Apache-2.0
"""ctypes mirror of bpf/xdplb_abi.h, the one contract between C and Python.

tests/packet/test_abi.py checks every struct here against the DWARF of the compiled
object (field names, offsets, sizes) and every constant against the header.
"""
from __future__ import annotations

import ctypes
import enum

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
# Network byte order fields are kept as raw bytes-in-an-integer: converted at the edge.
be16, be32 = ctypes.c_uint16, ctypes.c_uint32

ABI_VERSION = 8
MAX_SERVICES = 512
SERVICE_SLOTS = 4096
SERVICE_PROBES = 16
MAX_BACKENDS = 4096
MAX_CLIENT_RULES = 4096
MAX_SNAT_ADDRS = 16
FLOW_SLOTS_DEFAULT = 4 * 1048576
FLOW_PROBES = 8
TICK_MIN_NS = 8_000_000
PORTS = 65536
NO_BACKEND = 0xFFFF
RING_SLOTS = 65537
RING_SLOTS_PER_ENTRY = 4
RING_ENTRIES = (RING_SLOTS + RING_SLOTS_PER_ENTRY - 1) // RING_SLOTS_PER_ENTRY
SNAT_PORT_TRIES = 32
IPIP_TTL = 64
ENCAP_MTU_FLOOR = 1280
TRACE_LEASE_MAX_TICKS = 1024
V6_EXT_HEADERS = 6
TRACE_TAG = "xdplb1"
TRACE_TAG6 = "xdplb6"
PROGRAM_NAME = "xdplb_main"


class PortFlags(enum.IntFlag):
    TCP_SERVICE = 1 << 0
    UDP_SERVICE = 1 << 1
    SNAT = 1 << 2


class ConfigFlags(enum.IntFlag):
    TRACE = 1 << 0
    HOPS_PENDING = 1 << 1


class ServiceFlags(enum.IntFlag):
    ALLOWLIST = 1 << 0
    PASS_NOT_ALLOWED = 1 << 1
    DSR = 1 << 2
    IPIP = 1 << 3


class BackendFlags(enum.IntFlag):
    IN_USE = 1 << 0


class FlowFlags(enum.IntFlag):
    REPLY = 1 << 0
    CLOSING = 1 << 1
    DEAD = 1 << 2
    HANDSHAKE = 1 << 3
    RESET = 1 << 4
    FIN_CLIENT = 1 << 5
    FIN_BACKEND = 1 << 6
    END_TS = 1 << 7


class Counter(enum.IntEnum):
    PASS = 0
    TX = 1
    REDIRECT = 2
    DROP = 3
    MALFORMED = 4
    NO_BACKEND = 5
    TABLE_FULL = 6
    FRAGMENT = 7
    TTL_EXPIRED = 8
    NOT_ALLOWED = 9
    NEW_FLOW = 10
    ICMP_TRANSLATED = 11
    NO_FLOW = 12
    EVICTED = 13
    SNAT_EXHAUSTED = 14
    SNAT_REUSED = 15
    BACKEND_MISMATCH = 16
    RECOVERED = 17
    FRAG_NEEDED = 18
    TOO_BIG = 19
    MAX = 20


class TraceEvent(enum.IntEnum):
    NEW_FLOW = 0
    FLOW = 1
    REPLY = 2
    NO_BACKEND = 3
    NOT_ALLOWED = 4
    TTL_EXPIRED = 5
    FRAGMENT = 6
    TABLE_FULL = 7
    NO_FLOW = 8
    ICMP = 9
    SNAT_EXHAUSTED = 10
    TOO_BIG = 11


class ServiceKey(ctypes.Structure):
    _fields_ = [("vip", be32), ("port", be16), ("proto", u8), ("pad", u8)]


class Service(ctypes.Structure):
    _fields_ = [("id", u32), ("ring_size", u32), ("flags", u32), ("udp_timeout_s", u32)]


class ServiceSlot(ctypes.Structure):
    _fields_ = [("key", ServiceKey), ("svc", Service)]


class Backend(ctypes.Structure):
    # addr: IPv6, or IPv4 mapped (::ffff:a.b.c.d), see layout.addr_words
    _fields_ = [("addr", be32 * 4), ("port", be16), ("weight", u16), ("service_id", u16),
                ("flags", u16), ("ifindex", u32), ("dmac", u8 * 6), ("smac", u8 * 6), ("cursor_id", u16),
                ("pad", u16 * 3)]


class ServiceKey6(ctypes.Structure):
    _fields_ = [("vip", be32 * 4), ("port", be16), ("proto", u8), ("pad", u8)]


class FlowKey6(ctypes.Structure):
    _fields_ = [("saddr", be32 * 4), ("daddr", be32 * 4), ("sport", be16), ("dport", be16),
                ("proto", u8), ("pad", u8 * 3)]


class Flow6(ctypes.Structure):
    _fields_ = [("daddr", be32 * 4), ("ifindex", u32), ("dmac", u8 * 6), ("smac", u8 * 6),
                ("last_seen", u32), ("flags", u32), ("service_id", u16), ("backend_id", u16),
                ("udp_timeout_s", u16), ("encap", u8), ("pad", u8)]


class FlowKey(ctypes.Structure):
    _fields_ = [("saddr", be32), ("daddr", be32), ("sport", be16), ("dport", be16),
                ("proto", u8), ("pad", u8 * 3)]


class Flow(ctypes.Structure):
    # The forwarding mode is in l3_csum_delta / l4_csum_delta: see struct xdplb_flow.
    _fields_ = [("saddr", be32), ("daddr", be32), ("sport", be16), ("dport", be16),
                ("ifindex", u32), ("dmac", u8 * 6), ("smac", u8 * 6),
                ("l3_csum_delta", u16), ("l4_csum_delta", u16), ("service_id", u16),
                ("backend_id", u16), ("flags", u8), ("hop_gen", u8), ("udp_timeout_s", u16)]


class FlowSlot(ctypes.Structure):
    _fields_ = [("seq", u32), ("last_seen", u32), ("key", FlowKey), ("flow", Flow)]


class FlowEnd(ctypes.Structure):
    _fields_ = [("ts_recent", u32), ("rcv_nxt", u32)]


class Config(ctypes.Structure):
    _fields_ = [("abi_version", u32), ("flags", u32), ("hash_seed", u32), ("snat_port_min", u16),
                ("snat_port_max", u16), ("flow_mask", u32),
                ("tcp_timeout_s", u32), ("tcp_closing_timeout_s", u32), ("udp_timeout_s", u32),
                ("tcp_syn_timeout_s", u32),
                ("tcp_expiry_ticks", u32), ("tcp_closing_expiry_ticks", u32), ("udp_expiry_ticks", u32),
                ("tcp_syn_expiry_ticks", u32),
                ("tick_shift", u32), ("ticks_per_s", u32), ("touch_ticks", u32), ("hop_gen", u32),
                ("trace_until", u32), ("flow_seed", u32), ("encap_source", be32), ("encap_source6", be32 * 4),
                ("snat_addr_count", u32),
                ("snat_addrs", be32 * MAX_SNAT_ADDRS)]


class ClientKey(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("service_id", be32), ("addr", be32)]


class ClientKey6(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("service_id", be32), ("addr", be32 * 4)]


class Traffic(ctypes.Structure):
    _fields_ = [("packets", u64), ("bytes", u64), ("new_flows", u64)]


# Map name -> (key type, value type); xdplb_counters, xdplb_svc_stats and xdplb_be_stats
# hold one value per CPU.
MAPS = {
    "xdplb_config": (u32, Config),
    "xdplb_ports": (u32, u8),
    "xdplb_services": (u32, u32),  # slot 0: the service table, u32 -> ServiceSlot
    "xdplb_backends": (u32, Backend),
    "xdplb_rings": (u32, u32),  # inner maps: u32 -> u64, see dataplane.pack_ring
    "xdplb_flows": (u32, FlowSlot),
    "xdplb_flow_ends": (u32, FlowEnd),  # sized like xdplb_flows
    "xdplb_port_cur": (u32, u32),
    "xdplb_clients": (ClientKey, u8),
    "xdplb_counters": (u32, u64),
    "xdplb_svc_stats": (u32, Traffic),
    "xdplb_be_stats": (u32, Traffic),
    "xdplb_services6": (ServiceKey6, Service),
    "xdplb_flows6": (FlowKey6, Flow6),  # an LRU hash, sized at a quarter of xdplb_flows
    "xdplb_clients6": (ClientKey6, u8),
}
# Structs that appear in the object's DWARF under these names.
STRUCTS = {
    "xdplb_service_key": ServiceKey, "xdplb_service": Service, "xdplb_service_slot": ServiceSlot,
    "xdplb_backend": Backend,
    "xdplb_flow_key": FlowKey, "xdplb_flow": Flow, "xdplb_flow_slot": FlowSlot, "xdplb_flow_end": FlowEnd,
    "xdplb_config": Config,
    "xdplb_client_key": ClientKey, "xdplb_traffic": Traffic,
    "xdplb_service_key6": ServiceKey6, "xdplb_flow_key6": FlowKey6, "xdplb_flow6": Flow6,
    "xdplb_client_key6": ClientKey6,
}
