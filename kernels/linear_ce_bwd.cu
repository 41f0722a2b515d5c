/* Linear cross-entropy backward: dE = G·C, dC = Gᵀ·E, dbias_j = Σ_i G_ij without storing G.
 *
 * G (fusedhead.h), per valid row i with upstream factors a_i (÷ D_ce), b_i (÷ D_reg):
 *     G_ij = [K4 (p_ij − δ_jy) + p_ij (K1 − K2 (log p_ij + h_i)) − K3 w_j] · softcap' · scale
 *     K4 = a w_y (1−α), K3 = a ε, K1 = a ε W + 2 b λ lse_i + grad_lse_i, K2 = b η,
 *     softcap' = 1 − (z/c)², log p = z − lse_i from the forward's lse.
 * K's are formed per row in fp64 by lce_bwd_coef_kernel (one block; the denominators are summed
 * on the device in a fixed order), rounded to fp32. G is fp32; p_y − 1 is expm1f(z_y − lse) (no
 * cancellation: Liger's fix, and better than forming p first); G is rounded to the input dtype
 * (tf32 for fp32) only as a WMMA operand, as CCE does.
 *
 * Shapes: E [N x D], C [V x D], bias [V]; 64 compacted rows x 64 classes per tile, 128 threads;
 * each logit tile is recomputed by lce_logit_tile() with the forward's exact decomposition, so
 * z is bitwise the forward's. The GEMMs run over D in 32-column chunks: the [64 x 32] operand
 * chunk (C rows or E rows) is staged in shared memory, each warp computes 16 x 32 outputs, which
 * go through shared memory to the accumulator.
 *
 * Filter (CCE): a tile is skipped for dE (filter_e_grad) / dC and dbias (filter_c_grad) when every
 * |p_ij − δ_jy| < filter_eps ("auto": eps(dtype)/32). It is tested on the unscaled softmax
 * gradient, before any upstream factor. It is off (every tile computed) when label smoothing or
 * the entropy term is on: those give every entry a gradient not bounded by p (ε w_j, p log p)
 * whose sum over the skipped tiles would be a systematic, not a rounding-level, error.
 *
 * Two tile kernels, both owner-computes (each output element has one writer, which adds its
 * contributions in a fixed order):
 *   lce_bwd_rows_kernel: block b owns compacted rows [64b, 64b+64) and loops over every class
 *     tile in order: dE rows += G·C_tile.
 *   lce_bwd_cols_kernel: block v owns classes [64v, 64v+64) and loops over every row block in
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
 *     (one rounding per 64-class tile for dE, per 64-row block for dC); dbias still fp32 in
 *     registers. Workspace O(N). Also deterministic.
 * The accumulate flag starts the accumulators from the existing gradients instead of 0. */
#include <math.h>

#include "linear_ce_common.cuh"

