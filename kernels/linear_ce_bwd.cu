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

#include "engine/epilogue.cuh"
#include "engine/stream.cuh"
#include "linear_ce_common.cuh"

namespace fh_lce {

enum store_kind { ST_NONE = 0, ST_F32 = 1, ST_SPLIT = 2, ST_OUT = 3, ST_ATOMIC = 4 };
constexpr int NCOEF = 6; /* lse, K1, K2, h, K3, K4 */
constexpr int TBM = fh_eng::BM, TBV = fh_eng::BN; /* the engine's tile: 128 rows x 128 classes */

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
    *o = dtype_traits<T>::store_round(dtype_traits<T>::to_float(*o) + v);
  }
}

/* Eight consecutive columns d .. d+7 (d + 8 <= D, d % 8 == 0) with 16-byte accesses: the vec16
 * kernels' destinations are 16-byte aligned with 16-byte row strides and D % 8 == 0
 * (bwd_vec16_ok). */
template <typename T>
__device__ __forceinline__ void dst_add8(const grad_dst& g, int64_t row, int d, int D, const float (&v)[8]) {
  if (g.kind == ST_F32) {
    float4* f = (float4*)(g.f32 + row * g.ld32 + d);
    float4 a = f[0], b = f[1];
    a.x += v[0], a.y += v[1], a.z += v[2], a.w += v[3];
    b.x += v[4], b.y += v[5], b.z += v[6], b.w += v[7];
    f[0] = a, f[1] = b;
  } else if (g.kind == ST_ATOMIC) {
    float* f = g.f32 + (row - g.row_base) * g.ld32 + d;
    for (int e = 0; e < 8; ++e) atomicAdd(f + e, v[e]);
  } else if (g.kind == ST_SPLIT) {
    uint4* hp = (uint4*)((uint16_t*)g.out + row * g.ld + d);
    uint4* lp = (uint4*)(g.lo + row * (int64_t)D + d);
    uint4 h = *hp, l = *lp;
    uint32_t* hw = (uint32_t*)&h;
    uint32_t* lw = (uint32_t*)&l;
    for (int q = 0; q < 4; ++q) {
      uint32_t nh = 0, nl = 0;
      for (int u = 0; u < 2; ++u) {
        const unsigned bits = (((hw[q] >> (16 * u)) & 0xffffu) << 16) | ((lw[q] >> (16 * u)) & 0xffffu);
        const unsigned nb = __float_as_uint(__uint_as_float(bits) + v[2 * q + u]);
        nh |= (nb >> 16) << (16 * u);
        nl |= (nb & 0xffffu) << (16 * u);
      }
      hw[q] = nh, lw[q] = nl;
    }
    *hp = h, *lp = l;
  } else if (g.kind == ST_OUT) {
    uint4* op = (uint4*)((T*)g.out + row * g.ld + d);
    uint4 o = *op;
    T* t = (T*)&o;
    for (int e = 0; e < 8; ++e) t[e] = dtype_traits<T>::store_round(dtype_traits<T>::to_float(t[e]) + v[e]);
    *op = o;
  }
}

/* Shared memory of the backward tile kernels, after the engine's stages (which the streamed
 * GEMMs reuse for their B chunks): the G tile in the operand type (fp32 adds its transpose:
 * ldmatrix cannot transpose 32-bit elements), the output staging chunk, row data, coefficients
 * and the dbias scratch. */
template <typename T>
struct bwd_smem {
  typedef fh_eng::stream_cfg<T> cfg;
  static constexpr size_t g_b = (size_t)TBM * cfg::RES_ROWB;
  static constexpr size_t gt_b = sizeof(T) == 4 ? g_b : 0;
  /* Staging row of DC + 8 floats: 16-byte aligned rows for the epilogue's vector reads, and the
   * fragment pairs' 8-byte stores (two half-warp phases of 4 rows x 4 pairs) hit 32 distinct banks. */
  static constexpr int OLD = cfg::DC + 8;
  static constexpr size_t o_b = sizeof(float) * TBM * OLD;
  static constexpr size_t bytes = fh_eng::SMEM_BYTES + g_b + gt_b + o_b + sizeof(float) * NCOEF * TBM +
                                  2 * sizeof(int) * TBM + sizeof(float) * 2 * TBV;
  unsigned char* stages;
  unsigned char* g;
  unsigned char* gt;
  float* o;
  float* coef; /* [NCOEF][TBM] */
  int* rows;
  int* y;
  float* db; /* [2][TBV] */
  __device__ explicit bwd_smem(unsigned char* base) {
    stages = base;
    g = base + fh_eng::SMEM_BYTES;
    gt = sizeof(T) == 4 ? g + g_b : g;
    o = (float*)(g + g_b + gt_b);
    coef = (float*)((unsigned char*)o + o_b);
    rows = (int*)(coef + NCOEF * TBM);
    y = rows + TBM;
    db = (float*)(y + TBM);
  }
};

