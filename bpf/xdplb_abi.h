/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The contract between the XDP program and the Python control plane.
 *
 * Every struct here is mirrored once in src/xdplb/abi.py; tests/packet/test_abi.py
 * compares both against the DWARF of the compiled object, so a field added here and
 * forgotten there fails the test suite instead of corrupting a map.
 * Fixed-width fields only, explicit padding, byte order in the type (__be*).
 */
#ifndef XDPLB_ABI_H
#define XDPLB_ABI_H

#include <linux/types.h>

#define XDPLB_ABI_VERSION 8

/* Limits. Map sizes derived from these are fixed at load time. */
#define XDPLB_MAX_SERVICES 512
/* Services are found in an open-addressing table (linear probing, service_hash() in
 * bpf/hash.h) the control plane builds whole and swaps in: an inlined lookup instead
 * of a hash map's helper call. Eight slots per service keep every key within
 * XDPLB_SERVICE_PROBES of its home slot; the control plane checks it. */
#define XDPLB_SERVICE_SLOTS 4096
#define XDPLB_SERVICE_PROBES 16
#define XDPLB_MAX_BACKENDS 4096
#define XDPLB_MAX_CLIENT_RULES 4096
/* SNAT sources: one address gives a backend (port range) distinct tuples, which its
 * TIME_WAIT entries hold for a minute; each further address adds as many. A power of
 * two, so that an index can be masked into bounds. */
#define XDPLB_MAX_SNAT_ADDRS 16
/* Flow table slots: a power of two, resized at load time. A flow takes two slots (client
 * side and backend side); the default keeps 1M flows at half load. */
#define XDPLB_FLOW_SLOTS_DEFAULT (4 * 1048576)
/* How many consecutive slots a key may live in (linear probing). */
#define XDPLB_FLOW_PROBES 8
/* Flow timestamps count ticks of jiffies >> xdplb_config.tick_shift (the control plane
 * picks the shift for a tick of 8-16 ms whatever CONFIG_HZ is) in 32 bits: signed
 * differences stay valid for 199 days at least. Jiffies, not a ktime helper: the
 * verifier inlines bpf_jiffies64() into one load, a helper call costs 14 ns here. */
#define XDPLB_TICK_MIN_NS 8000000
#define XDPLB_PORTS 65536

/* Every Maglev ring map has room for this many slots; a service uses the first
 * ring_size (a prime, at most this). One size for all lets the verifier inline ring
 * lookups. Slots are 16-bit backend ids packed four to a 64-bit map value (an array map
 * rounds values up to 8 bytes): a 65537-slot ring takes 128 KB of cache, not 512 KB. */
#define XDPLB_RING_SLOTS 65537
#define XDPLB_RING_SLOTS_PER_ENTRY 4
#define XDPLB_RING_ENTRIES ((XDPLB_RING_SLOTS + XDPLB_RING_SLOTS_PER_ENTRY - 1) / XDPLB_RING_SLOTS_PER_ENTRY)

/* The backend id of "no backend": a ring slot of a service with no usable backend, or
 * a trace line without a flow. Backend ids are below XDPLB_MAX_BACKENDS. */
#define XDPLB_NO_BACKEND 0xffff

/* How many SNAT sources a new flow tries before giving up (the rest are in use, or in
 * a backend's TIME_WAIT that this SYN would not get past). Clients' timestamp clocks
 * have a random offset per connection (Linux 6.x), so a source in TIME_WAIT accepts
 * about half of all SYNs: 32 tries leave a SYN without a source about once in 10^9
 * while the pool is busy but not exhausted. */
#define XDPLB_SNAT_PORT_TRIES 32

/* IPIP (XDPLB_SVC_IPIP): the outer header's TTL. A constant, not the inner TTL: the outer
 * header crosses only the network between the balancer and the backend, whatever hops
 * the client's packet has left, and a constant keeps the outer checksum's words fixed
 * for the life of a flow. 64 is Linux's default TTL (net.ipv4.ip_default_ttl). */
#define XDPLB_IPIP_TTL 64
/* IPIP adds 20 bytes. The egress MTU is asked for (a helper call) only when the
 * encapsulated packet would be longer than this: every link towards IPIP backends is
 * taken to carry at least this much (IPv6's minimum link MTU, which any Ethernet or
 * usual tunnel meets; below it, packets between its MTU and this would be sent whole,
 * and lost). Clients' full-sized packets are above it, so they are checked. */