namespace fh_lce {

enum store_kind { ST_NONE = 0, ST_F32 = 1, ST_SPLIT = 2, ST_OUT = 3, ST_ATOMIC = 4 };
constexpr int NCOEF = 6; /* lse, K1, K2, h, K3, K4 */
constexpr int OLD = DCH + 4;

/* One gradient destination. F32/ATOMIC: f32 (+ld32); SPLIT: out holds the high halves (ld),
 * lo the low halves (dense, row length D); OUT: out in the dtype T (ld). */
struct grad_dst {
  int kind;
  void* out;
  int64_t ld;
  uint16_t* lo;
  float* f32;
  int64_t ld32;
  int64_t row_base; /* ATOMIC: f32 holds rows [row_base, ...) only (FP32 mode's row passes) */
};

struct bwd_params {
  const void* E;
  const void* C;
  const void* bias;
  int64_t lde, ldc;
  const float* cw;
  const int64_t* targets;
  int N, V, D, vt;
  float scale, cap, eps; /* eps 0: no filtering */
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
};

template <typename T>
__device__ __forceinline__ void dst_add(const grad_dst& g, int64_t row, int d, int D, float v) {
  if (g.kind == ST_F32) {
    g.f32[row * g.ld32 + d] += v;
  } else if (g.kind == ST_ATOMIC) {
    atomicAdd(g.f32 + (row - g.row_base) * g.ld32 + d, v);
  } else if (g.kind == ST_SPLIT) {
    uint16_t* hi = (uint16_t*)g.out + row * g.ld + d;
    uint16_t* lo = g.lo + row * (int64_t)D + d;
    const unsigned bits = ((unsigned)*hi << 16) | (unsigned)*lo;
    const unsigned nb = __float_as_uint(__uint_as_float(bits) + v);
    *hi = (uint16_t)(nb >> 16);
    *lo = (uint16_t)(nb & 0xffffu);
  } else if (g.kind == ST_OUT) {
    T* o = (T*)g.out + row * g.ld + d;
    *o = mma_traits<T>::store_round(mma_traits<T>::to_float(*o) + v);
  }
}

/* Shared-memory carve-up of the backward tile kernels. */
template <typename T>
struct bwd_smem {
  typedef typename mma_traits<T>::S S;
  static constexpr int LDS = mma_traits<T>::LDS, GLD = mma_traits<T>::GLD;
  static constexpr bool G_IN_PLACE = sizeof(S) == sizeof(float);
  static constexpr size_t acc_b = sizeof(float) * BM * ACC_LD;
  static constexpr size_t gs_b = G_IN_PLACE ? 0 : sizeof(S) * BM * GLD;
  static constexpr size_t stage_b = sizeof(S) * (BM + BV) * LDS;
  static constexpr size_t xo_b = sizeof(S) * 64 * LDS + sizeof(float) * 64 * OLD;
  static constexpr size_t uni_b = stage_b > xo_b ? stage_b : xo_b;
  static constexpr size_t bytes = acc_b + gs_b + uni_b + sizeof(float) * NCOEF * BM + 2 * sizeof(int) * BM + 16;
  float* acc;
  S* gs;
  S* sA;
  S* sB;
  S* X;
  float* O;
  float* coef; /* [NCOEF][BM] */
  int* rows;
  int* y;
  int* flag;
  __device__ explicit bwd_smem(unsigned char* base) {
    acc = (float*)base;
    gs = G_IN_PLACE ? (S*)acc : (S*)(base + acc_b);
    unsigned char* u = base + acc_b + gs_b;
    sA = (S*)u;
    sB = sA + BM * LDS;
    X = (S*)u;
    O = (float*)(u + sizeof(S) * 64 * LDS);
    coef = (float*)(u + uni_b);
    rows = (int*)(coef + NCOEF * BM);
    y = rows + BM;
    flag = y + BM;
  }
};

/* Loads the row block's indices, targets and coefficients into shared memory. */
template <typename T>
__device__ __forceinline__ void load_row_block(const bwd_params& p, bwd_smem<T>& sm, int row0, int nr) {
  for (int r = threadIdx.x; r < BM; r += THREADS) {
    const int i = r < nr ? p.rows[row0 + r] : 0;
    sm.rows[r] = i;
    sm.y[r] = r < nr ? (int)p.targets[i] : -1;
    for (int q = 0; q < NCOEF; ++q) sm.coef[q * BM + r] = r < nr ? p.coef[(size_t)q * p.N + i] : 0.0f;
  }
  __syncthreads();
}

/* Recompute the tile's logits and form G (fp32) in sm.acc; returns 1 when some entry has
 * |p − δ| >= eps (the tile matters), block-uniformly. */
template <typename T>
__device__ __forceinline__ int g_tile(const bwd_params& p, bwd_smem<T>& sm, int nr, int v0) {
  typedef mma_traits<T> tr;
  __syncthreads(); /* the previous tile's readers of sm.flag are done */
  if (threadIdx.x == 0) *sm.flag = 0;
  lce_logit_tile<T>((const T*)p.E, p.lde, (const T*)p.C, p.ldc, sm.rows, nr, v0, p.V, p.D, sm.sA, sm.sB, sm.acc);
  const T* bias = (const T*)p.bias;
  int big = 0;
  for (int idx = threadIdx.x; idx < BM * BV; idx += THREADS) {
    const int r = idx / BV, c = idx % BV, j = v0 + c;
    float* a = sm.acc + r * ACC_LD + c;
    if (r >= nr || j >= p.V) {
      *a = 0.0f;
      continue;
    }
    float raw = *a;
    if (bias) raw += tr::to_float(bias[j]);
    const float z = lce_process(raw, p.scale, p.cap);
    const float lse = sm.coef[r], k1 = sm.coef[BM + r], k2 = sm.coef[2 * BM + r], h = sm.coef[3 * BM + r];
    const float k3 = sm.coef[4 * BM + r], k4 = sm.coef[5 * BM + r];
    const float logp = z - lse, pr = expf(logp);
    const float pm = j == sm.y[r] ? expm1f(logp) : pr; /* p − δ in fp32 without cancellation */
    big |= !(fabsf(pm) < p.eps);                        /* NaN counts as big */
    float g = k4 * pm + pr * k1;
    if (k2 != 0.0f && pr != 0.0f) g -= k2 * pr * (logp + h);
    if (k3 != 0.0f) g -= k3 * (p.cw ? p.cw[j] : 1.0f);
    if (p.cap > 0.0f) {
      const float t = z / p.cap;
      g *= 1.0f - t * t;
    }
    *a = g * p.scale;
  }
  if (big) *sm.flag = 1; /* benign race: every writer stores 1 */
  __syncthreads();
  return p.eps > 0.0f ? *sm.flag : 1;
}

/* sm.gs = G rounded to the MMA operand type (tf32 in place for fp32 inputs). */
template <typename T>
__device__ __forceinline__ void g_to_operand(bwd_smem<T>& sm) {
  for (int idx = threadIdx.x; idx < BM * BV; idx += THREADS) {
    const int r = idx / BV, c = idx % BV;
    sm.gs[r * bwd_smem<T>::GLD + c] = mma_traits<T>::from_float(sm.acc[r * ACC_LD + c]);
  }
  __syncthreads();
}

/* O[64 x DCH] = A · X with A = G (TRANS false: rows of G, k over classes) or Gᵀ (TRANS true:
 * rows are classes, k over rows). X [64 x DCH] (k-major) is staged by the caller. Output rows
 * >= n_out and k >= n_k are skipped (they are zero). */
template <typename T, bool TRANS>
__device__ __forceinline__ void gemm_chunk(bwd_smem<T>& sm, int n_out, int n_k) {
  using namespace nvcuda;
  typedef mma_traits<T> tr;
  typedef typename std::conditional<TRANS, wmma::col_major, wmma::row_major>::type LA;
  constexpr int K = tr::K, LDS = tr::LDS, GLD = bwd_smem<T>::GLD;
  const int w = threadIdx.x >> 5;
  if (w * 16 < n_out) { /* warp-uniform */
    wmma::fragment<wmma::accumulator, 16, 16, K, float> f[2];
    wmma::fill_fragment(f[0], 0.0f);
    wmma::fill_fragment(f[1], 0.0f);
    for (int kk = 0; kk < 64 && kk < n_k; kk += K) {
      wmma::fragment<wmma::matrix_a, 16, 16, K, typename tr::F, LA> a;
      const typename tr::S* pa = TRANS ? sm.gs + w * 16 + kk * GLD : sm.gs + w * 16 * GLD + kk;
      wmma::load_matrix_sync(a, pa, GLD);
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, K, typename tr::F, wmma::row_major> b;
        wmma::load_matrix_sync(b, sm.X + kk * LDS + j * 16, LDS);
        wmma::mma_sync(f[j], a, b, f[j]);
      }
    }
    wmma::store_matrix_sync(sm.O + w * 16 * OLD, f[0], OLD, wmma::mem_row_major);
    wmma::store_matrix_sync(sm.O + w * 16 * OLD + 16, f[1], OLD, wmma::mem_row_major);
  }
  __syncthreads();
}

