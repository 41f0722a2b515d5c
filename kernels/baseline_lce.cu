/* baseline_lce.cu: the unfused linear cross-entropy (materialized logits) that the benchmark
 * compares fusedhead against; semantics and memory in baseline_lce.h.
 *
 * Formula: L = E·Cᵀ (fp32), z = L + b, lse_i = log Σ_j e^{z_ij}, loss_i = lse_i − z_iy;
 * G_ij = (e^{z_ij − lse_i} − δ_jy)·g/n (mean over the n valid rows) or ·g (sum);
 * dE = G·C, dC = Gᵀ·E, dbias = Σ_i G_ij.
 * Shapes: E [N x D] (lde), C [V x D] (ldc), L [N x V] fp32 (ld V) in the workspace, G [N x V]
 * in the input dtype with ld 4V/sizeof(dtype) elements, so G's row i starts at L's row i.
 * Thread mapping: bl_fwd_row_kernel and bl_grad_row_kernel: one 256-thread block per row, the
 * threads striding over the classes; bl_reduce_kernel: one block; bl_dbias_kernel: one thread
 * per class, looping over the rows (coalesced across the threads).
 * Numerics: fp32 logits and statistics (fp64 for the loss sum and the mean's count, fixed
 * order: deterministic); G rounded once to the input dtype, which is what the gradient GEMMs
 * of a user's framework read; the GEMMs are cuBLAS with fp32 compute (blas.cuh). */
#include "baseline_lce.h"

#include "blas.cuh"
#include "linear_ce_common.cuh" /* dtype_traits::store_round, LCE_DTYPE_SWITCH, lce_block_sum */

