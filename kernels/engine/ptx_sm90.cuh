/* engine/ptx_sm90.cuh: the Hopper (sm_90 / sm_90a) building blocks, one wrapper per PTX
 * instruction, as kernels/engine/ptx.cuh does for sm_80. docs/hopper.md says what exists and what
 * the twins check.
 *
 * Under nvcc each wrapper is inline PTX for __CUDA_ARCH__ >= 900; wgmma and setmaxnreg exist on
 * the architecture-specific target sm_90a only (__CUDA_ARCH_FEAT_SM90_ALL), so build with
 * -gencode=arch=compute_90a,code=sm_90a. On older architectures the wrappers trap, so that a
 * library compiled for several architectures still builds; no kernel may reach them there.
 * Without nvcc (the SIMT emulator, tests/emu) each calls a twin in namespace fh_emu
 * (tests/emu/emu_sm90.h) written from the PTX ISA's documented semantics.
 *
 * Shared addresses. mbarriers, bulk-copy destinations and matrix descriptors take addresses in
 * the shared window (32-bit); smem_u32() converts a generic pointer. In the emulator the shared
 * window is the block's dynamic shared memory, offset 0 at its start (which is 1024-byte aligned,
 * as kernels align their swizzled stages): operands of TMA and wgmma must lie there. */
#ifndef FH_KERNELS_ENGINE_PTX_SM90_CUH
#define FH_KERNELS_ENGINE_PTX_SM90_CUH

#include <stdint.h>

#include "ptx.cuh"

#include <cuda.h> /* CUtensorMap (the emulator has the toolkit's headers too) */

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FH_SM90_DEVICE 1
#else
#define FH_SM90_DEVICE 0
#endif
#if FH_SM90_DEVICE && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FH_SM90A_DEVICE 1
#else
#define FH_SM90A_DEVICE 0
#endif
/* device code of an architecture without the instruction (sm_80, or sm_90 without the a) */
#if defined(__CUDA_ARCH__) && !FH_SM90A_DEVICE
#define FH_SM90_OTHER_DEVICE 1
#else
#define FH_SM90_OTHER_DEVICE 0
#endif
#if defined(__CUDA_ARCH__) && !FH_SM90_DEVICE
#define FH_SM80_ONLY_DEVICE 1
#else
#define FH_SM80_ONLY_DEVICE 0
#endif

namespace fh_ptx {

/* A generic pointer to shared memory as an address in the shared window. */
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
#ifdef __CUDACC__
  return smem_addr(p);
#else
  return ::fh_emu::sm90_smem_offset(p);
#endif
}

/* ---- mbarrier (PTX ISA, "Parallel Synchronization and Communication Instructions:
 * mbarrier"). A 64-bit object in shared memory counting pending arrivals and a transaction count
 * of bytes; a phase completes when both reach zero, then the next phase starts with the arrival
 * count of init. Waits name the phase by its parity. ---- */

/* mbarrier.init.shared::cta.b64: expected arrivals per phase, count in [1, 2^20 - 1]. */
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
#if FH_SM90_DEVICE
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
#elif FH_SM80_ONLY_DEVICE
  (void)bar, (void)count;
  __trap();
#elif !defined(__CUDACC__)
  ::fh_emu::sm90_mbar_init(bar, count);
#endif
}
/* mbarrier.inval.shared::cta.b64: ends the object's life as an mbarrier, so that its bytes (or a
 * later mbarrier.init) may reuse it; no phase may be in progress. */
__device__ __forceinline__ void mbar_inval(uint64_t* bar) {
#if FH_SM90_DEVICE
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar)) : "memory");
#elif FH_SM80_ONLY_DEVICE
  (void)bar;
  __trap();
#elif !defined(__CUDACC__)
  ::fh_emu::sm90_mbar_inval(bar);
#endif
}
/* fence.mbarrier_init.release.cluster: makes the inits visible to the async proxy (TMA) and to
 * the other CTAs of the cluster; one thread after its inits, before the barrier that publishes
 * them. */
__device__ __forceinline__ void fence_mbar_init() {
#if FH_SM90_DEVICE
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#elif FH_SM80_ONLY_DEVICE
  __trap();
#endif
}
/* mbarrier.arrive.shared::cta.b64: one arrival; returns the phase state token. */
__device__ __forceinline__ uint64_t mbar_arrive(uint64_t* bar) {
#if FH_SM90_DEVICE
  uint64_t st;
  asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];\n" : "=l"(st) : "r"(smem_u32(bar)) : "memory");
  return st;
