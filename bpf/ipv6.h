/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The IPv6 path: one global function, xdplb_v6, that xdplb_main calls for frames with
 * the IPv6 EtherType only, so IPv4 packets pay nothing for it and the verifier walks it
 * once. Services forward in dsr or ipip mode (the control plane refuses nat so far): the
 * packet goes on as the client sent it, behind a new Ethernet header (dsr) or inside an
 * outer IPv6 header to the backend (ip6ip6, next header 41, which `xdplb decap` takes
 * off), and the flow table (xdplb_flows6) keeps each connection on the backend Maglev
 * gave its first packet.
 *
 * ip6ip6 makes a packet 40 bytes longer. When it no longer fits the egress link, the
 * client gets an ICMPv6 "packet too big" from the VIP with the MTU it may use, as IPv4
 * clients get "fragmentation needed" (IPv6 routers never fragment, so there is no DF to
 * look at). That MTU is never below IPv6's minimum, 1280 (RFC 8200): links towards ipip
 * backends need 1320 bytes, or packets between their MTU - 40 and 1280 are dropped
 * (counted too_big), since only fragmenting the outer packet would get them through.
 *
 * Extension headers (RFC 8200), at most XDPLB_V6_EXT_HEADERS of them, else the packet
 * passes to the kernel:
 *  - hop-by-hop and destination options: skipped, and forwarded as they are;
 *  - routing: skipped when no segment is left; with segments left the VIP is not the
 *    packet's final destination yet: passed;
 *  - fragment: an atomic fragment (offset 0 and no more, RFC 6946) is a whole packet; the
 *    first fragment of a service's packet is dropped and counted, as IPv4's are (the
 *    fragments after it carry no ports to balance on); later fragments pass;
 *  - anything else (ESP, AH, no next header): passed.
 * Neighbour discovery, router advertisements, echo and every other ICMPv6 message pass
 * untouched, but for errors about a flow's packets (destination unreachable, packet too
 * big, time exceeded, parameter problem): the backend answered from the VIP, so the error
 * comes here and is relayed to that flow's backend as it is, encapsulated for ipip (as
 * IPv4's dsr and ipip do). The packet's hop limit is kept (dsr: the backend is on this
 * link; ipip: the outer header is what crosses routers), as IPv4's TTL is; a packet with
 * hop limit 1 or less passes, as one with TTL 1 does.
 */
#ifndef XDPLB_IPV6_H
#define XDPLB_IPV6_H

#include <linux/ipv6.h>

#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_ICMPV6 58
#define NEXTHDR_DEST 60
/* ICMPv6 types below this are errors (RFC 4443). */
#define ICMPV6_INFO_MIN 128
#define ICMPV6_PKT_TOOBIG 2
#define IPV6_FRAG_OFFSET 0xfff8
#define IPV6_FRAG_MORE 0x0001

struct icmp6_header {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 rest;
};

struct packet6 {
	struct ethhdr *eth;
	struct ipv6hdr *ip6;
	void *l4; /* TCP, UDP or ICMPv6 header */
	struct xdplb_flow_key6 key;
	__u8 tcp_flags;
	__u8 first_fragment;
};

/* trace_line() for IPv6 packets (the same lease, the same fields, see XDPLB_TRACE_TAG6). */
static __noinline void trace_line6(struct xdp_md *ctx, const struct xdplb_config *cfg, const struct packet6 *pkt,
				   const struct xdplb_flow6 *flow, __u32 event_action)
{
	static const char fmt[] = XDPLB_TRACE_TAG6 " %u %u %x %pI6 %u %pI6 %u %pI6 %u %u %u %u";
	struct trace_args *a = trace_lease_args(cfg);

	if (!a)
		return;
	__builtin_memcpy(a->addr6[0], pkt->key.saddr, sizeof(a->addr6[0]));
	__builtin_memcpy(a->addr6[1], pkt->key.daddr, sizeof(a->addr6[1]));
	if (flow)
		__builtin_memcpy(a->addr6[2], flow->daddr, sizeof(a->addr6[2]));
	else
		__builtin_memset(a->addr6[2], 0, sizeof(a->addr6[2]));
	a->v[0] = ctx->ingress_ifindex;
	a->v[1] = pkt->key.proto;
	a->v[2] = pkt->tcp_flags;
	a->v[3] = (__u64)(long)a->addr6[0];
	a->v[4] = bpf_ntohs(pkt->key.sport);
	a->v[5] = (__u64)(long)a->addr6[1];
	a->v[6] = bpf_ntohs(pkt->key.dport);
	a->v[7] = (__u64)(long)a->addr6[2];
	a->v[8] = flow ? bpf_ntohs(pkt->key.dport) : 0; /* dsr and ipip keep the service's port */
	a->v[9] = flow ? flow->backend_id : XDPLB_NO_BACKEND;
	a->v[10] = event_action >> 8;
	a->v[11] = event_action & 0xff;
	bpf_trace_vprintk(fmt, sizeof(fmt), a->v, sizeof(a->v));
}

