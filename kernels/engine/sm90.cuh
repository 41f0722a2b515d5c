/* engine/sm90.cuh: the engine's second mainloop, for Hopper (sm_90a): the same 128 x 128 tile
 * of A·Bᵀ as fh_eng::mainloop<T, vec16> (engine/sm80.cuh), handed to the same epilogues in the
 * same registers (acc_t, frag_row / frag_col), computed by warpgroup MMAs (wgmma.mma_async) on
 * operands that the Tensor Memory Accelerator and cp.async put in shared memory.
 * docs/hopper.md "The sm_90a mainloop" has the design, its cost and what it leaves for later.
 *
 *   - Align tag fh_eng::tma90: 16-bit operands, vec16 alignment. B (dense rows: the classifier
 *     tile, or H in the fused decoding) is described by a tensor map (nt_operand::tmap); A (the
 *     row block, whose rows may be gathered, docs/engine.md; C in the fused decoding) by rows,
 *     as on sm_80.
 *   - K in blocks of 64 elements (128 bytes per operand row), STAGES = 4 slots of 32 KiB:
 *     A [128 rows x 128 B] by 16-byte cp.async (4 per thread), B [128 x 128 B] by one TMA box
 *     issued by thread 0 on the slot's mbarrier (expect_tx 16 KiB). Both in the 128-byte swizzle
 *     (16-byte chunk c of row r at chunk c ^ (r & 7), 1024-byte aligned atoms), which is what the
 *     TMA writes and what the wgmma descriptors (SWIZZLE_128B, SBO 1024) read.
 *   - Each k-block: wait for this thread's cp.async of the block, fence.proxy.async (the copies
 *     are generic-proxy writes that wgmma reads through the async proxy), __syncthreads, refill
 *     the slot of block kb - 2 with block kb + 2, wait for the slot's mbarrier (the TMA bytes),
 *     then warpgroup w (threads 128w ..) issues 4 wgmma m64n128k16 on rows 64w .. 64w + 63 and
 *     keeps one group in flight (wait_group 1), so the MMAs of block kb overlap the issue of
 *     block kb + 1. Refilling block kb - 2's slot is safe: both warpgroups retired its group at
 *     iteration kb - 1, before this iteration's barrier.
 *   - No branch around the MMAs and no ordinary access to the accumulators inside the loop (not
 *     even their zeroing): ptxas otherwise serializes the chain with a wait after every wgmma
 *     (warnings C7514 / C7520), which the SASS check catches. Block 0 is peeled: its first
 *     wgmma has scale-d 0 and write-only accumulator operands (wgmma_zero), so the compiler
 *     sees them defined there; empty asm statements pin them around each block
 *     (wgmma_fence_operand). A warpgroup whose rows are all past the valid ones still
 *     multiplies (zeros).
 *   - In a cluster of 2 CTAs (FH_LAUNCH_CLUSTER; two row blocks over the same class tiles) each
 *     CTA loads half of every B box (64 rows, the map's box) and multicasts it to both, so L2
 *     serves each B tile once per pair. A slot is refilled only once both CTAs released it
 *     (empty[s]: one local and one remote arrival after the barrier that retires its block),
 *     and each tile starts with a barrier.cluster (the peer's mbarriers exist, its previous
 *     exchange is done). docs/hopper.md "Multicast of the classifier tile".
 *   - The accumulators (the wgmma layout: warp w of warpgroup g holds rows 64g + 16w + {lane/4,
 *     lane/4 + 8}, all 128 columns) go through shared memory once (128 x 136 fp32, conflict-free
 *     8-byte accesses) into the sm_80 fragment layout, so every epilogue runs unchanged.
 *   - Summation order: per output, k16 steps in k order, each step's products added onto the
 *     accumulator, as the sm_80 loop does; the emulator's twins add in the same order, so the
 *     two paths give bitwise equal tiles there (tested). On the hardware the tensor cores' order
 *     inside a k16 step is unspecified for both.
 *
 * Shared memory: RING_BYTES from the caller's pointer: 2 x STAGES mbarriers, then (1024-byte
 * aligned) the slots; the exchange reuses the slots. On return the ring is free (a barrier has
 * passed) and the mbarriers are invalidated, so the caller may reuse every byte. */
