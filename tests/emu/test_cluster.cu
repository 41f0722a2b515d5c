/* test_cluster.cu: clusters of several CTAs in the emulator (emu_cluster.cpp and the cluster twins
 * of emu_sm90*.cpp; docs/hopper.md "Clusters in the emulator"): the launch's rules, ranks,
 * distributed shared memory, barrier.cluster, remote mbarrier arrivals and multicast bulk tensor
 * copies, each with the mistakes the twins must report. Reports run in a forked child
 * (expect_report). */
#include <cuda.h>

#include <cstring>

#include "emu_test.h"
#include "engine/ptx_sm90.cuh"

namespace {

/* ---- the launch ---- */

__global__ void rank_kernel(uint32_t* out) {
  const uint32_t b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  out[b * blockDim.x + threadIdx.x] = fh_ptx::cluster_ctarank() * 100 + fh_ptx::cluster_nctarank();
}

Test(emu_cluster, ranks_follow_the_cluster_shape) {
  /* clusters of 2 x 1: rank = blockIdx.x % 2 */
  uint32_t* out = dev_alloc<uint32_t>(8 * 32);
  FH_LAUNCH_CLUSTER(rank_kernel, dim3(4, 2), 32, dim3(2, 1, 1), 0, nullptr, out);
  EMU_CHECK_LAUNCH();
  std::vector<uint32_t> h = dev_download(out, 8 * 32);
  for (int b = 0; b < 8; ++b)
    for (int t = 0; t < 32; ++t) cr_assert_eq(h[(size_t)(b * 32 + t)], (uint32_t)((b % 4) % 2) * 100 + 2, "block %d", b);
  /* clusters of 1 x 2 x 2: rank = (y % 2) + 2 (z % 2), x fastest as %cluster_ctarank counts */
  uint32_t* out2 = dev_alloc<uint32_t>(16 * 32);
  FH_LAUNCH_CLUSTER(rank_kernel, dim3(2, 4, 2), 32, dim3(1, 2, 2), 0, nullptr, out2);
  EMU_CHECK_LAUNCH();
  h = dev_download(out2, 16 * 32);
  for (int z = 0; z < 2; ++z)
    for (int y = 0; y < 4; ++y)
      for (int x = 0; x < 2; ++x) {
        const int b = x + 2 * (y + 4 * z);
        cr_assert_eq(h[(size_t)(b * 32)], (uint32_t)((y % 2) + 2 * (z % 2)) * 100 + 4, "block (%d,%d,%d)", x, y, z);
      }
  /* without the attribute: a cluster of one CTA */
  FH_LAUNCH(rank_kernel, 2, 32, 0, nullptr, out);
  EMU_CHECK_LAUNCH();
  cr_assert_eq(dev_download(out, 64)[33], 1u);
}

Test(emu_cluster, launch_rejects_invalid_clusters) {
  uint32_t* out = dev_alloc<uint32_t>(64 * 32);
  FH_LAUNCH_CLUSTER(rank_kernel, 3, 32, dim3(2, 1, 1), 0, nullptr, out);
  cr_assert_eq(cudaGetLastError(), cudaErrorInvalidClusterSize, "a grid of 3 in clusters of 2");
  FH_LAUNCH_CLUSTER(rank_kernel, 32, 32, dim3(16, 1, 1), 0, nullptr, out);
  cr_assert_eq(cudaGetLastError(), cudaErrorInvalidClusterSize, "16 CTAs: above the portable 8");
  FH_LAUNCH_CLUSTER(rank_kernel, 4, 32, dim3(0, 1, 1), 0, nullptr, out);
  cr_assert_eq(cudaGetLastError(), cudaErrorInvalidClusterSize, "an empty cluster");
  cr_assert_str_eq(cudaGetErrorName(cudaErrorInvalidClusterSize), "cudaErrorInvalidClusterSize");
  FH_LAUNCH_CLUSTER(rank_kernel, 8, 32, dim3(8, 1, 1), 0, nullptr, out);
  EMU_CHECK_LAUNCH();
}

/* cudaOccupancyMaxActiveClusters: the SMs' CTAs grouped by the cluster size (132 SMs, one CTA of
 * 140 KiB each: 66 pairs), its argument checks, and FH_EMU_MAX_CLUSTERS, which caps the answer and
 * at 0 refuses cluster launches (the library's fallback is tested in kernel_sm90). */
static int active_clusters(dim3 cluster, size_t smem, unsigned threads, cudaError_t* err) {
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeClusterDimension;
  at[0].val.clusterDim.x = cluster.x, at[0].val.clusterDim.y = cluster.y, at[0].val.clusterDim.z = cluster.z;
  /* by position: the emulator defines gridDim and blockDim as macros */
  const cudaLaunchConfig_t cfg = {dim3(2), dim3(threads), smem, nullptr, at, 1};
  int n = -1;
  *err = cudaOccupancyMaxActiveClusters(&n, rank_kernel, &cfg);
  (void)cudaGetLastError();
  return n;
}

Test(emu_cluster, occupancy_query_and_refused_clusters) {
  unsetenv("FH_EMU_MAX_CLUSTERS");
  cudaError_t e;
  cr_assert_eq(cudaFuncSetAttribute(rank_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 140 * 1024), cudaSuccess);
  cr_assert_eq(active_clusters(dim3(2, 1, 1), 140 * 1024, 256, &e), 66);
  cr_assert_eq(e, cudaSuccess);
  cr_assert_eq(active_clusters(dim3(4, 1, 1), 1024, 256, &e), 132 * 8 / 4, "8 CTAs of 256 threads per SM");
  active_clusters(dim3(2, 1, 1), 141 * 1024, 256, &e);
  cr_assert_eq(e, cudaErrorInvalidValue, "more shared memory than the kernel's attribute allows");
  active_clusters(dim3(16, 1, 1), 1024, 256, &e);
  cr_assert_eq(e, cudaErrorInvalidClusterSize, "16 CTAs: above the portable 8");
  {
    const cudaLaunchConfig_t cfg = {dim3(2), dim3(256), 0, nullptr, nullptr, 0};
    int n = -1;
    cr_assert_eq(cudaOccupancyMaxActiveClusters(&n, rank_kernel, &cfg), cudaErrorInvalidClusterSize,
                 "no cluster size in the configuration");
    cr_assert_eq(cudaGetLastError(), cudaErrorInvalidClusterSize);
  }
  int attr = 0;
  cr_assert_eq(cudaDeviceGetAttribute(&attr, cudaDevAttrClusterLaunch, 0), cudaSuccess);
  cr_assert_eq(attr, 1);
  uint32_t* out = dev_alloc<uint32_t>(8 * 32);
  setenv("FH_EMU_MAX_CLUSTERS", "3", 1);
  cr_assert_eq(active_clusters(dim3(2, 1, 1), 1024, 256, &e), 3);
  FH_LAUNCH_CLUSTER(rank_kernel, 8, 32, dim3(2, 1, 1), 0, nullptr, out);
  EMU_CHECK_LAUNCH(); /* a cap above 0 limits residency only: the launch runs */
  setenv("FH_EMU_MAX_CLUSTERS", "0", 1);
  cr_assert_eq(active_clusters(dim3(2, 1, 1), 1024, 256, &e), 0);
  cr_assert_eq(e, cudaSuccess);
  cr_assert_eq(active_clusters(dim3(1, 1, 1), 1024, 256, &e), 132 * 8, "a cluster of one CTA is a plain block");
  FH_LAUNCH_CLUSTER(rank_kernel, 8, 32, dim3(2, 1, 1), 0, nullptr, out);
  cr_assert_eq(cudaGetLastError(), cudaErrorInvalidClusterSize, "no cluster of 2 fits: the launch fails");
  FH_LAUNCH(rank_kernel, 8, 32, 0, nullptr, out);
  EMU_CHECK_LAUNCH();
  unsetenv("FH_EMU_MAX_CLUSTERS");
}

/* ---- distributed shared memory and barrier.cluster ----
 * Every CTA writes its shared words, the cluster synchronizes, every thread reads the word of the
 * next rank through mapa, and the cluster synchronizes again before any CTA exits. */
__global__ void dsmem_kernel(uint32_t* out, int second_sync) {
  FH_DYNAMIC_SMEM(uint32_t, smem);
  const uint32_t r = fh_ptx::cluster_ctarank(), n = fh_ptx::cluster_nctarank();
  smem[threadIdx.x] = blockIdx.x * 1000 + threadIdx.x;
  fh_ptx::cluster_sync();
  const uint32_t* peer = static_cast<const uint32_t*>(fh_ptx::mapa(smem + threadIdx.x, (r + 1) % n));
  const uint32_t v = *peer;
  if (second_sync) fh_ptx::cluster_sync();
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

Test(emu_cluster, distributed_shared_memory_round_trip) {
  for (int cs : {2, 4}) {
    uint32_t* out = dev_alloc<uint32_t>(8 * 96);
    FH_LAUNCH_CLUSTER(dsmem_kernel, 8, 96, dim3((unsigned)cs, 1, 1), 96 * sizeof(uint32_t), nullptr, out, 1);
    EMU_CHECK_LAUNCH();
    std::vector<uint32_t> h = dev_download(out, 8 * 96);
    for (int b = 0; b < 8; ++b) {
      const int peer = b / cs * cs + (b % cs + 1) % cs;
      for (int t = 0; t < 96; ++t) cr_assert_eq(h[(size_t)(b * 96 + t)], (uint32_t)(peer * 1000 + t), "cluster %d block %d", cs, b);
    }
  }
}

/* A cluster of one CTA (no attribute): barrier.cluster is a barrier of the block. */
Test(emu_cluster, cluster_barrier_in_a_cluster_of_one) {
  uint32_t* out = dev_alloc<uint32_t>(2 * 64);
  FH_LAUNCH(dsmem_kernel, 2, 64, 64 * sizeof(uint32_t), nullptr, out, 1);
  EMU_CHECK_LAUNCH();
  std::vector<uint32_t> h = dev_download(out, 2 * 64);
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 64; ++t) cr_assert_eq(h[(size_t)(b * 64 + t)], (uint32_t)(b * 1000 + t));
}

__global__ void wait_only_kernel() { fh_ptx::cluster_wait(); }
static void run_wait_without_arrive() { FH_LAUNCH_CLUSTER(wait_only_kernel, 2, 32, dim3(2, 1, 1), 0, nullptr); }
Test(emu_cluster, report_wait_without_arrive) {
  expect_report(run_wait_without_arrive, {"barrier.cluster.wait without barrier.cluster.arrive"});
}

__global__ void double_arrive_kernel() {
  fh_ptx::cluster_arrive();
  fh_ptx::cluster_arrive();
}
static void run_double_arrive() { FH_LAUNCH_CLUSTER(double_arrive_kernel, 2, 32, dim3(2, 1, 1), 0, nullptr); }
Test(emu_cluster, report_arrive_twice) {
  expect_report(run_double_arrive, {"barrier.cluster.arrive twice without barrier.cluster.wait"});
}

/* Rank 0 waits at barrier.cluster; rank 1 waits on an mbarrier nobody arrives on. */
__global__ void cluster_deadlock_kernel() {
  FH_DYNAMIC_SMEM(uint64_t, bar);
  if (fh_ptx::cluster_ctarank() == 0) {
    fh_ptx::cluster_sync();
    return;
  }
  if (threadIdx.x == 0) fh_ptx::mbar_init(bar, 1);
  __syncthreads();
  fh_ptx::mbar_wait(bar, 0);
}
static void run_cluster_deadlock() { FH_LAUNCH_CLUSTER(cluster_deadlock_kernel, 2, 32, dim3(2, 1, 1), 64, nullptr); }
Test(emu_cluster, report_cluster_deadlock) {
  expect_report(run_cluster_deadlock, {"no CTA of the cluster can make progress (deadlock)", "CTA rank 0",
                                       "barrier.cluster wait can never complete", "threads 0-31 wait in barrier.cluster.wait",
                                       "CTA rank 1", "mbarrier wait can never complete", "misses 1 of 1 arrivals"});
}

/* mapa to a rank past the cluster. */
__global__ void mapa_kernel(uint32_t rank) {
  FH_DYNAMIC_SMEM(uint32_t, smem);
  (void)fh_ptx::mapa(smem, rank);
}
static void run_mapa_rank2() { FH_LAUNCH_CLUSTER(mapa_kernel, 2, 32, dim3(2, 1, 1), 64, nullptr, 2u); }
Test(emu_cluster, report_mapa_outside_cluster) {
  expect_report(run_mapa_rank2, {"mapa to a CTA outside the cluster", "rank 2, but the cluster has 2 CTAs"});
}

/* ---- remote mbarrier arrivals ----
 * Each CTA initializes an mbarrier for blockDim arrivals; after barrier.cluster every thread
 * stores its value into the next rank's shared memory and arrives on that rank's mbarrier; then
 * every thread waits on its own mbarrier and reads what the previous rank stored. */
__global__ void remote_arrive_kernel(uint32_t* out, int init_first) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
  uint32_t* data = reinterpret_cast<uint32_t*>(smem + 64);
  const uint32_t r = fh_ptx::cluster_ctarank(), n = fh_ptx::cluster_nctarank(), next = (r + 1) % n;
  if (init_first) {
    if (threadIdx.x == 0) {
      fh_ptx::mbar_init(bar, blockDim.x);
      fh_ptx::fence_mbar_init();
    }
    fh_ptx::cluster_sync();
  }
  uint32_t* remote = static_cast<uint32_t*>(fh_ptx::mapa(data + threadIdx.x, next));
  *remote = blockIdx.x * 1000 + threadIdx.x;
  fh_ptx::mbar_arrive_cluster(bar, next);
  fh_ptx::mbar_wait(bar, 0);
  out[blockIdx.x * blockDim.x + threadIdx.x] = data[threadIdx.x];
}

