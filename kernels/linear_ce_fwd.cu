/* Linear cross-entropy forward (Cut Cross-Entropy style): the [N x V] logits never reach memory.
 *
 * Formula (fusedhead.h, docs/linear_ce.md): r = E·Cᵀ + b, z = softcap(scale·r), lse_i = log Σ_j e^{z_ij},
 * h_i = lse_i − Σ_j p_ij z_ij, ce_i = ω_i [w_y (1−α)(lse_i − z_iy) + ε_i (W_i lse_i − Σ_j w_j z_ij)],
 * sums over the row's unmasked classes (raw r = −inf masks a class, docs/conventions.md:
 * ε_i = α / V_i, W_i = Σ w_j over them; a masked target gives +inf),
 * reg_i = ω_i [λ lse_i² + η h_i], argmax over the raw r (NaN largest, lowest index on ties).
 * Shapes: E [N x D], C [V x D], bias [V], targets [N], class weights [V], token weights [N].
 *
 * Four launches, no host synchronization (the grids are sized for N rows; blocks past the
 * device-side valid count exit at once, so ignored rows cost no FLOPs):
 *   1. lce_prep_kernel (1 block x 256): compacts the valid rows in row order (block prefix sum,
 *      deterministic), flags targets outside [0, V) on the device (those rows count as ignored).
 *   2. lce_fwd_tile_kernel<T, Align>, grid (ceil(N/128) row blocks) x (S vocabulary splits),
 *      256 threads (384 on sm_90a, with a producer warpgroup: engine/sm90_ws.cuh): each block
 *      loops over its split's 128-class tiles; per tile the engine's
 *      mainloop (kernels/engine/sm80.cuh, docs/engine.md) leaves the raw logits in registers and
 *      the register epilogue updates, per row, the online stats m, Z = Σ e^{z−m},
 *      F = Σ e^{z−m}(z−m), Σ w_j z_j (label smoothing only), z_y and the argmax of r, merged
 *      across lanes and warps in a fixed order at the split's end; the (split, row) partials
 *      [S x 7 x N] fp32 go to the workspace. Align = vec16 when E and C are 16-byte aligned
 *      with 16-byte row strides, else the scalar-load fallback.
 *   3. lce_fwd_finalize_kernel (one thread per row): merges the S partials in split order
 *      (deterministic), forms lse, h, ce, reg in fp64 from the fp32 stats, writes lse, entropy,
 *      argmax, per-row loss / z_loss for reduction none, and the row terms for step 4.
 *   4. lce_fwd_reduce_kernel (1 block x 256): fixed-order fp64 sums of ce, reg, z-loss,
 *      correct, D_ce = Σ ω w_y, D_reg = Σ ω over valid rows; a zero denominator gives 0.
 * S = min(ceil(V/128), 16) depends on V alone (never on N or the device), so a row's results are
 * bitwise the same whatever the batch, block order or GPU (docs/engine.md "Determinism").
 * Workspace: 256 B header + 4N (rows) + 28·S·N (partials); at N=8192, V=256000: S = 16, 3.5 MiB
 * (E alone is 36 MiB there). */
#include <math.h>

#include "engine/epilogue.cuh"
#include "engine/sm90_ws.cuh"
#include "linear_ce_common.cuh"

