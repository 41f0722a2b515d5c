/* engine/sm90_ws.cuh: the warp-specialized sm_90a mainloop, fh_eng::mainloop<T, tma90ws>: the
 * same 128 x 128 tile of A·Bᵀ as engine/sm90.cuh, from the same slots, descriptors and wgmma
 * chain (wgmma_kblock), handed to the epilogues in the same registers (exchange), but with the
 * loads taken off the 256 threads that hold the tile. docs/hopper.md "The warp-specialized
 * mainloop" has the design and its cost.
 *
 *   - The CTA has 384 threads: warpgroups 0 and 1 hold the tile as in every mainloop (the
 *     epilogues index them by threadIdx.x < 256 unchanged), warpgroup 2 is the producer; its warp
 *     8 issues the copies. A whole warpgroup, because setmaxnreg works per warpgroup and 9 warps
 *     would cap every thread at 168 registers anyway (3 warps in one SM sub-partition): the
 *     producer drops to 56 registers, the consumers rise to 224.
 *   - The producer fills a ring of S slots of 32 KiB (4 for the forward, 3 for the backward,
 *     whose streamed GEMMs need room of their own: the tag's X bytes after the slots): lane 0
 *     announces B's bytes (expect_tx) and issues its TMA box (or, in a 2-CTA cluster, its half,
 *     multicast to both); every lane copies 32 16-byte chunks of A's gathered rows by cp.async
 *     and then arrives on the slot's full barrier with cp.async.mbarrier.arrive.noinc, which
 *     fires once its copies landed. full[s] thus counts 1 + 32 arrivals and B's bytes.
 *   - The consumers wait on full[s] (parity = the ring's pass), order the cp.async bytes for
 *     the async proxy (fence.proxy.async), run the k-block's wgmma chain, and once its group
 *     retired (one k-block later: wait_group 1) each warp's lane 0 releases the slot on empty[s]
 *     (8 arrivals, 16 in a cluster, where each warp also arrives on the peer's barrier: the
 *     peer's producer multicasts into this CTA's slot too). No CTA-wide barrier in the loop.
 *   - The ring persists across the tiles of a kernel (ws_pipe: the k-blocks each role has passed,
 *     so the slot and the parity). The producer runs its own loop over the kernel's tiles, so it
 *     loads the next tile's k-blocks while the consumers run this tile's epilogue; the
 *     accumulators therefore go through their own exchange buffer (not the slots), behind named
 *     barrier 1 of the 256 consumers.
 *   - The barriers are set up once (start, all threads) and invalidated by finish, which both
 *     roles call after their loops; it waits for the whole CTA and the cluster's peer, whose
 *     arrivals and multicast reach this CTA until it is done.
 *   - Summation order: the wgmma chain of engine/sm90.cuh, so the tiles are bitwise equal to the
 *     tma90 and sm_80 loops' on the emulator (tested).
 *
 * How a kernel uses it: the comment above start_tiles below. */
#ifndef FH_KERNELS_ENGINE_SM90_WS_CUH
#define FH_KERNELS_ENGINE_SM90_WS_CUH

#include "sm90.cuh"

