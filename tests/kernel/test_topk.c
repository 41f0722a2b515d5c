/* Suite kernel_topk: kernels/topk.cu end to end through the public API (fh_topk_from_logits and
 * fh_topk_fused with an FH_BACKEND_CUDA context on the SIMT emulator) against the FH_BACKEND_CPU
 * reference, for fp32/fp16/bf16, B in {1, 5, 37}, V in {1, 101, 1000, 4099}, k in {1, 7, V, 256}
 * (k <= V), with guard words after both outputs. The fused grid uses 16-byte aligned operands
 * (the engine's cp.async path, fh_eng::vec16); fused_unaligned_* cover the scalar-load fallback
 * (odd row strides, bases one element past 16-byte alignment) with several k-stages, and
 * fused_batch_invariance checks that a row's top-k is bitwise the same in a batch of 1 and of
 * 150 (two row blocks) on non-integer data. Which path ran is checked through the emulator's
 * cp.async counter.
 *
 * Exactness. Every logit is a small integer (or ±0, -inf, NaN): logits tensors hold integers in
 * [-3, 3] (so most rows have long ties at the k-th value), the fused head has H, C in [-2, 2],
 * D = 5 and a bias in [-3, 3], so every dot product is an integer of magnitude <= 23, exact in
 * fp16/bf16 operands (fp32 ones in three bf16 pieces) and fp32 sums; the fp32 logits then equal the reference's rounded fp64
 * logits and the only freedom left is the order, which the API fixes (value descending, NaN
 * first, ties by lowest id). So ids must be equal and values bitwise equal (NaN: both NaN), with
 * no tolerance. Special entries: NaN (several per row in some rows: NaN vs NaN ties by id),
 * -inf (and rows of only -inf), +inf, and -0.0 mixed with +0.0 (the order treats them as equal,
 * the value written keeps the sign of the chosen entry). */
#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "fh_emu.h"
#include "fusedhead.h"
#include "test_dev_util.h"
#include "test_util.h"

enum { FUSED_D = 5 };

static double logit_value(tu_rng_t* rng, int64_t r, int64_t j, int64_t V) {
  if (r % 7 == 3) return -INFINITY;                    /* a row of only -inf */
  if (r % 5 == 2 && j % 97 == 11) return NAN;          /* several NaN: NaN ties by id */
  if (r % 4 == 1 && j % 3 == 0) return -INFINITY;      /* scattered -inf */
  if (r % 6 == 4 && j == V / 3) return INFINITY;
  const double x = (double)(tu_randint(rng, 7) - 3);
  if (x == 0.0 && j % 2) return -0.0;                  /* -0 ties with +0 */
  return x;
}

static int same_value(float a, float b) {
  if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
  return memcmp(&a, &b, sizeof a) == 0;
}

typedef struct topk_case {
  fh_dtype_t dtype;
  int64_t B, V, k;
  int fused;
  int64_t D;          /* fused: columns of H and C (0: FUSED_D) */
  int64_t ldh, ldc;   /* fused: row strides in elements (0: D + 1 and D + 3) */
  int64_t offh, offc; /* fused: elements between the allocation and the tensor's first element */
} topk_case_t;

static int64_t case_D(topk_case_t c) { return c.D ? c.D : FUSED_D; }

