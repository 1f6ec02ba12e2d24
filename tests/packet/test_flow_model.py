# SPDX-License-Identifier: Apache-2.0
"""The real program against a model of what should happen, driven by hypothesis.

A RuleBasedStateMachine sends packets through BPF_PROG_TEST_RUN: clients open
connections (SYN) from a small pool of addresses and ports, send data, FINs and resets;
backends answer (SYN-ACK, data, FIN, reset) to the SNAT source the program chose; the
configuration changes under open flows (weights, backends added and removed, a new
Maglev seed) and the clock moves on. A small Python model says what each packet should
become, from the README's rules (flows, "New flows", "SNAT sources", the timeouts), and
after every step the flow table itself is compared with the model.

Checked at every step:
* a packet of an open connection goes to the backend and from the SNAT source of the
  connection's first packet, byte for byte as scapy builds it, with IPv4 and TCP
  checksums that are also verified from scratch (packets.checksum_errors);
* a reply goes back to the client's own address and port, from the VIP;
* a SYN that opens a flow goes to the backend the Maglev ring names for it and takes a
  SNAT source that is free or that the backend would accept after a closed flow (RFC
  6191: newer timestamp, or higher sequence number), and is dropped only if none is;
* packets of connections the model says are gone (expired, reset and timed out, closed
  and balanced afresh, retired) are not forwarded as if open: a client's segment goes
  to the kernel, a SYN opens a new flow. (As designed, the backend side of an
  established flow is not expired on lookup: it serves until its slot is taken, and a
  reply there stamps both sides again. The model says so too.) Traffic not for a
  service passes untouched;
* the flow table holds exactly the model's entries: keys, rewrites, state bits, ages and
  the closing record; no two open connections share a (SNAT address, SNAT port, backend)
  tuple, and both entries of every open connection are there and lead to each other;
* every counter moved by exactly what the model expects.

Time: the model counts in units of 60 s. A clock advance subtracts whole units from the
last_seen of every used slot (the flow table is mmap-able), which is what time passing
does to them. The test writes its own expiries into the config (touch after 30 s, a
handshake or a reset after 90 s, a closing flow after 210 s, an open one after 450 s),
so every age the model can reach lies at least 30 s from any threshold: the real seconds
an example takes cannot change an outcome.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import mmap
import socket
import struct
import sys
from dataclasses import dataclass

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis import event as _event
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from xdplb import abi, clock, hashing
from xdplb.libbpf import libbpf

from . import packets as P
from .conftest import FLOW_SLOTS, LOOPBACK, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, service

F = abi.FlowFlags
REPLY, CLOSING, DEAD, HANDSHAKE = int(F.REPLY), int(F.CLOSING), int(F.DEAD), int(F.HANDSHAKE)
RESET, FIN_CLIENT, FIN_BACKEND, END_TS = int(F.RESET), int(F.FIN_CLIENT), int(F.FIN_BACKEND), int(F.END_TS)
SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04
TCP_FLAGS = {"F": FIN, "S": SYN, "R": RST, "P": 0x08, "A": ACK}

CLIENTS = [(P.CLIENT, P.CLIENT_MAC), (P.CLIENT2, P.CLIENT2_MAC)]
CLIENT_PORTS = (40000, 40001, 40002)
SNAT_ADDRS = (P.SNAT, P.SNAT2)
SNAT_RANGE = (20000, 20001)
# Four sources per backend: a handful of connections exhausts them, and reuse is frequent.
SOURCES = [(a, p) for p in range(SNAT_RANGE[0], SNAT_RANGE[1] + 1) for a in SNAT_ADDRS]
BACKEND_POOL = (P.BACKEND, P.BACKEND2, "10.0.0.103", "10.9.0.1")  # the last behind ifindex 7: XDP_REDIRECT
# One backend at first, so that its four sources run out now and then; the rules add more.
INITIAL_WEIGHTS = {P.BACKEND: 1, P.BACKEND2: 0}
MAX_RECONFIGURATIONS = 3  # per example: each costs the control plane about 0.1 s
SERVICE = f"{P.VIP}:80/tcp"
HAS_FLOW_SEED = "flow_seed" in dict(abi.Config._fields_)

UNIT_S = 60
TOUCH_S = 30
EXPIRY_S = {"syn": 90, "closing": 210, "tcp": 450}
RING_SIZE = 1021  # prime; a small ring keeps reconfiguring fast
ISNS = (1000, 70_000, 2**31 + 5_000, 2**32 - 3)  # the last wraps within a few segments
TSVALS = (100, 5_000, 2**31 + 200, 2**32 - 1)
SEEDS = (0x5eed, 1, 0xC0FFEE)  # Maglev seeds (hash_seed); 0x5eed is the harness's
# Whether the program checks that the entry it finds at a flow's partner key leads back
# to the flow before stamping it or setting its state bits (flow_is_partner, bpf/flows.h).
# Without it a late segment of a connection whose client port was reused for a new one
# marked the new connection's client side
# (test_a_late_segment_of_a_replaced_flow_leaves_the_new_one_alone); the model can follow
# either behaviour.
PARTNER_CHECKED = True


SEEN = collections.Counter()  # what the examples exercised (printed with pytest -s)


def event(what: str) -> None:
    SEEN[what] += 1
    _event(what)


def newer(a: int, b: int) -> bool:
    """RFC 1982 serial comparison, as the data plane's (__s32)(a - b) > 0."""
    return 0 < (a - b) % 2**32 < 2**31


