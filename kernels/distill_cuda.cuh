/* Device code and host set-up shared by the distillation passes (kernels/distill.cu; docs/
 * distillation_cuda.md): the two heads as engine operands, the tempered logit, the slot layout
 * of the engine's accumulator fragments, the parked student tile, the workspace layout and the
 * problem checks of the CUDA backend. */
#pragma once

#include <stdint.h>

#include "distill.h"
#include "distill_div.cuh"
#include "engine/epilogue.cuh"
#include "engine/sm90.cuh"
#include "linear_ce_common.cuh"
#include "ref/distill_ref.h"

namespace fh_dst {

using fh_lce::lce_block_sum;
using fh_lce::lce_blocks;
using fh_lce::lce_stats_merge;
using fh_lce::lce_ws_header;

constexpr int NQ1 = 7; /* pass-1 partials per (split, row): m, Z of u, of v, of s; s_y */
/* Row statistics after pass 1, [RS x N]: m and ln Z of u (rows 0, 1), of v (2, 3), of s (4, 5;
 * 0 without a hard term), s_y (6). Every log-probability is formed as (x − m) − ln Z, never as
 * x − lse with lse rounded to fp32, whose error 2^-24 |lse| would reach every probability
 * (docs/linear_ce.md "Precision"). */
constexpr int RS = 7;
constexpr int MAX_SPLITS = 16;
constexpr int SLOTS = 2 * fh_eng::MI; /* rows of a thread: slot s -> frag_row(s >> 1, 2 (s & 1)) */
constexpr int PARK = SLOTS * fh_eng::NJ * 2; /* accumulator entries a thread parks (64) */
constexpr size_t PARK_BYTES = sizeof(float) * PARK * fh_eng::THREADS;
static_assert(fh_eng::BN == 128, "lce_vsplit_of assumes the engine's 128-class tiles");

/* One head as engine operands: E [N x D] (gathered by the compacted rows), C [>= V x D], bias. */
struct head {
  const void* E;
  const void* C;
  const void* bias;
  int64_t lde, ldc;
  int D;
  CUtensorMap tmc; /* C for the sm_90a mainloop's TMA (engine/sm90.cuh); unused on sm_80 */
};

/* Where the teacher's parked tile starts: after the student's (which lies over the mainloop's
 * ring once the student's mainloop has returned) and after the ring itself, which the student's
 * mainloop uses while the teacher's tile is parked (the sm_90a ring is larger than a park). */
template <typename Align>
constexpr size_t park_y_off() {
  return PARK_BYTES > fh_eng::ring<Align>::bytes ? PARK_BYTES : fh_eng::ring<Align>::bytes;
}

struct fwd_params {
  head hs, ht;
  int N, V, S, tps, vt;
  float invT;
  int hard;
  dev_div dv;
  const int* rows;
  const lce_ws_header* hdr;
  const int64_t* targets;
  const float* rs; /* [RS x N] row statistics (pass 2): see RS */
  float* part;
};

__device__ __forceinline__ int slot_row(int s) { return fh_eng::frag_row(s >> 1, 2 * (s & 1)); }
__device__ __forceinline__ float& slot_acc(fh_eng::acc_t& a, int s, int j, int e) {
  return a.v[s >> 1][j][2 * (s & 1) + e];
}
/* u = r / T as r · (1/T), rounding pinned (the backward's recompute gets the same bits). */
__device__ __forceinline__ float tempered(float r, float invT) { return __fmul_rn(r, invT); }

/* The head's logit tile for classes [v0, v0 + nv) of the row block: raw accumulators (no bias)
 * in acc, the tile's bias values in bj (0 past nv or without bias). */
template <typename T, typename Align>
__device__ __forceinline__ void head_tile(fh_eng::acc_t& acc, float (&bj)[fh_eng::NJ][2], const head& h,
                                          const int* rows, int nr, int v0, int nv, unsigned char* smem) {
  using namespace fh_eng;
  const nt_operand<T> a{(const T*)h.E, h.lde, rows, 0, nr};
  const nt_operand<T> b{(const T*)h.C, h.ldc, nullptr, v0, nv, &h.tmc};
  mainloop<T, Align>::run(acc, a, b, h.D, smem);
  tile_bias<T>(bj, (const T*)h.bias, v0, nv);
}

/* The row block's compacted row indices (0 past nr) into s_rows. */
__device__ __forceinline__ void load_rows(int* s_rows, const int* rows, int row0, int nr) {
  for (int r = threadIdx.x; r < fh_eng::BM; r += fh_eng::THREADS) s_rows[r] = r < nr ? rows[row0 + r] : 0;
}

/* Row validity as lce_prep_kernel decides it (a target outside [0, V) raised the error flag). */
__device__ __forceinline__ bool row_valid(const int64_t* targets, int64_t ignore_index, int V, int i, int64_t* y) {
  *y = targets ? targets[i] : -1;
  return !targets || (*y != ignore_index && *y >= 0 && *y < V);
}

/* Thread-private parking of a tile's log-probabilities (x − m) − ln Z (x = tempered logit) in
 * shared memory, so that the other head's tile can use the accumulators: entry k of thread t at
 * park[k · THREADS + t] (consecutive threads, consecutive banks; only the owner reads it back,
 * so no barrier is needed). ln Z = 0 with m = lse gives x − lse bitwise. */
__device__ __forceinline__ void park_log_probs(float* park, fh_eng::acc_t& acc, const float (&bj)[fh_eng::NJ][2],
                                       const float (&m)[SLOTS], const float (&lnz)[SLOTS], float invT) {
  FH_UNROLL
  for (int s = 0; s < SLOTS; ++s)
    FH_UNROLL
    for (int j = 0; j < fh_eng::NJ; ++j)
      FH_UNROLL
      for (int e = 0; e < 2; ++e)
        park[((s * fh_eng::NJ + j) * 2 + e) * fh_eng::THREADS + threadIdx.x] =
            __fsub_rn(tempered(fh_eng::raw_logit(slot_acc(acc, s, j, e), bj[j][e]), invT) - m[s], lnz[s]);
}
__device__ __forceinline__ float parked(const float* park, int s, int j, int e) {
  return park[((s * fh_eng::NJ + j) * 2 + e) * fh_eng::THREADS + threadIdx.x];
}

/* Forward workspace: header, compacted rows, row statistics [RS x N], row terms [3 x N], the
 * (split, row) partials [S x 7 x N] (pass 2 reuses them as [S x 2 x N]). */
struct fwd_layout {
  int S, tps, vt;
  size_t rows_off, rs_off, terms_off, part_off, total;
};
static inline fwd_layout fwd_layout_of(int64_t N, int64_t V) {
  fwd_layout L;
  const fh_lce::lce_vsplit sp = fh_lce::lce_vsplit_of(V, MAX_SPLITS);
  L.S = sp.S, L.tps = sp.tps, L.vt = sp.vt;
  L.rows_off = 256;
  L.rs_off = L.rows_off + fh_lce::lce_align(sizeof(int) * (size_t)N);
  L.terms_off = L.rs_off + fh_lce::lce_align(sizeof(float) * RS * (size_t)N);
  L.part_off = L.terms_off + fh_lce::lce_align(sizeof(float) * 3 * (size_t)N);
  L.total = L.part_off + fh_lce::lce_align(sizeof(float) * NQ1 * (size_t)L.S * (size_t)N);
  return L;
}

/* What the CUDA kernels take beyond the API's validation. */
static inline fh_status_t check_problem(const char* fn, const fh_distill_problem_t* p) {
  if (!p->sparse && p->Es->dtype != p->Et->dtype)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn,
                        "student dtype %d and teacher dtype %d differ: the CUDA kernels need one dtype",
                        (int)p->Es->dtype, (int)p->Et->dtype);
  if (p->Es->dtype == FH_DTYPE_F64)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn, "fp64 heads have no CUDA kernels; use FH_BACKEND_CPU");
  FH_TRY(fh_lce::lce_check_shape(fn, p->N, p->V, p->D_s > p->D_t ? p->D_s : p->D_t));
  return FH_SUCCESS;
}

