/* test_cp_arrive.cu: suite emu_cp_arrive, the twin of cp.async.mbarrier.arrive.noinc
 * (tests/emu/emu_sm90.cpp, docs/hopper.md "The warp-specialized mainloop"): the ring it exists
 * for, one producer warp filling A by cp.async and B by TMA, both completing on one mbarrier per
 * slot, consumers multiplying with wgmma; then each mistake the twins must report (in a forked
 * child, expect_report). Data are multiples of 1/8: every sum is exact, results compare equal. */
#include <cuda.h>

#include "emu_test.h"
#include "emu_test_gemm.h"
#include "engine/ptx_sm90.cuh"

namespace {

constexpr int kStages = 2, kRows = 64, kRowB = 128; /* 64 rows x 64 bf16 per operand and slot */
constexpr int kSlot = 2 * kRows * kRowB;              /* A, then B */

struct Knobs {
  int full_count = 33;  /* arrivals per phase of full[s]: lane 0's expect_tx + 32 cp.async arrivals */
  int wait_full = 1;    /* the consumers wait on full[s] */
  int arrive = 1;       /* the producer lanes arrive through cp.async.mbarrier.arrive.noinc */
  int early_release = 0; /* the consumers release the slot before their wgmma retired */
};

/* Warp 0 produces (every lane: 16 chunks of A in the 128-byte swizzle, then its cp.async
 * arrival; lane 0 also B's box by TMA with expect_tx); warpgroup 1 consumes (4 wgmma m64n64k16
 * per k-block) and releases the slot on empty[s] (128 arrivals). Warps 1-3 have no work. */
__global__ void cp_ring_kernel(const uint16_t* A, const __grid_constant__ CUtensorMap tb, int K, Knobs kn,
                               float* out) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = full + kStages;
  const int tid = (int)threadIdx.x, kblocks = K / 64;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      fh_ptx::mbar_init(&full[s], (uint32_t)kn.full_count);
      fh_ptx::mbar_init(&empty[s], 128);
    }
    fh_ptx::fence_mbar_init();
  }
  __syncthreads();
  if (tid < 32) {
    for (int kb = 0; kb < kblocks; ++kb) {
      const int s = kb % kStages;
      fh_ptx::mbar_wait(&empty[s], ((uint32_t)(kb / kStages) & 1u) ^ 1u);
      unsigned char* st = smem + 1024 + s * kSlot;
      if (tid == 0) {
        fh_ptx::mbar_arrive_expect_tx(&full[s], kRows * kRowB);
        fh_ptx::tma_load_2d(st + kRows * kRowB, &tb, kb * 64, 0, &full[s]);
      }
      for (int q = 0; q < kRows * 8 / 32; ++q) {
        const int id = tid + 32 * q, r = id / 8, c = id % 8;
        fh_ptx::cp_async_16(st + r * kRowB + ((c ^ (r & 7)) << 4), A + (size_t)r * K + kb * 64 + c * 8, 16);
      }
      if (kn.arrive) fh_ptx::cp_async_mbar_arrive_noinc(&full[s]);
      else fh_ptx::mbar_arrive(&full[s]); /* arrives now, before the copies landed */
    }
    fh_ptx::cp_async_wait<0>();
    return;
  }
  if (tid < 128) return;
  const int t = tid - 128;
  float d[32];
  for (int kb = 0; kb < kblocks; ++kb) {
    const int s = kb % kStages;
    if (kn.wait_full) fh_ptx::mbar_wait(&full[s], (uint32_t)(kb / kStages) & 1u);
    fh_ptx::fence_proxy_async(); /* the cp.async bytes (generic proxy) before wgmma reads them */
    const unsigned char* st = smem + 1024 + s * kSlot;
    fh_ptx::wgmma_fence();
    for (int ks = 0; ks < 4; ++ks)
      fh_ptx::wgmma<64, true>(d, fh_ptx::make_smem_desc(st + 32 * ks, 16, 1024, fh_ptx::SWIZZLE_128B),
                              fh_ptx::make_smem_desc(st + kRows * kRowB + 32 * ks, 16, 1024, fh_ptx::SWIZZLE_128B),
                              kb > 0 || ks > 0);
    fh_ptx::wgmma_commit();
    if (kn.early_release) fh_ptx::mbar_arrive(&empty[s]);
    fh_ptx::wgmma_wait<0>();
    if (!kn.early_release) fh_ptx::mbar_arrive(&empty[s]);
  }
  if (!kn.wait_full) fh_ptx::mbar_wait(&full[(kblocks - 1) % kStages], (uint32_t)((kblocks - 1) / kStages) & 1u);
  const int w = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int i = 0; i < 32; ++i) out[(16 * w + g + 8 * (i % 4 / 2)) * 64 + 8 * (i / 4) + 2 * q + i % 2] = d[i];
}

