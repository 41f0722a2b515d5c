/* Suites emu_block, emu_warp, emu_atomic, emu_smem, emu_order: the execution model against
 * host computations (barriers, every shuffle variant, votes, atomics from many blocks, dynamic
 * shared memory, launch errors, block-order independence, counters). */
#include "emu_test.h"

/* ---- block reductions and barriers ---- */

__global__ void block_sum_kernel(const float* x, int per_block, float* out) {
  __shared__ float scratch[32];
  float v = 0.0f;
  for (int i = threadIdx.x; i < per_block; i += blockDim.x) v += x[(int64_t)blockIdx.x * per_block + i];
  v = fh_block_sum(v, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

static std::vector<float> run_block_sum(int grid, int block, int per_block) {
  std::vector<float> h((size_t)grid * per_block);
  for (size_t i = 0; i < h.size(); ++i) h[i] = (float)((i * 7919) % 101) - 50.0f; /* integers: exact sums */
  float* d = dev_upload(h);
  float* d_out = dev_alloc<float>(grid);
  FH_LAUNCH(block_sum_kernel, grid, block, 0, nullptr, d, per_block, d_out);
  EMU_CHECK_LAUNCH();
  std::vector<float> out = dev_download(d_out, grid);
  for (int b = 0; b < grid; ++b) {
    double ref = 0;
    for (int i = 0; i < per_block; ++i) ref += h[(size_t)b * per_block + i];
    cr_assert_eq(out[b], (float)ref, "block %d of %d threads: %g != %g", b, block, out[b], ref);
  }
  return out;
}

Test(emu_block, reduction_with_barriers) {
  for (int block : {32, 96, 256, 1024}) run_block_sum(7, block, 1000);
  fh_emu_counters_t c = fh_emu_last_counters();
  const uint64_t nwarps = 1024 / 32;
  cr_expect_eq(c.blocks, 7u);
  cr_expect_eq(c.threads, 7u * 1024);
  cr_expect_eq(c.barriers, 7u * 3, "fh_block_sum has 3 barriers, got %llu", (unsigned long long)c.barriers);
  cr_expect_eq(c.shuffles, 7u * (nwarps + 1) * 5, "5 xor steps per warp reduce");
  cr_expect_str_eq(c.kernel, "block_sum_kernel");
}

/* Reverse through shared memory in a 2D block: without the barrier the first fiber would read
 * slots nobody wrote yet (NaN), so this checks the barrier and threadIdx.x/.y at once. */
__global__ void reverse_2d_kernel(const int* in, int* out) {
  __shared__ int s[256];
  const int t = threadIdx.x + threadIdx.y * blockDim.x, n = blockDim.x * blockDim.y;
  s[t] = in[blockIdx.x * n + t];
  __syncthreads();
  out[blockIdx.x * n + t] = s[n - 1 - t];
}

Test(emu_block, shared_memory_reverse_2d) {
  const int grid = 3, n = 16 * 8;
  std::vector<int> h(grid * n);
  for (size_t i = 0; i < h.size(); ++i) h[i] = (int)i;
  int* d = dev_upload(h);
  int* d_out = dev_alloc<int>(h.size());
  FH_LAUNCH(reverse_2d_kernel, grid, dim3(16, 8), 0, nullptr, d, d_out);
  EMU_CHECK_LAUNCH();
  std::vector<int> out = dev_download(d_out, h.size());
  for (int b = 0; b < grid; ++b)
    for (int t = 0; t < n; ++t) cr_assert_eq(out[b * n + t], b * n + n - 1 - t);
}

__global__ void syncthreads_reductions_kernel(int* out) {
  const int t = threadIdx.x;
  out[0] = __syncthreads_count(t % 3 == 0);
  out[1] = __syncthreads_and(t >= 0);
  out[2] = __syncthreads_and(t != 5);
  out[3] = __syncthreads_or(t == 77);
  out[4] = __syncthreads_or(t > 1000);
}

Test(emu_block, syncthreads_count_and_or) {
  int* d = dev_alloc<int>(5);
  FH_LAUNCH(syncthreads_reductions_kernel, 1, 96, 0, nullptr, d);
  EMU_CHECK_LAUNCH();
  std::vector<int> o = dev_download(d, 5);
  cr_assert_eq(o[0], 32);
  cr_assert_eq(o[1], 1);
  cr_assert_eq(o[2], 0);
  cr_assert_eq(o[3], 1);
  cr_assert_eq(o[4], 0);
}

/* ---- warp shuffles and votes ---- */

__global__ void shuffle_kernel(int* out, int width, int arg) {
  const int t = threadIdx.x, lane = t % 32;
  const int v = 1000 * (t / 32) + lane;
  out[4 * t + 0] = __shfl_sync(FH_FULL_MASK, v, arg, width);
  out[4 * t + 1] = __shfl_up_sync(FH_FULL_MASK, v, (unsigned)arg, width);
  out[4 * t + 2] = __shfl_down_sync(FH_FULL_MASK, v, (unsigned)arg, width);
  out[4 * t + 3] = __shfl_xor_sync(FH_FULL_MASK, v, arg, width);
}

/* The CUDA C++ Programming Guide's definitions, written independently of the emulator. */
static void shuffle_expected(int lane, int width, int arg, int* e) {
  const int base = lane / width * width;
  e[0] = base + arg % width;
  e[1] = lane - base >= arg ? lane - arg : lane;
  e[2] = lane - base + arg < width ? lane + arg : lane;
  const int x = lane ^ arg; /* later segments are out of reach, earlier ones are not */
  e[3] = x / width > lane / width ? lane : x;
}

Test(emu_warp, every_shuffle_variant) {
  int* d = dev_alloc<int>(4 * 64);
  for (int width : {32, 16, 8, 4, 2, 1})
    for (int arg : {0, 1, 2, 3, 5, 8, 13, 16, 31}) {
      if (arg >= 32) continue;
      FH_LAUNCH(shuffle_kernel, 1, 64, 0, nullptr, d, width, arg);
      EMU_CHECK_LAUNCH();
      std::vector<int> o = dev_download(d, 4 * 64);
      for (int t = 0; t < 64; ++t) {
        int e[4];
        shuffle_expected(t % 32, width, arg, e);
        for (int k = 0; k < 4; ++k)
          cr_assert_eq(o[4 * t + k], 1000 * (t / 32) + e[k], "variant %d width %d arg %d thread %d: %d != %d", k, width,
                       arg, t, o[4 * t + k], 1000 * (t / 32) + e[k]);
      }
    }
}

/* 8-byte and 2-byte types, a tree sum with __shfl_down_sync, and two half-warps shuffling
 * independently with their own masks (legal divergence). */
__global__ void shuffle_types_kernel(double* dsum, float* half_sums, __half* hout) {
  const int lane = threadIdx.x;
  double v = lane + 0.5;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(FH_FULL_MASK, v, off);
  if (lane == 0) *dsum = v;
  float f = (float)lane;
  if (lane < 16) {
    for (int off = 8; off > 0; off >>= 1) f += __shfl_xor_sync(0x0000ffffu, f, off, 16);
  } else {
    for (int off = 8; off > 0; off >>= 1) f += __shfl_xor_sync(0xffff0000u, f, off, 16);
  }
  half_sums[lane] = f;
  hout[lane] = __shfl_sync(FH_FULL_MASK, __float2half((float)lane), 31 - lane);
}

Test(emu_warp, shuffle_types_and_split_masks) {
  double* d = dev_alloc<double>(1);
  float* hs = dev_alloc<float>(32);
  __half* hh = dev_alloc<__half>(32);
  FH_LAUNCH(shuffle_types_kernel, 1, 32, 0, nullptr, d, hs, hh);
  EMU_CHECK_LAUNCH();
  cr_assert_eq(dev_download(d, 1)[0], 32 * 31 / 2 + 16.0);
  std::vector<float> s = dev_download(hs, 32);
  std::vector<__half> h = dev_download(hh, 32);
  for (int l = 0; l < 32; ++l) {
    cr_assert_eq(s[l], l < 16 ? 120.0f : 376.0f);
    cr_assert_eq(__half2float(h[l]), (float)(31 - l));
  }
}

__global__ void vote_kernel(unsigned* out) {
  const int t = threadIdx.x, lane = t % 32;
  unsigned* o = out + 8 * (t / 32);
  const unsigned b = __ballot_sync(FH_FULL_MASK, lane % 3 == 0);
  const int any = __any_sync(FH_FULL_MASK, lane == 17), none = __any_sync(FH_FULL_MASK, 0);
  const int all = __all_sync(FH_FULL_MASK, lane < 32), notall = __all_sync(FH_FULL_MASK, lane != 4);
  const unsigned sum = __reduce_add_sync(FH_FULL_MASK, (unsigned)lane);
  const unsigned match = __match_any_sync(FH_FULL_MASK, lane % 4);
  const unsigned active = __activemask();
  __syncwarp();
  if (lane == 5) {
    o[0] = b, o[1] = (unsigned)any, o[2] = (unsigned)none, o[3] = (unsigned)all, o[4] = (unsigned)notall;
    o[5] = sum, o[6] = match, o[7] = active;
  }
}

Test(emu_warp, votes) {
  unsigned* d = dev_alloc<unsigned>(16);
  FH_LAUNCH(vote_kernel, 1, 64, 0, nullptr, d);
  EMU_CHECK_LAUNCH();
  std::vector<unsigned> o = dev_download(d, 16);
  unsigned ballot = 0, match = 0;
  for (int l = 0; l < 32; ++l) {
    if (l % 3 == 0) ballot |= 1u << l;
    if (l % 4 == 1) match |= 1u << l;
  }
  for (int w = 0; w < 2; ++w) {
    const unsigned* v = &o[8 * w];
    cr_assert_eq(v[0], ballot);
    cr_assert_eq(v[1], 1u);
    cr_assert_eq(v[2], 0u);
    cr_assert_eq(v[3], 1u);
    cr_assert_eq(v[4], 0u);
    cr_assert_eq(v[5], 496u);
    cr_assert_eq(v[6], match);
    cr_assert_eq(v[7], 0xffffffffu);
  }
}

/* ---- atomics from many blocks on several OS threads ---- */

__global__ void atomics_kernel(int* i, unsigned long long* u, float* f, double* dd, int* mx, int* mn, unsigned* bits,
                               int* cas_counter) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(i, 1);
  atomicAdd(u, 3ull);
  atomicAdd(f, 1.0f);
  atomicAdd(dd, 0.5);
  atomicMax(mx, g);
  atomicMin(mn, -g);
  atomicOr(bits, 1u << (g % 32));
  int old = *cas_counter, seen;
  while ((seen = atomicCAS(cas_counter, old, old + 1)) != old) old = seen; /* CAS increment */
}

Test(emu_atomic, many_blocks) {
  const int grid = 64, block = 128, n = grid * block;
  int* i = dev_alloc<int>(1);
  unsigned long long* u = dev_alloc<unsigned long long>(1);
  float* f = dev_alloc<float>(1);
  double* dd = dev_alloc<double>(1);
  int *mx = dev_alloc<int>(1), *mn = dev_alloc<int>(1), *cas = dev_alloc<int>(1);
  unsigned* bits = dev_alloc<unsigned>(1);
  for (void* p : {(void*)i, (void*)u, (void*)f, (void*)dd, (void*)mx, (void*)mn, (void*)cas, (void*)bits})
    cudaMemset(p, 0, 4);
  cudaMemset(u, 0, 8);
  cudaMemset(dd, 0, 8);
  fh_emu_set_workers(4);
  FH_LAUNCH(atomics_kernel, grid, block, 0, nullptr, i, u, f, dd, mx, mn, bits, cas);
  EMU_CHECK_LAUNCH();
  cr_assert_eq(dev_download(i, 1)[0], n);
  cr_assert_eq(dev_download(u, 1)[0], 3ull * n);
  cr_assert_eq(dev_download(f, 1)[0], (float)n);
  cr_assert_eq(dev_download(dd, 1)[0], 0.5 * n);
  cr_assert_eq(dev_download(mx, 1)[0], n - 1);
  cr_assert_eq(dev_download(mn, 1)[0], -(n - 1));
  cr_assert_eq(dev_download(bits, 1)[0], 0xffffffffu);
  cr_assert_eq(dev_download(cas, 1)[0], n);
  cr_assert_geq(fh_emu_last_counters().atomics, 8ull * n);
}

/* ---- dynamic shared memory and launch errors ---- */

__global__ void dyn_smem_kernel(const float* in, float* out, int n, float* unwritten) {
  FH_DYNAMIC_SMEM(float, s);
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = in[i];
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = s[n - 1 - i];
  if (threadIdx.x == 0) *unwritten = s[n]; /* one slot more was allocated and never written */
}

static cudaError_t run_dyn_smem(int n) {
  std::vector<float> h(n);
  for (int k = 0; k < n; ++k) h[k] = (float)k;
  float* d = dev_upload(h);
  float* d_out = dev_alloc<float>(n);
  float* un = dev_alloc<float>(1);
  cudaMemset(un, 0, sizeof(float));
  FH_LAUNCH(dyn_smem_kernel, 2, 128, (n + 1) * sizeof(float), nullptr, d, d_out, n, un);
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) {
    std::vector<float> o = dev_download(d_out, n);
    for (int k = 0; k < n; ++k) cr_assert_eq(o[k], (float)(n - 1 - k));
    cr_assert(std::isnan(dev_download(un, 1)[0]), "fresh shared memory reads as NaN");
  }
  return e;
}