static inline head head_of(const fh_tensor_t* E, const fh_tensor_t* C, const fh_tensor_t* b) {
  head h;
  h.E = E->data, h.C = C->data, h.bias = b ? b->data : NULL;
  h.lde = E->row_stride, h.ldc = C->row_stride;
  h.D = (int)E->cols;
  return h;
}

/* The 16-byte path needs all four operands aligned (docs/engine.md "Alignment"). */
static inline bool operands_vec16(const fh_distill_problem_t* p) {
  const size_t es = fh_dtype_size(p->Es->dtype);
  return fh_eng::vec16_ok(p->Es->data, p->Es->row_stride, es) && fh_eng::vec16_ok(p->Cs->data, p->Cs->row_stride, es) &&
         (p->sparse ||
          (fh_eng::vec16_ok(p->Et->data, p->Et->row_stride, es) && fh_eng::vec16_ok(p->Ct->data, p->Ct->row_stride, es)));
}

/* The sm_90a mainloop for the heads (docs/hopper.md): the student's classifier's tensor map, and
 * the teacher's unless it is sparse (no teacher tile). False keeps the sm_80 loop. mc: the
 * launch goes in 2-CTA clusters that multicast half boxes (the forward's row-block passes). */
template <typename T>
static inline bool heads_tma90(bool vec, const fh_distill_problem_t* p, head& hs, head& ht, bool mc = false) {
  if (!fh_eng::pick_tma90<T>(vec, &hs.tmc, hs.C, p->V, hs.D, hs.ldc, mc)) return false;
  return p->sparse || fh_eng::pick_tma90<T>(vec, &ht.tmc, ht.C, p->V, ht.D, ht.ldc, mc);
}

