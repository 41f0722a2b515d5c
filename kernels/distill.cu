/* Distillation forward on the tile engine (docs/distillation_cuda.md): a student head and a dense
 * teacher head, every divergence of fusedhead.h, no N x V buffer.
 *
 * Per valid row i and class j < V (the teacher's classes j >= V are never read):
 *     u_ij = (Es_i·Cs_j + bs_j) / T,  v_ij = (Et_i·Ct_j + bt_j) / T,  s_ij = Es_i·Cs_j + bs_j
 *     X = (u − m_u) − ln Z_u, Y = (v − m_v) − ln Z_v (log-softmax as PyTorch forms it: no lse
 *     rounding in X, Y), D_i = Σ_j term(X, Y), S_i = Σ_j qa(X, Y)
 * (term and qa: kernels/distill_div.cuh, the reference's element formulas in fp32).
 *
 * Launches (no host synchronization; grids are sized for N rows, blocks past the device-side
 * valid count exit at once):
 *   1. lce_prep_kernel (kernels/linear_ce_fwd.cu): the valid rows compacted in row order.
 *   2. distill_stats_kernel<T, Align>, grid (ceil(N/128) row blocks) x (S vocabulary splits):
 *      per 128-class tile two engine mainloops (kernels/engine/sm80.cuh), the student's over
 *      D_s and the teacher's over D_t; each tile is folded into per-row online statistics in
 *      registers right after its mainloop (so one accumulator tile is live at a time): max and
 *      Σ e^{x−m} of u, of v and (hard term only) of s, and s_{i,y}. Quad shuffles, then the four
 *      warps along N in warp order, give the (split, row) partials [S x 7 x N].
 *   3. distill_fin_stats_kernel (one thread per row): merges the splits in split order:
 *      m and ln Z of u, v and s, and s_y per row [RS x N] (distill_cuda.cuh).
 *   4. distill_div_kernel<T, Align>, same grid: the second pass. Recomputes both tiles with the
 *      same mainloops (bitwise the first pass's logits): Y of the teacher tile is parked in shared
 *      memory (each thread its own 64 entries: no barrier, no conflicts) while the student tile
 *      is computed, then the student's X and one rolled loop evaluates the
 *      divergence elements (one copy of the divergence code per kernel), D and S per row in fp32
 *      in column order, merged as in 2 into [S x 2 x N] partials (over the first pass's, which
 *      3 has consumed). Shared memory 145 KiB: the student's tile is parked over the engine's
 *      stage buffers once its mainloop has returned (the teacher's is computed first).
 *   5. distill_fin_row_kernel (one thread per row): D, S summed in split order; soft = κ D,
 *      hard = (m_s − s_y) + ln Z_s, loss_i, the row state, per-row outputs (reduction none).
 *   6. distill_reduce_kernel (1 block): fixed-order fp64 sums of loss, soft, hard and the valid
 *      count; mean divides by N_valid or the divisor, a zero denominator gives 0.
 * Splits come from V alone (lce_vsplit_of, at most 16), so a row's results are bitwise the same
 * whatever the batch or block order (docs/engine.md "Determinism").
 * Workspace: 256 B + 4N (rows) + 28N (row statistics) + 12N (row terms) + 28·S·N (partials),
 * rounded to 256 B each; Llama-3 8B -> 1B (N = 8192, V = 128256): S = 16, 3.9 MiB. */
#include <math.h>

#include "distill_cuda.cuh"
#include "distill_sparse.cuh"