/* dE rows of this row block += G · C[v0 .. v0+64) (G already in sm.gs). */
template <typename T>
__device__ __forceinline__ void accumulate_dE(const bwd_params& p, bwd_smem<T>& sm, const grad_dst& dst, int nr, int v0) {
  typedef mma_traits<T> tr;
  const T* C = (const T*)p.C;
  const int nv = p.V - v0 < BV ? p.V - v0 : BV;
  for (int d0 = 0; d0 < p.D; d0 += DCH) {
    for (int idx = threadIdx.x; idx < 64 * DCH; idx += THREADS) {
      const int v = idx / DCH, k = idx % DCH, d = d0 + k;
      sm.X[v * tr::LDS + k] = (v < nv && d < p.D) ? tr::stage(C[(int64_t)(v0 + v) * p.ldc + d]) : tr::from_float(0.0f);
    }
    __syncthreads();
    gemm_chunk<T, false>(sm, nr, nv);
    for (int idx = threadIdx.x; idx < BM * DCH; idx += THREADS) {
      const int r = idx / DCH, k = idx % DCH;
      if (r < nr && d0 + k < p.D) dst_add<T>(dst, sm.rows[r], d0 + k, p.D, sm.O[r * OLD + k]);
    }
    __syncthreads(); /* X and O are rewritten by the next chunk */
  }
}

