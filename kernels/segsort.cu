/* segsort.cu: cub::DeviceSegmentedRadixSort behind the wrapper of segsort.cuh (nvcc builds only).
 *
 * Formula: per segment, the (key, value) pairs sorted ascending by the 64-bit key, stably.
 * Shapes and arguments: as documented in segsort.cuh. Thread mapping: CUB's. Numerics: integer
 * keys, exact. The emulator build compiles this file to nothing; its twin is
 * tests/emu/emu_blas.cpp. */
#ifdef __CUDACC__
#include <cub/device/device_segmented_radix_sort.cuh>

#include "common.cuh"
#include "segsort.cuh"

fh_status_t fh_segmented_sort_u64_i32(void* temp, size_t* temp_bytes, const uint64_t* keys_in, uint64_t* keys_out,
                                      const int32_t* vals_in, int32_t* vals_out, int num_items, int num_segments,
                                      const int32_t* offsets, struct CUstream_st* stream, const char* fn) {
  return fh_cuda_status(cub::DeviceSegmentedRadixSort::SortPairs(temp, *temp_bytes, keys_in, keys_out, vals_in,
                                                                  vals_out, num_items, num_segments, offsets,
                                                                  offsets + 1, 0, 64, (cudaStream_t)stream),
                        fn, "cub::DeviceSegmentedRadixSort::SortPairs");
}

#endif