static __always_inline void trace6(struct xdp_md *ctx, const struct xdplb_config *cfg, const struct packet6 *pkt,
				   const struct xdplb_flow6 *flow, __u32 event, __u32 action)
{
	if (cfg->flags & XDPLB_CFG_TRACE)
		trace_line6(ctx, cfg, pkt, flow, event << 8 | action);
}

/* Where an IPv6 flow's packets go: its backend's next hop while the backend entry still
 * holds the flow's backend, else the flow's own copy. */
struct hop6 {
	__u32 ifindex;
	__u8 dmac[ETH_ALEN];
	__u8 smac[ETH_ALEN];
};

static __always_inline int addr6_equal(const __be32 *a, const __be32 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0;
}

static __always_inline int is_ext_header(__u8 next)
{
	return next == NEXTHDR_HOP || next == NEXTHDR_DEST || next == NEXTHDR_ROUTING || next == NEXTHDR_FRAGMENT;
}

static __always_inline int parse_packet6(struct xdp_md *ctx, struct packet6 *pkt)
{
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = (void *)(long)ctx->data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	void *pos;
	__u8 next;

	if ((void *)(ip6 + 1) > end || ip6->version != 6)
		return PARSE_MALFORMED;
	/* The payload must fit the frame, which may carry Ethernet padding after it. */
	if ((void *)(ip6 + 1) + bpf_ntohs(ip6->payload_len) > end)
		return PARSE_MALFORMED;
	pkt->eth = eth;
	pkt->ip6 = ip6;
	next = ip6->nexthdr;
	pos = ip6 + 1;
	for (int i = 0; i < XDPLB_V6_EXT_HEADERS; i++) {
		__u8 *h = pos;

		if (!is_ext_header(next))
			break;
		if ((void *)(h + 8) > end)
			return PARSE_MALFORMED;
		if (next == NEXTHDR_FRAGMENT) {
			__be16 frag = *(__be16 *)(h + 2);

			if (frag & bpf_htons(IPV6_FRAG_OFFSET))
				return PARSE_LATER_FRAGMENT;
			pkt->first_fragment = (frag & bpf_htons(IPV6_FRAG_MORE)) != 0;
			next = h[0];
			pos = h + 8;
			continue;
		}
		if (next == NEXTHDR_ROUTING && h[3] != 0) /* segments left */
			return PARSE_OTHER;
		next = h[0];
		pos = h + (h[1] + 1) * 8;
	}
	if (is_ext_header(next))
		return PARSE_OTHER;
	__builtin_memcpy(pkt->key.saddr, &ip6->saddr, sizeof(pkt->key.saddr));
	__builtin_memcpy(pkt->key.daddr, &ip6->daddr, sizeof(pkt->key.daddr));
	pkt->key.proto = next;
	pkt->l4 = pos;
	if (next == IPPROTO_TCP) {
		struct tcphdr *tcp = pos;

		if ((void *)(tcp + 1) > end || tcp->doff < 5)
			return PARSE_MALFORMED;
		pkt->key.sport = tcp->source;
		pkt->key.dport = tcp->dest;
		pkt->tcp_flags = ((__u8 *)tcp)[TCP_FLAGS_OFFSET];
		return PARSE_L4;
	}
	if (next == IPPROTO_UDP) {
		struct udphdr *udp = pos;

		if ((void *)(udp + 1) > end)
			return PARSE_MALFORMED;
		pkt->key.sport = udp->source;
		pkt->key.dport = udp->dest;
		return PARSE_L4;
	}
	if (next == NEXTHDR_ICMPV6 && !pkt->first_fragment) {
		struct icmp6_header *icmp = pos;

		if ((void *)(icmp + 1) > end)
			return PARSE_OTHER;
		return PARSE_ICMP;
	}
	return PARSE_OTHER;
}

