# SPDX-License-Identifier: Apache-2.0
"""Both CPUs at once against one flow table, the way RSS spreads a live load: the two
directions of a connection are processed on different CPUs, at the same moment.

Two workers, each pinned to its own CPU: BPF_PROG_TEST_RUN runs the program on the
calling CPU. They are processes (forked: they share the loaded program and its maps),
not threads: two threads of one interpreter hand the GIL to each other around every
call, so their programs seldom run at the same instant. The workers keep in step by
spinning on shared memory, within about a microsecond of each other. Connections go in
rounds of ROUND; in each round worker w is the client of the connections it owns and
the backend of the other worker's:

  SYNs of both workers at once | SYN-ACK (other CPU) | client ACK + request and the
  backend's response at once | client FIN and backend FIN-ACK at once | backend's last ACK

so connection i sees its client's segment on one CPU while its backend's segment runs on
the other: concurrent stamps, concurrent state-bit updates of both entries (the
simultaneous close), concurrent SNAT cursor steps and takeovers of closed flows' sources
(RFC 6191: every SYN carries a newer timestamp than the closed flows). The last round
stays open. Afterwards, from what each packet became and from the table:

* every packet was forwarded, byte for byte as built from scratch (checksums included),
  with the source and backend its connection's SYN got;
* no two connections of a round (all open together) share a (SNAT source, backend);
* every entry of every connection is where it should be: open ones established on both
  sides, closed ones closed on both sides (no state bit lost to a race), the client side
  of a connection whose source a later SYN took over retired, and nothing else;
* counters add up (new flows, packets, takeovers; no drop, pass, eviction, exhaustion)
  and both CPUs' per-CPU counters took part.

Races are caught by chance, but often: with the state-bit update made a plain store
instead of a compare-and-swap, every one of 5 runs failed (a lost FIN_CLIENT or
FIN_BACKEND); with the SNAT cursor a plain increment and the slot claim without its
compare-and-swap, one run in three failed (a source given twice).
"""
from __future__ import annotations

import ctypes
import multiprocessing
import mmap
import os
import socket
import struct
import traceback
import time
from dataclasses import dataclass, field

from xdplb import abi
from xdplb import libbpf as _libbpf
from xdplb.libbpf import libbpf

from tests.conftest import require
from . import packets as P
from .conftest import FLOW_SLOTS, XDP_TX, service

F = abi.FlowFlags
CLOSED = int(F.CLOSING | F.FIN_CLIENT | F.FIN_BACKEND | F.END_TS)
ROUND = 256
ROUNDS = 24  # 6144 connections: 23 rounds closed, the last one left open
BACKENDS = (P.BACKEND, P.BACKEND2)
SNAT_ADDRS = (P.SNAT, P.SNAT2)
SNAT_RANGE = (20000, 20127)  # 256 sources per backend: a round holds about half of them
CLIENT_MACS = ("02:00:00:00:01:00", "02:00:00:00:01:01")
CPUS = (0, 1)  # worker w runs on CPUS[w]
SYN, ACK, FIN, PSH = 0x02, 0x10, 0x01, 0x08


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def frame(smac: str, dmac: str, src: str, dst: str, sport: int, dport: int, flags: int, seq: int, ack: int,
          ts: tuple[int, int], payload: bytes = b"", ttl: int = 64, ip_id: int = 1) -> bytes:
    """An Ethernet/IPv4/TCP frame with a timestamp option, checksums computed here (scapy
    is slow for 40,000 frames); checked against scapy in the test."""
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", *ts)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (20 + len(opts)) // 4 << 4, flags, 64240, 0, 0)
    tcp += opts + payload
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    check = ~_sum16(s + d + struct.pack("!BBH", 0, 6, len(tcp)) + tcp) & 0xFFFF
    tcp = tcp[:16] + struct.pack("!H", check) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ip_id, 0x4000, ttl, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", ~_sum16(ip) & 0xFFFF) + ip[12:]
    return bytes.fromhex(dmac.replace(":", "")) + bytes.fromhex(smac.replace(":", "")) + b"\x08\x00" + ip + tcp


@dataclass
class Conn:
    n: int
    owner: int  # the worker (CPU) playing its client; the other one plays its backend
    client: str
    port: int
    closes: bool
    isn: int = 0
    b_isn: int = 0
    src: tuple | None = None  # (SNAT address, port), from the SYN's output
    backend: str = ""
    sent: list = field(default_factory=list)  # (direction, input, action, output), in order


