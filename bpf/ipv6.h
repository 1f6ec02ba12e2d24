/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The IPv6 path: one global function, xdplb_v6, that xdplb_main calls for frames with
 * the IPv6 EtherType only, so IPv4 packets pay nothing for it and the verifier walks it
 * once. Services forward in dsr mode (the control plane refuses the others so far): the
 * packet goes on as the client sent it, behind a new Ethernet header, and the flow table
 * (xdplb_flows6) keeps each connection on the backend Maglev gave its first packet.
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
 * comes here and is relayed to that flow's backend as it is (IPv4's dsr does the same).
 * The hop limit is kept (the backend is on this link; IPv4's dsr keeps the TTL); a packet
 * with hop limit 1 or less passes, as one with TTL 1 does.
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

static __always_inline int forward6(struct xdp_md *ctx, struct packet6 *pkt, const struct xdplb_flow6 *flow,
				    __u32 new_flow)
{
	__u64 bytes = ctx->data_end - ctx->data;
	__u32 id = flow->backend_id;
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
	__builtin_memcpy(pkt->eth->h_dest, hop.dmac, ETH_ALEN);
	__builtin_memcpy(pkt->eth->h_source, hop.smac, ETH_ALEN);
	account(flow->service_id, &xdplb_svc_stats, bytes, new_flow);
	account(flow->backend_id, &xdplb_be_stats, bytes, new_flow);
	if (hop.ifindex == ctx->ingress_ifindex) {
		count(XDPLB_CNT_TX);
		return XDP_TX;
	}
	count(XDPLB_CNT_REDIRECT);
	return bpf_redirect(hop.ifindex, 0);
}

/* An ICMPv6 error quotes a packet the backend sent the client from the VIP: the flow of
 * the opposite direction is the client's, and its backend gets the error. */
static __always_inline int relay_icmp6_error(struct xdp_md *ctx, struct packet6 *pkt)
{
	void *end = (void *)(long)ctx->data_end;
	struct icmp6_header *icmp = pkt->l4;
	struct xdplb_flow_key6 key = {};
	struct ipv6hdr *inner;
	struct xdplb_flow6 *flow;
	__be16 *ports;
	int action;

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
	action = forward6(ctx, pkt, flow, 0);
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

/* A packet of a service without a live flow: Maglev picks the backend (hash_seed, shared by
 * every node, so a flow another node balanced lands on the same one), the flow is stored
 * and the packet forwarded. A TCP segment other than a SYN opens a flow too, as for IPv4's
 * dsr: the connection was balanced before (a restart, another node). */
static __always_inline int new_flow6(struct xdp_md *ctx, const struct xdplb_config *cfg, struct packet6 *pkt,
				     const struct xdplb_service *svc, __u32 now)
{
	struct xdplb_flow6 fresh = {};
	struct xdplb_backend *be;
	__u32 id = 0;

	if (!(svc->flags & XDPLB_SVC_DSR))
		return pass(XDPLB_CNT_PASS);
	/* IPv6 allow-lists are refused by the control plane; a service that has one anyway
	 * lets nobody in rather than everybody. */
	if (svc->flags & XDPLB_SVC_ALLOWLIST) {
		if (svc->flags & XDPLB_SVC_PASS_NOT_ALLOWED)
			return pass(XDPLB_CNT_NOT_ALLOWED);
		return drop(XDPLB_CNT_NOT_ALLOWED);
	}
	be = select_backend(svc, flow_hash6(&pkt->key, cfg->hash_seed), &id);
	if (!be)
		return pass(XDPLB_CNT_NO_BACKEND);
	if (be->service_id != svc->id) {
		count(XDPLB_CNT_BACKEND_MISMATCH);
		return pass(XDPLB_CNT_NO_BACKEND);
	}
	__builtin_memcpy(fresh.daddr, be->addr, sizeof(fresh.daddr));
	fresh.ifindex = be->ifindex;
	__builtin_memcpy(fresh.dmac, be->dmac, ETH_ALEN);
	__builtin_memcpy(fresh.smac, be->smac, ETH_ALEN);
	fresh.last_seen = now;
	fresh.flags = first_state_as_sent(pkt->key.proto == IPPROTO_TCP, pkt->tcp_flags);
	fresh.service_id = svc->id;
	fresh.backend_id = id;
	if (pkt->key.proto == IPPROTO_UDP)
		fresh.udp_timeout_s = svc->udp_timeout_s;
	if (bpf_map_update_elem(&xdplb_flows6, &pkt->key, &fresh, BPF_ANY))
		return drop(XDPLB_CNT_TABLE_FULL);
	if (pkt->key.proto == IPPROTO_TCP && !(fresh.flags & XDPLB_FLOW_HANDSHAKE))
		count(XDPLB_CNT_RECOVERED);
	count(XDPLB_CNT_NEW_FLOW);
	return forward6(ctx, pkt, &fresh, 1);
}

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
		return relay_icmp6_error(ctx, &pkt);
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
	if (pkt.first_fragment)
		return drop(XDPLB_CNT_FRAGMENT);
	if (pkt.ip6->hop_limit <= 1)
		return pass(XDPLB_CNT_TTL_EXPIRED);
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
		return forward6(ctx, &pkt, flow, 0);
	}
	return new_flow6(ctx, cfg, &pkt, svc, now);
}

#endif /* XDPLB_IPV6_H */
