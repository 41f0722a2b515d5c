/* decode_row.cuh: one CTA decodes one row over its exact descending order (kernels/decode.cu).
 *
 * Input per row b: the processed logits z [V] (fp64, bias and bans applied), and the row sorted
 * by (s descending, id ascending) as order keys (dec_key_of) with int32 ids. The semantics are the
 * CPU reference's (src/ref/decode_row.c, fusedhead.h "Decoding"); the fp64 formulas come from
 * src/decode_math.h, shared with it.
 *
 * Thread mapping: DEC_THREADS threads; sums over the vocabulary are strided per thread then a
 * fixed shared-memory tree (deterministic, but another order than the reference's sequential
 * sums). Prefix sums over the sorted order (top-p, top-H, Bregman) use dec_scan_first: each
 * thread sums DEC_IPT consecutive positions sequentially, thread 0 chains the per-thread totals
 * sequentially, and position j gets fl(offset + local prefix), so the computed prefix sums never
 * decrease (as the reference's sequential sums) and the total equals the last prefix bit for bit.
 * Numerics: everything in fp64, each output rounded once to fp32 (docs/decoding.md, "CUDA
 * backend"). */
#ifndef FH_KERNELS_DECODE_ROW_CUH
#define FH_KERNELS_DECODE_ROW_CUH

#include "common.cuh"
#include "decode_math.h"
#include "ref/decode_ref.h"

