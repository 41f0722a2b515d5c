/* Suite emu_ptx (counters): shared-memory bank conflicts, global sectors and the random yields of
 * the PTX twins. Each expectation is worked out by hand: bank = (byte address / 4) % 32, a
 * phase's ways = the most distinct 4-byte words in one bank; ldmatrix has one phase per 8x8
 * matrix (8 rows of 16 bytes), 16-byte st/ld.shared and cp.async one per quarter warp, 4-byte
 * accesses one per warp. */
#include "emu_test.h"
#include "engine/ptx.cuh"

/* Lane l gives row r = l % 8 of matrix m = l / 8 of a ldmatrix.x4:
 *   0: packed matrices, row at (8m + r) * 16: each matrix covers 32 consecutive words, 1-way;
 *   1: a 8 x 64-byte tile (32 bf16 per row, unpadded), matrix m = 16-byte chunk m of each row:
 *      row r's words are 16r + 4m .. +3, so rows 0,2,4,6 share banks 4m..4m+3 and rows 1,3,5,7
 *      banks 16+4m..: 4 distinct words per bank, 4-way;
 *   2: the same tile with chunk' = chunk ^ ((row >> 1) & 3): rows 2j, 2j+1 get chunks
 *      m ^ j, 16 words apart, and j = 0..3 spread them over all 32 banks: 1-way. */
__global__ void ldsm_pattern_kernel(int pattern, uint32_t* sink) {
  FH_DYNAMIC_SMEM(unsigned char, s);
  const int l = threadIdx.x, m = l / 8, r = l % 8;
  const int off = pattern == 0 ? (8 * m + r) * 16 : pattern == 1 ? r * 64 + m * 16 : r * 64 + ((m ^ ((r >> 1) & 3)) * 16);
  uint32_t v[4];
  fh_ptx::ldsm_x4(v, s + off);
  sink[l] = v[0] ^ v[1] ^ v[2] ^ v[3];
}

static fh_emu_counters_t run_ldsm_pattern(int pattern) {
  uint32_t* sink = dev_alloc<uint32_t>(32);
  FH_LAUNCH(ldsm_pattern_kernel, 1, 32, 512, nullptr, pattern, sink);
  EMU_CHECK_LAUNCH();
  return fh_emu_last_counters();
}

Test(emu_ptx, bank_ldmatrix_conflict_free) {
  fh_emu_counters_t c = run_ldsm_pattern(0);
  cr_expect_eq(c.smem_requests, 1u);
  cr_expect_eq(c.smem_wavefronts, 4u, "one wavefront per matrix");
  cr_expect_eq(c.bank_conflict_replays, 0u);
  cr_expect_eq(c.bank_conflict_max_ways, 1u);
}
Test(emu_ptx, bank_ldmatrix_unpadded_64_byte_rows) {
  fh_emu_counters_t c = run_ldsm_pattern(1);
  cr_expect_eq(c.bank_conflict_max_ways, 4u);
  cr_expect_eq(c.smem_wavefronts, 16u, "4 matrices x 4 ways");
  cr_expect_eq(c.bank_conflict_replays, 12u);
}
Test(emu_ptx, bank_ldmatrix_xor_swizzle) {
  fh_emu_counters_t c = run_ldsm_pattern(2);
  cr_expect_eq(c.smem_wavefronts, 4u);
  cr_expect_eq(c.bank_conflict_replays, 0u);
  cr_expect_eq(c.bank_conflict_max_ways, 1u);
}

/* 4-byte st.shared of lane l at word l * stride: stride 1 conflict-free, 2 two-way (lanes l and
 * l + 16 meet), 32 all in bank 0. Then 4-byte ld.shared of one word by every lane (broadcast:
 * 1-way) and 16-byte st.shared at l * 16 (1-way per quarter warp) and l * 32 (2-way). */