/* Runs one case on both backends; host inputs hz (from logits) or hH, hC, hb (fused). */
static void compare(topk_case_t c, const fh_tensor_t* host_src, const fh_tensor_t* host_H, const fh_tensor_t* host_C,
                    const fh_tensor_t* host_b, const fh_tensor_t* dev_src, const fh_tensor_t* dev_H,
                    const fh_tensor_t* dev_C, const fh_tensor_t* dev_b, fh_context_t* gpu, fh_context_t* cpu) {
  const size_t n = (size_t)(c.B * c.k), vb = n * sizeof(float), ib = n * sizeof(int64_t);
  float* ref_v = malloc(vb ? vb : 1);
  int64_t* ref_i = malloc(ib ? ib : 1);
  float* got_v = tu_alloc_guarded(vb);
  int64_t* got_i = tu_alloc_guarded(ib);
  float* d_v = alloc_out(vb);
  int64_t* d_i = alloc_out(ib);
  size_t ws_bytes = 0;
  cr_assert_eq(fh_topk_workspace_size(gpu, c.B, c.V, c.fused ? case_D(c) : 0, c.k, c.dtype, &ws_bytes), FH_SUCCESS,
               "%s", fh_last_error());
  void* ws = NULL;
  if (ws_bytes) cr_assert_eq(cudaMalloc(&ws, ws_bytes), cudaSuccess);
  if (c.fused) {
    /* The engine path the launcher must pick: 16-byte cp.async exactly when both operands have
     * 16-byte aligned bases and row strides (kernels/engine/sm80.cuh, vec16_ok). */
    const size_t es = fh_dtype_size(c.dtype);
    const int vec = (uintptr_t)dev_H->data % 16 == 0 && (uintptr_t)dev_C->data % 16 == 0 &&
                    (size_t)dev_H->row_stride * es % 16 == 0 && (size_t)dev_C->row_stride * es % 16 == 0;
    fh_emu_reset_counters();
    cr_assert_eq(fh_topk_fused(gpu, dev_H, dev_C, dev_b, c.k, d_v, d_i, ws, ws_bytes), FH_SUCCESS, "%s",
                 fh_last_error());
    const fh_emu_counters_t cnt = fh_emu_total_counters();
    cr_assert_eq(cnt.cp_async_ops > 0, vec, "vec16 path expected %d, cp.async ops %llu", vec,
                 (unsigned long long)cnt.cp_async_ops);
    cr_assert_eq(fh_topk_fused(cpu, host_H, host_C, host_b, c.k, ref_v, ref_i, NULL, 0), FH_SUCCESS, "%s",
                 fh_last_error());
  } else {
    cr_assert_eq(ws_bytes, 0u, "from logits needs no workspace");
    cr_assert_eq(fh_topk_from_logits(gpu, dev_src, c.k, d_v, d_i, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
    cr_assert_eq(fh_topk_from_logits(cpu, host_src, c.k, ref_v, ref_i, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  }
  cr_assert_eq(fh_context_check(gpu), FH_SUCCESS, "%s", fh_last_error());
  const size_t gb = TU_GUARD_WORDS * sizeof(uint32_t);
  cr_assert_eq(cudaMemcpy(got_v, d_v, vb + gb, cudaMemcpyDeviceToHost), cudaSuccess);
  cr_assert_eq(cudaMemcpy(got_i, d_i, ib + gb, cudaMemcpyDeviceToHost), cudaSuccess);
  cr_assert(tu_guards_intact(got_v, vb), "values written past [B x k]");
  cr_assert(tu_guards_intact(got_i, ib), "ids written past [B x k]");
  for (size_t e = 0; e < n; ++e)
    cr_assert(got_i[e] == ref_i[e] && same_value(got_v[e], ref_v[e]),
              "%s dtype=%d B=%lld V=%lld k=%lld: row %lld rank %lld: CUDA (%lld, %a) vs CPU (%lld, %a)",
              c.fused ? "fused" : "from_logits", (int)c.dtype, (long long)c.B, (long long)c.V, (long long)c.k,
              (long long)(e / (size_t)c.k), (long long)(e % (size_t)c.k), (long long)got_i[e], (double)got_v[e],
              (long long)ref_i[e], (double)ref_v[e]);
  cudaFree(ws);
  cudaFree(d_v);
  cudaFree(d_i);
  free(ref_v), free(ref_i), free(got_v), free(got_i);
}

static void run_case(topk_case_t c) {
  fh_context_t *gpu = NULL, *cpu = NULL;
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_create(&cpu, FH_BACKEND_CPU, 0), FH_SUCCESS);
  tu_rng_t rng = {(uint64_t)(c.B * 1000003 + c.V * 7919 + c.k * 31 + c.dtype * 3 + c.fused)};
  const size_t es = fh_dtype_size(c.dtype);
  if (!c.fused) {
    const int64_t stride = c.V + 2; /* padding holds NaN, which would sort first if read */
    const size_t bytes = (size_t)(c.B * stride) * es;
    void* h = malloc(bytes);
    for (int64_t r = 0; r < c.B; ++r)
      for (int64_t j = 0; j < stride; ++j)
        fh_store(h, c.dtype, r * stride + j, j < c.V ? logit_value(&rng, r, j, c.V) : NAN);
    void* d = to_device(h, bytes);
    fh_tensor_t th = {h, c.dtype, c.B, c.V, stride}, td = {d, c.dtype, c.B, c.V, stride};
    compare(c, &th, NULL, NULL, NULL, &td, NULL, NULL, NULL, gpu, cpu);
    cudaFree(d);
    free(h);
  } else {
    /* Padding columns and the elements before each tensor are NaN: read, they would show. */
    const int64_t D = case_D(c), ldh = c.ldh ? c.ldh : D + 1, ldc = c.ldc ? c.ldc : D + 3;
    const size_t hn = (size_t)(c.offh + c.B * ldh), cn = (size_t)(c.offc + c.V * ldc);
    const size_t hb = hn * es, cb = cn * es, bb = (size_t)c.V * es;
    void *hH = malloc(hb), *hC = malloc(cb), *hbias = malloc(bb);
    for (int64_t i = 0; i < (int64_t)hn; ++i) {
      const int64_t e = i - c.offh;
      fh_store(hH, c.dtype, i, e >= 0 && e % ldh < D ? (double)(tu_randint(&rng, 5) - 2) : NAN);
    }
    for (int64_t i = 0; i < (int64_t)cn; ++i) {
      const int64_t e = i - c.offc;
      fh_store(hC, c.dtype, i, e >= 0 && e % ldc < D ? (double)(tu_randint(&rng, 5) - 2) : NAN);
    }
    for (int64_t v = 0; v < c.V; ++v) {
      double b = (double)(tu_randint(&rng, 7) - 3);
      if (v % 211 == 5) b = NAN;      /* a NaN column: first in every row, NaN ties by id */
      if (v % 13 == 7) b = -INFINITY; /* -inf columns */
      fh_store(hbias, c.dtype, v, b);
    }
    void *dH = to_device(hH, hb), *dC = to_device(hC, cb), *db = to_device(hbias, bb);
    char *pH = (char*)hH + c.offh * es, *pC = (char*)hC + c.offc * es;
    char *qH = (char*)dH + c.offh * es, *qC = (char*)dC + c.offc * es;
    fh_tensor_t tH = {pH, c.dtype, c.B, D, ldh}, tC = {pC, c.dtype, c.V, D, ldc};
    fh_tensor_t tb = fh_tensor_2d(hbias, c.dtype, 1, c.V);
    fh_tensor_t uH = {qH, c.dtype, c.B, D, ldh}, uC = {qC, c.dtype, c.V, D, ldc};
    fh_tensor_t ub = fh_tensor_2d(db, c.dtype, 1, c.V);
    /* Odd-sized batches also run without bias. */
    const int with_bias = c.B != 5;
    compare(c, NULL, &tH, &tC, with_bias ? &tb : NULL, NULL, &uH, &uC, with_bias ? &ub : NULL, gpu, cpu);
    cudaFree(dH), cudaFree(dC), cudaFree(db);
    free(hH), free(hC), free(hbias);
  }
  fh_context_destroy(gpu);
  fh_context_destroy(cpu);
}

static void run_all(fh_dtype_t dtype, int fused) {
  static const int64_t Bs[] = {1, 5, 37}, Vs[] = {1, 101, 1000, 4099};
  for (size_t a = 0; a < 3; ++a)
    for (size_t b = 0; b < 4; ++b) {
      const int64_t V = Vs[b], ks[4] = {1, 7, V, 256};
      for (int q = 0; q < 4; ++q) {
        const int64_t k = ks[q];
        if (k > V || k > 256 || (q == 2 && (V == 1 || V == 7 || V == 256)) || (q == 3 && V == 256)) continue;
        topk_case_t c = {dtype, Bs[a], V, k, fused, 0, 0, 0, 0, 0};
        if (fused) { /* 16-byte row strides (and cudaMalloc's aligned bases): the vec16 path */
          c.ldh = 8;                               /* 32 bytes (fp32), 16 (fp16/bf16) */
          c.ldc = dtype == FH_DTYPE_F32 ? 12 : 16; /* 48 bytes, 32 */
        }
        run_case(c);
      }
    }
}

Test(kernel_topk, from_logits_fp32, .timeout = 600) { run_all(FH_DTYPE_F32, 0); }
Test(kernel_topk, from_logits_fp16, .timeout = 600) { run_all(FH_DTYPE_F16, 0); }
Test(kernel_topk, from_logits_bf16, .timeout = 600) { run_all(FH_DTYPE_BF16, 0); }
Test(kernel_topk, fused_fp32, .timeout = 600) { run_all(FH_DTYPE_F32, 1); }
Test(kernel_topk, fused_fp16, .timeout = 600) { run_all(FH_DTYPE_F16, 1); }
Test(kernel_topk, fused_bf16, .timeout = 600) { run_all(FH_DTYPE_BF16, 1); }

/* The scalar-load fallback (fh_eng::scalar): an odd row stride (D + 1 elements) and/or a base one
 * element past a 16-byte boundary, on H, on C or on both; D = 70 spans several k-stages of the
 * engine's pipeline with a partial last one (140 bytes of 16-bit rows, 280 of fp32), so the zero
 * fill past D and past the valid rows / classes is exercised. Exact against the reference: every
 * dot product is an integer of magnitude <= 280. */
static void run_unaligned(fh_dtype_t dtype) {
  const int64_t D = 70;
  /* {ldh, offh, ldc, offc}: both odd strides and offset bases; H alone; C alone. */
  static const int64_t lay[3][4] = {{D + 1, 1, D + 1, 1}, {D + 1, 1, 72, 0}, {72, 0, D, 1}};
  static const int64_t shapes[3][3] = {{37, 1000, 7}, {5, 4099, 256}, {130, 300, 33}}; /* B, V, k */
  for (int l = 0; l < 3; ++l)
    for (int q = 0; q < 3; ++q)
      run_case((topk_case_t){dtype, shapes[q][0], shapes[q][1], shapes[q][2], 1, D, lay[l][0], lay[l][2], lay[l][1],
                             lay[l][3]});
}

Test(kernel_topk, fused_unaligned_fp32, .timeout = 600) { run_unaligned(FH_DTYPE_F32); }
Test(kernel_topk, fused_unaligned_fp16, .timeout = 600) { run_unaligned(FH_DTYPE_F16); }
Test(kernel_topk, fused_unaligned_bf16, .timeout = 600) { run_unaligned(FH_DTYPE_BF16); }

/* Batch invariance (kernels/topk.cu "Numerics", docs/engine.md "Determinism"): rows of a batch of
 * 150 (two 128-row blocks, the second partial) and the same rows alone as batches of 1 give
 * bitwise equal values and equal ids. The data are not integers (normal values rounded to the
 * dtype, D = 200: fp32 sums that round), so equality needs the same summation order whatever
 * the batch, not merely exact arithmetic. Both the aligned path and the scalar fallback. */
static void run_batch_invariance(fh_dtype_t dtype, int aligned) {
  const int64_t B = 150, V = 1000, D = 200, k = 50, ld = aligned ? 208 : D + 1, off = aligned ? 0 : 1;
  const size_t es = fh_dtype_size(dtype);
  fh_context_t* gpu = NULL;
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  tu_rng_t rng = {(uint64_t)(4242 + dtype * 17 + aligned)};
  const size_t hn = (size_t)(off + B * ld), cn = (size_t)(off + V * ld);
  void *hH = malloc(hn * es), *hC = malloc(cn * es), *hb = malloc((size_t)V * es);
  for (size_t i = 0; i < hn; ++i) fh_store(hH, dtype, (int64_t)i, tu_normal(&rng));
  for (size_t i = 0; i < cn; ++i) fh_store(hC, dtype, (int64_t)i, 0.1 * tu_normal(&rng));
  for (int64_t v = 0; v < V; ++v) fh_store(hb, dtype, v, 0.01 * tu_normal(&rng));
  char *dH = to_device(hH, hn * es), *dC = to_device(hC, cn * es), *db = to_device(hb, (size_t)V * es);
  const fh_tensor_t C = {dC + off * es, dtype, V, D, ld}, bias = fh_tensor_2d(db, dtype, 1, V);
  size_t ws_bytes = 0;
  cr_assert_eq(fh_topk_workspace_size(gpu, B, V, D, k, dtype, &ws_bytes), FH_SUCCESS);
  void* ws = NULL;
  cr_assert_eq(cudaMalloc(&ws, ws_bytes), cudaSuccess);
  float* d_v = NULL;
  int64_t* d_i = NULL;
  cr_assert_eq(cudaMalloc((void**)&d_v, (size_t)(B * k) * sizeof(float)), cudaSuccess);
  cr_assert_eq(cudaMalloc((void**)&d_i, (size_t)(B * k) * sizeof(int64_t)), cudaSuccess);
  const fh_tensor_t H = {dH + off * es, dtype, B, D, ld};
  cr_assert_eq(fh_topk_fused(gpu, &H, &C, &bias, k, d_v, d_i, ws, ws_bytes), FH_SUCCESS, "%s", fh_last_error());
  float* all_v = malloc((size_t)(B * k) * sizeof(float));
  int64_t* all_i = malloc((size_t)(B * k) * sizeof(int64_t));
  cr_assert_eq(cudaMemcpy(all_v, d_v, (size_t)(B * k) * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  cr_assert_eq(cudaMemcpy(all_i, d_i, (size_t)(B * k) * sizeof(int64_t), cudaMemcpyDeviceToHost), cudaSuccess);
  static const int64_t rows[] = {0, 77, 127, 128, 149};
  for (size_t q = 0; q < sizeof rows / sizeof rows[0]; ++q) {
    const int64_t r = rows[q];
    const fh_tensor_t H1 = {dH + (off + r * ld) * es, dtype, 1, D, ld};
    size_t ws1 = 0;
    cr_assert_eq(fh_topk_workspace_size(gpu, 1, V, D, k, dtype, &ws1), FH_SUCCESS);
    cr_assert(ws1 <= ws_bytes);
    cr_assert_eq(fh_topk_fused(gpu, &H1, &C, &bias, k, d_v, d_i, ws, ws1), FH_SUCCESS, "%s", fh_last_error());
    float one_v[50];
    int64_t one_i[50];
    cr_assert_eq(cudaMemcpy(one_v, d_v, sizeof one_v, cudaMemcpyDeviceToHost), cudaSuccess);
    cr_assert_eq(cudaMemcpy(one_i, d_i, sizeof one_i, cudaMemcpyDeviceToHost), cudaSuccess);
    for (int64_t e = 0; e < k; ++e)
      cr_assert(one_i[e] == all_i[r * k + e] && memcmp(&one_v[e], &all_v[r * k + e], sizeof(float)) == 0,
                "dtype=%d aligned=%d row %lld rank %lld: batch of 1 (%lld, %a) vs batch of %lld (%lld, %a)", (int)dtype,
                aligned, (long long)r, (long long)e, (long long)one_i[e], (double)one_v[e], (long long)B,
                (long long)all_i[r * k + e], (double)all_v[r * k + e]);
  }
  cr_assert_eq(fh_context_check(gpu), FH_SUCCESS, "%s", fh_last_error());
  cudaFree(ws), cudaFree(d_v), cudaFree(d_i), cudaFree(dH), cudaFree(dC), cudaFree(db);
  free(hH), free(hC), free(hb), free(all_v), free(all_i);
  fh_context_destroy(gpu);
}

Test(kernel_topk, fused_batch_invariance, .timeout = 600) {
  run_batch_invariance(FH_DTYPE_BF16, 1);
  run_batch_invariance(FH_DTYPE_F32, 1);
  run_batch_invariance(FH_DTYPE_F16, 0);
}

/* Workspace formula (kernels/topk.cu): 16 · B · splits · k bytes, splits = ceil(T / ceil(T / 16)),
 * T = ceil(V / 128) (from V alone); 0 from logits. k > 256: FH_ERR_UNSUPPORTED naming k; too little workspace:
 * FH_ERR_INSUFFICIENT_WORKSPACE. */
Test(kernel_topk, workspace_and_limits) {
  fh_context_t* gpu = NULL;
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS);
  size_t bytes = 1;
  cr_assert_eq(fh_topk_workspace_size(gpu, 37, 4099, 0, 7, FH_DTYPE_BF16, &bytes), FH_SUCCESS);
  cr_assert_eq(bytes, 0u);
  cr_assert_eq(fh_topk_workspace_size(gpu, 37, 4099, 5, 7, FH_DTYPE_BF16, &bytes), FH_SUCCESS);
  cr_assert_eq(bytes, (size_t)16 * 37 * 11 * 7, "T = 33 tiles, 3 per split, 11 splits"); /* ceil(33/16) = 3 */
  cr_assert_eq(fh_topk_workspace_size(gpu, 2, 101, 5, 3, FH_DTYPE_F32, &bytes), FH_SUCCESS);
  cr_assert_eq(bytes, (size_t)16 * 2 * 1 * 3, "T = 1 tile, 1 split");
  cr_assert_eq(fh_topk_workspace_size(gpu, 1, 256000, 4096, 256, FH_DTYPE_BF16, &bytes), FH_SUCCESS);
  cr_assert_eq(bytes, (size_t)16 * 1 * 16 * 256, "T = 2000 tiles, 125 per split, 16 splits");
  cr_assert_eq(fh_topk_workspace_size(gpu, 300, 256000, 4096, 256, FH_DTYPE_BF16, &bytes), FH_SUCCESS);
  cr_assert_eq(bytes, (size_t)16 * 300 * 16 * 256, "splits from V alone, whatever B");
  /* fp64 is the CPU backend's alone: rejected before any kernel could misread the data */
  cr_expect_eq(fh_topk_workspace_size(gpu, 2, 101, 5, 3, FH_DTYPE_F64, &bytes), FH_ERR_UNSUPPORTED);
  double z64[3] = {1.0, 3.0, 2.0};
  float v64 = 0.0f;
  int64_t i64 = -7;
  fh_tensor_t t64 = fh_tensor_2d(z64, FH_DTYPE_F64, 1, 3);
  cr_expect_eq(fh_topk_from_logits(gpu, &t64, 1, &v64, &i64, NULL, 0), FH_ERR_UNSUPPORTED);
  cr_expect(strstr(fh_last_error(), "fp64") != NULL, "%s", fh_last_error());
  cr_expect(i64 == -7 && v64 == 0.0f, "nothing written on a rejected call");

  float* d_z = NULL;
  float* d_v = NULL;
  int64_t* d_i = NULL;
  cr_assert_eq(cudaMalloc((void**)&d_z, 300 * sizeof(float)), cudaSuccess);
  cr_assert_eq(cudaMalloc((void**)&d_v, 300 * sizeof(float)), cudaSuccess);
  cr_assert_eq(cudaMalloc((void**)&d_i, 300 * sizeof(int64_t)), cudaSuccess);
  fh_tensor_t z = fh_tensor_2d(d_z, FH_DTYPE_F32, 1, 300);
  cr_assert_eq(fh_topk_from_logits(gpu, &z, 257, d_v, d_i, NULL, 0), FH_ERR_UNSUPPORTED);
  cr_assert(strstr(fh_last_error(), "fh_topk_from_logits") && strstr(fh_last_error(), "k is 257"), "%s",
            fh_last_error());
  fh_tensor_t H = fh_tensor_2d(d_z, FH_DTYPE_F32, 2, 3), C = fh_tensor_2d(d_z + 6, FH_DTYPE_F32, 90, 3);
  cr_assert_eq(fh_topk_fused(gpu, &H, &C, NULL, 4, d_v, d_i, NULL, 0), FH_ERR_INSUFFICIENT_WORKSPACE);
  /* D = 0: the query sizes no workspace for it (D = 0 means "from logits"), so the fused kernel
   * must not run into a NULL workspace: a named refusal, nothing written. */
  fh_tensor_t H0 = fh_tensor_2d(d_z, FH_DTYPE_F32, 2, 0), C0 = fh_tensor_2d(d_z, FH_DTYPE_F32, 90, 0);
  cr_assert_eq(fh_topk_workspace_size(gpu, 2, 90, 0, 4, FH_DTYPE_F32, &bytes), FH_SUCCESS);
  cr_assert_eq(fh_topk_fused(gpu, &H0, &C0, NULL, 4, d_v, d_i, NULL, bytes), FH_ERR_UNSUPPORTED);
  cr_expect(strstr(fh_last_error(), "0 columns") != NULL, "%s", fh_last_error());
  cudaFree(d_z), cudaFree(d_v), cudaFree(d_i);
  fh_context_destroy(gpu);
}