class Shared:
    """Memory both workers share (an anonymous MAP_SHARED mapping made before the fork):
    each worker's progress, for running in step, and what each connection's SYN got."""

    PROGRESS, SOURCE = struct.Struct("=Q"), struct.Struct("=4sHBB")  # address, port, backend index, got one

    def __init__(self, conns: int):
        self.mem = mmap.mmap(-1, 16 + self.SOURCE.size * conns)

    def announce(self, me: int, value: int):
        self.PROGRESS.pack_into(self.mem, 8 * me, value)

    def wait_for(self, other: int, value: int):
        """Spins (no system call, no lock) until the other worker has announced value."""
        spins, deadline = 0, time.monotonic() + 60
        while self.PROGRESS.unpack_from(self.mem, 8 * other)[0] < value:
            spins += 1
            if spins % 100_000 == 0 and time.monotonic() > deadline:
                raise TimeoutError("the other worker stopped")

    def set_source(self, c: Conn):
        self.SOURCE.pack_into(self.mem, 16 + self.SOURCE.size * c.n, socket.inet_aton(c.src[0]), c.src[1],
                              BACKENDS.index(c.backend), 1)

    def get_source(self, c: Conn) -> bool:
        addr, port, backend, got = self.SOURCE.unpack_from(self.mem, 16 + self.SOURCE.size * c.n)
        if got:
            c.src, c.backend = (socket.inet_ntoa(addr), port), BACKENDS[backend]
        return bool(got)


class Prepared:
    """One test run, built before its phase starts, so that a worker's loop is a system
    call and little else."""

    def __init__(self, conn: Conn, direction: str, data: bytes):
        self.conn, self.direction, self.data = conn, direction, data
        self.inbuf = ctypes.create_string_buffer(data, len(data))
        self.outbuf = ctypes.create_string_buffer(len(data) + 512)
        self.opts = _libbpf.TestRunOpts(sz=ctypes.sizeof(_libbpf.TestRunOpts), data_size_in=len(data),
                                        data_size_out=len(self.outbuf), repeat=1,
                                        data_in=ctypes.addressof(self.inbuf), data_out=ctypes.addressof(self.outbuf))

    def result(self) -> tuple[int, bytes]:
        return self.opts.retval, self.outbuf.raw[:self.opts.data_size_out]


def ts(rnd: int, phase: int, c: Conn) -> tuple[int, int]:
    """Timestamps from one clock for every client: each SYN newer than every FIN before it."""
    return (rnd * 8 + phase) << 16 | c.n % ROUND, 1


