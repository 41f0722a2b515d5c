/* Linear cross-entropy backward: dE = G·C, dC = Gᵀ·E, dbias_j = Σ_i G_ij without storing G.
 *
 * G (fusedhead.h), per valid row i with upstream factors a_i (÷ D_ce), b_i (÷ D_reg):
 *     G_ij = [K4 (p_ij − δ_jy) + p_ij (K1 − K2 (log p_ij + h_i)) − K3 w_j] · softcap' · scale
 *     K4 = a w_y (1−α), K3 = a ε_i, K1 = a ε_i W_i + 2 b λ lse_i + grad_lse_i, K2 = b η,
 *     softcap' = 1 − (z/c)², log p = z − lse_i from the forward's lse; ε_i = α / V_i and W_i over
 *     the row's unmasked classes, and G_ij = 0 for a masked class (raw logit -inf,
 *     docs/conventions.md). With label smoothing V_i and W_i come from one pass of the forward's
 *     tile kernel (lce_launch_row_stats): 2·N·V·D more FLOPs, only then. fp32 inputs take the
 *     same pass for m_i, ln Z_i and h_i and use log p = (z − m_i) − ln Z_i (docs/linear_ce.md
 *     "Precision": the forward's fp32 lse would cost 2^-24 |lse| relative in every p).
 * K's are formed per row in fp64 by lce_bwd_coef_kernel (one block; the denominators are summed
 * on the device in a fixed order), rounded to fp32. G is fp32; p_y − 1 is expm1f(z_y − lse) (no
 * cancellation: Liger's fix, and better than forming p first); G is rounded to the input dtype
 * (fp32 stays fp32) only as an mma operand, as CCE does.
 *
 * Shapes: E [N x D], C [V x D], bias [V]; 128 compacted rows x 128 classes per tile, 256 threads
 * (the engine's tile, docs/engine.md; 384 on sm_90a, with the warp-specialized loop's producer
 * warpgroup: docs/hopper.md "The warp-specialized backward"); each logit tile is recomputed by
 * the forward's mainloop with the forward's decomposition, so z is bitwise the forward's. G is
 * formed in registers, stored once to shared memory (grad_common.cuh), and the gradient GEMMs
 * stream C or E through the engine's second arrangement (engine/stream.cuh) in 128-byte chunks
 * of D, each chunk's result added to its destination by 16-byte read-modify-writes.
 *
 * Filter (CCE): a tile is skipped for dE (filter_e_grad) / dC and dbias (filter_c_grad) when every
 * |p_ij − δ_jy| < filter_eps ("auto": eps(dtype)/32). It is tested on the unscaled softmax
 * gradient, before any upstream factor. It is off (every tile computed) when label smoothing or
 * the entropy term is on: those give every entry a gradient not bounded by p (ε w_j, p log p)
 * whose sum over the skipped tiles would be a systematic, not a rounding-level, error.
 *
 * Two tile kernels, both owner-computes (each output element has one writer, which adds its
 * contributions in a fixed order):
 *   lce_bwd_rows_kernel: block b owns compacted rows [128b, 128b+128) and loops over every class
 *     tile in order: dE rows += G·C_tile.
 *   lce_bwd_cols_kernel: block v owns classes [128v, 128v+128) and loops over every row block in
 *     order: dC rows += Gᵀ·E_rows, dbias in fp32 registers; optionally (mode FP32) also
 *     dE += G·C_tile with fp32 atomics, so one pass produces every gradient.
 * Accumulation modes (fusedhead.h fh_accum_mode_t), with Gemma-2 (N=8192, D=2304, V=256000, bf16)
 * sizes:
 *   FH_ACCUM_FP32 (default): cols kernel only (6·N_valid·V·D FLOPs: recompute + 2 GEMMs).
 *     dC accumulates exclusively in fp32: in the output when fp32, else as "split fp32" (the high
 *     16 bits of each fp32 accumulator live in the caller's 16-bit dC buffer, the low 16 bits in
 *     the workspace, combined and rounded to nearest once at the end). dE: fp32 atomics into the
 *     output (fp32) or an fp32 workspace cast down at the end. That copy holds half the rows
 *     when N >= 2048: the cols kernel then runs twice, once per half (no extra recompute beyond
 *     one partial tile per class tile and pass), and dbias is carried in fp32 between the passes.
 *     Workspace 2 B·V·D + 2 B·N·D (+ 4 B·V) for N >= 2048, 2 B·V·D + 4 B·N·D below. dE is the
 *     only non-deterministic part (atomic order).
 *   FH_ACCUM_DETERMINISTIC: rows kernel for dE + cols kernel for dC/dbias, no atomics; fp32
 *     accumulation (direct or split fp32 for both). Bitwise identical under any block order.
 *     Costs a second logit recompute: 8·N_valid·V·D FLOPs (+33%). Workspace 2 B·(N + V)·D.
 *   FH_ACCUM_OUTPUT_DTYPE: same kernels, accumulation by read-modify-write in the output dtype
 *     (one rounding per 128-class tile for dE, per 128-row block for dC); dbias still fp32 in
 *     registers. Workspace O(N). Also deterministic.
 * The accumulate flag starts the accumulators from the existing gradients instead of 0. */