#ifndef FH_KERNELS_ENGINE_SM90_CUH
#define FH_KERNELS_ENGINE_SM90_CUH

#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "sm80.cuh"
#include "ptx_sm90.cuh"

namespace fh_eng {

struct tma90 {
  static constexpr bool kVec = true; /* the streamed GEMMs of the backward run their vec16 loop */
};
/* The warp-specialized sm_90a mainloop (engine/sm90_ws.cuh): a producer warpgroup beside the
 * 256 threads that hold the tile, S slots in its ring, and after them X bytes that only the
 * consumers use (the accumulators' exchange, and whatever a kernel's epilogue keeps there between
 * tiles: the backward's streamed GEMMs). fh_eng::tma90ws is the forward's, 4 slots. */
template <int S, size_t X>
struct tma90ws_t {
  static constexpr bool kVec = true;
};
template <typename Align>
struct is_ws : std::false_type {};
template <int S, size_t X>
struct is_ws<tma90ws_t<S, X>> : std::true_type {};

namespace sm90 {
constexpr int STAGES = 4, LOOKAHEAD = STAGES - 2;
constexpr int KB = 64;                          /* elements of K per block (16-bit operands) */
constexpr int ROWB = KB * 2;                    /* 128 bytes: one swizzle span */
constexpr size_t TILE_A = (size_t)BM * ROWB, TILE_B = (size_t)BN * ROWB;
constexpr size_t STAGE_BYTES = TILE_A + TILE_B; /* 32 KiB */
constexpr size_t HEADER = 1024;                 /* mbarriers, and slack to align the slots */
constexpr size_t RING_BYTES = HEADER + 1024 + STAGES * STAGE_BYTES;
constexpr int XP = BN + 8; /* exchange pitch in floats: 8-byte accesses of 8 rows x 4 quads hit 32 banks */
static_assert((size_t)BM * XP * sizeof(float) <= STAGES * STAGE_BYTES, "the exchange fits in the slots");
static_assert(BM == 128 && BN == 128 && THREADS == 256, "two warpgroups of m64n128");
} /* namespace sm90 */

/* Dynamic shared memory the mainloop of alignment tag Align needs. */
template <typename Align>
struct ring {
  static constexpr size_t bytes = SMEM_BYTES;
};
template <>
struct ring<tma90> {
  static constexpr size_t bytes = sm90::RING_BYTES;
};

/* Threads per CTA of a kernel on the mainloop of tag Align (the tile's 256, plus a producer
 * warpgroup in engine/sm90_ws.cuh). */
template <typename Align>
struct block_threads {
  static constexpr int value = THREADS;
};

/* What a kernel keeps across its tiles for the mainloop of tag Align: nothing, but for the
 * warp-specialized loop's ring (engine/sm90_ws.cuh, ws_pipe). */
struct no_pipe {
  static constexpr bool producer = false; /* every thread holds the tile */
};
template <typename Align>
struct pipe_of {
  using type = no_pipe;
};

/* The wgmma of one k-block in slot st (A [128 x 128 B] then B [128 x 128 B], 128-byte swizzle):
 * warpgroup wg multiplies its 64 rows of A by all of B in 4 k16 steps, as one commit group, then
 * waits until only this group is in flight (the previous k-block's is retired). FIRST: block 0,
 * whose first step has scale-d 0 (the compiler sees d written there). The descriptors' start
 * moves 32 bytes per k16 step inside the span. No branch, no ordinary access to d: the chain must
 * not serialize (engine/sm90.cuh, file comment). */
template <bool BF16, bool FIRST>
__device__ __forceinline__ void wgmma_kblock(float (&d)[BN / 2], const unsigned char* st, int wg) {
  auto desc_a = [&](int ks) {
    return fh_ptx::make_smem_desc(st + (size_t)wg * 64 * sm90::ROWB + 32 * ks, 16, 8 * sm90::ROWB,
                                  fh_ptx::SWIZZLE_128B);
  };
  auto desc_b = [&](int ks) {
    return fh_ptx::make_smem_desc(st + sm90::TILE_A + 32 * ks, 16, 8 * sm90::ROWB, fh_ptx::SWIZZLE_128B);
  };
  if constexpr (!FIRST) fh_ptx::wgmma_fence_operand(d);
  fh_ptx::wgmma_fence();
  if constexpr (FIRST) fh_ptx::wgmma_zero<BN, BF16>(d, desc_a(0), desc_b(0));
  else fh_ptx::wgmma<BN, BF16>(d, desc_a(0), desc_b(0), 1);
  FH_UNROLL
  for (int ks = 1; ks < sm90::KB / 16; ++ks) fh_ptx::wgmma<BN, BF16>(d, desc_a(ks), desc_b(ks), 1);
  fh_ptx::wgmma_commit();
  fh_ptx::wgmma_wait<1>(); /* this block's group stays in flight, the previous one is retired */
  fh_ptx::wgmma_fence_operand(d);
}

/* d (the wgmma layout of the two warpgroups) -> acc (the sm_80 fragment layout) through shared
 * memory x (BM x XP floats), so every epilogue runs unchanged. sync() is the barrier of the 256
 * threads that hold the tile (__syncthreads, or a named barrier when a producer warp is beside
 * them); it runs twice: the stores before the loads, the loads before the caller reuses x. */
template <typename Sync>
__device__ __forceinline__ void exchange(acc_t& acc, const float (&d)[BN / 2], float* x, Sync sync) {
  using sm90::XP;
  const int tid = (int)threadIdx.x, lane = tid & 31;
  const int r0 = 16 * (tid >> 5) + (lane >> 2), c0 = 2 * (lane & 3); /* warp w of the CTA: rows 16w .. */
  FH_UNROLL
  for (int j = 0; j < BN / 8; ++j)
    FH_UNROLL
    for (int h = 0; h < 2; ++h)
      fh_ptx::sts_v2(x + (r0 + 8 * h) * XP + 8 * j + c0,
                     make_uint2(__float_as_uint(d[4 * j + 2 * h]), __float_as_uint(d[4 * j + 2 * h + 1])));
  sync();
  FH_UNROLL
  for (int i = 0; i < MI; ++i)
    FH_UNROLL
    for (int j = 0; j < NJ; ++j)
      FH_UNROLL
      for (int h = 0; h < 2; ++h) {
        const uint2 v = fh_ptx::lds_v2(x + frag_row(i, 2 * h) * XP + frag_col(j, 0));
        acc.v[i][j][2 * h] = __uint_as_float(v.x);
        acc.v[i][j][2 * h + 1] = __uint_as_float(v.y);
      }
  sync();
}

template <typename T>
struct mainloop<T, tma90> {
  static_assert(sizeof(T) == 2, "the sm_90a mainloop takes bf16 or fp16 operands");
  static constexpr bool BF16 = operand<T>::BF16;

