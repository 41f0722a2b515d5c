/* emu_blas.cpp: the emulator twins of kernels/blas.cuh: cublasGemmEx and cub::DeviceScan::
 * ExclusiveSum, and of kernels/segsort.cuh: cub::DeviceSegmentedRadixSort::SortPairs (each
 * segment sorted ascending by key, stably, into the outputs at the same positions; nothing
 * outside the segments touched), with their documented semantics and argument
 * checks, on host memory. The GEMM accumulates in fp64 and rounds once into C's dtype (cuBLAS:
 * fp32 with an unspecified order), so kernel tests compare against it with fp32 tolerances. */
#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "blas.cuh"
#include "dtype.h"
#include "fh_internal.h"
#include "segsort.cuh"

namespace {
/* What the twins require of temp storage. CUB's sizes differ; callers must use the queried
 * value, never a constant, and the twin writes every byte so a short allocation trips ASan. */
size_t scan_temp_bytes(int n) { return 512 + 4 * (size_t)(n > 0 ? n : 0); }
size_t sort_temp_bytes(int segs) { return 256 + 8 * (size_t)(segs > 0 ? segs : 0); }

fh_status_t temp_protocol(void* temp, size_t* temp_bytes, size_t need, const char* fn, const char* what) {
  if (!temp_bytes) return fh_set_error(FH_ERR_INTERNAL, fn, "%s: temp_storage_bytes is NULL", what);
  if (!temp) {
    *temp_bytes = need;
    return FH_SUCCESS;
  }
  if (*temp_bytes < need)
    return fh_set_error(FH_ERR_INTERNAL, fn, "%s: %zu bytes of temp storage, the size query asked for %zu", what,
                        *temp_bytes, need);
  std::memset(temp, 0xab, need);
  return FH_SUCCESS;
}
} // namespace

fh_status_t fh_blas_create(void** handle, const char*) {
  *handle = nullptr;
  return FH_SUCCESS;
}
void fh_blas_destroy(void*) {}

fh_status_t fh_gemm(void*, struct CUstream_st*, const char* fn, fh_blas_op_t ta, fh_blas_op_t tb, int m, int n, int k,
                    float alpha, const void* A, int lda, const void* B, int ldb, fh_dtype_t abtype, float beta, void* C,
                    int ldc, fh_dtype_t ctype) {
  const int a_rows = ta == FH_OP_N ? m : k, b_rows = tb == FH_OP_N ? k : n;
  auto at_least1 = [](int x) { return x > 1 ? x : 1; };
  /* cuBLAS's CUBLAS_STATUS_INVALID_VALUE conditions. */
  if (m < 0 || n < 0 || k < 0 || lda < at_least1(a_rows) || ldb < at_least1(b_rows) || ldc < at_least1(m) ||
      (unsigned)ta > FH_OP_T || (unsigned)tb > FH_OP_T)
    return fh_set_error(FH_ERR_INTERNAL, fn,
                        "cublasGemmEx failed: CUBLAS_STATUS_INVALID_VALUE (m %d n %d k %d lda %d ldb %d ldc %d)", m, n, k,
                        lda, ldb, ldc);
  /* The combinations CUBLAS_COMPUTE_32F accepts: same-type A/B, C either that type or fp32. */
  if ((unsigned)abtype >= FH_DTYPE_COUNT || (ctype != FH_DTYPE_F32 && ctype != abtype))
    return fh_set_error(FH_ERR_INTERNAL, fn, "cublasGemmEx failed: CUBLAS_STATUS_NOT_SUPPORTED (A/B dtype %d, C dtype %d)",
                        (int)abtype, (int)ctype);
  if (m == 0 || n == 0) return FH_SUCCESS;
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      double acc = 0;
      if (alpha != 0.0f)
        for (int p = 0; p < k; ++p) {
          const double a = fh_load(A, abtype, ta == FH_OP_N ? i + (int64_t)p * lda : p + (int64_t)i * lda);
          const double b = fh_load(B, abtype, tb == FH_OP_N ? p + (int64_t)j * ldb : j + (int64_t)p * ldb);
          acc += a * b;
        }
      const int64_t c = i + (int64_t)j * ldc;
      double r = (double)alpha * acc;
      if (beta != 0.0f) r += (double)beta * fh_load(C, ctype, c); /* beta == 0: C is write-only */
      fh_store(C, ctype, c, r);
    }
  return FH_SUCCESS;
}

fh_status_t fh_exclusive_sum_i32(void* temp, size_t* temp_bytes, const int32_t* in, int32_t* out, int n,
                                 struct CUstream_st*, const char* fn) {
  const bool query = temp == nullptr;
  FH_TRY(temp_protocol(temp, temp_bytes, scan_temp_bytes(n), fn, "cub::DeviceScan::ExclusiveSum"));
  if (query) return FH_SUCCESS;
  int32_t run = 0;
  for (int i = 0; i < n; ++i) { /* read before write: in and out may alias */
    const int32_t v = in[i];
    out[i] = run;
    run = (int32_t)((uint32_t)run + (uint32_t)v); /* wraps like the device's int adds */
  }
  return FH_SUCCESS;
}


fh_status_t fh_segmented_sort_u64_i32(void* temp, size_t* temp_bytes, const uint64_t* keys_in, uint64_t* keys_out,
                                      const int32_t* vals_in, int32_t* vals_out, int num_items, int num_segments,
                                      const int32_t* offsets, struct CUstream_st*, const char* fn) {
  static const char what[] = "cub::DeviceSegmentedRadixSort::SortPairs";
  const bool query = temp == nullptr;
  FH_TRY(temp_protocol(temp, temp_bytes, sort_temp_bytes(num_segments), fn, what));
  if (query) return FH_SUCCESS;
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