#include <math.h>

#include "engine/epilogue.cuh"
#include "engine/sm90_ws.cuh"
#include "engine/stream.cuh"
#include "grad_common.cuh"
#include "linear_ce_common.cuh"

namespace fh_lce {

struct bwd_params {
  const void* E;
  const void* C;
  const void* bias;
  int64_t lde, ldc;
  const float* cw;
  const int64_t* targets;
  int N, V, D, vt;
  float scale, cap, inv_cap, eps; /* eps 0: no filtering */
  int filter_e, filter_c;
  const int* rows;
  const lce_ws_header* hdr;
  const float* coef; /* [NCOEF x N] */
  grad_dst dE, dC;
  void* dbias; /* T [V] or NULL */
  int accumulate;
  int r_lo, r_hi; /* cols kernel: only the valid rows with original index in [r_lo, r_hi) */
  float* db32;    /* cols kernel over several row passes: dbias carried in fp32 between them */
  int db_last;    /* ... and rounded into dbias by the last pass */
  CUtensorMap tmc; /* C for the sm_90a mainloop's TMA (engine/sm90.cuh); unused on sm_80 */
};


/* Loads the row block's indices, targets and coefficients into shared memory (the 256 threads
 * that hold the tile). */
template <typename T, typename Align>
__device__ __forceinline__ void load_row_block(const bwd_params& p, bwd_smem<T>& sm, int row0, int nr) {
  for (int r = threadIdx.x; r < TBM; r += fh_eng::THREADS) {
    const int i = r < nr ? p.rows[row0 + r] : 0;
    sm.rows[r] = i;
    sm.y[r] = r < nr ? (int)p.targets[i] : -1;
    for (int q = 0; q < NCOEF; ++q) sm.coef[q * TBM + r] = r < nr ? p.coef[(size_t)q * p.N + i] : 0.0f;
  }
  fh_eng::tile_sync<Align>();
}

/* The operands of the logit tile: nr rows of E through the gather table `table` (the
 * consumers' copy in shared memory; the warp-specialized loop's producer, which runs ahead of
 * that copy, reads the compacted rows in global memory), classes from v0. */
template <typename T>
__device__ __forceinline__ fh_eng::nt_operand<T> rows_of(const bwd_params& p, const int* table, int nr) {
  return fh_eng::nt_operand<T>{(const T*)p.E, p.lde, table, 0, nr};
}
template <typename T>
__device__ __forceinline__ fh_eng::nt_operand<T> classes_of(const bwd_params& p, int v0) {
  const int nv = p.V - v0 < TBV ? p.V - v0 : TBV;
  return fh_eng::nt_operand<T>{(const T*)p.C, p.ldc, nullptr, v0, nv, &p.tmc};
}

/* Recompute the tile's logits with the forward's mainloop and tiling (so z is bitwise the
 * forward's) and form G in the accumulator registers (0 past the valid rows and classes).
 * Returns, block-uniformly, 1 when some entry has |p − δ| >= eps (the tile matters). */
template <typename T, typename Align, typename Pipe>
__device__ __forceinline__ int g_tile(const bwd_params& p, bwd_smem<T>& sm, fh_eng::acc_t& acc, int nr, int v0,
                                      unsigned char* smem, Pipe& pipe) {
  using namespace fh_eng;
  const int nv = p.V - v0 < TBV ? p.V - v0 : TBV;
  run_tile<T, Align>(acc, rows_of<T>(p, sm.rows, nr), classes_of<T>(p, v0), p.D, smem, pipe);
  const T* bias = (const T*)p.bias;
  float bj[NJ][2], wj[NJ][2];
  tile_bias<T>(bj, bias, v0, nv);
  tile_weights(wj, p.cw, v0, nv);
  int big = 0;
  FH_UNROLL
  for (int i = 0; i < MI; ++i)
    FH_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int r = frag_row(i, 2 * h);
      const float lse = sm.coef[r], k1 = sm.coef[TBM + r], k2 = sm.coef[2 * TBM + r], hr = sm.coef[3 * TBM + r];
      const float k3 = sm.coef[4 * TBM + r], k4 = sm.coef[5 * TBM + r], lnz = sm.coef[6 * TBM + r];
      const int y = sm.y[r];
      FH_UNROLL
      for (int j = 0; j < NJ; ++j)
        FH_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int c = frag_col(j, e);
          float g = 0.0f;
          const float raw = raw_logit(acc.v[i][j][2 * h + e], bj[j][e]);
          if (r < nr && c < nv && raw != -INFINITY) { /* a masked class has gradient 0 */
            const float z = process_logit(raw, p.scale, p.cap, p.inv_cap);
            const float logp = __fsub_rn(z - lse, lnz), pr = exp_fast(logp); /* lse, 0 or m, ln Z */
            const float pm = v0 + c == y ? expm1f(logp) : pr; /* p − δ in fp32 without cancellation */
            big |= !(fabsf(pm) < p.eps);                      /* NaN counts as big */
            g = k4 * pm + pr * k1;
            if (k2 != 0.0f && pr != 0.0f) g -= k2 * pr * (logp + hr);
            if (k3 != 0.0f) g -= k3 * wj[j][e];
            if (p.cap > 0.0f) {
              const float t = z * p.inv_cap;
              g *= 1.0f - t * t;
            }
            g *= p.scale;
          }
          acc.v[i][j][2 * h + e] = g;
        }
    }
  const int any = tile_sync_or<Align>(big);
  return p.eps > 0.0f ? any : 1;
}


