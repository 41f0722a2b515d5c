/* Suite emu_ptx (checks): mistakes with the PTX twins the emulator must report and abort on.
 * Each runs in a forked child (expect_report) whose stderr must contain the report's kind, so a
 * test passes only when the emulator caught this mistake and not some other one. Every case is
 * also run with yields at probability 1 where the order of the threads could matter: the checks
 * are happens-before checks and must not depend on the schedule. */
#include "emu_test.h"
#include "engine/ptx.cuh"

static unsigned char* g_src; /* 4 KiB of global memory for the kernels below */

static void setup_src() {
  g_src = dev_alloc<unsigned char>(4096);
  cudaMemset(g_src, 1, 4096);
}

/* ldmatrix of a cp.async destination without any wait. */
__global__ void read_in_flight_kernel(const unsigned char* g) {
  FH_DYNAMIC_SMEM(unsigned char, s);
  const int l = threadIdx.x;
  fh_ptx::cp_async_16(s + l * 16, g + l * 16, 16);
  fh_ptx::cp_async_commit();
  uint32_t r[4];
  fh_ptx::ldsm_x4(r, s + l * 16);
}
static void run_read_in_flight() { FH_LAUNCH(read_in_flight_kernel, 1, 32, 512, nullptr, g_src); }
Test(emu_ptx, report_ldmatrix_of_cp_async_in_flight, .init = setup_src) {
  expect_report(run_read_in_flight,
                {"fh_emu cp.async: read of shared bytes written by cp.async still in flight", "in commit group 0",
                 "no cp.async.wait_group retired it", "read_in_flight_kernel", "(ldmatrix)"});
}

/* Same, but the copy was never committed, so no wait_group could have retired it. */
__global__ void read_uncommitted_kernel(const unsigned char* g, uint32_t* out) {
  FH_DYNAMIC_SMEM(uint32_t, s);
  fh_ptx::cp_async_16(s + threadIdx.x * 4, g + threadIdx.x * 16, 16);
  fh_ptx::cp_async_wait<0>(); /* waits for committed groups only */
  out[threadIdx.x] = fh_ptx::lds_u32(s + threadIdx.x * 4);
}
static void run_read_uncommitted() {
  FH_LAUNCH(read_uncommitted_kernel, 1, 32, 512, nullptr, g_src, dev_alloc<uint32_t>(32));
}
Test(emu_ptx, report_read_of_uncommitted_copy, .init = setup_src) {
  expect_report(run_read_uncommitted, {"still in flight", "has not committed it", "(ld.shared)"});
}

/* Warp 0 copies and waits, warp 1 reads the rows without the barrier after the wait. Whatever
 * the order, it is a report: in flight (read before the wait), read-after-write (after it), or
 * write-after-read (warp 1 read before warp 0 even issued). */
__global__ void missing_barrier_after_wait_kernel(const unsigned char* g, uint32_t* out) {
  FH_DYNAMIC_SMEM(unsigned char, s);
  const int warp = threadIdx.x / 32, l = threadIdx.x % 32;
  if (warp == 0) {
    fh_ptx::cp_async_16(s + l * 16, g + l * 16, 16);
    fh_ptx::cp_async_commit();
    fh_ptx::cp_async_wait<0>();
  }
  /* missing: __syncthreads(); */
  if (warp == 1) {
    uint32_t r[4];
    fh_ptx::ldsm_x4(r, s + l * 16);
    out[l] = r[0];
  }
}
static void run_missing_barrier_after_wait() {
  FH_LAUNCH(missing_barrier_after_wait_kernel, 1, 64, 512, nullptr, g_src, dev_alloc<uint32_t>(32));
}
static void run_missing_barrier_after_wait_yield() {
  fh_emu_set_yield(1.0);
  run_missing_barrier_after_wait();
}
Test(emu_ptx, report_missing_barrier_after_wait, .init = setup_src) {
  /* Threads run in order without yields: warp 0 waits before warp 1 runs. */
  fh_emu_set_yield(0.0);
  expect_report(run_missing_barrier_after_wait,
                {"fh_emu racecheck: read-after-write hazard on shared memory", "(cp.async, landed at its "
                 "cp.async.wait_group)", "(ldmatrix)", "no __syncthreads between the two accesses"});
  expect_report(run_missing_barrier_after_wait_yield, {"missing_barrier_after_wait_kernel", "========= fh_emu "});
}