namespace fh_dst {

/* Dynamic shared memory: the engine's stages, the row block's indices and targets (pass 1) or
 * its indices (pass 2), then pass 2's parked student tile. */
template <typename Align>
constexpr size_t stats_smem() {
  return fh_eng::ring<Align>::bytes + 2 * fh_eng::BM * sizeof(int);
}
/* Pass 2: the student's parked X over the stage buffers (free once its mainloop has returned)
 * extended to 64 KiB, the teacher's parked Y (park_y_off), the per-slot sums, then the row data:
 * 145 KiB on sm_80 (of the 163 KiB a block may have), 211 KiB with the sm_90a ring (of 227). */
constexpr size_t DIV_SUMS = sizeof(float) * 2 * SLOTS * fh_eng::THREADS;
template <typename Align>
constexpr size_t div_rows_off() {
  return park_y_off<Align>() + PARK_BYTES + DIV_SUMS;
}
template <typename Align>
constexpr size_t div_smem() {
  return div_rows_off<Align>() + fh_eng::BM * sizeof(int);
}
static_assert(PARK_BYTES >= fh_eng::SMEM_BYTES, "the student's park covers the stage buffers");
static_assert(fh_eng::WARPS_N * fh_eng::BM * NQ1 * sizeof(float) <= fh_eng::SMEM_BYTES, "merge scratch");

/* Pass 1: online statistics of both heads' tempered softmaxes and of the untempered student. */
template <typename T, typename Align>
__global__ void __launch_bounds__(fh_eng::THREADS, 1) distill_stats_kernel(const __grid_constant__ fwd_params p) {
  using namespace fh_eng;
  FH_DYNAMIC_SMEM(unsigned char, smem);
  int* s_rows = (int*)(smem + ring<Align>::bytes);
  int* s_y = s_rows + BM;
  const int count = p.hdr->count, row0 = blockIdx.x * BM;
  /* cluster-uniform: a CTA without rows beside one with rows loads its half of the tiles */
  if ((int)(blockIdx.x - blockIdx.x % cluster_ctas<Align>()) * BM >= count) return;
  const int nr = count - row0 < 0 ? 0 : (count - row0 < BM ? count - row0 : BM);
  load_rows(s_rows, p.rows, row0, nr);
  for (int r = threadIdx.x; r < BM; r += THREADS) s_y[r] = r < nr && p.targets ? (int)p.targets[s_rows[r]] : -1;
  __syncthreads();
  row_stats su[SLOTS], sv[SLOTS], ss[SLOTS];
  float sy[SLOTS];
  int ys[SLOTS];
  FH_UNROLL
  for (int s = 0; s < SLOTS; ++s) {
    su[s].init(), sv[s].init(), ss[s].init();
    sy[s] = 0.0f;
    ys[s] = s_y[slot_row(s)];
  }
  const int t0 = blockIdx.y * p.tps, t1 = t0 + p.tps < p.vt ? t0 + p.tps : p.vt;
  for (int tile = t0; tile < t1; ++tile) {
    const int v0 = tile * BN, nv = p.V - v0 < BN ? p.V - v0 : BN;
    acc_t acc;
    float bj[NJ][2];
    head_tile<T, Align>(acc, bj, p.hs, s_rows, nr, v0, nv, smem);
    FH_UNROLL
    for (int s = 0; s < SLOTS; ++s) {
      float u[2 * NJ], r[2 * NJ];
      float umax = -INFINITY, rmax = -INFINITY;
      FH_UNROLL
      for (int j = 0; j < NJ; ++j)
        FH_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int c = frag_col(j, e);
          float rr = -INFINITY, uu = -INFINITY;
          if (c < nv) {
            rr = raw_logit(slot_acc(acc, s, j, e), bj[j][e]);
            uu = tempered(rr, p.invT);
            if (v0 + c == ys[s]) sy[s] = rr;
            umax = fmaxf(umax, uu), rmax = fmaxf(rmax, rr);
          }
          u[2 * j + e] = uu, r[2 * j + e] = rr;
        }
      su[s].add(u, umax);
      if (p.hard) ss[s].add(r, rmax);
    }
    if (!p.ht.E) continue; /* sparse teacher (kernels/distill_sparse.cuh): the student only */
    head_tile<T, Align>(acc, bj, p.ht, s_rows, nr, v0, nv, smem);
    FH_UNROLL
    for (int s = 0; s < SLOTS; ++s) {
      float v[2 * NJ];
      float vmax = -INFINITY;
      FH_UNROLL
      for (int j = 0; j < NJ; ++j)
        FH_UNROLL
        for (int e = 0; e < 2; ++e) {
          const float vv = frag_col(j, e) < nv ? tempered(raw_logit(slot_acc(acc, s, j, e), bj[j][e]), p.invT) : -INFINITY;
          vmax = fmaxf(vmax, vv);
          v[2 * j + e] = vv;
        }
      sv[s].add(v, vmax);
    }
  }
  FH_UNROLL
  for (int s = 0; s < SLOTS; ++s) {
    su[s].quad_merge(), sv[s].quad_merge(), ss[s].quad_merge();
    sy[s] = quad_sum(sy[s]); /* the other lanes hold exactly 0 */
  }
  /* The four warps along N, in warp order, through the free stage buffers. */
  float* scr = (float*)smem; /* [WARPS_N][NQ1][BM] */
  if ((threadIdx.x & 3) == 0) {
    FH_UNROLL
    for (int s = 0; s < SLOTS; ++s) {
      float* q = scr + (size_t)warp_n() * NQ1 * BM + slot_row(s);
      q[0 * BM] = su[s].m, q[1 * BM] = su[s].Z, q[2 * BM] = sv[s].m, q[3 * BM] = sv[s].Z;
      q[4 * BM] = ss[s].m, q[5 * BM] = ss[s].Z, q[6 * BM] = sy[s];
    }
  }
  __syncthreads();
  const int r = threadIdx.x;
  if (r < nr) {
    row_stats a, b, c;
    a.init(), b.init(), c.init();
    float y = 0.0f;
    for (int wn = 0; wn < WARPS_N; ++wn) {
      const float* q = scr + (size_t)wn * NQ1 * BM + r;
      a.merge(q[0], q[BM], 0.0f);
      b.merge(q[2 * BM], q[3 * BM], 0.0f);
      c.merge(q[4 * BM], q[5 * BM], 0.0f);
      y += q[6 * BM];
    }
    const size_t N = (size_t)p.N, i = (size_t)s_rows[r];
    float* P = p.part + (size_t)blockIdx.y * NQ1 * N + i;
    P[0 * N] = a.m, P[1 * N] = a.Z, P[2 * N] = b.m, P[3 * N] = b.Z;
    P[4 * N] = c.m, P[5 * N] = c.Z, P[6 * N] = y;
  }
}

