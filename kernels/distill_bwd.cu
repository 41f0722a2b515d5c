/* Distillation backward on the tile engine (docs/distillation_cuda.md): student gradients
 * dEs = G·Cs, dCs = Gᵀ·Es, dbs_j = Σ_i G_ij without storing G, for every divergence of the dense
 * teacher. Per valid row i (fusedhead.h), from the forward's row state (lse(u), lse(v), S = Σ q a,
 * lse(s)) and the upstream factor a_i (grad_loss, ÷ N_valid or the divisor for the mean):
 *     G_ij = a_i [ soft_weight κ / T (qa_ij − q_ij S_i) + hard_weight (softmax(s_i)_j − δ_{j,y_i}) ]
 * with X = u − lse(u), Y = v − lse(v), q = e^X, qa from the divergence element
 * (kernels/distill_div.cuh), p − δ at the target formed as expm1 (no cancellation). fp32 heads
 * recompute the forward's first pass (launch_row_stats) for m and ln Z of u, v, s and form
 * X = (u − m_u) − ln Z_u etc., so the fp32 lse of the row state, whose rounding is 2^-24 |lse|,
 * never reaches a probability (docs/linear_ce.md "Precision"); S still comes from the state.
 *
 * Each (row block, class tile) recomputes both logit tiles with the forward's mainloops and
 * tiling (bitwise the forward's logits): the teacher's Y and the student's X are parked in
 * shared memory over the stage buffers, G tile and staging chunk (free at that point), one rolled loop forms
 * the soft part of G per entry (one copy of the divergence code), the hard part is added in
 * registers from the student's accumulators, and G goes to shared memory for the streamed GEMMs
 * of kernels/grad_common.cuh, shared with the linear CE backward: the same kernels' structure
 * (row-owner kernel for dE, class-owner kernel for dC, dbias and, in FP32 mode, dE by fp32
 * atomics), the same accumulation modes (FP32, DETERMINISTIC, OUTPUT_DTYPE), workspace pieces and
 * row passes. The teacher costs one recompute GEMM per tile and no backward GEMM. No tile
 * filtering: a divergence's gradient is not bounded by the student's p alone.
 * Workspace: 256 B + 4N (rows) + 36N (row coefficients) + the accumulators' pieces
 * (grad_ws_of: FP32 mode 16-bit 2·V·D_s + 4·N·D_s, or half the rows from N = 2048 on;
 * DETERMINISTIC 16-bit 2·(N + V)·D_s; OUTPUT_DTYPE and fp32 none); fp32 heads add the
 * recomputed row statistics (28N) and their partials (28·S·N). */
#include <math.h>

#include "distill_cuda.cuh"
#include "distill_sparse.cuh"
#include "grad_common.cuh"