/* st.shared by warp 0, ld.shared of the same word by warp 1, no barrier. */
__global__ void missing_barrier_st_ld_kernel(uint32_t* out) {
  FH_DYNAMIC_SMEM(uint32_t, s);
  const int warp = threadIdx.x / 32, l = threadIdx.x % 32;
  if (warp == 0) fh_ptx::sts_u32(s + l, (uint32_t)l);
  /* missing: __syncthreads(); */
  if (warp == 1) out[l] = fh_ptx::lds_u32(s + l);
}
static void run_missing_barrier_st_ld() { FH_LAUNCH(missing_barrier_st_ld_kernel, 1, 64, 128, nullptr, dev_alloc<uint32_t>(32)); }
static void run_missing_barrier_st_ld_yield() {
  fh_emu_set_yield(1.0);
  run_missing_barrier_st_ld();
}
Test(emu_ptx, report_missing_barrier_between_warps) {
  fh_emu_set_yield(0.0);
  expect_report(run_missing_barrier_st_ld, {"read-after-write hazard", "thread 32 (warp 1, lane 0) reads bytes 0-3",
                                            "thread 0 (warp 0, lane 0) wrote them (st.shared)"});
  expect_report(run_missing_barrier_st_ld_yield, {"fh_emu racecheck:", "hazard on shared memory"});
}

/* Write-after-read: warp 0 reads a word, warp 1 overwrites it in the same barrier interval. */
__global__ void war_kernel(uint32_t* out) {
  FH_DYNAMIC_SMEM(uint32_t, s);
  const int warp = threadIdx.x / 32, l = threadIdx.x % 32;
  if (warp == 0) out[l] = fh_ptx::lds_u32(s + l);
  if (warp == 1) fh_ptx::sts_u32(s + l, 7u); /* missing: __syncthreads() before it */
}
static void run_war() { FH_LAUNCH(war_kernel, 1, 64, 128, nullptr, dev_alloc<uint32_t>(32)); }
Test(emu_ptx, report_write_after_read) {
  fh_emu_set_yield(0.0);
  expect_report(run_war, {"fh_emu racecheck: write-after-read hazard on shared memory", "(st.shared)",
                          "thread 0 (warp 0, lane 0) read them (ld.shared)"});
}

/* Same warp: lanes store rows, then ldmatrix reads other lanes' rows with no __syncwarp. */
__global__ void same_warp_no_syncwarp_kernel(int sync) {
  FH_DYNAMIC_SMEM(uint16_t, s);
  const int l = threadIdx.x;
  fh_ptx::sts_v4(s + l * 8, make_uint4(1, 2, 3, 4));
  if (sync) __syncwarp();
  uint32_t r[4];
  fh_ptx::ldsm_x4(r, s + ((l + 1) % 32) * 8);
}
static void run_same_warp_no_syncwarp() { FH_LAUNCH(same_warp_no_syncwarp_kernel, 1, 32, 512, nullptr, 0); }
Test(emu_ptx, report_same_warp_without_syncwarp) {
  expect_report(run_same_warp_no_syncwarp,
                {"read-after-write hazard", "no __syncwarp or other warp collective of both lanes"});
  /* With the __syncwarp it is correct. */
  FH_LAUNCH(same_warp_no_syncwarp_kernel, 1, 32, 512, nullptr, 1);
  EMU_CHECK_LAUNCH();
}

/* A cp.async issued over bytes another warp reads in the same interval (a stage refilled without
 * the barrier that ends its reads): the copy may write at once, so it is a hazard at issue. */
__global__ void refill_without_barrier_kernel(const unsigned char* g) {
  FH_DYNAMIC_SMEM(unsigned char, s);
  const int warp = threadIdx.x / 32, l = threadIdx.x % 32;
  if (warp == 0) {
    uint32_t r[4];
    fh_ptx::ldsm_x4(r, s + l * 16);
  }
  if (warp == 1) {
    fh_ptx::cp_async_16(s + l * 16, g + l * 16, 16);
    fh_ptx::cp_async_commit();
    fh_ptx::cp_async_wait<0>();
  }
}
static void run_refill_without_barrier() { FH_LAUNCH(refill_without_barrier_kernel, 1, 64, 512, nullptr, g_src); }
Test(emu_ptx, report_cp_async_over_bytes_being_read, .init = setup_src) {
  fh_emu_set_yield(0.0);
  expect_report(run_refill_without_barrier, {"write-after-read hazard", "(cp.async)", "(ldmatrix)"});
}

/* Misaligned cp.async source (the hardware traps). */
__global__ void misaligned_cp_async_kernel(const unsigned char* g) {
  FH_DYNAMIC_SMEM(unsigned char, s);
  fh_ptx::cp_async_16(s + threadIdx.x * 16, g + threadIdx.x * 16 + 8, 16);
  fh_ptx::cp_async_commit();
  fh_ptx::cp_async_wait<0>();
}
static void run_misaligned_cp_async() { FH_LAUNCH(misaligned_cp_async_kernel, 1, 32, 512, nullptr, g_src); }
Test(emu_ptx, report_misaligned_cp_async, .init = setup_src) {
  expect_report(run_misaligned_cp_async,
                {"fh_emu ptx: misaligned address", "cp.async: global source", "is not 16-byte aligned"});
}

