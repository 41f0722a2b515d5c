/* The gradient side of the engine's backward kernels, shared by the linear CE backward
 * (kernels/linear_ce_bwd.cu) and the distillation backward (kernels/distill.cu): gradient
 * destinations and their accumulation modes (fusedhead.h fh_accum_mode_t; the modes are
 * described in linear_ce_bwd.cu's header comment), the backward's shared-memory layout, G from
 * registers to the resident tile, dbias by shuffles, the streamed GEMMs dE += G·C_tile and
 * dC += Gᵀ·E_rows with their read-modify-write epilogue, the accumulator set-up and final
 * rounding kernels, and the host-side helpers that pick and launch them. */
#pragma once

#include <stdint.h>

#include "engine/sm80.cuh"
#include "engine/sm90_ws.cuh" /* tile_sync, tile_scratch */
#include "engine/stream.cuh"
#include "linear_ce_common.cuh"

namespace fh_lce {

enum store_kind { ST_NONE = 0, ST_F32 = 1, ST_SPLIT = 2, ST_OUT = 3, ST_ATOMIC = 4 };
constexpr int NCOEF = 9; /* per-row coefficients: linear CE uses 7, distillation 9 (their bwd files) */
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
 * and the dbias scratch. On the warp-specialized loop the producer refills the slots while the
 * consumers run the streamed GEMMs, so their chunks and the staging chunk go in the ring's
 * consumer bytes instead (`inner`, fh_eng::tile_scratch; docs/hopper.md). */
template <typename T>
struct bwd_smem {
  typedef fh_eng::stream_cfg<T> cfg;
  /* One 128 x 128 G tile in the operand type: 32 KiB for 16-bit types (ldmatrix.trans reads
   * Gᵀ from it), 64 KiB for fp32, which holds G or Gᵀ as the next GEMM needs (store_g,
   * transpose_g): an A100 block has 163 KiB. */
  static constexpr size_t g_b = (size_t)TBM * cfg::RES_ROWB;
  /* Staging row of DC + 8 floats: 16-byte aligned rows for the epilogue's vector reads, and the
   * fragment pairs' 8-byte stores (two half-warp phases of 4 rows x 4 pairs) hit 32 distinct banks. */
  static constexpr int OLD = cfg::DC + 8;
  static constexpr size_t o_b = sizeof(float) * TBM * OLD;
  /* The streamed GEMMs' chunks, then the staging chunk: what `inner` holds. */
  static constexpr size_t scratch_b = fh_eng::STAGES * fh_eng::CHUNK_BYTES + o_b;
  /* ring: the mainloop's bytes (fh_eng::ring<Align>::bytes: the sm_90a ring is larger); inner:
   * the staging chunk is inside it */
  static constexpr size_t bytes_for(size_t ring, bool inner = false) {
    return ring + g_b + (inner ? 0 : o_b) + sizeof(float) * NCOEF * TBM + 2 * sizeof(int) * TBM +
           sizeof(float) * 2 * TBV;
  }
  static constexpr size_t bytes = bytes_for(fh_eng::SMEM_BYTES);
  unsigned char* stages;
  unsigned char* g;
  float* o;
  float* coef; /* [NCOEF][TBM] */
  int* rows;
  int* y;
  float* db; /* [2][TBV] */
  /* gap: bytes a kernel adds after the staging chunk, for its own scratch over g .. o + gap
   * while those are free (the distillation backward parks its tiles there). inner: scratch_b
   * bytes inside the ring for the chunks and the staging chunk (nullptr: the chunks over the
   * ring's start, the staging chunk after g). */
  __device__ explicit bwd_smem(unsigned char* base, size_t gap = 0, size_t ring = fh_eng::SMEM_BYTES,
                               unsigned char* inner = nullptr) {
    stages = inner ? inner : base;
    g = base + ring;
    o = (float*)(inner ? inner + fh_eng::STAGES * fh_eng::CHUNK_BYTES : g + g_b);
    coef = (float*)(g + g_b + (inner ? 0 : o_b) + gap);
    rows = (int*)(coef + NCOEF * TBM);
    y = rows + TBM;
    db = (float*)(y + TBM);
  }
};

/* Column sums of G over the tile's rows into db (thread c < 128 owns class v0 + c): per thread
 * over its rows, then lanes g (xor 4, 8, 16), then the two warps along M in order. */
template <typename T, typename Align>
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
  tile_sync<Align>();
  if (threadIdx.x < TBV)
    db += __uint_as_float(fh_ptx::lds_u32(sm.db + threadIdx.x)) + __uint_as_float(fh_ptx::lds_u32(sm.db + TBV + threadIdx.x));
}

