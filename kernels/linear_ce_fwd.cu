/* Linear cross-entropy forward (Cut Cross-Entropy style): the [N x V] logits never reach memory.
 *
 * Formula (fusedhead.h): r = E·Cᵀ + b, z = softcap(scale·r), lse_i = log Σ_j e^{z_ij},
 * h_i = lse_i − Σ_j p_ij z_ij, ce_i = ω_i [w_y (1−α)(lse_i − z_iy) + ε (W lse_i − Σ_j w_j z_ij)],
 * reg_i = ω_i [λ lse_i² + η h_i], argmax over the raw r (NaN largest, lowest index on ties).
 * Shapes: E [N x D], C [V x D], bias [V], targets [N], class weights [V], token weights [N].
 *
 * Four launches, no host synchronization (the grids are sized for N rows; blocks past the
 * device-side valid count exit at once, so ignored rows cost no FLOPs):
 *   1. lce_prep_kernel (1 block x 256): compacts the valid rows in row order (block prefix sum,
 *      deterministic), flags targets outside [0, V) on the device (those rows count as ignored),
 *      W = Σ w_j in fp64.
 *   2. lce_fwd_tile_kernel, grid (ceil(N/64) row blocks) x (S vocabulary splits), 128 threads:
 *      each block loops over its split's 64-class tiles; per tile the WMMA logit tile
 *      (linear_ce_common.cuh), then the epilogue: thread t owns row t/2 and the tile's column
 *      half t%2, and updates in fp32 registers the online stats m, Z = Σ e^{z−m},
 *      F = Σ e^{z−m}(z−m), Σ w_j z_j (label smoothing only), z_y from the same tile values, and
 *      the argmax of r. The two halves merge by a lane shuffle; the (split, row) partials
 *      [S x 7 x N] fp32 go to the workspace.
 *   3. lce_fwd_finalize_kernel (one thread per row): merges the S partials in split order
 *      (deterministic), forms lse, h, ce, reg in fp64 from the fp32 stats, writes lse, entropy,
 *      argmax, per-row loss / z_loss for reduction none, and the row terms for step 4.
 *   4. lce_fwd_reduce_kernel (1 block x 256): fixed-order fp64 sums of ce, reg, z-loss,
 *      correct, D_ce = Σ ω w_y, D_reg = Σ ω over valid rows; a zero denominator gives 0.
 * S depends only on (N, V) (about 256 blocks, partials capped at 896 KiB), never on the device,
 * so results are bitwise reproducible across runs, block orders and GPUs.
 * Workspace: 256 B header + 4N (rows) + 28·S·N (partials); at N=8192, V=256000: S = 2, 0.47 MiB. */
#include <math.h>

#include "linear_ce_common.cuh"

