/* Device code shared by the linear cross-entropy passes (linear_ce_fwd.cu, linear_ce_bwd.cu).
 *
 * The logit tile. For a block of BM compacted valid rows (s_rows) and BV classes starting at v0:
 *     acc[r][c] = Σ_k E[s_rows[r]][k] · C[v0 + c][k]          (fp32, [BM x BV])
 * computed with WMMA (fp16/bf16 m16n16k16, fp32 inputs as tf32 m16n16k8, fp32 accumulators),
 * D in chunks of BK staged through shared memory with zeros beyond the valid rows, V and D.
 * 4 warps in a 2x2 grid, each owning a 32x32 quarter (2x2 fragments). Fragments wholly beyond
 * the valid rows, V or D are skipped (warp-uniform tests), so the issued tensor-core work is
 * the analytic 2·N_valid·V·D rounded up to 16x16xK fragments.
 *
 * Determinism of the logits: the forward and every backward kernel call this one function with
 * the same (row block, class tile) decomposition, so the same fragments are multiplied in the
 * same k order, and the recomputed logits are bitwise the forward's (CCE PR #55 gets the same
 * by matching configs). The processed logit z = softcap(scale · (acc + bias)) is formed by
 * lce_process() in fp32 by both passes, so the target logit, the lse and the gradient's p all
 * come from one arithmetic (nll >= 0, and p_y − 1 formed consistently).
 *
 * Numerics: inputs are never rounded further for fp16/bf16 (the products are exact in fp32);
 * fp32 inputs are rounded to tf32 (10-bit mantissa) when staged, as cuBLAS does with TF32 math
 * enabled; the tests bound the error against a naive tf32 computation (docs/testing.md). */
#pragma once

#include <stdint.h>

#include <type_traits>

#include "common.cuh" /* FH_LAUNCH, FH_DYNAMIC_SMEM, launch status, CUDA headers (or the emulator's) */

namespace fh_lce {

constexpr int BM = 64;        /* rows per block (compacted valid rows) */
constexpr int BV = 64;        /* classes per vocabulary tile */
constexpr int BK = 32;        /* D chunk of the logit GEMM */
constexpr int DCH = 32;       /* D chunk of the backward GEMMs (output tile BM x DCH) */
constexpr int THREADS = 128;  /* 4 warps */
constexpr int ACC_LD = BV + 4; /* fp32 tile leading dimension: multiple of 4, rows 32-byte aligned */

/* Per-dtype MMA traits: S is the shared-memory operand type, F the WMMA fragment element. */
template <typename T>
struct mma_traits;
template <>
struct mma_traits<float> {
  typedef float S;
  typedef nvcuda::wmma::precision::tf32 F;
  static constexpr int K = 8;
  static constexpr int LDS = BK + 4; /* 36 floats = 144 B: 16-row steps stay 32-byte aligned */
  static constexpr int GLD = ACC_LD; /* G is rounded in place in the fp32 tile */
  static __device__ __forceinline__ S from_float(float x) { return nvcuda::wmma::__float_to_tf32(x); }
  static __device__ __forceinline__ S stage(float x) { return nvcuda::wmma::__float_to_tf32(x); }
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float store_round(float x) { return x; }
};
template <>
struct mma_traits<__half> {
  typedef __half S;
  typedef __half F;
  static constexpr int K = 16;
  static constexpr int LDS = BK + 8; /* 40 halves = 80 B */
  static constexpr int GLD = BV + 8;
  static __device__ __forceinline__ S from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ S stage(__half x) { return x; }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store_round(float x) { return __float2half_rn(x); }
};
template <>
struct mma_traits<__nv_bfloat16> {
  typedef __nv_bfloat16 S;
  typedef __nv_bfloat16 F;
  static constexpr int K = 16;
  static constexpr int LDS = BK + 8;
  static constexpr int GLD = BV + 8;
  static __device__ __forceinline__ S from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ S stage(__nv_bfloat16 x) { return x; }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store_round(float x) { return __float2bfloat16_rn(x); }
};

/* Dtype switch: runs the body with T bound to the element type (a BOOL_SWITCH for dtypes). */
#define LCE_DTYPE_SWITCH(dtype, T, ...)                 \
  do {                                                  \
    if ((dtype) == FH_DTYPE_F32) {                      \
      typedef float T;                                  \
      __VA_ARGS__;                                      \
    } else if ((dtype) == FH_DTYPE_F16) {               \
      typedef __half T;                                 \
      __VA_ARGS__;                                      \
    } else if ((dtype) == FH_DTYPE_BF16) {              \
      typedef __nv_bfloat16 T;                          \
      __VA_ARGS__;                                      \
    } else { /* validation keeps other dtypes out */    \
      return fh_set_error(FH_ERR_INTERNAL, "fusedhead", \
                          "dtype %d reached a CUDA kernel", (int)(dtype)); \
    }                                                   \
  } while (0)

/* Launch check (common.cuh): a failed launch becomes FH_ERR_CUDA naming the kernel. */
#define LCE_CHECK_LAUNCH(fn, what) FH_TRY(fh_cuda_launch_status(fn, what))

static inline unsigned lce_blocks(int64_t n, int per) { return (unsigned)((n + per - 1) / per); }
static inline size_t lce_align(size_t x) { return (x + 255) & ~(size_t)255; }

/* Rows and classes are int in the kernels (index math that multiplies them is 64-bit), and grid-
 * stride loops step by up to 256 past the last index: keep every size 256 below 2^31. */
static inline fh_status_t lce_check_shape(const char* fn, int64_t N, int64_t V, int64_t D) {
  const int64_t lim = (int64_t)INT32_MAX - 256;
  if (N > lim || V > lim || D > lim)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn, "N, V, D = %lld, %lld, %lld: each must be <= 2^31 - 257 on the CUDA backend",
                        (long long)N, (long long)V, (long long)D);
  return FH_SUCCESS;
}

