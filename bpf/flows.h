/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The flow table: open addressing with linear probing over the xdplb_flows array.
 *
 * A key lives in one of XDPLB_FLOW_PROBES consecutive slots from hash & mask. Slots
 * are never emptied: an expired or dead slot is simply taken over by a new key, and a
 * slot that was never used ends a search. Writers claim a slot by moving its sequence
 * number from even to odd with compare-and-swap, fill it, and make it even again;
 * readers copy what they need and check that the sequence did not move meanwhile.
 * With no free slot in the window, the least recently seen one is evicted (as an LRU
 * map would), so a new flow always gets in. A lookup that misses also notes where the
 * key would go, so creating a flow scans its window once.
 */
#ifndef XDPLB_FLOWS_H
#define XDPLB_FLOWS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "xdplb_abi.h"
#include "maps.h"

#define READ_ONCE_U32(x) (*(volatile __u32 *)&(x))
#define compiler_barrier() asm volatile("" ::: "memory")

static __always_inline __u32 now_ticks(const struct xdplb_config *cfg)
{
	return bpf_jiffies64() >> cfg->tick_shift;
}

static __always_inline __s32 ticks_since(__u32 now, __u32 then)
{
	return (__s32)(now - then);
}

/* Keys compare as two 64-bit words: every key is built from zeroed memory, so the
 * padding is zero too. */
static __always_inline int flow_key_equal(const struct xdplb_flow_key *a, const struct xdplb_flow_key *b)
{
	const __u64 *x = (const void *)a, *y = (const void *)b;

	return x[0] == y[0] && x[1] == y[1];
}

static __always_inline __u32 flow_expiry_ticks(const struct xdplb_config *cfg, __u8 proto, __u8 flags,
					       __u16 udp_timeout_s)
{
	if (proto != IPPROTO_TCP)
		return udp_timeout_s ? udp_timeout_s * cfg->ticks_per_s + cfg->touch_ticks : cfg->udp_expiry_ticks;
	/* A handshake nobody completes (a SYN flood, spoofed or not) or a flow reset before
	 * the backend closed holds its SNAT source only briefly. After the backend's FIN it
	 * may sit in TIME_WAIT, which a reset does not always end (RFC 1337, or a reset
	 * out of window): then the closing timeout and the record keep its tuple safe. */
	if ((flags & XDPLB_FLOW_HANDSHAKE) ||
	    (flags & (XDPLB_FLOW_RESET | XDPLB_FLOW_FIN_BACKEND)) == XDPLB_FLOW_RESET)
		return cfg->tcp_syn_expiry_ticks;
	return (flags & XDPLB_FLOW_CLOSING) ? cfg->tcp_closing_expiry_ticks : cfg->tcp_expiry_ticks;
}

/* A flow's forwarding mode, from its checksum fields (see struct xdplb_flow): full NAT
 * rewrites, dsr and ipip do not. */
static __always_inline int flow_rewrites(const struct xdplb_flow *flow)
{
	return flow->l3_csum_delta != 0;
}

/* Of a flow that does not rewrite: ipip (else dsr). */
static __always_inline int flow_encapsulates(const struct xdplb_flow *flow)
{
	return flow->l4_csum_delta != 0;
}

/* Whether a slot may be taken over by another key. */
static __always_inline int slot_expired(const struct xdplb_config *cfg, const struct xdplb_flow_slot *s,
					__u32 now)
{
	__u32 expiry;

	if (s->flow.flags & XDPLB_FLOW_DEAD)
		return 1;
	expiry = flow_expiry_ticks(cfg, s->key.proto, s->flow.flags, s->flow.udp_timeout_s);
	/* Signed: another CPU may have stamped the slot a tick after this CPU read the clock. */
	return expiry && ticks_since(now, s->last_seen) > (__s32)expiry;
}

#define FLOW_PLACE_NONE 0xffffffffu
#define FLOW_PLACE_EVICTS 1u

/* Tracks the best slot for a new key while a window is scanned: the first free one
 * (never used, expired or dead), else the least recently seen (as an LRU map would). */
struct place_search {
	struct flow_place best;
	__u32 age;
	int free;
};

static __always_inline void place_search_init(struct place_search *ps)
{
	ps->best.index = FLOW_PLACE_NONE;
	ps->best.seq = FLOW_PLACE_NONE;
	ps->age = 0;
	ps->free = 0;
}

