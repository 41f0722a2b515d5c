/* engine/sm80.cuh: the one GEMM mainloop of fusedhead (docs/engine.md), for every GEMM-shaped
 * kernel: the logit tiles E·Cᵀ of the linear CE forward, of the backward's recompute and of the
 * fused top-k. The op-specific work lives in epilogues that read the accumulator fragments in
 * registers with their (row, column) coordinates (frag_row / frag_col below).
 *
 * Tile: BM x BN = 128 x 128 outputs per CTA of 256 threads (8 warps, 2 along M x 4 along N,
 * each warp 64 x 32 = 4 x 4 mma tiles of 16 x 8). K is walked in stages of 64 bytes per operand
 * row (32 bf16/fp16 elements, 16 fp32), STAGES = 3 stages in flight:
 *   - global -> shared by 16-byte cp.async.cg (Align = vec16), zero-filled past K and past the
 *     valid rows (src-size 0 reads nothing), or by plain element loads stored as 16-byte vectors
 *     (Align = scalar: the fallback for operands whose base or row stride is not 16-byte aligned);
 *   - one __syncthreads per k-stage: wait for stage k, barrier, issue stage k + STAGES - 1 into
 *     the slot every warp finished reading before the barrier, compute stage k;
 *   - shared memory rows of 64 bytes, XOR-swizzled: 16-byte chunk c of row r lives at chunk
 *     c ^ ((r >> 1) & 3), so the 8 row addresses of one ldmatrix phase (rows r..r+7, one chunk)
 *     fall in 8 distinct 16-byte bank groups (conflict-free), and a warp's cp.async writes of
 *     8 whole rows take the minimum 4 wavefronts;
 *   - ldmatrix.x4 feeds mma.sync m16n8k16 (bf16, fp16; fp32 inputs as three bf16 pieces and six
 *     mma per k16, f32x3 below, for fp32 accuracy), fp32 accumulators.
 * Every output element is the fp32 sum over k in one fixed order that depends only on K, so a
 * row's logits do not depend on which other rows share its CTA (batch invariance,
 * docs/engine.md "Determinism").
 *
 * Shared memory: STAGES x (BM + BN) x 64 B = 48 KiB from the caller's dynamic shared memory
 * (SMEM_BYTES); kernels add their own buffers after it and opt in above 48 KiB. */
#ifndef FH_KERNELS_ENGINE_SM80_CUH
#define FH_KERNELS_ENGINE_SM80_CUH

#include <stdint.h>

#include "../common.cuh"
#include "ptx.cuh"

namespace fh_eng {

/* Alignment tags (types, so they appear in the demangled kernel names the SASS check reads). */
struct vec16 {
  static constexpr bool kVec = true;
};
struct scalar {
  static constexpr bool kVec = false;
};

constexpr int THREADS = 256;
constexpr int BM = 128, BN = 128;
constexpr int STAGES = 3;
constexpr int ROWB = 64; /* bytes of K per operand row and stage */
constexpr int WARPS_M = 2, WARPS_N = 4;
constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N; /* 64 x 32 per warp */
constexpr int MI = WM / 16, NJ = WN / 8;            /* 4 x 4 mma tiles per warp */
constexpr size_t STAGE_BYTES = (size_t)(BM + BN) * ROWB;
constexpr size_t SMEM_BYTES = STAGES * STAGE_BYTES;

/* Operand dtype: elements per 16-byte chunk, the mma (fp32: f32x3 below). */
template <typename T>
struct operand;
template <>
struct operand<__nv_bfloat16> {
  static constexpr int PER16 = 8;
  static constexpr bool BF16 = true;
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    fh_ptx::mma_bf16_16816(d, a, b);
  }
  static __device__ __forceinline__ uint16_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
  static constexpr uint32_t EXP2 = 0x7f807f80u; /* the exponent fields of a bf16x2 register */
};
template <>
struct operand<__half> {
  static constexpr int PER16 = 8;
  static constexpr bool BF16 = false;
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    fh_ptx::mma_f16_16816(d, a, b);
  }
  static __device__ __forceinline__ uint16_t bits(__half x) { return __half_as_ushort(x); }
  static constexpr uint32_t EXP2 = 0x7c007c00u;
};
template <>
struct operand<float> {
  static constexpr int PER16 = 4;
  static constexpr bool BF16 = false;
};

/* A register of a streamed-GEMM operand with its non-finite elements (inf, NaN) replaced by 0
 * (docs/conventions.md "Masked classes"): such an element of C (or E) makes every logit it
 * touches ±inf or NaN, so the class (row) is either masked, with G = 0 and no 0·∞ allowed into
 * the gradient sums, or its G is NaN already and the NaN still reaches its sums. 16-bit: two
 * elements per register; fp32: one. */
