/* test_named_bar.cu: suite emu_named_bar, the twin of bar.sync / bar.arrive with a thread count
 * (tests/emu/emu_named_bar.cpp, docs/hopper.md "Named barriers"): the warp-specialized pattern it
 * exists for, then each mistake it must report (in a forked child, expect_report). */
#include "emu_test.h"
#include "engine/ptx.cuh"

namespace {

/* One producer warpgroup (threads 0-127) and two consumer warpgroups (128-383), as a
 * warp-specialized kernel has them. The producer fills a 2-slot ring in shared memory, one slot
 * per round, and signals it with bar.arrive on barrier 1 + slot; the consumers bar.sync on it,
 * read, and release the slot with bar.arrive on barrier 3 + slot, which the producer bar.syncs on
 * before it refills the slot two rounds later. Between rounds the consumers alone exchange values
 * through barrier 5 (256 threads), while the producer runs ahead or has exited: a __syncthreads
 * there would need the producer. */
constexpr int kProducer = 128, kConsumers = 256, kAll = kProducer + kConsumers;

__global__ void ring_kernel(int* out, int rounds) {
  FH_DYNAMIC_SMEM(int, sm); /* slots 0 and 1 of kConsumers ints, then the exchange */
  const int tid = (int)threadIdx.x;
  if (tid < kProducer) {
    for (int r = 0; r < rounds; ++r) {
      int* slot = sm + (r & 1) * kConsumers;
      if (r >= 2) fh_ptx::bar_sync(3 + (r & 1), kAll); /* the consumers released round r - 2 */
      slot[tid] = r * 1000 + tid;
      slot[tid + kProducer] = r * 1000 + tid + kProducer;
      fh_ptx::bar_arrive(1 + (r & 1), kAll); /* round r is in the slot */
    }
    return; /* the producer exits while the consumers still synchronize among themselves */
  }
  const int c = tid - kProducer;
  int* x = sm + 2 * kConsumers;
  int acc = 0;
  for (int r = 0; r < rounds; ++r) {
    const int* slot = sm + (r & 1) * kConsumers;
    fh_ptx::bar_sync(1 + (r & 1), kAll);
    const int v = slot[(c + 1) % kConsumers];
    if (r + 2 < rounds) fh_ptx::bar_arrive(3 + (r & 1), kAll); /* the slot may be refilled */
    x[c] = v;
    fh_ptx::bar_sync(5, kConsumers);
    acc += x[(c + 7) % kConsumers];
    fh_ptx::bar_sync(5, kConsumers); /* every read of x done before the next round writes it */
  }
  out[blockIdx.x * kConsumers + c] = acc;
}

Test(emu_named_bar, producer_and_consumer_warpgroups) {
  const int rounds = 7;
  int* out = dev_alloc<int>(4 * kConsumers);
  fh_emu_reset_counters();
  FH_LAUNCH(ring_kernel, 4, kAll, (size_t)3 * kConsumers * sizeof(int), nullptr, out, rounds);
  EMU_CHECK_LAUNCH();
  /* Per block: 7 rounds signalled, 5 slots released (rounds 0-4, refilled at 2-6), 2 exchange
   * phases per round; no __syncthreads. */
  const fh_emu_counters_t n = fh_emu_total_counters();
  cr_expect_eq(n.named_barriers, 4u * (7 + 5 + 2 * 7), "named barrier phases: %llu", (unsigned long long)n.named_barriers);
  cr_expect_eq(n.barriers, 0u, "__syncthreads: %llu", (unsigned long long)n.barriers);
  const std::vector<int> h = dev_download(out, 4 * kConsumers);
  for (int b = 0; b < 4; ++b)
    for (int c = 0; c < kConsumers; ++c) {
      int want = 0;
      for (int r = 0; r < rounds; ++r) want += r * 1000 + ((c + 7) % kConsumers + 1) % kConsumers;
      cr_assert_eq(h[(size_t)(b * kConsumers + c)], want, "block %d consumer %d: %d, want %d", b, c, h[(size_t)(b * kConsumers + c)], want);
    }
}

/* ---- mistakes ---- */

__global__ void bar_zero_kernel() { fh_ptx::bar_sync(0, 64); }
void bar_zero() { FH_LAUNCH(bar_zero_kernel, 1, 64, 0, nullptr); }
Test(emu_named_bar, report_barrier_zero) { expect_report(bar_zero, {"invalid named barrier", "are 1-15"}); }

__global__ void bar_count_kernel() { fh_ptx::bar_sync(1, 48); }
void bar_count() { FH_LAUNCH(bar_count_kernel, 1, 64, 0, nullptr); }
Test(emu_named_bar, report_count_not_a_warp_multiple) {
  expect_report(bar_count, {"invalid named barrier thread count", "bar.sync 1, 48", "multiple of the warp size"});
}

__global__ void bar_mixed_kernel() { fh_ptx::bar_sync(2, threadIdx.x < 32 ? 64 : 96); }
void bar_mixed() { FH_LAUNCH(bar_mixed_kernel, 1, 128, 0, nullptr); }
Test(emu_named_bar, report_different_counts_in_one_phase) {
  expect_report(bar_mixed, {"named barrier arrivals with different thread counts"});
}

__global__ void bar_twice_kernel() {
  if (threadIdx.x < 32) {
    fh_ptx::bar_arrive(1, 64);
    fh_ptx::bar_arrive(1, 64); /* warp 1 has not arrived: the phase is still in flight */
  } else {
    fh_ptx::bar_sync(1, 64);
  }
}
void bar_twice() { FH_LAUNCH(bar_twice_kernel, 1, 64, 0, nullptr); }
Test(emu_named_bar, report_arrive_twice_in_one_phase) {
  expect_report(bar_twice, {"thread arrives twice at a named barrier in one phase", "bar.arrive 1, 64"});
}

/* warp 1 exits without arriving: warp 0 waits for 64 threads forever */
__global__ void bar_exit_kernel() {
  if (threadIdx.x < 32) fh_ptx::bar_sync(1, 64);
}
void bar_exit() { FH_LAUNCH(bar_exit_kernel, 1, 64, 0, nullptr); }
Test(emu_named_bar, report_deadlock_when_a_warp_exits) {
  expect_report(bar_exit, {"named barrier (bar.sync with a thread count) can never complete",
                           "threads 0-31 wait in bar.sync 1 (thread count 64", "32 arrived so far", "exited: threads 32-63"});
}

/* half of warp 1 arrives: the hardware would count the warp as 32, the twin counts threads and
 * reports (whole warps must arrive) */
__global__ void bar_partial_kernel() {
  if (threadIdx.x < 48) fh_ptx::bar_sync(1, 64);
}
void bar_partial() { FH_LAUNCH(bar_partial_kernel, 1, 64, 0, nullptr); }
Test(emu_named_bar, report_partial_warp) {
  expect_report(bar_partial, {"can never complete", "48 arrived so far", "whole warps must arrive"});
}

} // namespace