static __always_inline void place_take(struct place_search *ps, __u32 index, __u32 seq, int free, __u32 age)
{
	ps->best.index = index;
	ps->best.seq = free ? seq : seq | FLOW_PLACE_EVICTS;
	ps->free = free;
	ps->age = age;
}

/* A used slot of the window, not holding the key. */
static __always_inline void place_consider(struct place_search *ps, const struct xdplb_config *cfg,
					   const struct xdplb_flow_slot *s, __u32 index, __u32 seq, __u32 now)
{
	__u32 age;

	if (ps->free)
		return;
	if (slot_expired(cfg, s, now)) {
		place_take(ps, index, seq, 1, 0);
		return;
	}
	age = ticks_since(now, s->last_seen) > 0 ? now - s->last_seen : 0;
	if (ps->best.index == FLOW_PLACE_NONE || age > ps->age)
		place_take(ps, index, seq, 0, age);
}

/* Finds key's slot and copies its flow into *flow (consistently). NULL if absent.
 * With place: on a hit, the slot found; on a miss, where the key would be stored, so
 * that storing a new flow needs no second pass over the window. */
static __always_inline struct xdplb_flow_slot *flow_find(const struct xdplb_config *cfg,
							 const struct xdplb_flow_key *key, __u32 hash,
							 struct xdplb_flow *flow, __u32 now,
							 struct flow_place *place)
{
	struct place_search ps;

	place_search_init(&ps);
#pragma clang loop unroll(disable)
	for (__u32 probe = 0; probe < XDPLB_FLOW_PROBES; probe++) {
		__u32 index = (hash + probe) & cfg->flow_mask, seq;
		struct xdplb_flow_slot *s = bpf_map_lookup_elem(&xdplb_flows, &index);

		if (!s)
			break;
		seq = READ_ONCE_U32(s->seq);
		compiler_barrier();
		if (seq & 1)
			continue;
		if (!s->key.proto) { /* never used: the key is not further on either */
			if (place && !ps.free)
				place_take(&ps, index, seq, 1, 0);
			break;
		}
		if (flow_key_equal(&s->key, key)) {
			*flow = s->flow;
			compiler_barrier();
			if (READ_ONCE_U32(s->seq) == seq && !(flow->flags & XDPLB_FLOW_DEAD)) {
				if (place) {
					place->index = index;
					place->seq = seq;
				}
				return s;
			}
		}
		if (place)
			place_consider(&ps, cfg, s, index, seq, now);
	}
	if (place)
		*place = ps.best;
	return NULL;
}

/* Stores key -> flow in the slot chosen by a search, if nobody wrote to it since.
 * Returns 0 or -EBUSY. */
static __always_inline int flow_claim(const struct flow_place *place, const struct xdplb_flow_key *key,
				      const struct xdplb_flow *flow, __u32 now)
{
	__u32 index = place->index, seq = place->seq & ~FLOW_PLACE_EVICTS;
	struct xdplb_flow_slot *s = bpf_map_lookup_elem(&xdplb_flows, &index);

	if (!s || __sync_val_compare_and_swap(&s->seq, seq, seq + 1) != seq)
		return -EBUSY;
	s->key = *key;
	s->flow = *flow;
	s->last_seen = now;
	__sync_fetch_and_add(&s->seq, 1);
	return 0;
}

enum flow_store_mode {
	FLOW_STORE_ANY,       /* replace a live entry of the same key */
	FLOW_STORE_EXCLUSIVE, /* fail if a live entry has the key (unless syn may take it over) */
};

/* What flow_store did besides storing. */
enum flow_store_outcome {
	FLOW_STORE_EVICTED = 1 << 0, /* a live flow (another key) had to go */
	FLOW_STORE_REUSED = 1 << 1,  /* a closed flow of the same key was taken over */
};

/* Whether a new SYN may take over the live backend-side entry s (same tuple: backend,
 * SNAT source) of an earlier flow that the backend closed (its FIN) and the client
 * closed too (its FIN or a RST): the backend then accepts the SYN the way a TIME_WAIT
 * socket does (RFC 6191, Linux's tcp_timewait_state_process), with a newer timestamp
 * when both sides use them, else a sequence number past the old connection's. Open,
 * half-closed and handshaking flows are never taken, nor a flow reset before the
 * backend's FIN (the reset may not have reached or convinced the backend): it expires
 * after timeouts.tcp_syn. The record is written before the FIN flag is set (fetch-and-or, a full barrier
 * on x86 and arm64); a claim that reads a record being updated can only see older
 * values, which makes the check stricter, not looser. */