Test(emu_smem, dynamic_sizes_and_opt_in) {
  cr_assert_eq(run_dyn_smem(100), cudaSuccess);
  cr_assert_eq(run_dyn_smem(12 * 1024 - 1), cudaSuccess); /* exactly 48 KiB */
  cr_assert_eq(run_dyn_smem(12 * 1024), cudaErrorInvalidValue, "above 48 KiB needs the attribute");
  cr_assert_eq(cudaFuncSetAttribute(dyn_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024),
               cudaErrorInvalidValue, "above the 227 KiB opt-in limit");
  cr_assert_eq(cudaGetLastError(), cudaErrorInvalidValue);
  cr_assert_eq(cudaFuncSetAttribute(dyn_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024), cudaSuccess);
  cr_assert_eq(run_dyn_smem(50 * 1024), cudaSuccess);
}

__global__ void empty_kernel(int* p) {
  if (p) *p = 1;
}

Test(emu_smem, launch_configuration_errors) {
  FH_LAUNCH(empty_kernel, 1, 1025, 0, nullptr, nullptr);
  cr_assert_eq(cudaPeekAtLastError(), cudaErrorInvalidConfiguration);
  cr_assert_eq(cudaGetLastError(), cudaErrorInvalidConfiguration);
  cr_assert_eq(cudaGetLastError(), cudaSuccess, "cudaGetLastError clears");
  FH_LAUNCH(empty_kernel, 1, dim3(1, 1, 65), 0, nullptr, nullptr);
  cr_assert_eq(cudaGetLastError(), cudaErrorInvalidConfiguration);
  FH_LAUNCH(empty_kernel, dim3(1, 65536), 32, 0, nullptr, nullptr);
  cr_assert_eq(cudaGetLastError(), cudaErrorInvalidConfiguration);
  FH_LAUNCH(empty_kernel, 0, 32, 0, nullptr, nullptr);
  cr_assert_eq(cudaGetLastError(), cudaErrorInvalidConfiguration);
  int* d = dev_alloc<int>(1);
  FH_LAUNCH(empty_kernel, 1, dim3(32, 32), 0, nullptr, d); /* 1024 threads: fine */
  EMU_CHECK_LAUNCH();
  cr_assert_eq(dev_download(d, 1)[0], 1);
}

