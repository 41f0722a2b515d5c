/* engine/epilogue.cuh: register-level helpers for the epilogues of the engine (docs/engine.md
 * "Epilogues"): fast exponentials and tanh on the MUFU unit, quad reductions over the four
 * lanes that hold one accumulator row, and the online softmax statistics of one row.
 *
 * Accuracy (the bounds the tolerance rule of docs/testing.md covers):
 *   exp_fast(d) = ex2(d · log2 e): d = z − m is formed first (exact when z and m are close), so
 *     the relative error is that of ex2.approx (2^-22) plus the rounding of d · log2 e (2^-24
 *     relative to d): at most 2^-21.5 for |d| <= 16, where terms matter. Folding log2 e into an
 *     FMA with a precomputed m · log2 e would instead add |m| · 2^-24 to the exponent, 6e-4
 *     relative at logits of 1e4, which is why the engine does not (docs/engine.md).
 *   tanh_fast(x): |x| < 0.5: odd Taylor polynomial to x^13 (truncation below 2^-23 relative);
 *     |x| >= 0.5: 1 − 2 / (ex2(2 |x| log2 e) + 1) with rcp.approx, whose rounding is amplified
 *     by at most 1.2 at |x| = 0.5 and less above: at most 2^-20 relative overall. Saturates to
 *     ±1 exactly, NaN in gives NaN. */
#ifndef FH_KERNELS_ENGINE_EPILOGUE_CUH
#define FH_KERNELS_ENGINE_EPILOGUE_CUH

#include <math.h>

#include "ptx.cuh"

namespace fh_eng {

constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ float exp_fast(float d) { return fh_ptx::ex2(d * LOG2E); }

__device__ __forceinline__ float tanh_fast(float x) {
  const float ax = fabsf(x);
  if (ax < 0.5f) {
    const float x2 = x * x;
    float p = 21844.0f / 6081075.0f;
    p = fmaf(p, x2, -1382.0f / 155925.0f);
    p = fmaf(p, x2, 62.0f / 2835.0f);
    p = fmaf(p, x2, -17.0f / 315.0f);
    p = fmaf(p, x2, 2.0f / 15.0f);
    p = fmaf(p, x2, -1.0f / 3.0f);
    return fmaf(x * x2, p, x);
  }
  const float t = 1.0f - 2.0f * fh_ptx::rcp(fh_ptx::ex2(2.0f * LOG2E * ax) + 1.0f);
  return copysignf(t, x);
}

/* z = softcap(scale · (acc + bias)) (docs/linear_ce.md: scale first, then c · tanh(s / c));
 * inv_cap = 1/c is precomputed by the caller (no division per logit). The backward recomputes z
 * and must get the forward's bits, so every rounding point is pinned with _rn intrinsics: nvcc
 * may not contract them into FMAs with what the caller does next (z − lse, z − m), which would
 * round differently in the two kernels. */
__device__ __forceinline__ float raw_logit(float acc, float bias) { return __fadd_rn(acc, bias); }
__device__ __forceinline__ float process_logit(float r, float scale, float cap, float inv_cap) {
  const float s = __fmul_rn(scale, r);
  return cap > 0.0f ? __fmul_rn(cap, tanh_fast(__fmul_rn(s, inv_cap))) : s;
}

/* Merge the online statistics (m, Z = Σ e^{z−m}, F = Σ e^{z−m}(z − m)) of a disjoint set into
 * (m, Z, F). An empty set has Z == 0; NaN in Z propagates. FAST: exp_fast (the tile epilogues),
 * else expf (the once-per-row finalize kernels). The operand order is the caller's, fixed. */
template <bool FAST>
__device__ __forceinline__ void stats_merge(float& m, float& Z, float& F, float m2, float Z2, float F2) {
  if (Z2 == 0.0f) return;
  if (Z == 0.0f) {
    m = m2, Z = Z2, F = F2;
    return;
  }
  const float mn = fmaxf(m, m2), d1 = m - mn, d2 = m2 - mn;
  const float s1 = FAST ? exp_fast(d1) : expf(d1), s2 = FAST ? exp_fast(d2) : expf(d2);
  F = s1 * fmaf(d1, Z, F) + s2 * fmaf(d2, Z2, F2);
  Z = s1 * Z + s2 * Z2;
  m = mn;
}

/* Online statistics of one row over the values seen so far: m = max, Z = Σ e^{z−m},
 * F = Σ e^{z−m} (z − m) (the entropy needs F). Empty: Z == 0. A −inf value adds nothing; NaN
 * poisons Z (fmaxf skips it in the max, its exponential is NaN). */
struct row_stats {
  float m, Z, F;
  __device__ __forceinline__ void init() { m = -INFINITY, Z = 0.0f, F = 0.0f; }
  /* Fold in `n` values whose max (NaN skipped) is tmax: rescale only when the max grows. */
  template <int n>
  __device__ __forceinline__ void add(const float (&z)[n], float tmax) {
    const float mn = fmaxf(m, tmax);
    if (mn > m) {
      if (Z != 0.0f) {
        const float d = m - mn, sc = exp_fast(d);
        F = sc * fmaf(d, Z, F);
        Z *= sc;
      }
      m = mn;
    }
    FH_UNROLL
    for (int k = 0; k < n; ++k) {
      if (z[k] == -INFINITY) continue; /* e^{-inf} = 0, and -inf − -inf would be NaN */
      const float d = z[k] - m, e = exp_fast(d);
      Z += e;
      F = fmaf(e, d, F);
    }
  }
  /* Merge another disjoint set (fixed operand order: the caller fixes who merges whom). */
  __device__ __forceinline__ void merge(float m2, float Z2, float F2) { stats_merge<true>(m, Z, F, m2, Z2, F2); }
  /* Merge the four lanes of a quad (the lanes holding one accumulator row; xor 1, then xor 2),
   * the lower lane's set first on every lane, so all four end with the same bits. */
  __device__ __forceinline__ void quad_merge() {
    FH_UNROLL
    for (int off = 1; off <= 2; off <<= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off), Z2 = __shfl_xor_sync(0xffffffffu, Z, off);
      const float F2 = __shfl_xor_sync(0xffffffffu, F, off);
      if ((threadIdx.x & off) == 0) {
        merge(m2, Z2, F2);
      } else {
        row_stats o{m2, Z2, F2};
        o.merge(m, Z, F);
        *this = o;
      }
    }
  }
};

/* Sum over the four lanes of a quad (xor 1, then xor 2; fp32 addition commutes, so every lane
 * gets the same bits). */
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

/* Argmax order over raw logits: NaN is the largest value, ties and NaN-vs-NaN go to the lowest
 * index (docs/linear_ce.md). An empty candidate is (-inf, INT32_MAX). */
__device__ __forceinline__ bool arg_better(float v, int i, float bv, int bi) {
  const bool vn = v != v, bn = bv != bv;
  if (vn != bn) return vn;
  if (!vn && v != bv) return v > bv;
  return i < bi;
}

} /* namespace fh_eng */

#endif
