/* SPDX-License-Identifier: GPL-2.0-only */
/* The flow hash: the 5-tuple in host byte order, seeded. With xdplb_config.hash_seed it
 * picks a Maglev slot, so every node with the same configuration sends a flow to the same
 * backend; with flow_seed, a flow table slot. And the service table's hash. Mirrored in
 * src/xdplb/hashing.py. */
#ifndef XDPLB_HASH_H
#define XDPLB_HASH_H

#include <linux/types.h>
#include <bpf/bpf_endian.h>
#include "xdplb_abi.h"

/* SplitMix64's finalizer (Steele, Lea, Flood; constants from Vigna's splitmix64.c):
 * every input bit flips each output bit with probability about one half. */
static __always_inline __u64 mix64(__u64 x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return x;
}

/* Two 64-bit words of a tuple folded into one and mixed: three multiplications, half
 * the latency of MurmurHash3 over four 32-bit words. */
static __always_inline __u32 tuple_hash(__u64 addrs, __u64 rest, __u32 seed)
{
	return mix64(addrs ^ (rest + seed) * 0x9e3779b97f4a7c15ULL) >> 32;
}

static __always_inline __u32 flow_hash(const struct xdplb_flow_key *k, __u32 seed)
{
	return tuple_hash((__u64)bpf_ntohl(k->saddr) << 32 | bpf_ntohl(k->daddr),
			  (__u64)bpf_ntohs(k->sport) << 32 | (__u64)bpf_ntohs(k->dport) << 16 | k->proto, seed);
}

/* An IPv6 address's 128 bits in 64, every bit counted: the high half mixed, the low
 * half added. */
static __always_inline __u64 addr6_fold(const __be32 *a)
{
	return mix64((__u64)bpf_ntohl(a[0]) << 32 | bpf_ntohl(a[1])) + ((__u64)bpf_ntohl(a[2]) << 32 | bpf_ntohl(a[3]));
}

/* The IPv6 flow hash: both whole addresses (the source's fold mixed again, so that
 * swapping source and destination changes the hash), then as flow_hash. */
static __always_inline __u32 flow_hash6(const struct xdplb_flow_key6 *k, __u32 seed)
{
	return tuple_hash(mix64(addr6_fold(k->saddr)) ^ addr6_fold(k->daddr),
			  (__u64)bpf_ntohs(k->sport) << 32 | (__u64)bpf_ntohs(k->dport) << 16 | k->proto, seed);
}

/* Home slot of a service in the service table. */
static __always_inline __u32 service_hash(const struct xdplb_service_key *k)
{
	return tuple_hash(bpf_ntohl(k->vip), (__u64)bpf_ntohs(k->port) << 8 | k->proto, 0);
}

#endif /* XDPLB_HASH_H */
