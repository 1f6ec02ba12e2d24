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
 * map would), so a new flow always gets in.
 */
#ifndef XDPLB_FLOWS_H
#define XDPLB_FLOWS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "xdplb_abi.h"
#include "maps.h"

#define READ_ONCE_U32(x) (*(volatile __u32 *)&(x))
#define compiler_barrier() asm volatile("" ::: "memory")

static __always_inline __u32 now_ticks(void)
{
	return bpf_ktime_get_coarse_ns() >> XDPLB_TICK_SHIFT;
}

static __always_inline __s32 ticks_since(__u32 now, __u32 then)
{
	return (__s32)(now - then);
}

static __always_inline int flow_key_equal(const struct xdplb_flow_key *a, const struct xdplb_flow_key *b)
{
	return a->saddr == b->saddr && a->daddr == b->daddr && a->sport == b->sport &&
	       a->dport == b->dport && a->proto == b->proto;
}

static __always_inline __u64 flow_timeout_ns(const struct xdplb_config *cfg, __u8 proto, __u8 flags)
{
	if (proto != IPPROTO_TCP)
		return cfg->udp_timeout_ns;
	return (flags & XDPLB_FLOW_CLOSING) ? cfg->tcp_closing_timeout_ns : cfg->tcp_timeout_ns;
}

/* Whether a slot may be taken over by another key. */
static __always_inline int slot_expired(const struct xdplb_config *cfg, const struct xdplb_flow_slot *s,
					__u32 now)
{
	__u64 timeout = flow_timeout_ns(cfg, s->key.proto, s->flow.flags);

	if (s->flow.flags & XDPLB_FLOW_DEAD)
		return 1;
	/* Signed: another CPU may have stamped the slot a tick after this CPU read the clock. */
	return timeout && ticks_since(now, s->last_seen) > (__s32)((timeout >> XDPLB_TICK_SHIFT) + XDPLB_TOUCH_TICKS);
}

/* Finds key's slot and copies its flow into *flow (consistently). NULL if absent. */
static __always_inline struct xdplb_flow_slot *flow_find(const struct xdplb_config *cfg,
							 const struct xdplb_flow_key *key, __u32 hash,
							 struct xdplb_flow *flow)
{
#pragma clang loop unroll(disable)
	for (__u32 probe = 0; probe < XDPLB_FLOW_PROBES; probe++) {
		__u32 index = (hash + probe) & cfg->flow_mask, seq;
		struct xdplb_flow_slot *s = bpf_map_lookup_elem(&xdplb_flows, &index);

		if (!s)
			return NULL;
		seq = READ_ONCE_U32(s->seq);
		compiler_barrier();
		if (seq & 1)
			continue;
		if (!s->key.proto)
			return NULL;
		if (!flow_key_equal(&s->key, key))
			continue;
		*flow = s->flow;
		compiler_barrier();
		if (READ_ONCE_U32(s->seq) != seq || (flow->flags & XDPLB_FLOW_DEAD))
			continue;
		return s;
	}
	return NULL;
}

enum flow_store_mode {
	FLOW_STORE_ANY,       /* replace a live entry of the same key */
	FLOW_STORE_EXCLUSIVE, /* fail if a live entry has the key */
};

/* Stores key -> flow. Returns 0, -EEXIST (exclusive and the key is live), or -EBUSY
 * (another CPU took the chosen slot first). Sets *evicted when a live flow had to go. */
static __always_inline int flow_store(const struct xdplb_config *cfg, const struct xdplb_flow_key *key,
				      __u32 hash, const struct xdplb_flow *flow, __u32 now,
				      enum flow_store_mode mode, int *evicted)
{
	struct xdplb_flow_slot *victim = NULL;
	__u32 victim_seq = 0, victim_age = 0;
	int reusable = 0;

#pragma clang loop unroll(disable)
	for (__u32 probe = 0; probe < XDPLB_FLOW_PROBES; probe++) {
		__u32 index = (hash + probe) & cfg->flow_mask, seq, age;
		struct xdplb_flow_slot *s = bpf_map_lookup_elem(&xdplb_flows, &index);

		if (!s)
			break;
		seq = READ_ONCE_U32(s->seq);
		if (seq & 1)
			continue;
		if (!s->key.proto) { /* never used: the key is not further on either */
			if (!reusable) {
				victim = s;
				victim_seq = seq;
				reusable = 1;
			}
			break;
		}
		if (flow_key_equal(&s->key, key) && !slot_expired(cfg, s, now)) {
			if (mode == FLOW_STORE_EXCLUSIVE)
				return -EEXIST;
			victim = s;
			victim_seq = seq;
			reusable = 1;
			break;
		}
		if (reusable)
			continue;
		if (slot_expired(cfg, s, now)) {
			victim = s;
			victim_seq = seq;
			reusable = 1;
			continue; /* an exclusive store still checks the rest of the window */
		}
		age = ticks_since(now, s->last_seen) > 0 ? now - s->last_seen : 0;
		if (!victim || age > victim_age) {
			victim = s;
			victim_seq = seq;
			victim_age = age;
		}
	}
	if (!victim)
		return -EBUSY;
	if (__sync_val_compare_and_swap(&victim->seq, victim_seq, victim_seq + 1) != victim_seq)
		return -EBUSY;
	victim->key = *key;
	victim->flow = *flow;
	victim->last_seen = now;
	__sync_fetch_and_add(&victim->seq, 1);
	*evicted = !reusable;
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

#endif /* XDPLB_FLOWS_H */
