/* engine/stream.cuh: the engine's second operand arrangement (docs/engine.md "The streamed GEMM"):
 * a resident 128 x 128 A tile in shared memory times a B operand streamed from global memory in
 * chunks, out[128 x D] = A · B[128 x D], one [128 x DC] output chunk at a time handed to an
 * epilogue. The backward uses it for dE = G · C_tile (A = G) and dC = Gᵀ · E_rows (A = Gᵀ).
 *
 * The k-loop over each chunk is the NT mainloop's inner step (ldmatrix into mma.sync); what
 * differs is that B's rows are k (classes or rows) with the output dimension d contiguous, so
 * B's fragments come from ldmatrix.trans (16-bit) or 32-bit shared loads (fp32, which ldmatrix
 * cannot transpose; fp32 goes through the three-piece bf16 split f32x3 of sm80.cuh). The loop over d-chunks is the pipelined main loop: 16-byte cp.async of
 * chunk c + STAGES - 1 while chunk c is multiplied, one barrier of the 256 threads per chunk
 * (tile_sync: a named barrier beside the warp-specialized loop's producer).
 *
 * B's non-finite elements enter the products as 0 (finite_or_zero in sm80.cuh): the gradient
 * sums never form 0·∞ for a masked class or row (docs/conventions.md), and a NaN gradient row
 * stays NaN through its own G.
 *
 * Layouts: B chunks are 128 k-rows x 128 bytes (DC = 64 bf16/fp16 or 32 fp32 columns), rows
 * swizzled c ^ (r & 7) for ldmatrix.trans, c ^ ((r & 3) << 1) for the fp32 loads (swz_k4); the
 * resident tile has 128 rows of 128 elements, swizzled c ^ (r & 7) (res_off).
 * Warps 4 (M) x 2 (N): each owns 32 rows x DC/2 columns, acc[2][DC/16][4]. */
#ifndef FH_KERNELS_ENGINE_STREAM_CUH
#define FH_KERNELS_ENGINE_STREAM_CUH

#include "sm90.cuh" /* tile_sync */