namespace fh_eng {

namespace ws {
constexpr int THREADS_WS = THREADS + 128; /* 2 consumer warpgroups, then the producer warpgroup */
constexpr size_t HEADER = 1024;                                    /* full[S], empty[S] */
constexpr size_t XBYTES = (size_t)BM * sm90::XP * sizeof(float);   /* the exchange: 68 KiB */
/* The ring's bytes: the header, slack to align the slots, S slots, the consumers' X bytes. */
constexpr size_t ring_bytes(int S, size_t X) { return HEADER + 1024 + (size_t)S * sm90::STAGE_BYTES + X; }
constexpr int A_PER_LANE = BM * (sm90::ROWB / 16) / 32;            /* 32 chunks of A per lane */
constexpr uint32_t FULL_COUNT = 1 + 32;
/* Registers per thread after setmaxnreg: each SM sub-partition holds one producer warp and two
 * consumer warps of the 12 (16384 registers, 512 per lane): 56 + 2 x 224 = 504. */
constexpr int PRODUCER_REGS = 56, CONSUMER_REGS = 224;
static_assert(PRODUCER_REGS + 2 * CONSUMER_REGS <= 512, "one producer and two consumer warps per sub-partition");
} /* namespace ws */

/* The linear CE forward's: 4 slots and the exchange (198 KiB, beside its 1 KiB of row tables). */
using tma90ws = tma90ws_t<4, ws::XBYTES>;

template <int S, size_t X>
struct ring<tma90ws_t<S, X>> {
  static_assert(S >= 2 && 2 * S * sizeof(uint64_t) <= ws::HEADER, "the slots' mbarriers fit in the header");
  static_assert(X >= ws::XBYTES, "the exchange fits in the consumers' bytes");
  static constexpr size_t bytes = ws::ring_bytes(S, X);
};
template <int S, size_t X>
struct block_threads<tma90ws_t<S, X>> {
  static constexpr int value = ws::THREADS_WS;
};
template <int S, size_t X>
struct optin<tma90ws_t<S, X>> {
  static constexpr size_t max = SMEM_OPTIN_MAX_SM90;
};

/* The ring's position, per thread, across the tiles of one kernel. */
struct ws_pipe {
  bool producer = threadIdx.x >= (unsigned)THREADS; /* warpgroup 2 */
  uint32_t it = 0; /* k-blocks this thread's role has passed through the ring */
};
template <int S, size_t X>
struct pipe_of<tma90ws_t<S, X>> {
  using type = ws_pipe;
};

template <typename T, int S, size_t X>
struct mainloop<T, tma90ws_t<S, X>> {
  static_assert(sizeof(T) == 2, "the sm_90a mainloop takes bf16 or fp16 operands");
  static constexpr bool BF16 = operand<T>::BF16;
  static constexpr size_t SLOTS = (size_t)S * sm90::STAGE_BYTES;

  static __device__ __forceinline__ unsigned char* slots(unsigned char* smem) {
    return smem + ws::HEADER + ((1024u - (fh_ptx::smem_u32(smem + ws::HEADER) & 1023u)) & 1023u);
  }
  /* The consumers' X bytes (the exchange, then a kernel's use between tiles). */
  static __device__ __forceinline__ unsigned char* scratch(unsigned char* smem) { return slots(smem) + SLOTS; }
  static __device__ __forceinline__ int kblocks(int K) { return (K * (int)sizeof(T) + sm90::ROWB - 1) / sm90::ROWB; }

  /* Every thread, before its role: the barriers, seen by the whole CTA (and cluster). */
  static __device__ __forceinline__ void start(unsigned char* smem) {
    const bool mc = fh_ptx::cluster_nctarank() == 2;
    uint64_t* full = (uint64_t*)smem;
    uint64_t* empty = full + S;
    __syncthreads(); /* the caller's last readers of these bytes are done */
    if (threadIdx.x == 0) {
      FH_UNROLL
      for (int s = 0; s < S; ++s) {
        fh_ptx::mbar_init(&full[s], ws::FULL_COUNT);
        fh_ptx::mbar_init(&empty[s], mc ? 16u : 8u); /* a lane per consumer warp, of both CTAs */
      }
      fh_ptx::fence_mbar_init();
      fh_ptx::fence_proxy_async();
    }
    if (mc) fh_ptx::cluster_sync(); /* the peer's barriers exist before anything reaches them */
    else __syncthreads();
  }

  /* The consumers (warpgroups 0 and 1): one tile into acc, as every mainloop's run. */
  static __device__ __forceinline__ void run(acc_t& acc, const nt_operand<T>& a, const nt_operand<T>& b, int K,
                                             unsigned char* smem, ws_pipe& p) {
    (void)a, (void)b;
    const int tid = (int)threadIdx.x, wg = tid >> 7;
    const bool mc = fh_ptx::cluster_nctarank() == 2;
    const uint32_t crank = mc ? fh_ptx::cluster_ctarank() : 0u;
    uint64_t* full = (uint64_t*)smem;
    uint64_t* empty = full + S;
    unsigned char* ring = slots(smem);
    const int kt = kblocks(K);
    const bool releaser = (tid & 31) == 0;
    /* The slot of k-block number i (counted over the kernel's tiles) may be refilled. */
    auto release = [&](uint32_t i) {
      if (!releaser) return;
      uint64_t* e = &empty[i % S];
      fh_ptx::mbar_arrive(e);
      if (mc) fh_ptx::mbar_arrive_cluster(e, crank ^ 1u);
    };
    auto block = [&](float (&d)[BN / 2], uint32_t i, auto first) {
      const uint32_t s = i % S;
      fh_ptx::mbar_wait(&full[s], (i / S) & 1u);
      fh_ptx::fence_proxy_async(); /* the producer's cp.async bytes, for the wgmma's async proxy */
      wgmma_kblock<BF16, decltype(first)::value>(d, ring + (size_t)s * sm90::STAGE_BYTES, wg);
    };
    float d[BN / 2]; /* written first by the scale-d 0 wgmma of block 0 */
    block(d, p.it, std::true_type{}); /* kt >= 1: K > 0 (pick_tma90) */
    FH_NO_UNROLL
    for (int kb = 1; kb < kt; ++kb) {
      block(d, p.it + (uint32_t)kb, std::false_type{});
      release(p.it + (uint32_t)kb - 1u); /* its group retired in the wait_group 1 */
    }
    fh_ptx::wgmma_wait<0>();
    fh_ptx::wgmma_fence_operand(d);
    release(p.it + (uint32_t)kt - 1u);
    p.it += (uint32_t)kt;
    exchange(acc, d, (float*)scratch(smem), [] { fh_ptx::bar_sync(1, THREADS); });
  }