/* dE rows of this row block += G · C[v0 .. v0+128). */
template <typename T, typename Align>
__device__ __forceinline__ void accumulate_dE(const bwd_params& p, bwd_smem<T>& sm, const grad_dst& dst, int nr, int v0) {
  const int nv = p.V - v0 < TBV ? p.V - v0 : TBV;
  grad_gemm_rows<T, Align>(sm, dst, (const T*)p.C, p.ldc, v0, nv, p.D, nr);
}

/* dC rows v0 .. v0+128 += Gᵀ · E[rows of this block]. */
template <typename T, typename Align>
__device__ __forceinline__ void accumulate_dC(const bwd_params& p, bwd_smem<T>& sm, int nr, int v0) {
  const int nv = p.V - v0 < TBV ? p.V - v0 : TBV;
  grad_gemm_cols<T, Align>(sm, p.dC, (const T*)p.E, p.lde, nr, v0, nv, p.D);
}

/* The kernels' shared memory on the mainloop of tag Align (bwd_smem: on the warp-specialized
 * loop the streamed GEMMs' chunks and staging chunk live in the ring's consumer bytes). */
template <typename T, typename Align>
__device__ __forceinline__ bwd_smem<T> bwd_smem_on(unsigned char* smem) {
  constexpr bool inner = fh_eng::is_ws<Align>::value;
  return bwd_smem<T>(smem, 0, fh_eng::ring<Align>::bytes, inner ? fh_eng::tile_scratch<T, Align>(smem) : nullptr);
}
template <typename T, typename Align>
constexpr size_t bwd_smem_bytes() {
  return bwd_smem<T>::bytes_for(fh_eng::ring<Align>::bytes, fh_eng::is_ws<Align>::value);
}

/* Both kernels run their tiles as engine/sm90_ws.cuh lays out: with the warp-specialized loop
 * the producer warpgroup loads every logit tile of the block's loop (it needs no filter
 * decision: every tile's logits are recomputed), and the 256 consumers do the rest, meeting at
 * tile_sync; with the other loops the producer part is empty. */