/* Adds the sum of the next at most `cap` bytes of the quote (from `offset`) to *sum.
 * Both constants: the verifier then knows the piece lies inside the buffer. */
static __always_inline int quote_sum(struct ptb_quote *q, __u32 offset, __u32 cap, __u32 *left, __u64 *sum)
{
	__u32 piece = *left > cap ? cap : *left;
	__s64 part;

	if (!piece)
		return 0;
	part = bpf_csum_diff(NULL, 0, (__be32 *)(q->bytes + offset), piece, 0);
	if (part < 0)
		return -1;
	*sum += (__u32)part;
	*left -= piece;
	return 0;
}

/* Turns the frame, a client's packet too big for `mtu` once encapsulated, into an ICMPv6
 * "packet too big" (type 2) from the address it was sent to, quoting as much of it as
 * fits in 1280 bytes (RFC 4443), to go back with XDP_TX: MACs swapped. Returns 0, or -1
 * if the frame is not such a packet (the caller checked it is). A global function: the
 * verifier walks it once, and only the context and scalars cross. */
__noinline int answer_packet_too_big(struct xdp_md *ctx, __u32 mtu)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	__u32 zero = 0, quote, left;
	__be32 first, size;
	struct icmp6_header *icmp;
	struct ptb_quote *q;
	__u64 sum = 0;
	long len;

	if ((void *)(ip6 + 1) > end)
		return -1;
	quote = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	if (quote > PTB_QUOTE_MAX)
		quote = PTB_QUOTE_MAX;
	q = bpf_map_lookup_elem(&xdplb_ptb_quote, &zero);
	if (!q || bpf_xdp_load_bytes(ctx, sizeof(*eth), q->bytes, quote))
		return -1;
	q->bytes[quote] = q->bytes[quote + 1] = q->bytes[quote + 2] = 0;
	/* The quote's sum, in pieces of at most 512 bytes (the last one padded with zeros). */
	left = (quote + 3) & ~3u;
	if (quote_sum(q, 0, 512, &left, &sum) || quote_sum(q, 512, 512, &left, &sum) ||
	    quote_sum(q, 1024, sizeof(q->bytes) - 1024, &left, &sum))
		return -1;
	__builtin_memcpy(q->client_mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(q->own_mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(q->client, &ip6->saddr, sizeof(q->client));
	__builtin_memcpy(q->vip, &ip6->daddr, sizeof(q->vip));

	/* Nothing past the quote. The frame's length as a number first: the verifier refuses
	 * 32-bit arithmetic on packet pointers, which the compiler would otherwise emit. */
	len = (long)end - (long)data;
	asm volatile("" : "+r"(len));
	if (bpf_xdp_adjust_tail(ctx, (int)(sizeof(*eth) + quote - len)))
		return -1;
	if (bpf_xdp_adjust_head(ctx, -(int)(sizeof(struct ipv6hdr) + sizeof(struct icmp6_header))))
		return -1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip6 = (void *)(eth + 1);
	icmp = (void *)(ip6 + 1);
	if ((void *)(icmp + 1) > end)
		return -1;
	__builtin_memcpy(eth->h_dest, q->client_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, q->own_mac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IPV6);
	first = bpf_htonl(6 << 28);
	size = bpf_htons(sizeof(*icmp) + quote);
	*(__be32 *)ip6 = first;
	ip6->payload_len = size;
	ip6->nexthdr = NEXTHDR_ICMPV6;
	ip6->hop_limit = ICMP_ANSWER_TTL;
	__builtin_memcpy(&ip6->saddr, q->vip, sizeof(q->vip));
	__builtin_memcpy(&ip6->daddr, q->client, sizeof(q->client));
	icmp->type = ICMPV6_PKT_TOOBIG;
	icmp->code = 0;
	icmp->checksum = 0;
	icmp->rest = bpf_htonl(mtu);
	/* The pseudo-header (addresses, upper-layer length, next header), then the message. */
	for (int i = 0; i < 4; i++)
		sum += (q->vip[i] & 0xffff) + (q->vip[i] >> 16) + (q->client[i] & 0xffff) + (q->client[i] >> 16);
	sum += size + bpf_htons(NEXTHDR_ICMPV6) + *(__u16 *)icmp + (icmp->rest & 0xffff) + (icmp->rest >> 16);
	sum = (sum & 0xffffffff) + (sum >> 32);
	icmp->checksum = ~csum_fold32((__u32)sum + (sum >> 32));
	return 0;
}

/* Whether the packet still fits its egress link inside an outer IPv6 header. If not, *mtu
 * gets the link's MTU. As for IPv4 (ipip_fits), nothing is asked below
 * XDPLB_ENCAP_MTU_FLOOR, and a failed check counts as fitting. */
static __always_inline int ip6ip6_fits(struct xdp_md *ctx, const struct ipv6hdr *ip6, __u32 ifindex, __u32 *mtu)
{
	__u32 len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);

	if (len + sizeof(*ip6) <= XDPLB_ENCAP_MTU_FLOOR)
		return 1;
	*mtu = len;
	return bpf_check_mtu(ctx, ifindex, mtu, sizeof(*ip6), 0) != BPF_MTU_CHK_RET_FRAG_NEEDED;
}

