/* Suite emu_sm90: the Hopper twins (kernels/engine/ptx_sm90.cuh, tests/emu/emu_sm90*.cpp).
 * A tile kernel loads A [64 x K] and B [N x K] (bf16, K-major) with the bulk tensor copy into
 * shared memory, completing on an mbarrier, and multiplies them with wgmma; its knobs make each
 * of the mistakes the twins must catch. Data are small multiples of 1/8, so every sum is exact
 * in fp32 and results are compared for equality. Reports run in a forked child (expect_report). */
#include <cuda.h>

#include <cmath>
#include <cstdlib>

#include "emu_test.h"
#include "emu_test_gemm.h"
#include "engine/ptx_sm90.cuh"

namespace {

struct Cfg {
  int n = 64, k = 64;
  int span = 128;      /* TMA swizzle span in bytes, 0: none (8-element boxes, core-matrix layout) */
  int desc_span = -1;  /* swizzle the descriptors claim (-1: the same as span) */
  int parity = 0;      /* parity the consumers wait on */
  int extra_tx = 0;    /* bytes announced beyond the copies' (mismatch when != 0) */
  int fence = 1;       /* wgmma.fence before the first mma_async */
  int early_read = 0;  /* st.shared of an accumulator before wait_group */
  int early_write = 0; /* write an accumulator before wait_group */
  int wait = 1;        /* wgmma.wait_group 0 at the end */
  int loop = 1;        /* mbar_wait (a loop) rather than a single try_wait */
  int multicast = 0;   /* 0: plain copy; else the multicast copy with this ctaMask */
  int f16 = 0;         /* fp16 inputs instead of bf16 */
};

uint32_t span_mode(int span) {
  return span == 0 ? fh_ptx::SWIZZLE_NONE : span == 32 ? fh_ptx::SWIZZLE_32B : span == 64 ? fh_ptx::SWIZZLE_64B
                                                                                        : fh_ptx::SWIZZLE_128B;
}

size_t tile_smem(const Cfg& c) { return 1024 + (size_t)(64 + c.n) * (size_t)c.k * 2; }

/* Shared layout: mbarrier at 0, scratch at 16, A at 1024, B after A (both 1024-aligned). */
template <int N>
__global__ void tile_kernel(const __grid_constant__ CUtensorMap ta, const __grid_constant__ CUtensorMap tb, Cfg c,
                            float* out) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
  unsigned char* sA = smem + 1024;
  unsigned char* sB = sA + 128 * c.k;
  const int tid = threadIdx.x;
  const int box_k = c.span ? c.span / 2 : 8; /* elements of K per box */
  if (tid == 0) {
    fh_ptx::mbar_init(bar, 1);
    fh_ptx::fence_mbar_init();
  }
  __syncthreads();
  if (tid == 0) {
    fh_ptx::mbar_arrive_expect_tx(bar, (uint32_t)((64 + N) * c.k * 2 + c.extra_tx));
    for (int s = 0; s < c.k / box_k; ++s) {
      unsigned char* da = sA + s * 64 * box_k * 2;
      unsigned char* db = sB + s * N * box_k * 2;
      if (c.multicast) {
        fh_ptx::tma_load_2d_multicast(da, &ta, s * box_k, 0, bar, (uint16_t)c.multicast);
        fh_ptx::tma_load_2d_multicast(db, &tb, s * box_k, 0, bar, (uint16_t)c.multicast);
      } else {
        fh_ptx::tma_load_2d(da, &ta, s * box_k, 0, bar);
        fh_ptx::tma_load_2d(db, &tb, s * box_k, 0, bar);
      }
    }
  }
  if (c.loop) fh_ptx::mbar_wait(bar, (uint32_t)c.parity);
  else (void)fh_ptx::mbar_try_wait(bar, (uint32_t)c.parity); /* the mistake: no retry loop */
  float d[N / 2];
  if (c.fence) fh_ptx::wgmma_fence();
  const int dspan = c.desc_span < 0 ? c.span : c.desc_span;
  const fh_ptx::Swizzle mode = (fh_ptx::Swizzle)span_mode(dspan);
  for (int ks = 0; ks < c.k / 16; ++ks) {
    uint64_t da, db;
    if (c.span) { /* one box per span/2 of K; a k-step moves the start by 32 bytes inside it */
      const int chunk = ks * 16 / box_k, inner = (ks * 32) % c.span;
      da = fh_ptx::make_smem_desc(sA + chunk * 64 * c.span + inner, 16, 8 * dspan, mode);
      db = fh_ptx::make_smem_desc(sB + chunk * N * c.span + inner, 16, 8 * dspan, mode);
    } else { /* core matrices: 8 rows of 16 bytes, 128 bytes apart down M/N, one box per 8 of K */
      da = fh_ptx::make_smem_desc(sA + 2 * ks * 64 * 16, 64 * 16, 128, mode);
      db = fh_ptx::make_smem_desc(sB + 2 * ks * N * 16, N * 16, 128, mode);
    }
    if (c.f16) fh_ptx::wgmma<N, false>(d, da, db, ks > 0);
    else fh_ptx::wgmma<N, true>(d, da, db, ks > 0);
  }
  fh_ptx::wgmma_commit();
  if (c.early_read) {
    uint32_t bits;
    std::memcpy(&bits, &d[0], 4);
    fh_ptx::sts_u32(smem + 16 + 4 * tid, bits);
  }
  if (c.early_write) d[1] = 0.0f;
  if (c.wait) fh_ptx::wgmma_wait<0>();
  const int w = tid / 32, g = (tid % 32) / 4, q = tid % 4;
  for (int i = 0; i < N / 2; ++i) {
    const int j = i / 4, r = i % 4;
    out[(16 * w + g + 8 * (r / 2)) * N + 8 * j + 2 * q + r % 2] = d[i];
  }
}

