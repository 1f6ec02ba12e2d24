/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Forwarding without NAT, for services with XDPLB_SVC_DSR or XDPLB_SVC_IPIP: the backend
 * holds the VIP itself and answers the client directly, so it gets the client's packet
 * as sent, behind a new Ethernet header (dsr) or inside an outer IPv4 header addressed to
 * it (ipip). A flow's entry says which (struct xdplb_flow in xdplb_abi.h).
 *
 * Encapsulation makes a packet 20 bytes longer than the client made it. When that no
 * longer fits the egress link, a client that set DF learns the MTU it may use from an
 * ICMP "fragmentation needed" (RFC 1191) sent back from the VIP; a packet without DF is
 * dropped: fragmenting it here would cost more than the whole program.
 */
#ifndef XDPLB_ENCAP_H
#define XDPLB_ENCAP_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "xdplb_abi.h"
#include "parse.h"
#include "csum.h"
#include "flows.h"

#define SVC_NO_NAT (XDPLB_SVC_DSR | XDPLB_SVC_IPIP)

#define IP_DF 0x4000
#define ICMP_FRAG_NEEDED 4
/* The kernel's own ICMP errors carry this precedence (icmp_send) and its default TTL. */
#define IPTOS_PREC_INTERNETCONTROL 0xc0
#define ICMP_ANSWER_TTL 64
/* What an ICMP error quotes of the packet it is about: its IP header and 8 bytes. */
#define ICMP_QUOTE_MAX (60 + 8)

/* The folded sum of the outer header's words that are the same for every packet of a
 * flow: TTL and protocol, source, destination. Never 0 (the TTL/protocol word is not). */
static __always_inline __u16 ipip_fixed_sum(__be32 saddr, __be32 daddr)
{
	__u32 sum = bpf_htons(XDPLB_IPIP_TTL << 8 | IPPROTO_IPIP);

	sum += (saddr & 0xffff) + (saddr >> 16) + (daddr & 0xffff) + (daddr >> 16);
	return csum_fold32(sum);
}

/* Whether the packet still fits its egress link once encapsulated. If not, *mtu gets
 * the link's MTU. Below XDPLB_ENCAP_MTU_FLOOR nothing is asked (see there). A failed
 * check (no such interface) counts as fitting: the redirect then fails as it would. */
static __always_inline int ipip_fits(struct xdp_md *ctx, const struct iphdr *ip, __u32 ifindex, __u32 *mtu)
{
	__u32 len = bpf_ntohs(ip->tot_len);

	if (len + sizeof(struct iphdr) <= XDPLB_ENCAP_MTU_FLOOR)
		return 1;
	/* The IP length given, not the frame's: a frame may carry Ethernet padding. */
	*mtu = len;
	return bpf_check_mtu(ctx, ifindex, mtu, sizeof(struct iphdr), 0) != BPF_MTU_CHK_RET_FRAG_NEEDED;
}

/* Puts an outer IPv4 header from flow->saddr to flow->daddr (the backend) before the
 * packet's own, which stays as it is, and a new Ethernet header before both. From the
 * inner header: TOS (DSCP and ECN pass through, RFC 6040's normal mode), DF (the outer
 * packet may be fragmented only where the client allowed it) and id (a datagram with DF
 * may carry any id, RFC 6864; one without it needs ids that differ from one datagram to
 * the next, which the client's do, where a constant would make every fragmented outer
 * packet of a backend look alike). Returns 0, or -1 without headroom, which XDP always
 * leaves (256 bytes). */
/* Makes room for an outer header of `size` bytes before the IP packet and writes a new
 * Ethernet header (next hop's MACs, EtherType `proto`) before it; returns where the outer
 * header goes (checked to fit the frame), or NULL without headroom, which XDP always
 * leaves (256 bytes). The old Ethernet header ends up under the outer header. */
static __always_inline void *push_outer_header(struct xdp_md *ctx, __u32 size, const __u8 *dmac,
					       const __u8 *smac, __be16 proto)
{
	struct ethhdr *eth;
	void *outer;

	if (bpf_xdp_adjust_head(ctx, -(int)size))
		return NULL;
	eth = (void *)(long)ctx->data;
	outer = eth + 1;
	if (outer + size > (void *)(long)ctx->data_end)
		return NULL;
	__builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, smac, ETH_ALEN);
	eth->h_proto = proto;
	return outer;
}