template <typename T, typename Align>
__global__ void __launch_bounds__(fh_eng::block_threads<Align>::value, 1)
    lce_bwd_rows_kernel(const __grid_constant__ bwd_params p) {
  using namespace fh_eng;
  FH_DYNAMIC_SMEM(unsigned char, smem);
  bwd_smem<T> sm = bwd_smem_on<T, Align>(smem);
  const int count = p.hdr->count, row0 = blockIdx.x * TBM;
  if (row0 >= count) return;
  const int nr = count - row0 < TBM ? count - row0 : TBM;
  typename pipe_of<Align>::type pp;
  start_tiles<T, Align>(smem);
  if (pp.producer) {
    producer_role<Align>();
    for (int tile = 0; tile < p.vt; ++tile)
      produce_tile<T, Align>(rows_of<T>(p, p.rows + row0, nr), classes_of<T>(p, tile * TBV), p.D, smem, pp);
    finish_tiles<T, Align>(smem, pp);
    return;
  }
  consumer_role<Align>();
  load_row_block<T, Align>(p, sm, row0, nr);
  for (int tile = 0; tile < p.vt; ++tile) { /* class order: fixed, so dE is deterministic */
    const int v0 = tile * TBV;
    acc_t acc;
    const int keep = g_tile<T, Align>(p, sm, acc, nr, v0, smem, pp);
    if (!keep && p.filter_e) continue;
    store_g<T, Align>(sm, acc);
    accumulate_dE<T, Align>(p, sm, p.dE, nr, v0);
  }
  finish_tiles<T, Align>(smem, pp);
}

template <typename T, typename Align>
__global__ void __launch_bounds__(fh_eng::block_threads<Align>::value, 1)
    lce_bwd_cols_kernel(const __grid_constant__ bwd_params p) {
  using namespace fh_eng;
  FH_DYNAMIC_SMEM(unsigned char, smem);
  bwd_smem<T> sm = bwd_smem_on<T, Align>(smem);
  const int count = p.hdr->count, v0 = blockIdx.x * TBV;
  __shared__ int range[2];
  compacted_range(p.rows, count, p.r_lo, p.r_hi, range);
  const int c_lo = range[0], c_hi = range[1];
  auto rows_in = [&](int row0) { return c_hi - row0 < TBM ? c_hi - row0 : TBM; };
  typename pipe_of<Align>::type pp;
  start_tiles<T, Align>(smem);
  if (pp.producer) {
    producer_role<Align>();
    for (int row0 = c_lo; row0 < c_hi; row0 += TBM)
      produce_tile<T, Align>(rows_of<T>(p, p.rows + row0, rows_in(row0)), classes_of<T>(p, v0), p.D, smem, pp);
    finish_tiles<T, Align>(smem, pp);
    return;
  }
  consumer_role<Align>();
  float db = 0.0f; /* thread c < 128 owns dbias[v0 + c] */
  for (int row0 = c_lo; row0 < c_hi; row0 += TBM) { /* row order: fixed, so dC and dbias are deterministic */
    const int nr = rows_in(row0);
    tile_sync<Align>(); /* the previous block's readers of the row data are done */
    load_row_block<T, Align>(p, sm, row0, nr);
    acc_t acc;
    const int keep = g_tile<T, Align>(p, sm, acc, nr, v0, smem, pp);
    const bool do_c = keep || !p.filter_c, do_e = p.dE.kind != ST_NONE && (keep || !p.filter_e);
    if (!do_c && !do_e) continue;
    if (do_c && p.dbias) dbias_tile<T, Align>(sm, acc, db);
    const bool want_c = do_c && p.dC.kind != ST_NONE;
    const bool tr = store_g_for<T, Align>(sm, acc, want_c);
    if (want_c) accumulate_dC<T, Align>(p, sm, nr, v0);
    if (do_e) {
      g_for_rows<T, Align>(sm, tr);
      accumulate_dE<T, Align>(p, sm, p.dE, nr, v0);
    }
  }
  finish_tiles<T, Align>(smem, pp);
  dbias_store<T>(p.dbias, p.db32, p.db_last, p.accumulate, v0, p.V, db);
}

/* Per-row coefficients (see the file comment), in fp64, after the fixed-order denominators. */
struct coef_params {
  const int64_t* targets;
  int64_t ignore_index;
  int N, V, reduction;
  const float* cw;
  const float* tw;
  const float* lse;
  const float* entropy;
  const float* grad_loss;
  const float* grad_lse;
  float alpha, lambda, eta, divisor;
  lce_ws_header* hdr;
  const float* counts; /* label smoothing: [2 x N] V_i, W_i over the row's unmasked classes */
  const float* stats;  /* fp32 inputs: [3 x N] m_i, ln Z_i, h_i recomputed (lce_launch_row_stats) */
  float* coef;
};