CUtensorMap make_map(uint16_t* g, int rows_global, int k, int box_rows, int span, bool f16 = false) {
  alignas(64) CUtensorMap m;
  const cuuint64_t dim[2] = {(cuuint64_t)k, (cuuint64_t)rows_global};
  const cuuint64_t stride[1] = {(cuuint64_t)k * 2};
  const cuuint32_t box[2] = {(cuuint32_t)(span ? span / 2 : 8), (cuuint32_t)box_rows};
  const cuuint32_t es[2] = {1, 1};
  const CUtensorMapSwizzle sw = span == 0 ? CU_TENSOR_MAP_SWIZZLE_NONE : span == 32 ? CU_TENSOR_MAP_SWIZZLE_32B
                                : span == 64 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_128B;
  cr_assert_eq(cuTensorMapEncodeTiled(&m, f16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, g,
                                      dim, stride, box, es,
                                      CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
               CUDA_SUCCESS);
  return m;
}

Cfg g_cfg;
int g_a_rows = 64; /* rows of A in global memory (< 64: the box reads past the end, zero fill) */

/* Runs the tile kernel with g_cfg; returns the number of outputs that differ from A * B^T. */
int run_tile() {
  const Cfg c = g_cfg;
  const std::vector<float> A = random_matrix(g_a_rows, c.k, 1), B = random_matrix(c.n, c.k, 2);
  uint16_t* dA = upload_bf16(A, c.f16);
  uint16_t* dB = upload_bf16(B, c.f16);
  const CUtensorMap ta = make_map(dA, g_a_rows, c.k, 64, c.span, c.f16),
                    tb = make_map(dB, c.n, c.k, c.n, c.span, c.f16);
  float* out = dev_alloc<float>((size_t)64 * c.n);
  const size_t smem = tile_smem(c);
  if (c.n == 64) {
    auto tile64 = tile_kernel<64>;
    FH_LAUNCH(tile64, 1, 128, smem, nullptr, ta, tb, c, out);
  } else if (c.n == 128) {
    auto tile128 = tile_kernel<128>;
    FH_LAUNCH(tile128, 1, 128, smem, nullptr, ta, tb, c, out);
  } else {
    auto tile256 = tile_kernel<256>;
    cudaFuncSetAttribute(tile256, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    FH_LAUNCH(tile256, 1, 128, smem, nullptr, ta, tb, c, out);
  }
  EMU_CHECK_LAUNCH();
  const std::vector<float> h = dev_download(out, (size_t)64 * c.n);
  int bad = 0;
  for (int m = 0; m < 64; ++m)
    for (int n = 0; n < c.n; ++n) {
      float ref = 0.0f;
      for (int kk = 0; kk < c.k; ++kk) ref += (m < g_a_rows ? A[(size_t)m * c.k + kk] : 0.0f) * B[(size_t)n * c.k + kk];
      bad += !(h[(size_t)m * c.n + n] == ref);
    }
  return bad;
}

void run_tile_void() { (void)run_tile(); }

void check_exact(int n, int k, int span) {
  g_cfg = Cfg{};
  g_cfg.n = n;
  g_cfg.k = k;
  g_cfg.span = span;
  cr_assert_eq(run_tile(), 0, "m64n%dk16 x %d, swizzle %d B: results differ from A * B^T", n, k / 16, span);
}

} // namespace

/* ---- correct use: exact results for every swizzle mode and N ---- */
Test(emu_sm90, wgmma_tma_no_swizzle_n64) { check_exact(64, 32, 0); }
Test(emu_sm90, wgmma_tma_swizzle32_n128) { check_exact(128, 16, 32); }
Test(emu_sm90, wgmma_tma_swizzle64_n128) { check_exact(128, 64, 64); }
Test(emu_sm90, wgmma_tma_swizzle128_n256) { check_exact(256, 64, 128); }
Test(emu_sm90, wgmma_tma_swizzle128_n64_k128) { check_exact(64, 128, 128); }
Test(emu_sm90, wgmma_f16_swizzle128_n128) {
  g_cfg = Cfg{};
  g_cfg.n = 128;
  g_cfg.f16 = 1;
  cr_assert_eq(run_tile(), 0);
}

/* wait_group N retires all but the newest N groups: with two groups in flight, wait_group 1
 * hands back the first group's accumulators and leaves the second's poisoned. Operands of ones
 * written by ordinary stores (then fence.proxy.async and a barrier), so D = 16 everywhere. */
__global__ void two_groups_kernel(uint32_t* out) {
  FH_DYNAMIC_SMEM(uint16_t, sm);
  for (int i = threadIdx.x; i < 2 * 64 * 16; i += blockDim.x) sm[i] = 0x3f80; /* bf16 1.0 */
  fh_ptx::fence_proxy_async();
  __syncthreads();
  const uint64_t da = fh_ptx::make_smem_desc(sm, 1024, 128, fh_ptx::SWIZZLE_NONE);
  const uint64_t db = fh_ptx::make_smem_desc(sm + 64 * 16, 1024, 128, fh_ptx::SWIZZLE_NONE);
  float d0[32], d1[32];
  fh_ptx::wgmma_fence();
  fh_ptx::wgmma<64, true>(d0, da, db, 0);
  fh_ptx::wgmma_commit();
  fh_ptx::wgmma<64, true>(d1, da, db, 0);
  fh_ptx::wgmma_commit();
  fh_ptx::wgmma_wait<1>();
  uint32_t b0, b1;
  std::memcpy(&b0, &d0[5], 4);
  std::memcpy(&b1, &d1[5], 4);
  fh_ptx::wgmma_wait<0>();
  uint32_t b2;
  std::memcpy(&b2, &d1[5], 4);
  if (threadIdx.x == 0) {
    out[0] = b0;
    out[1] = b1;
    out[2] = b2;
  }
}
Test(emu_sm90, wait_group_retires_all_but_newest_n) {
  uint32_t* out = dev_alloc<uint32_t>(3);
  FH_LAUNCH(two_groups_kernel, 1, 128, 2 * 64 * 16 * 2, nullptr, out);
  EMU_CHECK_LAUNCH();
  const std::vector<uint32_t> h = dev_download(out, 3);
  const float sixteen = 16.0f;
  uint32_t b16;
  std::memcpy(&b16, &sixteen, 4);
  cr_assert_eq(h[0], b16, "first group retired by wait_group 1");
  cr_assert_eq(h[1], fh_emu::kAccPoison, "second group still in flight after wait_group 1");
  cr_assert_eq(h[2], b16, "second group retired by wait_group 0");
}
/* Several seeds: the copies land at other points, the results must not change. */
Test(emu_sm90, results_do_not_depend_on_landing_order) {
  for (uint64_t seed = 1; seed <= 4; ++seed) {
    fh_emu_set_seed(seed);
    fh_emu_set_yield(seed % 2 ? 1.0 : 0.125);
    check_exact(64, 128, 128);
  }
}
/* A box that reaches past the tensor's last row: the rows outside are zero-filled. */
Test(emu_sm90, tma_out_of_bounds_rows_zero_filled) {
  g_cfg = Cfg{};
  g_a_rows = 40;
  cr_assert_eq(run_tile(), 0);
}
Test(emu_sm90, tma_multicast_to_own_cta) {
  g_cfg = Cfg{};
  g_cfg.multicast = 1;
  cr_assert_eq(run_tile(), 0);
}

/* ---- wrong swizzle vs layout: the twin decodes exactly, so the numbers come out wrong ---- */
Test(emu_sm90, wrong_descriptor_swizzle_gives_wrong_results) {
  /* {TMA swizzle, descriptor swizzle}: descriptors never claiming a wider pattern than the data,
   * so every address stays inside the stages (else the twin reports an operand out of range). */
  const int cases[][2] = {{128, 64}, {128, 32}, {64, 32}, {128, 0}, {64, 0}, {0, 128}};
  for (const auto& cs : cases) {
    g_cfg = Cfg{};
    g_cfg.span = cs[0];
    g_cfg.k = cs[0] ? cs[0] / 2 : 32;
    g_cfg.desc_span = cs[1];
    const int bad = run_tile();
    cr_assert_gt(bad, 0, "TMA swizzle %d B read with descriptor swizzle %d B gave the right result", cs[0], cs[1]);
  }
}

/* ---- mistakes the twins report ---- */
static void run_wrong_parity() { g_cfg = Cfg{}; g_cfg.parity = 1; run_tile_void(); }
Test(emu_sm90, report_wait_on_wrong_parity) {
  expect_report(run_wrong_parity, {"fh_emu cp.async.bulk: read of shared bytes a bulk tensor copy (TMA) has not landed yet",
                                   "(wgmma operand", "try_wait.parity 0 first"});
}
static void run_single_try_wait() { g_cfg = Cfg{}; g_cfg.loop = 0; run_tile_void(); }
Test(emu_sm90, report_try_wait_without_retry_loop) {
  expect_report(run_single_try_wait, {"bulk tensor copy (TMA) has not landed yet"});
}
static void run_expect_too_much() { g_cfg = Cfg{}; g_cfg.extra_tx = 256; run_tile_void(); }
Test(emu_sm90, report_expect_tx_more_than_delivered) {
  expect_report(run_expect_too_much, {"fh_emu synccheck: mbarrier wait can never complete (deadlock)",
                                      "256 transaction bytes", "expect_tx mismatch", "kernel tile64,"});
}
static void run_expect_too_little() { g_cfg = Cfg{}; g_cfg.extra_tx = -1024; run_tile_void(); }
Test(emu_sm90, report_expect_tx_less_than_delivered) {
  expect_report(run_expect_too_little, {"fh_emu mbarrier: expect_tx mismatch: more bytes completed than the phase expected"});
}
static void run_no_fence() { g_cfg = Cfg{}; g_cfg.fence = 0; run_tile_void(); }
Test(emu_sm90, report_mma_async_without_fence) {
  expect_report(run_no_fence, {"wgmma.mma_async without wgmma.fence", "the start of the kernel"});
}
static void run_early_read() { g_cfg = Cfg{}; g_cfg.early_read = 1; run_tile_void(); }
Test(emu_sm90, report_accumulator_read_before_wait_group) {
  expect_report(run_early_read, {"accumulator read before wgmma.wait_group", "st.shared stores 0x7fbadbad"});
}
static void run_early_write() { g_cfg = Cfg{}; g_cfg.early_write = 1; run_tile_void(); }
Test(emu_sm90, report_accumulator_written_while_in_flight) {
  expect_report(run_early_write, {"accumulator written while its wgmma was in flight", "register 1"});
}
static void run_no_wait() { g_cfg = Cfg{}; g_cfg.wait = 0; run_tile_void(); }
Test(emu_sm90, report_wgmma_never_waited) {
  expect_report(run_no_wait, {"wgmma.mma_async still in flight when the thread exited", "in commit group 0"});
}
static void run_bad_multicast() { g_cfg = Cfg{}; g_cfg.multicast = 3; run_tile_void(); }
Test(emu_sm90, report_multicast_outside_cluster) {
  expect_report(run_bad_multicast, {"invalid multicast mask", "ctaMask 0x0003"});
}

/* Without the accumulators: the results a kernel without wait shows (poison = NaN). */
Test(emu_sm90, poisoned_accumulators_read_as_nan) {
  float f;
  std::memcpy(&f, &fh_emu::kAccPoison, 4);
  cr_assert(std::isnan(f));
  cr_assert(fh_emu::sm90_is_poison(fh_emu::kAccPoison | 0x00400000u)); /* quieted by arithmetic */
}

/* ---- the planned mainloop's shape: producer warpgroup, consumer warpgroup, a 2-stage ring ----
 * full[s]: one arrival (the producer's expect_tx) + the copies' bytes; empty[s]: 128 consumer
 * arrivals. The producer waits on empty with the flipped parity (the first pass returns at once),
 * the consumers on full with the ring's parity, which flips each time the ring wraps. */
constexpr int kStages = 2, kStageBytes = 2 * 64 * 64 * 2;
__global__ void pipe_kernel(const __grid_constant__ CUtensorMap ta, const __grid_constant__ CUtensorMap tb,
                            int kblocks, int skip_empty_wait, float* out) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = full + kStages;
  const int tid = threadIdx.x;
  if (tid == 0)
    for (int s = 0; s < kStages; ++s) {
      fh_ptx::mbar_init(&full[s], 1);
      fh_ptx::mbar_init(&empty[s], 128);
    }
  __syncthreads();
  if (tid < 128) {
    if (tid == 0)
      for (int kb = 0; kb < kblocks; ++kb) {
        const int s = kb % kStages;
        const uint32_t ph = (uint32_t)(kb / kStages) & 1;
        if (!skip_empty_wait) fh_ptx::mbar_wait(&empty[s], ph ^ 1);
        unsigned char* st = smem + 1024 + s * kStageBytes;
        fh_ptx::mbar_arrive_expect_tx(&full[s], kStageBytes);
        fh_ptx::tma_load_2d(st, &ta, kb * 64, 0, &full[s]);
        fh_ptx::tma_load_2d(st + kStageBytes / 2, &tb, kb * 64, 0, &full[s]);
      }
    return;
  }
  const int t = tid - 128;
  float d[32];
  for (int kb = 0; kb < kblocks; ++kb) {
    const int s = kb % kStages;
    fh_ptx::mbar_wait(&full[s], (uint32_t)(kb / kStages) & 1);
    const unsigned char* st = smem + 1024 + s * kStageBytes;
    fh_ptx::wgmma_fence();
    for (int ks = 0; ks < 4; ++ks)
      fh_ptx::wgmma<64, true>(d, fh_ptx::make_smem_desc(st + 32 * ks, 16, 1024, fh_ptx::SWIZZLE_128B),
                              fh_ptx::make_smem_desc(st + kStageBytes / 2 + 32 * ks, 16, 1024, fh_ptx::SWIZZLE_128B),
                              kb > 0 || ks > 0);
    fh_ptx::wgmma_commit();
    fh_ptx::wgmma_wait<0>();
    fh_ptx::mbar_arrive(&empty[s]); /* the stage may be refilled */
  }
  const int w = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int i = 0; i < 32; ++i) out[(16 * w + g + 8 * (i % 4 / 2)) * 64 + 8 * (i / 4) + 2 * q + i % 2] = d[i];
}