namespace fh_eng {

constexpr int SK = 128;  /* K of the streamed GEMM: the resident tile's width */
constexpr int CHB = 128; /* bytes of d per B row and chunk */
constexpr int S_WARPS_M = 4, S_WARPS_N = 2;
constexpr size_t CHUNK_BYTES = (size_t)SK * CHB;
static_assert(STAGES * CHUNK_BYTES <= SMEM_BYTES, "streamed chunks reuse the NT stages");

template <typename T>
struct stream_cfg {
  static constexpr int DC = CHB / (int)sizeof(T);   /* output columns per chunk */
  static constexpr int WN = DC / S_WARPS_N;         /* per warp */
  static constexpr int NJ = WN / 8;                 /* n8 tiles per warp */
  static constexpr int MI = BM / S_WARPS_M / 16;    /* m16 tiles per warp (2) */
  static constexpr int RES_ROWB = SK * (int)sizeof(T);
};

/* Byte offset of element (r, k) of the resident tile (rows of 128 elements, 16-byte chunks
 * swizzled c ^ (r & 7)). */
template <typename T>
__device__ __forceinline__ int res_off(int r, int k) {
  const int byte = k * (int)sizeof(T);
  return r * stream_cfg<T>::RES_ROWB + ((((byte >> 4) ^ (r & 7))) << 4) + (byte & 15);
}

template <typename T>
struct stream_acc {
  float v[stream_cfg<T>::MI][stream_cfg<T>::NJ][4];
};
/* Coordinates of accumulator (i, j, e) in the [128 x DC] chunk. */
__device__ __forceinline__ int s_row(int i, int e) {
  return ((int)(threadIdx.x >> 5) / S_WARPS_N) * 32 + i * 16 + (int)((threadIdx.x & 31) >> 2) + (e >> 1) * 8;
}
template <typename T>
__device__ __forceinline__ int s_col(int j, int e) {
  return ((int)(threadIdx.x >> 5) % S_WARPS_N) * stream_cfg<T>::WN + j * 8 + 2 * (int)(threadIdx.x & 3) + (e & 1);
}

/* TRANS_A: A = the resident tile transposed (16-bit types: ldmatrix.trans of the tile; for fp32
 * the caller stores the tile transposed and TRANS_A is false). n_out: output rows that matter
 * (warp-uniform skipping of m16 tiles past it). epi(acc, d0) is called once per chunk by every
 * thread (the 256 that hold the tile), with d0 the chunk's first column; it may use
 * tile_sync<Align>. */
template <typename T, typename Align, bool TRANS_A>
struct stream_gemm {
  typedef stream_cfg<T> cfg;
  template <class Epi>
  static __device__ __forceinline__ void run(const unsigned char* res, const nt_operand<T>& b, int D, int n_out,
                                             unsigned char* stages, Epi& epi) {
    /* fp32 chunks are read by 32-bit loads (below), 16-bit ones by ldmatrix.trans: each with
     * the swizzle that keeps its reads conflict-free. */
    loader<T, Align, SK, CHB / 16, sizeof(T) == 4> lb;
    lb.init(b);
    const int dbytes = D * (int)sizeof(T);
    const int nch = (dbytes + CHB - 1) / CHB;
    const int lane = (int)(threadIdx.x & 31), mi = lane >> 3, lr = lane & 7;
    const int wm = (int)(threadIdx.x >> 5) / S_WARPS_N, wn = (int)(threadIdx.x >> 5) % S_WARPS_N;
    int live_i = (n_out - wm * 32 + 15) / 16;
    live_i = live_i < 0 ? 0 : (live_i > cfg::MI ? cfg::MI : live_i);
    FH_UNROLL
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < nch) lb.issue(stages + s * CHUNK_BYTES, s, dbytes);
      fh_ptx::cp_async_commit();
    }
    FH_NO_UNROLL
    for (int ch = 0; ch < nch; ++ch) {
      fh_ptx::cp_async_wait<STAGES - 2>();
      tile_sync<Align>(); /* chunk ch visible; the slot of ch - 1 and the epilogue's buffers free */
      {
        const int nc = ch + STAGES - 1;
        if (nc < nch) lb.issue(stages + (nc % STAGES) * CHUNK_BYTES, nc, dbytes);
        fh_ptx::cp_async_commit();
      }
      const unsigned char* sb = stages + (ch % STAGES) * CHUNK_BYTES;
      stream_acc<T> acc;
      FH_UNROLL
      for (int i = 0; i < cfg::MI; ++i)
        FH_UNROLL
        for (int j = 0; j < cfg::NJ; ++j)
          FH_UNROLL
          for (int e = 0; e < 4; ++e) acc.v[i][j][e] = 0.0f;
      if constexpr (sizeof(T) == 4) { /* f32x3 (sm80.cuh): two k8 slabs of tf32 layout per k16 */
        const int g = lane >> 2, t = lane & 3;
        FH_UNROLL
        for (int k0 = 0; k0 < SK; k0 += 16) {
          uint32_t bp[cfg::NJ][3][2];
          FH_UNROLL
          for (int j = 0; j < cfg::NJ; ++j) { /* B[k][n], n = n0 + g, k = k0 + t (+4, +8, +12) */
            const int n = wn * cfg::WN + j * 8 + g;
            uint32_t v[4];
            FH_UNROLL
            for (int q = 0; q < 4; ++q)
              v[q] = finite_or_zero<T>(fh_ptx::lds_u32(sb + swz_k4(k0 + t + 4 * q, n >> 2) + (n & 3) * 4));
            f32x3::split_b(bp[j], v[0], v[1], v[2], v[3]);
          }
          FH_UNROLL
          for (int i = 0; i < cfg::MI; ++i) {
            const int m0 = wm * 32 + i * 16;
            uint32_t x[4], y[4], ap[3][4];
            fh_ptx::ldsm_x4(x, res + res_off<T>(m0 + (mi & 1) * 8 + lr, k0 + (mi >> 1) * 4));
            fh_ptx::ldsm_x4(y, res + res_off<T>(m0 + (mi & 1) * 8 + lr, k0 + 8 + (mi >> 1) * 4));
            f32x3::split_a(ap, x, y);
            FH_UNROLL
            for (int j = 0; j < cfg::NJ; ++j)
              if (i < live_i) f32x3::mma(acc.v[i][j], ap, bp[j]);
          }
        }
      } else {
        FH_UNROLL
        for (int k0 = 0; k0 < SK; k0 += 16) {
          uint32_t af[cfg::MI][4], bf[cfg::NJ][2];
          FH_UNROLL
          for (int i = 0; i < cfg::MI; ++i) {
            const int m0 = wm * 32 + i * 16;
            if (TRANS_A) { /* rows of the tile are k: matrices (m 0-7|8-15) x (k 0-7|8-15), transposed */
              fh_ptx::ldsm_x4_trans(af[i], res + res_off<T>(k0 + (mi >> 1) * 8 + lr, m0 + (mi & 1) * 8));
            } else {
              fh_ptx::ldsm_x4(af[i], res + res_off<T>(m0 + (mi & 1) * 8 + lr, k0 + (mi >> 1) * 8));
            }
          }
          FH_UNROLL
          for (int jj = 0; jj < cfg::NJ / 2; ++jj) {
            uint32_t t4[4];
            const int n0 = wn * cfg::WN + jj * 16;
            fh_ptx::ldsm_x4_trans(t4, sb + swz_rows<CHB / 16>(k0 + (mi & 1) * 8 + lr, n0 / 8 + (mi >> 1)));
            bf[2 * jj][0] = finite_or_zero<T>(t4[0]), bf[2 * jj][1] = finite_or_zero<T>(t4[1]);
            bf[2 * jj + 1][0] = finite_or_zero<T>(t4[2]), bf[2 * jj + 1][1] = finite_or_zero<T>(t4[3]);
          }
          FH_UNROLL
          for (int i = 0; i < cfg::MI; ++i)
            FH_UNROLL
            for (int j = 0; j < cfg::NJ; ++j)
              if (i < live_i) operand<T>::mma(acc.v[i][j], af[i], bf[j]);
        }
      }
      epi(acc, ch * cfg::DC);
    }
    fh_ptx::cp_async_wait<0>();
    tile_sync<Align>(); /* the stages and the resident tile may be rewritten by the caller */
  }
};

} /* namespace fh_eng */

#endif