template <typename T>
__device__ __forceinline__ uint32_t finite_or_zero(uint32_t x) {
  if constexpr (sizeof(T) == 4) {
    return (x & 0x7f800000u) == 0x7f800000u ? 0u : x;
  } else {
    constexpr uint32_t E = operand<T>::EXP2;
    const uint32_t lo = (x & (E & 0xffffu)) == (E & 0xffffu) ? 0xffff0000u : 0xffffffffu;
    const uint32_t hi = (x & (E & 0xffff0000u)) == (E & 0xffff0000u) ? 0x0000ffffu : 0xffffffffu;
    return x & lo & hi;
  }
}

/* fp32 operands on bf16 tensor cores (docs/engine.md "fp32 inputs"). Each fp32 value x is split
 * into three bf16 pieces, x0 = rn(x), x1 = rn(x − x0), x2 = rn(x − x0 − x1) (both differences
 * exact in fp32), so x0 + x1 + x2 = x to within 2^-24 |x|; a product is the six terms whose
 * weight is at least 2^-16 (x2 y0, x1 y1, x0 y2, x1 y0, x0 y1, x0 y0, small ones first), each
 * exact in the fp32 accumulator's significand. The error per product is a few units of 2^-24,
 * what an fp32 FMA loop has, where tf32 (one mma) would have 2^-11: fp32 inputs get fp32
 * accuracy (docs/linear_ce.md "Precision"), at 6 bf16 mma per 16 k, the cost of 3 tf32 mma.
 *
 * Fragments: the fp32 data is read with the tf32 layout (ldmatrix of 32-bit elements, two k
 * slabs of 8: x[0..3] = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4] of slab 0, y[] of slab 1;
 * B: b[0] = B[t][g], b[1] = B[t+4][g]). The bf16 m16n8k16 fragment wants k pairs (2t, 2t+1) in
 * one register; the same permutation of k applied to A and B leaves the sum unchanged, so the
 * logical pair (2t, 2t+1) is the physical (t, t+4) of slab 0 and (2t+8, 2t+9) that of slab 1. */
struct f32x3 {
  /* Three bf16x2 pieces of (lo, hi). A value whose first piece is not finite (inf, NaN, or an
   * fp32 beyond bf16's range) keeps that piece alone (no inf − inf among its own pieces); its
   * products with another value's zero or opposite-signed pieces can still form 0·∞ or ∞ − ∞, so
   * an infinity inside fp32 E or C gives NaN logits (docs/conventions.md). */
  static __device__ __forceinline__ void split(uint32_t lo, uint32_t hi, uint32_t& p0, uint32_t& p1, uint32_t& p2) {
    float a = __uint_as_float(lo), b = __uint_as_float(hi);
    p0 = fh_ptx::cvt_bf16x2(a, b);
    const float a0 = __uint_as_float(p0 << 16), b0 = __uint_as_float(p0 & 0xffff0000u);
    a = fabsf(a0) <= 3.0e38f ? a - a0 : 0.0f;
    b = fabsf(b0) <= 3.0e38f ? b - b0 : 0.0f;
    p1 = fh_ptx::cvt_bf16x2(a, b);
    a -= __uint_as_float(p1 << 16);
    b -= __uint_as_float(p1 & 0xffff0000u);
    p2 = fh_ptx::cvt_bf16x2(a, b);
  }
  /* A fragment pieces ap[piece][reg] from the tf32-layout fragments of slabs 0 (x) and 1 (y). */
  static __device__ __forceinline__ void split_a(uint32_t (&ap)[3][4], const uint32_t (&x)[4], const uint32_t (&y)[4]) {
    split(x[0], x[2], ap[0][0], ap[1][0], ap[2][0]);
    split(x[1], x[3], ap[0][1], ap[1][1], ap[2][1]);
    split(y[0], y[2], ap[0][2], ap[1][2], ap[2][2]);
    split(y[1], y[3], ap[0][3], ap[1][3], ap[2][3]);
  }
  /* B fragment pieces from slab 0's (x0, x1) = (B[t][g], B[t+4][g]) and slab 1's (y0, y1). */
  static __device__ __forceinline__ void split_b(uint32_t (&bp)[3][2], uint32_t x0, uint32_t x1, uint32_t y0, uint32_t y1) {
    split(x0, x1, bp[0][0], bp[1][0], bp[2][0]);
    split(y0, y1, bp[0][1], bp[1][1], bp[2][1]);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&ap)[3][4], const uint32_t (&bp)[3][2]) {
    fh_ptx::mma_bf16_16816(d, ap[2], bp[0]);
    fh_ptx::mma_bf16_16816(d, ap[1], bp[1]);
    fh_ptx::mma_bf16_16816(d, ap[0], bp[2]);
    fh_ptx::mma_bf16_16816(d, ap[1], bp[0]);
    fh_ptx::mma_bf16_16816(d, ap[0], bp[1]);
    fh_ptx::mma_bf16_16816(d, ap[0], bp[0]);
  }
};

