/* Suite emu_runtime: the CUDA runtime twins (allocation poison, copies in every direction,
 * memset, streams, events, device properties, errors) and the cuBLAS/CUB twins of
 * kernels/blas.cuh against direct host loops. */
#include <cmath>

#include "blas.cuh"
#include "dtype.h"
#include "emu_test.h"

Test(emu_runtime, malloc_poisons_with_nan) {
  float* d = nullptr;
  cr_assert_eq(cudaMalloc((void**)&d, 64 * sizeof(float)), cudaSuccess);
  std::vector<unsigned char> bytes(64 * sizeof(float));
  cr_assert_eq(cudaMemcpy(bytes.data(), d, bytes.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  for (unsigned char b : bytes) cr_assert_eq(b, 0xff);
  cr_assert(std::isnan(dev_download(d, 1)[0]));
  cr_assert(std::isnan(__half2float(dev_download(reinterpret_cast<__half*>(d), 1)[0])));
  cr_assert(std::isnan(__bfloat162float(dev_download(reinterpret_cast<__nv_bfloat16*>(d), 1)[0])));
  cr_assert_eq((uintptr_t)d % 256, 0u, "cudaMalloc alignment");
  cr_assert_eq(cudaFree(d), cudaSuccess);
  void* z = reinterpret_cast<void*>(1);
  cr_assert_eq(cudaMalloc(&z, 0), cudaSuccess);
  cr_assert_eq(cudaFree(z), cudaSuccess);
  cr_assert_eq(cudaFree(nullptr), cudaSuccess);
}

Test(emu_runtime, memcpy_every_direction_and_memset) {
  std::vector<int> h(100), back(100, 0);
  for (int i = 0; i < 100; ++i) h[i] = i * i;
  int* a = dev_alloc<int>(100);
  int* b = dev_alloc<int>(100);
  cudaStream_t s;
  cr_assert_eq(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  cr_assert_eq(cudaMemcpyAsync(a, h.data(), 400, cudaMemcpyHostToDevice, s), cudaSuccess);
  cr_assert_eq(cudaMemcpy(b, a, 400, cudaMemcpyDeviceToDevice), cudaSuccess);
  cr_assert_eq(cudaMemcpy(back.data(), b, 400, cudaMemcpyDefault), cudaSuccess);
  cr_assert(back == h);
  std::vector<int> hh(100);
  cr_assert_eq(cudaMemcpy(hh.data(), h.data(), 400, cudaMemcpyHostToHost), cudaSuccess);
  cr_assert(hh == h);
  cr_assert_eq(cudaMemsetAsync(b + 10, 0, 20 * sizeof(int), s), cudaSuccess);
  cr_assert_eq(cudaStreamSynchronize(s), cudaSuccess);
  back = dev_download(b, 100);
  for (int i = 0; i < 100; ++i) cr_assert_eq(back[i], i >= 10 && i < 30 ? 0 : i * i);
  cr_assert_eq(cudaMemset(b, 0x01, 4), cudaSuccess);
  cr_assert_eq(dev_download(b, 1)[0], 0x01010101);
  cr_assert_eq(cudaMemcpy(b, a, 4, (cudaMemcpyKind)42), cudaErrorInvalidMemcpyDirection);
  cr_assert_eq(cudaGetLastError(), cudaErrorInvalidMemcpyDirection);
  cr_assert_eq(cudaStreamDestroy(s), cudaSuccess);
}

Test(emu_runtime, events_and_errors) {
  cudaEvent_t e0, e1;
  cr_assert_eq(cudaEventCreate(&e0), cudaSuccess);
  cr_assert_eq(cudaEventCreateWithFlags(&e1, cudaEventDefault), cudaSuccess);
  float ms = -1;
  cr_assert_eq(cudaEventElapsedTime(&ms, e0, e1), cudaErrorInvalidResourceHandle, "not recorded yet");
  cr_assert_eq(cudaEventRecord(e0, nullptr), cudaSuccess);
  cr_assert_eq(cudaEventRecord(e1, nullptr), cudaSuccess);
  cr_assert_eq(cudaEventSynchronize(e1), cudaSuccess);
  cr_assert_eq(cudaEventElapsedTime(&ms, e0, e1), cudaSuccess);
  cr_assert_geq(ms, 0.0f);
  cudaEventDestroy(e0), cudaEventDestroy(e1);
  (void)cudaGetLastError();
  cr_assert_str_eq(cudaGetErrorString(cudaErrorInvalidValue), "invalid argument");
  cr_assert_str_eq(cudaGetErrorName(cudaErrorInvalidConfiguration), "cudaErrorInvalidConfiguration");
}

Test(emu_runtime, device_properties_h100) {
  int n = 0, dev = -1, v = 0;
  cr_assert_eq(cudaGetDeviceCount(&n), cudaSuccess);
  cr_assert_eq(n, 1);
  cr_assert_eq(cudaSetDevice(1), cudaErrorInvalidDevice);
  cr_assert_eq(cudaGetLastError(), cudaErrorInvalidDevice);
  cr_assert_eq(cudaSetDevice(0), cudaSuccess);
  cr_assert_eq(cudaGetDevice(&dev), cudaSuccess);
  cr_assert_eq(dev, 0);
  cudaDeviceProp p;
  cr_assert_eq(cudaGetDeviceProperties(&p, 0), cudaSuccess);
  cr_assert_eq(p.multiProcessorCount, 132);
  cr_assert_eq(p.major * 10 + p.minor, 90);
  cr_assert_eq(p.sharedMemPerBlock, 48u * 1024);
  cr_assert_eq(p.sharedMemPerBlockOptin, 227u * 1024);
  cr_assert_eq(p.sharedMemPerMultiprocessor, 228u * 1024);
  cr_assert_eq(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0), cudaSuccess);
  cr_assert_eq(v, 227 * 1024);
  cr_assert_eq(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  cr_assert_eq(v, 132);
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
}

/* ---- cuBLAS twin: column-major GEMM with transposes and padded leading dimensions ---- */

static void check_gemm_case(fh_blas_op_t ta, fh_blas_op_t tb, fh_dtype_t abt, fh_dtype_t ct, float alpha, float beta) {
  const int m = 5, n = 7, k = 9, pad = 3;
  const int ar = ta == FH_OP_N ? m : k, ac = ta == FH_OP_N ? k : m; /* stored A: ar x ac, column-major */
  const int br = tb == FH_OP_N ? k : n, bc = tb == FH_OP_N ? n : k;
  const int lda = ar + pad, ldb = br + pad, ldc = m + pad;
  const size_t es = fh_dtype_size(abt), cs = fh_dtype_size(ct);
  /* Padding stays NaN (cudaMalloc's poison): reading it would show in the result. */
  void *A, *B, *C;
  cr_assert_eq(cudaMalloc(&A, (size_t)lda * ac * es), cudaSuccess);
  cr_assert_eq(cudaMalloc(&B, (size_t)ldb * bc * es), cudaSuccess);
  cr_assert_eq(cudaMalloc(&C, (size_t)ldc * n * cs), cudaSuccess);
  auto val = [](int i, int j, int salt) { return (double)(((i * 31 + j * 17 + salt) % 13) - 6) / 4.0; };
  for (int j = 0; j < ac; ++j)
    for (int i = 0; i < ar; ++i) fh_store(A, abt, i + (int64_t)j * lda, val(i, j, 1));
  for (int j = 0; j < bc; ++j)
    for (int i = 0; i < br; ++i) fh_store(B, abt, i + (int64_t)j * ldb, val(i, j, 2));
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) fh_store(C, ct, i + (int64_t)j * ldc, beta == 0.0f ? NAN : val(i, j, 3));
  std::vector<double> c0((size_t)m * n);
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) c0[i + (size_t)j * m] = fh_load(C, ct, i + (int64_t)j * ldc);
  cr_assert_eq(fh_gemm(nullptr, nullptr, "test", ta, tb, m, n, k, alpha, A, lda, B, ldb, abt, beta, C, ldc, ct), FH_SUCCESS);
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      double acc = 0;
      for (int p = 0; p < k; ++p) {
        const double a = ta == FH_OP_N ? val(i, p, 1) : val(p, i, 1);
        const double b = tb == FH_OP_N ? val(p, j, 2) : val(j, p, 2);
        acc += a * b;
      }
      double ref = alpha * acc + (beta == 0.0f ? 0.0 : beta * c0[i + (size_t)j * m]);
      const double got = fh_load(C, ct, i + (int64_t)j * ldc);
      /* Inputs are multiples of 1/4 and sums small: exact in fp32; fp16/bf16 C rounds once. */
      const double tol = ct == FH_DTYPE_F32 ? 0.0 : std::fabs(ref) * (ct == FH_DTYPE_F16 ? 0x1p-11 : 0x1p-8);
      cr_assert_leq(std::fabs(got - ref), tol, "ta %d tb %d C[%d,%d] = %g, want %g", ta, tb, i, j, got, ref);
    }
  for (int j = 0; j < n; ++j)
    cr_assert(std::isnan(fh_load(C, ct, m + (int64_t)j * ldc)), "C's padding rows are not written");
  cudaFree(A), cudaFree(B), cudaFree(C);
}