namespace {

constexpr int BT = 256; /* threads per block of every baseline kernel */

struct bl_layout {
  size_t logits_off, lse_off, rowloss_off, total;
};

/* header (256 B: the valid count as a double) | logits 4·N·V | lse 4·N | row losses 4·N */
bl_layout bl_layout_of(int64_t N, int64_t V) {
  bl_layout L;
  L.logits_off = 256;
  L.lse_off = L.logits_off + fh_lce::lce_align(sizeof(float) * (size_t)N * (size_t)V);
  L.rowloss_off = L.lse_off + fh_lce::lce_align(sizeof(float) * (size_t)N);
  L.total = L.rowloss_off + fh_lce::lce_align(sizeof(float) * (size_t)N);
  return L;
}

__device__ __forceinline__ bool bl_valid(int64_t y, int64_t ignore_index, int V) {
  return y != ignore_index && y >= 0 && y < V;
}

template <typename T>
__global__ void __launch_bounds__(BT) bl_fwd_row_kernel(const float* __restrict__ logits, const T* __restrict__ bias,
                                                       const int64_t* __restrict__ targets, int V,
                                                       int64_t ignore_index, float* __restrict__ lse,
                                                       float* __restrict__ rowloss, int* __restrict__ err_flag) {
  __shared__ fh_stats scratch[32];
  const int i = blockIdx.x, t = threadIdx.x;
  const int64_t y = targets[i];
  if (!bl_valid(y, ignore_index, V)) { /* block-uniform, before any barrier */
    if (t == 0) {
      if (y != ignore_index) atomicExch(err_flag, (int)FH_DEVERR_TARGET_OUT_OF_RANGE);
      lse[i] = 0.0f, rowloss[i] = 0.0f;
    }
    return;
  }
  const float* row = logits + (int64_t)i * V;
  fh_stats st = fh_stats_identity();
  for (int j = t; j < V; j += BT) fh_stats_add(st, row[j] + (bias ? fh_to_float(bias[j]) : 0.0f));
  st = fh_block_stats(st, scratch);
  if (t == 0) {
    const float l = fh_stats_lse(st), zy = row[y] + (bias ? fh_to_float(bias[y]) : 0.0f);
    lse[i] = l;
    rowloss[i] = l - zy;
  }
}

/* loss = Σ valid row losses (/ their count for mean, 0 when there is none); the count is kept
 * in the workspace header for the backward (no host synchronization). */
__global__ void __launch_bounds__(BT) bl_reduce_kernel(const float* __restrict__ rowloss,
                                                      const int64_t* __restrict__ targets, int N, int V,
                                                      int64_t ignore_index, int mean, float* __restrict__ loss,
                                                      double* __restrict__ count) {
  __shared__ double red[2 * BT];
  double v[2] = {0.0, 0.0};
  for (int i = threadIdx.x; i < N; i += BT)
    if (bl_valid(targets[i], ignore_index, V)) v[0] += rowloss[i], v[1] += 1.0;
  fh_lce::lce_block_sum(red, v, 2);
  if (threadIdx.x == 0) {
    const double s = red[0], n = red[BT];
    loss[0] = (float)(mean ? (n > 0 ? s / n : 0.0) : s);
    *count = n;
  }
}

/* G over the logits, chunk by chunk: every thread reads its logit of the chunk, the block
 * synchronizes, then writes G. A G element (es <= 4 bytes at offset es·j of the row) only
 * overlaps logits of index <= j, which the chunk or an earlier one has read already. */
template <typename T>
__global__ void __launch_bounds__(BT) bl_grad_row_kernel(float* logits, const T* __restrict__ bias,
                                                        const int64_t* __restrict__ targets, int V,
                                                        int64_t ignore_index, const float* __restrict__ lse,
                                                        const float* __restrict__ grad_loss,
                                                        const double* __restrict__ count, int mean) {
  const int i = blockIdx.x, t = threadIdx.x;
  const int64_t y = targets[i];
  const bool valid = bl_valid(y, ignore_index, V); /* ignored rows get G = 0 (the GEMMs read them) */
  double sc = grad_loss[0];
  if (mean) sc = *count > 0 ? sc / *count : 0.0;
  const float scale = (float)sc, l = valid ? lse[i] : 0.0f;
  float* row = logits + (int64_t)i * V;
  T* g = reinterpret_cast<T*>(row);
  for (int c0 = 0; c0 < V; c0 += BT) {
    const int j = c0 + t;
    float gv = 0.0f;
    if (valid && j < V) {
      const float z = row[j] + (bias ? fh_to_float(bias[j]) : 0.0f);
      gv = (expf(z - l) - (j == y ? 1.0f : 0.0f)) * scale; /* p − 1 formed in fp32 */
    }
    __syncthreads(); /* the chunk's logits are all read before G overwrites them */
    if (j < V) g[j] = fh_lce::dtype_traits<T>::store_round(gv);
  }
}

template <typename T>
__global__ void __launch_bounds__(BT) bl_dbias_kernel(const T* __restrict__ G, int64_t ldg, int N, int V,
                                                     T* __restrict__ dbias) {
  const int j = blockIdx.x * BT + threadIdx.x;
  if (j >= V) return;
  float s = 0.0f;
  for (int i = 0; i < N; ++i) s += fh_to_float(G[(int64_t)i * ldg + j]);
  dbias[j] = fh_lce::dtype_traits<T>::store_round(s);
}

/* The arguments (targets only where the op reads them). */
fh_status_t bl_check_args(const char* fn, fh_context_t* ctx, const fh_baseline_lce_args_t* a, bool targets) {
  if (!ctx || !a) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "ctx or args is NULL");
  if (ctx->backend != FH_BACKEND_CUDA || !ctx->cuda)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn, "the baseline runs on a CUDA context only");
  if (a->dtype != FH_DTYPE_F32 && a->dtype != FH_DTYPE_F16 && a->dtype != FH_DTYPE_BF16)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn, "dtype %d: fp32, fp16 or bf16 only", (int)a->dtype);
  if (a->reduction != FH_REDUCTION_MEAN && a->reduction != FH_REDUCTION_SUM)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn, "reduction %d: mean or sum only", (int)a->reduction);
  if (a->N < 0 || a->V < 0 || a->D < 0 || a->lde < (a->D > 1 ? a->D : 1) || a->ldc < (a->D > 1 ? a->D : 1))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "N, V, D = %lld, %lld, %lld with lde %lld, ldc %lld",
                        (long long)a->N, (long long)a->V, (long long)a->D, (long long)a->lde, (long long)a->ldc);
  /* cuBLAS takes int sizes and leading dimensions; G's ld is 4V / sizeof(dtype) */
  if (a->N >= INT32_MAX || a->V >= INT32_MAX / 4 || a->D >= INT32_MAX || a->lde >= INT32_MAX || a->ldc >= INT32_MAX)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn, "a size or stride beyond the int range of cuBLAS");
  if ((a->N > 0 && (!a->E || (targets && !a->targets))) || (a->V > 0 && a->D > 0 && !a->C))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "E, C or targets is NULL");
  return FH_SUCCESS;
}