namespace fh_dec {

constexpr int DEC_THREADS = 256;
constexpr int DEC_IPT = 8; /* consecutive sorted positions per thread in a scan tile */

/* Row info bits, written by the prep kernel. */
constexpr uint32_t INFO_NAN = 1u, INFO_PINF = 2u, INFO_FINITE = 4u, INFO_BAD = 8u;

/* The row's sparse edits in the reference's order: every bias entry (id, value) in list order,
 * then every ban (id, value −inf); `edit(id, value, ban)` is called for each. Returns INFO_BAD
 * (and stops) at the first count or entry out of range (counts in [0, width], ids in [0, V),
 * finite values), else 0. Shared by the from-logits prep, the fused prep and the fused
 * epilogue (kernels/decode.cu, kernels/decode_fused.cu). */
template <class Edit>
__device__ __forceinline__ uint32_t dec_row_lists(const fh_decode_options_t& o, int64_t b, int64_t V, const Edit& edit) {
  if (o.bias_width > 0) {
    const int64_t c = o.bias_count[b];
    if (c < 0 || c > o.bias_width) return INFO_BAD;
    for (int64_t i = 0; i < c; ++i) {
      const int64_t id = o.bias_ids[b * o.bias_width + i];
      const float val = o.bias_values[b * o.bias_width + i];
      if (id < 0 || id >= V || !isfinite(val)) return INFO_BAD;
      edit(id, (double)val, false);
    }
  }
  if (o.banned_width > 0) {
    const int64_t c = o.banned_count[b];
    if (c < 0 || c > o.banned_width) return INFO_BAD;
    for (int64_t i = 0; i < c; ++i) {
      const int64_t id = o.banned_ids[b * o.banned_width + i];
      if (id < 0 || id >= V) return INFO_BAD;
      edit(id, -INFINITY, true);
    }
  }
  return 0u;
}

/* Order key of s: larger s gives a smaller key (the sort is ascending), -0 equal to +0. */
__device__ __forceinline__ uint64_t dec_key_of(double s) {
  uint64_t u = (uint64_t)__double_as_longlong(s == 0.0 ? 0.0 : s);
  u = (u >> 63) ? ~u : (u | 0x8000000000000000ull);
  return ~u;
}
__device__ __forceinline__ double dec_s_of(uint64_t key) {
  uint64_t u = ~key;
  u = (u >> 63) ? (u & 0x7fffffffffffffffull) : ~u;
  return __longlong_as_double((long long)u);
}

struct dec_smem {
  double red[DEC_THREADS];
  double tot[DEC_THREADS];
  int64_t ired[DEC_THREADS];
  int64_t ired2[DEC_THREADS];
  double carry;
};

/* Block reductions: every thread calls them; fixed tree order over `buf` (DEC_THREADS entries). */
template <class T, class Op>
__device__ __forceinline__ T dec_block_reduce(T v, T* buf, const Op& op) {
  const int t = threadIdx.x;
  buf[t] = v;
  __syncthreads();
  for (int s = DEC_THREADS / 2; s > 0; s >>= 1) {
    if (t < s) buf[t] = op(buf[t], buf[t + s]);
    __syncthreads();
  }
  const T r = buf[0];
  __syncthreads(); /* everyone has read buf[0] before the next reduction writes it */
  return r;
}
__device__ __forceinline__ double dec_block_sum(double v, dec_smem& sm) {
  return dec_block_reduce(v, sm.red, [](double a, double b) { return a + b; });
}
__device__ __forceinline__ double dec_block_max(double v, dec_smem& sm) {
  return dec_block_reduce(v, sm.red, [](double a, double b) { return b > a ? b : a; });
}
__device__ __forceinline__ int64_t dec_block_min(int64_t v, dec_smem& sm) {
  return dec_block_reduce(v, sm.ired, [](int64_t a, int64_t b) { return b < a ? b : a; });
}
__device__ __forceinline__ int64_t dec_block_sum_i(int64_t v, dec_smem& sm) {
  return dec_block_reduce(v, sm.ired, [](int64_t a, int64_t b) { return a + b; });
}
/* Argmax of (key, id): the larger key, equal keys to the lower id; id -1 is empty. Returns the
 * winner's id and sorted position. */
__device__ __forceinline__ void dec_block_argmax(double key, int64_t id, int64_t pos, dec_smem& sm, int64_t* out_id,
                                                 int64_t* out_pos) {
  const int t = threadIdx.x;
  sm.red[t] = key;
  sm.ired[t] = id;
  sm.ired2[t] = pos;
  __syncthreads();
  for (int s = DEC_THREADS / 2; s > 0; s >>= 1) {
    if (t < s) {
      const double kb = sm.red[t + s], ka = sm.red[t];
      const int64_t ib = sm.ired[t + s], ia = sm.ired[t];
      if (ib >= 0 && (ia < 0 || kb > ka || (kb == ka && ib < ia))) {
        sm.red[t] = kb;
        sm.ired[t] = ib;
        sm.ired2[t] = sm.ired2[t + s];
      }
    }
    __syncthreads();
  }
  *out_id = sm.ired[0];
  *out_pos = sm.ired2[0];
  __syncthreads();
}

/* The first j in [0, n) with test(j, E_j, P_j), E_j / P_j the exclusive / inclusive prefix sums
 * of term(0..j) (term >= 0), or n if none; *total = P_(n−1) when none is found. Tiles of
 * DEC_THREADS·DEC_IPT positions, stopping after the tile holding the first hit. */
template <class Term, class Test>
__device__ int64_t dec_scan_first(int64_t n, const Term& term, const Test& test, double* total, dec_smem& sm) {
  const int t = threadIdx.x;
  const int64_t tile = (int64_t)DEC_THREADS * DEC_IPT;
  double carry = 0.0;
  for (int64_t base = 0; base < n; base += tile) {
    const int64_t j0 = base + (int64_t)t * DEC_IPT;
    double x[DEC_IPT], loc = 0.0;
    for (int i = 0; i < DEC_IPT; ++i) {
      x[i] = j0 + i < n ? term(j0 + i) : 0.0;
      loc += x[i];
    }
    sm.tot[t] = loc;
    __syncthreads();
    if (t == 0) { /* sequential chain of the per-thread totals: offsets never decrease */
      double c = carry;
      for (int u = 0; u < DEC_THREADS; ++u) {
        const double v = sm.tot[u];
        sm.tot[u] = c;
        c = c + v;
      }
      sm.carry = c;
    }
    __syncthreads();
    const double off = sm.tot[t];
    carry = sm.carry;
    int64_t f = n;
    double l = 0.0, prev = off;
    for (int i = 0; i < DEC_IPT; ++i) {
      const int64_t j = j0 + i;
      if (j >= n) break;
      l += x[i];
      const double P = off + l;
      if (f == n && test(j, prev, P)) f = j;
      prev = P;
    }
    f = dec_block_min(f, sm); /* its barriers also retire this tile's reads of sm.tot, sm.carry */
    if (f < n) return f;
  }
  *total = carry;
  return n;
}

/* The first i in [lo, hi) where pred(i) is false, pred true-then-false (binary search). */
template <class Pred>
__device__ __forceinline__ int64_t dec_partition_point(int64_t lo, int64_t hi, const Pred& pred) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (pred(mid)) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

} /* namespace fh_dec */

#endif