#define XDPLB_ENCAP_MTU_FLOOR 1280

/* xdplb_ports values: which kinds of traffic use a destination port. */
enum xdplb_port_flags {
	XDPLB_PORT_TCP_SERVICE = 1 << 0,
	XDPLB_PORT_UDP_SERVICE = 1 << 1,
	XDPLB_PORT_SNAT = 1 << 2,
};

/* xdplb_config.flags */
enum xdplb_config_flags {
	XDPLB_CFG_TRACE = 1 << 0, /* trace while xdplb_config.trace_until lies ahead */
	/* Control plane only: next hops are being rewritten and hop_gen must be bumped once
	 * they are, even by a re-run after the writer was killed. */
	XDPLB_CFG_HOPS_PENDING = 1 << 1,
};

/* Tracing is a lease: `xdplb trace` sets XDPLB_CFG_TRACE with a deadline a few seconds
 * ahead and renews it while it reads, so a reader that is killed, or loses its
 * terminal, stops tracing within seconds without cleaning up. A deadline counts only
 * if it is at most this many ticks ahead (8-16 s): a flag left behind by a killed
 * reader does not come back on when 32-bit ticks wrap around. */
#define XDPLB_TRACE_LEASE_MAX_TICKS 1024

/* xdplb_service.flags */
enum xdplb_service_flags {
	XDPLB_SVC_ALLOWLIST = 1 << 0, /* only clients in xdplb_clients may use it */
	/* Clients outside the allow-list pass to the kernel instead of being dropped. */
	XDPLB_SVC_PASS_NOT_ALLOWED = 1 << 1,
	/* How packets reach the backends (none: full NAT). Direct server return: only the
	 * destination MAC changes. IPIP: an outer IPv4 header towards the backend. In both,
	 * replies bypass the balancer. */
	XDPLB_SVC_DSR = 1 << 2,
	XDPLB_SVC_IPIP = 1 << 3,
};

/* xdplb_backend.flags */
enum xdplb_backend_flags {
	XDPLB_BACKEND_IN_USE = 1 << 0,
};

/* xdplb_flow.flags */
/* Both entries of a TCP flow carry the same state bits (the data plane sets them on both
 * when a FIN, a RST or the end of the handshake passes). */
enum xdplb_flow_flags {
	XDPLB_FLOW_REPLY = 1 << 0,       /* backend -> client direction */
	XDPLB_FLOW_CLOSING = 1 << 1,     /* FIN or RST seen: shorter timeout */
	XDPLB_FLOW_DEAD = 1 << 2,        /* reset by the control plane: free for reuse */
	XDPLB_FLOW_HANDSHAKE = 1 << 3,   /* SYN sent, not yet acknowledged by the client */
	XDPLB_FLOW_RESET = 1 << 4,       /* RST seen: short timeout, unless the backend had closed */
	XDPLB_FLOW_FIN_CLIENT = 1 << 5,  /* the client sent a FIN */
	XDPLB_FLOW_FIN_BACKEND = 1 << 6, /* the backend sent a FIN: xdplb_flow_ends is valid */
	XDPLB_FLOW_END_TS = 1 << 7,      /* the backend's closing segments carry timestamps */
};

