// SPDX-License-Identifier: GPL-2.0-only
/*
 * xdplb's decapsulator, for the backends of services in ipip mode: an IPv4-in-IPv4 or
 * IPv6-in-IPv6 packet addressed to this host loses its outer header here and its inner
 * packet goes on to the kernel as if it had arrived as it is. Everything else passes
 * untouched (an outer IPv6 header with extension headers too: the balancer adds none).
 *
 * "Addressed to this host" means: the outer destination is in xdplb_dc_local, which the
 * control plane fills with this host's addresses. The kernel's own test (a route of
 * type local) is out of reach: bpf_fib_lookup refuses to answer where forwarding is
 * off, as it is on most backends. Taking any outer destination would decapsulate what a
 * router or a bridge port merely passes on.
 *
 * Beside a kernel ipip module this program still decapsulates first (XDP runs before
 * the stack): those packets then arrive on this interface, never on tunl0, and what it
 * passes (fragments, other hosts' packets) reaches the module as before.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "decap_abi.h"
#include "parse.h"
#include "csum.h"
#include <linux/ipv6.h>

char LICENSE[] SEC("license") = "GPL";

#define IP_HEADER_MAX_BYTES 60 /* ihl 15 */

/* This host's addresses (the value is unused), written by `xdplb decap attach`: IPv6 ones
 * as they are, IPv4 ones mapped (::ffff:a.b.c.d). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XDPLB_DC_MAX_LOCAL);
	__type(key, struct xdplb_dc_addr);
	__type(value, __u8);
} xdplb_dc_local SEC(".maps");

static __always_inline int is_local4(__be32 addr)
{
	struct xdplb_dc_addr key = { .w = { 0, 0, bpf_htonl(0xffff), addr } };

	return bpf_map_lookup_elem(&xdplb_dc_local, &key) != NULL;
}

/* Packets per outcome, indexed by enum xdplb_dc_counter. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDPLB_DC_MAX);
	__type(key, __u32);
	__type(value, __u64);
} xdplb_dc_stats SEC(".maps");

static __always_inline int counted(__u32 counter, int action)
{
	__u64 *value = bpf_map_lookup_elem(&xdplb_dc_stats, &counter);

	if (value)
		*value += 1;
	return action;
}

/* The kernel drops a packet whose outer checksum is wrong; decapsulating it would let
 * its inner packet through. A valid header sums to 0xffff, one's complement zero: taking
 * it away also leaves a CHECKSUM_COMPLETE sum, which generic XDP keeps, still right.
 * Copied to the stack first, where the verifier knows the length is there. */
static __always_inline int ip_checksum_ok(struct xdp_md *ctx, __u32 offset, __u32 len)
{
	__u8 header[IP_HEADER_MAX_BYTES] = {};
	__s64 sum;

	if (len < sizeof(struct iphdr) || len > sizeof(header) || bpf_xdp_load_bytes(ctx, offset, header, len))
		return 0;
	sum = bpf_csum_diff(0, 0, (void *)header, len, 0);
	if (sum < 0)
		return 0;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return sum == 0xffff;
}

/* The inner header must be complete and its length within the outer payload: bytes past
 * the outer total length are the frame's padding, which the kernel would trim away
 * before any tunnel saw the packet. */
static __always_inline int inner_ok(const struct iphdr *inner, const void *end, __u32 outer_payload)
{
	__u32 len;

	if ((void *)(inner + 1) > end || inner->version != 4 || inner->ihl < 5)
		return 0;
	len = bpf_ntohs(inner->tot_len);
	return len >= inner->ihl * 4 && len <= outer_payload;
}

#define ECN_MASK 3
#define ECN_ECT_1 1
#define ECN_ECT_0 2
#define ECN_CE 3

/* RFC 6040's decapsulation (normal mode), as the kernel's tunnels apply it: the balancer
 * copied the inner ECN field to the outer header, so a router between it and here that
 * signals congestion marks the outer one (CE), and the mark must reach the inner packet
 * or the endpoints never slow down. Returns 0, or -1 for a packet to drop (CE on an inner
 * packet that is not ECN-capable). */
static __always_inline int ecn_decapsulate(const struct iphdr *outer, struct iphdr *inner)
{
	__u8 out = outer->tos & ECN_MASK, in = inner->tos & ECN_MASK, tos;
	__u16 old_word, new_word;

	if (out == ECN_CE) {
		if (!in)
			return -1;
		tos = inner->tos | ECN_CE;
	} else if (out == ECN_ECT_1 && in == ECN_ECT_0) {
		tos = (inner->tos & ~ECN_MASK) | ECN_ECT_1;
	} else {
		return 0;
	}
	/* tos shares a 16-bit word of the checksum with version and ihl. */
	old_word = *(__u16 *)inner;
	inner->tos = tos;
	new_word = *(__u16 *)inner;
	inner->check = csum_apply(inner->check, csum_fold32(csum_delta16(0, old_word, new_word)));
	return 0;
}

/* RFC 6040 for IPv6: the ECN field is the low two bits of the traffic class, bits 20-21
 * of the header's first word; no header checksum to mend. */
