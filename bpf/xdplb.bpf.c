// SPDX-License-Identifier: GPL-2.0-only
/*
 * xdplb: an L4 load balancer in XDP.
 *
 * In full NAT, a packet for a service (VIP:port/proto) is rewritten client->VIP into
 * SNAT->backend; the backend's reply is rewritten back into VIP->client. Both directions
 * are entries of one flow table keyed by the arriving 5-tuple, so an established packet
 * costs one lookup (inlined: the table is an array, see flows.h) and a rewrite with
 * precomputed checksum deltas. Services in dsr or ipip mode have their packets go on as
 * the client sent them (encap.h) and replies bypass the balancer: one entry per flow.
 * Everything that is not for a service (or a reply of one of its flows) passes to the
 * kernel untouched.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <linux/errno.h>

#include "xdplb_abi.h"
#include "maps.h"
#include "parse.h"
#include "csum.h"
#include "hash.h"
#include "flows.h"
#include "packet.h"
#include "tcpstate.h"
#include "encap.h"

char LICENSE[] SEC("license") = "GPL";

enum parse_result {
	PARSE_OTHER,     /* not IPv4 TCP/UDP/ICMP: none of our business */
	PARSE_MALFORMED, /* claims to be IPv4 but does not fit: the kernel will drop it */
	PARSE_L4,        /* TCP or UDP with complete headers */
	PARSE_ICMP,
	PARSE_LATER_FRAGMENT, /* no L4 header to match on */
};

static __always_inline void count(__u32 counter)
{
	__u64 *value = bpf_map_lookup_elem(&xdplb_counters, &counter);

	if (value)
		*value += 1;
}

static __always_inline int pass(__u32 reason)
{
	if (reason != XDPLB_CNT_PASS)
		count(reason);
	count(XDPLB_CNT_PASS);
	return XDP_PASS;
}

static __always_inline int drop(__u32 reason)
{
	count(reason);
	count(XDPLB_CNT_DROP);
	return XDP_DROP;
}

static __always_inline int parse_packet(struct xdp_md *ctx, struct packet *pkt)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	int proto;

	if (parse_ethhdr(&c, &pkt->eth) != bpf_htons(ETH_P_IP))
		return PARSE_OTHER;
	proto = parse_iphdr(&c, &pkt->ip);
	if (proto < 0)
		return PARSE_MALFORMED;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP)
		return PARSE_OTHER;
	if (ip_is_fragment(pkt->ip)) {
		if (pkt->ip->frag_off & bpf_htons(IP_OFFSET))
			return PARSE_LATER_FRAGMENT;
		pkt->first_fragment = 1;
	}
	pkt->key.saddr = pkt->ip->saddr;
	pkt->key.daddr = pkt->ip->daddr;
	pkt->key.proto = proto;
	if (proto == IPPROTO_TCP) {
		if (parse_tcphdr(&c, &pkt->tcp) < 0)
			return PARSE_MALFORMED;
		pkt->key.sport = pkt->tcp->source;
		pkt->key.dport = pkt->tcp->dest;
		pkt->tcp_flags = ((__u8 *)pkt->tcp)[TCP_FLAGS_OFFSET];
	} else if (proto == IPPROTO_UDP) {
		if (parse_udphdr(&c, &pkt->udp) < 0)
			return PARSE_MALFORMED;
		pkt->key.sport = pkt->udp->source;
		pkt->key.dport = pkt->udp->dest;
	} else {
		if (pkt->first_fragment || parse_icmphdr(&c, &pkt->icmp) < 0)
			return PARSE_OTHER;
		return PARSE_ICMP;
	}
	return PARSE_L4;
}

/* The per-CPU arguments of a trace line while the trace lease runs (see
 * XDPLB_TRACE_LEASE_MAX_TICKS), else NULL. The deadline is checked here, after the flag,
 * so that tracing off stays one branch. */
static __always_inline struct trace_args *trace_lease_args(const struct xdplb_config *cfg)
{
	__u32 zero = 0, left = cfg->trace_until - now_ticks(cfg);

	if (left == 0 || left > XDPLB_TRACE_LEASE_MAX_TICKS)
		return NULL;
	return bpf_map_lookup_elem(&xdplb_trace_args, &zero);
}

/* A subprogram with its arguments in a per-CPU map, not on the stack: the deepest call
 * chain (main, new_flow, this) must fit in 512 bytes. Prints only while the trace lease
 * runs. */
static __noinline void trace_line(struct xdp_md *ctx, const struct xdplb_config *cfg, const struct packet *pkt,
				  const struct xdplb_flow *flow, __u32 event_action)
{
	static const char fmt[] = XDPLB_TRACE_TAG " %u %u %x %x %u %x %u %x %u %u %u %u";
	struct trace_args *a = trace_lease_args(cfg);

	if (!a)
		return;
	a->v[0] = ctx->ingress_ifindex;
	a->v[1] = pkt->key.proto;
	a->v[2] = pkt->tcp_flags;
	a->v[3] = bpf_ntohl(pkt->key.saddr);
	a->v[4] = bpf_ntohs(pkt->key.sport);
	a->v[5] = bpf_ntohl(pkt->key.daddr);
	a->v[6] = bpf_ntohs(pkt->key.dport);
	a->v[7] = flow ? bpf_ntohl(flow->daddr) : 0;
	a->v[8] = flow ? bpf_ntohs(flow->dport) : 0;
	a->v[9] = flow ? flow->backend_id : XDPLB_NO_BACKEND;
	a->v[10] = event_action >> 8;
	a->v[11] = event_action & 0xff;
	bpf_trace_vprintk(fmt, sizeof(fmt), a->v, sizeof(a->v));
}

/* Costs one branch while tracing is off. */
static __always_inline void trace(struct xdp_md *ctx, const struct xdplb_config *cfg,
				  const struct packet *pkt, const struct xdplb_flow *flow,
				  __u32 event, __u32 action)
{
	if (cfg->flags & XDPLB_CFG_TRACE)
		trace_line(ctx, cfg, pkt, flow, event << 8 | action);
}