Test(emu_runtime, gemm_twin_against_host_loops) {
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      check_gemm_case((fh_blas_op_t)ta, (fh_blas_op_t)tb, FH_DTYPE_F32, FH_DTYPE_F32, 1.0f, 0.0f);
      check_gemm_case((fh_blas_op_t)ta, (fh_blas_op_t)tb, FH_DTYPE_F16, FH_DTYPE_F32, 2.0f, 0.5f);
      check_gemm_case((fh_blas_op_t)ta, (fh_blas_op_t)tb, FH_DTYPE_BF16, FH_DTYPE_BF16, -1.0f, 1.0f);
      check_gemm_case((fh_blas_op_t)ta, (fh_blas_op_t)tb, FH_DTYPE_F16, FH_DTYPE_F16, 1.0f, 0.0f);
    }
}

Test(emu_runtime, gemm_twin_rejects_bad_arguments) {
  float a[16] = {0}, b[16] = {0}, c[16] = {0};
  /* lda < m for op(A) = N is CUBLAS_STATUS_INVALID_VALUE */
  cr_assert_eq(fh_gemm(nullptr, nullptr, "t", FH_OP_N, FH_OP_N, 4, 2, 2, 1, a, 3, b, 2, FH_DTYPE_F32, 0, c, 4, FH_DTYPE_F32),
               FH_ERR_INTERNAL);
  /* op(A) = T stores A as k x m: lda >= k, so lda = 2 < m = 4 is fine */
  cr_assert_eq(fh_gemm(nullptr, nullptr, "t", FH_OP_T, FH_OP_N, 4, 2, 2, 1, a, 2, b, 2, FH_DTYPE_F32, 0, c, 4, FH_DTYPE_F32),
               FH_SUCCESS);
  cr_assert_eq(fh_gemm(nullptr, nullptr, "t", FH_OP_N, FH_OP_N, 4, 2, 2, 1, a, 4, b, 2, FH_DTYPE_F32, 0, c, 3, FH_DTYPE_F32),
               FH_ERR_INTERNAL, "ldc < m");
  cr_assert_eq(fh_gemm(nullptr, nullptr, "t", FH_OP_N, FH_OP_N, 4, 2, 2, 1, a, 4, b, 2, FH_DTYPE_F32, 0, c, 4, FH_DTYPE_F16),
               FH_ERR_INTERNAL, "fp32 inputs with an fp16 C are not a cublasGemmEx combination");
  cr_assert_str_eq(fh_last_error(),
                   "t: cublasGemmEx failed: CUBLAS_STATUS_NOT_SUPPORTED (A/B dtype 0, C dtype 1)");
}