/* Puts an outer IPv6 header from encap_source6 to the backend before the packet, which
 * stays as it is, and a new Ethernet header before both. Traffic class from the inner
 * header (DSCP and ECN pass through, RFC 6040's normal mode); the flow label from the
 * inner 5-tuple (RFC 6438), so that routers spreading flows by label keep each on one path.
 * Returns 0, or -1 without headroom (XDP always leaves 256 bytes). */
static __always_inline int ip6ip6_encapsulate(struct xdp_md *ctx, const struct xdplb_config *cfg,
					      const struct xdplb_flow6 *flow, const struct hop6 *hop, __u32 label)
{
	struct ipv6hdr *inner = (void *)(long)ctx->data + sizeof(struct ethhdr), *outer;
	__u32 tclass;
	__be16 len;

	if ((void *)(inner + 1) > (void *)(long)ctx->data_end)
		return -1;
	tclass = (bpf_ntohl(*(__be32 *)inner) >> 20) & 0xff;
	len = bpf_htons(sizeof(*inner) + bpf_ntohs(inner->payload_len));
	outer = push_outer_header(ctx, sizeof(*outer), hop->dmac, hop->smac, bpf_htons(ETH_P_IPV6));
	if (!outer)
		return -1;
	*(__be32 *)outer = bpf_htonl(6 << 28 | tclass << 20 | (label & 0xfffff));
	outer->payload_len = len;
	outer->nexthdr = IPPROTO_IPV6;
	outer->hop_limit = XDPLB_IPIP_TTL;
	__builtin_memcpy(&outer->saddr, cfg->encap_source6, sizeof(outer->saddr));
	__builtin_memcpy(&outer->daddr, flow->daddr, sizeof(outer->daddr));
	return 0;
}