/* Pass 2: the divergence sums with the final lse values. Both tiles are parked (X, then Y) and
 * the element loop runs rolled over the parked values, so the divergence code exists once per
 * kernel (not once per accumulator register) and its temporaries stay few; the per-slot running
 * sums live in thread-private shared memory too. */
template <typename T, typename Align>
__global__ void __launch_bounds__(fh_eng::THREADS, 1) distill_div_kernel(const __grid_constant__ fwd_params p) {
  using namespace fh_eng;
  FH_DYNAMIC_SMEM(unsigned char, smem);
  float* park_x = (float*)smem; /* over the stage buffers: written after the student's mainloop */
  float* park_y = (float*)(smem + park_y_off<Align>());
  float* sums = park_y + PARK * THREADS; /* [2 SLOTS][THREADS]: D, then S per slot */
  int* s_rows = (int*)(smem + div_rows_off<Align>());
  const int count = p.hdr->count, row0 = blockIdx.x * BM;
  if ((int)(blockIdx.x - blockIdx.x % cluster_ctas<Align>()) * BM >= count) return; /* as in pass 1 */
  const int nr = count - row0 < 0 ? 0 : (count - row0 < BM ? count - row0 : BM);
  load_rows(s_rows, p.rows, row0, nr);
  __syncthreads();
  float mu[SLOTS], lu[SLOTS], mv[SLOTS], lv[SLOTS];
  const size_t N = (size_t)p.N;
  FH_UNROLL
  for (int s = 0; s < SLOTS; ++s) {
    const int r = slot_row(s);
    const float* R = p.rs + s_rows[r];
    mu[s] = r < nr ? R[0] : 0.0f, lu[s] = r < nr ? R[N] : 0.0f;
    mv[s] = r < nr ? R[2 * N] : 0.0f, lv[s] = r < nr ? R[3 * N] : 0.0f;
    sums[s * THREADS + threadIdx.x] = 0.0f;
    sums[(SLOTS + s) * THREADS + threadIdx.x] = 0.0f;
  }
  const int t0 = blockIdx.y * p.tps, t1 = t0 + p.tps < p.vt ? t0 + p.tps : p.vt;
  for (int tile = t0; tile < t1; ++tile) {
    const int v0 = tile * BN, nv = p.V - v0 < BN ? p.V - v0 : BN;
    acc_t acc;
    float bj[NJ][2];
    head_tile<T, Align>(acc, bj, p.ht, s_rows, nr, v0, nv, smem);
    park_log_probs(park_y, acc, bj, mv, lv, p.invT);
    head_tile<T, Align>(acc, bj, p.hs, s_rows, nr, v0, nv, smem); /* its last barrier frees the stages */
    park_log_probs(park_x, acc, bj, mu, lu, p.invT);
    FH_NO_UNROLL
    for (int s = 0; s < SLOTS; ++s) {
      float d = 0.0f, q = 0.0f;
      FH_NO_UNROLL
      for (int je = 0; je < 2 * NJ; ++je) { /* columns in order */
        const int j = je >> 1, e = je & 1;
        if (frag_col(j, e) >= nv) continue;
        float term, qa;
        div_eval(p.dv, parked(park_x, s, j, e), parked(park_y, s, j, e), term, qa);
        d += term;
        q += qa;
      }
      sums[s * THREADS + threadIdx.x] += d;
      sums[(SLOTS + s) * THREADS + threadIdx.x] += q;
    }
    __syncthreads(); /* every park_x read is done before the next mainloop (or the merge) reuses the stages */
  }
  float Dacc[SLOTS], Sacc[SLOTS];
  FH_UNROLL
  for (int s = 0; s < SLOTS; ++s) {
    Dacc[s] = quad_sum(sums[s * THREADS + threadIdx.x]);
    Sacc[s] = quad_sum(sums[(SLOTS + s) * THREADS + threadIdx.x]);
  }
  float* scr = (float*)smem; /* [WARPS_N][2][BM] */
  if ((threadIdx.x & 3) == 0) {
    FH_UNROLL
    for (int s = 0; s < SLOTS; ++s) {
      float* q = scr + (size_t)warp_n() * 2 * BM + slot_row(s);
      q[0] = Dacc[s], q[BM] = Sacc[s];
    }
  }
  __syncthreads();
  const int r = threadIdx.x;
  if (r < nr) {
    float d = 0.0f, sq = 0.0f;
    for (int wn = 0; wn < WARPS_N; ++wn) { /* warp order */
      d += scr[(size_t)wn * 2 * BM + r];
      sq += scr[(size_t)wn * 2 * BM + BM + r];
    }
    const size_t i = (size_t)s_rows[r];
    float* P = p.part + (size_t)blockIdx.y * 2 * N + i;
    P[0] = d, P[N] = sq;
  }
}