/* ---- CUB twins: the temp-storage size protocol and the results ---- */

Test(emu_runtime, exclusive_sum_twin) {
  const int n = 1000;
  std::vector<int32_t> h(n);
  for (int i = 0; i < n; ++i) h[i] = (i * 37) % 11 - 3;
  int32_t* d_in = dev_upload(h);
  int32_t* d_out = dev_alloc<int32_t>(n);
  size_t bytes = 0;
  cr_assert_eq(fh_exclusive_sum_i32(nullptr, &bytes, d_in, d_out, n, nullptr, "t"), FH_SUCCESS);
  cr_assert_gt(bytes, 0u);
  void* temp = dev_alloc<unsigned char>(bytes);
  size_t small = bytes - 1;
  cr_assert_eq(fh_exclusive_sum_i32(temp, &small, d_in, d_out, n, nullptr, "t"), FH_ERR_INTERNAL);
  cr_assert_eq(fh_exclusive_sum_i32(temp, &bytes, d_in, d_out, n, nullptr, "t"), FH_SUCCESS);
  std::vector<int32_t> o = dev_download(d_out, n);
  int32_t run = 0;
  for (int i = 0; i < n; ++i) {
    cr_assert_eq(o[i], run);
    run += h[i];
  }
  cr_assert_eq(fh_exclusive_sum_i32(temp, &bytes, d_in, d_in, n, nullptr, "t"), FH_SUCCESS); /* in place */
  cr_assert(dev_download(d_in, n) == o);
}