/* One block per SM is all this kernel ever has (grid 1): the explicit bound keeps ptxas from
 * capping registers for occupancy, which spilled fp64 values on sm_80. */
__global__ void __launch_bounds__(256, 1) lce_bwd_coef_kernel(coef_params p) {
  __shared__ double red[2 * 256];
  double v[2] = {0.0, 0.0};
  for (int i = threadIdx.x; i < p.N; i += 256) {
    const int64_t y = p.targets[i];
    if (y == p.ignore_index || y < 0 || y >= p.V) continue;
    const double om = p.tw ? p.tw[i] : 1.0;
    v[0] += om * (p.cw ? p.cw[y] : 1.0);
    v[1] += om;
  }
  lce_block_sum(red, v, 2);
  double dce = red[0], dreg = red[256];
  if (p.divisor > 0.0f) dce = dreg = p.divisor;
  /* fp64 reciprocals without an fp64 division (that pulls in a slow-path subroutine which spills
   * on sm_90), and without going through fp32, where a denominator below ~1e-38 (tiny weights)
   * would become 0 and the gradients infinite. */
  const double inv_ce = dce != 0.0 ? lce_recip(dce) : 0.0, inv_reg = dreg != 0.0 ? lce_recip(dreg) : 0.0;
  const double alpha = p.alpha;
  const size_t N = (size_t)p.N;
  for (int i = threadIdx.x; i < p.N; i += 256) {
    const int64_t y = p.targets[i];
    if (y == p.ignore_index || y < 0 || y >= p.V) continue;
    const double om = p.tw ? p.tw[i] : 1.0, wy = p.cw ? p.cw[y] : 1.0;
    const double g = p.reduction == FH_REDUCTION_NONE ? p.grad_loss[i] : p.grad_loss[0];
    double a = om * g, b = om * g;
    if (p.reduction == FH_REDUCTION_MEAN) a *= inv_ce, b *= inv_reg; /* a zero denominator gives 0 */
    const double glse = p.grad_lse ? p.grad_lse[i] : 0.0;
    const double m = p.stats ? (double)p.stats[i] : 0.0, lnz = p.stats ? (double)p.stats[N + i] : 0.0;
    const double lse = p.stats ? m + lnz : (double)p.lse[i];
    const double h = p.stats ? (double)p.stats[2 * N + i] : p.entropy ? (double)p.entropy[i] : 0.0;
    /* ε_i = α / V_i and W_i over the row's unmasked classes (docs/conventions.md) */
    double eps = 0.0, W = 0.0;
    if (alpha != 0.0 && p.counts[i] > 0.0f) eps = alpha * lce_recip((double)p.counts[i]), W = p.counts[N + i];
    p.coef[0 * N + i] = (float)(p.stats ? m : lse);
    p.coef[6 * N + i] = (float)lnz;
    p.coef[1 * N + i] = (float)(a * eps * W + 2.0 * b * p.lambda * lse + glse);
    p.coef[2 * N + i] = (float)(b * p.eta);
    p.coef[3 * N + i] = (float)h;
    p.coef[4 * N + i] = (float)(a * eps);
    p.coef[5 * N + i] = (float)(a * wy * (1.0 - alpha));
  }
  if (threadIdx.x == 0) p.hdr->denom_ce = dce, p.hdr->denom_reg = dreg;
}

} /* namespace fh_lce */

using namespace fh_lce;