class Worker:
    """One of the two processes: the client of the connections it owns, the backend of
    the others'."""

    def __init__(self, me: int, prog_fd: int, hops: dict, shared: Shared, barrier):
        self.me, self.other, self.fd, self.hops = me, 1 - me, prog_fd, hops
        self.shared, self.barrier = shared, barrier
        self.test_run = libbpf().lib.bpf_prog_test_run_opts
        self.step = 0  # progress announced so far (both workers count the same way)

    def syn(self, rnd, c: Conn) -> Prepared:
        return Prepared(c, "c", frame(CLIENT_MACS[c.owner], P.LB_MAC, c.client, P.VIP, c.port, 80, SYN, c.isn, 0,
                                      ts(rnd, 0, c), ip_id=c.n & 0xFFFF))

    def backend_says(self, rnd, phase, c: Conn, flags: int, seq: int, ack: int, payload: bytes = b"") -> Prepared:
        hop = self.hops[c.backend]
        return Prepared(c, "b", frame(hop.dmac, hop.smac, c.backend, c.src[0], 80, c.src[1], flags, seq % 2**32,
                                      ack % 2**32, ts(rnd, phase, c), payload))

    def client_says(self, rnd, phase, c: Conn, flags: int, seq: int, ack: int, payload: bytes = b"") -> Prepared:
        return Prepared(c, "c", frame(CLIENT_MACS[c.owner], P.LB_MAC, c.client, P.VIP, c.port, 80, flags,
                                      seq % 2**32, ack % 2**32, ts(rnd, phase, c), payload))

    def phase(self, conns: list[Conn], mine, theirs, in_step: int = 0):
        """Walks the round in order: connection i's own segment if this worker is its
        client, its backend's otherwise. A barrier keeps phases apart. in_step = k: the
        workers also wait for each other before every k connections (spinning on shared
        memory, which keeps them within a microsecond or so), so that what each sends for
        them runs at the same moment on the two CPUs: with 1, connection i's two
        segments; with 2, the SYNs of two connections (one owned by each worker)."""
        work = []
        for c in conns:
            build = mine if c.owner == self.me else theirs
            work.append(build(c) if build and (c.owner == self.me or self.shared.get_source(c)) else None)
        self.barrier.wait(timeout=60)
        run, fd, shared = self.test_run, self.fd, self.shared
        group = in_step or len(work)
        for at in range(0, len(work), group):
            if in_step:
                self.step += 1
                shared.announce(self.me, self.step)
                shared.wait_for(self.other, self.step)
            for p in work[at:at + group]:
                if p is not None and run(fd, ctypes.byref(p.opts)):
                    raise OSError(ctypes.get_errno(), "BPF_PROG_TEST_RUN")
        done = [p for p in work if p is not None]
        for p in done:
            action, out = p.result()
            p.conn.sent.append((p.direction, p.data, action, out))
            if p.data[47] == SYN and action == XDP_TX:  # what the SYN got, for the other worker
                p.conn.backend = socket.inet_ntoa(out[30:34])
                p.conn.src = (socket.inet_ntoa(out[26:30]), struct.unpack("!H", out[34:36])[0])
                shared.set_source(p.conn)
        self.barrier.wait(timeout=60)  # results in place before anyone builds on them
        return done

    def run(self, rounds: list[list[Conn]]) -> list:
        """The whole exchange; returns what this worker sent and got back."""
        os.sched_setaffinity(0, {CPUS[self.me]})
        request, response = b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 18
        sent = []
        for rnd, conns in enumerate(rounds):
            phases = [
                # SYNs on both CPUs at once: one SNAT cursor, one table, sources taken over.
                (lambda c: self.syn(rnd, c), None, 2),
                (None, lambda c: self.backend_says(rnd, 1, c, SYN | ACK, c.b_isn, c.isn + 1), 0),
                # The request and the response cross: both directions of each connection at once.
                (lambda c: self.client_says(rnd, 2, c, PSH | ACK, c.isn + 1, c.b_isn + 1, request),
                 lambda c: self.backend_says(rnd, 2, c, PSH | ACK, c.b_isn + 1, c.isn + 1, response), 1),
            ]
            if conns[0].closes:
                phases += [
                    # A simultaneous close: both FINs at once, on two CPUs.
                    (lambda c: self.client_says(rnd, 3, c, FIN | ACK, c.isn + 19, c.b_isn + 38),
                     lambda c: self.backend_says(rnd, 3, c, FIN | ACK, c.b_isn + 38, c.isn + 19), 1),
                    (None, lambda c: self.backend_says(rnd, 4, c, ACK, c.b_isn + 39, c.isn + 20), 0),
                ]
            for mine, theirs, in_step in phases:
                sent += [(p.conn.n, p.direction, p.data, *p.result()) for p in self.phase(conns, mine, theirs, in_step)]
        return sent


def work(me: int, prog_fd: int, hops: dict, shared: Shared, barrier, rounds, pipe):
    """A worker process's life: its results, or what went wrong, go back through the pipe."""
    try:
        sent = Worker(me, prog_fd, hops, shared, barrier).run(rounds)
        pipe.send(("ok", os.sched_getaffinity(0), sent))
    except BaseException:  # noqa: BLE001 - reported by the test
        barrier.abort()
        pipe.send(("error", None, traceback.format_exc()))
    finally:
        pipe.close()


def expected_output(h, c: Conn, direction: str, pkt: bytes) -> bytes:
    """The input rewritten: built again from scratch, so the checksums are checked too."""
    ip_id = struct.unpack("!H", pkt[18:20])[0]
    sport, dport, seq, ack, _, flags = struct.unpack("!HHIIBB", pkt[34:48])
    tsval, tsecr = struct.unpack("!II", pkt[58:66])
    payload = pkt[66:]
    if direction == "c":
        hop = h.hops[c.backend]
        return frame(hop.smac, hop.dmac, c.src[0], c.backend, c.src[1], 80, flags, seq, ack, (tsval, tsecr),
                     payload, ttl=63, ip_id=ip_id)
    return frame(P.LB_MAC, CLIENT_MACS[c.owner], P.VIP, c.client, 80, c.port, flags, seq, ack, (tsval, tsecr),
                 payload, ttl=63, ip_id=ip_id)