/* dC rows v0 .. v0+64 += Gᵀ · E[rows of this block]. */
template <typename T>
__device__ __forceinline__ void accumulate_dC(const bwd_params& p, bwd_smem<T>& sm, int nr, int v0) {
  typedef mma_traits<T> tr;
  const T* E = (const T*)p.E;
  const int nv = p.V - v0 < BV ? p.V - v0 : BV;
  for (int d0 = 0; d0 < p.D; d0 += DCH) {
    for (int idx = threadIdx.x; idx < 64 * DCH; idx += THREADS) {
      const int r = idx / DCH, k = idx % DCH, d = d0 + k;
      sm.X[r * tr::LDS + k] =
          (r < nr && d < p.D) ? tr::stage(E[(int64_t)sm.rows[r] * p.lde + d]) : tr::from_float(0.0f);
    }
    __syncthreads();
    gemm_chunk<T, true>(sm, nv, nr);
    for (int idx = threadIdx.x; idx < BV * DCH; idx += THREADS) {
      const int v = idx / DCH, k = idx % DCH;
      if (v < nv && d0 + k < p.D) dst_add<T>(p.dC, v0 + v, d0 + k, p.D, sm.O[v * OLD + k]);
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS, 2) lce_bwd_rows_kernel(bwd_params p) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  bwd_smem<T> sm(smem);
  const int count = p.hdr->count, row0 = blockIdx.x * BM;
  if (row0 >= count) return;
  const int nr = count - row0 < BM ? count - row0 : BM;
  load_row_block<T>(p, sm, row0, nr);
  for (int tile = 0; tile < p.vt; ++tile) { /* class order: fixed, so dE is deterministic */
    const int v0 = tile * BV;
    const int keep = g_tile<T>(p, sm, nr, v0);
    if (!keep && p.filter_e) continue;
    g_to_operand<T>(sm);
    accumulate_dE<T>(p, sm, p.dE, nr, v0);
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS, 2) lce_bwd_cols_kernel(bwd_params p) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  bwd_smem<T> sm(smem);
  const int count = p.hdr->count, v0 = blockIdx.x * BV;
  const int c = threadIdx.x;
  /* The compacted rows [c_lo, c_hi) whose original index lies in [r_lo, r_hi): rows[] is
   * increasing (compaction keeps row order), so two binary searches find them. */
  __shared__ int range[2];
  if (threadIdx.x < 2) {
    const int key = threadIdx.x == 0 ? p.r_lo : p.r_hi;
    int lo = 0, hi = count;
    while (lo < hi) {
      const int mid = lo + (hi - lo) / 2;
      if (p.rows[mid] < key) lo = mid + 1;
      else hi = mid;
    }
    range[threadIdx.x] = lo;
  }
  __syncthreads();
  const int c_lo = range[0], c_hi = range[1];
  float db = 0.0f; /* thread c < 64 owns dbias[v0 + c] */
  for (int row0 = c_lo; row0 < c_hi; row0 += BM) { /* row order: fixed, so dC and dbias are deterministic */
    const int nr = c_hi - row0 < BM ? c_hi - row0 : BM;
    __syncthreads(); /* the previous block's readers of the row data are done */
    load_row_block<T>(p, sm, row0, nr);
    const int keep = g_tile<T>(p, sm, nr, v0);
    const bool do_c = keep || !p.filter_c, do_e = p.dE.kind != ST_NONE && (keep || !p.filter_e);
    if (!do_c && !do_e) continue;
    if (do_c && p.dbias && c < BV)
      for (int r = 0; r < nr; ++r) db += sm.acc[r * ACC_LD + c];
    __syncthreads(); /* dbias reads the fp32 G before it may be rounded in place */
    g_to_operand<T>(sm);
    if (do_c && p.dC.kind != ST_NONE) accumulate_dC<T>(p, sm, nr, v0);
    if (do_e) accumulate_dE<T>(p, sm, p.dE, nr, v0);
  }
  if (p.dbias && c < BV && v0 + c < p.V) {
    if (p.db32) { /* several row passes: carry the fp32 sum, round once in the last */
      db += p.db32[v0 + c];
      p.db32[v0 + c] = db;
      if (!p.db_last) return;
    }
    T* b = (T*)p.dbias + v0 + c;
    const float old = p.accumulate ? mma_traits<T>::to_float(*b) : 0.0f;
    *b = mma_traits<T>::store_round(old + db);
  }
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
  float* coef;
};

/* 1/x for a finite x > 0 in fp64: scale to [0.5, 1), start from the fp32 reciprocal (24 bits)
 * and take two Newton steps (48, then the full 53 bits), scale back. */
__device__ __forceinline__ double lce_recip(double x) {
  int e = 0;
  const double m = frexp(x, &e);
  double r = (double)(1.0f / (float)m);
  r = r * (2.0 - m * r);
  r = r * (2.0 - m * r);
  return ldexp(r, -e);
}

__global__ void __launch_bounds__(256) lce_bwd_coef_kernel(coef_params p) {
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
  const double W = p.hdr->W, alpha = p.alpha, eps = (double)(p.alpha / (float)p.V);
  const size_t N = (size_t)p.N;
  for (int i = threadIdx.x; i < p.N; i += 256) {
    const int64_t y = p.targets[i];
    if (y == p.ignore_index || y < 0 || y >= p.V) continue;
    const double om = p.tw ? p.tw[i] : 1.0, wy = p.cw ? p.cw[y] : 1.0;
    const double g = p.reduction == FH_REDUCTION_NONE ? p.grad_loss[i] : p.grad_loss[0];
    double a = om * g, b = om * g;
    if (p.reduction == FH_REDUCTION_MEAN) a *= inv_ce, b *= inv_reg; /* a zero denominator gives 0 */
    const double lse = p.lse[i], h = p.entropy ? p.entropy[i] : 0.0, glse = p.grad_lse ? p.grad_lse[i] : 0.0;
    p.coef[0 * N + i] = (float)lse;
    p.coef[1 * N + i] = (float)(a * eps * W + 2.0 * b * p.lambda * lse + glse);
    p.coef[2 * N + i] = (float)(b * p.eta);
    p.coef[3 * N + i] = (float)h;
    p.coef[4 * N + i] = (float)(a * eps);
    p.coef[5 * N + i] = (float)(a * wy * (1.0 - alpha));
  }
  if (threadIdx.x == 0) p.hdr->denom_ce = dce, p.hdr->denom_reg = dreg;
}

/* Accumulator set-up: SPLIT from the output (accumulate) or 0; F32/ATOMIC workspace from the
 * output or 0; in-place F32/OUT kinds are zeroed unless accumulating. */
template <typename T>
__global__ void __launch_bounds__(256) lce_grad_init_kernel(grad_dst g, int64_t rows, int D, int accumulate) {
  typedef mma_traits<T> tr;
  const int64_t n = rows * D;
  for (int64_t k = blockIdx.x * 256ll + threadIdx.x; k < n; k += (int64_t)gridDim.x * 256) {
    const int64_t r = k / D;
    const int d = (int)(k % D);
    T* o = (T*)g.out + r * g.ld + d;
    const float v = accumulate ? tr::to_float(*o) : 0.0f;
    if (g.kind == ST_SPLIT) {
      const unsigned bits = __float_as_uint(v);
      *(uint16_t*)o = (uint16_t)(bits >> 16);
      g.lo[r * D + d] = (uint16_t)(bits & 0xffffu);
    } else if (g.f32 && (void*)g.f32 != g.out) {
      g.f32[r * g.ld32 + d] = v;
    } else if (!accumulate) {
      *o = tr::store_round(0.0f);
    }
  }
}

/* Final rounding of SPLIT or fp32-workspace accumulators into the output dtype (to nearest). */
template <typename T>
__global__ void __launch_bounds__(256) lce_grad_final_kernel(grad_dst g, int64_t rows, int D) {
  const int64_t n = rows * D;
  for (int64_t k = blockIdx.x * 256ll + threadIdx.x; k < n; k += (int64_t)gridDim.x * 256) {
    const int64_t r = k / D;
    const int d = (int)(k % D);
    T* o = (T*)g.out + r * g.ld + d;
    float v;
    if (g.kind == ST_SPLIT)
      v = __uint_as_float(((unsigned)*(const uint16_t*)o << 16) | (unsigned)g.lo[r * D + d]);
    else
      v = g.f32[r * g.ld32 + d];
    *o = mma_traits<T>::store_round(v);
  }
}

} /* namespace fh_lce */

