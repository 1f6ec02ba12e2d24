/* SPDX-License-Identifier: GPL-2.0-only */
/* The maps of the XDP program. Layouts are in xdplb_abi.h; names are part of the
 * contract with src/xdplb/abi.py (at most 15 characters: the kernel keeps 15). */
#ifndef XDPLB_MAPS_H
#define XDPLB_MAPS_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include "xdplb_abi.h"

/* Global settings written by the control plane: seed, SNAT range, timeouts, trace. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xdplb_config);
} xdplb_config SEC(".maps");

/* Per destination port: is any service or the SNAT range using it (enum xdplb_port_flags).
 * Lets a packet for an unrelated port leave after one array read. Mappable, as are the
 * backends, the service table and the rings: the control plane reads and writes them
 * with memory copies, not one syscall's worth of work per entry (a batch of 65536
 * entries takes 20 ms). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XDPLB_PORTS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u8);
} xdplb_ports SEC(".maps");

/* Template of the service table: VIP:port/proto -> service, see XDPLB_SERVICE_SLOTS.
 * Sizes, not types: clang leaves a type seen only through this inner map undefined in
 * BTF, and libbpf then cannot size it. */
struct xdplb_service_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XDPLB_SERVICE_SLOTS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(struct xdplb_service_slot));
};

/* Slot 0 holds the service table in use. The control plane builds a new table and
 * swaps it in with one update, so a packet never sees a half-built one. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct xdplb_service_table);
} xdplb_services SEC(".maps");

/* Backend id -> address, port and next-hop MACs. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XDPLB_MAX_BACKENDS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct xdplb_backend);
} xdplb_backends SEC(".maps");

/* Template of one service's Maglev ring: slot / 4 -> four 16-bit backend ids, slot % 4
 * picking one (the lowest 16 bits are slot 0). */
struct xdplb_ring {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XDPLB_RING_ENTRIES);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
};

/* Service id -> its Maglev ring. The control plane creates a service's ring once and then
 * rewrites it in place (a swap waits for an RCU grace period, milliseconds per ring): a
 * new flow picking a slot meanwhile gets the old ring's backend or the new one's, both
 * valid then, since a backend is cleared only after the rings that drop it are written. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, XDPLB_MAX_SERVICES);
	__type(key, __u32);
	__array(values, struct xdplb_ring);
} xdplb_rings SEC(".maps");

/* Flow table, both directions: arriving 5-tuple -> rewrite, in open-addressing slots.
 * An array (not a BPF hash map): finding and storing a flow is inlined code with no
 * helper call or allocation, and the control plane reads it through mmap. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XDPLB_FLOW_SLOTS_DEFAULT);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct xdplb_flow_slot);
} xdplb_flows SEC(".maps");

/* Beside xdplb_flows, slot for slot (sized with it at load time): what the backend of a
 * closing flow knows of its client side, see struct xdplb_flow_end. Apart from the slots
 * because only closing flows need it, and a slot is one full cache line. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XDPLB_FLOW_SLOTS_DEFAULT);
	__type(key, __u32);
	__type(value, struct xdplb_flow_end);
} xdplb_flow_ends SEC(".maps");

/* Per backend endpoint (xdplb_backend.cursor_id): the next SNAT source to try, see
 * next_snat_source() (shared by all CPUs: the whole range serves a backend even when
 * one CPU takes all new flows; two CPUs that pick the same port are sorted out by the
 * flow table's exclusive store). Cycling
 * through the range (instead of hashing) delays reuse of a (SNAT addr, port, backend)
 * tuple as long as possible, which keeps backends' TIME_WAIT entries from rejecting
 * new SYNs. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XDPLB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, __u32);
} xdplb_port_cur SEC(".maps");

/* IPv6 services: VIP:port/proto -> service. A hash map, written entry by entry: the
 * control plane makes an entry visible only once its backends and ring are in place, as
 * it does for the IPv4 table. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XDPLB_MAX_SERVICES);
	__type(key, struct xdplb_service_key6);
	__type(value, struct xdplb_service);
} xdplb_services6 SEC(".maps");

/* IPv6 flows: arriving 5-tuple -> backend. An LRU hash map: a full table evicts the least
 * recently used flow, as the IPv4 table does within a probe window, and timeouts are
 * checked on lookup. Sized at load time to the flows the IPv4 table is sized for. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, XDPLB_FLOW_SLOTS_DEFAULT / 4);
	__type(key, struct xdplb_flow_key6);
	__type(value, struct xdplb_flow6);
} xdplb_flows6 SEC(".maps");

/* Per-service client allow-lists (service id + CIDR). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, XDPLB_MAX_CLIENT_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xdplb_client_key);
	__type(value, __u8);
} xdplb_clients SEC(".maps");

/* The same for IPv6 services' allow-lists. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, XDPLB_MAX_CLIENT_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xdplb_client_key6);
	__type(value, __u8);
} xdplb_clients6 SEC(".maps");

/* Packet counters by action and reason (enum xdplb_counter). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDPLB_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} xdplb_counters SEC(".maps");

/* Per-service traffic, both directions. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDPLB_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct xdplb_traffic);
} xdplb_svc_stats SEC(".maps");

/* Per-backend traffic, both directions. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDPLB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct xdplb_traffic);
} xdplb_be_stats SEC(".maps");

/* Per-CPU working space of the new-flow path (too big for the BPF stack, and the way
 * into new_flow(), which takes no pointers but the context). */
