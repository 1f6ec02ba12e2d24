/* SPDX-License-Identifier: GPL-2.0-only */
/* The decapsulator's contract with Python (src/xdplb/decap_abi.py mirrors it; a packet
 * test compares the two): what each counter counts, and how many local addresses fit. */
#ifndef XDPLB_DECAP_ABI_H
#define XDPLB_DECAP_ABI_H

/* Addresses an outer header may be addressed to: this host's, filled at attach. */
#define XDPLB_DC_MAX_LOCAL 256

/* One counter per outcome; every packet counts in exactly one. */
enum xdplb_dc_counter {
	XDPLB_DC_DECAPSULATED,    /* IPIP to this host: the inner packet went to the stack */
	XDPLB_DC_NOT_IPIP,        /* not IPv4, or IPv4 of another protocol */
	XDPLB_DC_NOT_LOCAL,       /* IPIP whose outer destination is not this host's */
	XDPLB_DC_MALFORMED,       /* an IPv4 header truncated, inconsistent or with a bad checksum */
	XDPLB_DC_INNER_MALFORMED, /* IPIP whose inner packet is no complete IPv4 header */
	XDPLB_DC_FRAGMENT,        /* a fragment of an IPIP packet: only the kernel can reassemble it */
	XDPLB_DC_ERROR,           /* bpf_xdp_adjust_head refused */
	/* Congestion marked on the outer header (CE) of an inner packet that is not ECN-capable:
	 * dropped, as RFC 6040 and the kernel's tunnels do (the mark cannot be passed on). */
	XDPLB_DC_ECN_DROP,
	XDPLB_DC_MAX,
};

#endif /* XDPLB_DECAP_ABI_H */