#elif FH_SM80_ONLY_DEVICE
  (void)bar;
  __trap();
  return 0;
#elif !defined(__CUDACC__)
  return ::fh_emu::sm90_mbar_arrive(bar, 0);
#else
  return 0;
#endif
}
/* cp.async.mbarrier.arrive.noinc.shared::cta.b64: one arrival on the mbarrier once every
 * cp.async this thread issued before has completed (its writes are then visible to a thread that
 * waited on the phase). .noinc: the arrival is part of the count given to mbar_init. */
__device__ __forceinline__ void cp_async_mbar_arrive_noinc(uint64_t* bar) {
#if FH_SM90_DEVICE
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar)) : "memory");
#elif FH_SM80_ONLY_DEVICE
  (void)bar;
  __trap();
#elif !defined(__CUDACC__)
  ::fh_emu::sm90_cp_async_mbar_arrive(bar);
#else
  (void)bar;
#endif
}
/* mbarrier.arrive.expect_tx.shared::cta.b64: expect `bytes` more transaction bytes in the
 * current phase (the copies' complete_tx count them down), then one arrival. */
__device__ __forceinline__ uint64_t mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if FH_SM90_DEVICE
  uint64_t st;
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 %0, [%1], %2;\n"
               : "=l"(st)
               : "r"(smem_u32(bar)), "r"(bytes)
               : "memory");
  return st;
#elif FH_SM80_ONLY_DEVICE
  (void)bar, (void)bytes;
  __trap();
  return 0;
#elif !defined(__CUDACC__)
  return ::fh_emu::sm90_mbar_arrive(bar, bytes);
#else
  return 0;
#endif
}
/* mbarrier.try_wait.parity.shared::cta.b64: true once the phase of parity `parity` completed
 * (the current phase's parity differs). It may return false after a time limit even though the
 * phase will complete: always call it in a loop (mbar_wait). */
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
#if FH_SM90_DEVICE
  uint32_t ok;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(ok)
      : "r"(smem_u32(bar)), "r"(parity)
      : "memory");
  return ok != 0;
#elif FH_SM80_ONLY_DEVICE
  (void)bar, (void)parity;
  __trap();
  return false;
#elif !defined(__CUDACC__)
  return ::fh_emu::sm90_mbar_try_wait(bar, parity);
#else
  return false;
#endif
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

/* fence.proxy.async.shared::cta: orders this thread's generic-proxy shared stores (st.shared,
 * stmatrix) before later async-proxy accesses (wgmma operand reads, TMA) of the same bytes. */
__device__ __forceinline__ void fence_proxy_async() {
#if FH_SM90_DEVICE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#elif FH_SM80_ONLY_DEVICE
  __trap();
#elif !defined(__CUDACC__)
  ::fh_emu::sm90_fence_proxy_async();
#endif
}

/* ---- cp.async.bulk.tensor (TMA; PTX ISA, "Data Movement and Conversion Instructions:
 * cp.async.bulk.tensor") ----
 * A box of the tensor described by `tmap` (cuTensorMapEncodeTiled, passed to the kernel as a
 * __grid_constant__ parameter) at coordinates {c0 (innermost), c1}, copied to shared `dst`
 * (128-byte aligned) with the map's swizzle and out-of-bounds fill; on completion the copy
 * performs complete_tx of the box's bytes on `bar`. One thread issues it. */
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* tmap, int32_t c0, int32_t c1,
                                            uint64_t* bar) {
#if FH_SM90_DEVICE
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_u32(dst)),
      "l"(tmap), "r"(c0), "r"(c1), "r"(smem_u32(bar))
      : "memory");
#elif FH_SM80_ONLY_DEVICE
  (void)dst, (void)tmap, (void)c0, (void)c1, (void)bar;
  __trap();
#elif !defined(__CUDACC__)
  ::fh_emu::sm90_tma_load_2d(dst, tmap, c0, c1, bar, 0, false);