def syn_options(tsval):
    return [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (tsval, 0)), ("NOP", None), ("WScale", 7)]


def ts_options(tsval, tsecr):
    return [("NOP", None), ("NOP", None), ("Timestamp", (tsval, tsecr))]


def client_key(ck):
    addr, port = ck
    return (addr, P.VIP, port, 80)


def backend_key(backend, src):
    return (backend, src[0], 80, src[1])


def _find_table_seed() -> int:
    """A flow table seed that puts every key the test can use (6 client tuples, 16
    backend tuples) in its own probe window: then each key lives in its home slot, no
    key's entry can be taken by another key, and the model can say what the table holds."""
    keys = [client_key((c, p)) for c, _ in CLIENTS for p in CLIENT_PORTS]
    keys += [backend_key(b, s) for b in BACKEND_POOL for s in SOURCES]
    for seed in range(1, 10_000):
        homes = sorted(hashing.flow_hash(sa, sp, da, dp, socket.IPPROTO_TCP, seed) % FLOW_SLOTS
                       for sa, da, sp, dp in keys)
        gaps = [(b - a) % FLOW_SLOTS for a, b in zip(homes, homes[1:] + homes[:1])]
        if min(gaps) >= 2 * abi.FLOW_PROBES:
            return seed
    raise AssertionError("no seed keeps the test's keys apart")


TABLE_SEED = _find_table_seed()


@dataclass(eq=False)
class Client:
    """One TCP connection as the client sees it (its sequence numbers and timestamps)."""
    ck: tuple  # (address, port)
    isn: int
    ts: int | None  # the next timestamp value, None: no timestamps
    nxt: int = 0
    closed: bool = False

    def __post_init__(self):
        self.nxt = (self.isn + 1) % 2**32


@dataclass(eq=False)
class Flow:
    """One connection through the balancer: its backend and SNAT source, and the
    backend's side of it (sequence numbers, timestamps)."""
    n: int
    client: Client
    backend: str
    src: tuple  # (SNAT address, SNAT port)
    b_isn: int
    b_nxt: int = 0
    b_ts: int = 0
    # A segment of another flow reached one of this flow's entries (the known bug, see
    # PARTNER_CHECKED): the invariants that would only repeat it skip this flow.
    crossed: bool = False

    def __post_init__(self):
        self.b_nxt = (self.b_isn + 1) % 2**32
        self.b_ts = 7_000 + self.n

    @property
    def ckey(self):
        return client_key(self.client.ck)

    @property
    def bkey(self):
        return backend_key(self.backend, self.src)


def closed_both_ways(flags: int) -> bool:
    return bool(flags & FIN_BACKEND and flags & (FIN_CLIENT | RESET))


@dataclass(eq=False)
class Entry:
    """One slot of the flow table: a direction of a flow, its state bits (both entries of
    a flow carry the same ones), its age in units, retired or not; for the backend side,
    the closing record (what the backend knows of the client once it sent its FIN)."""
    flow: Flow
    reply: bool
    flags: int = HANDSHAKE
    age: int = 0
    dead: bool = False
    ts_recent: int = 0
    rcv_nxt: int = 0

    @property
    def key(self):
        return self.flow.bkey if self.reply else self.flow.ckey

    @property
    def partner_key(self):
        """The key of the other direction, from this entry's rewrite (flow_partner_key)."""
        return self.flow.ckey if self.reply else self.flow.bkey

    def rewrite(self):
        f = self.flow
        if self.reply:
            return (P.VIP, f.client.ck[0], 80, f.client.ck[1])
        return (f.src[0], f.backend, f.src[1], 80)


def expiry_class(flags: int) -> str:
    """flow_expiry_ticks() as the README states it."""
    if flags & HANDSHAKE or flags & (RESET | FIN_BACKEND) == RESET:
        return "syn"
    return "closing" if flags & CLOSING else "tcp"