  /* The producer warpgroup, for one tile: warp 8 issues its k-blocks into the ring (the other
   * three warps only keep the warpgroup whole for setmaxnreg). */
  static __device__ __forceinline__ void produce(const nt_operand<T>& a, const nt_operand<T>& b, int K,
                                                 unsigned char* smem, ws_pipe& p) {
    const int kt = kblocks(K);
    const uint32_t it = p.it;
    p.it += (uint32_t)kt;
    if ((threadIdx.x >> 5) != (unsigned)(THREADS / 32)) return;
    const bool mc = fh_ptx::cluster_nctarank() == 2;
    const uint32_t crank = mc ? fh_ptx::cluster_ctarank() : 0u;
    uint64_t* full = (uint64_t*)smem;
    uint64_t* empty = full + S;
    unsigned char* ring = slots(smem);
    const int lane = (int)threadIdx.x & 31, c = lane & 7;
    const int kbytes = K * (int)sizeof(T);
    const unsigned char* base = (const unsigned char*)a.base;
    const int64_t ldb = a.ld * (int64_t)sizeof(T);
    const CUtensorMap* map = static_cast<const CUtensorMap*>(b.tmap);
    FH_NO_UNROLL
    for (int kb = 0; kb < kt; ++kb) {
      const uint32_t i = it + (uint32_t)kb, s = i % S;
      /* the slot's previous k-block (i - S) is retired, in both CTAs of a cluster */
      if (i >= (uint32_t)S) fh_ptx::mbar_wait(&empty[s], ((i / S) & 1u) ^ 1u);
      unsigned char* st = ring + (size_t)s * sm90::STAGE_BYTES;
      if (lane == 0) {
        fh_ptx::mbar_arrive_expect_tx(&full[s], (uint32_t)sm90::TILE_B); /* both halves, with a cluster */
        if (mc) {
          constexpr int HALF = BN / 2;
          fh_ptx::tma_load_2d_multicast(st + sm90::TILE_A + (size_t)crank * HALF * sm90::ROWB, map, kb * sm90::KB,
                                        b.row0 + (int)crank * HALF, &full[s], (uint16_t)0x3);
        } else {
          fh_ptx::tma_load_2d(st + sm90::TILE_A, map, kb * sm90::KB, b.row0, &full[s]);
        }
      }
      /* Lane l: chunk c = l % 8 of rows r = 4q + l / 8, q = 0 .. 31; the row's index is read again
       * per k-block (the gather table, or row0 + r), which keeps the producer within its
       * registers. Rows past n and bytes past K copy nothing (zero fill). */
      const int k0 = kb * sm90::ROWB + 16 * c;
      int n = kbytes - k0;
      n = n < 0 ? 0 : (n > 16 ? 16 : n);
      FH_UNROLL4
      for (int q = 0; q < ws::A_PER_LANE; ++q) {
        const int r = 4 * q + (lane >> 3);
        const int row = r < a.n ? (a.gather ? a.gather[r] : a.row0 + r) : -1;
        const int nq = row >= 0 ? n : 0;
        fh_ptx::cp_async_16(st + r * sm90::ROWB + ((c ^ (r & 7)) << 4), nq > 0 ? base + row * ldb + k0 : base, nq);
      }
      fh_ptx::cp_async_mbar_arrive_noinc(&full[s]);
    }
  }