/* The accumulators of one thread: v[i][j][e] is output (frag_row(i, e), frag_col(j, e)). */
struct acc_t {
  float v[MI][NJ][4];
};
__device__ __forceinline__ int warp_m() { return (int)(threadIdx.x >> 5) / WARPS_N; }
__device__ __forceinline__ int warp_n() { return (int)(threadIdx.x >> 5) % WARPS_N; }
/* Row of the CTA tile held by accumulator (i, *, e) of this thread: e < 2 row g, else g + 8. */
__device__ __forceinline__ int frag_row(int i, int e) {
  return warp_m() * WM + i * 16 + (int)((threadIdx.x & 31) >> 2) + (e >> 1) * 8;
}
/* Column of the CTA tile held by accumulator (*, j, e). */
__device__ __forceinline__ int frag_col(int j, int e) {
  return warp_n() * WN + j * 8 + 2 * (int)(threadIdx.x & 3) + (e & 1);
}

/* The bias of this thread's accumulator columns of the class tile [v0, v0 + nv): bj[j][e] for
 * column frag_col(j, e), 0 past nv or without a bias (read once per tile by every epilogue). */
template <typename T>
__device__ __forceinline__ void tile_bias(float (&bj)[NJ][2], const T* bias, int v0, int nv) {
  FH_UNROLL
  for (int j = 0; j < NJ; ++j)
    FH_UNROLL
    for (int e = 0; e < 2; ++e) {
      const int c = frag_col(j, e);
      bj[j][e] = (bias && c < nv) ? fh_to_float(bias[v0 + c]) : 0.0f;
    }
}
/* The class weights of this thread's columns (1 without weights, 0 past the tile's nv classes). */
__device__ __forceinline__ void tile_weights(float (&wj)[NJ][2], const float* w, int v0, int nv) {
  FH_UNROLL
  for (int j = 0; j < NJ; ++j)
    FH_UNROLL
    for (int e = 0; e < 2; ++e) {
      const int c = frag_col(j, e);
      wj[j][e] = c < nv ? (w ? w[v0 + c] : 1.0f) : 0.0f;
    }
}

/* Byte offset of 16-byte chunk c of row r in a swizzled buffer of CPR chunks per row: 64-byte
 * rows (CPR 4) pair rows up, c ^ ((r >> 1) & 3); rows of 128 bytes or more use c ^ (r & 7).
 * Either way 8 consecutive rows at one logical chunk land in 8 distinct bank groups. */
template <int CPR>
__device__ __forceinline__ int swz_rows(int r, int c) {
  return r * CPR * 16 + ((CPR == 4 ? (c ^ ((r >> 1) & 3)) : (c ^ (r & 7))) << 4);
}
__device__ __forceinline__ int swz(int r, int c) { return swz_rows<ROWB / 16>(r, c); }
/* 128-byte rows read by 32-bit loads of 4 consecutive rows x 2 chunks (the streamed GEMM's fp32
 * B fragments, which ldmatrix cannot transpose): chunk c of row r at c ^ ((r & 3) << 1) puts
 * those 8 chunks in 8 distinct bank groups. */
__device__ __forceinline__ int swz_k4(int r, int c) { return r * 128 + ((c ^ ((r & 3) << 1)) << 4); }

/* One operand of an NT GEMM: `rows` rows of K elements, row r at base + row_index(r) * ld.
 * Rows past `n` are zero. `gather` (shared memory) maps r to a global row, else row0 + r.
 * `tmap`: a CUtensorMap of the same rows (K-major, 64 x 128 boxes, 128-byte swizzle) in param or
 * global memory, read by the sm_90a mainloop's TMA (engine/sm90.cuh; B only, never gathered);
 * the sm_80 mainloop ignores it. */
template <typename T>
struct nt_operand {
  const T* base;
  int64_t ld;
  const int* gather;
  int row0, n;
  const void* tmap = nullptr;
};