/* Where a key would be stored in the flow table: a slot index and the seq it had when
 * chosen (claiming fails if the slot moved meanwhile). Bit 0 of seq (always even when
 * read) says that storing there evicts a live flow. */
struct flow_place {
	__u32 index;
	__u32 seq;
};

/* A packet that opens a flow, as xdplb_main hands it to new_flow(). */
struct new_flow_request {
	struct xdplb_service svc;
	struct flow_place place; /* where the client side goes (see flow_find) */
	__u32 hash;              /* flow_hash of the packet's 5-tuple */
};

/* What a SYN tells a backend in TIME_WAIT (see struct xdplb_flow_end). */
struct syn_info {
	__u32 tsval;
	__u32 seq; /* host byte order */
	__u32 has_ts;
};

/* The two entries of a new flow, built by plan_new_flow(). */
struct new_flow_plan {
	struct xdplb_flow_key rev_key;
	struct xdplb_flow fwd;
	struct xdplb_flow rev;
	__u32 rev_hash; /* flow_hash(rev_key) */
	__u32 cursor_id; /* the backend's SNAT cursor */
	struct syn_info syn;
	struct xdplb_flow displaced; /* the closed flow whose SNAT source was taken over */
};

/* A TCP timestamp option, as tcp_timestamps() found it. */
struct tcp_ts {
	__u32 tsval;
	__u32 tsecr;
};

struct new_flow_scratch {
	struct new_flow_request req;
	struct new_flow_plan plan;
	struct tcp_ts ts;
	struct xdplb_flow6 flow6; /* an IPv6 flow being created (new_flow6 in bpf/ipv6.h) */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct new_flow_scratch);
} xdplb_scratch SEC(".maps");

/* Per-CPU copy of what an ICMPv6 "packet too big" quotes (answer_packet_too_big in
 * bpf/ipv6.h): its checksum is summed from here, in pieces bpf_csum_diff takes (at most
 * 512 bytes, a multiple of 4: the bytes past the quote are zeroed). */
#define PTB_QUOTE_MAX (1280 - 40 - 8)
struct ptb_quote {
	__u8 bytes[PTB_QUOTE_MAX + 4];
	/* Who sent the packet and to which address: here, not on the stack of a call chain
	 * that starts in xdplb_main. */
	__be32 client[4];
	__be32 vip[4];
	__u8 client_mac[ETH_ALEN];
	__u8 own_mac[ETH_ALEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ptb_quote);
} xdplb_ptb_quote SEC(".maps");

/* Per-CPU arguments of a trace line: bpf_printk would keep them on the stack. */
#define TRACE_ARGS 12
struct trace_args {
	__u64 v[TRACE_ARGS];
	/* An IPv6 line's addresses: its arguments point here (bpf_trace_vprintk's %pI6 reads
	 * the 16 bytes an argument points to). */
	__be32 addr6[3][4];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct trace_args);
} xdplb_trace_args SEC(".maps");

#endif /* XDPLB_MAPS_H */
