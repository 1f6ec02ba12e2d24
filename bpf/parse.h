/* SPDX-License-Identifier: GPL-2.0-only */
/* Bounds-checked header parsers. Each takes a cursor, checks that its header fits
 * before the end of the packet, advances the cursor past it and returns the type of
 * what follows (or 0 for the last header), or -1 when the header is malformed. */
#ifndef XDPLB_PARSE_H
#define XDPLB_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>

/* linux/icmp.h drags in libc's socket headers, which do not build for BPF. */
struct icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 rest;
};

#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

struct cursor {
	void *pos;
	void *end;
};

/* Returns the EtherType in network byte order. VLAN tags are not parsed: tagged frames
 * are not IPv4 to us and pass to the kernel. */
static __always_inline int parse_ethhdr(struct cursor *c, struct ethhdr **eth)
{
	struct ethhdr *h = c->pos;

	if ((void *)(h + 1) > c->end)
		return -1;
	c->pos = h + 1;
	*eth = h;
	return h->h_proto;
}

/* Returns the IP protocol. Options are allowed (and kept); the header must be
 * complete and the total length must fit in the frame. */
static __always_inline int parse_iphdr(struct cursor *c, struct iphdr **ip)
{
	struct iphdr *h = c->pos;
	__u32 hdr_len;

	if ((void *)(h + 1) > c->end)
		return -1;
	if (h->version != 4 || h->ihl < 5)
		return -1;
	hdr_len = h->ihl * 4;
	if (c->pos + hdr_len > c->end)
		return -1;
	if (bpf_ntohs(h->tot_len) < hdr_len || c->pos + bpf_ntohs(h->tot_len) > c->end)
		return -1;
	c->pos += hdr_len;
	*ip = h;
	return h->protocol;
}

static __always_inline int parse_tcphdr(struct cursor *c, struct tcphdr **tcp)
{
	struct tcphdr *h = c->pos;

	if ((void *)(h + 1) > c->end || h->doff < 5)
		return -1;
	c->pos = h + 1;
	*tcp = h;
	return 0;
}

static __always_inline int parse_udphdr(struct cursor *c, struct udphdr **udp)
{
	struct udphdr *h = c->pos;

	if ((void *)(h + 1) > c->end)
		return -1;
	c->pos = h + 1;
	*udp = h;
	return 0;
}

static __always_inline int parse_icmphdr(struct cursor *c, struct icmphdr **icmp)
{
	struct icmphdr *h = c->pos;

	if ((void *)(h + 1) > c->end)
		return -1;
	c->pos = h + 1;
	*icmp = h;
	return h->type;
}

static __always_inline int ip_is_fragment(const struct iphdr *ip)
{
	return (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)) != 0;
}

#endif /* XDPLB_PARSE_H */
