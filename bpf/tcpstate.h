/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * What the data plane follows of a TCP connection, so that a SNAT source can be handed
 * to a new flow as soon as the backend would accept it: whether the handshake completed,
 * who sent a FIN or a RST, and, once the backend has sent its FIN, what the backend knows
 * of the client (struct xdplb_flow_end). Only SYNs, FINs, RSTs, the handshake's last ACK
 * and the backend's segments after its FIN come here: an established packet pays one
 * branch on flags it has already read.
 *
 * Both entries of a flow carry the same state bits. They change by compare-and-swap on
 * the 32-bit word that holds the flags, after checking that the slot still holds the
 * key: a slot taken over by another flow meanwhile changed that word (a claim rewrites
 * it), so the swap fails instead of marking the newcomer. Readers copy flags without the
 * slot's sequence lock, which is fine: any value they see is a state the flow was in.
 */
#ifndef XDPLB_TCPSTATE_H
#define XDPLB_TCPSTATE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "xdplb_abi.h"
#include "maps.h"
#include "parse.h"
#include "flows.h"
#include "hash.h"
#include "packet.h"

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10
#define TCP_FLAGS_OFFSET 13

#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_TIMESTAMP 8
#define TCPOLEN_TIMESTAMP 10
#define TCP_MAX_OPTIONS 40
#define TCP_MAX_HEADER_OFFSET 128

/* Where the flags and hop_gen bytes sit in the 32-bit word that holds them (flags,
 * hop_gen, udp_timeout_s). */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define FLOW_FLAGS_SHIFT 0
#define FLOW_HOP_GEN_SHIFT 8
#else
#define FLOW_FLAGS_SHIFT 24
#define FLOW_HOP_GEN_SHIFT 16
#endif

static __always_inline __u32 load_be32_bytes(const __u8 *p)
{
	return (__u32)p[0] << 24 | (__u32)p[1] << 16 | (__u32)p[2] << 8 | p[3];
}

/* Finds the timestamp option of the TCP header at `offset` in the frame and copies it into
 * the per-CPU scratch space (scratch.ts). Returns 1 if found, else 0. A global function:
 * the verifier walks its option loop once, whoever calls it. */
__noinline int tcp_timestamps(struct xdp_md *ctx, __u32 offset)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct new_flow_scratch *scratch;
	__u32 zero = 0, len, next = 0;
	struct tcphdr *tcp;
	__u8 *opt;

	/* Ethernet and IPv4 with options; the bound also lets the verifier follow the pointer. */
	if (offset > TCP_MAX_HEADER_OFFSET)
		return 0;
	tcp = data + offset;
	if ((void *)(tcp + 1) > end)
		return 0;
	len = tcp->doff * 4;
	if (len <= sizeof(*tcp))
		return 0;
	len -= sizeof(*tcp);
	opt = (void *)(tcp + 1);
	scratch = bpf_map_lookup_elem(&xdplb_scratch, &zero);
	if (!scratch)
		return 0;
	/* Byte by byte, acting where the next option starts: a loop that jumps by option
	 * lengths would give the verifier a path per combination of lengths. */
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < TCP_MAX_OPTIONS; i++) {
		__u8 *p = opt + i;

		if (i >= len)
			break;
		if (i != next)
			continue;
		if ((void *)(p + 2) > end || p[0] == TCPOPT_EOL)
			break;
		if (p[0] == TCPOPT_NOP) {
			next = i + 1;
			continue;
		}
		if (p[1] < 2)
			break;
		if (p[0] == TCPOPT_TIMESTAMP) {
			if (p[1] != TCPOLEN_TIMESTAMP || (void *)(p + TCPOLEN_TIMESTAMP) > end)
				break;
			scratch->ts.tsval = load_be32_bytes(p + 2);
			scratch->ts.tsecr = load_be32_bytes(p + 6);
			return 1;
		}
		next = i + p[1];
	}
	return 0;
}

/* Sets and clears state bits of the slot holding key. Returns 0, or -1 if the slot no
 * longer holds the key (or kept changing). */
static __always_inline int flow_flags_update(struct xdplb_flow_slot *s, const struct xdplb_flow_key *key,
					     __u8 set, __u8 clear)
{
	__u32 *word = (__u32 *)&s->flow.flags;

#pragma clang loop unroll(disable)
	for (int attempt = 0; attempt < 3; attempt++) {
		__u32 seq = READ_ONCE_U32(s->seq), old, new;

		compiler_barrier();
		old = READ_ONCE_U32(*word);
		if ((seq & 1) || !flow_key_equal(&s->key, key) || READ_ONCE_U32(s->seq) != seq)
			return -1;
		new = (old | (__u32)set << FLOW_FLAGS_SHIFT) & ~((__u32)clear << FLOW_FLAGS_SHIFT);
		if (new == old || __sync_val_compare_and_swap(word, old, new) == old)
			return 0;
	}
	return -1;
}

static __always_inline int newer32(__u32 a, __u32 b)
{
	return (__s32)(a - b) > 0;
}

/* A segment from the backend after its FIN: its ACK is the next sequence number it expects
 * from the client, its TSecr the newest timestamp it holds (what TIME_WAIT will compare
 * a new SYN with). `fresh` starts the record of a flow whose backend just sent its FIN.
 * Returns XDPLB_FLOW_END_TS if the segment carries timestamps. */