struct fin_params {
  const int64_t* targets;
  int64_t ignore_index;
  int N, V, S, tps, hard, none;
  int sparse; /* rs row 2 holds the sparse teacher's a_R (the state's slot 1), row 3 nothing */
  double kappa, ws, wh;
  float* part;
  float* rs;
  float* terms; /* [3 x N]: loss_i, soft_i, hard_i for the reduction (0 at ignored rows) */
  float *loss, *soft, *hardl, *state;
};

__global__ void __launch_bounds__(256) distill_fin_stats_kernel(fin_params p) {
  const int i = blockIdx.x * 256 + threadIdx.x;
  if (i >= p.N) return;
  const size_t N = (size_t)p.N;
  int64_t y;
  float* R = p.rs + i;
  if (!row_valid(p.targets, p.ignore_index, p.V, i, &y)) {
    for (int q = 0; q < RS; ++q) R[q * N] = 0.0f;
    return;
  }
  const float* P = p.part + i;
  float mu = P[0], Zu = P[N], mv = P[2 * N], Zv = P[3 * N], ms = P[4 * N], Zs = P[5 * N], dummy = 0.0f;
  for (int s = 1; s < p.S; ++s) { /* split order: deterministic */
    const float* Q = P + (size_t)s * NQ1 * N;
    lce_stats_merge(mu, Zu, dummy, Q[0], Q[N], 0.0f);
    lce_stats_merge(mv, Zv, dummy, Q[2 * N], Q[3 * N], 0.0f);
    lce_stats_merge(ms, Zs, dummy, Q[4 * N], Q[5 * N], 0.0f);
  }
  R[0] = mu, R[N] = (float)log((double)Zu);
  R[2 * N] = mv, R[3 * N] = (float)log((double)Zv);
  R[4 * N] = p.hard ? ms : 0.0f, R[5 * N] = p.hard ? (float)log((double)Zs) : 0.0f;
  R[6 * N] = p.hard ? P[(size_t)((int)(y / fh_eng::BN) / p.tps) * NQ1 * N + 6 * N] : 0.0f;
}