/* Loads the row block's indices, targets and coefficients into shared memory. */
template <typename T>
__device__ __forceinline__ void load_row_block(const bwd_params& p, bwd_smem<T>& sm, int row0, int nr) {
  for (int r = threadIdx.x; r < TBM; r += fh_eng::THREADS) {
    const int i = r < nr ? p.rows[row0 + r] : 0;
    sm.rows[r] = i;
    sm.y[r] = r < nr ? (int)p.targets[i] : -1;
    for (int q = 0; q < NCOEF; ++q) sm.coef[q * TBM + r] = r < nr ? p.coef[(size_t)q * p.N + i] : 0.0f;
  }
  __syncthreads();
}

/* Recompute the tile's logits with the forward's mainloop and tiling (so z is bitwise the
 * forward's) and form G in the accumulator registers (0 past the valid rows and classes).
 * Returns, block-uniformly, 1 when some entry has |p − δ| >= eps (the tile matters). */
template <typename T, typename Align>
__device__ __forceinline__ int g_tile(const bwd_params& p, bwd_smem<T>& sm, fh_eng::acc_t& acc, int nr, int v0) {
  using namespace fh_eng;
  const int nv = p.V - v0 < TBV ? p.V - v0 : TBV;
  const nt_operand<T> a{(const T*)p.E, p.lde, sm.rows, 0, nr};
  const nt_operand<T> b{(const T*)p.C, p.ldc, nullptr, v0, nv};
  mainloop<T, Align>::run(acc, a, b, p.D, sm.stages);
  const T* bias = (const T*)p.bias;
  float bj[NJ][2], wj[NJ][2];
  tile_bias<T>(bj, bias, v0, nv);
  FH_UNROLL
  for (int j = 0; j < NJ; ++j)
    FH_UNROLL
    for (int e = 0; e < 2; ++e) {
      const int c = frag_col(j, e);
      wj[j][e] = (p.cw && c < nv) ? p.cw[v0 + c] : 1.0f;
    }
  int big = 0;
  FH_UNROLL
  for (int i = 0; i < MI; ++i)
    FH_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int r = frag_row(i, 2 * h);
      const float lse = sm.coef[r], k1 = sm.coef[TBM + r], k2 = sm.coef[2 * TBM + r], hr = sm.coef[3 * TBM + r];
      const float k3 = sm.coef[4 * TBM + r], k4 = sm.coef[5 * TBM + r];
      const int y = sm.y[r];
      FH_UNROLL
      for (int j = 0; j < NJ; ++j)
        FH_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int c = frag_col(j, e);
          float g = 0.0f;
          if (r < nr && c < nv) {
            const float z = process_logit(raw_logit(acc.v[i][j][2 * h + e], bj[j][e]), p.scale, p.cap, p.inv_cap);
            const float logp = z - lse, pr = exp_fast(logp);
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
  const int any = __syncthreads_or(big);
  return p.eps > 0.0f ? any : 1;
}

/* Column sums of G over the tile's rows into db (thread c < 128 owns class v0 + c): per thread
 * over its rows, then lanes g (xor 4, 8, 16), then the two warps along M in order. */
template <typename T>
__device__ __forceinline__ void dbias_tile(bwd_smem<T>& sm, const fh_eng::acc_t& acc, float& db) {
  using namespace fh_eng;
  FH_UNROLL
  for (int j = 0; j < NJ; ++j)
    FH_UNROLL
    for (int e = 0; e < 2; ++e) {
      float s = 0.0f;
      FH_UNROLL
      for (int i = 0; i < MI; ++i) s += acc.v[i][j][e] + acc.v[i][j][2 + e];
      for (int off = 4; off < 32; off <<= 1) s += __shfl_xor_sync(FH_FULL_MASK, s, off);
      if ((threadIdx.x & 31) < 4) fh_ptx::sts_u32(sm.db + warp_m() * TBV + frag_col(j, e), __float_as_uint(s));
    }
  __syncthreads();
  if (threadIdx.x < TBV)
    db += __uint_as_float(fh_ptx::lds_u32(sm.db + threadIdx.x)) + __uint_as_float(fh_ptx::lds_u32(sm.db + TBV + threadIdx.x));
}

/* G (registers) -> the resident tile in the operand type (tf32-rounded for fp32, which also
 * gets the transposed copy). */
template <typename T>
__device__ __forceinline__ void store_g(bwd_smem<T>& sm, const fh_eng::acc_t& acc) {
  using namespace fh_eng;
  FH_UNROLL
  for (int i = 0; i < MI; ++i)
    FH_UNROLL
    for (int j = 0; j < NJ; ++j)
      FH_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int r = frag_row(i, 2 * h), c = frag_col(j, 0);
        const float g0 = acc.v[i][j][2 * h], g1 = acc.v[i][j][2 * h + 1];
        if constexpr (sizeof(T) == 2) {
          const uint32_t w = (uint32_t)operand<T>::bits(dtype_traits<T>::from_float(g0)) |
                             ((uint32_t)operand<T>::bits(dtype_traits<T>::from_float(g1)) << 16);
          fh_ptx::sts_u32(sm.g + res_off<T>(r, c), w);
        } else {
          const uint32_t w0 = __float_as_uint(dtype_traits<T>::from_float(g0));
          const uint32_t w1 = __float_as_uint(dtype_traits<T>::from_float(g1));
          fh_ptx::sts_u32(sm.g + res_off<T>(r, c), w0);
          fh_ptx::sts_u32(sm.g + res_off<T>(r, c + 1), w1);
          fh_ptx::sts_u32(sm.gt + res_off<T>(c, r), w0);
          fh_ptx::sts_u32(sm.gt + res_off<T>(c + 1, r), w1);
        }
      }
  __syncthreads();
}