static __always_inline __u8 note_backend_end(struct xdp_md *ctx, const struct iphdr *ip,
					     const struct tcphdr *tcp, __u32 index, int fresh)
{
	__u32 zero = 0, ack = bpf_ntohl(tcp->ack_seq), ts = 0;
	struct new_flow_scratch *scratch = bpf_map_lookup_elem(&xdplb_scratch, &zero);
	struct xdplb_flow_end *end = bpf_map_lookup_elem(&xdplb_flow_ends, &index);
	int has_ts;

	if (!scratch || !end)
		return 0;
	has_ts = tcp_timestamps(ctx, sizeof(struct ethhdr) + ip->ihl * 4);
	if (has_ts)
		ts = scratch->ts.tsecr;
	if (fresh) {
		end->ts_recent = ts;
		end->rcv_nxt = ack;
	} else {
		if (newer32(ack, end->rcv_nxt))
			end->rcv_nxt = ack;
		if (has_ts && newer32(ts, end->ts_recent))
			end->ts_recent = ts;
	}
	return has_ts ? XDPLB_FLOW_END_TS : 0;
}

/* The client's FIN after the backend's: what the backend will know once it gets it (the
 * sequence number past the FIN, the FIN's timestamp), kept at the backend-side slot. */
static __always_inline void note_client_fin(struct xdp_md *ctx, const struct iphdr *ip,
					    const struct tcphdr *tcp, __u32 index)
{
	__u32 zero = 0, l4 = ip->ihl * 4, payload, end_seq;
	struct new_flow_scratch *scratch = bpf_map_lookup_elem(&xdplb_scratch, &zero);
	struct xdplb_flow_end *end = bpf_map_lookup_elem(&xdplb_flow_ends, &index);

	if (!scratch || !end)
		return;
	payload = bpf_ntohs(ip->tot_len) - l4 - tcp->doff * 4;
	end_seq = bpf_ntohl(tcp->seq) + payload + 1;
	if (newer32(end_seq, end->rcv_nxt))
		end->rcv_nxt = end_seq;
	if (tcp_timestamps(ctx, sizeof(struct ethhdr) + l4) && newer32(scratch->ts.tsval, end->ts_recent))
		end->ts_recent = scratch->ts.tsval;
}

/* Follows a TCP segment of a known flow (found in `slot`, at pkt->place.index, and
 * copied into *flow): RST and FIN bits, the end of the handshake, the backend's record
 * after its FIN. The other entry of the flow gets the same state bits. */
static __noinline void track_tcp_state(struct xdp_md *ctx, const struct xdplb_config *cfg,
				       const struct packet *pkt, struct xdplb_flow_slot *slot,
				       const struct xdplb_flow *flow)
{
	__u8 flags = flow->flags, tcp_flags = pkt->tcp_flags, set = 0, clear = 0;
	int from_backend = flags & XDPLB_FLOW_REPLY;
	struct xdplb_flow_key partner = {};
	struct flow_place where = {};
	struct xdplb_flow other;
	struct xdplb_flow_slot *s;

	if (!pkt->tcp)
		return;
	if (tcp_flags & TCP_FLAG_RST)
		set |= XDPLB_FLOW_CLOSING | XDPLB_FLOW_RESET;
	if (tcp_flags & TCP_FLAG_FIN) {
		set |= XDPLB_FLOW_CLOSING;
		/* A FIN without an ACK tells nothing of what the backend expects next. */
		if (!from_backend)
			set |= XDPLB_FLOW_FIN_CLIENT;
		else if (tcp_flags & TCP_FLAG_ACK)
			set |= XDPLB_FLOW_FIN_BACKEND;
	}
	if ((flags & XDPLB_FLOW_HANDSHAKE) && !from_backend &&
	    (tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_RST | TCP_FLAG_ACK)) == TCP_FLAG_ACK)
		clear |= XDPLB_FLOW_HANDSHAKE;
	/* The record comes first: FIN_BACKEND, once visible, vouches for it. */
	if (from_backend && (tcp_flags & TCP_FLAG_ACK) && ((flags | set) & XDPLB_FLOW_FIN_BACKEND))
		set |= note_backend_end(ctx, pkt->ip, pkt->tcp, pkt->place.index, !(flags & XDPLB_FLOW_FIN_BACKEND));
	if (!(set & ~flags) && !(clear & flags) && !(!from_backend && (tcp_flags & TCP_FLAG_FIN)))
		return;
	flow_flags_update(slot, &pkt->key, set, clear);
	if (!flow_rewrites(flow)) /* dsr or ipip: no other entry */
		return;
	flow_partner_key(flow, IPPROTO_TCP, &partner);
	s = flow_find(cfg, &partner, flow_hash(&partner, cfg->flow_seed), &other, now_ticks(cfg), &where);
	if (!s || !flow_is_partner(&other, &pkt->key))
		return;
	if (!from_backend && (tcp_flags & TCP_FLAG_FIN) && (other.flags & XDPLB_FLOW_FIN_BACKEND))
		note_client_fin(ctx, pkt->ip, pkt->tcp, where.index);
	flow_flags_update(s, &partner, set, clear);
}

#endif /* XDPLB_TCPSTATE_H */