#endif
}
/* The .multicast::cluster variant: the same box lands at the same offset in the shared memory
 * of every CTA named in cta_mask (bit i: cluster rank i), each completing on its own `bar`.
 * Built for sm_90a only (ptxas advises against it on the portable sm_90 target); it traps on
 * the others, as wgmma does. */
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const CUtensorMap* tmap, int32_t c0, int32_t c1,
                                                      uint64_t* bar, uint16_t cta_mask) {
#if FH_SM90A_DEVICE
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, "
      "%3}], [%4], %5;\n" ::"r"(smem_u32(dst)),
      "l"(tmap), "r"(c0), "r"(c1), "r"(smem_u32(bar)), "h"(cta_mask)
      : "memory");
#elif FH_SM90_OTHER_DEVICE
  (void)dst, (void)tmap, (void)c0, (void)c1, (void)bar, (void)cta_mask;
  __trap();
#elif !defined(__CUDACC__)
  ::fh_emu::sm90_tma_load_2d(dst, tmap, c0, c1, bar, cta_mask, true);
#endif
}

/* ---- wgmma (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate
 * Instructions") ----
 * A warpgroup (4 consecutive warps, the first warp index divisible by 4) issues them together.
 * The accumulators belong to the async unit from mma_async until a wait_group retires its group:
 * reading or writing them in between is undefined, and register accesses before an mma_async
 * need a wgmma.fence first. */

enum Swizzle : uint32_t { SWIZZLE_NONE = 0, SWIZZLE_128B = 1, SWIZZLE_64B = 2, SWIZZLE_32B = 3 };

/* The 64-bit shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format" of the
 * asynchronous warpgroup-level shared memory layouts):
 * bits 0-13 start address >> 4, 16-29 leading dimension byte offset >> 4, 32-45 stride
 * dimension byte offset >> 4, 49-51 base offset (0: stages aligned to the swizzle pattern's
 * repeat), 62-63 swizzle. For K-major operands: LBO = bytes between core matrices adjacent in K
 * (unused with a swizzle), SBO = bytes between 8-row groups. */
__device__ __forceinline__ uint64_t make_smem_desc(uint32_t smem_addr_u32, uint32_t lbo_bytes, uint32_t sbo_bytes,
                                                   Swizzle sw) {
  return (uint64_t)((smem_addr_u32 >> 4) & 0x3FFFu) | ((uint64_t)((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         ((uint64_t)((sbo_bytes >> 4) & 0x3FFFu) << 32) | ((uint64_t)sw << 62);
}
__device__ __forceinline__ uint64_t make_smem_desc(const void* p, uint32_t lbo_bytes, uint32_t sbo_bytes, Swizzle sw) {
  return make_smem_desc(smem_u32(p), lbo_bytes, sbo_bytes, sw);
}

/* wgmma.fence.sync.aligned: order the warpgroup's register accesses before the next mma_async. */
__device__ __forceinline__ void wgmma_fence() {
#if FH_SM90A_DEVICE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#elif FH_SM90_OTHER_DEVICE
  __trap();
#elif !defined(__CUDACC__)
  ::fh_emu::sm90_wgmma_fence();
#endif
}
/* No instruction: pins the accumulator registers in place (an empty asm that reads and writes
 * each), so that the compiler moves no ordinary access to them into the span between an
 * mma_async and the wait_group that retires it; ptxas would otherwise serialize the chain
 * (warning C7514). Placed around the MMAs of each k-block. */
template <int R>
__device__ __forceinline__ void wgmma_fence_operand(float (&d)[R]) {
#if FH_SM90A_DEVICE
  FH_UNROLL
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}
/* wgmma.commit_group.sync.aligned: the mma_asyncs issued since the last commit form a group. */
__device__ __forceinline__ void wgmma_commit() {
#if FH_SM90A_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#elif FH_SM90_OTHER_DEVICE
  __trap();
#elif !defined(__CUDACC__)
  ::fh_emu::sm90_wgmma_commit();
#endif
}
/* wgmma.wait_group.sync.aligned N: returns when at most N groups are pending; the accumulators
 * of the retired groups are then ordinary registers again. */
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if FH_SM90A_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#elif FH_SM90_OTHER_DEVICE
  __trap();
#elif !defined(__CUDACC__)
  ::fh_emu::sm90_wgmma_wait(N);
#endif
}

/* wgmma_m64n{64,128,256}k16_{bf16,f16}(d, desc_a, desc_b, scale_d) and wgmma<N, Bf16>(...):
 * generated (scripts/gen_wgmma_asm.py). Accumulator layout of thread t of the warpgroup, warp
 * w = t / 32, g = (t % 32) / 4, q = t % 4: d[4j + r] = D[16w + g + 8(r / 2)][8j + 2q + r % 2]. */
#include "wgmma_sm90.inc"

/* setmaxnreg.{inc,dec}.sync.aligned.u32 N (sm_90a): the warpgroup's per-thread register budget,
 * N in [24, 256] and a multiple of 8; producers shrink, consumers grow. Takes effect only under a
 * register cap at entry (__launch_bounds__(threads, 1)). */
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: N in [24, 256], a multiple of 8");
#if FH_SM90A_DEVICE
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#elif FH_SM90_OTHER_DEVICE
  __trap();
#elif !defined(__CUDACC__)
  ::fh_emu::sm90_setmaxnreg(N, true);
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: N in [24, 256], a multiple of 8");
#if FH_SM90A_DEVICE
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#elif FH_SM90_OTHER_DEVICE
  __trap();
#elif !defined(__CUDACC__)
  ::fh_emu::sm90_setmaxnreg(N, false);
#endif
}

/* ---- clusters (PTX ISA, special registers %cluster_ctarank and %cluster_nctarank; "mapa") ---- */
__device__ __forceinline__ uint32_t cluster_ctarank() {
#if FH_SM90_DEVICE
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
#elif FH_SM80_ONLY_DEVICE
  __trap();
  return 0;
#elif !defined(__CUDACC__)
  return ::fh_emu::sm90_cluster_ctarank();
#else
  return 0;
#endif
}
__device__ __forceinline__ uint32_t cluster_nctarank() {
#if FH_SM90_DEVICE
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(r));
  return r;
#elif FH_SM80_ONLY_DEVICE
  __trap();
  return 0;
#elif !defined(__CUDACC__)
  return ::fh_emu::sm90_cluster_nctarank();
#else
  return 1;
#endif
}
/* mapa.u64: the generic address of the same shared variable in the CTA of cluster rank `rank`
 * (distributed shared memory). */