Test(emu_cluster, remote_arrivals_complete_the_peer_phase) {
  uint32_t* out = dev_alloc<uint32_t>(6 * 64);
  FH_LAUNCH_CLUSTER(remote_arrive_kernel, 6, 64, dim3(3, 1, 1), 64 + 64 * 4, nullptr, out, 1);
  EMU_CHECK_LAUNCH();
  std::vector<uint32_t> h = dev_download(out, 6 * 64);
  for (int b = 0; b < 6; ++b) {
    const int prev = b / 3 * 3 + (b % 3 + 2) % 3;
    for (int t = 0; t < 64; ++t) cr_assert_eq(h[(size_t)(b * 64 + t)], (uint32_t)(prev * 1000 + t), "block %d", b);
  }
}

static void run_remote_arrive_before_init() {
  FH_LAUNCH_CLUSTER(remote_arrive_kernel, 2, 32, dim3(2, 1, 1), 64 + 32 * 4, nullptr, dev_alloc<uint32_t>(64), 0);
}
Test(emu_cluster, report_remote_arrive_before_init) {
  expect_report(run_remote_arrive_before_init,
                {"mbarrier used before mbarrier.init", "reaches cluster rank 1", "fence.mbarrier_init"});
}

/* Rank 1 arrives at barrier.cluster without waiting and exits; rank 0 waits, then arrives on
 * rank 1's mbarrier: its shared memory is gone. */