static int g_skip_empty = 0;
static int run_pipe() {
  const int k = 64 * 5; /* 5 k-blocks through 2 stages: the parities flip twice */
  const std::vector<float> A = random_matrix(64, k, 3), B = random_matrix(64, k, 4);
  const CUtensorMap ta = make_map(upload_bf16(A), 64, k, 64, 128), tb = make_map(upload_bf16(B), 64, k, 64, 128);
  float* out = dev_alloc<float>(64 * 64);
  FH_LAUNCH(pipe_kernel, 1, 256, 1024 + kStages * kStageBytes, nullptr, ta, tb, k / 64, g_skip_empty, out);
  EMU_CHECK_LAUNCH();
  return gemm_mismatches(dev_download(out, 64 * 64), A, B, 64, 64, k);
}
Test(emu_sm90, producer_consumer_ring_exact) {
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    fh_emu_set_seed(seed);
    fh_emu_set_yield(seed == 2 ? 1.0 : 0.125);
    cr_assert_eq(run_pipe(), 0, "seed %d", (int)seed);
  }
}
static void run_pipe_skip_empty() {
  fh_emu_set_yield(0.0); /* the producer runs ahead until it blocks: a fixed, simple schedule */
  g_skip_empty = 1;
  (void)run_pipe();
}
Test(emu_sm90, report_producer_refills_stage_without_waiting) {
  expect_report(run_pipe_skip_empty, {"fh_emu mbarrier: arrival beyond the expected count", "pipe_kernel",
                                      "mbarrier.arrive.expect_tx on the mbarrier at bytes 0-7"});
}