namespace fh_dst {

using fh_lce::bwd_smem;
using fh_lce::grad_dst;
using fh_lce::TBM;
using fh_lce::TBV;

/* Row coefficients: m and ln Z of u (0, 1) and of v (2, 3), S (4), m and ln Z of s (5, 6), soft
 * factor (7), hard factor (8); without the recompute m = lse and ln Z = 0. A sparse teacher has
 * its a_R in row 2 (row 3 is 0); kernels/distill_sparse.cuh reads rows 0, 1, 2, 4, 7. */
constexpr int NC = 9;
static_assert(NC <= fh_lce::NCOEF, "the coefficients fit bwd_smem's rows");

/* The parked tiles (2 x 64 KiB): the student's X from offset 0 (over the stage buffers, free
 * once its mainloop has returned, and the start of the G tile), the teacher's Y at park_y_off
 * (over the G tile and staging chunk), extended past the staging chunk by this gap where those
 * are smaller (sm_80, 16-bit types: 12 KiB, 133 KiB in all; fp32: none, bwd_smem's 137 KiB;
 * the sm_90a ring: none, 204 KiB). */
template <typename T, typename Align>
struct park_gap {
  static constexpr size_t ring = fh_eng::ring<Align>::bytes;
  static constexpr size_t before_coef = ring + bwd_smem<T>::g_b + bwd_smem<T>::o_b;
  static constexpr size_t need = park_y_off<Align>() + PARK_BYTES;
  static constexpr size_t value = need > before_coef ? need - before_coef : 0;
  static constexpr size_t smem_bytes = bwd_smem<T>::bytes_for(ring) + value;
};
static_assert(PARK_BYTES >= fh_eng::SMEM_BYTES, "the student's park covers the stage buffers");

struct bwd_params {
  head hs, ht;
  int N, V, vt;
  float invT;
  int hard;
  dev_div dv;
  const int* rows;
  const lce_ws_header* hdr;
  const float* coef; /* [NC x N] */
  const int64_t* targets;
  grad_dst dE, dC;
  void* dbias;
  int accumulate;
  int r_lo, r_hi; /* cols kernel: only the valid rows with original index in [r_lo, r_hi) */
  float* db32;
  int db_last;
  sparse_bwd sp; /* ids NULL: dense teacher */
};

template <typename T>
__device__ __forceinline__ void load_row_block(const bwd_params& p, bwd_smem<T>& sm, int row0, int nr) {
  load_rows(sm.rows, p.rows, row0, nr);
  for (int r = threadIdx.x; r < TBM; r += fh_eng::THREADS) {
    sm.y[r] = r < nr && p.targets ? (int)p.targets[sm.rows[r]] : -1;
    for (int q = 0; q < NC; ++q) sm.coef[q * TBM + r] = r < nr ? p.coef[(size_t)q * p.N + sm.rows[r]] : 0.0f;
  }
  __syncthreads();
}

/* Recompute both tiles and form G in the accumulator registers (0 past the valid rows and
 * classes). Ends with a barrier: the parked tiles (over sm.g) are read before store_g. */
template <typename T, typename Align>
__device__ __forceinline__ void g_tile(const bwd_params& p, bwd_smem<T>& sm, fh_eng::acc_t& acc, int nr, int v0) {
  using namespace fh_eng;
  const int nv = p.V - v0 < TBV ? p.V - v0 : TBV;
  float* park_x = (float*)sm.stages; /* written after the student's mainloop */
  float* park_y = (float*)(sm.stages + park_y_off<Align>());
  float m[SLOTS], lnz[SLOTS];
  float bj[NJ][2];
  if (!p.sp.ids) { /* a sparse teacher has no tile (kernels/distill_sparse.cuh) */
    FH_UNROLL
    for (int s = 0; s < SLOTS; ++s) m[s] = sm.coef[2 * TBM + slot_row(s)], lnz[s] = sm.coef[3 * TBM + slot_row(s)];
    head_tile<T, Align>(acc, bj, p.ht, sm.rows, nr, v0, nv, sm.stages);
    park_log_probs(park_y, acc, bj, m, lnz, p.invT);
  }
  FH_UNROLL
  for (int s = 0; s < SLOTS; ++s) m[s] = sm.coef[slot_row(s)], lnz[s] = sm.coef[TBM + slot_row(s)];
  head_tile<T, Align>(acc, bj, p.hs, sm.rows, nr, v0, nv, sm.stages);
  park_log_probs(park_x, acc, bj, m, lnz, p.invT);
  /* The soft part, rolled, over the parked tiles: park_x becomes cs (qa − q S). */
  if (p.sp.ids) {
    sparse_g_soft(p.sp, sm.rows, sm.coef, TBM, park_x, nr, v0, nv);
  } else {
    FH_NO_UNROLL
    for (int s = 0; s < SLOTS; ++s) {
      const int r = slot_row(s);
      const float S = sm.coef[4 * TBM + r], cs = sm.coef[7 * TBM + r];
      FH_NO_UNROLL
      for (int je = 0; je < 2 * NJ; ++je) {
        const int j = je >> 1, e = je & 1;
        const float X = parked(park_x, s, j, e);
        float term, qa;
        div_eval(p.dv, X, parked(park_y, s, j, e), term, qa);
        park_x[((s * NJ + j) * 2 + e) * THREADS + threadIdx.x] = cs * (qa - expf(X) * S);
      }
    }
  }
  /* The hard part from the student's raw logits, still in the accumulators. */
  FH_UNROLL
  for (int s = 0; s < SLOTS; ++s) {
    const int r = slot_row(s), y = sm.y[r];
    const float ms = sm.coef[5 * TBM + r], ls = sm.coef[6 * TBM + r], ch = sm.coef[8 * TBM + r];
    FH_UNROLL
    for (int j = 0; j < NJ; ++j)
      FH_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int c = frag_col(j, e);
        float g = 0.0f;
        if (r < nr && c < nv) {
          g = parked(park_x, s, j, e);
          if (p.hard) {
            const float d = __fsub_rn(raw_logit(slot_acc(acc, s, j, e), bj[j][e]) - ms, ls);
            g += ch * (v0 + c == y ? expm1f(d) : expf(d)); /* p − δ */
          }
        }
        slot_acc(acc, s, j, e) = g;
      }
  }
  __syncthreads();
}