/* The per-thread copy plan of one operand: ROWS rows x CPR 16-byte chunks per stage, 256 threads. */
template <typename T, typename Align, int ROWS, int CPR = ROWB / 16, bool K4 = false>
struct loader {
  static constexpr int PER_THREAD = ROWS * CPR / THREADS;
  const unsigned char* src[PER_THREAD]; /* start of this thread's row, or NULL past n */
  const unsigned char* any;             /* a valid address for copies of 0 bytes */
  int off[PER_THREAD];                  /* swizzled byte offset in the stage buffer */
  int chunk[PER_THREAD];

  __device__ __forceinline__ void init(const nt_operand<T>& o) {
    any = (const unsigned char*)o.base;
    FH_UNROLL
    for (int q = 0; q < PER_THREAD; ++q) {
      const int id = (int)threadIdx.x + q * THREADS, r = id / CPR, c = id % CPR;
      chunk[q] = c;
      off[q] = K4 ? swz_k4(r, c) : swz_rows<CPR>(r, c);
      const int64_t row = r < o.n ? (o.gather ? (int64_t)o.gather[r] : (int64_t)(o.row0 + r)) : -1;
      src[q] = row >= 0 ? (const unsigned char*)(o.base + row * o.ld) : nullptr;
    }
  }
  /* Stage `ks` (bytes [16 CPR ks, 16 CPR (ks + 1)) of every row) into buf; kbytes = K * size. */
  __device__ __forceinline__ void issue(unsigned char* buf, int ks, int kbytes) const {
    FH_UNROLL
    for (int q = 0; q < PER_THREAD; ++q) {
      const int kb = ks * CPR * 16 + chunk[q] * 16;
      int n = kbytes - kb;
      n = n < 0 ? 0 : (n > 16 ? 16 : n);
      if (!src[q]) n = 0;
      if (Align::kVec) {
        fh_ptx::cp_async_16(buf + off[q], n > 0 ? src[q] + kb : any, n);
      } else {
        uint32_t w[4] = {0, 0, 0, 0};
        if (n > 0) load_scalar(w, (const T*)(src[q] + kb), n / (int)sizeof(T));
        fh_ptx::sts_v4(buf + off[q], make_uint4(w[0], w[1], w[2], w[3]));
      }
    }
  }
  /* Unaligned path: `cnt` elements (the rest of the 16 bytes stays zero). */
  static __device__ __forceinline__ void load_scalar(uint32_t (&w)[4], const T* p, int cnt) {
    if constexpr (sizeof(T) == 4) {
      for (int e = 0; e < 4; ++e) w[e] = e < cnt ? __float_as_uint((float)p[e]) : 0u;
    } else {
      for (int e = 0; e < 8; ++e) {
        const uint32_t h = e < cnt ? (uint32_t)operand<T>::bits(p[e]) : 0u;
        w[e >> 1] |= h << (16 * (e & 1));
      }
    }
  }
};