fh_status_t bl_check(const char* fn, fh_context_t* ctx, const fh_baseline_lce_args_t* a, void* ws, size_t bytes) {
  FH_TRY(bl_check_args(fn, ctx, a, true));
  size_t need = 0;
  FH_TRY(fh_baseline_lce_workspace_size(a->N, a->V, a->dtype, &need));
  return fh_check_workspace(fn, ws, bytes, need);
}

} /* namespace */

extern "C" fh_status_t fh_baseline_lce_workspace_size(int64_t N, int64_t V, fh_dtype_t dtype, size_t* bytes) {
  (void)dtype; /* G reuses the fp32 logits' bytes in every dtype */
  if (!bytes || N < 0 || V < 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, "fh_baseline_lce_workspace_size", "bytes NULL or N, V < 0");
  *bytes = bl_layout_of(N, V).total;
  return FH_SUCCESS;
}

extern "C" fh_status_t fh_baseline_lce_forward(fh_context_t* ctx, const fh_baseline_lce_args_t* a, float* loss,
                                               void* workspace, size_t workspace_bytes) {
  static const char fn[] = "fh_baseline_lce_forward";
  FH_TRY(bl_check(fn, ctx, a, workspace, workspace_bytes));
  if (!loss) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "loss is NULL");
  const bl_layout L = bl_layout_of(a->N, a->V);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  float* logits = reinterpret_cast<float*>(ws + L.logits_off);
  float* lse = reinterpret_cast<float*>(ws + L.lse_off);
  float* rowloss = reinterpret_cast<float*>(ws + L.rowloss_off);
  cudaStream_t stream = ctx->stream;
  const int N = (int)a->N, V = (int)a->V, D = (int)a->D;
  if (N > 0) {
    /* column-major: Lᵀ [V x N] = op(C-storage)ᵀ · E-storage, i.e. C (stored D x V, ld ldc) transposed
     * times Eᵀ (stored D x N, ld lde) */
    FH_TRY(fh_gemm(ctx->cuda->blas, stream, fn, FH_OP_T, FH_OP_N, V, N, D, 1.0f, a->C, (int)a->ldc, a->E, (int)a->lde,
                   a->dtype, 0.0f, logits, V, FH_DTYPE_F32));
    LCE_DTYPE_SWITCH(a->dtype, T, {
      auto k = bl_fwd_row_kernel<T>;
      FH_LAUNCH(k, dim3((unsigned)N), dim3(BT), 0, stream, logits, static_cast<const T*>(a->bias), a->targets, V,
                a->ignore_index, lse, rowloss, fh_cuda_error_flag(ctx->cuda));
      LCE_CHECK_LAUNCH(fn, "bl_fwd_row_kernel");
    });
  }
  FH_LAUNCH(bl_reduce_kernel, dim3(1), dim3(BT), 0, stream, rowloss, a->targets, N, V, a->ignore_index,
            a->reduction == FH_REDUCTION_MEAN ? 1 : 0, loss, reinterpret_cast<double*>(ws));
  LCE_CHECK_LAUNCH(fn, "bl_reduce_kernel");
  return FH_SUCCESS;
}

