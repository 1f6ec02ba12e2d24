/* SPDX-License-Identifier: GPL-2.0-only */
/* The flow hash that picks a Maglev slot: MurmurHash3 (32-bit) over the 5-tuple in host
 * byte order, seeded from the configuration so every node with the same configuration
 * sends a flow to the same backend. Mirrored in src/xdplb/hashing.py. */
#ifndef XDPLB_HASH_H
#define XDPLB_HASH_H

#include <linux/types.h>
#include <bpf/bpf_endian.h>
#include "xdplb_abi.h"

static __always_inline __u32 rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 murmur_mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51;
	k = rotl32(k, 15);
	k *= 0x1b873593;
	h ^= k;
	h = rotl32(h, 13);
	return h * 5 + 0xe6546b64;
}

static __always_inline __u32 murmur_finish(__u32 h, __u32 len)
{
	h ^= len;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 flow_hash(const struct xdplb_flow_key *k, __u32 seed)
{
	__u32 h = seed;

	h = murmur_mix(h, bpf_ntohl(k->saddr));
	h = murmur_mix(h, bpf_ntohl(k->daddr));
	h = murmur_mix(h, (__u32)bpf_ntohs(k->sport) << 16 | bpf_ntohs(k->dport));
	h = murmur_mix(h, k->proto);
	return murmur_finish(h, 16);
}

#endif /* XDPLB_HASH_H */