static_assert((int)DK_ALPHA == (int)FH_DIV_ALPHA && (int)DK_TVD == (int)FH_DIV_TVD && (int)DK_ZERO == (int)FH_DIV_ZERO,
              "dev_div_kind mirrors fh_div_kind_t");
static inline dev_div dev_div_of(const fh_distill_options_t* o) {
  fh_div_t d;
  fh_div_resolve(o, &d);
  dev_div r;
  r.kind = (int)d.kind; /* dev_div_kind mirrors fh_div_kind_t */
  r.beta = (float)d.beta, r.scale = (float)d.scale, r.lambda = (float)d.lambda, r.alpha = (float)d.alpha;
  return r;
}

static inline fwd_params make_fwd_params(const fh_distill_problem_t* p, const int* rows, const lce_ws_header* hdr,
                                         const float* rs, const fwd_layout& L) {
  fwd_params f;
  f.hs = head_of(p->Es, p->Cs, p->bs);
  f.ht = p->sparse ? head{} : head_of(p->Et, p->Ct, p->bt); /* sparse: E NULL skips the teacher */
  f.N = (int)p->N, f.V = (int)p->V, f.S = L.S, f.tps = L.tps, f.vt = L.vt;
  f.invT = 1.0f / p->opt.temperature;
  f.hard = p->opt.hard_weight != 0.0f;
  f.dv = dev_div_of(&p->opt);
  f.rows = rows, f.hdr = hdr, f.targets = p->targets, f.rs = rs, f.part = NULL;
  return f;
}

/* Pass 1 of the forward and its merge into rs [RS x N] (m and ln Z of u, v, s; s_y), with the
 * partials in part [S x NQ1 x N]; the rows compacted already. The forward's first half, and what
 * the fp32 backward recomputes (kernels/distill_bwd.cu). Defined in kernels/distill.cu. */
fh_status_t launch_row_stats(const char* fn, cudaStream_t stream, const fh_distill_problem_t* p, const int* rows,
                             const lce_ws_header* hdr, float* rs, float* part);

} /* namespace fh_dst */