__global__ void exited_peer_kernel() {
  FH_DYNAMIC_SMEM(uint64_t, bar);
  if (threadIdx.x == 0) fh_ptx::mbar_init(bar, 32);
  if (fh_ptx::cluster_ctarank() == 1) {
    fh_ptx::cluster_arrive();
    return;
  }
  fh_ptx::cluster_sync();
  fh_ptx::mbar_arrive_cluster(bar, 1);
}
static void run_exited_peer() {
  fh_emu_set_yield(0.0); /* rank 1's threads arrive and exit in one turn */
  FH_LAUNCH_CLUSTER(exited_peer_kernel, 2, 32, dim3(2, 1, 1), 64, nullptr);
}
Test(emu_cluster, report_remote_arrive_to_exited_cta) {
  expect_report(run_exited_peer, {"remote access to a CTA that has exited", "cluster rank 1"});
}

/* ---- multicast bulk tensor copies ----
 * A 64 x 64 bf16 tile (128-byte rows, no swizzle): rank r of a cluster of 2 loads rows
 * 32r .. 32r + 31 once and multicasts them to both CTAs, so each CTA's mbarrier expects the whole
 * tile (two copies of 4 KiB) and both CTAs end with the whole tile while global memory is read
 * once per cluster. `mask` is the multicast mask, `expect` the bytes each CTA announces. */