static __always_inline void account(__u32 id, void *stats_map, __u64 bytes, __u32 new_flow)
{
	struct xdplb_traffic *t = bpf_map_lookup_elem(stats_map, &id);

	if (!t)
		return;
	t->packets += 1;
	t->bytes += bytes;
	t->new_flows += new_flow;
}

/* Sends the rewritten frame towards the flow's next hop. */
static __always_inline int transmit(struct xdp_md *ctx, const struct xdplb_flow *flow)
{
	if (flow->ifindex == ctx->ingress_ifindex) {
		count(XDPLB_CNT_TX);
		return XDP_TX;
	}
	count(XDPLB_CNT_REDIRECT);
	return bpf_redirect(flow->ifindex, 0);
}

static __always_inline void rewrite_l2(struct ethhdr *eth, const struct xdplb_flow *flow)
{
	__builtin_memcpy(eth->h_dest, flow->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, flow->smac, ETH_ALEN);
}

/* Rewrites addresses, ports, TTL and both checksums of a TCP/UDP packet. */
static __always_inline void rewrite(struct packet *pkt, const struct xdplb_flow *flow)
{
	struct iphdr *ip = pkt->ip;

	rewrite_l2(pkt->eth, flow);
	ip->saddr = flow->saddr;
	ip->daddr = flow->daddr;
	ip->ttl -= 1;
	ip->check = csum_apply(ip->check, flow->l3_csum_delta);
	if (pkt->tcp) {
		pkt->tcp->source = flow->sport;
		pkt->tcp->dest = flow->dport;
		pkt->tcp->check = csum_apply(pkt->tcp->check, flow->l4_csum_delta);
	} else if (pkt->udp) {
		pkt->udp->source = flow->sport;
		pkt->udp->dest = flow->dport;
		/* 0 means "no checksum" and stays so; a computed 0 is sent as 0xffff. */
		if (pkt->udp->check) {
			__u16 check = csum_apply(pkt->udp->check, flow->l4_csum_delta);

			pkt->udp->check = check ? check : 0xffff;
		}
	}
}

/* Checksum deltas of rewriting `from` into `to`, TTL decrement included. */
static __always_inline void flow_set_deltas(struct xdplb_flow *to, const struct xdplb_flow_key *from)
{
	__u32 addrs = 0, ttl;

	addrs = csum_delta32(addrs, from->saddr, to->saddr);
	addrs = csum_delta32(addrs, from->daddr, to->daddr);
	/* TTL is the high byte of its 16-bit word: it drops by 0x0100 in network order. */
	ttl = (__u16)~bpf_htons(0x0100);
	to->l3_csum_delta = csum_fold32(addrs + ttl);
	to->l4_csum_delta = csum_fold32(csum_delta16(csum_delta16(addrs, from->sport, to->sport),
						     from->dport, to->dport));
}

static __always_inline __u32 snat_addr_count(const struct xdplb_config *cfg)
{
	return cfg->snat_addr_count ? cfg->snat_addr_count : 1;
}

/* The next SNAT source of a backend's cursor: its address into *addr, its port
 * (network order) returned. Consecutive flows alternate addresses, so every address
 * of the pool is in use and a tuple comes round again only after count x span flows. */
static __always_inline __be16 next_snat_source(const struct xdplb_config *cfg, __u32 *cursor, __be32 *addr)
{
	__u32 span = (__u32)cfg->snat_port_max - cfg->snat_port_min + 1;
	__u32 count = snat_addr_count(cfg), c = __sync_fetch_and_add(cursor, 1);

	*addr = cfg->snat_addrs[(c % count) & (XDPLB_MAX_SNAT_ADDRS - 1)];
	return bpf_htons(cfg->snat_port_min + (c / count) % span);
}

/* A closed flow whose SNAT source a new flow took over: its client side, if it still
 * leads to that source, is retired, so that a late segment of the old connection is
 * answered by the kernel instead of reaching the backend inside the new one. */
static __always_inline void retire_displaced(const struct xdplb_config *cfg, const struct xdplb_flow *old,
					     const struct xdplb_flow_key *rev_key, __u32 now)
{
	struct xdplb_flow_key client = {};
	struct xdplb_flow copy;
	struct xdplb_flow_slot *s;

	flow_partner_key(old, rev_key->proto, &client);
	s = flow_find(cfg, &client, flow_hash(&client, cfg->flow_seed), &copy, now, NULL);
	if (s && copy.saddr == rev_key->daddr && copy.sport == rev_key->dport &&
	    copy.daddr == rev_key->saddr && copy.dport == rev_key->sport)
		flow_flags_update(s, &client, XDPLB_FLOW_DEAD, 0);
}

/* One try of claim_snat_source(): the planned source (try 0) or the cursor's next one.
 * Returns 1 if the backend-side entry is stored with it. A global function, so the
 * verifier walks the flow table's probe loop once, not once per try. */
__noinline int try_snat_source(__u32 attempt, __u32 now)
{
	__u32 zero = 0, cycle, outcome = 0, *cursor;
	struct new_flow_scratch *scratch = bpf_map_lookup_elem(&xdplb_scratch, &zero);
	struct xdplb_config *cfg = bpf_map_lookup_elem(&xdplb_config, &zero);
	struct xdplb_flow_key *rev_key;
	struct new_flow_plan *plan;

	if (!scratch || !cfg)
		return 0;
	plan = &scratch->plan;
	rev_key = &plan->rev_key;
	if (attempt) {
		cursor = bpf_map_lookup_elem(&xdplb_port_cur, &plan->cursor_id);
		if (!cursor)
			return 0;
		/* Busy ports come in runs (a backend removed and added again finds its old
		 * flows on the ports its new cursor starts at): jump past the run. */
		cycle = ((__u32)cfg->snat_port_max - cfg->snat_port_min + 1) * snat_addr_count(cfg);
		__sync_fetch_and_add(cursor, cycle / XDPLB_SNAT_PORT_TRIES);
		rev_key->dport = next_snat_source(cfg, cursor, &rev_key->daddr);
		plan->rev_hash = flow_hash(rev_key, cfg->flow_seed);
	}
	flow_set_deltas(&plan->rev, rev_key);
	if (flow_store(cfg, rev_key, plan->rev_hash, &plan->rev, now, FLOW_STORE_EXCLUSIVE, &plan->syn,
		       &plan->displaced, &outcome))
		return 0;
	if (outcome & FLOW_STORE_EVICTED)
		count(XDPLB_CNT_EVICTED);
	if (outcome & FLOW_STORE_REUSED) {
		count(XDPLB_CNT_SNAT_REUSED);
		retire_displaced(cfg, &plan->displaced, rev_key, now);
	}
	return 1;
}