namespace {

/* The backward's workspace: the gradient layout shared with distillation (grad_common.cuh), then,
 * with label smoothing, each row's unmasked class count and weight sum, with fp32 inputs each
 * row's m, ln Z and h, and the partials of the forward's tile kernel they come from
 * (lce_launch_row_stats). */
struct bwd_layout {
  grad_layout g;
  size_t cnt_off, st_off, scr_off, total;
};
static bool recompute_stats(fh_dtype_t dtype) { return dtype == FH_DTYPE_F32; }
static bwd_layout bwd_layout_of(int64_t N, int64_t V, int64_t D, fh_dtype_t dtype, fh_accum_mode_t mode, bool smooth) {
  bwd_layout L;
  const bool stats = recompute_stats(dtype);
  L.g = grad_layout_of(N, V, D, dtype, mode, NCOEF); /* every gradient wanted: the query's contract */
  L.cnt_off = L.g.total;
  L.st_off = L.cnt_off + (smooth ? lce_align(2 * sizeof(float) * (size_t)N) : 0);
  L.scr_off = L.st_off + (stats ? lce_align(3 * sizeof(float) * (size_t)N) : 0);
  L.total = L.scr_off + (smooth || stats ? lce_align(lce_row_stats_scratch(N, V, smooth)) : 0);
  return L;
}

float filter_eps_of(const fh_linear_ce_options_t* o, fh_dtype_t dtype) {
  /* Off when a term not bounded by p is present (label smoothing, entropy): see the file comment. */
  if (o->label_smoothing != 0.0f || o->entropy_weight != 0.0f) return 0.0f;
  if (o->filter_eps != FH_FILTER_EPS_AUTO) return o->filter_eps;
  return dtype == FH_DTYPE_BF16 ? 0x1p-12f : dtype == FH_DTYPE_F16 ? 0x1p-15f : 0x1p-28f;
}

/* The warp-specialized loop of the backward (16-bit T): 3 slots, so that the consumers' bytes
 * hold the streamed GEMMs' chunks and staging chunk beside the G tile within 227 KiB
 * (docs/hopper.md "The warp-specialized backward"). */
template <typename T>
using bwd_ws_for = fh_eng::tma90ws_for<T, fh_eng::tma90ws_t<3, bwd_smem<T>::scratch_b>>;

bool bwd_vec16_ok(const bwd_params& bp, size_t esize) {
  return bp.D % 8 == 0 && fh_eng::vec16_ok(bp.E, bp.lde, esize) && fh_eng::vec16_ok(bp.C, bp.ldc, esize) &&
         dst_vec_ok(bp.dE, esize) && dst_vec_ok(bp.dC, esize);
}

template <typename T, typename Align, bool ROWS>
fh_status_t launch_bwd(const char* fn, dim3 grid, cudaStream_t stream, const bwd_params& bp) {
  auto k = ROWS ? lce_bwd_rows_kernel<T, Align> : lce_bwd_cols_kernel<T, Align>;
  constexpr size_t smem = bwd_smem_bytes<T, Align>();
  FH_TRY(fh_cuda_status(fh_eng::allow_smem<smem, fh_eng::optin<Align>::max>(k), fn,
                        "cudaFuncSetAttribute(lce_bwd kernel)"));
  FH_LAUNCH(k, grid, dim3(fh_eng::block_threads<Align>::value), smem, stream, bp);
  LCE_CHECK_LAUNCH(fn, ROWS ? "lce_bwd_rows_kernel" : "lce_bwd_cols_kernel");
  return FH_SUCCESS;
}

} /* namespace */

extern "C" fh_status_t fh_cuda_linear_ce_backward_workspace(const fh_cuda_state_t* st, const fh_linear_ce_options_t* opt,
                                                            int64_t N, int64_t V, int64_t D, fh_dtype_t dtype,
                                                            size_t* bytes) {
  (void)st;
  FH_TRY(lce_check_shape("fh_linear_ce_backward_workspace_size", N, V, D));
  *bytes = bwd_layout_of(N, V, D, dtype, opt->accum_mode, opt->label_smoothing != 0.0f).total;
  return FH_SUCCESS;
}

