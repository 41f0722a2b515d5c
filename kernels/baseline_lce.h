/* baseline_lce.h: the unfused linear cross-entropy a user would otherwise run (internal; not part
 * of include/fusedhead.h). It exists for bench/bench_linear_ce.c to time against, and is
 * validated against the CPU reference by the kernel_baseline_lce suite (and gpu_baseline_lce).
 *
 * What it does, as PyTorch's `F.cross_entropy(E @ C.T + b)` does, on the context's stream:
 *   forward:  logits L = E·Cᵀ, fp32 [N x V], one cuBLAS GEMM (fp32 output, fp32 compute); one
 *             block per row: lse_i = log Σ_j e^{L_ij + b_j}, loss_i = lse_i − (L_iy + b_y);
 *             one block reduces Σ loss_i (and the valid count) in a fixed order.
 *   backward: one block per row writes G_ij = (p_ij − δ_jy)·scale in the input dtype over the
 *             logits buffer (each G row starts where its logit row started); dE = G·C and
 *             dC = Gᵀ·E by two cuBLAS GEMMs (fp32 compute, output in the input dtype),
 *             dbias_j = Σ_i G_ij by a column-sum kernel.
 * Options: ignore_index, reduction mean (over valid rows) or sum, bias; fp32/fp16/bf16 inputs.
 * No label smoothing, weights, scale, softcap, z-loss. A target outside [0, V) that is not
 * ignore_index raises the context's device error flag (fh_context_check reports it) and the
 * row counts as ignored. Ignored rows' logits are computed (as in PyTorch) and get G = 0; a NaN
 * in an ignored row of E therefore reaches dC through 0·NaN, as it would in PyTorch.
 *
 * Memory: the workspace holds the logits (4·N·V bytes) plus O(N): that is the point of the
 * comparison. The backward consumes the logits (G overwrites them), so every backward needs
 * its own forward before it, on the same workspace.
 * All pointers are device pointers (host memory under the SIMT emulator). */
#ifndef FH_KERNELS_BASELINE_LCE_H
#define FH_KERNELS_BASELINE_LCE_H

#include <stddef.h>
#include <stdint.h>

#include "fusedhead.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fh_baseline_lce_args {
  int64_t N, V, D;
  fh_dtype_t dtype;          /* fp32, fp16 or bf16 (E, C, bias, dE, dC, dbias) */
  const void* E;             /* [N x D], row stride lde (elements) */
  int64_t lde;
  const void* C;             /* [V x D], row stride ldc */
  int64_t ldc;
  const void* bias;          /* [V] or NULL */
  const int64_t* targets;    /* [N] */
  int64_t ignore_index;
  fh_reduction_t reduction;  /* FH_REDUCTION_MEAN or FH_REDUCTION_SUM */
} fh_baseline_lce_args_t;

/* Workspace bytes for the forward and the backward that follows it (the same buffer). */
fh_status_t fh_baseline_lce_workspace_size(int64_t N, int64_t V, fh_dtype_t dtype, size_t* bytes);

/* loss: device fp32 [1]. Statuses: FH_ERR_INVALID_ARGUMENT, FH_ERR_UNSUPPORTED (CPU context,
 * fp64, a shape beyond int range), FH_ERR_INSUFFICIENT_WORKSPACE, FH_ERR_CUDA. */
fh_status_t fh_baseline_lce_forward(fh_context_t* ctx, const fh_baseline_lce_args_t* a, float* loss, void* workspace,
                                    size_t workspace_bytes);

/* The forward's first step alone: logits [N x V] fp32 (row stride V) = E·Cᵀ by one cuBLAS GEMM
 * (bias, targets and reduction are not read). bench/bench_decode.c samples from it with
 * fh_decode_from_logits: the unfused decoding a serving engine runs. Statuses as the forward. */
fh_status_t fh_baseline_logits(fh_context_t* ctx, const fh_baseline_lce_args_t* a, float* logits);

/* grad_loss: device fp32 [1]. dE [N x D] (row stride ld_dE), dC [V x D] (ld_dC), dbias [V]:
 * each in a.dtype, NULL when not wanted; overwritten. The workspace must hold this problem's
 * forward results. */
fh_status_t fh_baseline_lce_backward(fh_context_t* ctx, const fh_baseline_lce_args_t* a, const float* grad_loss,
                                     void* dE, int64_t ld_dE, void* dC, int64_t ld_dC, void* dbias, void* workspace,
                                     size_t workspace_bytes);

#ifdef __cplusplus
}
#endif

#endif