__global__ void __launch_bounds__(256) distill_fin_row_kernel(fin_params p) {
  const int i = blockIdx.x * 256 + threadIdx.x;
  if (i >= p.N) return;
  const size_t N = (size_t)p.N;
  int64_t y;
  const bool valid = row_valid(p.targets, p.ignore_index, p.V, i, &y);
  double D = 0.0, S = 0.0, hard = 0.0;
  const float* R = p.rs + i;
  if (valid) {
    for (int s = 0; s < p.S; ++s) { /* split order */
      D += p.part[(size_t)s * 2 * N + i];
      S += p.part[(size_t)s * 2 * N + N + i];
    }
    if (p.hard) hard = ((double)R[4 * N] - (double)R[6 * N]) + (double)R[5 * N];
  }
  const double soft = p.kappa * D, loss = valid ? p.wh * hard + p.ws * soft : 0.0;
  if (p.state) {
    float* st = p.state + (size_t)i * 4;
    st[0] = valid ? (float)((double)R[0] + (double)R[N]) : 0.0f;
    st[1] = !valid ? 0.0f : p.sparse ? R[2 * N] : (float)((double)R[2 * N] + (double)R[3 * N]);
    st[2] = valid ? (float)S : 0.0f;
    st[3] = valid && p.hard ? (float)((double)R[4 * N] + (double)R[5 * N]) : 0.0f;
  }
  if (p.none) {
    p.loss[i] = (float)loss;
    if (p.soft) p.soft[i] = (float)soft;
    if (p.hardl) p.hardl[i] = (float)hard;
  }
  p.terms[i] = (float)loss;
  p.terms[N + i] = (float)soft;
  p.terms[2 * N + i] = (float)hard;
}

struct red_params {
  const int64_t* targets;
  int64_t ignore_index;
  int N, V, mean;
  float divisor;
  const float* terms; /* NULL when N == 0 */
  float *loss, *soft, *hard;
};

__global__ void __launch_bounds__(256) distill_reduce_kernel(red_params p) {
  __shared__ double red[4 * 256];
  double v[4] = {0, 0, 0, 0}; /* loss, soft, hard, n_valid */
  const size_t N = (size_t)p.N;
  for (int i = threadIdx.x; i < p.N; i += 256) {
    int64_t y;
    if (!row_valid(p.targets, p.ignore_index, p.V, i, &y)) continue;
    v[0] += p.terms[i];
    v[1] += p.terms[N + i];
    v[2] += p.terms[2 * N + i];
    v[3] += 1.0;
  }
  lce_block_sum(red, v, 4);
  if (threadIdx.x != 0) return;
  const double den = p.divisor > 0.0f ? (double)p.divisor : red[3 * 256];
  /* mean: a zero denominator (every row ignored) gives 0 (fusedhead.h) */
  const double inv = !p.mean ? 1.0 : den > 0.0 ? 1.0 / den : 0.0;
  p.loss[0] = (float)(red[0] * inv);
  if (p.soft) p.soft[0] = (float)(red[256] * inv);
  if (p.hard) p.hard[0] = (float)(red[2 * 256] * inv);
}