namespace fh_lce {

constexpr int NQ = 7; /* partial stats per (split, row): m, Z, F, Σwz, z_y, argmax value, index */
constexpr size_t PART_BUDGET = 896u * 1024u;

struct fwd_layout {
  int S, tps, vt;
  size_t rows_off, part_off, total;
};

static fwd_layout fwd_layout_of(int64_t N, int64_t V) {
  fwd_layout L;
  L.vt = (int)((V + BV - 1) / BV);
  const int64_t rb = (N + BM - 1) / BM;
  int64_t S = rb > 0 ? (256 + rb - 1) / rb : 1;
  const int64_t cap = N > 0 ? (int64_t)(PART_BUDGET / ((size_t)N * NQ * sizeof(float))) : 64;
  if (S > 64) S = 64;
  if (S > L.vt) S = L.vt;
  if (S > cap) S = cap;
  if (S < 1) S = 1;
  L.tps = L.vt > 0 ? (int)((L.vt + S - 1) / S) : 0;
  L.S = L.tps > 0 ? (L.vt + L.tps - 1) / L.tps : 1; /* no empty split */
  L.rows_off = 256;
  L.part_off = L.rows_off + lce_align(sizeof(int) * (size_t)N);
  L.total = L.part_off + lce_align(sizeof(float) * NQ * (size_t)L.S * (size_t)N);
  return L;
}

__global__ void __launch_bounds__(256) lce_prep_kernel(const int64_t* __restrict__ targets, int N, int V,
                                                       int64_t ignore_index, const float* __restrict__ cw,
                                                       int* __restrict__ rows, lce_ws_header* __restrict__ hdr,
                                                       int* __restrict__ err_flag) {
  __shared__ int scan[256];
  __shared__ double red[256];
  const int t = threadIdx.x;
  int base = 0;
  for (int i0 = 0; i0 < N; i0 += 256) {
    const int i = i0 + t;
    int v = 0;
    if (i < N) {
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
  double w = 0.0;
  if (cw)
    for (int j = t; j < V; j += 256) w += (double)cw[j];
  lce_block_sum(red, &w, 1);
  if (t == 0) {
    hdr->count = base;
    hdr->W = cw ? red[0] : (double)V;
  }
}

fh_status_t lce_launch_prep(const char* fn, cudaStream_t stream, const fh_lce_problem_t* p, int* rows,
                            lce_ws_header* hdr, int* err_flag) {
  FH_LAUNCH(lce_prep_kernel, dim3(1), dim3(256), 0, stream, p->targets, (int)p->N, (int)p->V,
            p->opt.ignore_index, p->class_weights, rows, hdr, err_flag);
  LCE_CHECK_LAUNCH(fn, "lce_prep_kernel");
  return FH_SUCCESS;
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
  int smooth;
  const int* rows;
  const lce_ws_header* hdr;
  float* part;
};

template <typename T>
static size_t fwd_tile_smem() {
  typedef typename mma_traits<T>::S S;
  return 2 * BM * sizeof(int) + sizeof(float) * BM * ACC_LD + sizeof(S) * (BM + BV) * mma_traits<T>::LDS;
}

template <typename T>
__global__ void __launch_bounds__(THREADS) lce_fwd_tile_kernel(fwd_params p) {
  typedef mma_traits<T> tr;
  typedef typename tr::S S;
  FH_DYNAMIC_SMEM(unsigned char, smem);
  float* acc = (float*)smem; /* first: 32-byte alignment for WMMA */
  S* sA = (S*)(acc + BM * ACC_LD);
  S* sB = sA + BM * tr::LDS;
  int* s_rows = (int*)(sB + BV * tr::LDS);
  int* s_y = s_rows + BM;

  const int count = p.hdr->count, row0 = blockIdx.x * BM;
  if (row0 >= count) return; /* block-uniform: rows past the valid count cost nothing */
  const int nr = count - row0 < BM ? count - row0 : BM;
  for (int r = threadIdx.x; r < BM; r += THREADS) {
    const int i = r < nr ? p.rows[row0 + r] : 0;
    s_rows[r] = i;
    s_y[r] = r < nr ? (int)p.targets[i] : -1;
  }
  __syncthreads();

  const T* E = (const T*)p.E;
  const T* C = (const T*)p.C;
  const T* bias = (const T*)p.bias;
  const int lr = threadIdx.x >> 1, half = threadIdx.x & 1;
  const bool rvalid = lr < nr;
  const int y = s_y[lr];
  float m = -INFINITY, Z = 0.0f, F = 0.0f, swz = 0.0f, zy = 0.0f, av = -INFINITY;
  int ai = INT32_MAX;

  const int t0 = blockIdx.y * p.tps, t1 = t0 + p.tps < p.vt ? t0 + p.tps : p.vt;
  for (int tile = t0; tile < t1; ++tile) {
    const int v0 = tile * BV;
    lce_logit_tile<T>(E, p.lde, C, p.ldc, s_rows, nr, v0, p.V, p.D, sA, sB, acc);
    if (rvalid) {
      float* arow = acc + lr * ACC_LD + half * 32;
      const int jb = v0 + half * 32;
      const int n = p.V - jb < 32 ? (p.V - jb > 0 ? p.V - jb : 0) : 32;
      float tmax = -INFINITY;
      /* pass 1: raw r → argmax; z in place; tile max; target logit; Σ w z */
      for (int c = 0; c < n; ++c) {
        const int j = jb + c;
        float r = arow[c];
        if (bias) r += tr::to_float(bias[j]);
        if (lce_arg_better(r, j, av, ai)) av = r, ai = j;
        const float z = lce_process(r, p.scale, p.cap);
        arow[c] = z;
        tmax = fmaxf(tmax, z); /* NaN is skipped here and poisons Z below */
        if (j == y) zy = z;
        if (p.smooth) swz += (p.cw ? p.cw[j] : 1.0f) * z;
      }
      if (n > 0) {
        const float mn = fmaxf(m, tmax);
        if (mn > m && Z != 0.0f) { /* rescale to the new max */
          const float d = m - mn, sc = expf(d);
          F = sc * (F + d * Z);
          Z *= sc;
        }
        if (mn > m || Z == 0.0f) m = mn;
        /* pass 2: Σ e^{z−m}, Σ e^{z−m}(z−m) */
        for (int c = 0; c < n; ++c) {
          if (arow[c] == -INFINITY) continue; /* e^{-inf} = 0; avoids -inf − -inf = NaN */
          const float d = arow[c] - m, e = expf(d);
          Z += e;
          F += e * d;
        }
      }
    }
  }
  /* Merge the two column halves of each row (adjacent lanes). Every lane takes part. */
  const float m2 = __shfl_xor_sync(0xffffffffu, m, 1), Z2 = __shfl_xor_sync(0xffffffffu, Z, 1);
  const float F2 = __shfl_xor_sync(0xffffffffu, F, 1), s2 = __shfl_xor_sync(0xffffffffu, swz, 1);
  const float zy2 = __shfl_xor_sync(0xffffffffu, zy, 1), av2 = __shfl_xor_sync(0xffffffffu, av, 1);
  const int ai2 = __shfl_xor_sync(0xffffffffu, ai, 1);
  if (half == 0 && rvalid) {
    lce_stats_merge(m, Z, F, m2, Z2, F2);
    if (lce_arg_better(av2, ai2, av, ai)) av = av2, ai = ai2;
    const size_t N = (size_t)p.N, i = (size_t)s_rows[lr];
    float* P = p.part + (size_t)blockIdx.y * NQ * N + i;
    P[0 * N] = m;
    P[1 * N] = Z;
    P[2 * N] = F;
    P[3 * N] = swz + s2;
    P[4 * N] = zy + zy2; /* the other half holds exactly 0 */
    P[5 * N] = av;
    P[6 * N] = __int_as_float(ai);
  }
}

struct fin_params {
  const int64_t* targets;
  int64_t ignore_index;
  int N, V, S, tps;
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
  float m = P[0], Z = P[N], F = P[2 * N], av = P[5 * N];
  double swz = P[3 * N];
  int ai = __float_as_int(P[6 * N]);
  for (int s = 1; s < p.S; ++s) { /* split order: deterministic */
    const float* Q = P + (size_t)s * NQ * N;
    lce_stats_merge(m, Z, F, Q[0], Q[N], Q[2 * N]);
    swz += Q[3 * N];
    if (lce_arg_better(Q[5 * N], __float_as_int(Q[6 * N]), av, ai)) av = Q[5 * N], ai = __float_as_int(Q[6 * N]);
  }
  const int sy = (int)(y / BV) / p.tps;
  const double zy = P[(size_t)sy * NQ * N + 4 * N];
  const double lnZ = log((double)Z), lse = (double)m + lnZ, h = lnZ - (double)F / (double)Z;
  const double om = p.tw ? p.tw[i] : 1.0, wy = p.cw ? p.cw[y] : 1.0;
  const double eps = (double)p.alpha / (double)p.V;
  double ce = om * wy * (1.0 - p.alpha) * (lse - zy);
  if (p.alpha != 0.0f) ce += om * eps * (p.hdr->W * lse - swz);
  const double zl = om * p.lambda * lse * lse, reg = zl + om * p.eta * h;
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

extern "C" fh_status_t fh_cuda_linear_ce_forward_workspace(const fh_cuda_state_t* st, const fh_linear_ce_options_t* opt,
                                                           int64_t N, int64_t V, int64_t D, fh_dtype_t dtype,
                                                           size_t* bytes) {
  (void)st, (void)opt, (void)dtype;
  FH_TRY(lce_check_shape("fh_linear_ce_forward_workspace_size", N, V, D));
  *bytes = fwd_layout_of(N, V).total;
  return FH_SUCCESS;
}

extern "C" fh_status_t fh_cuda_linear_ce_forward(fh_cuda_state_t* st, struct CUstream_st* stream,
                                                 const fh_lce_problem_t* p, const fh_linear_ce_outputs_t* out,
                                                 void* workspace, size_t workspace_bytes) {
  static const char fn[] = "fh_linear_ce_forward";
  (void)workspace_bytes; /* checked by the caller against the query */
  FH_TRY(lce_check_shape(fn, p->N, p->V, p->D));
  const fwd_layout L = fwd_layout_of(p->N, p->V);
  const fh_linear_ce_options_t* o = &p->opt;
  unsigned char* ws = (unsigned char*)workspace;
  lce_ws_header* hdr = (lce_ws_header*)ws;
  float* part = p->N > 0 ? (float*)(ws + L.part_off) : NULL;
  if (p->N > 0) {
    int* rows = (int*)(ws + L.rows_off);
    FH_TRY(lce_launch_prep(fn, stream, p, rows, hdr, fh_cuda_error_flag(st)));
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
    fp.smooth = o->label_smoothing != 0.0f;
    fp.rows = rows, fp.hdr = hdr, fp.part = part;
    const dim3 grid(lce_blocks(p->N, BM), (unsigned)L.S);
    LCE_DTYPE_SWITCH(p->dtype, T, {
      FH_LAUNCH(lce_fwd_tile_kernel<T>, grid, dim3(THREADS), fwd_tile_smem<T>(), stream, fp);
      LCE_CHECK_LAUNCH(fn, "lce_fwd_tile_kernel");
    });
    fin_params q;
    q.targets = p->targets, q.ignore_index = o->ignore_index;
    q.N = (int)p->N, q.V = (int)p->V, q.S = L.S, q.tps = L.tps;
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