/* The streamed GEMMs' epilogue: the [128 x DC] chunk goes through the staging buffer to
 * row-contiguous read-modify-writes of the destination (16-byte for vec16), each output row
 * `out_row(r)` owned by this block alone (or added atomically, ST_ATOMIC). */
template <typename T, typename Align>
struct rmw_epi {
  bwd_smem<T>* sm;
  const grad_dst* dst;
  const int* gather; /* out row r -> gather[r], or base + r */
  int64_t base;
  int n_out, D;
  __device__ __forceinline__ void operator()(const fh_eng::stream_acc<T>& acc, int d0) {
    typedef fh_eng::stream_cfg<T> cfg;
    constexpr int OLD = bwd_smem<T>::OLD;
    FH_UNROLL
    for (int i = 0; i < cfg::MI; ++i)
      FH_UNROLL
      for (int j = 0; j < cfg::NJ; ++j)
        FH_UNROLL
        for (int h = 0; h < 2; ++h)
          fh_ptx::sts_v2(sm->o + fh_eng::s_row(i, 2 * h) * OLD + fh_eng::s_col<T>(j, 0),
                         make_uint2(__float_as_uint(acc.v[i][j][2 * h]), __float_as_uint(acc.v[i][j][2 * h + 1])));
    __syncthreads();
    constexpr int UPR = cfg::DC / 8; /* 8-column units per row */
    for (int u = threadIdx.x; u < TBM * UPR; u += fh_eng::THREADS) {
      const int r = u / UPR, c = (u % UPR) * 8, d = d0 + c;
      if (r >= n_out || d >= D) continue;
      const int64_t row = gather ? (int64_t)gather[r] : base + r;
      /* Units 4-7 of each group of 8 read their upper half first: the 8 threads of a 16-byte
       * phase then hit 8 distinct 16-byte bank groups. */
      const int sh = ((u >> 2) & 1) * 4;
      const uint4 x = fh_ptx::lds_v4(sm->o + r * OLD + c + sh), y = fh_ptx::lds_v4(sm->o + r * OLD + c + 4 - sh);
      const uint4 a = sh ? y : x, b = sh ? x : y;
      const float v[8] = {__uint_as_float(a.x), __uint_as_float(a.y), __uint_as_float(a.z), __uint_as_float(a.w),
                          __uint_as_float(b.x), __uint_as_float(b.y), __uint_as_float(b.z), __uint_as_float(b.w)};
      if (Align::kVec) {
        dst_add8<T>(*dst, row, d, D, v);
      } else {
        for (int e = 0; e < 8 && d + e < D; ++e) dst_add<T>(*dst, row, d + e, D, v[e]);
      }
    }
  }
};