extern "C" fh_status_t fh_cuda_linear_ce_backward(fh_cuda_state_t* st, struct CUstream_st* stream,
                                                  const fh_lce_problem_t* p, const fh_linear_ce_grad_inputs_t* in,
                                                  const fh_linear_ce_grads_t* grads, void* workspace,
                                                  size_t workspace_bytes) {
  static const char fn[] = "fh_linear_ce_backward";
  (void)workspace_bytes; /* checked by the caller against the query */
  FH_TRY(lce_check_shape(fn, p->N, p->V, p->D));
  const fh_linear_ce_options_t* o = &p->opt;
  const fh_accum_mode_t mode = o->accum_mode;
  const bool smooth = o->label_smoothing != 0.0f;
  const bwd_layout L = bwd_layout_of(p->N, p->V, p->D, p->dtype, mode, smooth);
  unsigned char* ws = (unsigned char*)workspace;
  lce_ws_header* hdr = (lce_ws_header*)ws;
  int* rows = (int*)(ws + L.g.rows_off);
  float* coef = (float*)(ws + L.g.coef_off);
  const grad_plan g =
      grad_plan_of(mode, p->dtype, grads->dE, grads->dC, grads->dbias, p->bias != NULL, ws, L.g, o->accumulate != 0);
  if (!g.any) return FH_SUCCESS; /* nothing wanted: nothing computed or written */

  bwd_params bp;
  bp.E = p->E->data, bp.C = p->C->data, bp.bias = p->bias ? p->bias->data : NULL;
  bp.lde = p->E->row_stride, bp.ldc = p->C->row_stride;
  bp.cw = p->class_weights, bp.targets = p->targets;
  bp.N = (int)p->N, bp.V = (int)p->V, bp.D = (int)p->D, bp.vt = (int)((p->V + TBV - 1) / TBV);
  bp.scale = o->logit_scale, bp.cap = o->softcap, bp.eps = filter_eps_of(o, p->dtype);
  bp.inv_cap = o->softcap > 0.0f ? 1.0f / o->softcap : 0.0f;
  bp.filter_e = o->filter_e_grad != 0, bp.filter_c = o->filter_c_grad != 0;
  bp.rows = rows, bp.hdr = hdr, bp.coef = coef;
  bp.dE = g.dE;
  bp.dC = g.dC;
  bp.dbias = g.dbias;
  bp.accumulate = o->accumulate != 0;
  bp.r_lo = 0, bp.r_hi = bp.N;
  bp.db32 = NULL, bp.db_last = 1;

  FH_TRY(lce_launch_prep(fn, stream, p, rows, hdr, fh_cuda_error_flag(st)));
  float* counts = smooth ? (float*)(ws + L.cnt_off) : NULL;
  float* stats = recompute_stats(p->dtype) ? (float*)(ws + L.st_off) : NULL;
  if ((counts || stats) && p->N > 0)
    FH_TRY(lce_launch_row_stats(fn, stream, p, rows, hdr, ws + L.scr_off, smooth, counts, stats));
  coef_params cp;
  cp.targets = p->targets, cp.ignore_index = o->ignore_index;
  cp.N = (int)p->N, cp.V = (int)p->V, cp.reduction = (int)o->reduction;
  cp.cw = p->class_weights, cp.tw = p->token_weights;
  cp.lse = in->lse, cp.entropy = in->entropy, cp.grad_loss = in->grad_loss, cp.grad_lse = in->grad_lse;
  cp.alpha = o->label_smoothing, cp.lambda = o->z_loss_scale, cp.eta = o->entropy_weight, cp.divisor = o->divisor;
  cp.hdr = hdr, cp.coef = coef, cp.counts = counts, cp.stats = stats;
  FH_LAUNCH(lce_bwd_coef_kernel, dim3(1), dim3(256), 0, stream, cp);
  LCE_CHECK_LAUNCH(fn, "lce_bwd_coef_kernel");

  LCE_DTYPE_SWITCH(p->dtype, T, {
    const bool vec = bwd_vec16_ok(bp, fh_dtype_size(p->dtype));
    const bool tma = fh_eng::pick_tma90<T>(vec, &bp.tmc, bp.C, p->V, p->D, bp.ldc);
    const bool spec = tma && fh_eng::ws_enabled(); /* the warp-specialized loop */
    auto launch = [&](bool row_owner, dim3 grid, const bwd_params& q) -> fh_status_t {
      if (spec) return row_owner ? launch_bwd<T, bwd_ws_for<T>, true>(fn, grid, stream, q)
                               : launch_bwd<T, bwd_ws_for<T>, false>(fn, grid, stream, q);
      if (tma) return row_owner ? launch_bwd<T, fh_eng::tma90_for<T>, true>(fn, grid, stream, q)
                                : launch_bwd<T, fh_eng::tma90_for<T>, false>(fn, grid, stream, q);
      if (vec) return row_owner ? launch_bwd<T, fh_eng::vec16, true>(fn, grid, stream, q)
                           : launch_bwd<T, fh_eng::vec16, false>(fn, grid, stream, q);
      return row_owner ? launch_bwd<T, fh_eng::scalar, true>(fn, grid, stream, q)
                  : launch_bwd<T, fh_eng::scalar, false>(fn, grid, stream, q);
    };
    FH_TRY((grad_passes<T>(fn, stream, g, bp, p->N, p->V, (int)p->D, bp.vt, launch)));
  });
  return FH_SUCCESS;
}