using namespace fh_lce;

namespace {

/* FP32 mode, 16-bit dE: from this many rows on, dE's fp32 atomic copy covers half the rows and
 * the class-owner kernel runs twice (bwd_layout_of). */
constexpr int64_t ROW_PASS_MIN_ROWS = 2048;

struct bwd_layout {
  size_t rows_off, coef_off, e_off, c_off, db_off, total;
  int64_t e_rows; /* FP32 mode, 16-bit outputs: rows of dE per atomic pass */
};

/* Exact workspace of the backward, assuming every gradient is wanted (the query's contract). */
bwd_layout bwd_layout_of(int64_t N, int64_t V, int64_t D, fh_dtype_t dtype, fh_accum_mode_t mode) {
  bwd_layout L;
  const bool wide = dtype != FH_DTYPE_F32; /* 16-bit outputs need fp32 help from the workspace */
  size_t e = 0, c = 0, db = 0;
  /* FP32 mode: dE's fp32 atomics need an fp32 copy of the rows they add into. Two passes over
   * halves of the rows halve it to 2·N·D bytes, as much as the split-fp32 low halves would take:
   * the total then stays within CCE's fp32 ("Kahan") figure at the Gemma-2 shape. The logit
   * recompute is not repeated (each pass covers other rows); dbias crosses passes in fp32. */
  L.e_rows = N;
  if (wide && mode == FH_ACCUM_FP32) {
    /* Each pass may add one partially filled 64-row tile per class tile to the recompute, so
     * small batches (where the copy is small anyway) keep one pass. */
    if (N >= ROW_PASS_MIN_ROWS) L.e_rows = (N + 1) / 2;
    e = 4 * (size_t)L.e_rows * (size_t)D, c = 2 * (size_t)V * (size_t)D;
    db = L.e_rows < N ? sizeof(float) * (size_t)V : 0;
  }
  if (wide && mode == FH_ACCUM_DETERMINISTIC) e = 2 * (size_t)N * (size_t)D, c = 2 * (size_t)V * (size_t)D;
  L.rows_off = 256;
  L.coef_off = L.rows_off + lce_align(sizeof(int) * (size_t)N);
  L.e_off = L.coef_off + lce_align(sizeof(float) * NCOEF * (size_t)N);
  L.c_off = L.e_off + lce_align(e);
  L.db_off = L.c_off + lce_align(c);
  L.total = L.db_off + lce_align(db);
  return L;
}

unsigned grid_stride_blocks(int64_t n) {
  const int64_t b = (n + 255) / 256;
  return (unsigned)(b > 4096 ? 4096 : b);
}

template <typename T>
fh_status_t launch_init(const char* fn, cudaStream_t s, const grad_dst& g, int64_t rows, int D, int acc) {
  const int64_t n = rows * D;
  if (n == 0 || g.kind == ST_NONE) return FH_SUCCESS;
  const bool in_place = g.kind == ST_OUT || ((g.kind == ST_F32 || g.kind == ST_ATOMIC) && (void*)g.f32 == g.out);
  if (in_place && acc) return FH_SUCCESS; /* accumulate into what is there */
  FH_LAUNCH(lce_grad_init_kernel<T>, dim3(grid_stride_blocks(n)), dim3(256), 0, s, g, rows, D, acc);
  LCE_CHECK_LAUNCH(fn, "lce_grad_init_kernel");
  return FH_SUCCESS;
}

template <typename T>
fh_status_t launch_final(const char* fn, cudaStream_t s, const grad_dst& g, int64_t rows, int D) {
  const int64_t n = rows * D;
  const bool needs = g.kind == ST_SPLIT || ((g.kind == ST_ATOMIC || g.kind == ST_F32) && (void*)g.f32 != g.out);
  if (n == 0 || !needs) return FH_SUCCESS;
  FH_LAUNCH(lce_grad_final_kernel<T>, dim3(grid_stride_blocks(n)), dim3(256), 0, s, g, rows, D);
  LCE_CHECK_LAUNCH(fn, "lce_grad_final_kernel");
  return FH_SUCCESS;
}

float filter_eps_of(const fh_linear_ce_options_t* o, fh_dtype_t dtype) {
  /* Off when a term not bounded by p is present (label smoothing, entropy): see the file comment. */
  if (o->label_smoothing != 0.0f || o->entropy_weight != 0.0f) return 0.0f;
  if (o->filter_eps != FH_FILTER_EPS_AUTO) return o->filter_eps;
  return dtype == FH_DTYPE_BF16 ? 0x1p-12f : dtype == FH_DTYPE_F16 ? 0x1p-15f : 0x1p-28f;
}

/* Fills a destination for one gradient tensor `t` (rows x D of the input dtype). */
grad_dst make_dst(int kind, const fh_tensor_t* t, uint16_t* lo, float* ws32) {
  grad_dst g;
  g.kind = kind;
  g.out = t ? t->data : NULL;
  g.ld = t ? t->row_stride : 0;
  g.lo = lo;
  g.f32 = ws32 ? ws32 : (kind == ST_F32 || kind == ST_ATOMIC) ? (float*)g.out : NULL;
  g.ld32 = ws32 ? (t ? t->cols : 0) : g.ld;
  g.row_base = 0;
  return g;
}

} /* namespace */