template <typename T, typename Align>
__global__ void __launch_bounds__(fh_eng::THREADS, 1) distill_bwd_rows_kernel(const __grid_constant__ bwd_params p) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  bwd_smem<T> sm(smem, park_gap<T, Align>::value, fh_eng::ring<Align>::bytes);
  const int count = p.hdr->count, row0 = blockIdx.x * TBM;
  if (row0 >= count) return;
  const int nr = count - row0 < TBM ? count - row0 : TBM;
  load_row_block<T>(p, sm, row0, nr);
  for (int tile = 0; tile < p.vt; ++tile) { /* class order: fixed, so dE is deterministic */
    const int v0 = tile * TBV, nv = p.V - v0 < TBV ? p.V - v0 : TBV;
    fh_eng::acc_t acc;
    g_tile<T, Align>(p, sm, acc, nr, v0);
    fh_lce::store_g<T, Align>(sm, acc);
    fh_lce::grad_gemm_rows<T, Align>(sm, p.dE, (const T*)p.hs.C, p.hs.ldc, v0, nv, p.hs.D, nr);
  }
}

template <typename T, typename Align>
__global__ void __launch_bounds__(fh_eng::THREADS, 1) distill_bwd_cols_kernel(const __grid_constant__ bwd_params p) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  bwd_smem<T> sm(smem, park_gap<T, Align>::value, fh_eng::ring<Align>::bytes);
  const int count = p.hdr->count, v0 = blockIdx.x * TBV, nv = p.V - v0 < TBV ? p.V - v0 : TBV;
  __shared__ int range[2];
  fh_lce::compacted_range(p.rows, count, p.r_lo, p.r_hi, range);
  const int c_lo = range[0], c_hi = range[1];
  float db = 0.0f; /* thread c < 128 owns dbias[v0 + c] */
  for (int row0 = c_lo; row0 < c_hi; row0 += TBM) { /* row order: dC and dbias deterministic */
    const int nr = c_hi - row0 < TBM ? c_hi - row0 : TBM;
    __syncthreads(); /* the previous block's readers of the row data are done */
    load_row_block<T>(p, sm, row0, nr);
    fh_eng::acc_t acc;
    g_tile<T, Align>(p, sm, acc, nr, v0);
    if (p.dbias) fh_lce::dbias_tile<T, Align>(sm, acc, db);
    const bool want_c = p.dC.kind != fh_lce::ST_NONE;
    const bool tr = fh_lce::store_g_for<T, Align>(sm, acc, want_c);
    if (want_c) fh_lce::grad_gemm_cols<T, Align>(sm, p.dC, (const T*)p.hs.E, p.hs.lde, nr, v0, nv, p.hs.D);
    if (p.dE.kind != fh_lce::ST_NONE) {
      fh_lce::g_for_rows<T, Align>(sm, tr);
      fh_lce::grad_gemm_rows<T, Align>(sm, p.dE, (const T*)p.hs.C, p.hs.ldc, v0, nv, p.hs.D, nr);
    }
  }
  fh_lce::dbias_store<T>(p.dbias, p.db32, p.db_last, p.accumulate, v0, p.V, db);
}

/* Per-row coefficients in fp64 after the fixed-order valid count (1 block). */
struct coef_params {
  const int64_t* targets;
  int64_t ignore_index;
  int N, V, reduction;
  float divisor;
  double soft, hard; /* soft_weight κ / T, hard_weight */
  const float* state;
  const float* rs; /* fp32: [RS x N] recomputed m, ln Z of u, v, s (launch_row_stats), else NULL */
  int sparse;      /* the state's slot 1 is the sparse teacher's a_R: coef row 2 takes it as is */
  const float* grad_loss;
  float* coef;
};