namespace fh_lce {

/* Partial stats per (split, row): m, Z, F, Σwz, z_y, argmax value, argmax index; with label
 * smoothing also the row's unmasked class count V_i and weight sum W_i (docs/conventions.md:
 * smoothing runs over the row's unmasked classes). */
constexpr int NQ = 7, NQ_SMOOTH = 9;
constexpr int MAX_SPLITS = 16;

struct fwd_layout {
  int S, tps, vt, nq;
  size_t rows_off, part_off, total;
};

/* Vocabulary splits from V alone (docs/engine.md "Determinism"): a row's partials, and so its
 * lse, depend on the split boundaries, so they must not depend on N. */
static fwd_layout fwd_layout_of(int64_t N, int64_t V, bool smooth) {
  fwd_layout L;
  const lce_vsplit sp = lce_vsplit_of(V, MAX_SPLITS);
  L.vt = sp.vt, L.tps = sp.tps, L.S = sp.S;
  L.rows_off = 256;
  L.part_off = L.rows_off + lce_align(sizeof(int) * (size_t)N);
  L.nq = smooth ? NQ_SMOOTH : NQ;
  L.total = L.part_off + lce_align(sizeof(float) * (size_t)L.nq * (size_t)L.S * (size_t)N);
  return L;
}

__global__ void __launch_bounds__(256) lce_prep_kernel(const int64_t* __restrict__ targets, int N, int V,
                                                       int64_t ignore_index, int* __restrict__ rows,
                                                       lce_ws_header* __restrict__ hdr,
                                                       int* __restrict__ err_flag) {
  __shared__ int scan[256];
  const int t = threadIdx.x;
  int base = 0;
  for (int i0 = 0; i0 < N; i0 += 256) {
    const int i = i0 + t;
    int v = 0;
    if (i < N && !targets) {
      v = 1; /* no targets (distillation): every row is valid */
    } else if (i < N) {
      const int64_t y = targets[i];
      if (y != ignore_index) {
        if (y >= 0 && y < V) v = 1;
        else atomicExch(err_flag, (int)FH_DEVERR_TARGET_OUT_OF_RANGE); /* a status at the next check */
      }
    }
    scan[t] = v;
    __syncthreads();
    for (int off = 1; off < 256; off <<= 1) { /* inclusive Hillis-Steele scan */
      const int x = t >= off ? scan[t - off] : 0;
      __syncthreads();
      scan[t] += x;
      __syncthreads();
    }
    if (v) rows[base + scan[t] - 1] = i;
    base += scan[255];
    __syncthreads(); /* scan[] is rewritten by the next chunk */
  }
  if (t == 0) hdr->count = base;
}

fh_status_t lce_launch_prep_rows(const char* fn, cudaStream_t stream, const int64_t* targets, int64_t N, int64_t V,
                                 int64_t ignore_index, int* rows, lce_ws_header* hdr, int* err_flag) {
  FH_LAUNCH(lce_prep_kernel, dim3(1), dim3(256), 0, stream, targets, (int)N, (int)V, ignore_index, rows, hdr,
            err_flag);
  LCE_CHECK_LAUNCH(fn, "lce_prep_kernel");
  return FH_SUCCESS;
}

fh_status_t lce_launch_prep(const char* fn, cudaStream_t stream, const fh_lce_problem_t* p, int* rows,
                            lce_ws_header* hdr, int* err_flag) {
  return lce_launch_prep_rows(fn, stream, p->targets, p->N, p->V, p->opt.ignore_index, rows, hdr, err_flag);
}

struct fwd_params {
  const void* E;
  const void* C;
  const void* bias;
  int64_t lde, ldc;
  const float* cw;
  const int64_t* targets;
  int N, V, D, S, tps, vt;
  float scale, cap;
  int nq; /* partials per (split, row): NQ, or NQ_SMOOTH with label smoothing */
  const int* rows;
  const lce_ws_header* hdr;
  float* part;
  CUtensorMap tmc; /* C for the sm_90a mainloop's TMA (engine/sm90.cuh); unused on sm_80 */
};

/* Dynamic shared memory of the tile kernel: the engine's stages, then the row block's indices
 * and targets. The cross-warp merge at the end reuses the stage buffers. */
template <typename Align>
constexpr size_t fwd_smem() {
  return fh_eng::ring<Align>::bytes + 2 * fh_eng::BM * sizeof(int);
}
static_assert(fh_eng::WARPS_N * fh_eng::BM * NQ_SMOOTH * sizeof(float) <= fh_eng::SMEM_BYTES, "merge scratch");

/* One row block (128 compacted valid rows) x one vocabulary split. Per class tile: the engine's
 * mainloop leaves the 128 x 128 raw logits in registers; the epilogue adds the bias (read once
 * per tile), takes the argmax of the raw values, forms z = softcap(scale · r) and folds it into
 * this thread's online statistics of its 8 rows (row_stats), the target logit and Σ w z; a raw
 * logit of -inf masks its class (docs/conventions.md): left out of every sum, and a masked
 * target's z_y is -inf. At the
 * split's end the four lanes of a quad merge by shuffles (xor 1, then 2), then the four warps
 * along N in warp order through shared memory: a fixed order that depends on nothing but the
 * class split, so a row's partials are the same whatever rows share its block. */
template <typename T, typename Align>
__global__ void __launch_bounds__(fh_eng::block_threads<Align>::value, 1)
    lce_fwd_tile_kernel(const __grid_constant__ fwd_params p) {
  using namespace fh_eng;
  /* Short names for the engine's tile. */
  constexpr int kBM = fh_eng::BM, kBN = fh_eng::BN, kThreads = fh_eng::THREADS;
  FH_DYNAMIC_SMEM(unsigned char, smem);
  int* s_rows = (int*)(smem + ring<Align>::bytes);
  int* s_y = s_rows + kBM;
  const int count = p.hdr->count, row0 = blockIdx.x * kBM;
  /* cluster-uniform: rows past the valid count cost nothing (engine/sm90.cuh, cluster_ctas) */
  if ((int)(blockIdx.x - blockIdx.x % cluster_ctas<Align>()) * kBM >= count) return;
  const int nr = count - row0 < 0 ? 0 : (count - row0 < kBM ? count - row0 : kBM);
  for (int r = threadIdx.x; r < kBM; r += kThreads) {
    const int i = r < nr ? p.rows[row0 + r] : 0;
    s_rows[r] = i;
    s_y[r] = r < nr ? (int)p.targets[i] : -1;
  }
  __syncthreads();

  const nt_operand<T> a{(const T*)p.E, p.lde, s_rows, 0, nr};
  const int t0 = blockIdx.y * p.tps, t1 = t0 + p.tps < p.vt ? t0 + p.tps : p.vt;
  auto b_of = [&](int tile) {
    const int v0 = tile * kBN;
    return nt_operand<T>{(const T*)p.C, p.ldc, nullptr, v0, p.V - v0 < kBN ? p.V - v0 : kBN, &p.tmc};
  };
  /* The warp-specialized loop's producer warpgroup loads every tile, then leaves
   * (engine/sm90_ws.cuh; for the other loops pp.producer is false and these calls do nothing). */
  typename pipe_of<Align>::type pp;
  start_tiles<T, Align>(smem);
  if (pp.producer) {
    producer_role<Align>();
    for (int tile = t0; tile < t1; ++tile) produce_tile<T, Align>(a, b_of(tile), p.D, smem, pp);
    finish_tiles<T, Align>(smem, pp);
    return;
  }
  consumer_role<Align>();

  const T* bias = (const T*)p.bias;
  const float inv_cap = p.cap > 0.0f ? 1.0f / p.cap : 0.0f;
  constexpr int SLOTS = 2 * MI; /* rows of this thread: (i, h) -> frag_row(i, 2h) */
  row_stats st[SLOTS];
  float swz[SLOTS], zy[SLOTS], av[SLOTS], nun[SLOTS], wun[SLOTS];
  int ai[SLOTS], ys[SLOTS];
  FH_UNROLL
  for (int s = 0; s < SLOTS; ++s) {
    st[s].init();
    swz[s] = 0.0f, zy[s] = 0.0f, av[s] = -INFINITY, ai[s] = INT32_MAX, nun[s] = 0.0f, wun[s] = 0.0f;
    ys[s] = s_y[frag_row(s >> 1, 2 * (s & 1))];
  }
  for (int tile = t0; tile < t1; ++tile) {
    const nt_operand<T> b = b_of(tile);
    const int v0 = b.row0, nv = b.n;
    acc_t acc;
    run_tile<T, Align>(acc, a, b, p.D, smem, pp);
    float bj[NJ][2], wj[NJ][2];
    tile_bias<T>(bj, bias, v0, nv);
    tile_weights(wj, p.cw, v0, nv); /* Σ w z, W_i: read only with label smoothing */
    FH_UNROLL
    for (int s = 0; s < SLOTS; ++s) {
      const int i = s >> 1, h = s & 1;
      float z[2 * NJ];
      float tmax = -INFINITY;
      FH_UNROLL
      for (int j = 0; j < NJ; ++j)
        FH_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int c = frag_col(j, e), col = v0 + c;
          float zz = -INFINITY;
          if (c < nv) {
            const float r = raw_logit(acc.v[i][j][2 * h + e], bj[j][e]);
            if (arg_better(r, col, av[s], ai[s])) av[s] = r, ai[s] = col;
            if (r != -INFINITY) {
              zz = process_logit(r, p.scale, p.cap, inv_cap);
              tmax = fmaxf(tmax, zz);
              swz[s] = fmaf(wj[j][e], zz, swz[s]);
              wun[s] += wj[j][e];
              nun[s] += 1.0f;
            }
            if (col == ys[s]) zy[s] = zz; /* -inf when the target is masked */
          }
          z[2 * j + e] = zz;
        }
      st[s].add(z, tmax);
    }
  }
  finish_tiles<T, Align>(smem, pp); /* the ring is idle: its bytes are free */
  /* Merge the quad's four column sets (lanes xor 1, then xor 2): every lane takes part. */
  FH_UNROLL
  for (int s = 0; s < SLOTS; ++s)
    FH_UNROLL
    for (int off = 1; off <= 2; off <<= 1) {
      const float m2 = __shfl_xor_sync(FH_FULL_MASK, st[s].m, off), Z2 = __shfl_xor_sync(FH_FULL_MASK, st[s].Z, off);
      const float F2 = __shfl_xor_sync(FH_FULL_MASK, st[s].F, off);
      const float w2 = __shfl_xor_sync(FH_FULL_MASK, swz[s], off), y2 = __shfl_xor_sync(FH_FULL_MASK, zy[s], off);
      const float a2 = __shfl_xor_sync(FH_FULL_MASK, av[s], off);
      const float n2 = __shfl_xor_sync(FH_FULL_MASK, nun[s], off), u2 = __shfl_xor_sync(FH_FULL_MASK, wun[s], off);
      const int i2 = __shfl_xor_sync(FH_FULL_MASK, ai[s], off);
      /* The lower lane keeps its own set first: a fixed order on every lane that stores. */
      if ((threadIdx.x & off) == 0) st[s].merge(m2, Z2, F2);
      else {
        row_stats o{m2, Z2, F2};
        o.merge(st[s].m, st[s].Z, st[s].F);
        st[s] = o;
      }
      swz[s] = (threadIdx.x & off) == 0 ? swz[s] + w2 : w2 + swz[s];
      zy[s] += y2; /* the other lanes hold exactly 0 */
      nun[s] += n2; /* integers below 2^24: exact in any order */
      wun[s] = (threadIdx.x & off) == 0 ? wun[s] + u2 : u2 + wun[s];
      if (arg_better(a2, i2, av[s], ai[s])) av[s] = a2, ai[s] = i2;
    }
  /* Then the four warps along N, in warp order, through the free stage buffers. */
  float* scr = (float*)smem; /* [WARPS_N][nq][kBM] */
  const int nq = p.nq;
  if ((threadIdx.x & 3) == 0) {
    FH_UNROLL
    for (int s = 0; s < SLOTS; ++s) {
      float* q = scr + (size_t)warp_n() * nq * kBM + frag_row(s >> 1, 2 * (s & 1));
      q[0 * kBM] = st[s].m, q[1 * kBM] = st[s].Z, q[2 * kBM] = st[s].F, q[3 * kBM] = swz[s];
      q[4 * kBM] = zy[s], q[5 * kBM] = av[s], q[6 * kBM] = __int_as_float(ai[s]);
      if (nq > NQ) q[7 * kBM] = nun[s], q[8 * kBM] = wun[s];
    }
  }
  tile_sync<Align>();
  const int r = threadIdx.x;
  if (r < nr) {
    row_stats t;
    t.init();
    float w = 0.0f, y = 0.0f, bv = -INFINITY, cnt = 0.0f, wsum = 0.0f;
    int bi = INT32_MAX;
    for (int wn = 0; wn < WARPS_N; ++wn) {
      const float* q = scr + (size_t)wn * nq * kBM + r;
      if (nq > NQ) cnt += q[7 * kBM], wsum += q[8 * kBM];
      t.merge(q[0], q[kBM], q[2 * kBM]);
      w += q[3 * kBM];
      y += q[4 * kBM];
      if (arg_better(q[5 * kBM], __float_as_int(q[6 * kBM]), bv, bi)) bv = q[5 * kBM], bi = __float_as_int(q[6 * kBM]);
    }
    const size_t N = (size_t)p.N, i = (size_t)s_rows[r];
    float* P = p.part + (size_t)blockIdx.y * nq * N + i;
    P[0 * N] = t.m;
    P[1 * N] = t.Z;
    P[2 * N] = t.F;
    P[3 * N] = w;
    P[4 * N] = y;
    P[5 * N] = bv;
    P[6 * N] = __int_as_float(bi);
    if (nq > NQ) P[7 * N] = cnt, P[8 * N] = wsum;
  }
}