/* dE rows of this row block += G · C[v0 .. v0+128). */
template <typename T, typename Align>
__device__ __forceinline__ void accumulate_dE(const bwd_params& p, bwd_smem<T>& sm, const grad_dst& dst, int nr, int v0) {
  const int nv = p.V - v0 < TBV ? p.V - v0 : TBV;
  const fh_eng::nt_operand<T> b{(const T*)p.C, p.ldc, nullptr, v0, nv};
  rmw_epi<T, Align> epi{&sm, &dst, sm.rows, 0, nr, p.D};
  fh_eng::stream_gemm<T, Align, false>::run(sm.g, b, p.D, nr, sm.stages, epi);
}

/* dC rows v0 .. v0+128 += Gᵀ · E[rows of this block]. */
template <typename T, typename Align>
__device__ __forceinline__ void accumulate_dC(const bwd_params& p, bwd_smem<T>& sm, int nr, int v0) {
  const int nv = p.V - v0 < TBV ? p.V - v0 : TBV;
  const fh_eng::nt_operand<T> b{(const T*)p.E, p.lde, sm.rows, 0, nr};
  rmw_epi<T, Align> epi{&sm, &p.dC, nullptr, v0, nv, p.D};
  if constexpr (sizeof(T) == 4) fh_eng::stream_gemm<T, Align, false>::run(sm.gt, b, p.D, nv, sm.stages, epi);
  else fh_eng::stream_gemm<T, Align, true>::run(sm.g, b, p.D, nv, sm.stages, epi);
}

template <typename T, typename Align>
__global__ void __launch_bounds__(fh_eng::THREADS, 1) lce_bwd_rows_kernel(bwd_params p) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  bwd_smem<T> sm(smem);
  const int count = p.hdr->count, row0 = blockIdx.x * TBM;
  if (row0 >= count) return;
  const int nr = count - row0 < TBM ? count - row0 : TBM;
  load_row_block<T>(p, sm, row0, nr);
  for (int tile = 0; tile < p.vt; ++tile) { /* class order: fixed, so dE is deterministic */
    const int v0 = tile * TBV;
    fh_eng::acc_t acc;
    const int keep = g_tile<T, Align>(p, sm, acc, nr, v0);
    if (!keep && p.filter_e) continue;
    store_g<T>(sm, acc);
    accumulate_dE<T, Align>(p, sm, p.dE, nr, v0);
  }
}