static __always_inline int forward6(struct xdp_md *ctx, const struct xdplb_config *cfg, struct packet6 *pkt,
				    const struct xdplb_flow6 *flow, __u32 event)
{
	__u32 new_flow = event == XDPLB_EV_NEW_FLOW;
	/* As pointers: the compiler would spill a 32-bit copy of ctx->data otherwise, which
	 * the verifier refuses. */
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	__u64 bytes = end - data;
	__u32 id = flow->backend_id, mtu = 0;
	struct xdplb_backend *be = bpf_map_lookup_elem(&xdplb_backends, &id);
	struct hop6 hop;

	if (be && (be->flags & XDPLB_BACKEND_IN_USE) && addr6_equal(be->addr, flow->daddr)) {
		hop.ifindex = be->ifindex;
		__builtin_memcpy(hop.dmac, be->dmac, ETH_ALEN);
		__builtin_memcpy(hop.smac, be->smac, ETH_ALEN);
	} else {
		hop.ifindex = flow->ifindex;
		__builtin_memcpy(hop.dmac, flow->dmac, ETH_ALEN);
		__builtin_memcpy(hop.smac, flow->smac, ETH_ALEN);
	}
	if (!flow->encap) {
		__builtin_memcpy(pkt->eth->h_dest, hop.dmac, ETH_ALEN);
		__builtin_memcpy(pkt->eth->h_source, hop.smac, ETH_ALEN);
	} else if (!ip6ip6_fits(ctx, pkt->ip6, hop.ifindex, &mtu)) {
		/* Never an ICMPv6 error about an ICMPv6 error (RFC 4443); and no MTU below
		 * IPv6's minimum to offer: a link towards the backend under 1320 bytes takes
		 * only what already fits, the rest is dropped (see XDPLB_ENCAP_MTU_FLOOR). */
		int answer = pkt->key.proto != NEXTHDR_ICMPV6 &&
			     mtu >= XDPLB_ENCAP_MTU_FLOOR + sizeof(struct ipv6hdr);

		trace6(ctx, cfg, pkt, flow, XDPLB_EV_TOO_BIG, answer ? XDP_TX : XDP_DROP);
		if (!answer || answer_packet_too_big(ctx, mtu - sizeof(struct ipv6hdr)))
			return drop(XDPLB_CNT_TOO_BIG);
		count(XDPLB_CNT_FRAG_NEEDED);
		count(XDPLB_CNT_TX);
		return XDP_TX;
	}
	account(flow->service_id, &xdplb_svc_stats, bytes, new_flow);
	account(flow->backend_id, &xdplb_be_stats, bytes, new_flow);
	trace6(ctx, cfg, pkt, flow, event, hop.ifindex == ctx->ingress_ifindex ? XDP_TX : XDP_REDIRECT);
	if (flow->encap && ip6ip6_encapsulate(ctx, cfg, flow, &hop, flow_hash6(&pkt->key, cfg->flow_seed)))
		return XDP_ABORTED; /* no headroom: cannot happen, and the xdp_exception tracepoint says so */
	if (hop.ifindex == ctx->ingress_ifindex) {
		count(XDPLB_CNT_TX);
		return XDP_TX;
	}
	count(XDPLB_CNT_REDIRECT);
	return bpf_redirect(hop.ifindex, 0);
}

/* An ICMPv6 error quotes a packet the backend sent the client from the VIP: the flow of
 * the opposite direction is the client's, and its backend gets the error. A global
 * function that parses the frame again: a rare path, kept off xdplb_v6's stack. */
__noinline int relay_icmp6_error(struct xdp_md *ctx)
{
	void *end = (void *)(long)ctx->data_end;
	struct xdplb_flow_key6 key = {};
	struct packet6 pkt = {};
	struct icmp6_header *icmp;
	struct xdplb_config *cfg;
	struct xdplb_flow6 *flow;
	struct ipv6hdr *inner;
	__be16 *ports;
	__u32 zero = 0;
	int action;

	cfg = bpf_map_lookup_elem(&xdplb_config, &zero);
	if (!cfg || parse_packet6(ctx, &pkt) != PARSE_ICMP)
		return pass(XDPLB_CNT_PASS);
	icmp = pkt.l4;
	if ((void *)(icmp + 1) > end || icmp->type >= ICMPV6_INFO_MIN)
		return pass(XDPLB_CNT_PASS);
	inner = (void *)(icmp + 1);
	ports = (void *)(inner + 1);
	if ((void *)(ports + 2) > end || (inner->nexthdr != IPPROTO_TCP && inner->nexthdr != IPPROTO_UDP))
		return pass(XDPLB_CNT_PASS);
	__builtin_memcpy(key.saddr, &inner->daddr, sizeof(key.saddr));
	__builtin_memcpy(key.daddr, &inner->saddr, sizeof(key.daddr));
	key.sport = ports[1];
	key.dport = ports[0];
	key.proto = inner->nexthdr;
	flow = bpf_map_lookup_elem(&xdplb_flows6, &key);
	if (!flow)
		return pass(XDPLB_CNT_PASS);
	action = forward6(ctx, cfg, &pkt, flow, XDPLB_EV_ICMP);
	if (action != XDP_DROP)
		count(XDPLB_CNT_ICMP_TRANSLATED);
	return action;
}

static __always_inline int flow6_live(const struct xdplb_config *cfg, const struct xdplb_flow6 *flow, __u8 proto,
				      __u32 now)
{
	__u32 expiry = flow_expiry_ticks(cfg, proto, flow->flags, flow->udp_timeout_s);

	return !expiry || ticks_since(now, flow->last_seen) <= (__s32)expiry;
}

