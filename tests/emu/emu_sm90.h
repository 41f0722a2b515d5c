/* emu_sm90.h: the emulator's twins of the Hopper wrappers in kernels/engine/ptx_sm90.cuh
 * (emu_sm90.cpp: mbarrier, the bulk tensor copy, clusters; emu_sm90_tma.cpp: the tensor map and
 * the copy's data movement; emu_sm90_wgmma.cpp: wgmma). Written from the PTX ISA's documented
 * semantics and the driver's documented checks of cuTensorMapEncodeTiled; docs/hopper.md lists
 * what each twin checks. Reports go to stderr as "========= fh_emu <tool>: ..." and abort. */
#ifndef FH_EMU_SM90_H
#define FH_EMU_SM90_H

#include <cstdint>

namespace fh_emu {

enum WgmmaKind { WGMMA_BF16, WGMMA_F16 };

/* The shared-window address of p: its offset in the block's dynamic shared memory (the twins of
 * TMA and wgmma only accept operands there). */
uint32_t sm90_smem_offset(const void* p);

/* mbarrier.init: count in [1, 2^20 - 1]; bar 8-byte aligned shared memory. */
void sm90_mbar_init(void* bar, uint32_t count);
/* mbarrier.inval: no phase may be in progress; the object is forgotten. */
void sm90_mbar_inval(void* bar);
/* mbarrier.arrive[.expect_tx]: adds expect_tx bytes (0 for a plain arrive) to the phase's
 * transaction count, then one arrival. Returns a token naming the phase. */
uint64_t sm90_mbar_arrive(void* bar, uint32_t expect_tx);
/* mbarrier.try_wait.parity: true once the phase of that parity completed. When it has not, the
 * calling thread either gets false (once per wait, to exercise the caller's retry loop) or
 * sleeps until the phase completes; a wait no thread or copy can complete is a deadlock report. */
bool sm90_mbar_try_wait(void* bar, uint32_t parity);
void sm90_fence_proxy_async();
void sm90_cp_async_mbar_arrive(void* bar); /* cp.async.mbarrier.arrive.noinc */

/* cp.async.bulk.tensor.2d ... mbarrier::complete_tx::bytes [.multicast::cluster cta_mask]. */
void sm90_tma_load_2d(void* dst, const void* tmap, int32_t c0, int32_t c1, void* bar, uint16_t cta_mask,
                      bool multicast);

/* wgmma.fence / commit_group / wait_group n / mma_async m64nNk16 (f32 accumulators, K-major A
 * and B from shared memory through descriptors). */
void sm90_wgmma_fence();
void sm90_wgmma_commit();
void sm90_wgmma_wait(int n);
void sm90_wgmma(float* d, int n, uint64_t desc_a, uint64_t desc_b, int scale_d, WgmmaKind kind);

void sm90_setmaxnreg(int n, bool inc);
uint32_t sm90_cluster_ctarank();
uint32_t sm90_cluster_nctarank();
void* sm90_mapa(void* p, uint32_t rank);
/* mbarrier.arrive.shared::cluster on the mbarrier at bar's offset in rank's CTA. */
void sm90_mbar_arrive_cluster(void* bar, uint32_t rank);
/* barrier.cluster.arrive / wait (emu_cluster.cpp). */
void cluster_barrier_arrive();
void cluster_barrier_wait();

/* The accumulator poison: an in-flight wgmma's accumulator registers hold this signalling-NaN
 * pattern (quieted by arithmetic to bit 22 set; sm90_is_poison accepts both). */
constexpr uint32_t kAccPoison = 0x7fbadbadu;
inline bool sm90_is_poison(uint32_t bits) { return (bits & ~0x00400000u) == kAccPoison; }

} // namespace fh_emu

#endif