static __always_inline int ipip_encapsulate(struct xdp_md *ctx, const struct iphdr *inner,
					    const struct xdplb_flow *flow)
{
	__be16 first = bpf_htons(0x4500 | inner->tos), len = bpf_htons(bpf_ntohs(inner->tot_len) + sizeof(*inner));
	__be16 id = inner->id, frag = inner->frag_off & bpf_htons(IP_DF);
	struct iphdr *outer = push_outer_header(ctx, sizeof(*outer), flow->dmac, flow->smac, bpf_htons(ETH_P_IP));

	if (!outer)
		return -1;
	*(__be16 *)outer = first; /* version, header length, TOS */
	outer->tot_len = len;
	outer->id = id;
	outer->frag_off = frag;
	outer->ttl = XDPLB_IPIP_TTL;
	outer->protocol = IPPROTO_IPIP;
	outer->saddr = flow->saddr;
	outer->daddr = flow->daddr;
	outer->check = ~csum_fold32(flow->l4_csum_delta + first + len + id + frag);
	return 0;
}

/* Turns the frame, a packet too big for `mtu` once encapsulated, into ICMP
 * "fragmentation needed" (type 3 code 4) to its source from the address it was sent to,
 * with next-hop MTU mtu - 20 and the packet's IP header and first 8 bytes after it
 * quoted (RFC 792), to go back with XDP_TX: MACs swapped. DF and id 0: an atomic
 * datagram (RFC 6864) of at most 96 bytes. Returns 0, or -1 if the frame is not such a
 * packet (the caller checked it is) or the head cannot move (it always can). A global
 * function: the verifier walks it once, and only the context and scalars cross. */
__noinline int answer_frag_needed(struct xdp_md *ctx, __u32 mtu)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	__u8 client_mac[ETH_ALEN], own_mac[ETH_ALEN];
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct icmphdr *icmp;
	__u32 quote, sum, ip_sum;
	__be32 client, vip, rest;
	__be16 tot_len;
	__s64 quoted;
	long len;

	if ((void *)ip + ICMP_QUOTE_MAX > end)
		return -1;
	quote = ip->ihl * 4 + 8;
	/* The quote's sum, taken where it lies: it stays in place, behind the new headers. */
	quoted = bpf_csum_diff(NULL, 0, (__be32 *)ip, quote, 0);
	if (quoted < 0)
		return -1;
	__builtin_memcpy(client_mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(own_mac, eth->h_dest, ETH_ALEN);
	client = ip->saddr;
	vip = ip->daddr;

	if (bpf_xdp_adjust_head(ctx, -(int)(sizeof(struct iphdr) + sizeof(struct icmphdr))))
		return -1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	icmp = (void *)(ip + 1);
	if ((void *)(icmp + 1) > end)
		return -1;
	__builtin_memcpy(eth->h_dest, client_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, own_mac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);

	tot_len = bpf_htons(sizeof(*ip) + sizeof(*icmp) + quote);
	*(__be16 *)ip = bpf_htons(0x4500 | IPTOS_PREC_INTERNETCONTROL);
	ip->tot_len = tot_len;
	ip->id = 0;
	ip->frag_off = bpf_htons(IP_DF);
	ip->ttl = ICMP_ANSWER_TTL;
	ip->protocol = IPPROTO_ICMP;
	ip->saddr = vip;
	ip->daddr = client;
	ip_sum = bpf_htons(0x4500 | IPTOS_PREC_INTERNETCONTROL) + tot_len + bpf_htons(IP_DF) +
		 bpf_htons(ICMP_ANSWER_TTL << 8 | IPPROTO_ICMP) + (vip & 0xffff) + (vip >> 16) +
		 (client & 0xffff) + (client >> 16);
	ip->check = ~csum_fold32(ip_sum);

	rest = bpf_htonl((mtu - sizeof(struct iphdr)) & 0xffff); /* 16 bits unused, next-hop MTU */
	icmp->type = ICMP_DEST_UNREACH;
	icmp->code = ICMP_FRAG_NEEDED;
	icmp->rest = rest;
	sum = csum_fold32((__u32)quoted) + *(__u16 *)icmp + (rest & 0xffff) + (rest >> 16);
	icmp->checksum = ~csum_fold32(sum);

	/* Nothing past the quote. The frame's length as a number first: the verifier refuses
	 * 32-bit arithmetic on packet pointers, which the compiler would otherwise emit. */
	len = (long)end - (long)data;
	asm volatile("" : "+r"(len));
	if (bpf_xdp_adjust_tail(ctx, (int)(sizeof(*eth) + bpf_ntohs(tot_len) - len)))
		return -1;
	return 0;
}

#endif /* XDPLB_ENCAP_H */