constexpr int kRows = 64, kRowBytes = 128, kHalf = kRows / 2 * kRowBytes;
__global__ void multicast_kernel(const __grid_constant__ CUtensorMap map, uint16_t* out, uint16_t mask, uint32_t expect) {
  FH_DYNAMIC_SMEM(unsigned char, smem);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
  unsigned char* tile = smem + 1024;
  const uint32_t r = fh_ptx::cluster_ctarank();
  if (threadIdx.x == 0) {
    fh_ptx::mbar_init(bar, 1);
    fh_ptx::fence_mbar_init();
  }
  fh_ptx::cluster_sync(); /* every CTA's mbarrier is initialized before any copy completes on it */
  if (threadIdx.x == 0) {
    fh_ptx::mbar_arrive_expect_tx(bar, expect);
    fh_ptx::tma_load_2d_multicast(tile + r * kHalf, &map, 0, (int32_t)(blockIdx.y * kRows + r * (kRows / 2)), bar, mask);
  }
  fh_ptx::mbar_wait(bar, 0);
  const uint16_t* t = reinterpret_cast<const uint16_t*>(tile);
  for (int i = (int)threadIdx.x; i < kRows * kRowBytes / 2; i += (int)blockDim.x)
    out[(size_t)(blockIdx.y * 2 + blockIdx.x) * (kRows * kRowBytes / 2) + i] = t[i];
  fh_ptx::cluster_sync(); /* no CTA exits while a copy of its peer may still be on its way */
}