/* G (registers) -> the resident tile in the operand type (fp32 stays fp32). fp32 with
 * transposed: Gᵀ, for dC = Gᵀ·E (ldmatrix cannot transpose 32-bit elements); 16-bit types
 * always store G. */
template <typename T, typename Align>
__device__ __forceinline__ void store_g(bwd_smem<T>& sm, const fh_eng::acc_t& acc, bool transposed = false) {
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
          if (transposed) {
            fh_ptx::sts_u32(sm.g + res_off<T>(c, r), w0);
            fh_ptx::sts_u32(sm.g + res_off<T>(c + 1, r), w1);
          } else {
            fh_ptx::sts_u32(sm.g + res_off<T>(r, c), w0);
            fh_ptx::sts_u32(sm.g + res_off<T>(r, c + 1), w1);
          }
        }
      }
  fh_eng::tile_sync<Align>();
}

/* fp32: Gᵀ -> G in place, after dC's GEMM and before dE's (each unordered pair of elements is
 * swapped by one thread; the streamed GEMM ended with a barrier, and this ends with one). */
template <typename T, typename Align>
__device__ __forceinline__ void transpose_g(bwd_smem<T>& sm) {
  static_assert(sizeof(T) == 4, "16-bit G tiles are read transposed by ldmatrix.trans");
  for (int idx = threadIdx.x; idx < TBM * TBV; idx += fh_eng::THREADS) {
    const int r = idx / TBV, c = idx % TBV;
    if (r >= c) continue;
    unsigned char* a = sm.g + fh_eng::res_off<T>(r, c);
    unsigned char* b = sm.g + fh_eng::res_off<T>(c, r);
    const uint32_t x = fh_ptx::lds_u32(a), y = fh_ptx::lds_u32(b);
    fh_ptx::sts_u32(a, y);
    fh_ptx::sts_u32(b, x);
  }
  fh_eng::tile_sync<Align>();
}

/* Stores G for the GEMMs a block is about to run and, for fp32 with both, turns the tile around
 * between them: call store_g_for before the first, g_for_rows between dC and dE. */