extern "C" fh_status_t fh_baseline_lce_backward(fh_context_t* ctx, const fh_baseline_lce_args_t* a,
                                                const float* grad_loss, void* dE, int64_t ld_dE, void* dC,
                                                int64_t ld_dC, void* dbias, void* workspace, size_t workspace_bytes) {
  static const char fn[] = "fh_baseline_lce_backward";
  FH_TRY(bl_check(fn, ctx, a, workspace, workspace_bytes));
  if (!grad_loss) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "grad_loss is NULL");
  const int64_t dmin = a->D > 1 ? a->D : 1;
  if ((dE && (ld_dE < dmin || ld_dE >= INT32_MAX)) || (dC && (ld_dC < dmin || ld_dC >= INT32_MAX)))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "ld_dE %lld / ld_dC %lld: must be in [max(D, 1), 2^31)",
                        (long long)ld_dE, (long long)ld_dC);
  if (dbias && !a->bias) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "dbias without a bias");
  const bl_layout L = bl_layout_of(a->N, a->V);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  float* logits = reinterpret_cast<float*>(ws + L.logits_off);
  const float* lse = reinterpret_cast<const float*>(ws + L.lse_off);
  const double* count = reinterpret_cast<const double*>(ws);
  cudaStream_t stream = ctx->stream;
  const int N = (int)a->N, V = (int)a->V, D = (int)a->D;
  const int ldg = (int)(4 * a->V / (int64_t)fh_dtype_size(a->dtype));
  if (N > 0) {
    LCE_DTYPE_SWITCH(a->dtype, T, {
      auto k = bl_grad_row_kernel<T>;
      FH_LAUNCH(k, dim3((unsigned)N), dim3(BT), 0, stream, logits, static_cast<const T*>(a->bias), a->targets, V,
                a->ignore_index, lse, grad_loss, count, a->reduction == FH_REDUCTION_MEAN ? 1 : 0);
      LCE_CHECK_LAUNCH(fn, "bl_grad_row_kernel");
    });
  }
  /* G is row-major [N x V] with ld ldg, i.e. column-major Gᵀ [V x N]. */
  if (dE) /* dEᵀ [D x N] = Cᵀ (C stored D x V) · Gᵀ (stored V x N) */
    FH_TRY(fh_gemm(ctx->cuda->blas, stream, fn, FH_OP_N, FH_OP_N, D, N, V, 1.0f, a->C, (int)a->ldc, logits,
                   ldg > 1 ? ldg : 1, a->dtype, 0.0f, dE, (int)ld_dE, a->dtype));
  if (dC) /* dCᵀ [D x V] = Eᵀ (stored D x N) · G (the transpose of the stored V x N) */
    FH_TRY(fh_gemm(ctx->cuda->blas, stream, fn, FH_OP_N, FH_OP_T, D, V, N, 1.0f, a->E, (int)a->lde, logits,
                   ldg > 1 ? ldg : 1, a->dtype, 0.0f, dC, (int)ld_dC, a->dtype));
  if (dbias && V > 0) {
    LCE_DTYPE_SWITCH(a->dtype, T, {
      auto k = bl_dbias_kernel<T>;
      FH_LAUNCH(k, dim3(fh_lce::lce_blocks(V, BT)), dim3(BT), 0, stream, reinterpret_cast<const T*>(logits),
                (int64_t)ldg, N, V, static_cast<T*>(dbias));
      LCE_CHECK_LAUNCH(fn, "bl_dbias_kernel");
    });
  }
  return FH_SUCCESS;
}

extern "C" fh_status_t fh_baseline_logits(fh_context_t* ctx, const fh_baseline_lce_args_t* a, float* logits) {
  static const char fn[] = "fh_baseline_logits";
  FH_TRY(bl_check_args(fn, ctx, a, false));
  if (!logits && a->N > 0 && a->V > 0) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "logits is NULL");
  if (a->N == 0 || a->V == 0) return FH_SUCCESS;
  /* column-major, as the forward: Lᵀ [V x N] = (C stored D x V)ᵀ · (Eᵀ stored D x N) */
  return fh_gemm(ctx->cuda->blas, ctx->stream, fn, FH_OP_T, FH_OP_N, (int)a->V, (int)a->N, (int)a->D, 1.0f, a->C,
                 (int)a->ldc, a->E, (int)a->lde, a->dtype, 0.0f, logits, (int)a->V, FH_DTYPE_F32);
}