struct MulticastRun {
  std::vector<uint16_t> src;
  uint16_t* out;
  alignas(64) CUtensorMap map;
  MulticastRun() : src((size_t)2 * kRows * 64) {
    for (size_t i = 0; i < src.size(); ++i) src[i] = (uint16_t)(i * 2654435761u >> 16);
    uint16_t* g = dev_upload(src);
    out = dev_alloc<uint16_t>(src.size() * 2);
    const cuuint64_t dim[2] = {64, (cuuint64_t)2 * kRows}, st[1] = {kRowBytes};
    const cuuint32_t box[2] = {64, kRows / 2}, es[2] = {1, 1};
    cr_assert_eq(cuTensorMapEncodeTiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, g, dim, st, box, es,
                                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                                        CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
                 CUDA_SUCCESS);
  }
  void launch(uint16_t mask, uint32_t expect) {
    FH_LAUNCH_CLUSTER(multicast_kernel, dim3(2, 2), 128, dim3(2, 1, 1), 1024 + kRows * kRowBytes, nullptr, map, out,
                      mask, expect);
  }
};

Test(emu_cluster, multicast_lands_in_every_cta_and_reads_global_once) {
  for (uint64_t seed : {1ull, 2ull, 3ull}) {
    fh_emu_set_seed(seed); /* where the copies land, and the preemption points */
    MulticastRun m;
    fh_emu_reset_counters();
    m.launch(0x3, 2 * kHalf);
    EMU_CHECK_LAUNCH();
    const fh_emu_counters_t c = fh_emu_last_counters();
    cr_assert_eq(c.bytes_g2s, (uint64_t)2 * kRows * kRowBytes, "each cluster reads its tile once: %llu bytes",
                 (unsigned long long)c.bytes_g2s);
    std::vector<uint16_t> h = dev_download(m.out, m.src.size() * 2);
    for (int y = 0; y < 2; ++y)
      for (int x = 0; x < 2; ++x)
        for (int i = 0; i < kRows * 64; ++i)
          cr_assert_eq(h[(size_t)(y * 2 + x) * kRows * 64 + (size_t)i], m.src[(size_t)y * kRows * 64 + (size_t)i],
                       "seed %llu, block (%d,%d), element %d", (unsigned long long)seed, x, y, i);
  }
}

static void run_multicast_bad_mask() {
  MulticastRun m;
  m.launch(0x4, 2 * kHalf);
}
Test(emu_cluster, report_multicast_mask_outside_cluster) {
  expect_report(run_multicast_bad_mask, {"invalid multicast mask", "ctaMask 0x0004", "has 2 CTAs (mask 0x0003)"});
}

/* Each CTA announces the whole tile, but only rank 0 multicasts: rank 1's half never comes. */
static void run_multicast_missing_half() {
  MulticastRun m;
  m.launch(0x1, 2 * kHalf);
}
Test(emu_cluster, report_multicast_missing_bytes) {
  expect_report(run_multicast_missing_half,
                {"no CTA of the cluster can make progress (deadlock)", "CTA rank 1", "8192 transaction bytes", "expect_tx mismatch"});
}

} // namespace