template <typename T, typename Align>
static fh_status_t launch_fwd_tile(const char* fn, dim3 grid, cudaStream_t stream, const fwd_params& fp,
                                   bool mc = false) {
  auto k = lce_fwd_tile_kernel<T, Align>;
  constexpr size_t smem = fwd_smem<Align>();
  FH_TRY(fh_cuda_status(fh_eng::allow_smem<smem, fh_eng::optin<Align>::max>(k), fn,
                        "cudaFuncSetAttribute(lce_fwd_tile_kernel)"));
  fh_eng::launch_tiles_n(fh_eng::block_threads<Align>::value, mc, k, grid, smem, stream, fp);
  LCE_CHECK_LAUNCH(fn, "lce_fwd_tile_kernel");
  return FH_SUCCESS;
}

struct fin_params {
  const int64_t* targets;
  int64_t ignore_index;
  int N, V, S, tps, nq;
  const float* cw;
  const float* tw;
  float alpha, lambda, eta;
  int none;
  const lce_ws_header* hdr;
  float* part;
  float *lse, *entropy, *loss, *zloss;
  int64_t* argmax;
};

__global__ void __launch_bounds__(256) lce_fwd_finalize_kernel(fin_params p) {
  const int i = blockIdx.x * 256 + threadIdx.x;
  if (i >= p.N) return;
  const int64_t y = p.targets[i];
  const size_t N = (size_t)p.N;
  float* P = p.part + i;
  if (y == p.ignore_index || y < 0 || y >= p.V) {
    if (p.lse) p.lse[i] = 0.0f;
    if (p.entropy) p.entropy[i] = 0.0f;
    if (p.argmax) p.argmax[i] = -1;
    if (p.none) p.loss[i] = 0.0f;
    if (p.none && p.zloss) p.zloss[i] = 0.0f;
    return;
  }
  const int nq = p.nq;
  float m = P[0], Z = P[N], F = P[2 * N], av = P[5 * N];
  double swz = P[3 * N], cnt = nq > NQ ? P[7 * N] : 0.0, wsum = nq > NQ ? P[8 * N] : 0.0;
  int ai = __float_as_int(P[6 * N]);
  for (int s = 1; s < p.S; ++s) { /* split order: deterministic */
    const float* Q = P + (size_t)s * nq * N;
    lce_stats_merge(m, Z, F, Q[0], Q[N], Q[2 * N]);
    swz += Q[3 * N];
    if (nq > NQ) cnt += Q[7 * N], wsum += Q[8 * N];
    if (fh_eng::arg_better(Q[5 * N], __float_as_int(Q[6 * N]), av, ai)) av = Q[5 * N], ai = __float_as_int(Q[6 * N]);
  }
  const int sy = (int)(y / fh_eng::BN) / p.tps;
  const double zy = P[(size_t)sy * nq * N + 4 * N];
  /* Every class masked (Z = 0): lse -inf, entropy 0 (docs/conventions.md). */
  const double lnZ = log((double)Z), lse = (double)m + lnZ, h = Z != 0.0f ? lnZ - (double)F / (double)Z : 0.0;
  const double om = p.tw ? p.tw[i] : 1.0, wy = p.cw ? p.cw[y] : 1.0;
  const double nll = zy == -INFINITY ? INFINITY : lse - zy; /* a masked target: +inf */
  double ce = lce_mul0(om * wy * (1.0 - p.alpha), nll);
  /* smoothing over the row's unmasked classes: α / V_i · (W_i lse − Σ w z) */
  if (p.alpha != 0.0f && cnt > 0.0) ce += om * (double)p.alpha / cnt * (wsum * lse - swz);
  const double zl = lce_mul0(om * p.lambda, lse * lse), reg = zl + lce_mul0(om * p.eta, h);
  if (p.lse) p.lse[i] = (float)lse;
  if (p.entropy) p.entropy[i] = (float)h;
  if (p.argmax) p.argmax[i] = ai;
  if (p.none) p.loss[i] = (float)(ce + reg);
  if (p.none && p.zloss) p.zloss[i] = (float)zl;
  /* row terms for the reduction, over this row's own split-0 slots (only this thread reads them) */
  P[0] = (float)ce;
  P[N] = (float)reg;
  P[2 * N] = (float)zl;
  P[3 * N] = ai == (int)y ? 1.0f : 0.0f;
}