__global__ void smem_stride_kernel(int stride) {
  FH_DYNAMIC_SMEM(uint32_t, s);
  const int l = threadIdx.x;
  fh_ptx::sts_u32(s + l * stride, (uint32_t)l);
}
__global__ void smem_broadcast_kernel(uint32_t* out) {
  FH_DYNAMIC_SMEM(uint32_t, s);
  out[threadIdx.x] = fh_ptx::lds_u32(s + 5);
}
__global__ void smem_v4_kernel(int stride_bytes) {
  FH_DYNAMIC_SMEM(unsigned char, s);
  fh_ptx::sts_v4(s + threadIdx.x * stride_bytes, make_uint4(1, 2, 3, 4));
}

Test(emu_ptx, bank_st_ld_shared) {
  const struct {
    int stride;
    uint64_t ways;
  } cases[] = {{1, 1}, {2, 2}, {3, 1}, {32, 32}};
  for (const auto& k : cases) {
    FH_LAUNCH(smem_stride_kernel, 1, 32, 32 * 32 * 4, nullptr, k.stride);
    EMU_CHECK_LAUNCH();
    fh_emu_counters_t c = fh_emu_last_counters();
    cr_expect_eq(c.smem_requests, 1u);
    cr_expect_eq(c.bank_conflict_max_ways, k.ways, "stride %d: %llu ways", k.stride,
                 (unsigned long long)c.bank_conflict_max_ways);
    cr_expect_eq(c.bank_conflict_replays, k.ways - 1);
  }
  uint32_t* out = dev_alloc<uint32_t>(32);
  FH_LAUNCH(smem_broadcast_kernel, 1, 32, 64, nullptr, out);
  EMU_CHECK_LAUNCH();
  cr_expect_eq(fh_emu_last_counters().smem_wavefronts, 1u, "one word for all lanes: a broadcast");
  FH_LAUNCH(smem_v4_kernel, 1, 32, 32 * 32, nullptr, 16);
  EMU_CHECK_LAUNCH();
  fh_emu_counters_t c = fh_emu_last_counters();
  cr_expect_eq(c.smem_wavefronts, 4u, "16-byte stores: 4 quarter-warp phases");
  cr_expect_eq(c.bank_conflict_replays, 0u);
  FH_LAUNCH(smem_v4_kernel, 1, 32, 32 * 32, nullptr, 32);
  EMU_CHECK_LAUNCH();
  c = fh_emu_last_counters();
  cr_expect_eq(c.smem_wavefronts, 8u, "lanes l and l + 4 of a quarter warp share banks");
  cr_expect_eq(c.bank_conflict_max_ways, 2u);
}

/* The k-th access of each lane between two barriers is one instruction, even when the lanes run
 * at different times; a barrier closes the instruction. 64 threads: 2 warps x 3 stores. */
__global__ void smem_grouping_kernel() {
  FH_DYNAMIC_SMEM(uint32_t, s);
  const int t = threadIdx.x;
  fh_ptx::sts_u32(s + t, 1u);       /* instruction 0 of each warp: conflict-free */
  fh_ptx::sts_u32(s + 64 + t, 2u);  /* instruction 1 */
  __syncthreads();
  if (t % 32 < 16) fh_ptx::sts_u32(s + 128 + (t % 32) * 32 + t / 32, 3u); /* half warps, 16-way */
}

Test(emu_ptx, bank_grouping_per_warp_instruction) {
  fh_emu_set_yield(1.0); /* interleave lanes as much as possible: grouping must not depend on it */
  FH_LAUNCH(smem_grouping_kernel, 1, 64, (128 + 32 * 32) * 4, nullptr);
  EMU_CHECK_LAUNCH();
  fh_emu_counters_t c = fh_emu_last_counters();
  cr_expect_eq(c.smem_requests, 6u, "2 warps x 3 store instructions");
  cr_expect_eq(c.bank_conflict_max_ways, 16u);
  cr_expect_eq(c.bank_conflict_replays, 2u * 15, "the third instruction of each warp");
}