/* z = softcap(scale · r) (fusedhead.h: scale first, then c·tanh(s/c)). */
__device__ __forceinline__ float lce_process(float r, float scale, float cap) {
  const float s = scale * r;
  return cap > 0.0f ? cap * tanhf(s / cap) : s;
}

/* Argmax order over raw logits: NaN is the largest value, ties and NaN-vs-NaN go to the lowest
 * index (fusedhead.h). An empty candidate is (-inf, INT32_MAX), which every real entry beats. */
__device__ __forceinline__ bool lce_arg_better(float v, int i, float bv, int bi) {
  const bool vn = v != v, bn = bv != bv;
  if (vn != bn) return vn;
  if (!vn && v != bv) return v > bv;
  return i < bi;
}

/* Merge online softmax stats (m, Z = Σ e^{z−m}, F = Σ e^{z−m}(z − m)) of two disjoint sets.
 * (common.cuh's fh_stats carries (m, Z) only; the entropy needs F as well.)
 * An empty set has Z == 0; NaN in Z propagates. */
__device__ __forceinline__ void lce_stats_merge(float& m, float& Z, float& F, float m2, float Z2, float F2) {
  if (Z2 == 0.0f) return;
  if (Z == 0.0f) {
    m = m2, Z = Z2, F = F2;
    return;
  }
  const float mn = fmaxf(m, m2), d1 = m - mn, d2 = m2 - mn;
  const float s1 = expf(d1), s2 = expf(d2);
  F = s1 * (F + d1 * Z) + s2 * (F2 + d2 * Z2);
  Z = s1 * Z + s2 * Z2;
  m = mn;
}

/* The logit tile (see the file comment). s_rows[r] for r < nr are the global row indices.
 * On return acc (fp32, [BM x ACC_LD]) holds the tile and every thread may read it. sA and sB
 * are the staging buffers ([BM x LDS] and [BV x LDS] of S). */