static __always_inline int tuple_reusable(const struct xdplb_flow_slot *s, __u32 index,
					  const struct syn_info *syn)
{
	struct xdplb_flow_end *end;
	__u8 flags = s->flow.flags;

	if (!(flags & XDPLB_FLOW_FIN_BACKEND) || !(flags & (XDPLB_FLOW_FIN_CLIENT | XDPLB_FLOW_RESET)))
		return 0;
	end = bpf_map_lookup_elem(&xdplb_flow_ends, &index);
	if (!end)
		return 0;
	if ((flags & XDPLB_FLOW_END_TS) && syn->has_ts)
		return (__s32)(syn->tsval - READ_ONCE_U32(end->ts_recent)) > 0;
	return (__s32)(syn->seq - READ_ONCE_U32(end->rcv_nxt)) > 0;
}

/* Stores key -> flow. Returns 0, -EEXIST (exclusive and the key is live), or -EBUSY
 * (another CPU took the chosen slot first); *outcome gets enum flow_store_outcome bits.
 * An exclusive store takes over a live entry of the key that tuple_reusable() allows
 * for syn (never a UDP entry: they carry no TCP state), copying the entry's flow into
 * *displaced first. */
static __always_inline int flow_store(const struct xdplb_config *cfg, const struct xdplb_flow_key *key,
				      __u32 hash, const struct xdplb_flow *flow, __u32 now,
				      enum flow_store_mode mode, const struct syn_info *syn,
				      struct xdplb_flow *displaced, __u32 *outcome)
{
	struct place_search ps;
	__u32 reused = 0;

	place_search_init(&ps);
	/* The first lines of each probe repeat flow_find's on purpose: a helper returning the
	 * slot and its index through a pointer made the verifier walk half as much again. */
#pragma clang loop unroll(disable)
	for (__u32 probe = 0; probe < XDPLB_FLOW_PROBES; probe++) {
		__u32 index = (hash + probe) & cfg->flow_mask, seq;
		struct xdplb_flow_slot *s = bpf_map_lookup_elem(&xdplb_flows, &index);

		if (!s)
			break;
		seq = READ_ONCE_U32(s->seq);
		if (seq & 1)
			continue;
		if (!s->key.proto) { /* never used: the key is not further on either */
			if (!ps.free)
				place_take(&ps, index, seq, 1, 0);
			break;
		}
		if (flow_key_equal(&s->key, key) && !slot_expired(cfg, s, now)) {
			if (mode == FLOW_STORE_EXCLUSIVE) {
				if (!tuple_reusable(s, index, syn))
					return -EEXIST;
				/* Checked by the claim: a slot rewritten meanwhile changed its seq. */
				*displaced = s->flow;
				reused = FLOW_STORE_REUSED;
			}
			place_take(&ps, index, seq, 1, 0);
			break;
		}
		/* An exclusive store still checks the rest of the window for the key. */
		place_consider(&ps, cfg, s, index, seq, now);
	}
	if (flow_claim(&ps.best, key, flow, now))
		return -EBUSY;
	*outcome = (ps.best.seq & FLOW_PLACE_EVICTS ? FLOW_STORE_EVICTED : 0) | reused;
	return 0;
}

/* The key of the other direction of a flow, from one direction's entry. */
static __always_inline void flow_partner_key(const struct xdplb_flow *flow, __u8 proto,
					     struct xdplb_flow_key *partner)
{
	partner->saddr = flow->daddr;
	partner->daddr = flow->saddr;
	partner->sport = flow->dport;
	partner->dport = flow->sport;
	partner->proto = proto;
}

/* Whether `other`, found at a flow's partner key, is that flow's own other entry: it
 * rewrites back to the key the flow was found with. A connection that took the partner
 * key over meanwhile (the client reused its port, so a new flow with a new SNAT source
 * holds the client side) is not, and a late segment of the old one must leave it alone. */
static __always_inline int flow_is_partner(const struct xdplb_flow *other, const struct xdplb_flow_key *key)
{
	return other->saddr == key->daddr && other->daddr == key->saddr &&
	       other->sport == key->dport && other->dport == key->sport;
}

#endif /* XDPLB_FLOWS_H */