  static __device__ __forceinline__ void run(acc_t& acc, const nt_operand<T>& a, const nt_operand<T>& b, int K,
                                             unsigned char* smem) {
    const int tid = (int)threadIdx.x, wg = tid >> 7;
    /* A cluster of 2 CTAs (the launch's choice, uniform): each loads half of B's rows and
     * multicasts it to both (docs/hopper.md "Multicast of the classifier tile"). */
    const bool mc = fh_ptx::cluster_nctarank() == 2;
    const uint32_t crank = mc ? fh_ptx::cluster_ctarank() : 0u;
    uint64_t* bar = (uint64_t*)smem;            /* full[s]: the slot's bytes landed */
    uint64_t* empty = bar + sm90::STAGES;       /* empty[s]: both CTAs retired the slot (clusters) */
    unsigned char* slots = smem + sm90::HEADER + ((1024u - (fh_ptx::smem_u32(smem + sm90::HEADER) & 1023u)) & 1023u);
    __syncthreads(); /* the caller's last readers of these bytes are done */
    if (tid == 0) {
      FH_UNROLL
      for (int s = 0; s < sm90::STAGES; ++s) {
        fh_ptx::mbar_init(&bar[s], 1);
        if (mc) fh_ptx::mbar_init(&empty[s], 2);
      }
      fh_ptx::fence_mbar_init();
      fh_ptx::fence_proxy_async(); /* generic accesses to the slots before the TMA writes */
    }
    /* With a cluster: the peer's mbarriers exist, and it is done with its previous tile (its
     * exchange reused the slots this CTA is about to fill), before any copy reaches it. */
    if (mc) fh_ptx::cluster_sync();
    else __syncthreads();
    loader<T, vec16, BM, sm90::ROWB / 16> la;
    la.init(a);
    const int kbytes = K * (int)sizeof(T);
    const int kt = (kbytes + sm90::ROWB - 1) / sm90::ROWB;
    auto issue = [&](int kb) {
      const int s = kb % sm90::STAGES;
      unsigned char* st = slots + (size_t)s * sm90::STAGE_BYTES;
      la.issue(st, kb, kbytes);
      if (tid == 0) {
        const CUtensorMap* map = static_cast<const CUtensorMap*>(b.tmap);
        fh_ptx::mbar_arrive_expect_tx(&bar[s], (uint32_t)sm90::TILE_B); /* both halves, with a cluster */
        if (mc) {
          /* the slot's previous block (kb - STAGES) is retired in both CTAs */
          if (kb >= sm90::STAGES) fh_ptx::mbar_wait(&empty[s], (uint32_t)(kb / sm90::STAGES - 1) & 1u);
          constexpr int HALF = BN / 2;
          fh_ptx::tma_load_2d_multicast(st + sm90::TILE_A + (size_t)crank * HALF * sm90::ROWB, map, kb * sm90::KB,
                                        b.row0 + (int)crank * HALF, &bar[s], (uint16_t)0x3);
        } else {
          fh_ptx::tma_load_2d(st + sm90::TILE_A, map, kb * sm90::KB, b.row0, &bar[s]);
        }
      }
    };
    FH_UNROLL
    for (int kb = 0; kb < sm90::LOOKAHEAD; ++kb) {
      if (kb < kt) issue(kb);
      fh_ptx::cp_async_commit();
    }
    float d[BN / 2]; /* written first by the scale-d 0 wgmma of block 0 */
    /* One k-block (see the file comment); FIRST: block 0, whose first k16 step starts the chain. */
    auto block = [&](int kb, auto first) {
      constexpr bool FIRST = decltype(first)::value;
      fh_ptx::cp_async_wait<sm90::LOOKAHEAD - 1>(); /* this thread's A copies of block kb */
      fh_ptx::fence_proxy_async();
      __syncthreads(); /* every thread's copies of block kb; every warpgroup retired block kb - 2 */
      if (kb + sm90::LOOKAHEAD < kt) {
        if (mc && tid == 0 && kb + sm90::LOOKAHEAD >= sm90::STAGES) {
          /* block kb - 2's slot is free here: tell both CTAs, which fill it with halves of B */
          const int s2 = (kb + sm90::LOOKAHEAD) % sm90::STAGES;
          fh_ptx::mbar_arrive(&empty[s2]);
          fh_ptx::mbar_arrive_cluster(&empty[s2], crank ^ 1u);
        }
        issue(kb + sm90::LOOKAHEAD);
      }
      fh_ptx::cp_async_commit();
      const int s = kb % sm90::STAGES;
      fh_ptx::mbar_wait(&bar[s], (uint32_t)(kb / sm90::STAGES) & 1u);
      wgmma_kblock<BF16, FIRST>(d, slots + (size_t)s * sm90::STAGE_BYTES, wg);
    };
    block(0, std::true_type{}); /* kt >= 1: K > 0 (pick_tma90) */
    FH_NO_UNROLL
    for (int kb = 1; kb < kt; ++kb) block(kb, std::false_type{});
    fh_ptx::wgmma_wait<0>();
    fh_ptx::wgmma_fence_operand(d);
    fh_ptx::cp_async_wait<0>();
    __syncthreads(); /* every MMA retired and every thread past its waits: the ring is free */
    if (tid == 0) {
      FH_UNROLL
      for (int s = 0; s < sm90::STAGES; ++s) {
        fh_ptx::mbar_inval(&bar[s]);
        if (mc) fh_ptx::mbar_inval(&empty[s]);
      }
    }
    exchange(acc, d, (float*)slots, [] { __syncthreads(); });
  }
};


/* CTAs per cluster of a launch of mainloop tag Align: 2 when the sm_90a loop multicasts the
 * classifier tile (FH_LAUNCH_CLUSTER), else 1. A kernel whose CTAs may have no rows returns
 * early only when its whole cluster has none: the peer still needs its half of every tile. */
template <typename Align>
__device__ __forceinline__ int cluster_ctas() {
  if constexpr (std::is_same<Align, tma90>::value || is_ws<Align>::value)
    return (int)fh_ptx::cluster_nctarank();
  else return 1;
}

/* The barrier of the 256 threads that hold the tile: __syncthreads, or named barrier 1 when a
 * producer warpgroup is beside them (is_ws: it runs ahead, or has left). */
template <typename Align>
__device__ __forceinline__ void tile_sync() {
  if constexpr (is_ws<Align>::value) fh_ptx::bar_sync(1, THREADS);
  else __syncthreads();
}

/* tile_sync that also returns whether any of the 256 threads' pred was nonzero: __syncthreads_or,
 * or bar.red.or on barrier 1 (is_ws). */
template <typename Align>
__device__ __forceinline__ int tile_sync_or(int pred) {
  if constexpr (is_ws<Align>::value) return fh_ptx::bar_red_or(1, THREADS, pred);
  else return __syncthreads_or(pred);
}

/* ---- host side: selection and the tensor map of B ---- */

#ifndef FH_HAVE_SM90A
#define FH_HAVE_SM90A 0 /* CMake defines it when FH_CUDA_ARCHITECTURES lists 90a */
#endif

/* The most dynamic shared memory one block may opt in to on sm_90 (227 KiB). */
constexpr size_t SMEM_OPTIN_MAX_SM90 = 232448;
template <typename Align>
struct optin {
  static constexpr size_t max = SMEM_OPTIN_MAX;
};
template <>
struct optin<tma90> {
  static constexpr size_t max = SMEM_OPTIN_MAX_SM90;
};

/* The mainloop tag for 16-bit T on the sm_90a path (fp32 never takes it: its three-piece split
 * has no wgmma form, docs/hopper.md), so that no fp32 kernel is instantiated for it. */
template <typename T>
using tma90_for = typename std::conditional<sizeof(T) == 2, tma90, vec16>::type;

/* Whether this launch takes the sm_90a mainloop: the device is compute capability 9.0, the
 * library was built with 90a, and the environment variable FH_ENGINE is not "sm80" (which keeps
 * the sm_80 mainloop on Hopper: comparisons, debugging). */
static inline bool tma90_enabled() {
  if (!FH_HAVE_SM90A) return false;
  const char* e = getenv("FH_ENGINE");
  if (e && strcmp(e, "sm80") == 0) return false;
  int dev = 0, ma = 0, mi = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&ma, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&mi, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return false;
  return ma == 9 && mi == 0;
}

typedef CUresult (*encode_tiled_fn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                    const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                    CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

/* The tensor map of a K-major B operand for the sm_90a mainloop: `rows` rows of K elements,
 * `ld` elements apart, boxes of 64 x box_rows (128, or 64 for the halves a cluster multicasts) in
 * the 128-byte swizzle; rows past `rows` and elements past K read as zero. False when the driver
 * refuses it (the caller keeps the sm_80 loop). */
static inline bool encode_b_map(CUtensorMap* m, const void* base, bool bf16, int64_t rows, int64_t K, int64_t ld,
                                int box_rows = BN) {
  encode_tiled_fn fn = nullptr;
#ifdef __CUDACC__
  void* p = nullptr;
  cudaDriverEntryPointQueryResult q;
  if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess)
    return false;
  fn = (encode_tiled_fn)p;
#else
  fn = cuTensorMapEncodeTiled; /* the emulator's twin */
#endif
  const cuuint64_t dim[2] = {(cuuint64_t)K, (cuuint64_t)rows};
  const cuuint64_t stride[1] = {(cuuint64_t)ld * 2u};
  const cuuint32_t box[2] = {(cuuint32_t)sm90::KB, (cuuint32_t)box_rows};
  const cuuint32_t es[2] = {1, 1};
  return fn(m, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, const_cast<void*>(base),
            dim, stride, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/* The host's choice for a launch of 16-bit T whose operands passed vec16_ok: the sm_90a path
 * when it is enabled and B's tensor map (written to *m) encodes. mc: the launch goes in clusters
 * of 2 CTAs that multicast halves of each B tile (the map's box is then half a tile). */
template <typename T>
static inline bool pick_tma90(bool vec, CUtensorMap* m, const void* b, int64_t rows, int64_t K, int64_t ld,
                              bool mc = false) {
  if (sizeof(T) != 2 || !vec || rows <= 0 || K <= 0 || !tma90_enabled()) return false;
  return encode_b_map(m, b, operand<T>::BF16, rows, K, ld, mc ? BN / 2 : BN);
}

/* Whether the device keeps 2-CTA clusters of kernel k (`threads` threads and `smem` bytes of
 * dynamic shared memory per CTA) resident: cudaOccupancyMaxActiveClusters answers at least one.
 * A device or partition that cannot (an MPS or MIG share, a part without clusters) then takes the
 * single-CTA loop instead of a launch that would fail. */
template <typename Kern>
static inline bool cluster_fits(Kern* k, size_t smem, int threads) {
  if (cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeClusterDimension;
  at[0].val.clusterDim.x = 2;
  at[0].val.clusterDim.y = 1;
  at[0].val.clusterDim.z = 1;
  /* by position: the emulator defines gridDim and blockDim as macros */
  const cudaLaunchConfig_t cfg = {dim3(2), dim3((unsigned)threads), smem, nullptr, at, 1};
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, k, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
}

/* Whether a sm_90a launch of kernel k (operands of T; `smem` bytes of dynamic shared memory) over
 * `row_blocks` row blocks (grid x) that share every B tile goes in clusters of 2 with B multicast
 * (docs/hopper.md): 16-bit T on the sm_90a path, at least 2 row blocks, the environment variable
 * FH_MULTICAST is not "0" (the single-CTA loop on Hopper: comparisons, debugging), and the device
 * can hold such clusters (cluster_fits). The launch then rounds grid x up to even; the extra CTA
 * has no rows but loads its half of B. Decided before the tensor map is encoded: a cluster's map
 * has half boxes. */
template <typename T, typename Kern>
static inline bool multicast_enabled(unsigned row_blocks, Kern* k, size_t smem, int threads = THREADS) {
  if (sizeof(T) != 2 || row_blocks < 2 || !tma90_enabled()) return false;
  const char* e = getenv("FH_MULTICAST");
  if (e && strcmp(e, "0") == 0) return false;
  return cluster_fits(k, smem, threads);
}

/* Launches kernel k (`threads` per CTA) with `grid`, in clusters of 2 along x (grid x rounded up
 * to even) when mc, as one CTA per cluster otherwise. */
template <typename K, typename... A>
static inline void launch_tiles_n(int threads, bool mc, K* k, dim3 grid, size_t smem, cudaStream_t stream,
                                  A&&... args) {
  if (mc) {
    grid.x += grid.x & 1u;
    FH_LAUNCH_CLUSTER(k, grid, dim3((unsigned)threads), dim3(2, 1, 1), smem, stream, static_cast<A&&>(args)...);
  } else {
    FH_LAUNCH(k, grid, dim3((unsigned)threads), smem, stream, static_cast<A&&>(args)...);
  }
}
/* The same for the kernels of THREADS threads (the sm_80 and tma90 mainloops). */
template <typename K, typename... A>
static inline void launch_tiles_mc(bool mc, K* k, dim3 grid, size_t smem, cudaStream_t stream, A&&... args) {
  launch_tiles_n(THREADS, mc, k, grid, smem, stream, static_cast<A&&>(args)...);
}

} /* namespace fh_eng */

#endif
