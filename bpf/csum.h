/* SPDX-License-Identifier: GPL-2.0-only */
/* Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
 * Everything works on 16-bit words exactly as they lie in the packet: a ones'
 * complement sum is independent of byte order as long as all words are treated alike. */
#ifndef XDPLB_CSUM_H
#define XDPLB_CSUM_H

#include <linux/types.h>

static __always_inline __u32 csum_fold32(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	return (sum & 0xffff) + (sum >> 16);
}

/* Adds the change of one 16-bit word from old to new to a running delta. */
static __always_inline __u32 csum_delta16(__u32 delta, __u16 old, __u16 new)
{
	return delta + (__u16)~old + new;
}

/* Same for a 32-bit field (two words). */
static __always_inline __u32 csum_delta32(__u32 delta, __u32 old, __u32 new)
{
	delta = csum_delta16(delta, old & 0xffff, new & 0xffff);
	return csum_delta16(delta, old >> 16, new >> 16);
}

/* Applies a folded delta to a checksum field. */
static __always_inline __u16 csum_apply(__u16 check, __u32 delta)
{
	return ~csum_fold32((__u16)~check + delta);
}

#endif /* XDPLB_CSUM_H */