__device__ __forceinline__ void* mapa(void* p, uint32_t rank) {
#if FH_SM90_DEVICE
  void* r;
  asm volatile("mapa.u64 %0, %1, %2;\n" : "=l"(r) : "l"(p), "r"(rank));
  return r;
#elif FH_SM80_ONLY_DEVICE
  (void)rank;
  __trap();
  return p;
#elif !defined(__CUDACC__)
  return ::fh_emu::sm90_mapa(p, rank);
#else
  (void)rank;
  return p;
#endif
}

/* mbarrier.arrive.shared::cluster.b64 on the mbarrier at the same offset as `bar` in the CTA of
 * cluster rank `rank` (mapa.shared::cluster first): one arrival there, e.g. a consumer releasing
 * a slot that the CTA of that rank fills. The default semantics (release at CTA scope) is
 * enough for that: the slot's readers (wgmma) have retired, nothing is published; the
 * .release.cluster form would cost a MEMBAR.ALL.GPU per arrival (seen in the SASS). */
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t rank) {
#if FH_SM90_DEVICE
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(rank)
      : "memory");
#elif FH_SM80_ONLY_DEVICE
  (void)bar, (void)rank;
  __trap();
#elif !defined(__CUDACC__)
  ::fh_emu::sm90_mbar_arrive_cluster(bar, rank);
#endif
}

/* barrier.cluster.arrive.release / barrier.cluster.wait.acquire (PTX ISA, "barrier.cluster"):
 * the phase completes when every non-exited thread of the cluster arrived; a wait returns once
 * the phase of the thread's arrival completed. Writes before the arrive (shared memory of any
 * CTA of the cluster, mbarrier inits after fence_mbar_init) are visible after the wait. Every
 * thread of a warp calls them together (.aligned). */
__device__ __forceinline__ void cluster_arrive() {
#if FH_SM90_DEVICE
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#elif FH_SM80_ONLY_DEVICE
  __trap();
#elif !defined(__CUDACC__)
  ::fh_emu::cluster_barrier_arrive();
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if FH_SM90_DEVICE
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#elif FH_SM80_ONLY_DEVICE
  __trap();
#elif !defined(__CUDACC__)
  ::fh_emu::cluster_barrier_wait();
#endif
}
__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}

} /* namespace fh_ptx */

#endif