/* Stores the backend-side entry of the new flow planned in the per-CPU scratch space
 * with a free SNAT source towards the backend, starting with the one planned
 * (plan.rev_key's daddr and dport, hashed into plan.rev_hash). A source still held by a
 * closed flow is taken when the backend would accept the SYN on it (see
 * tuple_reusable). Returns the port in host byte order (the address is left in
 * plan.rev_key.daddr), or 0 when every source tried is taken. */
static __always_inline __u32 claim_snat_source(__u32 now)
{
	__u32 zero = 0;
	struct new_flow_scratch *scratch;

#pragma clang loop unroll(disable)
	for (__u32 attempt = 0; attempt < XDPLB_SNAT_PORT_TRIES; attempt++) {
		if (try_snat_source(attempt, now)) {
			scratch = bpf_map_lookup_elem(&xdplb_scratch, &zero);
			return scratch ? bpf_ntohs(scratch->plan.rev_key.dport) : 0;
		}
	}
	return 0;
}

static __always_inline int client_allowed(const struct xdplb_service *svc, __be32 addr)
{
	struct xdplb_client_key key = {
		.prefixlen = 64,
		.service_id = bpf_htonl(svc->id),
		.addr = addr,
	};

	if (!(svc->flags & XDPLB_SVC_ALLOWLIST))
		return 1;
	return bpf_map_lookup_elem(&xdplb_clients, &key) != NULL;
}

/* Maglev: the flow hash picks a slot of the service's ring, the slot names a backend. */
static __always_inline struct xdplb_backend *select_backend(const struct xdplb_service *svc, __u32 hash,
							    __u32 *backend_id)
{
	struct xdplb_backend *backend;
	__u32 slot, entry, id;
	__u64 *slots;
	void *ring;

	if (!svc->ring_size)
		return NULL;
	ring = bpf_map_lookup_elem(&xdplb_rings, &svc->id);
	if (!ring)
		return NULL;
	slot = hash % svc->ring_size;
	entry = slot / XDPLB_RING_SLOTS_PER_ENTRY;
	slots = bpf_map_lookup_elem(ring, &entry);
	if (!slots)
		return NULL;
	id = (*slots >> (slot % XDPLB_RING_SLOTS_PER_ENTRY * 16)) & 0xffff;
	if (id == XDPLB_NO_BACKEND)
		return NULL;
	backend = bpf_map_lookup_elem(&xdplb_backends, &id);
	if (!backend || !(backend->flags & XDPLB_BACKEND_IN_USE))
		return NULL;
	*backend_id = id;
	return backend;
}

/* dsr and ipip: the packet goes on as the client sent it, behind a new Ethernet header or
 * encapsulated. Also ICMP errors about such a flow's packets (the backend's replies come
 * from the VIP, so errors about them come here): its backend needs them as they are. */
static __always_inline int forward_as_sent(struct xdp_md *ctx, const struct xdplb_config *cfg,
					   struct packet *pkt, const struct xdplb_flow *flow, __u32 event)
{
	__u64 bytes = ctx->data_end - ctx->data;
	__u32 action = flow->ifindex == ctx->ingress_ifindex ? XDP_TX : XDP_REDIRECT, mtu = 0;

	if (!flow_encapsulates(flow)) {
		rewrite_l2(pkt->eth, flow);
	} else if (!ipip_fits(ctx, pkt->ip, flow->ifindex, &mtu)) {
		/* Never an ICMP error about an ICMP error (RFC 1122). */
		if ((pkt->ip->frag_off & bpf_htons(IP_DF)) && pkt->key.proto != IPPROTO_ICMP) {
			trace(ctx, cfg, pkt, flow, XDPLB_EV_TOO_BIG, XDP_TX);
			if (answer_frag_needed(ctx, mtu))
				return drop(XDPLB_CNT_TOO_BIG);
			count(XDPLB_CNT_FRAG_NEEDED);
			count(XDPLB_CNT_TX);
			return XDP_TX;
		}
		trace(ctx, cfg, pkt, flow, XDPLB_EV_TOO_BIG, XDP_DROP);
		return drop(XDPLB_CNT_TOO_BIG);
	}
	account(flow->service_id, &xdplb_svc_stats, bytes, event == XDPLB_EV_NEW_FLOW);
	account(flow->backend_id, &xdplb_be_stats, bytes, event == XDPLB_EV_NEW_FLOW);
	trace(ctx, cfg, pkt, flow, event, action);
	if (flow_encapsulates(flow) && ipip_encapsulate(ctx, pkt->ip, flow))
		return XDP_ABORTED; /* no headroom: cannot happen, and the xdp_exception tracepoint says so */
	return transmit(ctx, flow);
}

static __always_inline int forward(struct xdp_md *ctx, const struct xdplb_config *cfg,
				   struct packet *pkt, const struct xdplb_flow *flow, __u32 event)
{
	__u64 bytes = ctx->data_end - ctx->data;

	if (!flow_rewrites(flow))
		return forward_as_sent(ctx, cfg, pkt, flow, event);
	rewrite(pkt, flow);
	account(flow->service_id, &xdplb_svc_stats, bytes, event == XDPLB_EV_NEW_FLOW);
	account(flow->backend_id, &xdplb_be_stats, bytes, event == XDPLB_EV_NEW_FLOW);
	trace(ctx, cfg, pkt, flow, event, flow->ifindex == ctx->ingress_ifindex ? XDP_TX : XDP_REDIRECT);
	return transmit(ctx, flow);
}