/* Misaligned ldmatrix row address of lane 3. */
__global__ void misaligned_ldsm_kernel() {
  FH_DYNAMIC_SMEM(unsigned char, s);
  const int l = threadIdx.x;
  uint32_t r[4];
  fh_ptx::ldsm_x4(r, s + l * 16 + (l == 3 ? 8 : 0));
}
static void run_misaligned_ldsm() { FH_LAUNCH(misaligned_ldsm_kernel, 1, 32, 1024, nullptr); }
Test(emu_ptx, report_misaligned_ldmatrix_row) {
  expect_report(run_misaligned_ldsm, {"misaligned address", "thread 3 (warp 0, lane 3)", "ldmatrix: row address"});
}

/* A kernel that never waits for its copies. */
__global__ void never_waits_kernel(const unsigned char* g) {
  FH_DYNAMIC_SMEM(unsigned char, s);
  fh_ptx::cp_async_16(s + threadIdx.x * 16, g + threadIdx.x * 16, 16);
  fh_ptx::cp_async_commit();
}
static void run_never_waits() { FH_LAUNCH(never_waits_kernel, 2, 32, 512, nullptr, g_src); }
Test(emu_ptx, report_copies_never_waited_for, .init = setup_src) {
  expect_report(run_never_waits, {"fh_emu cp.async: copies still in flight when the block finished",
                                  "thread 0 (warp 0, lane 0): 1 copies in flight (0 not committed)", "in commit group 0"});
}

/* Global memory passed as the ldmatrix address; swapped cp.async operands. */
__global__ void ldsm_global_kernel(const unsigned char* g) {
  uint32_t r[4];
  fh_ptx::ldsm_x4(r, g + threadIdx.x * 16);
}
static void run_ldsm_global() { FH_LAUNCH(ldsm_global_kernel, 1, 32, 0, nullptr, g_src); }
__global__ void swapped_cp_async_kernel(unsigned char* g) {
  FH_DYNAMIC_SMEM(unsigned char, s);
  fh_ptx::cp_async_16(g + threadIdx.x * 16, s + threadIdx.x * 16, 16);
}
static void run_swapped_cp_async() { FH_LAUNCH(swapped_cp_async_kernel, 1, 32, 512, nullptr, g_src); }
Test(emu_ptx, report_not_shared_memory, .init = setup_src) {
  expect_report(run_ldsm_global, {"address is not shared memory", "ldmatrix row"});
  expect_report(run_swapped_cp_async, {"address is not shared memory", "cp.async destination"});
}

/* src-size beyond cp-size, and an ldmatrix past the end of the dynamic shared memory. */
__global__ void bad_src_size_kernel(const unsigned char* g) {
  FH_DYNAMIC_SMEM(unsigned char, s);
  fh_ptx::cp_async_16(s, g, 17);
}
static void run_bad_src_size() { FH_LAUNCH(bad_src_size_kernel, 1, 1, 64, nullptr, g_src); }
__global__ void ldsm_past_end_kernel() {
  FH_DYNAMIC_SMEM(unsigned char, s);
  uint32_t r[4];
  fh_ptx::ldsm_x4(r, s + threadIdx.x * 16 + 16); /* lane 31's row starts at the end */
}
static void run_ldsm_past_end() { FH_LAUNCH(ldsm_past_end_kernel, 1, 32, 512, nullptr); }
Test(emu_ptx, report_bad_operands, .init = setup_src) {
  expect_report(run_bad_src_size, {"invalid cp.async operand", "src-size 17"});
  expect_report(run_ldsm_past_end, {"shared access out of range", "thread 31 (warp 0, lane 31)"});
}

/* ldmatrix by half a warp (.sync.aligned needs all 32 lanes). */
__global__ void half_warp_ldsm_kernel() {
  FH_DYNAMIC_SMEM(unsigned char, s);
  uint32_t r[4];
  if (threadIdx.x < 16) fh_ptx::ldsm_x4(r, s + threadIdx.x * 16);
}
static void run_half_warp_ldsm() { FH_LAUNCH(half_warp_ldsm_kernel, 1, 16, 512, nullptr); }
Test(emu_ptx, report_ldmatrix_by_partial_warp) {
  expect_report(run_half_warp_ldsm, {"invalid warp collective mask", "ldmatrix"});
}