/* st.shared into a stage whose copy has not landed: the async proxy may write it at any time. */
__global__ void store_in_flight_kernel(const __grid_constant__ CUtensorMap ta) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
  if (threadIdx.x == 0) {
    fh_ptx::mbar_init(bar, 1);
    fh_ptx::mbar_arrive_expect_tx(bar, 64 * 128);
    fh_ptx::tma_load_2d(smem + 1024, &ta, 0, 0, bar);
    fh_ptx::sts_u32(smem + 1024 + 4 * 40, 0u);
    fh_ptx::mbar_wait(bar, 0);
  }
}
static void run_store_in_flight() {
  const CUtensorMap ta = make_map(upload_bf16(random_matrix(64, 64, 5)), 64, 64, 64, 128);
  FH_LAUNCH(store_in_flight_kernel, 1, 32, 1024 + 8192, nullptr, ta);
}
Test(emu_sm90, report_store_into_stage_in_flight) {
  expect_report(run_store_in_flight, {"write of shared bytes a bulk tensor copy (TMA) has not landed yet",
                                      "bytes 1184-1187 of dynamic shared memory (st.shared)"});
}

/* ---- mbarrier alone: phases, parity, arrival counts ---- */
__global__ void phases_kernel(int arrivals_per_phase, int phases, int* out) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
  if (threadIdx.x == 0) fh_ptx::mbar_init(bar, (uint32_t)arrivals_per_phase);
  __syncthreads();
  /* Threads 0..arrivals-1 arrive once per phase, everyone waits for each phase in turn. */
  for (int p = 0; p < phases; ++p) {
    if ((int)threadIdx.x < arrivals_per_phase) fh_ptx::mbar_arrive(bar);
    fh_ptx::mbar_wait(bar, (uint32_t)(p & 1));
    __syncthreads(); /* nobody arrives for phase p + 1 before all saw phase p complete */
  }
  if (threadIdx.x == 0) *out = 1;
}
static int* g_flag;
static void run_phases_missing_arrival() { FH_LAUNCH(phases_kernel, 1, 64, 64, nullptr, 65, 2, g_flag); }
Test(emu_sm90, mbarrier_phases_complete_in_turn) {
  int* flag = dev_alloc<int>(1);
  for (int yield = 0; yield < 2; ++yield) {
    fh_emu_set_yield(yield ? 1.0 : 0.0);
    cudaMemset(flag, 0, 4);
    FH_LAUNCH(phases_kernel, 2, 64, 64, nullptr, 48, 5, flag);
    EMU_CHECK_LAUNCH();
    cr_assert_eq(dev_download(flag, 1)[0], 1);
  }
}
Test(emu_sm90, report_mbarrier_missing_arrival_deadlock) {
  g_flag = dev_alloc<int>(1);
  expect_report(run_phases_missing_arrival,
                {"mbarrier wait can never complete (deadlock)", "misses 1 of 65 arrivals", "threads 0-63 wait"});
}