template <typename T, typename Align>
static fh_status_t launch_stats_tiles(const char* fn, dim3 grid, cudaStream_t stream, const fwd_params& fp,
                                   bool mc = false) {
  auto k1 = distill_stats_kernel<T, Align>;
  constexpr size_t smem = stats_smem<Align>();
  FH_TRY(fh_cuda_status(fh_eng::allow_smem<smem, fh_eng::optin<Align>::max>(k1), fn,
                        "cudaFuncSetAttribute(distill_stats_kernel)"));
  fh_eng::launch_tiles_mc(mc, k1, grid, smem, stream, fp);
  LCE_CHECK_LAUNCH(fn, "distill_stats_kernel");
  return FH_SUCCESS;
}

template <typename T, typename Align>
static fh_status_t launch_div_tiles(const char* fn, dim3 grid, cudaStream_t stream, const fwd_params& fp,
                                   bool mc = false) {
  auto k2 = distill_div_kernel<T, Align>;
  constexpr size_t smem = div_smem<Align>();
  FH_TRY(fh_cuda_status(fh_eng::allow_smem<smem, fh_eng::optin<Align>::max>(k2), fn,
                        "cudaFuncSetAttribute(distill_div_kernel)"));
  fh_eng::launch_tiles_mc(mc, k2, grid, smem, stream, fp);
  LCE_CHECK_LAUNCH(fn, "distill_div_kernel");
  return FH_SUCCESS;
}

static fin_params fin_params_of(const fh_distill_problem_t* p, const fwd_layout& L, float* part, float* rs) {
  const fh_distill_options_t* o = &p->opt;
  fin_params q;
  q.targets = p->targets, q.ignore_index = o->ignore_index;
  q.N = (int)p->N, q.V = (int)p->V, q.S = L.S, q.tps = L.tps, q.hard = o->hard_weight != 0.0f;
  q.none = o->reduction == FH_REDUCTION_NONE;
  q.sparse = p->sparse != 0;
  q.kappa = o->scale_by_t_squared ? (double)o->temperature * (double)o->temperature : 1.0;
  q.ws = o->soft_weight, q.wh = o->hard_weight;
  q.part = part, q.rs = rs, q.terms = NULL;
  q.loss = q.soft = q.hardl = q.state = NULL;
  return q;
}

} /* namespace fh_dst */

/* Pass 1 and its merge (launches 2 and 3 of the file comment) into rs [RS x N]; part: the
 * partials [S x NQ1 x N]. The rows are compacted already (rows, hdr). */
fh_status_t fh_dst::launch_row_stats(const char* fn, cudaStream_t stream, const fh_distill_problem_t* p,
                                     const int* rows, const lce_ws_header* hdr, float* rs, float* part) {
  const fwd_layout L = fwd_layout_of(p->N, p->V);
  fwd_params fp = make_fwd_params(p, rows, hdr, rs, L);
  fp.part = part;
  const dim3 grid(lce_blocks(p->N, fh_eng::BM), (unsigned)L.S);
  const bool vec = operands_vec16(p);
  LCE_DTYPE_SWITCH(p->Es->dtype, T, {
    using A90 = fh_eng::tma90_for<T>;
    const bool mc = fh_eng::multicast_enabled<T>(grid.x, distill_stats_kernel<T, A90>, stats_smem<A90>());
    if (heads_tma90<T>(vec, p, fp.hs, fp.ht, mc))
      FH_TRY((launch_stats_tiles<T, A90>(fn, grid, stream, fp, mc)));
    else if (vec) FH_TRY((launch_stats_tiles<T, fh_eng::vec16>(fn, grid, stream, fp)));
    else FH_TRY((launch_stats_tiles<T, fh_eng::scalar>(fn, grid, stream, fp)));
  });
  const fin_params q = fin_params_of(p, L, part, rs);
  FH_LAUNCH(distill_fin_stats_kernel, dim3(lce_blocks(p->N, 256)), dim3(256), 0, stream, q);
  LCE_CHECK_LAUNCH(fn, "distill_fin_stats_kernel");
  return FH_SUCCESS;
}