static __always_inline int ecn_decapsulate6(const struct ipv6hdr *outer, struct ipv6hdr *inner)
{
	__u32 word = bpf_ntohl(*(__be32 *)inner), out = (bpf_ntohl(*(__be32 *)outer) >> 20) & ECN_MASK;
	__u32 in = (word >> 20) & ECN_MASK, ecn;

	if (out == ECN_CE) {
		if (!in)
			return -1;
		ecn = ECN_CE;
	} else if (out == ECN_ECT_1 && in == ECN_ECT_0) {
		ecn = ECN_ECT_1;
	} else {
		return 0;
	}
	*(__be32 *)inner = bpf_htonl((word & ~((__u32)ECN_MASK << 20)) | ecn << 20);
	return 0;
}

/* Takes the outer header (outer_len bytes after the Ethernet header) away: the Ethernet
 * header moves to just before the inner one, and the inner packet goes to the kernel. */
static __always_inline int strip_outer(struct xdp_md *ctx, struct ethhdr *eth, __u32 outer_len)
{
	struct ethhdr saved;

	__builtin_memcpy(&saved, eth, sizeof(saved));
	if (bpf_xdp_adjust_head(ctx, outer_len))
		return counted(XDPLB_DC_ERROR, XDP_PASS);
	eth = (void *)(long)ctx->data;
	if ((void *)(eth + 1) > (void *)(long)ctx->data_end)
		return counted(XDPLB_DC_ERROR, XDP_DROP); /* unreachable: the inner header is there */
	__builtin_memcpy(eth, &saved, sizeof(saved));
	return counted(XDPLB_DC_DECAPSULATED, XDP_PASS);
}

static __always_inline int decapsulate6(struct xdp_md *ctx, struct ethhdr *eth)
{
	void *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *outer = (void *)(eth + 1), *inner = (void *)(outer + 1);
	struct xdplb_dc_addr key;
	__u32 payload;

	if ((void *)(outer + 1) > end || outer->version != 6)
		return counted(XDPLB_DC_MALFORMED, XDP_PASS);
	if (outer->nexthdr != IPPROTO_IPV6)
		return counted(XDPLB_DC_NOT_IPIP, XDP_PASS);
	payload = bpf_ntohs(outer->payload_len);
	if ((void *)inner + payload > end)
		return counted(XDPLB_DC_MALFORMED, XDP_PASS);
	__builtin_memcpy(key.w, &outer->daddr, sizeof(key.w));
	if (!bpf_map_lookup_elem(&xdplb_dc_local, &key))
		return counted(XDPLB_DC_NOT_LOCAL, XDP_PASS);
	/* The inner packet complete, and within the outer payload (past it: padding). */
	if ((void *)(inner + 1) > end || inner->version != 6 ||
	    sizeof(*inner) + bpf_ntohs(inner->payload_len) > payload)
		return counted(XDPLB_DC_INNER_MALFORMED, XDP_PASS);
	if (ecn_decapsulate6(outer, inner))
		return counted(XDPLB_DC_ECN_DROP, XDP_DROP);
	return strip_outer(ctx, eth, sizeof(struct ipv6hdr));
}

SEC("xdp")
int xdplb_decap(struct xdp_md *ctx)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	struct ethhdr *eth;
	struct iphdr *outer, *inner;
	__u32 outer_len;
	int proto = parse_ethhdr(&c, &eth);

	if (proto == bpf_htons(ETH_P_IPV6))
		return decapsulate6(ctx, eth);
	if (proto != bpf_htons(ETH_P_IP))
		return counted(XDPLB_DC_NOT_IPIP, XDP_PASS);
	outer = c.pos;
	if ((void *)(outer + 1) > c.end)
		return counted(XDPLB_DC_MALFORMED, XDP_PASS);
	if (outer->protocol != IPPROTO_IPIP)
		return counted(XDPLB_DC_NOT_IPIP, XDP_PASS);
	if (parse_iphdr(&c, &outer) < 0 || !ip_checksum_ok(ctx, sizeof(*eth), outer->ihl * 4))
		return counted(XDPLB_DC_MALFORMED, XDP_PASS);
	if (!is_local4(outer->daddr))
		return counted(XDPLB_DC_NOT_LOCAL, XDP_PASS);
	if (ip_is_fragment(outer))
		return counted(XDPLB_DC_FRAGMENT, XDP_PASS);
	outer_len = outer->ihl * 4;
	inner = c.pos;
	if (!inner_ok(inner, c.end, bpf_ntohs(outer->tot_len) - outer_len))
		return counted(XDPLB_DC_INNER_MALFORMED, XDP_PASS);
	if ((void *)(inner + 1) > c.end) /* checked in inner_ok, again where the verifier sees it */
		return counted(XDPLB_DC_INNER_MALFORMED, XDP_PASS);
	if (ecn_decapsulate(outer, inner))
		return counted(XDPLB_DC_ECN_DROP, XDP_DROP);

	/* Options or not, the outer header goes as a whole. */
	return strip_outer(ctx, eth, outer_len);
}