/* Whether a flow's copy of the next hop is the backend entry's (without branches: fewer
 * paths for the verifier to walk). */
static __always_inline int hop_equal(const struct xdplb_flow *flow, const struct xdplb_backend *be)
{
	const __u16 *fd = (const void *)flow->dmac, *fs = (const void *)flow->smac;
	const __u16 *bd = (const void *)be->dmac, *bs = (const void *)be->smac;
	__u32 diff = flow->ifindex ^ be->ifindex;

	diff |= (fd[0] ^ bd[0]) | (fd[1] ^ bd[1]) | (fd[2] ^ bd[2]);
	diff |= (fs[0] ^ bs[0]) | (fs[1] ^ bs[1]) | (fs[2] ^ bs[2]);
	return !diff;
}

/* follow_backend_hop()'s work after a bump, apart: a subprogram, which the verifier
 * walks without multiplying the paths of xdplb_main. */
static __noinline void check_backend_hop(const struct xdplb_config *cfg, struct xdplb_flow_slot *slot,
					 __u32 seq, struct xdplb_flow *flow)
{
	const struct xdplb_backend *be;
	__u32 id = flow->backend_id, gen, old, *word;

	/* The generation before the entry, as in plan_new_flow: the entry is at least as
	 * new as the generation it is found right for. */
	gen = READ_ONCE_U32(cfg->hop_gen);
	compiler_barrier();
	if (flow->hop_gen == (__u8)gen)
		return;
	be = bpf_map_lookup_elem(&xdplb_backends, &id);
	/* The whole address: an IPv6 backend reusing the id may end in the same 32 bits. */
	if (!be || be->addr[0] || be->addr[1] || be->addr[2] != bpf_htonl(0xffff) || be->addr[3] != flow->daddr ||
	    be->port != flow->dport)
		return;
	if (hop_equal(flow, be)) {
		word = (__u32 *)&slot->flow.flags;
		old = READ_ONCE_U32(*word);
		compiler_barrier();
		if (READ_ONCE_U32(slot->seq) == seq && (__u8)(old >> FLOW_HOP_GEN_SHIFT) == flow->hop_gen)
			__sync_val_compare_and_swap(word, old, (old & ~(0xffu << FLOW_HOP_GEN_SHIFT)) |
								(gen & 0xff) << FLOW_HOP_GEN_SHIFT);
		return;
	}
	flow->ifindex = be->ifindex;
	__builtin_memcpy(flow->dmac, be->dmac, ETH_ALEN);
	__builtin_memcpy(flow->smac, be->smac, ETH_ALEN);
}

/* A flow towards a backend keeps a copy of the backend's next hop, but a MAC or route
 * that changes (a backend rebuilt with the same address, a neighbour that moved) is
 * written by the control plane into the backend entry, which then bumps hop_gen.
 * A flow copied before that takes the entry's next hop while the entry still names
 * the flow's backend; a retired backend's flows keep their copy. Comparing one byte
 * per packet instead of looking the backend up saves 4-6 ns on every established
 * packet, so a flow whose copy is still right takes the new generation (a swap of the
 * word holding the byte, given up if the slot changed since it was read: the next
 * packet tries again): a bump costs it one lookup, not one per packet. A flow whose
 * backend did move keeps looking it up: its 16 bytes of next hop cannot be rewritten
 * under readers that copy them without the slot's lock, and taking the lock would hide
 * the flow from them meanwhile. The byte comes round again after 256 bumps: before each
 * bump the control plane moves the flows that hold the coming generation's byte out of
 * its way (FlowTable.before_hop_bump in src/xdplb/flowtable.py). */
static __always_inline void follow_backend_hop(const struct xdplb_config *cfg, struct xdplb_flow_slot *slot,
					       __u32 seq, struct xdplb_flow *flow)
{
	if (!(flow->flags & XDPLB_FLOW_REPLY) && flow->hop_gen != (__u8)READ_ONCE_U32(cfg->hop_gen))
		check_backend_hop(cfg, slot, seq, flow);
}

enum plan_result {
	PLAN_OK,
	PLAN_NOT_SYN,      /* TCP without a SYN opens nothing (in full NAT) */
	PLAN_NOT_ALLOWED,  /* client not in the service's allow-list */
	PLAN_NO_BACKEND,
	PLAN_BACKEND_MISMATCH, /* the ring names a backend of another service */
	PLAN_NO_PORT,      /* no SNAT port (or IPIP source) configured, or no scratch space */
};

/* Starts a memory access without waiting for it (BPF has no prefetch instruction). */
static __always_inline void prefetch_slot(const struct xdplb_config *cfg, __u32 hash)
{
	__u32 index = hash & cfg->flow_mask;
	struct xdplb_flow_slot *s = bpf_map_lookup_elem(&xdplb_flows, &index);

	if (s) {
		__u32 seq = READ_ONCE_U32(s->seq);

		asm volatile("" : : "r"(seq));
	}
}

/* A dsr or ipip flow's state from its first segment. A segment other than a SYN opens
 * one too (the client's connection was balanced before: by this node before a restart or
 * a resize of its table, or by another node), established or closing as the segment says. */
static __always_inline __u8 first_state_as_sent(int is_tcp, __u8 tcp_flags)
{
	__u8 state = 0;

	if (!is_tcp)
		return 0;
	if ((tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST)) == TCP_FLAG_SYN)
		return XDPLB_FLOW_HANDSHAKE;
	if (tcp_flags & TCP_FLAG_RST)
		state |= XDPLB_FLOW_CLOSING | XDPLB_FLOW_RESET;
	if (tcp_flags & TCP_FLAG_FIN)
		state |= XDPLB_FLOW_CLOSING | XDPLB_FLOW_FIN_CLIENT;
	return state;
}