using namespace fh_dst;

extern "C" fh_status_t fh_cuda_distill_forward_workspace(int64_t N, int64_t V, size_t* bytes) {
  *bytes = fwd_layout_of(N, V).total; /* a sparse teacher adds fh_cuda_distill_sparse_workspace */
  return FH_SUCCESS;
}

extern "C" fh_status_t fh_cuda_distill_forward(fh_cuda_state_t* st, struct CUstream_st* stream,
                                               const fh_distill_problem_t* p, const fh_distill_outputs_t* out,
                                               void* workspace) {
  const char* fn = p->fn;
  FH_TRY(check_problem(fn, p));
  const fwd_layout L = fwd_layout_of(p->N, p->V);
  const fh_distill_options_t* o = &p->opt;
  unsigned char* ws = (unsigned char*)workspace;
  lce_ws_header* hdr = (lce_ws_header*)ws;
  float* part = p->N > 0 ? (float*)(ws + L.part_off) : NULL;
  float* rs = p->N > 0 ? (float*)(ws + L.rs_off) : NULL;
  float* terms = p->N > 0 ? (float*)(ws + L.terms_off) : NULL;
  const bool none = o->reduction == FH_REDUCTION_NONE;
  if (p->N > 0) {
    int* rows = (int*)(ws + L.rows_off);
    FH_TRY(lce_launch_prep_rows(fn, stream, p->targets, p->N, p->V, o->ignore_index, rows, hdr,
                                fh_cuda_error_flag(st)));
    FH_TRY(launch_row_stats(fn, stream, p, rows, hdr, rs, part));
    fwd_params fp = make_fwd_params(p, rows, hdr, rs, L);
    fp.part = part; /* pass 2's partials overwrite pass 1's, which the merge has consumed */
    const dim3 grid(lce_blocks(p->N, fh_eng::BM), (unsigned)L.S);
    const bool vec = operands_vec16(p);
    const bool sparse = p->sparse != 0;
    if (sparse) /* the per-row pass replaces the divergence tiles: one split; a_R into rs row 2 */
      FH_TRY(sparse_forward_rows(fn, fh_cuda_error_flag(st), stream, p, rs, rs + p->N, part, rs + 2 * p->N,
                                 ws + L.total));
    else LCE_DTYPE_SWITCH(p->Es->dtype, T, {
      using A90 = fh_eng::tma90_for<T>;
      const bool mc = fh_eng::multicast_enabled<T>(grid.x, distill_div_kernel<T, A90>, div_smem<A90>());
      if (heads_tma90<T>(vec, p, fp.hs, fp.ht, mc))
        FH_TRY((launch_div_tiles<T, A90>(fn, grid, stream, fp, mc)));
      else if (vec) FH_TRY((launch_div_tiles<T, fh_eng::vec16>(fn, grid, stream, fp)));
      else FH_TRY((launch_div_tiles<T, fh_eng::scalar>(fn, grid, stream, fp)));
    });
    fin_params q = fin_params_of(p, L, part, rs);
    if (sparse) q.S = 1;
    q.terms = terms;
    q.loss = out->loss, q.soft = out->soft_loss, q.hardl = out->hard_loss, q.state = out->row_state;
    FH_LAUNCH(distill_fin_row_kernel, dim3(lce_blocks(p->N, 256)), dim3(256), 0, stream, q);
    LCE_CHECK_LAUNCH(fn, "distill_fin_row_kernel");
  }
  if (!none) {
    red_params r;
    r.targets = p->targets, r.ignore_index = o->ignore_index;
    r.N = (int)p->N, r.V = (int)p->V, r.mean = o->reduction == FH_REDUCTION_MEAN;
    r.divisor = o->divisor, r.terms = terms;
    r.loss = out->loss, r.soft = out->soft_loss, r.hard = out->hard_loss;
    FH_LAUNCH(distill_reduce_kernel, dim3(1), dim3(256), 0, stream, r);
    LCE_CHECK_LAUNCH(fn, "distill_reduce_kernel");
  }
  return FH_SUCCESS;
}
