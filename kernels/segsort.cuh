/* segsort.cuh: the wrapper of cub::DeviceSegmentedRadixSort that the decoding launcher uses
 * (kernels/decode.cu). Under nvcc it calls CUB (kernels/segsort.cu); in the SIMT emulator build
 * it is a host implementation with exactly the documented semantics (tests/emu/emu_blas.cpp),
 * so a wrong segment layout or temp-storage size fails the kernel tests. Stream-ordered, no
 * synchronization. Returns FH_SUCCESS or a status with the error set under `fn`. */
#ifndef FH_KERNELS_SEGSORT_CUH
#define FH_KERNELS_SEGSORT_CUH

#include <stddef.h>
#include <stdint.h>

#include "fusedhead.h"

struct CUstream_st;

/* cub::DeviceSegmentedRadixSort::SortPairs on all 64 bits of uint64 keys with int32 values:
 * segment s is [offsets[s], offsets[s + 1]) for s < num_segments; each is sorted ascending by
 * key, stably (equal keys keep their input order: DeviceRadixSort is stable), into keys_out /
 * vals_out at the same positions. Inputs are not modified. With temp == NULL only *temp_bytes is
 * set; otherwise *temp_bytes must be at least the queried size. */
fh_status_t fh_segmented_sort_u64_i32(void* temp, size_t* temp_bytes, const uint64_t* keys_in, uint64_t* keys_out,
                                      const int32_t* vals_in, int32_t* vals_out, int num_items, int num_segments,
                                      const int32_t* offsets, struct CUstream_st* stream, const char* fn);

#endif