/* The first half of a new flow, up to the choice of backend and SNAT port: both
 * entries are built in the per-CPU scratch space (one, in dsr and ipip). Once the SNAT
 * port is known it touches the two slots the flow will be stored in, so that in a table
 * larger than the caches their memory accesses overlap instead of following each other
 * (for a SYN this runs before the flow lookup). A subprogram: its locals get their own
 * stack frame. */
static __noinline int plan_new_flow(struct xdp_md *ctx, const struct xdplb_config *cfg, struct packet *pkt,
				    const struct xdplb_service *svc)
{
	__u32 backend_id = 0, zero = 0, hop_gen, ring_hash, *cursor;
	struct new_flow_scratch *scratch;
	struct xdplb_backend *backend;
	struct new_flow_plan *plan;
	struct xdplb_flow *fwd, *rev;

	/* The allow-list first: a stray segment from outside it is not the kernel's to
	 * answer either. */
	if (!client_allowed(svc, pkt->key.saddr))
		return PLAN_NOT_ALLOWED;
	if (pkt->tcp && (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST)) != TCP_FLAG_SYN &&
	    !(svc->flags & SVC_NO_NAT))
		return PLAN_NOT_SYN;
	/* Before the backend entry: a next hop written after this read comes with a newer
	 * generation, which the flow will then follow. */
	hop_gen = READ_ONCE_U32(cfg->hop_gen);
	compiler_barrier();
	/* The ring slot comes from hash_seed, which every node shares; pkt->hash is the flow
	 * table's (flow_seed). Hashed again only when they differ: after a new seed. */
	ring_hash = cfg->flow_seed == cfg->hash_seed ? pkt->hash : flow_hash(&pkt->key, cfg->hash_seed);
	backend = select_backend(svc, ring_hash, &backend_id);
	if (!backend)
		return PLAN_NO_BACKEND;
	/* A ring built from another service's snapshot (a control plane bug, or writes
	 * out of order) would send this service's clients to a stranger. Counted where the
	 * answer is given (new_flow_plan): a SYN whose first plan fails is planned again. */
	if (backend->service_id != svc->id)
		return PLAN_BACKEND_MISMATCH;
	scratch = bpf_map_lookup_elem(&xdplb_scratch, &zero);
	if (!scratch)
		return PLAN_NO_PORT;
	plan = &scratch->plan;
	__builtin_memset(plan, 0, sizeof(*plan));
	fwd = &plan->fwd;
	rev = &plan->rev;

	/* Client side, but for its source (SNAT: below; none in dsr and ipip): towards the
	 * backend. */
	fwd->daddr = backend->addr[3];
	fwd->dport = backend->port;
	fwd->ifindex = backend->ifindex;
	__builtin_memcpy(fwd->dmac, backend->dmac, ETH_ALEN);
	__builtin_memcpy(fwd->smac, backend->smac, ETH_ALEN);
	fwd->service_id = svc->id;
	fwd->backend_id = backend_id;
	fwd->hop_gen = hop_gen;
	if (pkt->key.proto == IPPROTO_UDP)
		fwd->udp_timeout_s = svc->udp_timeout_s; /* at most 65535: the control plane checks */

	/* dsr and ipip: the client side is the whole flow; its checksum fields say how it is
	 * forwarded (see struct xdplb_flow; all zero here: dsr). */
	if (svc->flags & SVC_NO_NAT) {
		fwd->flags = first_state_as_sent(pkt->tcp != NULL, pkt->tcp_flags);
		if (svc->flags & XDPLB_SVC_IPIP) {
			if (!cfg->encap_source)
				return PLAN_NO_PORT;
			fwd->saddr = cfg->encap_source;
			fwd->l4_csum_delta = ipip_fixed_sum(fwd->saddr, fwd->daddr);
		}
		return PLAN_OK;
	}

	if (cfg->snat_port_max < cfg->snat_port_min)
		return PLAN_NO_PORT;
	/* The key lives in the scratch space: the stack of this call chain is full. */
	plan->cursor_id = backend->cursor_id;
	cursor = bpf_map_lookup_elem(&xdplb_port_cur, &plan->cursor_id);
	if (!cursor)
		return PLAN_NO_PORT;

	/* Backend side: SNAT address and port -> client. */
	plan->rev_key.saddr = backend->addr[3];
	plan->rev_key.sport = backend->port;
	plan->rev_key.dport = next_snat_source(cfg, cursor, &plan->rev_key.daddr);
	plan->rev_key.proto = pkt->key.proto;
	plan->rev_hash = flow_hash(&plan->rev_key, cfg->flow_seed);
	/* After the cursor's locked add, which would wait for any load still in flight. */
	prefetch_slot(cfg, plan->rev_hash);
	prefetch_slot(cfg, pkt->hash);

	rev->saddr = pkt->key.daddr;
	rev->daddr = pkt->key.saddr;
	rev->sport = pkt->key.dport;
	rev->dport = pkt->key.sport;
	rev->ifindex = ctx->ingress_ifindex;
	/* Replies go back to the hop the client's frame came from. */
	__builtin_memcpy(rev->dmac, pkt->eth->h_source, ETH_ALEN);
	__builtin_memcpy(rev->smac, pkt->eth->h_dest, ETH_ALEN);
	rev->service_id = svc->id;
	rev->backend_id = backend_id;
	rev->flags = XDPLB_FLOW_REPLY;
	rev->udp_timeout_s = fwd->udp_timeout_s;
	if (pkt->tcp) {
		rev->flags |= XDPLB_FLOW_HANDSHAKE;
		fwd->flags = XDPLB_FLOW_HANDSHAKE;
		plan->syn.seq = bpf_ntohl(pkt->tcp->seq);
		plan->syn.has_ts = tcp_timestamps(ctx, sizeof(struct ethhdr) + pkt->ip->ihl * 4);
		plan->syn.tsval = scratch->ts.tsval;
	}
	return PLAN_OK;
}

/* new_flow_plan()'s answer when the flow is planned (any other is an XDP action). */
#define NEW_FLOW_PLANNED (-1)

