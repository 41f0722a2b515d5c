/* Suite emu_synccheck: bugs the emulator must report (and abort on, so each test runs in its own
 * Criterion child process and expects SIGABRT), and memory errors AddressSanitizer must catch. */
#include <csignal>

#include "emu_test.h"

#if defined(__SANITIZE_ADDRESS__)
#define EMU_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_TEST_ASAN 1
#endif
#endif

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) { /* the other 16 threads exit without reaching the barrier */
    __syncthreads();
    out[threadIdx.x] = 1;
  }
}
Test(emu_synccheck, divergent_syncthreads, .signal = SIGABRT) {
  int* d = dev_alloc<int>(32);
  FH_LAUNCH(divergent_barrier_kernel, 2, 32, 0, nullptr, d);
}

__global__ void barrier_vs_syncwarp_kernel() {
  if (threadIdx.x < 32) __syncthreads(); /* warp 0 waits at the barrier ... */
  else __syncwarp();                     /* ... warp 1 syncs its warp, then exits */
}
Test(emu_synccheck, barrier_not_reached_by_other_warp, .signal = SIGABRT) {
  FH_LAUNCH(barrier_vs_syncwarp_kernel, 1, 64, 0, nullptr);
}

__global__ void barrier_shuffle_deadlock_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) __syncthreads();                               /* waits for lanes 16-31 ... */
  else out[lane] = __shfl_sync(FH_FULL_MASK, lane, 0);          /* ... which wait for lanes 0-15 */
}
Test(emu_synccheck, barrier_and_shuffle_deadlock, .signal = SIGABRT) {
  int* d = dev_alloc<int>(32);
  FH_LAUNCH(barrier_shuffle_deadlock_kernel, 1, 32, 0, nullptr, d);
}

__global__ void partial_shuffle_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) out[lane] = __shfl_sync(FH_FULL_MASK, lane, 0); /* names lanes 16-31, which exit */
}
Test(emu_synccheck, shuffle_mask_names_exiting_lanes, .signal = SIGABRT) {
  int* d = dev_alloc<int>(32);
  FH_LAUNCH(partial_shuffle_kernel, 1, 32, 0, nullptr, d);
}

__global__ void mask_beyond_block_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(FH_FULL_MASK, (int)threadIdx.x, 1); /* only 16 lanes exist */
}
Test(emu_synccheck, shuffle_mask_names_missing_lanes, .signal = SIGABRT) {
  int* d = dev_alloc<int>(16);
  FH_LAUNCH(mask_beyond_block_kernel, 1, 16, 0, nullptr, d);
}

__global__ void mask_without_self_kernel(int* out) {
  out[threadIdx.x] = __ballot_sync(0x1u, 1); /* lane 1..31 pass a mask without themselves */
}
Test(emu_synccheck, mask_without_calling_lane, .signal = SIGABRT) {
  int* d = dev_alloc<int>(32);
  FH_LAUNCH(mask_without_self_kernel, 1, 32, 0, nullptr, d);
}

__global__ void mixed_collectives_kernel(unsigned* out) {
  const int lane = threadIdx.x;
  if (lane % 2) out[lane] = __ballot_sync(FH_FULL_MASK, 1);
  else out[lane] = (unsigned)__shfl_sync(FH_FULL_MASK, lane, 0);
}
Test(emu_synccheck, different_collectives_under_one_mask, .signal = SIGABRT) {
  unsigned* d = dev_alloc<unsigned>(32);
  FH_LAUNCH(mixed_collectives_kernel, 1, 32, 0, nullptr, d);
}

__global__ void half_warp_wmma_kernel(const __half* a) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> fa;
  if (threadIdx.x < 16) nvcuda::wmma::load_matrix_sync(fa, a, 16); /* WMMA is warp-wide */
}
Test(emu_synccheck, wmma_called_by_half_a_warp, .signal = SIGABRT) {
  __half* d = dev_alloc<__half>(256);
  FH_LAUNCH(half_warp_wmma_kernel, 1, 32, 0, nullptr, d);
}

__global__ void misaligned_wmma_kernel(const __half* a) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> fa;
  nvcuda::wmma::load_matrix_sync(fa, a + 8, 16); /* 16 bytes off: not 256-bit aligned */
}
Test(emu_synccheck, wmma_misaligned_pointer, .signal = SIGABRT) {
  __half* d = dev_alloc<__half>(512);
  FH_LAUNCH(misaligned_wmma_kernel, 1, 32, 0, nullptr, d);
}

__global__ void trap_kernel() {
  if (blockIdx.x == 1 && threadIdx.x == 3) __trap();
}
Test(emu_synccheck, trap, .signal = SIGABRT) { FH_LAUNCH(trap_kernel, 2, 32, 0, nullptr); }

/* ---- AddressSanitizer: out-of-bounds global and dynamic shared memory (exit code 1) ---- */

__global__ void oob_global_kernel(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 1.0f; /* off by one: writes out[n] */
}
__global__ void oob_smem_kernel(float* out, int n) {
  FH_DYNAMIC_SMEM(float, s);
  s[threadIdx.x] = 1.0f; /* 64 threads, n = 48 floats of dynamic shared memory */
  if (threadIdx.x == 0) out[0] = s[0] + (float)n;
}

#ifdef EMU_TEST_ASAN
Test(emu_asan, out_of_bounds_global_store, .exit_code = 1) {
  float* d = dev_alloc<float>(100);
  FH_LAUNCH(oob_global_kernel, 4, 32, 0, nullptr, d, 100);
}
Test(emu_asan, out_of_bounds_shared_store, .exit_code = 1) {
  float* d = dev_alloc<float>(1);
  FH_LAUNCH(oob_smem_kernel, 1, 64, 48 * sizeof(float), nullptr, d, 48);
}
#else
Test(emu_asan, out_of_bounds_global_store) { cr_skip_test("built without AddressSanitizer (FH_SANITIZE)"); }
Test(emu_asan, out_of_bounds_shared_store) { cr_skip_test("built without AddressSanitizer (FH_SANITIZE)"); }
#endif