  /* After its role's tiles, every thread: the ring is idle (every k-block consumed and released,
   * in the peer too) and the barriers invalidated; on return the consumers may reuse every byte
   * (the producer warpgroup leaves). */
  static __device__ __forceinline__ void finish(unsigned char* smem, const ws_pipe& p) {
    const bool mc = fh_ptx::cluster_nctarank() == 2;
    if (mc) fh_ptx::cluster_sync();
    else __syncthreads();
    if (threadIdx.x == 0) {
      uint64_t* full = (uint64_t*)smem;
      FH_UNROLL
      for (int s = 0; s < 2 * S; ++s) fh_ptx::mbar_inval(&full[s]);
    }
    if (!p.producer) fh_ptx::bar_sync(1, THREADS); /* thread 0's inval before the consumers' reuse */
  }
};

/* The kernels' single call sites for every mainloop (for those other than tma90ws: the plain run,
 * and nothing else). A kernel's tiles:
 *
 *   typename pipe_of<Align>::type pipe;
 *   start_tiles<T, Align>(smem);                    // every thread
 *   if (pipe.producer) {                            // the producer warpgroup (tma90ws only)
 *     producer_role<Align>();
 *     for (each tile) produce_tile<T, Align>(a, b, K, smem, pipe);
 *     finish_tiles<T, Align>(smem, pipe);
 *     return;
 *   }
 *   consumer_role<Align>();
 *   for (each tile, the same) { run_tile<T, Align>(acc, a, b, K, smem, pipe); epilogue; }
 *   finish_tiles<T, Align>(smem, pipe);
 *   ... tile_sync<Align>() in place of __syncthreads from here on. */
template <typename T, typename Align>
__device__ __forceinline__ void start_tiles(unsigned char* smem) {
  if constexpr (is_ws<Align>::value) mainloop<T, Align>::start(smem);
  else (void)smem;
}
template <typename Align>
__device__ __forceinline__ void producer_role() {
  if constexpr (is_ws<Align>::value) fh_ptx::setmaxnreg_dec<ws::PRODUCER_REGS>();
}
template <typename Align>
__device__ __forceinline__ void consumer_role() {
  if constexpr (is_ws<Align>::value) fh_ptx::setmaxnreg_inc<ws::CONSUMER_REGS>();
}
template <typename T, typename Align, typename Pipe>
__device__ __forceinline__ void produce_tile(const nt_operand<T>& a, const nt_operand<T>& b, int K,
                                             unsigned char* smem, Pipe& p) {
  if constexpr (is_ws<Align>::value) mainloop<T, Align>::produce(a, b, K, smem, p);
  else (void)a, (void)b, (void)K, (void)smem, (void)p;
}
template <typename T, typename Align, typename Pipe>
__device__ __forceinline__ void run_tile(acc_t& acc, const nt_operand<T>& a, const nt_operand<T>& b, int K,
                                         unsigned char* smem, Pipe& p) {
  if constexpr (is_ws<Align>::value) mainloop<T, Align>::run(acc, a, b, K, smem, p);
  else mainloop<T, Align>::run(acc, a, b, K, smem), (void)p;
}
template <typename T, typename Align, typename Pipe>
__device__ __forceinline__ void finish_tiles(unsigned char* smem, const Pipe& p) {
  if constexpr (is_ws<Align>::value) mainloop<T, Align>::finish(smem, p);
  else (void)smem, (void)p;
}
/* Whether a kernel that has both takes the warp-specialized loop over the tma90 one: unless the
 * environment variable FH_WS is "0" (comparisons: both give the same bits; the GPU check times
 * both). The sm_90a conditions themselves are pick_tma90's. */
static inline bool ws_enabled() {
  const char* e = getenv("FH_WS");
  return !(e && strcmp(e, "0") == 0);
}

/* The mainloop tag of a 16-bit T's warp-specialized sm_90a path, WS (vec16 for fp32, never
 * launched on it: no wgmma form). */
template <typename T, typename WS = tma90ws>
using tma90ws_for = typename std::conditional<sizeof(T) == 2, WS, vec16>::type;

/* Where a kernel's consumers may keep their own data between tiles (the backward's streamed
 * GEMMs): the consumers' bytes of the warp-specialized ring, else the whole ring, which every
 * other mainloop leaves free when its run returns. */
template <typename T, typename Align>
__device__ __forceinline__ unsigned char* tile_scratch(unsigned char* smem) {
  if constexpr (is_ws<Align>::value) return mainloop<T, Align>::scratch(smem);
  else return smem;
}

} /* namespace fh_eng */

#endif