__global__ void __launch_bounds__(256) distill_bwd_coef_kernel(coef_params p) {
  __shared__ double red[256];
  double v[1] = {0.0};
  for (int i = threadIdx.x; i < p.N; i += 256) {
    int64_t y;
    v[0] += row_valid(p.targets, p.ignore_index, p.V, i, &y) ? 1.0 : 0.0;
  }
  lce_block_sum(red, v, 1);
  const double den = p.divisor > 0.0f ? (double)p.divisor : red[0];
  const double inv = den > 0.0 ? fh_lce::lce_recip(den) : 0.0; /* a zero denominator gives 0 */
  const size_t N = (size_t)p.N;
  for (int i = threadIdx.x; i < p.N; i += 256) {
    int64_t y;
    if (!row_valid(p.targets, p.ignore_index, p.V, i, &y)) continue;
    double a = p.reduction == FH_REDUCTION_NONE ? p.grad_loss[i] : p.grad_loss[0];
    if (p.reduction == FH_REDUCTION_MEAN) a *= inv;
    const float* st = p.state + (size_t)i * 4; /* lse(u), lse(v), S, lse(s) */
    static const int slot[3] = {0, 2, 5};      /* where m of u, v, s go */
    for (int h = 0; h < 3; ++h) {
      const int q = h < 2 ? h : 3; /* the state's lse of that softmax */
      const bool rec = p.rs && !(h == 1 && p.sparse);
      p.coef[slot[h] * N + i] = rec ? p.rs[(size_t)(2 * h) * N + i] : st[q];
      p.coef[(slot[h] + 1) * N + i] = rec ? p.rs[(size_t)(2 * h + 1) * N + i] : 0.0f;
    }
    p.coef[4 * N + i] = st[2];
    p.coef[7 * N + i] = (float)(a * p.soft);
    p.coef[8 * N + i] = (float)(a * p.hard);
  }
}

/* The gradient layout shared with linear CE, then for fp32 heads the recomputed row statistics
 * [RS x N] and the forward's pass-1 partials they come from. */
struct bwd_layout {
  fh_lce::grad_layout g;
  size_t rs_off, part_off, total;
};
static bool recompute_stats(fh_dtype_t dtype) { return dtype == FH_DTYPE_F32; }
static bwd_layout bwd_layout_of(int64_t N, int64_t V, int64_t D, fh_dtype_t dtype, fh_accum_mode_t mode) {
  bwd_layout L;
  L.g = fh_lce::grad_layout_of(N, V, D, dtype, mode, NC); /* every gradient wanted: the query's contract */
  const bool rec = recompute_stats(dtype);
  const fwd_layout F = fwd_layout_of(N, V);
  L.rs_off = L.g.total;
  L.part_off = L.rs_off + (rec ? fh_lce::lce_align(sizeof(float) * RS * (size_t)N) : 0);
  L.total = L.part_off + (rec ? fh_lce::lce_align(sizeof(float) * NQ1 * (size_t)F.S * (size_t)N) : 0);
  return L;
}

template <typename T, typename Align, bool ROWS>
static fh_status_t launch_bwd(const char* fn, dim3 grid, cudaStream_t stream, const bwd_params& bp) {
  auto k = ROWS ? distill_bwd_rows_kernel<T, Align> : distill_bwd_cols_kernel<T, Align>;
  constexpr size_t smem = park_gap<T, Align>::smem_bytes;
  FH_TRY(fh_cuda_status(fh_eng::allow_smem<smem, fh_eng::optin<Align>::max>(k), fn,
                        "cudaFuncSetAttribute(distill_bwd kernel)"));
  FH_LAUNCH(k, grid, dim3(fh_eng::THREADS), smem, stream, bp);
  LCE_CHECK_LAUNCH(fn, ROWS ? "distill_bwd_rows_kernel" : "distill_bwd_cols_kernel");
  return FH_SUCCESS;
}

} /* namespace fh_dst */

using namespace fh_dst;

extern "C" fh_status_t fh_cuda_distill_backward_workspace(int64_t N, int64_t V, int64_t D_s, fh_dtype_t dtype,
                                                          fh_accum_mode_t mode, size_t* bytes) {
  *bytes = bwd_layout_of(N, V, D_s, dtype, mode).total; /* sparse: + fh_cuda_distill_sparse_workspace */
  return FH_SUCCESS;
}

