/* blas.cuh: the one wrapper per cuBLAS / CUB device-wide call that launchers use.
 *
 * Under nvcc these call cuBLAS and CUB (kernels/blas.cu). In the SIMT emulator build they are
 * host implementations with exactly the documented semantics (tests/emu/emu_blas.cpp), so wrong
 * leading dimensions, transposes or temp-storage sizes fail the kernel tests. All are
 * stream-ordered and do not synchronize. Each returns FH_SUCCESS or a status with the error set
 * under `fn`. */
#ifndef FH_KERNELS_BLAS_CUH
#define FH_KERNELS_BLAS_CUH

#include <stddef.h>
#include <stdint.h>

#include "fusedhead.h"

struct CUstream_st;

fh_status_t fh_blas_create(void** handle, const char* fn);
void fh_blas_destroy(void* handle);

typedef enum fh_blas_op { FH_OP_N = 0, FH_OP_T = 1 } fh_blas_op_t;

/* cublasGemmEx, column-major: C[m x n] = alpha * op(A) * op(B) + beta * C, fp32 compute
 * (CUBLAS_COMPUTE_32F, no TF32), C in `ctype` (rounded once). A is stored m x k (lda >= m) when
 * ta == N, k x m (lda >= k) when ta == T; likewise B k x n / n x k; ldc >= m. When beta == 0, C
 * is not read (NaN in C does not propagate). A and B share `abtype`. */
fh_status_t fh_gemm(void* handle, struct CUstream_st* stream, const char* fn, fh_blas_op_t ta, fh_blas_op_t tb,
                    int m, int n, int k, float alpha, const void* A, int lda, const void* B, int ldb,
                    fh_dtype_t abtype, float beta, void* C, int ldc, fh_dtype_t ctype);

/* cub::DeviceScan::ExclusiveSum on int32: out[i] = sum_{j<i} in[j] (out[0] = 0). With
 * temp == NULL only *temp_bytes is set; otherwise *temp_bytes must be the queried size. in and
 * out may alias. */
fh_status_t fh_exclusive_sum_i32(void* temp, size_t* temp_bytes, const int32_t* in, int32_t* out, int n,
                                 struct CUstream_st* stream, const char* fn);


#endif