template <typename T>
__device__ __forceinline__ void lce_logit_tile(const T* __restrict__ E, int64_t lde, const T* __restrict__ C, int64_t ldc,
                               const int* s_rows, int nr, int v0, int V, int D,
                               typename mma_traits<T>::S* sA, typename mma_traits<T>::S* sB, float* acc) {
  using namespace nvcuda;
  typedef mma_traits<T> tr;
  typedef typename tr::S S;
  constexpr int K = tr::K, LDS = tr::LDS;
  const int warp = threadIdx.x >> 5, wr = warp >> 1, wc = warp & 1;
  const int nv = V - v0 < BV ? V - v0 : BV;
  /* Warp-uniform: which of this warp's fragment rows / columns hold any real row / class. */
  const bool row_live[2] = {wr * 32 < nr, wr * 32 + 16 < nr};
  const bool col_live[2] = {wc * 32 < nv, wc * 32 + 16 < nv};
  wmma::fragment<wmma::accumulator, 16, 16, K, float> f[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(f[i][j], 0.0f);
  const S zero = tr::from_float(0.0f);
  for (int d0 = 0; d0 < D; d0 += BK) {
    __syncthreads(); /* every warp is done with the previous chunk (and the caller with acc) */
    for (int idx = threadIdx.x; idx < BM * BK; idx += THREADS) {
      const int r = idx / BK, k = idx % BK, d = d0 + k;
      sA[r * LDS + k] = (r < nr && d < D) ? tr::stage(E[(int64_t)s_rows[r] * lde + d]) : zero;
    }
    for (int idx = threadIdx.x; idx < BV * BK; idx += THREADS) {
      const int c = idx / BK, k = idx % BK, d = d0 + k;
      sB[c * LDS + k] = (c < nv && d < D) ? tr::stage(C[(int64_t)(v0 + c) * ldc + d]) : zero;
    }
    __syncthreads();
    for (int kk = 0; kk < BK && d0 + kk < D; kk += K) {
      wmma::fragment<wmma::matrix_a, 16, 16, K, typename tr::F, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, K, typename tr::F, wmma::col_major> b[2];
      for (int i = 0; i < 2; ++i)
        if (row_live[i]) wmma::load_matrix_sync(a[i], sA + (wr * 32 + i * 16) * LDS + kk, LDS);
      for (int j = 0; j < 2; ++j)
        if (col_live[j]) wmma::load_matrix_sync(b[j], sB + (wc * 32 + j * 16) * LDS + kk, LDS);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
          if (row_live[i] && col_live[j]) wmma::mma_sync(f[i][j], a[i], b[j], f[i][j]);
    }
  }
  __syncthreads(); /* with D == 0 the loop never ran its barrier; readers of acc are done */
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(acc + (wr * 32 + i * 16) * ACC_LD + wc * 32 + j * 16, f[i][j], ACC_LD,
                              wmma::mem_row_major);
  __syncthreads();
}

/* Workspace header shared by both passes (first 256 bytes). */
struct lce_ws_header {
  int count;       /* number of valid rows */
  int pad_;
  double W;        /* Σ_j w_j */
  double denom_ce; /* D_ce after the divisor rule (backward) */
  double denom_reg;
};

/* Launches the compaction of the valid rows, in row order, by one block (deterministic):
 * rows[0..count) are the i with targets[i] != ignore_index and 0 <= targets[i] < V. A target
 * outside [0, V) that is not ignore_index raises the device error flag and the row is treated
 * as ignored (never read). Also W = Σ_j w_j (V without class weights) in fp64, fixed order.
 * Defined in linear_ce_fwd.cu, used by both passes. */
fh_status_t lce_launch_prep(const char* fn, cudaStream_t stream, const fh_lce_problem_t* p, int* rows,
                            struct lce_ws_header* hdr, int* err_flag);

/* Sums n doubles per thread across the block in a fixed tree order (common.cuh's fh_block_sum
 * is one float; the forward's reductions want fp64 and several values at once); results in red[0..n) of
 * thread 0's view (every thread may read them after the call). red: [n x blockDim] doubles. */
/* Block sum of n fp64 values per thread into red[q * blockDim.x] (every thread may read the
 * results afterwards). Once per kernel: a second call would overwrite `red` while other threads
 * may still read the first results, unless a __syncthreads separates them. */
__device__ __forceinline__ void lce_block_sum(double* red, const double* v, int n) {
  const int t = threadIdx.x, nt = blockDim.x;
  for (int q = 0; q < n; ++q) red[q * nt + t] = v[q];
  __syncthreads();
  for (int s = nt / 2; s > 0; s >>= 1) {
    if (t < s)
      for (int q = 0; q < n; ++q) red[q * nt + t] += red[q * nt + t + s];
    __syncthreads();
  }
}

} /* namespace fh_lce */