template <typename T, typename Align>
__global__ void __launch_bounds__(fh_eng::THREADS, 1) lce_bwd_cols_kernel(bwd_params p) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  bwd_smem<T> sm(smem);
  const int count = p.hdr->count, v0 = blockIdx.x * TBV;
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
  float db = 0.0f; /* thread c < 128 owns dbias[v0 + c] */
  for (int row0 = c_lo; row0 < c_hi; row0 += TBM) { /* row order: fixed, so dC and dbias are deterministic */
    const int nr = c_hi - row0 < TBM ? c_hi - row0 : TBM;
    __syncthreads(); /* the previous block's readers of the row data are done */
    load_row_block<T>(p, sm, row0, nr);
    fh_eng::acc_t acc;
    const int keep = g_tile<T, Align>(p, sm, acc, nr, v0);
    const bool do_c = keep || !p.filter_c, do_e = p.dE.kind != ST_NONE && (keep || !p.filter_e);
    if (!do_c && !do_e) continue;
    if (do_c && p.dbias) dbias_tile<T>(sm, acc, db);
    store_g<T>(sm, acc);
    if (do_c && p.dC.kind != ST_NONE) accumulate_dC<T, Align>(p, sm, nr, v0);
    if (do_e) accumulate_dE<T, Align>(p, sm, p.dE, nr, v0);
  }
  if (p.dbias && c < TBV && v0 + c < p.V) {
    if (p.db32) { /* several row passes: carry the fp32 sum, round once in the last */
      db += p.db32[v0 + c];
      p.db32[v0 + c] = db;
      if (!p.db_last) return;
    }
    T* b = (T*)p.dbias + v0 + c;
    const float old = p.accumulate ? dtype_traits<T>::to_float(*b) : 0.0f;
    *b = dtype_traits<T>::store_round(old + db);
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
  typedef dtype_traits<T> tr;
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
    *o = dtype_traits<T>::store_round(v);
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

/* The 16-byte path (docs/engine.md "Alignment"): E and C as in the forward, D % 8 == 0 and every
 * gradient destination 16-byte aligned with 16-byte row strides (the workspace's are). */
bool dst_vec_ok(const grad_dst& g, size_t esize) {
  if (g.kind == ST_NONE) return true;
  if ((g.kind == ST_F32 || g.kind == ST_ATOMIC) && g.f32 != g.out) return ((uintptr_t)g.f32 % 16) == 0;
  return fh_eng::vec16_ok(g.out, g.ld, g.kind == ST_F32 || g.kind == ST_ATOMIC ? 4 : esize);
}
bool bwd_vec16_ok(const bwd_params& bp, size_t esize) {
  return bp.D % 8 == 0 && fh_eng::vec16_ok(bp.E, bp.lde, esize) && fh_eng::vec16_ok(bp.C, bp.ldc, esize) &&
         dst_vec_ok(bp.dE, esize) && dst_vec_ok(bp.dC, esize);
}

template <typename T, typename Align, bool ROWS>
fh_status_t launch_bwd(const char* fn, dim3 grid, cudaStream_t stream, const bwd_params& bp) {
  auto k = ROWS ? lce_bwd_rows_kernel<T, Align> : lce_bwd_cols_kernel<T, Align>;
  const size_t smem = bwd_smem<T>::bytes;
  FH_TRY(fh_cuda_status(fh_eng::allow_smem(k, smem), fn, "cudaFuncSetAttribute(lce_bwd kernel)"));
  FH_LAUNCH(k, grid, dim3(fh_eng::THREADS), smem, stream, bp);
  LCE_CHECK_LAUNCH(fn, ROWS ? "lce_bwd_rows_kernel" : "lce_bwd_cols_kernel");
  return FH_SUCCESS;
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
  bp.N = (int)p->N, bp.V = (int)p->V, bp.D = (int)p->D, bp.vt = (int)((p->V + TBV - 1) / TBV);
  bp.scale = o->logit_scale, bp.cap = o->softcap, bp.eps = filter_eps_of(o, p->dtype);
  bp.inv_cap = o->softcap > 0.0f ? 1.0f / o->softcap : 0.0f;
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
    const bool vec = bwd_vec16_ok(bp, fh_dtype_size(p->dtype));
    if (!ws_e) FH_TRY(launch_init<T>(fn, stream, bp.dE, p->N, bp.D, bp.accumulate)); /* else per row pass */
    FH_TRY(launch_init<T>(fn, stream, bp.dC, p->V, bp.D, bp.accumulate));
    if (tE && !e_atomic && p->N > 0) {
      const dim3 grid(lce_blocks(p->N, TBM));
      if (vec) FH_TRY((launch_bwd<T, fh_eng::vec16, true>(fn, grid, stream, bp)));
      else FH_TRY((launch_bwd<T, fh_eng::scalar, true>(fn, grid, stream, bp)));
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
        if (vec) FH_TRY((launch_bwd<T, fh_eng::vec16, false>(fn, dim3((unsigned)bp.vt), stream, cpar)));
        else FH_TRY((launch_bwd<T, fh_eng::scalar, false>(fn, dim3((unsigned)bp.vt), stream, cpar)));
        if (ws_e) FH_TRY(launch_final<T>(fn, stream, chunk, r1 - r0, bp.D));
      }
    }
    if (!ws_e) FH_TRY(launch_final<T>(fn, stream, bp.dE, p->N, bp.D));
    FH_TRY(launch_final<T>(fn, stream, bp.dC, p->V, bp.D));
  });
  return FH_SUCCESS;
}