/* ---- bar.red.or: __syncthreads_or for the consumers alone ----
 * The producer warpgroup exits at once; per round, the 256 consumers OR a predicate that one of
 * them sets in even rounds and none in odd ones, and each gets the OR. */
__global__ void red_or_kernel(int* out, int rounds) {
  const int tid = (int)threadIdx.x;
  if (tid < kProducer) return;
  const int c = tid - kProducer;
  for (int r = 0; r < rounds; ++r) out[r * kConsumers + c] = fh_ptx::bar_red_or(2, kConsumers, r % 2 == 0 && c == (37 * r) % kConsumers);
}

Test(emu_named_bar, red_or_among_the_consumers) {
  const int rounds = 6;
  int* out = dev_alloc<int>(rounds * kConsumers);
  fh_emu_reset_counters();
  FH_LAUNCH(red_or_kernel, 1, kAll, 0, nullptr, out, rounds);
  EMU_CHECK_LAUNCH();
  const std::vector<int> h = dev_download(out, rounds * kConsumers);
  for (int r = 0; r < rounds; ++r)
    for (int c = 0; c < kConsumers; ++c)
      cr_assert_eq(h[(size_t)(r * kConsumers + c)], r % 2 == 0, "round %d consumer %d", r, c);
  cr_expect_eq(fh_emu_total_counters().named_barriers, (uint64_t)rounds);
}

/* Half the consumers reduce, the other half only synchronize, on one phase. */
__global__ void red_mixed_kernel() {
  if (threadIdx.x < 128) (void)fh_ptx::bar_red_or(3, 256, 1);
  else fh_ptx::bar_sync(3, 256);
}
void red_mixed() { FH_LAUNCH(red_mixed_kernel, 1, 256, 0, nullptr); }
Test(emu_named_bar, report_red_mixed_with_sync) {
  expect_report(red_mixed, {"bar.red mixed with bar.sync / bar.arrive in one phase", " 3, 256: thread "});
}

/* ---- bank accounting across a named barrier ----
 * The twins group a lane's n-th shared access with the n-th of its warp's other lanes, and
 * restart the counts at a barrier (a divergent access leaves them unequal). Warp 0 passes named
 * barrier 1 alone, after a store of 4 lanes, while warp 1 runs on: 256 stores, row i with lane l
 * in bank (l + i) % 32, conflict-free when grouped by i, while a lane of row i beside one of row j
 * may share a bank. Random preemption lets warp 1's lanes drift apart, so restarting their
 * counts at warp 0's barrier (they are not in it) would group rows i and j and count conflicts. */
__global__ void bank_runner_kernel(int rounds) {
  FH_DYNAMIC_SMEM(uint32_t, sm);
  const int lane = (int)threadIdx.x & 31;
  if (threadIdx.x >= 32) {
    for (int i = 0; i < 256; ++i) fh_ptx::sts_u32(sm + 64 + 32 * i + ((lane + i) & 31), (uint32_t)i);
    return;
  }
  for (int r = 0; r < rounds; ++r) {
    if (lane < 4) fh_ptx::sts_u32(sm + lane, (uint32_t)r);
    fh_ptx::bar_sync(1, 32);
    fh_ptx::sts_u32(sm + 32 + lane, (uint32_t)r);
  }
}

Test(emu_named_bar, bank_accounting_outside_the_barrier) {
  fh_emu_set_yield(0.5);
  fh_emu_reset_counters();
  FH_LAUNCH(bank_runner_kernel, 4, 64, (size_t)(64 + 32 * 256) * sizeof(uint32_t), nullptr, 64);
  EMU_CHECK_LAUNCH();
  const fh_emu_counters_t n = fh_emu_total_counters();
  cr_expect_eq(n.named_barriers, 4u * 64u);
  /* per block: warp 1's 256 one-phase stores, warp 0's 64 x 2 */
  cr_expect_eq(n.smem_wavefronts, 4u * (256u + 128u), "shared wavefronts %llu", (unsigned long long)n.smem_wavefronts);
  cr_expect_eq(n.bank_conflict_replays, 0u, "bank-conflict replays %llu (worst %llu-way)",
               (unsigned long long)n.bank_conflict_replays, (unsigned long long)n.bank_conflict_max_ways);
}