/* The new-flow path is three global subprograms, which the verifier checks once each, on
 * their own, instead of once for every way xdplb_main can reach them: planning (for a
 * packet the SYN path did not plan already), claiming a SNAT source, storing and
 * forwarding. xdplb_main calls them in turn, which keeps the deepest call chain inside
 * the 512 bytes of stack. The price: they take only the context and scalars (the
 * request is in the per-CPU scratch space) and parse the headers again. */
__noinline int new_flow_plan(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct new_flow_scratch *scratch = bpf_map_lookup_elem(&xdplb_scratch, &zero);
	struct xdplb_config *cfg = bpf_map_lookup_elem(&xdplb_config, &zero);
	struct packet pkt = {};

	if (!scratch || !cfg || parse_packet(ctx, &pkt) != PARSE_L4)
		return pass(XDPLB_CNT_PASS);
	pkt.hash = scratch->req.hash;
	switch (plan_new_flow(ctx, cfg, &pkt, &scratch->req.svc)) {
	case PLAN_OK:
		return NEW_FLOW_PLANNED;
	case PLAN_NOT_SYN:
		trace(ctx, cfg, &pkt, NULL, XDPLB_EV_NO_FLOW, XDP_PASS);
		return pass(XDPLB_CNT_NO_FLOW);
	case PLAN_NOT_ALLOWED:
		/* Passing them would let the host's own stack answer (a reset, or a local
		 * service on the VIP): dropped unless the service says otherwise. */
		if (scratch->req.svc.flags & XDPLB_SVC_PASS_NOT_ALLOWED) {
			trace(ctx, cfg, &pkt, NULL, XDPLB_EV_NOT_ALLOWED, XDP_PASS);
			return pass(XDPLB_CNT_NOT_ALLOWED);
		}
		trace(ctx, cfg, &pkt, NULL, XDPLB_EV_NOT_ALLOWED, XDP_DROP);
		return drop(XDPLB_CNT_NOT_ALLOWED);
	case PLAN_BACKEND_MISMATCH:
		count(XDPLB_CNT_BACKEND_MISMATCH);
		trace(ctx, cfg, &pkt, NULL, XDPLB_EV_NO_BACKEND, XDP_PASS);
		return pass(XDPLB_CNT_NO_BACKEND);
	case PLAN_NO_BACKEND:
		trace(ctx, cfg, &pkt, NULL, XDPLB_EV_NO_BACKEND, XDP_PASS);
		return pass(XDPLB_CNT_NO_BACKEND);
	default:
		trace(ctx, cfg, &pkt, NULL, XDPLB_EV_TABLE_FULL, XDP_DROP);
		return drop(XDPLB_CNT_TABLE_FULL);
	}
}

/* Stores the client side of the planned flow with the SNAT port claim_snat_source()
 * found (host byte order; 0: none; unused in dsr and ipip) and forwards the packet. */
__noinline int new_flow(struct xdp_md *ctx, __u32 snat_port)
{
	__u32 zero = 0, now;
	struct new_flow_scratch *scratch = bpf_map_lookup_elem(&xdplb_scratch, &zero);
	struct xdplb_config *cfg = bpf_map_lookup_elem(&xdplb_config, &zero);
	struct xdplb_flow *fwd, *rev;
	struct new_flow_plan *plan;
	struct packet pkt = {};
	__u32 outcome = 0;

	if (!scratch || !cfg || parse_packet(ctx, &pkt) != PARSE_L4)
		return pass(XDPLB_CNT_PASS);
	pkt.hash = scratch->req.hash;
	pkt.place = scratch->req.place;
	now = now_ticks(cfg);
	plan = &scratch->plan;
	fwd = &plan->fwd;
	rev = &plan->rev;
	/* The mode read where it is needed, never kept across the store: the verifier would
	 * walk the store's probe loop once per value. */
	if (!(scratch->req.svc.flags & SVC_NO_NAT)) {
		if (!snat_port) {
			/* The trace names the backend whose sources ran out. */
			trace(ctx, cfg, &pkt, fwd, XDPLB_EV_SNAT_EXHAUSTED, XDP_DROP);
			return drop(XDPLB_CNT_SNAT_EXHAUSTED);
		}
		fwd->sport = bpf_htons(snat_port);
		fwd->saddr = plan->rev_key.daddr;
		flow_set_deltas(fwd, &pkt.key);
	}
	/* The lookup that missed chose the slot already; if another CPU (or the backend
	 * side just stored) took it since, search again. */
	if (!flow_claim(&pkt.place, &pkt.key, fwd, now))
		outcome = pkt.place.seq & FLOW_PLACE_EVICTS ? FLOW_STORE_EVICTED : 0;
	else if (flow_store(cfg, &pkt.key, pkt.hash, fwd, now, FLOW_STORE_ANY, NULL, NULL, &outcome)) {
		/* Lost a race for the slot: free the SNAT port again. */
		struct xdplb_flow_slot *s = NULL;

		if (!(scratch->req.svc.flags & SVC_NO_NAT))
			s = flow_find(cfg, &plan->rev_key, plan->rev_hash, rev, now, NULL);
		if (s)
			flow_flags_update(s, &plan->rev_key, XDPLB_FLOW_DEAD, 0);
		trace(ctx, cfg, &pkt, NULL, XDPLB_EV_TABLE_FULL, XDP_DROP);
		return drop(XDPLB_CNT_TABLE_FULL);
	}
	if (outcome & FLOW_STORE_EVICTED)
		count(XDPLB_CNT_EVICTED);
	if ((scratch->req.svc.flags & SVC_NO_NAT) && pkt.tcp && !(fwd->flags & XDPLB_FLOW_HANDSHAKE))
		count(XDPLB_CNT_RECOVERED);
	count(XDPLB_CNT_NEW_FLOW);
	return forward(ctx, cfg, &pkt, fwd, XDPLB_EV_NEW_FLOW);
}

/* Stamps both directions of a flow as seen, so neither expires while the other is
 * busy (a one-way stream keeps its return path, and its SNAT port, reserved). */
