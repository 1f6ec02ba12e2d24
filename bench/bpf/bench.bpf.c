// SPDX-License-Identifier: GPL-2.0-only
/*
 * Benchmark helpers, never loaded by xdplb itself.
 *
 * BPF_PROG_TEST_RUN with repeat feeds every iteration the previous iteration's output,
 * so a forwarding program would stop forwarding after the first one. bench_reset puts
 * the original frame back (optionally with a fresh client address, for new flows) and
 * tail-calls the program under test; its own cost is measured with bench_pass as the
 * target and reported.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define BENCH_MAX_FRAME 256
#define IPV4_SADDR_OFFSET (ETH_HLEN + 12)

char LICENSE[] SEC("license") = "GPL";

struct bench_frame {
	__u32 len;
	__u32 new_client_each_time; /* rewrite the source so every run is a new flow */
	__u32 first_client;         /* host byte order */
	__be32 saddr;               /* the frame's own IPv4 source (IPv6: its last 32 bits) */
	__u32 mem_mask;             /* bench_mem entries - 1 (a power of two) */
	__u32 saddr_offset;         /* where those 32 bits are: IPv4's source, or IPv6's last word */
	__u8 data[BENCH_MAX_FRAME];
};

/* The frame every iteration starts from. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bench_frame);
} bench_frame SEC(".maps");

/* Slot 0: the program under test. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} bench_target SEC(".maps");

/* As large as the flow table of the run: bench_dram reads one random line of it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64[8]);
} bench_mem SEC(".maps");

/* Iterations so far (per CPU; the benchmark pins itself to one CPU). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} bench_count SEC(".maps");

SEC("xdp")
int bench_reset(struct xdp_md *ctx)
{
	__u32 zero = 0, len, off;
	struct bench_frame *f = bpf_map_lookup_elem(&bench_frame, &zero);
	__u64 *n = bpf_map_lookup_elem(&bench_count, &zero);
	long cur;

	if (!f || !n)
		return XDP_ABORTED;
	len = f->len;
	off = f->saddr_offset;
	if (len < IPV4_SADDR_OFFSET + 4 || len > BENCH_MAX_FRAME || off > len - 4 || off > BENCH_MAX_FRAME - 4)
		return XDP_ABORTED;
	*n += 1;
	/* The last iteration may have moved the start of the frame (an IPIP header pushed in
	 * front): move it back, or the frame would grow by one header per iteration. */
	cur = (long)ctx->data_end - (long)ctx->data;
	if (cur != len && bpf_xdp_adjust_head(ctx, (int)(cur - len)))
		return XDP_ABORTED;
	/* The new client goes into the saved frame, which is then copied in one go: every
	 * mode costs the same single store. */
	*(__be32 *)&f->data[off] =
		f->new_client_each_time ? bpf_htonl(f->first_client + (__u32)*n) : f->saddr;
	if (bpf_xdp_store_bytes(ctx, 0, f->data, len))
		return XDP_ABORTED;
	bpf_tail_call(ctx, &bench_target, 0);
	return XDP_ABORTED;
}

SEC("xdp")
int bench_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

static __always_inline int swap_macs_and_send(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u8 tmp[ETH_ALEN];

	if ((void *)(eth + 1) > end)
		return XDP_ABORTED;
	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
	return XDP_TX;
}

/* The floor: the least a program that transmits a frame can do. */
SEC("xdp")
int bench_macswap(struct xdp_md *ctx)
{
	return swap_macs_and_send(ctx);
}

/* The floor plus one read of a random cache line of a table as large as the flow table,
 * waited for: the least a new flow can cost when its table does not fit in the caches. */
SEC("xdp")
int bench_dram(struct xdp_md *ctx)
{
	__u32 zero = 0, index;
	struct bench_frame *f = bpf_map_lookup_elem(&bench_frame, &zero);
	__u64 *n = bpf_map_lookup_elem(&bench_count, &zero), *line;

	if (!f || !n)
		return XDP_ABORTED;
	index = (__u32)(*n * 0x9e3779b97f4a7c15ULL >> 32) & f->mem_mask;
	line = bpf_map_lookup_elem(&bench_mem, &index);
	if (!line || line[0] == 0xdeadbeef) /* never true: makes the program wait for the read */
		return XDP_ABORTED;
	return swap_macs_and_send(ctx);
}

/* The far side of live-frame runs: counts what arrives, then drops it. */
SEC("xdp")
int bench_sink(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&bench_count, &zero);

	if (n)
		*n += 1;
	return XDP_DROP;
}