extern "C" fh_status_t fh_cuda_distill_backward(fh_cuda_state_t* st, struct CUstream_st* stream,
                                                const fh_distill_problem_t* p, const fh_distill_grad_inputs_t* in,
                                                const fh_distill_grads_t* grads, void* workspace) {
  const char* fn = p->fn;
  FH_TRY(check_problem(fn, p));
  const fh_distill_options_t* o = &p->opt;
  const fh_dtype_t dtype = p->Es->dtype;
  const bwd_layout L = bwd_layout_of(p->N, p->V, p->D_s, dtype, o->accum_mode);
  unsigned char* ws = (unsigned char*)workspace;
  lce_ws_header* hdr = (lce_ws_header*)ws;
  int* rows = (int*)(ws + L.g.rows_off);
  float* coef = (float*)(ws + L.g.coef_off);
  float* rs = recompute_stats(dtype) && p->N > 0 ? (float*)(ws + L.rs_off) : NULL;
  const fh_lce::grad_plan g =
      fh_lce::grad_plan_of(o->accum_mode, dtype, grads->dE, grads->dC, grads->dbias, p->bs != NULL, ws, L.g, o->accumulate);
  if (!g.any) return FH_SUCCESS; /* nothing wanted: nothing computed or written */
  const fwd_layout FL = fwd_layout_of(p->N, p->V);
  const fwd_params fp = make_fwd_params(p, rows, hdr, NULL, FL);
  bwd_params bp;
  bp.hs = fp.hs, bp.ht = fp.ht;
  bp.N = (int)p->N, bp.V = (int)p->V, bp.vt = FL.vt;
  bp.invT = fp.invT, bp.hard = fp.hard, bp.dv = fp.dv;
  bp.rows = rows, bp.hdr = hdr, bp.coef = coef, bp.targets = p->targets;
  bp.dE = g.dE, bp.dC = g.dC;
  bp.dbias = g.dbias;
  bp.accumulate = o->accumulate != 0;
  bp.r_lo = 0, bp.r_hi = bp.N;
  bp.db32 = NULL, bp.db_last = 1;
  bp.sp = sparse_bwd{NULL, NULL, 0};
  {
    FH_TRY(lce_launch_prep_rows(fn, stream, p->targets, p->N, p->V, o->ignore_index, rows, hdr,
                                fh_cuda_error_flag(st)));
    if (rs) FH_TRY(launch_row_stats(fn, stream, p, rows, hdr, rs, (float*)(ws + L.part_off)));
    coef_params cp;
    cp.targets = p->targets, cp.ignore_index = o->ignore_index;
    cp.N = (int)p->N, cp.V = (int)p->V, cp.reduction = (int)o->reduction, cp.divisor = o->divisor;
    const double T = o->temperature, kappa = o->scale_by_t_squared ? T * T : 1.0;
    cp.soft = (double)o->soft_weight * kappa / T, cp.hard = o->hard_weight;
    cp.state = in->row_state, cp.rs = rs, cp.sparse = p->sparse != 0, cp.grad_loss = in->grad_loss, cp.coef = coef;
    FH_LAUNCH(distill_bwd_coef_kernel, dim3(1), dim3(256), 0, stream, cp);
    LCE_CHECK_LAUNCH(fn, "distill_bwd_coef_kernel");
    if (p->sparse) FH_TRY(sparse_backward_prep(fn, fh_cuda_error_flag(st), stream, p, coef, ws + L.total, &bp.sp));
  }
  const size_t es = fh_dtype_size(dtype);
  const bool vec = operands_vec16(p) && p->D_s % 8 == 0 && fh_lce::dst_vec_ok(bp.dE, es) &&
                   fh_lce::dst_vec_ok(bp.dC, es);
  LCE_DTYPE_SWITCH(dtype, T, {
    const bool tma = heads_tma90<T>(vec, p, bp.hs, bp.ht);
    auto launch = [&](bool row_owner, dim3 grid, const bwd_params& q) -> fh_status_t {
      if (tma) return row_owner ? launch_bwd<T, fh_eng::tma90_for<T>, true>(fn, grid, stream, q)
                                : launch_bwd<T, fh_eng::tma90_for<T>, false>(fn, grid, stream, q);
      if (vec) return row_owner ? launch_bwd<T, fh_eng::vec16, true>(fn, grid, stream, q)
                           : launch_bwd<T, fh_eng::vec16, false>(fn, grid, stream, q);
      return row_owner ? launch_bwd<T, fh_eng::scalar, true>(fn, grid, stream, q)
                  : launch_bwd<T, fh_eng::scalar, false>(fn, grid, stream, q);
    };
    FH_TRY((fh_lce::grad_passes<T>(fn, stream, g, bp, p->N, p->V, (int)p->D_s, bp.vt, launch)));
  });
  return FH_SUCCESS;
}