static __noinline void touch(const struct xdplb_config *cfg, struct xdplb_flow_slot *slot,
			     const struct xdplb_flow *flow, __u8 proto, __u32 now)
{
	struct xdplb_flow_key partner = {};
	struct xdplb_flow other;
	struct xdplb_flow_slot *s;

	slot->last_seen = now;
	if (!flow_rewrites(flow)) /* dsr or ipip: the only entry */
		return;
	flow_partner_key(flow, proto, &partner);
	s = flow_find(cfg, &partner, flow_hash(&partner, cfg->flow_seed), &other, now, NULL);
	if (s && flow_is_partner(&other, &slot->key))
		s->last_seen = now;
}

/* ICMP errors quote the packet we sent; the entry for the opposite direction of that
 * packet knows the original endpoints. The error is sent to the original sender with
 * the quoted packet turned back into the one it sent. */
static __noinline int translate_icmp_error(struct xdp_md *ctx, const struct xdplb_config *cfg,
					   struct packet *pkt)
{
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *inner = (void *)(pkt->icmp + 1);
	struct xdplb_flow_key key = {};
	struct xdplb_flow copy, *flow = &copy;
	__be16 *ports, *l4_check = NULL;
	__u32 addrs = 0, icmp = 0;
	__u16 old;

	if ((void *)(inner + 1) > end || inner->ihl != 5 ||
	    (inner->protocol != IPPROTO_TCP && inner->protocol != IPPROTO_UDP))
		return pass(XDPLB_CNT_PASS);
	ports = (void *)(inner + 1);
	if ((void *)(ports + 4) > end)
		return pass(XDPLB_CNT_PASS);
	key.saddr = inner->daddr;
	key.daddr = inner->saddr;
	key.sport = ports[1];
	key.dport = ports[0];
	key.proto = inner->protocol;
	if (!flow_find(cfg, &key, flow_hash(&key, cfg->flow_seed), &copy, 0, NULL))
		return pass(XDPLB_CNT_PASS);
	if (!flow_rewrites(flow)) {
		int action = forward_as_sent(ctx, cfg, pkt, flow, XDPLB_EV_ICMP);

		if (action != XDP_DROP)
			count(XDPLB_CNT_ICMP_TRANSLATED);
		return action;
	}

	if (inner->protocol == IPPROTO_UDP) {
		if (ports[3])
			l4_check = &ports[3];
	} else if ((void *)(ports + 9) <= end) {
		l4_check = &ports[8];
	}

	/* The quoted packet: addresses, ports, its IP checksum and (when quoted) its L4 checksum. */
	addrs = csum_delta32(addrs, inner->saddr, flow->daddr);
	addrs = csum_delta32(addrs, inner->daddr, flow->saddr);
	icmp = addrs;
	inner->saddr = flow->daddr;
	inner->daddr = flow->saddr;
	old = inner->check;
	inner->check = csum_apply(old, csum_fold32(addrs));
	icmp = csum_delta16(icmp, old, inner->check);
	icmp = csum_delta16(icmp, ports[0], flow->dport);
	icmp = csum_delta16(icmp, ports[1], flow->sport);
	if (l4_check) {
		__u32 l4 = csum_delta16(csum_delta16(addrs, ports[0], flow->dport), ports[1], flow->sport);

		old = *l4_check;
		*l4_check = csum_apply(old, csum_fold32(l4));
		icmp = csum_delta16(icmp, old, *l4_check);
	}
	ports[0] = flow->dport;
	ports[1] = flow->sport;
	pkt->icmp->checksum = csum_apply(pkt->icmp->checksum, csum_fold32(icmp));

	/* The outer header now comes from the load balancer's side of that flow. */
	addrs = 0;
	addrs = csum_delta32(addrs, pkt->ip->saddr, flow->saddr);
	addrs = csum_delta32(addrs, pkt->ip->daddr, flow->daddr);
	pkt->ip->saddr = flow->saddr;
	pkt->ip->daddr = flow->daddr;
	pkt->ip->check = csum_apply(pkt->ip->check, csum_fold32(addrs));
	rewrite_l2(pkt->eth, flow);
	count(XDPLB_CNT_ICMP_TRANSLATED);
	trace(ctx, cfg, pkt, flow, XDPLB_EV_ICMP, flow->ifindex == ctx->ingress_ifindex ? XDP_TX : XDP_REDIRECT);
	return transmit(ctx, flow);
}

static __always_inline struct xdplb_service *find_service(const struct packet *pkt)
{
	struct xdplb_service_key key = {
		.vip = pkt->key.daddr,
		.port = pkt->key.dport,
		.proto = pkt->key.proto,
	};
	__u32 zero = 0, hash = service_hash(&key);
	void *table = bpf_map_lookup_elem(&xdplb_services, &zero);

	if (!table)
		return NULL;
#pragma clang loop unroll(disable)
	for (__u32 probe = 0; probe < XDPLB_SERVICE_PROBES; probe++) {
		__u32 index = (hash + probe) & (XDPLB_SERVICE_SLOTS - 1);
		struct xdplb_service_slot *s = bpf_map_lookup_elem(table, &index);

		if (!s || !s->key.proto)
			return NULL;
		if (*(__u64 *)&s->key == *(__u64 *)&key)
			return &s->svc;
	}
	return NULL;
}

/* A SYN nearly always opens a flow: it is planned before the lookup, so that the memory
 * accesses of both entries start together (see plan_new_flow). A subprogram returning
 * only whether it did, so the verifier does not walk the rest of xdplb_main once per
 * outcome. */
static __noinline int plan_syn(struct xdp_md *ctx, const struct xdplb_config *cfg, struct packet *pkt)
{
	struct xdplb_service *svc = find_service(pkt);
	struct new_flow_scratch *scratch;
	__u32 zero = 0;

	scratch = bpf_map_lookup_elem(&xdplb_scratch, &zero);
	if (!svc || !scratch || pkt->first_fragment || pkt->ip->ttl <= 1)
		return 0;
	scratch->req.svc = *svc;
	return plan_new_flow(ctx, cfg, pkt, &scratch->req.svc) == PLAN_OK;
}

/* After the helpers it shares with the IPv4 path. */
#include "ipv6.h"

