/* Device code shared by the linear cross-entropy passes (linear_ce_fwd.cu, linear_ce_bwd.cu) and
 * the unfused baseline: dtype conversions, the dtype switch, launch and shape checks, the row
 * compaction shared by both passes, fp64 block sums.
 *
 * The logit tiles themselves come from the engine (kernels/engine/sm80.cuh, docs/engine.md):
 * the forward and every backward kernel call the same mainloop with the same (row block, class
 * tile) decomposition, so the recomputed logits are bitwise the forward's, and the processed
 * logit z = softcap(scale · (acc + bias)) is formed by fh_eng::process_logit in both passes, so
 * the target logit, the lse and the gradient's p all come from one arithmetic (nll >= 0, and
 * p_y − 1 formed consistently). Inputs are never rounded further for fp16/bf16 (the products
 * are exact in fp32); fp32 inputs go through the engine's three-piece bf16 split (fp32
 * accuracy); the tests bound the error against a naive fp32 computation (docs/testing.md
 * "Tolerances"). */
#pragma once

#include <stdint.h>

#include <type_traits>

#include "common.cuh" /* FH_LAUNCH, FH_DYNAMIC_SMEM, launch status, CUDA headers (or the emulator's) */
#include "engine/epilogue.cuh"

namespace fh_lce {

/* Conversions between a tensor dtype and fp32: from_float rounds to the operand type (to
 * nearest; fp32 stays fp32: the engine splits it), store_round to the stored type. */
template <typename T>
struct dtype_traits;
template <>
struct dtype_traits<float> {
  static __device__ __forceinline__ float from_float(float x) { return x; }
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float store_round(float x) { return x; }
};
template <>
struct dtype_traits<__half> {
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store_round(float x) { return __float2half_rn(x); }
};
template <>
struct dtype_traits<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
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

/* a·x where a zero coefficient suppresses an infinite factor (a masked target under a zero
 * weight, docs/conventions.md): no 0·inf. NaN still propagates. */
__device__ __forceinline__ double lce_mul0(double a, double x) { return (a == 0.0 && isinf(x)) ? 0.0 : a * x; }

/* The finalize kernels' merge of (m, Z, F) split partials, with accurate expf (engine/epilogue.cuh;
 * common.cuh's fh_stats carries (m, Z) only; the entropy needs F as well). */
__device__ __forceinline__ void lce_stats_merge(float& m, float& Z, float& F, float m2, float Z2, float F2) {
  fh_eng::stats_merge<false>(m, Z, F, m2, Z2, F2);
}

/* Workspace header shared by both passes (first 256 bytes). */
struct lce_ws_header {
  int count;       /* number of valid rows */
  int pad_;
  double denom_ce; /* D_ce after the divisor rule (backward) */
  double denom_reg;
};

/* Vocabulary splits of a forward from V alone (docs/engine.md "Determinism"): vt class tiles of
 * the engine's BN, tps tiles per split, S <= max_splits splits, none empty. A row's partials (so
 * its lse) depend on the split boundaries, which therefore must not depend on N. */
struct lce_vsplit {
  int S, tps, vt;
};
static inline lce_vsplit lce_vsplit_of(int64_t V, int max_splits) {
  lce_vsplit L;
  L.vt = (int)((V + 127) / 128);
  int S = L.vt < max_splits ? L.vt : max_splits;
  if (S < 1) S = 1;
  L.tps = L.vt > 0 ? (L.vt + S - 1) / S : 0;
  L.S = L.tps > 0 ? (L.vt + L.tps - 1) / L.tps : 1; /* no empty split */
  return L;
}

/* Launches the compaction of the valid rows, in row order, by one block (deterministic):
 * rows[0..count) are the i with targets[i] != ignore_index and 0 <= targets[i] < V. A target
 * outside [0, V) that is not ignore_index raises the device error flag and the row is treated
 * as ignored (never read).
 * Defined in linear_ce_fwd.cu, used by both passes. */
fh_status_t lce_launch_prep(const char* fn, cudaStream_t stream, const fh_lce_problem_t* p, int* rows,
                            struct lce_ws_header* hdr, int* err_flag);
/* The same from raw arguments; targets NULL: every row valid (distillation without targets). */
fh_status_t lce_launch_prep_rows(const char* fn, cudaStream_t stream, const int64_t* targets, int64_t N, int64_t V,
                                 int64_t ignore_index, int* rows, struct lce_ws_header* hdr, int* err_flag);

/* One pass of the forward's tile kernel for the backward (docs/linear_ce.md "Precision"), for
 * the valid rows:
 *   counts [2 x N] (or NULL): each row's unmasked class count V_i and weight sum W_i, which
 *     label smoothing needs (docs/conventions.md: smoothing runs over the unmasked classes);
 *   stats [3 x N] (or NULL): m_i (the row's largest logit), ln Z_i (Z = Σ e^(z − m)) and the
 *     entropy h_i, bitwise the forward's merge. fp32 inputs use them instead of the forward's
 *     fp32 lse: p = e^((z − m) − ln Z) is as accurate as PyTorch's fp32 softmax at any logit
 *     scale, where e^(z − lse) carries lse's rounding, 2^-24 |lse|, into every p.
 * smooth: the smoothing layout of the partials (counts needs it). scratch:
 * lce_row_stats_scratch(N, V, smooth) bytes, 256-byte aligned. Defined in linear_ce_fwd.cu. */
size_t lce_row_stats_scratch(int64_t N, int64_t V, bool smooth);
fh_status_t lce_launch_row_stats(const char* fn, cudaStream_t stream, const fh_lce_problem_t* p, const int* rows,
                                 const lce_ws_header* hdr, void* scratch, bool smooth, float* counts, float* stats);

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
