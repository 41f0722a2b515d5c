/* The sparse (offline) teacher on the CUDA backend (docs/distillation_cuda.md "Sparse teacher"):
 * what the dense distillation passes call through their hooks. The forward runs the dense
 * statistics kernel with the teacher skipped (lse of s/T and s, s_y), then
 * distill_sparse_row_kernel (kernels/distill_sparse.cu) in place of the divergence tiles; the
 * backward runs the same row kernel to turn each row's K entries into gradient corrections and
 * forms G in the dense backward's tile kernels with sparse_g_soft below:
 *     G_ij = cs_i q_ij (a_R,i − S_i)            for every class j (the off-support form)
 *          + cs_i (qa_ik − q_ik a_R,i)           added at j = id_ik (the support's correction)
 * with cs the row's soft factor (upstream · soft_weight κ / T), a_R the rest bucket's a and
 * S = Σ q a from the forward's row state (fusedhead.h, docs/distillation.md "Sparse teacher"). */
#pragma once

#include "distill_cuda.cuh"

namespace fh_dst {

/* The backward's per-row sparse data in the workspace (NULL ids: dense teacher). */
struct sparse_bwd {
  const int* ids;    /* [N x K]: the row's ids as int32; -1 for a row the checks rejected */
  const float* corr; /* [N x K]: cs (qa − q a_R) at each id */
  int K;
};

/* The soft part of G of one tile from the parked X = (u − m) − ln Z (park_log_probs' thread-private
 * layout): every entry becomes cs q (a_R − S), then each of the row's K ids that falls in one of
 * this thread's columns (frag_col: warp_n · WN + 8 j + 2 (lane & 3) + e) gets its correction.
 * Cost per thread and tile: SLOTS · K id reads (the four lanes of a row read the same ids). */
__device__ __forceinline__ void sparse_g_soft(const sparse_bwd& sp, const int* rows, const float* coef, int coef_ld,
                                              float* park_x, int nr, int v0, int nv) {
  using namespace fh_eng;
  const int lane = (int)(threadIdx.x & 31), wn0 = warp_n() * WN;
  FH_NO_UNROLL
  for (int s = 0; s < SLOTS; ++s) {
    const int r = slot_row(s);
    const float off = coef[7 * coef_ld + r] * (coef[2 * coef_ld + r] - coef[4 * coef_ld + r]); /* cs (a_R − S) */
    FH_NO_UNROLL
    for (int je = 0; je < 2 * NJ; ++je) {
      float& x = park_x[(s * NJ * 2 + je) * THREADS + threadIdx.x];
      x = off * expf(x);
    }
    if (r >= nr) continue;
    const int* ids = sp.ids + (size_t)rows[r] * sp.K;
    const float* corr = sp.corr + (size_t)rows[r] * sp.K;
    FH_NO_UNROLL
    for (int k = 0; k < sp.K; ++k) {
      const int c = ids[k] - v0; /* -1 (rejected row) stays negative */
      if (c < 0 || c >= nv || c - wn0 < 0 || c - wn0 >= WN || ((c & 7) >> 1) != (lane & 3)) continue;
      park_x[(s * NJ * 2 + ((c - wn0) >> 3) * 2 + (c & 1)) * THREADS + threadIdx.x] += corr[k];
    }
  }
}

/* Host side (kernels/distill_sparse.cu). The sparse area follows the dense workspace: forward
 * 4 N K bytes (each entry's X), backward 8 N K (corrections and int32 ids). */
size_t sparse_ws_bytes(int64_t N, int64_t K, bool backward);
/* Forward, after distill_fin_stats_kernel: per valid row D and S into part [2 x N] (the layout
 * of one vocabulary split) and a_R into aR [N]. */
fh_status_t sparse_forward_rows(const char* fn, int* err, cudaStream_t stream, const fh_distill_problem_t* p,
                                const float* m_u, const float* lnz_u, float* part, float* aR, void* area);
/* Backward, after distill_bwd_coef_kernel: the corrections and ids of every valid row. */
fh_status_t sparse_backward_prep(const char* fn, int* err, cudaStream_t stream, const fh_distill_problem_t* p,
                                 const float* coef, void* area, sparse_bwd* out);

} /* namespace fh_dst */