Knobs g_kn;
int run_ring() {
  const int K = 64 * 5; /* 5 k-blocks through 2 slots: the parities flip twice */
  const std::vector<float> A = random_matrix(kRows, K, 7), B = random_matrix(kRows, K, 8);
  CUtensorMap tb;
  const cuuint64_t dim[2] = {(cuuint64_t)K, (cuuint64_t)kRows};
  const cuuint64_t stride[1] = {(cuuint64_t)K * 2};
  const cuuint32_t box[2] = {64, (cuuint32_t)kRows};
  const cuuint32_t es[2] = {1, 1};
  cr_assert_eq(cuTensorMapEncodeTiled(&tb, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, upload_bf16(B), dim, stride, box, es,
                                      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                      CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
               CUDA_SUCCESS);
  float* out = dev_alloc<float>(64 * 64);
  FH_LAUNCH(cp_ring_kernel, 1, 256, 1024 + kStages * kSlot, nullptr, upload_bf16(A), tb, K, g_kn, out);
  EMU_CHECK_LAUNCH();
  return gemm_mismatches(dev_download(out, 64 * 64), A, B, 64, 64, K);
}

} // namespace

Test(emu_cp_arrive, ring_of_cp_async_and_tma_exact) {
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    fh_emu_set_seed(seed);
    fh_emu_set_yield(seed == 2 ? 1.0 : 0.125);
    g_kn = Knobs{};
    cr_assert_eq(run_ring(), 0, "seed %d", (int)seed);
  }
}

/* The consumers skip the wait: wgmma reads A's bytes before their cp.async landed. */
static void run_no_wait() {
  fh_emu_set_yield(0.0);
  g_kn = Knobs{};
  g_kn.wait_full = 0;
  (void)run_ring();
}
Test(emu_cp_arrive, report_wgmma_reads_cp_async_in_flight) {
  expect_report(run_no_wait, {"fh_emu cp.async: read of shared bytes written by cp.async still in flight",
                              "(wgmma operand)", "cp.async.mbarrier.arrive"});
}

/* A plain mbarrier.arrive in place of the cp.async one: the phase completes while A's copies are
 * in flight, and wgmma reads them. */
static void run_plain_arrive() {
  fh_emu_set_yield(0.0);
  g_kn = Knobs{};
  g_kn.arrive = 0;
  (void)run_ring();
}
Test(emu_cp_arrive, report_plain_arrive_before_copies_land) {
  expect_report(run_plain_arrive, {"read of shared bytes written by cp.async still in flight", "(wgmma operand)"});
}

/* The init count leaves out the 32 cp.async arrivals: one of them finds the phase's count used up. */
static void run_count_too_small() {
  fh_emu_set_yield(0.0);
  g_kn = Knobs{};
  g_kn.full_count = 1;
  (void)run_ring();
}
Test(emu_cp_arrive, report_init_count_without_the_cp_async_arrivals) {
  expect_report(run_count_too_small, {"fh_emu mbarrier: arrival beyond the expected count",
                                      "cp.async.mbarrier.arrive.noinc (when its copies landed)"});
}

/* The count asks for one arrival more than the producer makes (34 for lane 0's expect_tx and the
 * 32 lanes' cp.async): the wait can never complete. */
static void run_count_too_large() {
  fh_emu_set_yield(0.0);
  g_kn = Knobs{};
  g_kn.full_count = 34;
  (void)run_ring();
}
Test(emu_cp_arrive, report_init_count_too_large_deadlocks) {
  expect_report(run_count_too_large, {"fh_emu synccheck: mbarrier wait can never complete (deadlock)",
                                      "still misses 1 of 34 arrivals"});
}

/* The consumers release the slot before wgmma.wait_group: the producer refills it while the
 * wgmma still reads it. */
static void run_early_release() {
  fh_emu_set_seed(1);
  fh_emu_set_yield(1.0);
  g_kn = Knobs{};
  g_kn.early_release = 1;
  (void)run_ring();
}
Test(emu_cp_arrive, report_slot_released_before_wgmma_retired) {
  expect_report(run_early_release, {"read of shared bytes written by cp.async still in flight", "(wgmma operand)"});
}