struct red_params {
  const int64_t* targets;
  int64_t ignore_index;
  int N, V;
  const float* cw;
  const float* tw;
  float divisor;
  int reduction;
  const float* part; /* NULL when N == 0 */
  float *loss, *zloss, *accuracy;
};

__global__ void __launch_bounds__(256) lce_fwd_reduce_kernel(red_params p) {
  __shared__ double red[7 * 256];
  double v[7] = {0, 0, 0, 0, 0, 0, 0}; /* ce, reg, zl, correct, D_ce, D_reg, n_valid */
  const size_t N = (size_t)p.N;
  for (int i = threadIdx.x; i < p.N; i += 256) {
    const int64_t y = p.targets[i];
    if (y == p.ignore_index || y < 0 || y >= p.V) continue;
    const double om = p.tw ? p.tw[i] : 1.0;
    v[0] += p.part[i];
    v[1] += p.part[N + i];
    v[2] += p.part[2 * N + i];
    v[3] += p.part[3 * N + i];
    v[4] += om * (p.cw ? p.cw[y] : 1.0);
    v[5] += om;
    v[6] += 1.0;
  }
  lce_block_sum(red, v, 7);
  if (threadIdx.x != 0) return;
  double s[7];
  for (int q = 0; q < 7; ++q) s[q] = red[q * 256];
  if (p.accuracy) p.accuracy[0] = s[6] > 0 ? (float)(s[3] / s[6]) : 0.0f;
  if (p.reduction == FH_REDUCTION_NONE) return;
  double dce = s[4], dreg = s[5];
  if (p.divisor > 0.0f) dce = dreg = p.divisor;
  if (p.reduction == FH_REDUCTION_MEAN) { /* a zero denominator gives 0 (fusedhead.h) */
    p.loss[0] = (float)((dce != 0 ? s[0] / dce : 0.0) + (dreg != 0 ? s[1] / dreg : 0.0));
    if (p.zloss) p.zloss[0] = (float)(dreg != 0 ? s[2] / dreg : 0.0);
  } else {
    p.loss[0] = (float)(s[0] + s[1]);
    if (p.zloss) p.zloss[0] = (float)s[2];
  }
}

} /* namespace fh_lce */