/* ---- block order ---- */

__global__ void ticket_kernel(int* order, int* ticket) {
  if (threadIdx.x == 0) order[blockIdx.x + blockIdx.y * gridDim.x] = atomicAdd(ticket, 1);
}

static std::vector<int> block_order(uint64_t seed) {
  const int n = 64;
  int* order = dev_alloc<int>(n);
  int* ticket = dev_alloc<int>(1);
  cudaMemset(ticket, 0, sizeof(int));
  fh_emu_set_seed(seed);
  FH_LAUNCH(ticket_kernel, dim3(16, 4), 32, 0, nullptr, order, ticket);
  EMU_CHECK_LAUNCH();
  std::vector<int> o = dev_download(order, n);
  return o;
}

Test(emu_order, shuffled_per_seed_and_reproducible) {
  fh_emu_set_workers(1); /* one worker: the ticket order is exactly the schedule */
  std::vector<int> a = block_order(1), b = block_order(2), a2 = block_order(1);
  cr_assert(a == a2, "the same seed gives the same order");
  cr_assert(a != b, "different seeds give different orders");
  std::vector<int> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (int k = 0; k < 64; ++k) cr_assert_eq(sorted[k], k, "every block ran once");
  int in_order = 0;
  for (int k = 0; k < 64; ++k) in_order += a[k] == k;
  cr_assert_lt(in_order, 16, "blocks are not run in index order");
}

Test(emu_order, results_independent_of_seed_and_workers) {
  fh_emu_set_seed(11);
  const std::vector<float> ref = run_block_sum(33, 128, 517);
  for (int workers : {1, 2, 3})
    for (uint64_t seed : {1, 2, 3, 4}) {
      fh_emu_set_workers(workers);
      fh_emu_set_seed(seed);
      cr_assert(run_block_sum(33, 128, 517) == ref, "seed %llu, %d workers", (unsigned long long)seed, workers);
    }
}