/* The client's FIN or RST closes the flow, the handshake's last ACK ends HANDSHAKE (as
 * for IPv4's dsr flows): atomic updates of the flags word, which readers copy whole. */
static __always_inline void track_tcp_state6(struct xdplb_flow6 *flow, __u8 tcp_flags)
{
	if (tcp_flags & TCP_FLAG_RST)
		__sync_fetch_and_or(&flow->flags, XDPLB_FLOW_CLOSING | XDPLB_FLOW_RESET);
	if (tcp_flags & TCP_FLAG_FIN)
		__sync_fetch_and_or(&flow->flags, XDPLB_FLOW_CLOSING | XDPLB_FLOW_FIN_CLIENT);
	if ((flow->flags & XDPLB_FLOW_HANDSHAKE) &&
	    (tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST)) == TCP_FLAG_ACK)
		__sync_fetch_and_and(&flow->flags, ~(__u32)XDPLB_FLOW_HANDSHAKE);
}

static __always_inline int client6_allowed(const struct xdplb_service *svc, const __be32 *addr)
{
	struct xdplb_client_key6 key = {
		.prefixlen = 32 + 128,
		.service_id = bpf_htonl(svc->id),
	};

	if (!(svc->flags & XDPLB_SVC_ALLOWLIST))
		return 1;
	__builtin_memcpy(key.addr, addr, sizeof(key.addr));
	return bpf_map_lookup_elem(&xdplb_clients6, &key) != NULL;
}

/* A packet of a service without a live flow: Maglev picks the backend (hash_seed, shared by
 * every node, so a flow another node balanced lands on the same one), the flow is stored
 * and the packet forwarded. A TCP segment other than a SYN opens a flow too, as for IPv4's
 * dsr: the connection was balanced before (a restart, another node). */
static __always_inline int new_flow6(struct xdp_md *ctx, const struct xdplb_config *cfg, struct packet6 *pkt,
				     const struct xdplb_service *svc, __u32 now)
{
	struct new_flow_scratch *scratch;
	struct xdplb_flow6 *fresh;
	struct xdplb_backend *be;
	__u32 id = 0, zero = 0;

	if (!(svc->flags & SVC_NO_NAT))
		return pass(XDPLB_CNT_PASS);
	if (!client6_allowed(svc, pkt->key.saddr)) {
		if (svc->flags & XDPLB_SVC_PASS_NOT_ALLOWED) {
			trace6(ctx, cfg, pkt, NULL, XDPLB_EV_NOT_ALLOWED, XDP_PASS);
			return pass(XDPLB_CNT_NOT_ALLOWED);
		}
		trace6(ctx, cfg, pkt, NULL, XDPLB_EV_NOT_ALLOWED, XDP_DROP);
		return drop(XDPLB_CNT_NOT_ALLOWED);
	}
	be = select_backend(svc, flow_hash6(&pkt->key, cfg->hash_seed), &id);
	if (!be || be->service_id != svc->id) {
		if (be)
			count(XDPLB_CNT_BACKEND_MISMATCH);
		trace6(ctx, cfg, pkt, NULL, XDPLB_EV_NO_BACKEND, XDP_PASS);
		return pass(XDPLB_CNT_NO_BACKEND);
	}
	/* Built in the per-CPU scratch space: the stack of this call chain is short. */
	scratch = bpf_map_lookup_elem(&xdplb_scratch, &zero);
	if (!scratch)
		return pass(XDPLB_CNT_PASS);
	fresh = &scratch->flow6;
	__builtin_memset(fresh, 0, sizeof(*fresh));
	__builtin_memcpy(fresh->daddr, be->addr, sizeof(fresh->daddr));
	fresh->ifindex = be->ifindex;
	__builtin_memcpy(fresh->dmac, be->dmac, ETH_ALEN);
	__builtin_memcpy(fresh->smac, be->smac, ETH_ALEN);
	fresh->last_seen = now;
	fresh->flags = first_state_as_sent(pkt->key.proto == IPPROTO_TCP, pkt->tcp_flags);
	fresh->service_id = svc->id;
	fresh->backend_id = id;
	if (pkt->key.proto == IPPROTO_UDP)
		fresh->udp_timeout_s = svc->udp_timeout_s;
	if (svc->flags & XDPLB_SVC_IPIP) {
		const __be32 *src = cfg->encap_source6;

		if (!(src[0] | src[1] | src[2] | src[3])) { /* as IPv4 ipip without a source */
			trace6(ctx, cfg, pkt, NULL, XDPLB_EV_TABLE_FULL, XDP_DROP);
			return drop(XDPLB_CNT_TABLE_FULL);
		}
		fresh->encap = 1;
	}
	if (bpf_map_update_elem(&xdplb_flows6, &pkt->key, fresh, BPF_ANY)) {
		trace6(ctx, cfg, pkt, NULL, XDPLB_EV_TABLE_FULL, XDP_DROP);
		return drop(XDPLB_CNT_TABLE_FULL);
	}
	if (pkt->key.proto == IPPROTO_TCP && !(fresh->flags & XDPLB_FLOW_HANDSHAKE))
		count(XDPLB_CNT_RECOVERED);
	count(XDPLB_CNT_NEW_FLOW);
	return forward6(ctx, cfg, pkt, fresh, XDPLB_EV_NEW_FLOW);
}

