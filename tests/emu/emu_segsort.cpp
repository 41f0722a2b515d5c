/* emu_segsort.cpp: the emulator twin of kernels/segsort.cuh (cub::DeviceSegmentedRadixSort::
 * SortPairs), with its documented semantics and argument checks, on host memory: each segment
 * sorted ascending by key, stably, into the outputs at the same positions; nothing outside the
 * segments is touched. The temp storage it asks for is not CUB's size: callers must use the
 * queried value, and the twin writes every byte so a short allocation trips ASan. */
#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "fh_internal.h"
#include "segsort.cuh"

fh_status_t fh_segmented_sort_u64_i32(void* temp, size_t* temp_bytes, const uint64_t* keys_in, uint64_t* keys_out,
                                      const int32_t* vals_in, int32_t* vals_out, int num_items, int num_segments,
                                      const int32_t* offsets, struct CUstream_st*, const char* fn) {
  static const char what[] = "cub::DeviceSegmentedRadixSort::SortPairs";
  const size_t need = 256 + 8 * (size_t)(num_segments > 0 ? num_segments : 0);
  if (!temp_bytes) return fh_set_error(FH_ERR_INTERNAL, fn, "%s: temp_storage_bytes is NULL", what);
  if (!temp) {
    *temp_bytes = need;
    return FH_SUCCESS;
  }
  if (*temp_bytes < need)
    return fh_set_error(FH_ERR_INTERNAL, fn, "%s: %zu bytes of temp storage, the size query asked for %zu", what,
                        *temp_bytes, need);
  std::memset(temp, 0xab, need);
  if (num_items < 0 || num_segments < 0)
    return fh_set_error(FH_ERR_INTERNAL, fn, "%s: num_items %d, num_segments %d", what, num_items, num_segments);
  std::vector<int> idx;
  for (int s = 0; s < num_segments; ++s) {
    const int lo = offsets[s], hi = offsets[s + 1];
    if (lo < 0 || hi > num_items || hi < lo)
      return fh_set_error(FH_ERR_INTERNAL, fn, "%s: segment %d is [%d, %d) of %d items", what, s, lo, hi, num_items);
    idx.resize((size_t)(hi - lo));
    std::iota(idx.begin(), idx.end(), lo);
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return keys_in[a] < keys_in[b]; });
    for (int i = lo; i < hi; ++i) {
      keys_out[i] = keys_in[idx[(size_t)(i - lo)]];
      vals_out[i] = vals_in[idx[(size_t)(i - lo)]];
    }
  }
  return FH_SUCCESS;
}