/* cp.async: lane l copies 16 bytes from g + 16 l (src-size `bytes`) to s + 16 l: one request of
 * 512 contiguous bytes = 16 sectors, and 4 conflict-free quarter-warp phases in shared memory;
 * src-size 0 reads nothing, so there is no global request. */
__global__ void cp_async_sector_kernel(const unsigned char* g, int bytes, int gstride) {
  FH_DYNAMIC_SMEM(unsigned char, s);
  const int l = threadIdx.x;
  fh_ptx::cp_async_16(s + l * 16, g + l * gstride, bytes);
  fh_ptx::cp_async_commit();
  fh_ptx::cp_async_wait<0>();
}

Test(emu_ptx, cp_async_sectors_and_banks) {
  unsigned char* g = dev_alloc<unsigned char>(32 * 128);
  FH_LAUNCH(cp_async_sector_kernel, 1, 32, 512, nullptr, g, 16, 16);
  EMU_CHECK_LAUNCH();
  fh_emu_counters_t c = fh_emu_last_counters();
  cr_expect_eq(c.global_requests, 1u);
  cr_expect_eq(c.global_sectors, 16u);
  cr_expect_eq(c.bytes_g2s, 512u);
  cr_expect_eq(c.smem_wavefronts, 4u);
  cr_expect_eq(c.bank_conflict_replays, 0u);
  FH_LAUNCH(cp_async_sector_kernel, 1, 32, 512, nullptr, g, 16, 128); /* rows 128 bytes apart */
  EMU_CHECK_LAUNCH();
  cr_expect_eq(fh_emu_last_counters().global_sectors, 32u, "one sector per lane");
  FH_LAUNCH(cp_async_sector_kernel, 1, 32, 512, nullptr, g, 0, 16);
  EMU_CHECK_LAUNCH();
  c = fh_emu_last_counters();
  cr_expect_eq(c.global_requests, 0u);
  cr_expect_eq(c.bytes_g2s, 0u);
  char buf[1024];
  cr_expect_gt(fh_emu_format_counters(&c, buf, sizeof buf), 0);
  cr_expect(std::strstr(buf, "cp_async_sector_kernel") != nullptr, "%s", buf);
}

/* ---- random yields ---- */

/* Each thread takes a ticket after two twin calls; without yields the scheduler runs thread 0
 * to its end, then thread 1, ...: tickets in thread order. Yields reorder them, reproducibly for
 * a seed. */
__global__ void ticket_kernel(unsigned* counter, unsigned* ticket) {
  FH_DYNAMIC_SMEM(uint32_t, s);
  fh_ptx::sts_u32(s + threadIdx.x, 1u);
  (void)fh_ptx::lds_u32(s + threadIdx.x);
  ticket[threadIdx.x] = atomicAdd(counter, 1u);
}

static std::vector<unsigned> tickets(double yield, uint64_t seed) {
  unsigned* counter = dev_alloc<unsigned>(1);
  unsigned* t = dev_alloc<unsigned>(64);
  cudaMemset(counter, 0, sizeof(unsigned));
  fh_emu_set_yield(yield);
  fh_emu_set_seed(seed);
  FH_LAUNCH(ticket_kernel, 1, 64, 256, nullptr, counter, t);
  EMU_CHECK_LAUNCH();
  return dev_download(t, 64);
}

Test(emu_ptx, yields_reorder_threads_reproducibly) {
  std::vector<unsigned> none = tickets(0.0, 3);
  for (unsigned i = 0; i < 64; ++i) cr_assert_eq(none[i], i, "no yields: thread order");
  std::vector<unsigned> a = tickets(0.5, 3), b = tickets(0.5, 3);
  cr_expect(a == b, "same seed, same schedule");
  cr_expect(a != none, "yields must change the interleaving");
  cr_expect_eq(fh_emu_get_yield(), 0.5);
}