/* xdplb_v6's answer for an ICMPv6 message (any other is an XDP action): xdplb_main then
 * calls relay_icmp6_error, so that neither call chain outgrows the 512 bytes of stack. */
#define V6_ICMP (-1)

__noinline int xdplb_v6(struct xdp_md *ctx)
{
	struct xdplb_service_key6 skey = {};
	struct packet6 pkt = {};
	struct xdplb_service *svc;
	struct xdplb_config *cfg;
	struct xdplb_flow6 *flow;
	__u32 zero = 0, port, now;
	__u8 *port_use, wanted;

	switch (parse_packet6(ctx, &pkt)) {
	case PARSE_L4:
		break;
	case PARSE_ICMP:
		return V6_ICMP;
	case PARSE_MALFORMED:
		return pass(XDPLB_CNT_MALFORMED);
	default:
		return pass(XDPLB_CNT_PASS);
	}
	port = bpf_ntohs(pkt.key.dport);
	port_use = bpf_map_lookup_elem(&xdplb_ports, &port);
	wanted = pkt.key.proto == IPPROTO_TCP ? XDPLB_PORT_TCP_SERVICE : XDPLB_PORT_UDP_SERVICE;
	if (!port_use || !(*port_use & wanted))
		return pass(XDPLB_CNT_PASS);
	cfg = bpf_map_lookup_elem(&xdplb_config, &zero);
	if (!cfg)
		return pass(XDPLB_CNT_PASS);
	__builtin_memcpy(skey.vip, pkt.key.daddr, sizeof(skey.vip));
	skey.port = pkt.key.dport;
	skey.proto = pkt.key.proto;
	svc = bpf_map_lookup_elem(&xdplb_services6, &skey);
	if (!svc)
		return pass(XDPLB_CNT_PASS);
	if (pkt.first_fragment) {
		trace6(ctx, cfg, &pkt, NULL, XDPLB_EV_FRAGMENT, XDP_DROP);
		return drop(XDPLB_CNT_FRAGMENT);
	}
	if (pkt.ip6->hop_limit <= 1) {
		trace6(ctx, cfg, &pkt, NULL, XDPLB_EV_TTL_EXPIRED, XDP_PASS);
		return pass(XDPLB_CNT_TTL_EXPIRED);
	}
	now = now_ticks(cfg);
	flow = bpf_map_lookup_elem(&xdplb_flows6, &pkt.key);
	/* A SYN on a closing flow is the client reusing its port: balanced afresh. */
	if (flow && flow6_live(cfg, flow, pkt.key.proto, now) &&
	    !((flow->flags & XDPLB_FLOW_CLOSING) &&
	      (pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)) {
		if (ticks_since(now, flow->last_seen) > (__s32)cfg->touch_ticks)
			flow->last_seen = now;
		if (pkt.key.proto == IPPROTO_TCP &&
		    ((pkt.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) || (flow->flags & XDPLB_FLOW_HANDSHAKE)))
			track_tcp_state6(flow, pkt.tcp_flags);
		return forward6(ctx, cfg, &pkt, flow, XDPLB_EV_FLOW);
	}
	return new_flow6(ctx, cfg, &pkt, svc, now);
}

#endif /* XDPLB_IPV6_H */