SEC("xdp")
int xdplb_main(struct xdp_md *ctx)
{
	struct new_flow_scratch *scratch;
	struct xdplb_service *svc;
	struct xdplb_flow_slot *slot;
	struct packet pkt = {};
	struct xdplb_config *cfg;
	struct xdplb_flow flow;
	__u32 zero = 0, port, now;
	__u8 *port_use, wanted;

	switch (parse_packet(ctx, &pkt)) {
	case PARSE_L4:
		break;
	case PARSE_ICMP:
		if (pkt.icmp->type != ICMP_DEST_UNREACH && pkt.icmp->type != ICMP_TIME_EXCEEDED)
			return pass(XDPLB_CNT_PASS);
		cfg = bpf_map_lookup_elem(&xdplb_config, &zero);
		if (!cfg)
			return pass(XDPLB_CNT_PASS);
		return translate_icmp_error(ctx, cfg, &pkt);
	case PARSE_MALFORMED:
		return pass(XDPLB_CNT_MALFORMED);
	default:
		if (pkt.eth && pkt.eth->h_proto == bpf_htons(ETH_P_IPV6)) {
			int action = xdplb_v6(ctx);

			return action == V6_ICMP ? relay_icmp6_error(ctx) : action;
		}
		return pass(XDPLB_CNT_PASS);
	}

	/* Cheapest test first: is this destination port used by anything of ours? */
	port = bpf_ntohs(pkt.key.dport);
	port_use = bpf_map_lookup_elem(&xdplb_ports, &port);
	wanted = XDPLB_PORT_SNAT |
		 (pkt.key.proto == IPPROTO_TCP ? XDPLB_PORT_TCP_SERVICE : XDPLB_PORT_UDP_SERVICE);
	if (!port_use || !(*port_use & wanted))
		return pass(XDPLB_CNT_PASS);
	cfg = bpf_map_lookup_elem(&xdplb_config, &zero);
	if (!cfg)
		return pass(XDPLB_CNT_PASS);

	now = now_ticks(cfg);
	pkt.hash = flow_hash(&pkt.key, cfg->flow_seed);
	if (pkt.tcp && (pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST)) == TCP_FLAG_SYN)
		pkt.planned = plan_syn(ctx, cfg, &pkt);
	slot = flow_find(cfg, &pkt.key, pkt.hash, &flow, now, &pkt.place);
	/* The client side expires on lookup, and so does the backend side of a handshake the
	 * client never completed: the backend's repeated SYN-ACK then reaches this host's
	 * kernel, whose reset ends the backend's half-open connection before a new flow gets
	 * the tuple. A SYN on a closing flow is the client reusing its port: balance it
	 * afresh. */
	if (slot &&
	    !((!(flow.flags & XDPLB_FLOW_REPLY) || (flow.flags & XDPLB_FLOW_HANDSHAKE)) &&
	      slot_expired(cfg, slot, now)) &&
	    !((flow.flags & XDPLB_FLOW_CLOSING) && (pkt.tcp_flags & TCP_FLAG_SYN) &&
	      !(pkt.tcp_flags & TCP_FLAG_ACK))) {
		if (pkt.first_fragment) {
			trace(ctx, cfg, &pkt, &flow, XDPLB_EV_FRAGMENT, XDP_DROP);
			return drop(XDPLB_CNT_FRAGMENT);
		}
		if (pkt.ip->ttl <= 1) {
			trace(ctx, cfg, &pkt, &flow, XDPLB_EV_TTL_EXPIRED, XDP_PASS);
			return pass(XDPLB_CNT_TTL_EXPIRED);
		}
		/* A backend repeating its SYN-ACK to a client that never answers (a spoofed
		 * SYN) does not keep the half-open flow, and its SNAT source, alive. */
		if (ticks_since(now, slot->last_seen) > (__s32)cfg->touch_ticks &&
		    (flow.flags & (XDPLB_FLOW_REPLY | XDPLB_FLOW_HANDSHAKE)) !=
			    (XDPLB_FLOW_REPLY | XDPLB_FLOW_HANDSHAKE))
			touch(cfg, slot, &flow, pkt.key.proto, now);
		if (pkt.tcp && ((pkt.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) ||
				(flow.flags & (XDPLB_FLOW_HANDSHAKE | XDPLB_FLOW_FIN_BACKEND))))
			track_tcp_state(ctx, cfg, &pkt, slot, &flow);
		follow_backend_hop(cfg, slot, pkt.place.seq, &flow);
		return forward(ctx, cfg, &pkt, &flow,
			       (flow.flags & XDPLB_FLOW_REPLY) ? XDPLB_EV_REPLY : XDPLB_EV_FLOW);
	}

	scratch = bpf_map_lookup_elem(&xdplb_scratch, &zero);
	if (!scratch)
		return pass(XDPLB_CNT_PASS);
	/* A planned SYN's service is in the request already (and it was checked for
	 * fragments and TTL). */
	if (!pkt.planned) {
		svc = find_service(&pkt);
		if (!svc)
			return pass(XDPLB_CNT_PASS);
		if (pkt.first_fragment) {
			trace(ctx, cfg, &pkt, NULL, XDPLB_EV_FRAGMENT, XDP_DROP);
			return drop(XDPLB_CNT_FRAGMENT);
		}
		if (pkt.ip->ttl <= 1) {
			trace(ctx, cfg, &pkt, NULL, XDPLB_EV_TTL_EXPIRED, XDP_PASS);
			return pass(XDPLB_CNT_TTL_EXPIRED);
		}
		scratch->req.svc = *svc;
	}
	scratch->req.place = pkt.place;
	scratch->req.hash = pkt.hash;
	if (!pkt.planned) {
		int action = new_flow_plan(ctx);

		if (action != NEW_FLOW_PLANNED)
			return action;
	}
	if (scratch->req.svc.flags & SVC_NO_NAT)
		return new_flow(ctx, 0);
	/* Backend side first: it owns the SNAT port, which the client side then uses. */
	return new_flow(ctx, claim_snat_source(now));
}