using namespace fh_lce;

/* The tile kernel for 16-bit T on the sm_90a loop of tag A90 when the host picks it (pick_tma90:
 * Hopper, 16-byte rows, the tensor map encodes), in 2-CTA clusters when multicast_enabled, else
 * on the sm_80 loop (vec16, or scalar for unaligned operands). */
template <typename T, typename A90>
static fh_status_t launch_tiles_on(const char* fn, dim3 grid, cudaStream_t stream, fwd_params& fp, bool vec,
                                   int64_t V, int64_t D) {
  const bool mc = fh_eng::multicast_enabled<T>(grid.x, lce_fwd_tile_kernel<T, A90>, fwd_smem<A90>(),
                                               fh_eng::block_threads<A90>::value);
  if (fh_eng::pick_tma90<T>(vec, &fp.tmc, fp.C, V, D, fp.ldc, mc))
    return launch_fwd_tile<T, A90>(fn, grid, stream, fp, mc);
  if (vec) return launch_fwd_tile<T, fh_eng::vec16>(fn, grid, stream, fp);
  return launch_fwd_tile<T, fh_eng::scalar>(fn, grid, stream, fp);
}

/* Launches the tile kernel for every valid row and split (the partials of fwd_layout_of). On
 * Hopper the warp-specialized loop (tma90ws) unless FH_WS=0, which keeps the tma90 loop
 * (comparisons: the same bits, and the GPU check times both). */
