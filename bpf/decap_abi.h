/* SPDX-License-Identifier: GPL-2.0-only */
/* The decapsulator's contract with Python (src/xdplb/decap_abi.py mirrors it; a packet
 * test compares the two): what each counter counts, and how many local addresses fit. */
#ifndef XDPLB_DECAP_ABI_H
#define XDPLB_DECAP_ABI_H

#include <linux/types.h>

/* Addresses an outer header may be addressed to: this host's, filled at attach. */
#define XDPLB_DC_MAX_LOCAL 256

/* The key of xdplb_dc_local: an IPv6 address, or an IPv4 one mapped (::ffff:a.b.c.d). */
struct xdplb_dc_addr {
	__be32 w[4];
};

/* One counter per outcome; every packet counts in exactly one. */
enum xdplb_dc_counter {
	XDPLB_DC_DECAPSULATED,    /* IPIP or ip6ip6 to this host: the inner packet went to the stack */
	XDPLB_DC_NOT_IPIP,        /* not IP, or IPv4 (IPv6) carrying something else than IPv4 (IPv6) */
	XDPLB_DC_NOT_LOCAL,       /* IPIP whose outer destination is not this host's */
	XDPLB_DC_MALFORMED,       /* an outer header truncated, inconsistent or (IPv4) with a bad checksum */
	XDPLB_DC_INNER_MALFORMED, /* whose inner packet is no complete header of the outer one's family */
	XDPLB_DC_FRAGMENT,        /* a fragment of an IPIP packet: only the kernel can reassemble it */
	XDPLB_DC_ERROR,           /* bpf_xdp_adjust_head refused */
	/* Congestion marked on the outer header (CE) of an inner packet that is not ECN-capable:
	 * dropped, as RFC 6040 and the kernel's tunnels do (the mark cannot be passed on). */
	XDPLB_DC_ECN_DROP,
	XDPLB_DC_MAX,
};

#endif /* XDPLB_DECAP_ABI_H */