template <typename T, typename Align>
__device__ __forceinline__ bool store_g_for(bwd_smem<T>& sm, const fh_eng::acc_t& acc, bool want_cols) {
  const bool transposed = sizeof(T) == 4 && want_cols;
  store_g<T, Align>(sm, acc, transposed);
  return transposed;
}
template <typename T, typename Align>
__device__ __forceinline__ void g_for_rows(bwd_smem<T>& sm, bool transposed) {
  if constexpr (sizeof(T) == 4) {
    if (transposed) transpose_g<T, Align>(sm);
  } else {
    (void)sm, (void)transposed;
  }
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
    fh_eng::tile_sync<Align>();
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

/* The class-owner kernels' row range: the compacted rows [range[0], range[1]) whose original
 * index lies in [r_lo, r_hi). rows[] is increasing (compaction keeps row order), so two binary
 * searches by threads 0 and 1 find them; every thread calls it (it ends with a barrier). */
__device__ __forceinline__ void compacted_range(const int* rows, int count, int r_lo, int r_hi, int* range) {
  if (threadIdx.x < 2) {
    const int key = threadIdx.x == 0 ? r_lo : r_hi;
    int lo = 0, hi = count;
    while (lo < hi) {
      const int mid = lo + (hi - lo) / 2;
      if (rows[mid] < key) lo = mid + 1;
      else hi = mid;
    }
    range[threadIdx.x] = lo;
  }
  __syncthreads();
}

/* The end of a class-owner kernel: thread c < TBV adds its column sum db of class v0 + c into
 * dbias (several row passes: carried in fp32 through db32, rounded once by the last pass). */
template <typename T>
__device__ __forceinline__ void dbias_store(void* dbias, float* db32, int db_last, int accumulate, int v0, int V,
                                            float db) {
  const int c = threadIdx.x;
  if (!dbias || c >= TBV || v0 + c >= V) return;
  if (db32) { /* several row passes: carry the fp32 sum, round once in the last */
    db += db32[v0 + c];
    db32[v0 + c] = db;
    if (!db_last) return;
  }
  T* b = (T*)dbias + v0 + c;
  const float old = accumulate ? dtype_traits<T>::to_float(*b) : 0.0f;
  *b = dtype_traits<T>::store_round(old + db);
}

/* dst rows (row r of the block -> sm.rows[r]) += G · C[v0 .. v0 + nv). */
template <typename T, typename Align>
__device__ __forceinline__ void grad_gemm_rows(bwd_smem<T>& sm, const grad_dst& dst, const T* C, int64_t ldc, int v0,
                                               int nv, int D, int nr) {
  const fh_eng::nt_operand<T> b{C, ldc, nullptr, v0, nv};
  rmw_epi<T, Align> epi{&sm, &dst, sm.rows, 0, nr, D};
  fh_eng::stream_gemm<T, Align, false>::run(sm.g, b, D, nr, sm.stages, epi);
}

/* dst rows v0 .. v0 + nv += Gᵀ · E[the block's rows sm.rows[0 .. nr)]. */
template <typename T, typename Align>
__device__ __forceinline__ void grad_gemm_cols(bwd_smem<T>& sm, const grad_dst& dst, const T* E, int64_t lde, int nr,
                                               int v0, int nv, int D) {
  const fh_eng::nt_operand<T> b{E, lde, sm.rows, 0, nr};
  rmw_epi<T, Align> epi{&sm, &dst, nullptr, v0, nv, D};
  if constexpr (sizeof(T) == 4) fh_eng::stream_gemm<T, Align, false>::run(sm.g, b, D, nv, sm.stages, epi); /* Gᵀ */
  else fh_eng::stream_gemm<T, Align, true>::run(sm.g, b, D, nv, sm.stages, epi);
}

/* 1/x for a finite x > 0 in fp64: scale to [0.5, 1), start from the fp32 reciprocal (24 bits)
 * and take two Newton steps (48, then the full 53 bits), scale back. */
__device__ __forceinline__ double lce_recip(double x) {
  /* x = m · 2^e with m in [0.5, 1), from the bits (frexp's exponent output would live in local
   * memory); a subnormal x is scaled up by 2^64 first. */
  int sh = 0;
  long long b = __double_as_longlong(x);
  if (((b >> 52) & 0x7ff) == 0) x *= 0x1p64, b = __double_as_longlong(x), sh = 64;
  const int e = (int)((b >> 52) & 0x7ff) - 1022;
  const double m = __longlong_as_double((b & 0x800fffffffffffffLL) | (1022LL << 52));
  double r = (double)fh_ptx::rcp((float)m); /* 2^-23, then 2^-46, then full precision */
  r = r * (2.0 - m * r);
  r = r * (2.0 - m * r);
  /* · 2^(sh − e) in two halves, each a normal power of two (ldexp calls a subroutine that
   * spills on sm_80) */
  const int k = sh - e, k1 = k / 2, k2 = k - k1;
  return r * __longlong_as_double((long long)(k1 + 1023) << 52) * __longlong_as_double((long long)(k2 + 1023) << 52);
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

/* ---- host side ---- */

static inline unsigned grid_stride_blocks(int64_t n) {
  const int64_t b = (n + 255) / 256;
  return (unsigned)(b > 4096 ? 4096 : b);
}

template <typename T>
static fh_status_t launch_init(const char* fn, cudaStream_t s, const grad_dst& g, int64_t rows, int D, int acc) {
  const int64_t n = rows * D;
  if (n == 0 || g.kind == ST_NONE) return FH_SUCCESS;
  const bool in_place = g.kind == ST_OUT || ((g.kind == ST_F32 || g.kind == ST_ATOMIC) && (void*)g.f32 == g.out);
  if (in_place && acc) return FH_SUCCESS; /* accumulate into what is there */
  FH_LAUNCH(lce_grad_init_kernel<T>, dim3(grid_stride_blocks(n)), dim3(256), 0, s, g, rows, D, acc);
  LCE_CHECK_LAUNCH(fn, "lce_grad_init_kernel");
  return FH_SUCCESS;
}

template <typename T>
static fh_status_t launch_final(const char* fn, cudaStream_t s, const grad_dst& g, int64_t rows, int D) {
  const int64_t n = rows * D;
  const bool needs = g.kind == ST_SPLIT || ((g.kind == ST_ATOMIC || g.kind == ST_F32) && (void*)g.f32 != g.out);
  if (n == 0 || !needs) return FH_SUCCESS;
  FH_LAUNCH(lce_grad_final_kernel<T>, dim3(grid_stride_blocks(n)), dim3(256), 0, s, g, rows, D);
  LCE_CHECK_LAUNCH(fn, "lce_grad_final_kernel");
  return FH_SUCCESS;
}

/* Fills a destination for one gradient tensor `t` (rows x D of the input dtype). */
static inline grad_dst make_dst(int kind, const fh_tensor_t* t, uint16_t* lo, float* ws32) {
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
static inline bool dst_vec_ok(const grad_dst& g, size_t esize) {
  if (g.kind == ST_NONE) return true;
  if ((g.kind == ST_F32 || g.kind == ST_ATOMIC) && g.f32 != g.out) return ((uintptr_t)g.f32 % 16) == 0;
  return fh_eng::vec16_ok(g.out, g.ld, g.kind == ST_F32 || g.kind == ST_ATOMIC ? 4 : esize);
}

/* FP32 mode, 16-bit dE: from this many rows on, dE's fp32 atomic copy covers half the rows and
 * the class-owner kernel runs twice (grad_ws_of). */
constexpr int64_t ROW_PASS_MIN_ROWS = 2048;

/* Workspace pieces of the gradient accumulators, assuming every gradient is wanted: e (dE's
 * split low halves or fp32 atomic copy), c (dC's split low halves), db (dbias carried in fp32
 * between row passes), and the rows of dE per class-owner pass. */
struct grad_ws {
  size_t e, c, db;
  int64_t e_rows;
};
static inline grad_ws grad_ws_of(int64_t N, int64_t V, int64_t D, fh_dtype_t dtype, fh_accum_mode_t mode) {
  grad_ws g;
  const bool wide = dtype != FH_DTYPE_F32; /* 16-bit outputs need fp32 help from the workspace */
  g.e = g.c = g.db = 0;
  /* FP32 mode: dE's fp32 atomics need an fp32 copy of the rows they add into. Two passes over
   * halves of the rows halve it to 2·N·D bytes, as much as the split-fp32 low halves would take:
   * the total then stays within CCE's fp32 ("Kahan") figure at the Gemma-2 shape. The logit
   * recompute is not repeated (each pass covers other rows); dbias crosses passes in fp32. */
  g.e_rows = N;
  if (wide && mode == FH_ACCUM_FP32) {
    /* Each pass may add one partially filled row tile per class tile to the recompute, so
     * small batches (where the copy is small anyway) keep one pass. */
    if (N >= ROW_PASS_MIN_ROWS) g.e_rows = (N + 1) / 2;
    g.e = 4 * (size_t)g.e_rows * (size_t)D, g.c = 2 * (size_t)V * (size_t)D;
    g.db = g.e_rows < N ? sizeof(float) * (size_t)V : 0;
  }
  if (wide && mode == FH_ACCUM_DETERMINISTIC) g.e = 2 * (size_t)N * (size_t)D, g.c = 2 * (size_t)V * (size_t)D;
  return g;
}

/* Workspace of a backward: header, compacted rows, ncoef floats per row, then the gradient
 * accumulators' pieces (grad_ws_of), each rounded up to 256 bytes. */
struct grad_layout {
  size_t rows_off, coef_off, e_off, c_off, db_off, total;
  int64_t e_rows;
};
static inline grad_layout grad_layout_of(int64_t N, int64_t V, int64_t D, fh_dtype_t dtype, fh_accum_mode_t mode,
                                         int ncoef) {
  grad_layout L;
  const grad_ws g = grad_ws_of(N, V, D, dtype, mode);
  L.e_rows = g.e_rows;
  L.rows_off = 256;
  L.coef_off = L.rows_off + lce_align(sizeof(int) * (size_t)N);
  L.e_off = L.coef_off + lce_align(sizeof(float) * (size_t)ncoef * (size_t)N);
  L.c_off = L.e_off + lce_align(g.e);
  L.db_off = L.c_off + lce_align(g.c);
  L.total = L.db_off + lce_align(g.db);
  return L;
}

/* The destinations of one backward: the wanted gradients (a tensor with data; dbias only with a
 * bias), their kinds under the accumulation mode, and where their workspace pieces live in `ws`
 * (laid out by grad_layout_of). any == false: nothing is wanted, nothing is computed. */
struct grad_plan {
  grad_dst dE, dC;
  void* dbias;
  bool any, want_E, want_b, cols, e_atomic;
  float* ws_e; /* FP32 mode, 16-bit dE: the fp32 atomic copy (per row pass) */
  float* db32; /* dbias carried between row passes */
  int64_t e_rows;
  int accumulate;
};
static inline grad_plan grad_plan_of(fh_accum_mode_t mode, fh_dtype_t dtype, const fh_tensor_t* dE,
                                     const fh_tensor_t* dC, const fh_tensor_t* dbias, bool has_bias,
                                     unsigned char* ws, const grad_layout& L, int accumulate) {
  grad_plan g;
  const fh_tensor_t* tE = dE && dE->data ? dE : NULL;
  const fh_tensor_t* tC = dC && dC->data ? dC : NULL;
  const fh_tensor_t* tb = dbias && dbias->data && has_bias ? dbias : NULL;
  const bool wide = dtype != FH_DTYPE_F32;
  g.any = tE || tC || tb;
  g.want_E = tE != NULL, g.want_b = tb != NULL;
  g.cols = tC || tb;
  g.e_atomic = mode == FH_ACCUM_FP32 && g.cols && tE;
  int kE = ST_NONE, kC = ST_NONE;
  if (tE) kE = g.e_atomic ? ST_ATOMIC : !wide ? ST_F32 : mode == FH_ACCUM_OUTPUT_DTYPE ? ST_OUT : ST_SPLIT;
  if (tC) kC = !wide ? ST_F32 : mode == FH_ACCUM_OUTPUT_DTYPE ? ST_OUT : ST_SPLIT;
  uint16_t* lo_e = kE == ST_SPLIT ? (uint16_t*)(ws + L.e_off) : NULL;
  g.ws_e = kE == ST_ATOMIC && wide ? (float*)(ws + L.e_off) : NULL;
  uint16_t* lo_c = kC == ST_SPLIT ? (uint16_t*)(ws + L.c_off) : NULL;
  g.dE = make_dst(kE, tE, lo_e, g.ws_e);
  g.dC = make_dst(kC, tC, lo_c, NULL);
  g.dbias = tb ? tb->data : NULL;
  g.db32 = (float*)(ws + L.db_off);
  g.e_rows = L.e_rows;
  g.accumulate = accumulate;
  return g;
}

/* The passes of a backward (linear_ce_bwd.cu's header comment): accumulator set-up; the
 * row-owner kernel for dE unless dE goes by atomics; the class-owner kernel for dC and dbias
 * (and dE by fp32 atomics in FP32 mode) once per row pass; the final rounding of split or
 * fp32-copy accumulators. Params: the kernels' parameters, with fields dE, r_lo, r_hi, db32,
 * db_last that each class-owner pass sets; launch(rows, grid, params) launches the row-owner
 * (rows) or class-owner kernel. */
template <typename T, class Params, class Launch>
static fh_status_t grad_passes(const char* fn, cudaStream_t stream, const grad_plan& g, const Params& bp, int64_t N,
                               int64_t V, int D, int vt, Launch&& launch) {
  if (!g.ws_e) FH_TRY(launch_init<T>(fn, stream, g.dE, N, D, g.accumulate)); /* else per row pass */
  FH_TRY(launch_init<T>(fn, stream, g.dC, V, D, g.accumulate));
  if (g.want_E && !g.e_atomic && N > 0) FH_TRY(launch(true, dim3(lce_blocks(N, TBM)), bp));
  if (g.cols && vt > 0) {
    Params cp = bp;
    if (!g.e_atomic) cp.dE.kind = ST_NONE;
    /* Row passes: one, except FP32 mode with a 16-bit dE, whose fp32 atomic copy holds
     * e_rows rows at a time (see grad_ws_of). */
    const int64_t step = g.ws_e ? g.e_rows : N;
    const int64_t passes = step > 0 ? (N + step - 1) / step : 0;
    cp.db32 = NULL;
    if (passes > 1 && g.want_b) {
      cp.db32 = g.db32;
      FH_TRY(fh_cuda_status(cudaMemsetAsync(cp.db32, 0, sizeof(float) * (size_t)V, stream), fn, "cudaMemsetAsync"));
    }
    for (int64_t k = 0; k < (passes > 0 ? passes : 1); ++k) {
      const int64_t r0 = k * step, r1 = r0 + step < N ? r0 + step : N;
      grad_dst chunk = g.dE; /* the pass's rows of dE, for the fp32 copy's set-up and rounding */
      if (g.ws_e) chunk.out = (T*)g.dE.out + r0 * g.dE.ld;
      if (g.ws_e) FH_TRY(launch_init<T>(fn, stream, chunk, r1 - r0, D, g.accumulate));
      cp.r_lo = (int)r0, cp.r_hi = (int)r1;
      cp.dE.row_base = g.ws_e ? r0 : 0;
      cp.db_last = k + 1 >= passes;
      FH_TRY(launch(false, dim3((unsigned)vt), cp));
      if (g.ws_e) FH_TRY(launch_final<T>(fn, stream, chunk, r1 - r0, D));
    }
  }
  if (!g.ws_e) FH_TRY(launch_final<T>(fn, stream, g.dE, N, D));
  FH_TRY(launch_final<T>(fn, stream, g.dC, V, D));
  return FH_SUCCESS;
}


} /* namespace fh_lce */
