/* Device-buffer helpers of the kernel suites that run the public API on the emulator's CUDA
 * runtime (test_topk.c, test_decode_cuda.c): inputs copied to the device, outputs followed by
 * guard words (tests/common/test_util.h) that the tests check after copying back. */
#ifndef FH_TEST_DEV_UTIL_H
#define FH_TEST_DEV_UTIL_H

#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "test_util.h"

static inline void* to_device(const void* h, size_t bytes) {
  void* d = NULL;
  cr_assert_eq(cudaMalloc(&d, bytes ? bytes : 1), cudaSuccess);
  if (bytes) cr_assert_eq(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}

/* Outputs on the device with guard words after each. */
static inline void* alloc_out(size_t bytes) {
  uint32_t guards[TU_GUARD_WORDS];
  for (int i = 0; i < TU_GUARD_WORDS; ++i) guards[i] = TU_GUARD_VALUE;
  void* d = NULL;
  cr_assert_eq(cudaMalloc(&d, bytes + sizeof guards), cudaSuccess);
  cr_assert_eq(cudaMemcpy((char*)d + bytes, guards, sizeof guards, cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}

#endif
