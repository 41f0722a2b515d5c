/* blas.cu: cuBLAS and CUB behind the wrappers of blas.cuh (nvcc builds only).
 *
 * Formula: C = alpha * op(A) op(B) + beta * C (column-major, cublasGemmEx, fp32 compute);
 * exclusive prefix sum; stream compaction by flags (CUB device-wide).
 * Shapes and arguments: as documented in blas.cuh. Thread mapping: the libraries'.
 * Numerics: CUBLAS_COMPUTE_32F never uses TF32, so fp32 GEMMs are fp32-exact up to summation
 * order. The emulator build compiles this file to nothing; its twin is tests/emu/emu_blas.cpp. */
#ifdef __CUDACC__
#include <cublas_v2.h>
#include <cub/device/device_scan.cuh>

#include "blas.cuh"
#include "common.cuh"

static cudaDataType_t fh_cuda_dtype(fh_dtype_t t) {
  return t == FH_DTYPE_F16 ? CUDA_R_16F : t == FH_DTYPE_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

static fh_status_t fh_blas_status(cublasStatus_t s, const char* fn, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return FH_SUCCESS;
  const fh_status_t st = s == CUBLAS_STATUS_ALLOC_FAILED       ? FH_ERR_OUT_OF_MEMORY
                         : s == CUBLAS_STATUS_EXECUTION_FAILED ? FH_ERR_CUDA
                                                               : FH_ERR_INTERNAL; /* bad arguments: a launcher bug */
  return fh_set_error(st, fn, "%s failed: %s", what, cublasGetStatusString(s));
}

fh_status_t fh_blas_create(void** handle, const char* fn) {
  cublasHandle_t h = NULL;
  FH_TRY(fh_blas_status(cublasCreate(&h), fn, "cublasCreate"));
  *handle = h;
  return FH_SUCCESS;
}

void fh_blas_destroy(void* handle) {
  if (handle) (void)cublasDestroy(static_cast<cublasHandle_t>(handle));
}

fh_status_t fh_gemm(void* handle, struct CUstream_st* stream, const char* fn, fh_blas_op_t ta, fh_blas_op_t tb, int m,
                    int n, int k, float alpha, const void* A, int lda, const void* B, int ldb, fh_dtype_t abtype,
                    float beta, void* C, int ldc, fh_dtype_t ctype) {
  cublasHandle_t h = static_cast<cublasHandle_t>(handle);
  FH_TRY(fh_blas_status(cublasSetStream(h, stream), fn, "cublasSetStream"));
  return fh_blas_status(cublasGemmEx(h, ta == FH_OP_T ? CUBLAS_OP_T : CUBLAS_OP_N, tb == FH_OP_T ? CUBLAS_OP_T : CUBLAS_OP_N,
                                     m, n, k, &alpha, A, fh_cuda_dtype(abtype), lda, B, fh_cuda_dtype(abtype), ldb, &beta,
                                     C, fh_cuda_dtype(ctype), ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                        fn, "cublasGemmEx");
}

fh_status_t fh_exclusive_sum_i32(void* temp, size_t* temp_bytes, const int32_t* in, int32_t* out, int n,
                                 struct CUstream_st* stream, const char* fn) {
  return fh_cuda_status(cub::DeviceScan::ExclusiveSum(temp, *temp_bytes, in, out, n, stream), fn,
                        "cub::DeviceScan::ExclusiveSum");
}

#endif