template <typename T, typename Align>
struct mainloop {
  /* acc = A · Bᵀ over K, A [BM x K] and B [BN x K] described by `a` and `b`. Every thread of
   * the CTA calls it. `smem`: SMEM_BYTES, 128-byte aligned. On return the stage buffers are
   * free (a barrier has passed) and acc holds the tile. */
  static __device__ __forceinline__ void run(acc_t& acc, const nt_operand<T>& a, const nt_operand<T>& b, int K,
                                             unsigned char* smem) {
    FH_UNROLL
    for (int i = 0; i < MI; ++i)
      FH_UNROLL
      for (int j = 0; j < NJ; ++j)
        FH_UNROLL
        for (int e = 0; e < 4; ++e) acc.v[i][j][e] = 0.0f;
    loader<T, Align, BM> la;
    loader<T, Align, BN> lb;
    la.init(a);
    lb.init(b);
    const int kbytes = K * (int)sizeof(T);
    const int kt = (kbytes + ROWB - 1) / ROWB;
    /* Warp-uniform liveness: mma tiles wholly past the valid rows / columns are skipped. */
    const int wm = warp_m(), wn = warp_n(), lane = (int)(threadIdx.x & 31);
    int live_i = (a.n - wm * WM + 15) / 16, live_j = (b.n - wn * WN + 7) / 8;
    live_i = live_i < 0 ? 0 : (live_i > MI ? MI : live_i);
    live_j = live_j < 0 ? 0 : (live_j > NJ ? NJ : live_j);
    FH_UNROLL
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < kt) {
        unsigned char* buf = smem + s * STAGE_BYTES;
        la.issue(buf, s, kbytes);
        lb.issue(buf + BM * ROWB, s, kbytes);
      }
      fh_ptx::cp_async_commit();
    }
    /* ldmatrix row addresses: lane l gives row l % 8 of matrix l / 8. */
    const int mi = lane >> 3, lr = lane & 7;
    FH_NO_UNROLL
    for (int ks = 0; ks < kt; ++ks) {
      fh_ptx::cp_async_wait<STAGES - 2>();
      __syncthreads(); /* stage ks visible to all; slot (ks - 1) % STAGES free */
      {
        const int nk = ks + STAGES - 1;
        if (nk < kt) {
          unsigned char* buf = smem + (nk % STAGES) * STAGE_BYTES;
          la.issue(buf, nk, kbytes);
          lb.issue(buf + BM * ROWB, nk, kbytes);
        }
        fh_ptx::cp_async_commit();
      }
      const unsigned char* sa = smem + (ks % STAGES) * STAGE_BYTES;
      const unsigned char* sb = sa + BM * ROWB;
      if constexpr (sizeof(T) == 4) { /* one k16 step per stage, two 32-byte slabs (f32x3) */
        uint32_t bp[NJ][3][2];
        FH_UNROLL
        for (int jj = 0; jj < NJ / 2; ++jj) {
          uint32_t x[4], y[4];
          const int n = wn * WN + jj * 16 + (mi >> 1) * 8 + lr;
          fh_ptx::ldsm_x4(x, sb + swz(n, mi & 1));
          fh_ptx::ldsm_x4(y, sb + swz(n, 2 + (mi & 1)));
          f32x3::split_b(bp[2 * jj], x[0], x[1], y[0], y[1]);
          f32x3::split_b(bp[2 * jj + 1], x[2], x[3], y[2], y[3]);
        }
        FH_UNROLL
        for (int i = 0; i < MI; ++i) {
          uint32_t x[4], y[4], ap[3][4];
          const int r = wm * WM + i * 16 + (mi & 1) * 8 + lr;
          fh_ptx::ldsm_x4(x, sa + swz(r, mi >> 1));
          fh_ptx::ldsm_x4(y, sa + swz(r, 2 + (mi >> 1)));
          f32x3::split_a(ap, x, y);
          FH_UNROLL
          for (int j = 0; j < NJ; ++j)
            if (i < live_i && j < live_j) f32x3::mma(acc.v[i][j], ap, bp[j]);
        }
      } else {
        FH_UNROLL
        for (int kk = 0; kk < 2; ++kk) { /* two 32-byte k-steps per stage */
          uint32_t af[MI][4], bf[NJ][2];
          FH_UNROLL
          for (int i = 0; i < MI; ++i) {
            const int r = wm * WM + i * 16 + (mi & 1) * 8 + lr;
            fh_ptx::ldsm_x4(af[i], sa + swz(r, 2 * kk + (mi >> 1)));
          }
          FH_UNROLL
          for (int jj = 0; jj < NJ / 2; ++jj) {
            uint32_t t4[4];
            const int n = wn * WN + jj * 16 + (mi >> 1) * 8 + lr;
            fh_ptx::ldsm_x4(t4, sb + swz(n, 2 * kk + (mi & 1)));
            bf[2 * jj][0] = t4[0];
            bf[2 * jj][1] = t4[1];
            bf[2 * jj + 1][0] = t4[2];
            bf[2 * jj + 1][1] = t4[3];
          }
          FH_UNROLL
          for (int i = 0; i < MI; ++i)
            FH_UNROLL
            for (int j = 0; j < NJ; ++j)
              if (i < live_i && j < live_j) operand<T>::mma(acc.v[i][j], af[i], bf[j]);
        }
      }
    }
    fh_ptx::cp_async_wait<0>();
    __syncthreads(); /* every warp is done with the stages: the caller may reuse them */
  }
};

/* Alignment dispatch (docs/engine.md "Alignment"): the 16-byte path needs both operands' base
 * addresses 16-byte aligned and row strides that are multiples of 16 bytes. */
static inline bool vec16_ok(const void* p, int64_t ld_elems, size_t esize) {
  return ((uintptr_t)p % 16) == 0 && ((size_t)ld_elems * esize) % 16 == 0;
}

/* The most dynamic shared memory one block may opt in to on sm_80 (163 KiB; sm_90 allows 227):
 * every kernel of the library fits it, checked at compile time by allow_smem. */
constexpr size_t SMEM_OPTIN_MAX = 166912;

/* Opt a kernel in to BYTES (> 48 KiB) of dynamic shared memory. */
template <size_t BYTES, size_t MAX = SMEM_OPTIN_MAX, typename K>
static inline cudaError_t allow_smem(K* kernel) {
  static_assert(BYTES <= MAX, "more shared memory than a block can have (sm_80: 163 KiB, sm_90: 227 KiB)");
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)BYTES);
}

} /* namespace fh_eng */

#endif