/* Indexes of xdplb_counters: what happened to packets, and why. */
enum xdplb_counter {
	XDPLB_CNT_PASS = 0,          /* not for a service: handed to the kernel */
	XDPLB_CNT_TX,                /* forwarded out of the ingress interface */
	XDPLB_CNT_REDIRECT,          /* forwarded out of another interface */
	XDPLB_CNT_DROP,              /* dropped (each drop also counts a reason) */
	XDPLB_CNT_MALFORMED,         /* truncated or invalid headers: passed */
	XDPLB_CNT_NO_BACKEND,        /* service without usable backend: passed */
	XDPLB_CNT_TABLE_FULL,        /* flow or SNAT port could not be stored: dropped */
	XDPLB_CNT_FRAGMENT,          /* first fragment of a service packet: dropped */
	XDPLB_CNT_TTL_EXPIRED,       /* TTL <= 1 for a service: passed to the kernel */
	XDPLB_CNT_NOT_ALLOWED,       /* client not in the service's allow-list: dropped (or passed) */
	XDPLB_CNT_NEW_FLOW,          /* flows created */
	XDPLB_CNT_ICMP_TRANSLATED,   /* ICMP errors about a flow, translated (dsr, ipip: relayed to its backend) */
	XDPLB_CNT_NO_FLOW,           /* full NAT: TCP non-SYN of an unknown flow: passed (kernel resets) */
	XDPLB_CNT_EVICTED,           /* live flows pushed out by new ones (table too small) */
	XDPLB_CNT_SNAT_EXHAUSTED,    /* SYN with no SNAT source the backend would accept: dropped */
	XDPLB_CNT_SNAT_REUSED,       /* a closed flow's SNAT source given to a newer SYN */
	XDPLB_CNT_BACKEND_MISMATCH,  /* ring slot naming another service's backend: counted no_backend too */
	XDPLB_CNT_RECOVERED,         /* dsr/ipip: TCP non-SYN of an unknown flow, sent where the ring points */
	XDPLB_CNT_FRAG_NEEDED,       /* ipip: too big once encapsulated, DF set: ICMP answer sent (tx) */
	XDPLB_CNT_TOO_BIG,           /* ipip: too big once encapsulated, DF clear: dropped */
	XDPLB_CNT_MAX,
};

/* What a trace line reports (only while tracing is on). */
enum xdplb_trace_event {
	XDPLB_EV_NEW_FLOW = 0,
	XDPLB_EV_FLOW,
	XDPLB_EV_REPLY,
	XDPLB_EV_NO_BACKEND,
	XDPLB_EV_NOT_ALLOWED,
	XDPLB_EV_TTL_EXPIRED,
	XDPLB_EV_FRAGMENT,
	XDPLB_EV_TABLE_FULL,
	XDPLB_EV_NO_FLOW,
	XDPLB_EV_ICMP,
	XDPLB_EV_SNAT_EXHAUSTED,
	XDPLB_EV_TOO_BIG, /* ipip: too big once encapsulated (action tx: answered, drop: dropped) */
};

/* Every trace line starts with this tag and carries exactly these fields, in order:
 * ifindex proto tcp_flags saddr sport daddr dport out_daddr out_dport backend event action
 * (addresses and ports in host byte order, hexadecimal addresses). */
#define XDPLB_TRACE_TAG "xdplb1"
/* IPv6 packets' lines: the same fields, the three addresses as the kernel's %pI6 prints
 * them (eight groups of four hex digits; out_daddr all zero without a flow). */
#define XDPLB_TRACE_TAG6 "xdplb6"


/* A service's address: the key of a service table slot. */
struct xdplb_service_key {
	__be32 vip;
	__be16 port;
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;
};

/* What the data plane knows of a service. */
struct xdplb_service {
	__u32 id;        /* index into xdplb_rings and xdplb_svc_stats */
	__u32 ring_size; /* entries of this service's Maglev ring (a prime) */
	__u32 flags;     /* enum xdplb_service_flags */
	/* A UDP service's own idle timeout (DNS-like services want seconds, not the
	 * interface's minutes), copied into each of its flows; 0: the interface's. */
	__u32 udp_timeout_s;
};

/* One slot of the service table; key.proto 0 marks an empty slot, which ends a search. */
struct xdplb_service_slot {
	struct xdplb_service_key key; /* pad zero: keys compare as one 64-bit word */
	struct xdplb_service svc;
};

/* Value of xdplb_backends, indexed by backend id. Next-hop MACs are resolved by the
 * control plane from the kernel's neighbour table, never derived from addresses. */
struct xdplb_backend {
	/* An IPv6 address, or an IPv4 one mapped (::ffff:a.b.c.d, RFC 4291): the IPv4
	 * address is addr[3], which is all the IPv4 path reads. */
	__be32 addr[4];
	__be16 port;
	__u16 weight;
	__u16 service_id;
	__u16 flags;   /* enum xdplb_backend_flags */
	__u32 ifindex; /* egress interface towards the backend */
	__u8 dmac[6];  /* next hop's MAC */
	__u8 smac[6];  /* egress interface's MAC */
	/* Index into xdplb_port_cur. Entries with the same address, port and protocol (one
	 * backend in several services) share it: one cursor walks their one tuple space. */
	__u16 cursor_id;
	__u16 pad[3]; /* to 48 bytes: the control plane maps the array, at a stride of 8 */
};