def ip(raw: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", raw))


class FlowTable:
    """The flow table through its mmap (no control-plane code involved)."""

    SLOT = ctypes.sizeof(abi.FlowSlot)
    PROTO_AT = abi.FlowSlot.key.offset + abi.FlowKey.proto.offset
    LAST_SEEN_AT = abi.FlowSlot.last_seen.offset

    def __init__(self, fd: int):
        self.map = mmap.mmap(fd, FLOW_SLOTS * self.SLOT, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def close(self):
        self.map.close()

    def clear(self):
        self.map[:] = bytes(len(self.map))

    def used(self):
        """index -> FlowSlot of every slot ever used."""
        raw = self.map[:]
        return {i: abi.FlowSlot.from_buffer_copy(raw, i * self.SLOT)
                for i, proto in enumerate(raw[self.PROTO_AT::self.SLOT]) if proto}

    def age_all(self, ticks: int):
        for i in self.used():
            at = i * self.SLOT + self.LAST_SEEN_AT
            old = int.from_bytes(self.map[at:at + 4], sys.byteorder)
            self.map[at:at + 4] = ((old - ticks) % 2**32).to_bytes(4, sys.byteorder)

    @staticmethod
    def key_of(s: abi.FlowSlot):
        k = s.key
        return (ip(k.saddr), ip(k.daddr), socket.ntohs(k.sport), socket.ntohs(k.dport))

    @staticmethod
    def rewrite_of(s: abi.FlowSlot):
        f = s.flow
        return (ip(f.saddr), ip(f.daddr), socket.ntohs(f.sport), socket.ntohs(f.dport))


def read_config(fds) -> abi.Config:
    cfg = abi.Config()
    libbpf().lookup(fds["xdplb_config"], ctypes.c_uint32(0), cfg)
    return cfg


def patch_config(fds) -> abi.Config:
    """The test's SNAT pool, flow table seed and timeouts, written over whatever the
    control plane wrote (it knows only whole seconds and a touch of 1 s)."""
    cfg = read_config(fds)
    tps = cfg.ticks_per_s
    assert tps > 0 and cfg.abi_version == abi.ABI_VERSION
    cfg.touch_ticks = TOUCH_S * tps
    cfg.tcp_syn_expiry_ticks = EXPIRY_S["syn"] * tps
    cfg.tcp_closing_expiry_ticks = EXPIRY_S["closing"] * tps
    cfg.tcp_expiry_ticks = EXPIRY_S["tcp"] * tps
    cfg.snat_addr_count = len(SNAT_ADDRS)
    for i, a in enumerate(SNAT_ADDRS):
        cfg.snat_addrs[i] = struct.unpack("=I", socket.inet_aton(a))[0]
    cfg.snat_port_min, cfg.snat_port_max = SNAT_RANGE
    if HAS_FLOW_SEED:
        cfg.flow_seed = TABLE_SEED
    else:
        cfg.hash_seed = TABLE_SEED
    libbpf().update(fds["xdplb_config"], ctypes.c_uint32(0), cfg)
    return cfg


# The arguments of the segment rules, each rule declared more than once so that
# traffic dominates the rules hypothesis picks evenly.
CLIENT_SEGMENT = dict(pick=st.integers(0, 255), kind=st.sampled_from(["ack", "ack", "data", "fin", "rst"]),
                      size=st.integers(1, 40))
BACKEND_SEGMENT = dict(pick=st.integers(0, 255), kind=st.sampled_from(["synack", "ack", "data", "fin", "rst"]),
                       size=st.integers(1, 40))


class FlowModel(RuleBasedStateMachine):
    harness = None  # set by the test: the state machine cannot take fixtures

    def __init__(self):
        super().__init__()
        h = self.harness
        self.dp, self.fds, self.lib = h.dp, h.dp.fds, libbpf()
        self.weights = dict(INITIAL_WEIGHTS)
        if HAS_FLOW_SEED and hasattr(h, "sync") and h.settings.hash_seed != self.initial_seed:
            h.sync(settings=dataclasses.replace(h.settings, hash_seed=self.initial_seed))
        self._configure()
        self.table.clear()
        zeros = (abi.FlowEnd * FLOW_SLOTS)()
        self.lib.update_batch(self.fds["xdplb_flow_ends"], (ctypes.c_uint32 * FLOW_SLOTS)(*range(FLOW_SLOTS)),
                              zeros, FLOW_SLOTS)
        n = abi.MAX_BACKENDS
        self.lib.update_batch(self.fds["xdplb_port_cur"], (ctypes.c_uint32 * n)(*range(n)), (ctypes.c_uint32 * n)(), n)
        self.entries: dict[tuple, Entry] = {}
        self.clients: dict[tuple, Client] = {}  # client (address, port) -> its latest connection
        self.backend_flows: dict[tuple, Flow] = {}  # backend tuple -> the latest flow given it
        self.flows = 0
        self.ip_id = 0
        self.reconfigurations = 0
        self.counters = self.dp.counters()
        self.expected = {}

    # ---- configuration ------------------------------------------------------------
    def _configure(self):
        h = self.harness
        addrs = list(self.weights)
        h.configure([dataclasses.replace(service(*addrs, weights=[self.weights[a] for a in addrs]),
                                         ring_size=RING_SIZE)])
        self.cfg = patch_config(self.fds)
        self.unit_ticks = UNIT_S * self.cfg.ticks_per_s
        svc_id = self.dp.service_ids()[SERVICE]
        self.ring = self.dp.ring(svc_id)
        self.by_id = {i: ep.split(":")[0] for (sid, ep), i in self.dp.backend_ids().items() if sid == svc_id}
        in_ring = {self.by_id[i] for i in set(self.ring) if i != abi.NO_BACKEND}
        assert in_ring == {a for a, w in self.weights.items() if w > 0}, (in_ring, self.weights)

    def _ring_backend(self, ck) -> str | None:
        if not self.ring:
            return None
        addr, port = ck
        h = hashing.flow_hash(addr, port, P.VIP, 80, socket.IPPROTO_TCP, self.cfg.hash_seed)
        slot = self.ring[h % len(self.ring)]
        return None if slot == abi.NO_BACKEND else self.by_id[slot]

    # ---- the model's rules ----------------------------------------------------------
    def expired(self, e: Entry) -> bool:
        return e.dead or e.age * UNIT_S > EXPIRY_S[expiry_class(e.flags)]

    def source_free(self, backend, src, seq, tsval) -> bool:
        """Whether a SYN may take this source towards this backend (README, SNAT sources)."""
        e = self.entries.get(backend_key(backend, src))
        if e is None or self.expired(e):
            return True
        if not closed_both_ways(e.flags):
            return False
        if e.flags & END_TS and tsval is not None:
            return newer(tsval, e.ts_recent)
        return newer(seq, e.rcv_nxt)

    def _partner(self, e: Entry) -> Entry | None:
        """The entry the program stamps and marks with e: the one at e's partner key. The
        program does not check that it leads back to e (PARTNER_CHECKED)."""
        p = self.entries.get(e.partner_key)
        if p is None or p.dead:
            return None
        if p.partner_key != e.key:
            if PARTNER_CHECKED:
                return None
            p.flow.crossed = True
            event("a segment of one flow reaches another flow's entry (known bug)")
        return p

    def _touch(self, e: Entry):
        """Both directions are stamped together once the arriving one is older than the touch."""
        if e.age >= 1:
            e.age = 0
            p = self._partner(e)
            if p is not None:
                p.age = 0

    def _track(self, e: Entry, from_backend: bool, flags: int, seq: int, ack: int, length: int, ts):
        """The state bits of both entries and the closing record (tcpstate.h's rules as the
        README and xdplb_abi.h state them)."""
        set_ = clear = 0
        if flags & RST:
            set_ |= CLOSING | RESET
        if flags & FIN:
            set_ |= CLOSING
            if not from_backend:
                set_ |= FIN_CLIENT
            elif flags & ACK:
                set_ |= FIN_BACKEND
        if e.flags & HANDSHAKE and not from_backend and flags & (SYN | RST | ACK) == ACK:
            clear |= HANDSHAKE
        # From the backend's FIN on, what it acknowledges and echoes is recorded.
        if from_backend and flags & ACK and (e.flags | set_) & FIN_BACKEND:
            tsecr = ts[1] if ts else 0
            if not e.flags & FIN_BACKEND:
                e.ts_recent, e.rcv_nxt = tsecr, ack
            else:
                if newer(ack, e.rcv_nxt):
                    e.rcv_nxt = ack
                if ts and newer(tsecr, e.ts_recent):
                    e.ts_recent = tsecr
            if ts:
                set_ |= END_TS
        client_fin = not from_backend and flags & FIN
        if not set_ & ~e.flags and not clear & e.flags and not client_fin:
            return  # nothing new for this entry: its partner is not looked at either
        e.flags = (e.flags | set_) & ~clear
        p = self._partner(e)
        if p is None:
            return
        # The client's FIN after the backend's: what the backend will know once it has it.
        if client_fin and p.flags & FIN_BACKEND:
            end = (seq + length + 1) % 2**32
            if newer(end, p.rcv_nxt):
                p.rcv_nxt = end
            if ts and newer(ts[0], p.ts_recent):
                p.ts_recent = ts[0]
        p.flags = (p.flags | set_) & ~clear

    # ---- sending ----------------------------------------------------------------------
    def _run(self, pkt: bytes):
        action, out = self.harness.run(pkt)
        if action in (XDP_TX, XDP_REDIRECT):
            errors = P.checksum_errors(out)
            assert not errors, f"{errors}: {P.Ether(out).summary()}"
        return action, out

    def _expect_pass(self, pkt: bytes, *reasons: str):
        action, out = self._run(pkt)
        assert (action, out) == (XDP_PASS, pkt), f"expected to pass untouched, got action {action}"
        self._count("pass", *reasons)

    def _count(self, *names: str):
        for name in names:
            self.expected[name] = self.expected.get(name, 0) + 1

    def _hop(self, backend):
        return self.harness.hops[backend]

    def _forward_action(self, backend):
        return XDP_TX if self._hop(backend).ifindex == LOOPBACK else XDP_REDIRECT

    def _to_backend(self, flow: Flow, **kw) -> bytes:
        hop = self._hop(flow.backend)
        return P.tcp(flow.src[0], flow.src[1], flow.backend, 80, smac=hop.smac, dmac=hop.dmac, ttl=63, **kw)

    def _next_id(self):
        self.ip_id = self.ip_id % 65535 + 1
        return self.ip_id

    def send_client(self, c: Client, flags: str, seq: int, ack: int = 0, payload: bytes = b"", options=()):
        """A client segment: what the model expects, checked against what the program does."""
        addr, port = c.ck
        mac = dict(CLIENTS)[addr]
        ts = None
        for name, value in options:
            if name == "Timestamp":
                ts = value
        kw = dict(flags=flags, seq=seq, ack=ack, payload=payload, tcp_options=options, ip_id=self._next_id())
        pkt = P.tcp(addr, port, P.VIP, 80, smac=mac, **kw)
        bits = sum(TCP_FLAGS[ch] for ch in flags)
        ck = client_key(c.ck)
        e = self.entries.get(ck)
        pure_syn = bits & (SYN | ACK | RST) == SYN
        if e is not None and not e.dead and not self.expired(e) and not (e.flags & CLOSING and pure_syn):
            flow = e.flow
            event("client packet of an open flow")
            action, out = self._run(pkt)
            assert (action, out) == (self._forward_action(flow.backend), self._to_backend(flow, **kw)), \
                f"flow {flow.n}: expected {P.Ether(self._to_backend(flow, **kw)).summary()}, got {action} " \
                f"{P.Ether(out).summary()}"
            self._count("tx" if action == XDP_TX else "redirect")
            self._touch(e)
            self._track(e, False, bits, seq, ack, len(payload), ts)
            return
        if not pure_syn:
            event("client packet of no flow")
            self._expect_pass(pkt, "no_flow")
            return
        backend = self._ring_backend(c.ck)
        if backend is None:
            event("SYN without a backend")
            self._expect_pass(pkt, "no_backend")
            return
        tsval = ts[0] if ts else None
        free = [s for s in SOURCES if self.source_free(backend, s, seq, tsval)]
        action, out = self._run(pkt)
        if not free:
            event("SYN finds every source held")
            assert action == XDP_DROP, f"every source towards {backend} is held, yet action {action}"
            self._count("drop", "snat_exhausted")
            return
        assert action == self._forward_action(backend), f"SYN with free sources {free}: action {action}"
        got = P.Ether(out)
        src = (got[P.IP].src, got[P.TCP].sport)
        assert got[P.IP].dst == backend, f"the ring says {backend}, the SYN went to {got[P.IP].dst}"
        assert src in free, f"took source {src} towards {backend}; free: {free}"
        self.flows += 1
        flow = Flow(self.flows, c, backend, src, b_isn=(90_000 + 1_000_003 * self.flows) % 2**32)
        assert out == self._to_backend(flow, **kw)
        bk = flow.bkey
        old = self.entries.get(bk)
        if old is not None and not self.expired(old):
            event("SYN takes over a closed flow's source")
            self._count("snat_reused")
            # The old connection's client side is retired if it still leads to the source.
            ce = self.entries.get(old.partner_key)
            if ce is not None and not ce.dead and ce.partner_key == bk:
                ce.dead = True
        else:
            event("SYN takes a free source")
        if e is not None and not e.dead:
            event("SYN replaces a closing or expired client entry")
        self.entries[ck] = Entry(flow, reply=False)
        self.entries[bk] = Entry(flow, reply=True)
        self.backend_flows[bk] = flow
        self._count("new_flow", "tx" if action == XDP_TX else "redirect")

    def send_backend(self, bk: tuple, flags: str, seq: int, ack: int, payload: bytes = b"", options=()):
        backend, snat, _, sport = bk
        ts = None
        for name, value in options:
            if name == "Timestamp":
                ts = value
        kw = dict(flags=flags, seq=seq, ack=ack, payload=payload, tcp_options=options, ip_id=self._next_id())
        hop = self.harness.hops[backend]
        pkt = P.tcp(backend, 80, snat, sport, smac=hop.dmac, dmac=hop.smac, **kw)
        bits = sum(TCP_FLAGS[ch] for ch in flags)
        e = self.entries.get(bk)
        if e is None or e.dead or (e.flags & HANDSHAKE and self.expired(e)):
            event("backend packet of no flow")
            self._expect_pass(pkt)
            return
        owner = e.flow
        addr, port = owner.client.ck
        expected = P.tcp(P.VIP, 80, addr, port, smac=P.LB_MAC, dmac=dict(CLIENTS)[addr], ttl=63, **kw)
        action, out = self._run(pkt)
        assert (action, out) == (XDP_TX, expected), \
            f"reply of flow {owner.n}: expected {P.Ether(expected).summary()}, got {action} {P.Ether(out).summary()}"
        event("backend packet of a flow")
        self._count("tx")
        if not e.flags & HANDSHAKE:  # a SYN-ACK repeated to a silent client keeps nothing alive
            self._touch(e)
        self._track(e, True, bits, seq, ack, len(payload), ts)

    # ---- rules: clients -------------------------------------------------------------------
    @rule(ci=st.integers(0, len(CLIENTS) - 1), port=st.sampled_from(CLIENT_PORTS), isn=st.sampled_from(ISNS),
          ts=st.one_of(st.none(), st.sampled_from(TSVALS)))
    def client_syn(self, ci, port, isn, ts):
        """A new connection (or, while the last one from this port is open, its SYN again)."""
        ck = (CLIENTS[ci][0], port)
        c = self.clients.get(ck)
        if c is None or c.closed:
            c = self.clients[ck] = Client(ck, isn, ts)
        else:
            event("SYN retransmitted")
        self.send_client(c, "S", c.isn, options=syn_options(c.ts) if c.ts is not None else ())

    def _client_segment(self, c: Client, kind: str, size: int):
        # What the client acknowledges: the backend side of the flow its port has.
        e = self.entries.get(client_key(c.ck))
        b_nxt = e.flow.b_nxt if e is not None and e.flow.client is c else 0
        b_ts = e.flow.b_ts if e is not None and e.flow.client is c else 0
        options = ()
        if c.ts is not None:
            c.ts = (c.ts + 1) % 2**32
            options = ts_options(c.ts, b_ts)
        seq = c.nxt
        if kind == "rst":
            c.closed = True
            self.send_client(c, "R", seq)
            return
        payload = b"x" * size if kind == "data" else b""
        c.nxt = (c.nxt + len(payload) + (kind == "fin")) % 2**32
        if kind == "fin":
            c.closed = True
        self.send_client(c, {"ack": "A", "data": "PA", "fin": "FA"}[kind], seq, b_nxt, payload, options)

    @precondition(lambda self: self.clients)
    @rule(**CLIENT_SEGMENT)
    def client_segment(self, pick, kind, size):
        """A segment of a client's latest connection from one of its ports (open or not)."""
        c = self.clients[sorted(self.clients)[pick % len(self.clients)]]
        self._client_segment(c, kind, size)

    @precondition(lambda self: self.clients)
    @rule(**CLIENT_SEGMENT)
    def client_segment_again(self, pick, kind, size):
        """The same rule once more: hypothesis picks rules evenly, traffic should dominate."""
        self.client_segment(pick, kind, size)

    @precondition(lambda self: self.clients)
    @rule(**CLIENT_SEGMENT)
    def client_segment_once_more(self, pick, kind, size):
        self.client_segment(pick, kind, size)

    @rule(ci=st.integers(0, len(CLIENTS) - 1), port=st.sampled_from(CLIENT_PORTS), isn=st.sampled_from(ISNS),
          ts=st.one_of(st.none(), st.sampled_from(TSVALS)))
    def client_syn_again(self, ci, port, isn, ts):
        self.client_syn(ci, port, isn, ts)

    # ---- rules: backends ---------------------------------------------------------------
    @precondition(lambda self: self.backend_flows)
    @rule(**BACKEND_SEGMENT)
    def backend_segment(self, pick, kind, size):
        """A backend's segment on a tuple the program gave it (to the latest flow given it)."""
        keys = sorted(self.backend_flows)
        bk = keys[pick % len(keys)]
        flow = self.backend_flows[bk]
        c = flow.client
        flow.b_ts += 1
        options = ts_options(flow.b_ts, c.ts) if c.ts is not None else ()
        if kind == "synack":
            self.send_backend(bk, "SA", flow.b_isn, (c.isn + 1) % 2**32, options=options)
            return
        if kind == "rst":
            self.send_backend(bk, "R", flow.b_nxt, 0)
            return
        payload = b"y" * size if kind == "data" else b""
        seq = flow.b_nxt
        flow.b_nxt = (flow.b_nxt + len(payload) + (kind == "fin")) % 2**32
        self.send_backend(bk, {"ack": "A", "data": "PA", "fin": "FA"}[kind], seq, c.nxt, payload, options)

    @precondition(lambda self: self.backend_flows)
    @rule(**BACKEND_SEGMENT)
    def backend_segment_again(self, pick, kind, size):
        self.backend_segment(pick, kind, size)

    @precondition(lambda self: self.backend_flows)
    @rule(**BACKEND_SEGMENT)
    def backend_segment_once_more(self, pick, kind, size):
        self.backend_segment(pick, kind, size)

    # ---- rules: whole exchanges (deeper states in fewer steps) ---------------------------
    def _flow_of(self, pick):
        keys = sorted(self.backend_flows)
        bk = keys[pick % len(keys)]
        return bk, self.backend_flows[bk]

    def _backend_says(self, bk, flow, kind):
        c = flow.client
        flow.b_ts += 1
        options = ts_options(flow.b_ts, c.ts) if c.ts is not None else ()
        if kind == "synack":
            self.send_backend(bk, "SA", flow.b_isn, (c.isn + 1) % 2**32, options=options)
            return
        seq = flow.b_nxt
        flow.b_nxt = (flow.b_nxt + (kind == "fin")) % 2**32
        self.send_backend(bk, "FA" if kind == "fin" else "A", seq, c.nxt, options=options)

    @precondition(lambda self: self.backend_flows)
    @rule(pick=st.integers(0, 255))
    def handshake(self, pick):
        """The backend's SYN-ACK and the client's ACK."""
        bk, flow = self._flow_of(pick)
        self._backend_says(bk, flow, "synack")
        if not flow.client.closed:
            self._client_segment(flow.client, "ack", 0)

    @precondition(lambda self: self.backend_flows)
    @rule(pick=st.integers(0, 255), client_resets=st.booleans())
    def backend_closes(self, pick, client_resets):
        """An HTTP server with Connection: close: the backend's FIN, the client's FIN (or
        reset), the backend's last ACK. The backend then sits in TIME_WAIT on the tuple."""
        bk, flow = self._flow_of(pick)
        self._backend_says(bk, flow, "fin")
        if not flow.client.closed:
            self._client_segment(flow.client, "rst" if client_resets else "fin", 0)
        self._backend_says(bk, flow, "ack")

    # ---- rules: strays and traffic that is none of ours ----------------------------------
    @rule(kind=st.sampled_from(["client", "backend", "port", "address", "udp", "icmp", "snat_port"]),
          ci=st.integers(0, len(CLIENTS) - 1), port=st.sampled_from(CLIENT_PORTS),
          backend=st.sampled_from(BACKEND_POOL), src=st.sampled_from(SOURCES))
    def stray(self, kind, ci, port, backend, src):
        """A segment from any client port or backend tuple, whether a flow holds it or not;
        and packets for no service at all, which pass untouched."""
        addr, mac = CLIENTS[ci]
        if kind == "client":
            ck = (addr, port)
            self._client_segment(self.clients.get(ck) or Client(ck, 123_456, None), "ack", 0)
            return
        if kind == "backend":
            bk = backend_key(backend, src)
            flow = self.backend_flows.get(bk)
            self.send_backend(bk, "A", flow.b_nxt if flow else 1, flow.client.nxt if flow else 1)
            return
        pkt = {
            "port": lambda: P.tcp(addr, port, P.VIP, 22, smac=mac),
            "address": lambda: P.tcp(addr, port, "10.0.0.9", 80, smac=mac),
            "udp": lambda: P.udp(addr, port, P.VIP, 80, smac=mac),
            "icmp": lambda: P.build(P.Ether(src=mac, dst=P.LB_MAC) / P.IP(src=addr, dst=P.VIP) / P.ICMP()),
            # a port the control plane marked SNAT (its range is wider than the config's)
            "snat_port": lambda: P.tcp(backend, 80, src[0], SNAT_RANGE[1] + 5, flags="A", smac=P.BACKEND_MAC),
        }[kind]()
        self._expect_pass(pkt)

    # ---- rules: configuration ------------------------------------------------------------------
    @precondition(lambda self: self.reconfigurations < MAX_RECONFIGURATIONS)
    @rule(kind=st.sampled_from(["weight", "weight", "weight", "remove", "seed"]),
          backend=st.sampled_from(BACKEND_POOL), weight=st.integers(0, 2), seed=st.sampled_from(SEEDS))
    def reconfigure(self, kind, backend, weight, seed):
        """A new weight, a backend added or removed, a new Maglev seed: open flows stay
        where they are (README: Flows; a removed backend's flows go on to it), new ones
        follow the new ring."""
        h = self.harness
        self.reconfigurations += 1
        if kind == "weight" and self.weights.get(backend) != weight:
            event("backend added" if backend not in self.weights else f"weight set to {weight}")
            self.weights[backend] = weight
            self._configure()
        elif kind == "remove" and backend in self.weights and len(self.weights) > 1:
            event("backend removed")
            del self.weights[backend]
            self._configure()
        elif kind == "seed" and HAS_FLOW_SEED and hasattr(h, "sync") and h.settings.hash_seed != seed:
            event("Maglev seed changed")
            h.sync(settings=dataclasses.replace(h.settings, hash_seed=seed))
            self._configure()
            assert self.cfg.hash_seed == seed

    # ---- rules: time ------------------------------------------------------------------
    @rule(units=st.integers(1, 2))
    def advance_clock(self, units):
        self.table.age_all(units * self.unit_ticks)
        for e in self.entries.values():
            e.age += units

    # ---- invariants ----------------------------------------------------------------------
    @invariant()
    def counters_moved_as_expected(self):
        now = self.dp.counters()
        moved = {k: now[k] - self.counters[k] for k in now if now[k] != self.counters[k]}
        assert moved == self.expected, f"counters moved by {moved}, the model expected {self.expected}"
        self.counters, self.expected = now, {}

    @invariant()
    def table_is_the_model(self):
        used = self.table.used()
        real = {FlowTable.key_of(s): (i, s) for i, s in used.items()}
        assert len(real) == len(used), "a key is stored twice"
        assert set(real) == set(self.entries), \
            f"table keys {sorted(real)} differ from the model's {sorted(self.entries)}"
        now = clock.now_ticks(self.cfg.tick_shift)
        for key, e in self.entries.items():
            index, s = real[key]
            want = e.flags | (REPLY if e.reply else 0) | (DEAD if e.dead else 0)
            assert s.flow.flags == want, \
                f"{key} (flow {e.flow.n}): flags {F(s.flow.flags)!r}, the model says {F(want)!r}"
            assert FlowTable.rewrite_of(s) == e.rewrite(), f"{key}: rewrite {FlowTable.rewrite_of(s)}"
            age = clock.ticks_since(now, s.last_seen)
            assert round(age / self.unit_ticks) == e.age, f"{key}: {age} ticks old, the model says {e.age} units"
            if e.reply and not e.dead and e.flags & FIN_BACKEND:
                end = abi.FlowEnd()
                self.lib.lookup(self.fds["xdplb_flow_ends"], ctypes.c_uint32(index), end)
                assert (end.ts_recent, end.rcv_nxt) == (e.ts_recent, e.rcv_nxt), \
                    f"{key}: closing record {(end.ts_recent, end.rcv_nxt)}, the model's {(e.ts_recent, e.rcv_nxt)}"

    @invariant()
    def open_connections_hold_their_tuples(self):
        """Both entries of every open connection are there, lead to each other, and no two
        open connections share a (SNAT address, SNAT port, backend) tuple."""
        tuples = {}
        for key, e in self.entries.items():
            if e.reply or e.dead or self.expired(e) or closed_both_ways(e.flags) or e.flow.crossed:
                continue
            flow = e.flow
            other = self.entries.get(flow.bkey)
            assert other is not None and other.flow is flow and not other.dead, \
                f"open flow {flow.n} from {key} leads to {flow.bkey}, which holds " \
                f"{'nothing' if other is None else f'flow {other.flow.n}'}"
            assert other.flags == e.flags, \
                f"flow {flow.n}: client side {F(e.flags)!r}, backend side {F(other.flags)!r}"
            t = (flow.src, flow.backend)
            assert t not in tuples, f"flows {tuples[t]} and {flow.n} share {t}"
            tuples[t] = flow.n


FlowModel.initial_seed = None
FlowModel.table = None

MODEL_SETTINGS = settings(max_examples=80, stateful_step_count=60, derandomize=True, database=None,
                          deadline=None, suppress_health_check=list(HealthCheck))


def test_the_program_follows_the_model(harness):
    FlowModel.harness = harness
    FlowModel.initial_seed = harness.settings.hash_seed
    FlowModel.table = FlowTable(harness.dp.fds["xdplb_flows"])
    try:
        SEEN.clear()
        run_state_machine_as_test(FlowModel, settings=MODEL_SETTINGS)
        print("\n".join(f"{n:6d}  {what}" for what, n in SEEN.most_common()))
    finally:
        FlowModel.table.close()
        FlowModel.harness = FlowModel.table = None


def _client_side_flags(table: FlowTable, client: str, port: int) -> int:
    [flags] = [s.flow.flags for s in table.used().values()
               if FlowTable.key_of(s) == (client, P.VIP, port, 80) and not s.flow.flags & DEAD]
    return flags


def test_a_late_segment_of_a_replaced_flow_leaves_the_new_one_alone(harness):
    """A client aborts a connection (RST) and opens a new one from the same port, which
    is balanced afresh (a new SNAT source). The old connection's backend, which had not
    seen the reset yet, closes it: its FIN still reaches the client, as designed, but it
    must not change the new connection (found by the model above). Today its state bits
    (CLOSING, FIN_BACKEND) land on the new connection's client-side entry, which then
    expires after timeouts.tcp_closing (120 s) of quiet instead of timeouts.tcp (900 s):
    the client's next segment is handed to the kernel, whose reset kills the connection."""
    h = harness
    h.configure([service(P.BACKEND)])
    table = FlowTable(h.dp.fds["xdplb_flows"])
    try:
        def client(flags, seq, **kw):
            return P.tcp(P.CLIENT, 40000, P.VIP, 80, flags=flags, seq=seq, **kw)

        action, out = h.run(client("S", 1000))
        assert action == XDP_TX and P.Ether(out)[P.TCP].sport == 20000
        assert h.run(client("A", 1001, ack=5001))[0] == XDP_TX
        assert h.run(client("R", 1001))[0] == XDP_TX
        action, out = h.run(client("S", 70_000))  # the port again: a new connection
        assert action == XDP_TX and P.Ether(out)[P.TCP].sport == 20001
        assert h.run(client("A", 70_001, ack=9001))[0] == XDP_TX
        assert _client_side_flags(table, P.CLIENT, 40000) == 0  # established
        # The old connection's backend, which had not seen the client's reset, closes it.
        late = P.tcp(P.BACKEND, 80, P.SNAT, 20000, flags="FA", seq=5001, ack=1001, smac=P.BACKEND_MAC)
        action, out = h.run(late)
        assert (action, out) == (XDP_TX, P.tcp(P.VIP, 80, P.CLIENT, 40000, flags="FA", seq=5001, ack=1001,
                                               smac=P.LB_MAC, dmac=P.CLIENT_MAC, ttl=63))
        new_flags = _client_side_flags(table, P.CLIENT, 40000)
        cfg = read_config(h.dp.fds)
        table.age_all(cfg.tcp_closing_expiry_ticks + cfg.ticks_per_s)  # quiet for tcp_closing + 1 s
        data = client("PA", 70_001, ack=9001, payload=b"GET / HTTP/1.1\r\n\r\n")
        action, _ = h.run(data)
        assert (F(new_flags), action) == (F(0), XDP_TX)
    finally:
        table.close()