static fh_status_t launch_tiles(const char* fn, cudaStream_t stream, const fh_lce_problem_t* p, const fwd_layout& L,
                                const int* rows, const lce_ws_header* hdr, float* part) {
  const fh_linear_ce_options_t* o = &p->opt;
  fwd_params fp;
  fp.E = p->E->data;
  fp.C = p->C->data;
  fp.bias = p->bias ? p->bias->data : NULL;
  fp.lde = p->E->row_stride;
  fp.ldc = p->C->row_stride;
  fp.cw = p->class_weights;
  fp.targets = p->targets;
  fp.N = (int)p->N, fp.V = (int)p->V, fp.D = (int)p->D;
  fp.S = L.S, fp.tps = L.tps, fp.vt = L.vt;
  fp.scale = o->logit_scale, fp.cap = o->softcap;
  fp.nq = L.nq;
  fp.rows = rows, fp.hdr = hdr, fp.part = part;
  const dim3 grid(lce_blocks(p->N, fh_eng::BM), (unsigned)L.S);
  const bool vec = fh_eng::vec16_ok(fp.E, fp.lde, fh_dtype_size(p->dtype)) &&
                   fh_eng::vec16_ok(fp.C, fp.ldc, fh_dtype_size(p->dtype));
  LCE_DTYPE_SWITCH(p->dtype, T, {
    if (fh_eng::ws_enabled())
      FH_TRY((launch_tiles_on<T, fh_eng::tma90ws_for<T>>(fn, grid, stream, fp, vec, p->V, p->D)));
    else
      FH_TRY((launch_tiles_on<T, fh_eng::tma90_for<T>>(fn, grid, stream, fp, vec, p->V, p->D)));
  });
  return FH_SUCCESS;
}