/* IPv6 (bpf/ipv6.h). Services, flows and allow-lists of each family are apart, so the
 * IPv4 path reads what it did before IPv6 existed; backends, rings, ports, counters and
 * service ids are shared. An IPv6 service forwards in dsr or ipip (ip6ip6) mode so far
 * (the control plane refuses nat).
 *
 * Extension headers walked before the transport header; a packet with more passes to
 * the kernel. */
#define XDPLB_V6_EXT_HEADERS 6

/* The key of xdplb_services6 (a hash map). */
struct xdplb_service_key6 {
	__be32 vip[4];
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* An IPv6 packet's 5-tuple as it arrives: the key of xdplb_flows6. */
struct xdplb_flow_key6 {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* An IPv6 flow (dsr or ipip: one entry per flow, from the client's packets). A packet goes to its
 * backend's current next hop while the backend entry still holds daddr (one array read,
 * the entry is hot), else to the copy kept here: a retired backend's open connections
 * keep reaching it, as IPv4 flows do. */
struct xdplb_flow6 {
	__be32 daddr[4]; /* the backend's address (the packet keeps the VIP) */
	__u32 ifindex;
	__u8 dmac[6];
	__u8 smac[6];
	__u32 last_seen; /* ticks, see XDPLB_TICK_MIN_NS */
	__u32 flags;     /* enum xdplb_flow_flags: 32 bits, for atomic updates */
	__u16 service_id;
	__u16 backend_id;
	__u16 udp_timeout_s; /* the service's, when the flow was created (0: the interface's) */
	__u8 encap; /* 1: ipip (ip6ip6, from xdplb_config.encap_source6), 0: dsr */
	__u8 pad;
};

/* A packet's 5-tuple as it arrives: the key of a flow table slot. */
struct xdplb_flow_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* How to rewrite a packet of a flow. The checksum deltas are fixed for a flow (they
 * depend only on old and new addresses, ports and the TTL decrement), so they are
 * computed once when the flow is created.
 *
 * The flow's forwarding mode is in the checksum fields (no byte is spare):
 *   l3_csum_delta != 0: full NAT, either entry. Every NAT rewrite decrements the TTL:
 *     its delta folds a sum of terms each nonzero (the TTL word's change among them),
 *     and such a fold is never 0 (flow_set_deltas).
 *   l3_csum_delta == 0: the packet is not rewritten (dsr or ipip, from the service's
 *     flags when the flow was created). Such a flow has its client-side entry only:
 *     replies bypass the balancer, so no backend-side entry, no SNAT source, nothing in
 *     xdplb_flow_ends, and tuple_reusable() never applies (FIN_BACKEND is never set).
 *     daddr and dport are the backend's (the next hop follows it, see
 *     follow_backend_hop), sport is 0, and
 *       l4_csum_delta == 0: dsr, saddr 0: only the Ethernet header changes;
 *       l4_csum_delta != 0: ipip, saddr the outer source (xdplb_config.encap_source
 *         when the flow was created), l4_csum_delta the folded sum of the outer
 *         header's words fixed for the flow (TTL and protocol, addresses), never 0
 *         since the TTL/protocol word is not.
 * A flow keeps its mode when its service changes mode: the next flows take the new one.
 * TCP state of a dsr/ipip flow comes from the client's segments alone: HANDSHAKE from
 * its SYN until its first ACK without SYN or RST (the handshake's third segment, as in
 * full NAT: the backend's SYN-ACK is never seen), CLOSING with FIN_CLIENT or RESET from
 * its FIN or RST. */
struct xdplb_flow {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 ifindex;
	__u8 dmac[6];
	__u8 smac[6];
	__u16 l3_csum_delta; /* ones' complement sum to fold into the IPv4 checksum */
	__u16 l4_csum_delta; /* same for the TCP/UDP checksum */
	__u16 service_id;
	__u16 backend_id;
	__u8 flags; /* enum xdplb_flow_flags */
	__u8 hop_gen; /* low byte of xdplb_config.hop_gen when the next hop was last known right */
	__u16 udp_timeout_s; /* the service's, when the flow was created (0: the interface's) */
};

/* One slot (one cache line) of xdplb_flows, an open-addressing table in an array.
 * seq is a sequence lock: odd while a writer fills the slot. A slot whose key has
 * proto 0 was never used and ends a probe sequence. */
struct xdplb_flow_slot {
	__u32 seq;
	__u32 last_seen; /* ticks, see XDPLB_TICK_MIN_NS */
	struct xdplb_flow_key key;
	struct xdplb_flow flow;
};

/* What the backend knows of a closing flow's client side, kept (in xdplb_flow_ends, at
 * the index of the flow's backend-side slot) from the backend's FIN on: the newest
 * timestamp it has from the client (the TSecr it echoes) and the next sequence number it
 * expects (its ACK). A backend in TIME_WAIT accepts a new SYN on the same tuple only with
 * a newer timestamp, or without timestamps a higher sequence number (RFC 6191): the
 * data plane checks the same before it gives the tuple's SNAT source to a new flow. */
struct xdplb_flow_end {
	__u32 ts_recent;
	__u32 rcv_nxt;
};

/* Value of the one-entry xdplb_config. Timeouts of 0 mean "never expire". */
struct xdplb_config {
	__u32 abi_version;
	__u32 flags;      /* enum xdplb_config_flags */
	__u32 hash_seed;  /* Maglev: same seed on every node => same backend for a flow */
	__u16 snat_port_min;
	__u16 snat_port_max;
	__u32 flow_mask;  /* xdplb_flows slots - 1 */
	/* Timeouts as configured, in seconds (what the control plane reads back). */
	__u32 tcp_timeout_s;
	__u32 tcp_closing_timeout_s;
	__u32 udp_timeout_s;
	__u32 tcp_syn_timeout_s; /* a handshake not completed, or a flow after a RST */
	/* The same in ticks, plus touch_ticks: a slot idle for longer than this is free.
	 * The slack covers entries that are only re-stamped every touch_ticks. */
	__u32 tcp_expiry_ticks;
	__u32 tcp_closing_expiry_ticks;
	__u32 udp_expiry_ticks;
	__u32 tcp_syn_expiry_ticks;
	__u32 tick_shift; /* tick = jiffies >> tick_shift */
	__u32 ticks_per_s; /* rounded up: a flow never expires early */
	/* Entries are re-stamped at most this often (about 1 s), to keep their cache line
	 * clean; the entry of the other direction is refreshed at the same time. */
	__u32 touch_ticks;
	/* Bumped by the control plane after it rewrites a backend's next hop (a MAC that
	 * moved): a flow copied from an older generation looks its backend up again. */
	__u32 hop_gen;
	/* While XDPLB_CFG_TRACE is set: trace until this tick (see XDPLB_TRACE_LEASE_MAX_TICKS). */
	__u32 trace_until;
	/* Seed of the flow table's hash, set when the table is new and kept for its life:
	 * a flow is found where the seed of its creation put it, and hash_seed is a setting
	 * a user may change (a new Maglev ring) while flows are open. */
	__u32 flow_seed;
	/* Source address of the outer header of IPIP packets (services with XDPLB_SVC_IPIP). */
	__be32 encap_source;
	/* The same for IPv6 services (ip6ip6); all zero: none (the control plane refuses
	 * IPv6 ipip services without one). */
	__be32 encap_source6[4];
	/* Sources of packets sent to backends (last: only new flows read them): a backend's
	 * SNAT cursor c hands out address c % count with port min + (c / count) % span. */
	__u32 snat_addr_count; /* 1 to XDPLB_MAX_SNAT_ADDRS */
	__be32 snat_addrs[XDPLB_MAX_SNAT_ADDRS];
};

/* Key of xdplb_clients (LPM trie): prefixlen counts the 32 bits of service_id too. */
struct xdplb_client_key {
	__u32 prefixlen;
	__be32 service_id;
	__be32 addr;
};

/* Key of xdplb_clients6, as xdplb_client_key for IPv6 clients. */
struct xdplb_client_key6 {
	__u32 prefixlen;
	__be32 service_id;
	__be32 addr[4];
};

/* Per-CPU values of xdplb_svc_stats and xdplb_be_stats. */
struct xdplb_traffic {
	__u64 packets;
	__u64 bytes;
	__u64 new_flows;
};

#endif /* XDPLB_ABI_H */
