// SPDX-License-Identifier: Apache-2.0
/*
 * Maglev's table fill (src/xdplb/maglev.py, populate_reference, is the specification and
 * the tests compare the two slot for slot). The fill is sequential, each backend's turn
 * depending on the slots taken before it, so it cannot be vectorised: in Python it costs
 * about a microsecond per slot, here a few nanoseconds.
 *
 * Built by `xdplb build` into a shared object with no libc (no headers, -nostdlib), so it
 * needs nothing but the compiler the BPF objects need. The caller owns every array: no
 * allocation, no global state, safe from any thread.
 */

/* table: size slots, all -1 on entry; on return each holds the index (into offsets,
 * skips, weights) of the backend that claimed it. next: n scratch values. weights:
 * each backend's weight over the largest (in (0, 1]); uniform: all are 1; credit: n
 * zeros. Doubles in the same order of operations as the reference, so the same IEEE
 * arithmetic gives the same turns. Returns 0, or -1 if a backend's permutation found
 * no free slot (a size that is not prime, or a skip of 0).
 *
 * The reference computes backend k's j-th slot as (offset + j * skip) % size; here
 * next[k] holds that slot for the next j and moves on by one addition and a compare,
 * not a division (a fill probes about size * ln(size) times). */
int xdplb_maglev_fill(long n, const long long *offsets, const long long *skips, const double *weights,
		      int uniform, long long size, int *table, long long *next, double *credit)
{
	long long filled = 0;
	long k;

	if (n <= 0 || size <= 0)
		return 0;
	for (k = 0; k < n; k++) {
		if (offsets[k] < 0 || offsets[k] >= size || skips[k] <= 0 || skips[k] >= size)
			return -1;
		next[k] = offsets[k];
	}
	for (;;) {
		for (k = 0; k < n; k++) {
			long long slot, skip = skips[k], tries = 0;

			if (!uniform) {
				credit[k] += weights[k];
				if (credit[k] < 1.0)
					continue;
				credit[k] -= 1.0;
			}
			slot = next[k];
			while (table[slot] != -1) {
				if (++tries > size)
					return -1;
				slot += skip;
				if (slot >= size)
					slot -= size;
			}
			table[slot] = (int)k;
			slot += skip;
			next[k] = slot >= size ? slot - size : slot;
			if (++filled == size)
				return 0;
		}
	}
}

/* A filled table as a ring map's slots: out[i] = ids[table[i]] (no_backend where the
 * table has -1, every slot when no backend has a weight), then no_backend up to the next
 * multiple of four (the padding of the map's last 64-bit value). */
void xdplb_maglev_ring_ids(long long size, const int *table, const unsigned short *ids, unsigned short no_backend,
			   unsigned short *out)
{
	long long i;

	for (i = 0; i < size; i++)
		out[i] = table[i] < 0 ? no_backend : ids[table[i]];
	for (; i % 4; i++)
		out[i] = no_backend;
}