/* Per valid row i, merged over the splits in order (the finalize kernel's order, so m, Z, F are
 * bitwise the forward's): counts[i] = V_i, counts[N + i] = W_i (smoothing layout only);
 * stats[i] = m, stats[N + i] = ln Z, stats[2N + i] = h. */
__global__ void __launch_bounds__(256) lce_row_stats_kernel(const int64_t* targets, int64_t ignore_index, int N, int V,
                                                            int S, int nq, const float* part, float* counts,
                                                            float* stats) {
  const int i = blockIdx.x * 256 + threadIdx.x;
  if (i >= N) return;
  const int64_t y = targets[i];
  if (y == ignore_index || y < 0 || y >= V) return;
  const size_t n = (size_t)N;
  const float* P = part + i;
  float m = P[0], Z = P[n], F = P[2 * n], c = 0.0f, w = 0.0f;
  for (int s = 0; s < S; ++s) {
    const float* Q = P + (size_t)s * nq * n;
    if (s > 0) lce_stats_merge(m, Z, F, Q[0], Q[n], Q[2 * n]);
    if (nq > NQ) c += Q[7 * n], w += Q[8 * n];
  }
  if (counts) counts[i] = c, counts[n + i] = w;
  if (stats) {
    const double lnZ = log((double)Z);
    stats[i] = m;
    stats[n + i] = (float)lnZ;
    stats[2 * n + i] = Z != 0.0f ? (float)(lnZ - (double)F / (double)Z) : 0.0f;
  }
}

size_t fh_lce::lce_row_stats_scratch(int64_t N, int64_t V, bool smooth) { return fwd_layout_of(N, V, smooth).total; }