extern "C" fh_status_t fh_cuda_linear_ce_backward_workspace(const fh_cuda_state_t* st, const fh_linear_ce_options_t* opt,
                                                            int64_t N, int64_t V, int64_t D, fh_dtype_t dtype,
                                                            size_t* bytes) {
  (void)st;
  FH_TRY(lce_check_shape("fh_linear_ce_backward_workspace_size", N, V, D));
  *bytes = bwd_layout_of(N, V, D, dtype, opt->accum_mode).total;
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
  const bwd_layout L = bwd_layout_of(p->N, p->V, p->D, p->dtype, mode);
  unsigned char* ws = (unsigned char*)workspace;
  lce_ws_header* hdr = (lce_ws_header*)ws;
  int* rows = (int*)(ws + L.rows_off);
  float* coef = (float*)(ws + L.coef_off);
  const fh_tensor_t* tE = grads->dE && grads->dE->data ? grads->dE : NULL;
  const fh_tensor_t* tC = grads->dC && grads->dC->data ? grads->dC : NULL;
  const fh_tensor_t* tb = grads->dbias && grads->dbias->data && p->bias ? grads->dbias : NULL;
  if (!tE && !tC && !tb) return FH_SUCCESS; /* nothing wanted: nothing computed or written */
  const bool wide = p->dtype != FH_DTYPE_F32;
  const bool cols = tC || tb;
  const bool e_atomic = mode == FH_ACCUM_FP32 && cols && tE;
  int kE = ST_NONE, kC = ST_NONE;
  if (tE) kE = e_atomic ? ST_ATOMIC : !wide ? ST_F32 : mode == FH_ACCUM_OUTPUT_DTYPE ? ST_OUT : ST_SPLIT;
  if (tC) kC = !wide ? ST_F32 : mode == FH_ACCUM_OUTPUT_DTYPE ? ST_OUT : ST_SPLIT;
  uint16_t* lo_e = kE == ST_SPLIT ? (uint16_t*)(ws + L.e_off) : NULL;
  float* ws_e = kE == ST_ATOMIC && wide ? (float*)(ws + L.e_off) : NULL;
  uint16_t* lo_c = kC == ST_SPLIT ? (uint16_t*)(ws + L.c_off) : NULL;

  bwd_params bp;
  bp.E = p->E->data, bp.C = p->C->data, bp.bias = p->bias ? p->bias->data : NULL;
  bp.lde = p->E->row_stride, bp.ldc = p->C->row_stride;
  bp.cw = p->class_weights, bp.targets = p->targets;
  bp.N = (int)p->N, bp.V = (int)p->V, bp.D = (int)p->D, bp.vt = (int)((p->V + BV - 1) / BV);
  bp.scale = o->logit_scale, bp.cap = o->softcap, bp.eps = filter_eps_of(o, p->dtype);
  bp.filter_e = o->filter_e_grad != 0, bp.filter_c = o->filter_c_grad != 0;
  bp.rows = rows, bp.hdr = hdr, bp.coef = coef;
  bp.dE = make_dst(kE, tE, lo_e, ws_e);
  bp.dC = make_dst(kC, tC, lo_c, NULL);
  bp.dbias = tb ? tb->data : NULL;
  bp.accumulate = o->accumulate != 0;
  bp.r_lo = 0, bp.r_hi = bp.N;
  bp.db32 = NULL, bp.db_last = 1;

  FH_TRY(lce_launch_prep(fn, stream, p, rows, hdr, fh_cuda_error_flag(st)));
  coef_params cp;
  cp.targets = p->targets, cp.ignore_index = o->ignore_index;
  cp.N = (int)p->N, cp.V = (int)p->V, cp.reduction = (int)o->reduction;
  cp.cw = p->class_weights, cp.tw = p->token_weights;
  cp.lse = in->lse, cp.entropy = in->entropy, cp.grad_loss = in->grad_loss, cp.grad_lse = in->grad_lse;
  cp.alpha = o->label_smoothing, cp.lambda = o->z_loss_scale, cp.eta = o->entropy_weight, cp.divisor = o->divisor;
  cp.hdr = hdr, cp.coef = coef;
  FH_LAUNCH(lce_bwd_coef_kernel, dim3(1), dim3(256), 0, stream, cp);
  LCE_CHECK_LAUNCH(fn, "lce_bwd_coef_kernel");

  LCE_DTYPE_SWITCH(p->dtype, T, {
    const size_t smem = bwd_smem<T>::bytes;
    if (!ws_e) FH_TRY(launch_init<T>(fn, stream, bp.dE, p->N, bp.D, bp.accumulate)); /* else per row pass */
    FH_TRY(launch_init<T>(fn, stream, bp.dC, p->V, bp.D, bp.accumulate));
    if (tE && !e_atomic && p->N > 0) {
      FH_LAUNCH(lce_bwd_rows_kernel<T>, dim3(lce_blocks(p->N, BM)), dim3(THREADS), smem, stream, bp);
      LCE_CHECK_LAUNCH(fn, "lce_bwd_rows_kernel");
    }
    if (cols && bp.vt > 0) {
      bwd_params cpar = bp;
      if (!e_atomic) cpar.dE.kind = ST_NONE;
      /* Row passes: one, except FP32 mode with a 16-bit dE, whose fp32 atomic copy holds
       * L.e_rows rows at a time (see bwd_layout_of). */
      const int64_t step = ws_e ? L.e_rows : p->N;
      const int64_t passes = step > 0 ? (p->N + step - 1) / step : 0;
      if (passes > 1 && tb) {
        cpar.db32 = (float*)(ws + L.db_off);
        FH_TRY(fh_cuda_status(cudaMemsetAsync(cpar.db32, 0, sizeof(float) * (size_t)p->V, stream), fn,
                              "cudaMemsetAsync"));
      }
      for (int64_t k = 0; k < (passes > 0 ? passes : 1); ++k) {
        const int64_t r0 = k * step, r1 = r0 + step < p->N ? r0 + step : p->N;
        grad_dst chunk = bp.dE; /* the pass's rows of dE, for the fp32 copy's set-up and rounding */
        if (ws_e) chunk.out = (T*)bp.dE.out + r0 * bp.dE.ld;
        if (ws_e) FH_TRY(launch_init<T>(fn, stream, chunk, r1 - r0, bp.D, bp.accumulate));
        cpar.r_lo = (int)r0, cpar.r_hi = (int)r1;
        cpar.dE.row_base = ws_e ? r0 : 0;
        cpar.db_last = k + 1 >= passes;
        FH_LAUNCH(lce_bwd_cols_kernel<T>, dim3((unsigned)bp.vt), dim3(THREADS), smem, stream, cpar);
        LCE_CHECK_LAUNCH(fn, "lce_bwd_cols_kernel");
        if (ws_e) FH_TRY(launch_final<T>(fn, stream, chunk, r1 - r0, bp.D));
      }
    }
    if (!ws_e) FH_TRY(launch_final<T>(fn, stream, bp.dE, p->N, bp.D));
    FH_TRY(launch_final<T>(fn, stream, bp.dC, p->V, bp.D));
  });
  return FH_SUCCESS;
}
