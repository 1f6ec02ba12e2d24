/* SPDX-License-Identifier: GPL-2.0-only */
/* A packet as the XDP program has parsed it: header pointers into the frame (checked
 * against its end), its 5-tuple and what the flow table said of it. */
#ifndef XDPLB_PACKET_H
#define XDPLB_PACKET_H

#include <linux/bpf.h>
#include "xdplb_abi.h"
#include "maps.h"
#include "parse.h"

struct packet {
	struct ethhdr *eth;
	struct iphdr *ip;
	struct tcphdr *tcp; /* NULL unless TCP */
	union {
		struct udphdr *udp;   /* NULL unless UDP (PARSE_L4) */
		struct icmphdr *icmp; /* PARSE_ICMP */
	};
	struct xdplb_flow_key key;
	__u32 hash; /* flow_hash(key, flow_seed): where the flow table keeps key */
	struct flow_place place; /* where a new flow for key goes (see flow_find) */
	__u8 tcp_flags;
	__u8 first_fragment;
	__u8 planned; /* plan_new_flow() ran for this packet and succeeded */
};

#endif /* XDPLB_PACKET_H */