/* ---- clusters of one CTA ---- */
__global__ void cluster_kernel(uint32_t* out, uint32_t rank) {
  FH_DYNAMIC_SMEM(uint32_t, smem);
  smem[threadIdx.x] = threadIdx.x;
  void* peer = fh_ptx::mapa(smem + threadIdx.x, rank);
  out[threadIdx.x] = fh_ptx::cluster_ctarank() * 1000 + fh_ptx::cluster_nctarank() * 100 +
                     (peer == (void*)(smem + threadIdx.x) ? 1 : 0);
}
static void run_mapa_rank1() { FH_LAUNCH(cluster_kernel, 1, 32, 128, nullptr, dev_alloc<uint32_t>(32), 1u); }
Test(emu_sm90, cluster_of_one_cta) {
  uint32_t* out = dev_alloc<uint32_t>(32);
  FH_LAUNCH(cluster_kernel, 1, 32, 128, nullptr, out, 0u);
  EMU_CHECK_LAUNCH();
  for (uint32_t v : dev_download(out, 32)) cr_assert_eq(v, 101u);
}
Test(emu_sm90, report_mapa_outside_cluster) {
  expect_report(run_mapa_rank1, {"mapa to a CTA outside the cluster", "rank 1"});
}

/* ---- the tensor map: the driver's documented checks ---- */
static CUresult encode(void* addr, cuuint64_t d0, cuuint64_t d1, cuuint64_t stride, cuuint32_t b0, cuuint32_t b1,
                       CUtensorMapSwizzle sw) {
  alignas(64) CUtensorMap m;
  const cuuint64_t dim[2] = {d0, d1}, st[1] = {stride};
  const cuuint32_t box[2] = {b0, b1}, es[2] = {1, 1};
  return cuTensorMapEncodeTiled(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, addr, dim, st, box, es,
                                CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}
Test(emu_sm90, tensor_map_validation) {
  unsigned char* g = dev_alloc<unsigned char>(1 << 16);
  cr_assert_eq(encode(g, 64, 64, 128, 64, 64, CU_TENSOR_MAP_SWIZZLE_128B), CUDA_SUCCESS);
  cr_assert_eq(encode(g + 8, 64, 64, 128, 64, 64, CU_TENSOR_MAP_SWIZZLE_128B), CUDA_ERROR_INVALID_VALUE,
               "global address not 16-byte aligned");
  cr_assert_eq(encode(g, 60, 64, 120, 56, 64, CU_TENSOR_MAP_SWIZZLE_128B), CUDA_ERROR_INVALID_VALUE,
               "stride not a multiple of 16");
  cr_assert_eq(encode(g, 64, 64, 64, 64, 64, CU_TENSOR_MAP_SWIZZLE_128B), CUDA_ERROR_INVALID_VALUE,
               "stride below a row");
  cr_assert_eq(encode(g, 64, 512, 128, 64, 512, CU_TENSOR_MAP_SWIZZLE_NONE), CUDA_ERROR_INVALID_VALUE, "box > 256");
  cr_assert_eq(encode(g, 64, 64, 128, 4, 64, CU_TENSOR_MAP_SWIZZLE_NONE), CUDA_ERROR_INVALID_VALUE,
               "inner box of 8 bytes");
  cr_assert_eq(encode(g, 64, 64, 128, 64, 64, CU_TENSOR_MAP_SWIZZLE_64B), CUDA_ERROR_INVALID_VALUE,
               "128-byte inner box with a 64-byte swizzle");
  cr_assert_eq(encode(g, 64, 64, 128, 32, 64, CU_TENSOR_MAP_SWIZZLE_64B), CUDA_SUCCESS);
  cr_assert_eq(encode(g, 0, 64, 128, 32, 64, CU_TENSOR_MAP_SWIZZLE_64B), CUDA_ERROR_INVALID_VALUE, "zero dimension");
  alignas(64) unsigned char raw[192];
  const cuuint64_t dim[2] = {64, 64}, st[1] = {128};
  const cuuint32_t box[2] = {64, 64}, es[2] = {1, 1};
  cr_assert_eq(cuTensorMapEncodeTiled(reinterpret_cast<CUtensorMap*>(raw + 32), CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, g,
                                      dim, st, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                      CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
               CUDA_ERROR_INVALID_VALUE, "tensor map not 64-byte aligned");
}

/* mbarrier.inval (the sm_90a mainloop invalidates its ring's barriers at the end of every tile so
 * the bytes can be reused): after completed phases the object may be re-initialized and used
 * again; with a phase in progress (an arrival missing) inval is reported. */
__global__ void inval_kernel(int complete_first, int* out) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
  for (int round = 0; round < 2; ++round) {
    if (threadIdx.x == 0) fh_ptx::mbar_init(bar, 2);
    __syncthreads();
    if (threadIdx.x < (complete_first ? 2u : 1u)) fh_ptx::mbar_arrive(bar);
    if (complete_first) fh_ptx::mbar_wait(bar, 0);
    __syncthreads();
    if (threadIdx.x == 0) fh_ptx::mbar_inval(bar);
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = 1;
}
Test(emu_sm90, mbarrier_inval_then_reinit) {
  int* flag = dev_alloc<int>(1);
  cudaMemset(flag, 0, 4);
  FH_LAUNCH(inval_kernel, 1, 64, 64, nullptr, 1, flag);
  EMU_CHECK_LAUNCH();
  cr_assert_eq(dev_download(flag, 1)[0], 1);
}
static void run_inval_in_progress() {
  g_flag = dev_alloc<int>(1);
  FH_LAUNCH(inval_kernel, 1, 64, 64, nullptr, 0, g_flag);
  cudaDeviceSynchronize();
}
Test(emu_sm90, report_mbarrier_inval_with_phase_in_progress) {
  expect_report(run_inval_in_progress, {"mbarrier.inval with a phase in progress", "misses 1 of 2 arrivals"});
}

/* wgmma by a warpgroup the block does not hold whole: with 288 threads, warps 0-7 form two
 * warpgroups (a producer warp beside them is fine), warp 8 alone is not one. */
__global__ void partial_warpgroup_kernel(int from) {
  if ((int)threadIdx.x >= from) fh_ptx::wgmma_fence();
}
static void run_partial_warpgroup() { FH_LAUNCH(partial_warpgroup_kernel, 1, 288, 0, nullptr, 256); }
Test(emu_sm90, wgmma_needs_a_whole_warpgroup_not_a_whole_block) {
  FH_LAUNCH(partial_warpgroup_kernel, 1, 288, 0, nullptr, 288); /* nobody calls it */
  EMU_CHECK_LAUNCH();
  expect_report(run_partial_warpgroup, {"fh_emu ptx: wgmma outside a full warpgroup", "thread 256",
                                        "warpgroup 2 (threads 256-383) is not whole"});
}

/* st.shared into a wgmma's operand between mma_async and the wait_group that retires it. */
__global__ void operand_write_kernel(int write) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  for (int i = (int)threadIdx.x; i < 1024; i += 128) fh_ptx::sts_u32(smem + 4 * i, 0x3e003e00u);
  __syncthreads();
  fh_ptx::fence_proxy_async();
  float d[32];
  fh_ptx::wgmma_fence();
  fh_ptx::wgmma_zero<64, true>(d, fh_ptx::make_smem_desc(smem, 128, 256, fh_ptx::SWIZZLE_NONE),
                               fh_ptx::make_smem_desc(smem + 2048, 128, 256, fh_ptx::SWIZZLE_NONE));
  fh_ptx::wgmma_commit();
  if (write && threadIdx.x == 0) fh_ptx::sts_u32(smem + 2048 + 64, 0u);
  fh_ptx::wgmma_wait<0>();
  fh_ptx::wgmma_fence_operand(d);
}
static void run_operand_write() { FH_LAUNCH(operand_write_kernel, 1, 128, 4096, nullptr, 1); }
Test(emu_sm90, report_operand_written_while_in_flight) {
  FH_LAUNCH(operand_write_kernel, 1, 128, 4096, nullptr, 0);
  EMU_CHECK_LAUNCH();
  expect_report(run_operand_write, {"fh_emu ptx: wgmma operand changed while in flight", "commit group 0"});
}

/* st.shared operands read by wgmma: the async proxy sees them after a fence.proxy.async by the
 * reading threads after the barrier (mode 1) or by the writing threads before it (mode 2), and
 * not at all without one (mode 0, a report). */
__global__ void proxy_fence_kernel(int mode) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  for (int i = (int)threadIdx.x; i < 1024; i += 128) fh_ptx::sts_u32(smem + 4 * i, 0x3e003e00u);
  if (mode == 2) fh_ptx::fence_proxy_async();
  __syncthreads();
  if (mode == 1) fh_ptx::fence_proxy_async();
  float d[32];
  fh_ptx::wgmma_fence();
  fh_ptx::wgmma_zero<64, true>(d, fh_ptx::make_smem_desc(smem, 128, 256, fh_ptx::SWIZZLE_NONE),
                               fh_ptx::make_smem_desc(smem + 2048, 128, 256, fh_ptx::SWIZZLE_NONE));
  fh_ptx::wgmma_commit();
  fh_ptx::wgmma_wait<0>();
  fh_ptx::wgmma_fence_operand(d);
}
static void run_proxy_unfenced() { FH_LAUNCH(proxy_fence_kernel, 1, 128, 4096, nullptr, 0); }
Test(emu_sm90, report_generic_write_read_by_wgmma_without_proxy_fence) {
  for (int mode = 1; mode <= 2; ++mode) {
    FH_LAUNCH(proxy_fence_kernel, 1, 128, 4096, nullptr, mode);
    EMU_CHECK_LAUNCH();
  }
  expect_report(run_proxy_unfenced, {"fh_emu ptx: async-proxy read of a generic-proxy write without fence.proxy.async",
                                     "wgmma operand A reads bytes", "(st.shared)"});
}