def slots_by_key(h) -> dict[tuple, list[abi.FlowSlot]]:
    size = ctypes.sizeof(abi.FlowSlot)
    with mmap.mmap(h.dp.fds["xdplb_flows"], FLOW_SLOTS * size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        raw = m[:]
    out: dict[tuple, list] = {}
    for i in range(FLOW_SLOTS):
        s = abi.FlowSlot.from_buffer_copy(raw, i * size)
        if s.key.proto:
            k = s.key
            key = (socket.inet_ntoa(struct.pack("=I", k.saddr)), socket.inet_ntoa(struct.pack("=I", k.daddr)),
                   socket.ntohs(k.sport), socket.ntohs(k.dport))
            out.setdefault(key, []).append(s)
    return out


def percpu_counter(h, counter: abi.Counter) -> list[int]:
    n = h.dp.ncpus
    buf = (ctypes.c_uint64 * n)()
    libbpf().lookup(h.dp.fds["xdplb_counters"], ctypes.c_uint32(counter), buf)
    return list(buf)


def configure(h):
    """Two backends, two SNAT addresses with 128 ports each, default timeouts (nothing
    expires during the test: every source a SYN gets back comes from a takeover)."""
    h.configure([service(*BACKENDS)])
    cfg = abi.Config()
    lib = libbpf()
    lib.lookup(h.dp.fds["xdplb_config"], ctypes.c_uint32(0), cfg)
    cfg.snat_addr_count = len(SNAT_ADDRS)
    for i, a in enumerate(SNAT_ADDRS):
        cfg.snat_addrs[i] = struct.unpack("=I", socket.inet_aton(a))[0]
    cfg.snat_port_min, cfg.snat_port_max = SNAT_RANGE
    lib.update(h.dp.fds["xdplb_config"], ctypes.c_uint32(0), cfg)


def test_two_cpus_share_one_flow_table(harness):
    h = harness
    require((os.cpu_count() or 1) >= 2, "needs two CPUs")
    assert frame(CLIENT_MACS[0], P.LB_MAC, P.CLIENT, P.VIP, 40000, 80, PSH | ACK, 7, 9, (5, 6), b"abc", ip_id=3) == \
        P.tcp(P.CLIENT, 40000, P.VIP, 80, flags="PA", seq=7, ack=9, smac=CLIENT_MACS[0], payload=b"abc",
              ip_id=3, tcp_options=[("NOP", None), ("NOP", None), ("Timestamp", (5, 6))])
    configure(h)
    before = {c: percpu_counter(h, c) for c in abi.Counter if c != abi.Counter.MAX}

    conns = [Conn(n, owner=n % 2, client=f"10.{1 + n % 2}.{n // 2 // 250}.{1 + n // 2 % 250}", port=30000 + n % 7,
                  closes=n // ROUND < ROUNDS - 1, isn=(n * 7919 * 65537) % 2**32, b_isn=(n * 104729 + 5) % 2**32)
             for n in range(ROUND * ROUNDS)]
    rounds = [conns[r * ROUND:(r + 1) * ROUND] for r in range(ROUNDS)]
    ctx = multiprocessing.get_context("fork")  # the children inherit the program and map fds
    shared, barrier = Shared(len(conns)), ctx.Barrier(2)
    pipes = [ctx.Pipe(duplex=False) for _ in CPUS]
    workers = [ctx.Process(target=work, args=(me, h.prog_fd, h.hops, shared, barrier, rounds, pipes[me][1]),
                           name=f"cpu{CPUS[me]}") for me in (0, 1)]
    started = time.monotonic()
    for w in workers:
        w.start()
    answers = [pipes[me][0].recv() if pipes[me][0].poll(120) else ("error", None, "no answer") for me in (0, 1)]
    for w in workers:
        w.join(timeout=30)
    elapsed = time.monotonic() - started
    assert [a[0] for a in answers] == ["ok", "ok"], "\n".join(str(a[2]) for a in answers if a[0] != "ok")
    assert [a[1] for a in answers] == [{CPUS[0]}, {CPUS[1]}]
    for _, _, sent in answers:
        for n, direction, pkt, action, out in sent:
            conns[n].sent.append((direction, pkt, action, out))
    for c in conns:
        c.sent.sort(key=lambda x: struct.unpack("!I", x[1][58:62])[0])  # by timestamp: the order of phases
        action, out = c.sent[0][2:]
        if action == XDP_TX:
            c.backend = socket.inet_ntoa(out[30:34])
            c.src = (socket.inet_ntoa(out[26:30]), struct.unpack("!H", out[34:36])[0])

    # Every packet was forwarded as its connection's SYN set it up, checksums included.
    packets = 0
    for c in conns:
        assert c.src is not None, f"connection {c.n}: the SYN got action {c.sent[0][2]}, not XDP_TX"
        assert c.backend in BACKENDS and c.src[0] in SNAT_ADDRS and SNAT_RANGE[0] <= c.src[1] <= SNAT_RANGE[1]
        assert len(c.sent) == (7 if c.closes else 4)
        for direction, pkt, action, out in c.sent:
            assert action == XDP_TX, f"connection {c.n}: {direction} packet action {action}"
            assert out == expected_output(h, c, direction, pkt), \
                f"connection {c.n}: {P.Ether(out).summary()} / {P.checksum_errors(out)}"
            packets += 1

    # A round's connections are open together: no two share a tuple. A later round takes
    # over closed ones' tuples (counted), whose client sides are then retired.
    owner: dict[tuple, Conn] = {}
    reused = 0
    superseded = set()
    for r in rounds:
        tuples = [(c.src, c.backend) for c in r]
        assert len(set(tuples)) == len(tuples), "two open connections share a SNAT source and backend"
        for c, t in zip(r, tuples):
            if t in owner:
                reused += 1
                superseded.add(owner[t].n)
            owner[t] = c
    assert reused > ROUND, "the test meant the rounds to reuse sources"

    # The flow table: each key once, each connection's entries where they should be.
    table = slots_by_key(h)
    assert all(len(v) == 1 for v in table.values()), "a key is stored twice"
    for c in conns:
        want = CLOSED if c.closes else 0
        if c.n in superseded:
            # Retired: marked DEAD, or already gone (a dead slot is free for any key).
            for cs in table.get((c.client, P.VIP, c.port, 80), []):
                assert cs.flow.flags == want | F.DEAD, f"connection {c.n}: {F(cs.flow.flags)!r}, not retired"
            continue
        [cs] = table[(c.client, P.VIP, c.port, 80)]
        fwd = (socket.inet_ntoa(struct.pack("=I", cs.flow.saddr)), socket.ntohs(cs.flow.sport),
               socket.inet_ntoa(struct.pack("=I", cs.flow.daddr)))
        assert fwd == (c.src[0], c.src[1], c.backend), f"connection {c.n}: client side leads to {fwd}"
        assert cs.flow.flags == want, f"connection {c.n}: client side {F(cs.flow.flags)!r}, expected {F(want)!r}"
        [bs] = table[(c.backend, c.src[0], 80, c.src[1])]
        back = (socket.inet_ntoa(struct.pack("=I", bs.flow.daddr)), socket.ntohs(bs.flow.dport))
        assert back == (c.client, c.port), f"connection {c.n}: backend side leads to {back}"
        assert bs.flow.flags == want | F.REPLY, \
            f"connection {c.n}: backend side {F(bs.flow.flags)!r}, expected {F(want | F.REPLY)!r}"
    live = sum(1 for v in table.values() for s in v if not s.flow.flags & F.DEAD)
    assert live == len(conns) - len(superseded) + len(owner), "entries nobody accounts for"

    # Counters: both CPUs took part, and the totals are what happened.
    moved = {c.name.lower(): [a - b for a, b in zip(percpu_counter(h, c), before[c])]
             for c in abi.Counter if c != abi.Counter.MAX}
    for cpu in CPUS:
        assert moved["tx"][cpu] > 0 and moved["new_flow"][cpu] > 0, (moved["tx"], moved["new_flow"])
    totals = {k: sum(v) for k, v in moved.items()}
    assert totals == {**{k: 0 for k in totals}, "tx": packets, "new_flow": len(conns), "snat_reused": reused}, totals
    svc = h.dp.traffic("service", h.dp.service_ids()[f"{P.VIP}:80/tcp"])
    assert (svc.packets, svc.new_flows) == (packets, len(conns))
    print(f"\n{len(conns)} connections, {packets} packets, {reused} takeovers in {elapsed:.1f} s; "
          f"per CPU tx {moved['tx']}, new flows {moved['new_flow']}")
