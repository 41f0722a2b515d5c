/* Suite kernel_logsumexp: the example kernel (kernels/logsumexp.cu) end to end: the public API
 * with an FH_BACKEND_CUDA context, running on the SIMT emulator, against the FH_BACKEND_CPU
 * reference (fp64), for fp32/fp16/bf16 inputs with shapes crossing the 256-thread stride, padded
 * rows poisoned with NaN, peaked rows, -inf/+inf/NaN rows, and guard words after the output.
 *
 * Tolerance. The inputs are exact in fp32 for every dtype, so one bound serves all three. The
 * kernel sums exp(z - m) in fp32: each thread adds ceil(V/256) terms in sequence, then 8 levels
 * of merges combine 256 partial sums; every step (expf included) contributes at most ~2 units of
 * 2^-24 relative error, so the relative error of the sum, which is the absolute error of
 * log(sum), is below (2*ceil(V/256) + 2*8 + 8) * 2^-24 = atol; rtol = 2^-22 covers rounding
 * m + log(sum) to fp32. */
#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "fh_emu.h"
#include "fusedhead.h"
#include "test_util.h"

typedef struct lse_case {
  int64_t N, V;
  fh_dtype_t dtype;
} lse_case_t;

/* Row kinds cycle so every N > 13 sees all of them. */
static double logit(tu_rng_t* rng, int64_t r, int64_t j, int64_t V) {
  if (r % 11 == 4) return -INFINITY;                 /* all -inf row: lse = -inf */
  if (r % 7 == 3 && j == V / 2) return NAN;          /* one NaN: lse = NaN */
  if (r % 13 == 6 && j == V - 1) return INFINITY;    /* one +inf: lse = +inf */
  if (r % 3 == 2 && j % 5 == 1) return -INFINITY;    /* scattered -inf entries contribute 0 */
  double z = 3.0 * tu_normal(rng);
  if (r % 5 == 1 && j == (r * 31) % V) z += 25.0;    /* a dominant class */
  return z;
}

static void run_case(lse_case_t c) {
  const int64_t stride = c.V + 3; /* padding columns hold NaN: reading them would show */
  const size_t es = fh_dtype_size(c.dtype);
  const size_t in_bytes = (size_t)(c.N * stride) * es;
  void* h_z = malloc(in_bytes ? in_bytes : 1);
  cr_assert_not_null(h_z);
  tu_rng_t rng = {(uint64_t)(c.N * 1000003 + c.V * 7 + c.dtype)};
  for (int64_t r = 0; r < c.N; ++r)
    for (int64_t j = 0; j < stride; ++j) fh_store(h_z, c.dtype, r * stride + j, j < c.V ? logit(&rng, r, j, c.V) : NAN);

  void* d_z = NULL;
  float* d_lse = NULL;
  const size_t out_bytes = (size_t)c.N * sizeof(float);
  cr_assert_eq(cudaMalloc(&d_z, in_bytes), cudaSuccess);
  cr_assert_eq(cudaMalloc((void**)&d_lse, out_bytes + TU_GUARD_WORDS * sizeof(uint32_t)), cudaSuccess);
  cr_assert_eq(cudaMemcpy(d_z, h_z, in_bytes, cudaMemcpyHostToDevice), cudaSuccess);
  uint32_t guards[TU_GUARD_WORDS];
  for (int k = 0; k < TU_GUARD_WORDS; ++k) guards[k] = TU_GUARD_VALUE;
  cr_assert_eq(cudaMemcpy((char*)d_lse + out_bytes, guards, sizeof guards, cudaMemcpyHostToDevice), cudaSuccess);

  fh_context_t *gpu = NULL, *cpu = NULL;
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_create(&cpu, FH_BACKEND_CPU, 0), FH_SUCCESS);
  fh_tensor_t t_dev = {d_z, c.dtype, c.N, c.V, stride};
  fh_tensor_t t_host = {h_z, c.dtype, c.N, c.V, stride};
  float* ref = malloc((size_t)c.N * sizeof(float));
  float* got = tu_alloc_guarded(out_bytes);
  cr_assert_eq(fh_rows_logsumexp(gpu, &t_dev, d_lse), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_check(gpu), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_rows_logsumexp(cpu, &t_host, ref), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(cudaMemcpy(got, d_lse, out_bytes + sizeof guards, cudaMemcpyDeviceToHost), cudaSuccess);
  cr_assert(tu_guards_intact(got, out_bytes), "the kernel wrote past lse[N-1]");

  fh_emu_counters_t cnt = fh_emu_last_counters();
  cr_assert_eq(cnt.blocks, (uint64_t)c.N, "one block per row");

  double* ref64 = malloc((size_t)c.N * sizeof(double));
  for (int64_t i = 0; i < c.N; ++i) ref64[i] = ref[i];
  const double atol = (2.0 * (double)((c.V + 255) / 256) + 24.0) * 0x1p-24, rtol = 0x1p-22;
  char name[96];
  snprintf(name, sizeof name, "lse N=%lld V=%lld dtype=%d", (long long)c.N, (long long)c.V, (int)c.dtype);
  cr_assert(tu_check_close_f(name, got, ref64, c.N, atol, rtol), "%s: kernel differs from the reference", name);

  fh_context_destroy(gpu);
  fh_context_destroy(cpu);
  cudaFree(d_z);
  cudaFree(d_lse);
  free(h_z), free(ref), free(ref64), free(got);
}

static void run_shapes(fh_dtype_t dtype) {
  static const int64_t Ns[] = {1, 37, 130}, Vs[] = {1, 101, 1000, 4099};
  for (size_t a = 0; a < sizeof Ns / sizeof *Ns; ++a)
    for (size_t b = 0; b < sizeof Vs / sizeof *Vs; ++b) run_case((lse_case_t){Ns[a], Vs[b], dtype});
}

Test(kernel_logsumexp, fp32, .timeout = 600) { run_shapes(FH_DTYPE_F32); }
Test(kernel_logsumexp, fp16, .timeout = 600) { run_shapes(FH_DTYPE_F16); }
Test(kernel_logsumexp, bf16, .timeout = 600) { run_shapes(FH_DTYPE_BF16); }

Test(kernel_logsumexp, empty_rows_and_columns) {
  fh_context_t* gpu = NULL;
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS);
  float* d_lse = NULL;
  cr_assert_eq(cudaMalloc((void**)&d_lse, 4 * sizeof(float)), cudaSuccess);
  fh_emu_reset_counters();
  fh_tensor_t none = {NULL, FH_DTYPE_F32, 0, 10, 10};
  cr_assert_eq(fh_rows_logsumexp(gpu, &none, d_lse), FH_SUCCESS);
  cr_assert_eq(fh_emu_total_counters().launches, 0u, "N = 0 launches nothing");
  fh_tensor_t no_cols = {NULL, FH_DTYPE_BF16, 4, 0, 0};
  cr_assert_eq(fh_rows_logsumexp(gpu, &no_cols, d_lse), FH_SUCCESS, "%s", fh_last_error());
  float h[4];
  cr_assert_eq(cudaMemcpy(h, d_lse, sizeof h, cudaMemcpyDeviceToHost), cudaSuccess);
  for (int i = 0; i < 4; ++i) cr_assert(isinf(h[i]) && h[i] < 0, "an empty row has lse = -inf");
  cudaFree(d_lse);
  fh_context_destroy(gpu);
}