fh_status_t fh_lce::lce_launch_row_stats(const char* fn, cudaStream_t stream, const fh_lce_problem_t* p, const int* rows,
                                         const lce_ws_header* hdr, void* scratch, bool smooth, float* counts,
                                         float* stats) {
  const fwd_layout L = fwd_layout_of(p->N, p->V, smooth);
  float* part = (float*)((unsigned char*)scratch + L.part_off);
  FH_TRY(launch_tiles(fn, stream, p, L, rows, hdr, part));
  FH_LAUNCH(lce_row_stats_kernel, dim3(lce_blocks(p->N, 256)), dim3(256), 0, stream, p->targets, p->opt.ignore_index,
            (int)p->N, (int)p->V, L.S, L.nq, (const float*)part, counts, stats);
  LCE_CHECK_LAUNCH(fn, "lce_row_stats_kernel");
  return FH_SUCCESS;
}

extern "C" fh_status_t fh_cuda_linear_ce_forward_workspace(const fh_cuda_state_t* st, const fh_linear_ce_options_t* opt,
                                                           int64_t N, int64_t V, int64_t D, fh_dtype_t dtype,
                                                           size_t* bytes) {
  (void)st, (void)dtype;
  FH_TRY(lce_check_shape("fh_linear_ce_forward_workspace_size", N, V, D));
  *bytes = fwd_layout_of(N, V, opt->label_smoothing != 0.0f).total;
  return FH_SUCCESS;
}

extern "C" fh_status_t fh_cuda_linear_ce_forward(fh_cuda_state_t* st, struct CUstream_st* stream,
                                                 const fh_lce_problem_t* p, const fh_linear_ce_outputs_t* out,
                                                 void* workspace, size_t workspace_bytes) {
  static const char fn[] = "fh_linear_ce_forward";
  (void)workspace_bytes; /* checked by the caller against the query */
  FH_TRY(lce_check_shape(fn, p->N, p->V, p->D));
  const fh_linear_ce_options_t* o = &p->opt;
  const fwd_layout L = fwd_layout_of(p->N, p->V, o->label_smoothing != 0.0f);
  unsigned char* ws = (unsigned char*)workspace;
  lce_ws_header* hdr = (lce_ws_header*)ws;
  float* part = p->N > 0 ? (float*)(ws + L.part_off) : NULL;
  if (p->N > 0) {
    int* rows = (int*)(ws + L.rows_off);
    FH_TRY(lce_launch_prep(fn, stream, p, rows, hdr, fh_cuda_error_flag(st)));
    FH_TRY(launch_tiles(fn, stream, p, L, rows, hdr, part));
    fin_params q;
    q.targets = p->targets, q.ignore_index = o->ignore_index;
    q.N = (int)p->N, q.V = (int)p->V, q.S = L.S, q.tps = L.tps, q.nq = L.nq;
    q.cw = p->class_weights, q.tw = p->token_weights;
    q.alpha = o->label_smoothing, q.lambda = o->z_loss_scale, q.eta = o->entropy_weight;
    q.none = o->reduction == FH_REDUCTION_NONE;
    q.hdr = hdr, q.part = part;
    q.lse = out->lse, q.entropy = out->entropy, q.loss = out->loss, q.zloss = out->z_loss, q.argmax = out->argmax;
    FH_LAUNCH(lce_fwd_finalize_kernel, dim3(lce_blocks(p->N, 256)), dim3(256), 0, stream, q);
    LCE_CHECK_LAUNCH(fn, "lce_fwd_finalize_kernel");
  }
  if (o->reduction != FH_REDUCTION_NONE || out->accuracy) {
    red_params r;
    r.targets = p->targets, r.ignore_index = o->ignore_index;
    r.N = (int)p->N, r.V = (int)p->V;
    r.cw = p->class_weights, r.tw = p->token_weights;
    r.divisor = o->divisor, r.reduction = (int)o->reduction;
    r.part = part;
    r.loss = out->loss, r.zloss = out->z_loss, r.accuracy = out->accuracy;
    FH_LAUNCH(lce_fwd_reduce_kernel, dim3(1), dim3(256), 0, stream, r);
    LCE_CHECK_LAUNCH(fn, "lce_fwd_reduce_kernel");
  }
  return FH_SUCCESS;
}
