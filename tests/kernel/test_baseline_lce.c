/* kernel_baseline_lce: the unfused baseline of the benchmark (kernels/baseline_lce.cu: cuBLAS
 * logits, row-wise cross-entropy kernels, cuBLAS gradient GEMMs) under the SIMT emulator,
 * against the CPU backend through the public API (fh_linear_ce_forward/backward with
 * FH_BACKEND_CPU: the fp64 reference, rounded to fp32 / the gradient dtype once).
 *
 * Tolerance (test_linear_ce_common.h, docs/testing.md): max |x − cpu| <= 2·max |naive − cpu|
 * + 2^-24·n_terms·max|cpu|, where naive is the same-precision computation of
 * test_linear_ce_common.c: fp32 logits summed in k order, fp32 softmax, G rounded to the input
 * dtype, fp32 gradient sums rounded once to the output dtype. That is the baseline's algorithm
 * in another summation order, so the factor 2 leaves room only for the order. n_terms is the
 * longest fp32 sum feeding the output (the γ_n reordering bound where the naive error happens
 * to be ~0): D + V for the loss and dE (logit over D, normaliser and G·C over V), D + V + N for
 * dC and dbias (their GEMM sums over the N rows).
 * For fp32 inputs the naive view of E and C is the exact fp32 values (the baseline's cuBLAS
 * GEMMs use fp32 compute, not tf32), and fp32 gradients get a second, tighter check: the pure reordering bound with 4·n_terms (the
 * logit error, about D·u relative, reaches G through p and is summed again over V or N).
 * dbias of 16-bit inputs: the baseline sums G after rounding it to the dtype (what a framework's
 * bias gradient, grad_output.sum(0), does), while the naive sums the fp32 G; the rounding adds
 * at most u·Σ_i |G_ij| per class (u = 2^-11 fp16, 2^-8 bf16; computed in fp64 from the exact
 * inputs by abs_g_colsum), and since the naive and the CPU value then round alike (naive error
 * 0) while the baseline's sum rounds to a neighbour, 2u·|dbias_j| for the two final roundings;
 * both are added to that element's budget. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/baseline_lce.h"
#include "dtype.h"
#include "test_linear_ce_common.h"
#include "test_util.h"

static const float GRAD_LOSS = 1.25f; /* lk_bwd_in_make's upstream gradient for mean / sum */

typedef struct bl_result {
  double loss;
  lk_grads_t g;
} bl_result_t;

static fh_baseline_lce_args_t args_of(const lk_problem_t* P) {
  fh_baseline_lce_args_t a;
  memset(&a, 0, sizeof a);
  a.N = P->s.N, a.V = P->s.V, a.D = P->s.D, a.dtype = P->s.dtype;
  a.E = P->E, a.lde = P->tE.row_stride, a.C = P->C, a.ldc = P->tC.row_stride;
  a.bias = P->bias;
  a.targets = P->f.targets;
  a.ignore_index = P->f.opt.ignore_index;
  a.reduction = P->f.opt.reduction;
  return a;
}

/* The baseline on the emulated device: forward then backward, outputs in guarded buffers with
 * NaN-poisoned row padding (ld = D + pad), workspace poisoned with NaN bytes. */
static fh_status_t run_baseline(const lk_problem_t* P, bl_result_t* out) {
  const int64_t N = P->s.N, V = P->s.V, D = P->s.D, ld = D + P->s.pad;
  const fh_dtype_t dt = P->s.dtype;
  const size_t es = fh_dtype_size(dt);
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  const fh_baseline_lce_args_t a = args_of(P);
  size_t wsb = 0;
  cr_assert_eq(fh_baseline_lce_workspace_size(N, V, dt, &wsb), FH_SUCCESS);
  void* ws = tu_alloc_guarded(wsb);
  memset(ws, 0xff, wsb);
  float* loss = tu_alloc_guarded(sizeof(float));
  float* gl = tu_alloc_guarded(sizeof(float));
  *gl = GRAD_LOSS;
  const size_t bE = es * (size_t)(N * ld + 1), bC = es * (size_t)(V * ld + 1), bb = es * (size_t)(V + 1);
  void* dE = tu_alloc_guarded(bE);
  void* dC = tu_alloc_guarded(bC);
  void* db = tu_alloc_guarded(bb);
  for (int64_t q = 0; q < N * ld; ++q) fh_store(dE, dt, q, NAN);
  for (int64_t q = 0; q < V * ld; ++q) fh_store(dC, dt, q, NAN);
  for (int64_t q = 0; q < V; ++q) fh_store(db, dt, q, NAN);
  fh_status_t st = fh_baseline_lce_forward(ctx, &a, loss, ws, wsb);
  if (st == FH_SUCCESS)
    st = fh_baseline_lce_backward(ctx, &a, gl, dE, ld, dC, ld, P->bias ? db : NULL, ws, wsb);
  if (st == FH_SUCCESS) st = fh_context_check(ctx);
  if (st == FH_SUCCESS) {
    int pad_ok = 1;
    out->loss = *loss;
    for (int64_t q = 0; q < N * ld; ++q)
      if (q % ld < D) out->g.dE[q / ld * D + q % ld] = fh_load(dE, dt, q);
      else pad_ok &= isnan(fh_load(dE, dt, q));
    for (int64_t q = 0; q < V * ld; ++q)
      if (q % ld < D) out->g.dC[q / ld * D + q % ld] = fh_load(dC, dt, q);
      else pad_ok &= isnan(fh_load(dC, dt, q));
    for (int64_t k = 0; P->bias && k < V; ++k) out->g.db[k] = fh_load(db, dt, k);
    cr_assert(pad_ok, "the padding between gradient rows was written");
  }
  cr_assert(tu_guards_intact(ws, wsb) && tu_guards_intact(loss, sizeof(float)), "guard words overwritten");
  cr_assert(tu_guards_intact(dE, bE) && tu_guards_intact(dC, bC) && tu_guards_intact(db, bb),
            "guard words after a gradient overwritten");
  free(ws), free(loss), free(gl), free(dE), free(dC), free(db);
  fh_context_destroy(ctx);
  return st;
}

/* The CPU backend through the public API, gradients in the input dtype (dense). */
static void run_cpu(const lk_problem_t* P, bl_result_t* out) {
  const int64_t N = P->s.N, V = P->s.V, D = P->s.D;
  const fh_dtype_t dt = P->s.dtype;
  const size_t es = fh_dtype_size(dt);
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  float loss = 0, gl = GRAD_LOSS;
  float* lse = calloc((size_t)N + 1, sizeof(float));
  void* dE = calloc((size_t)(N * D + 1), es);
  void* dC = calloc((size_t)(V * D + 1), es);
  void* db = calloc((size_t)(V + 1), es);
  fh_linear_ce_outputs_t o = {&loss, lse, NULL, NULL, NULL, NULL};
  const fh_tensor_t* bias = P->bias ? &P->tb : NULL;
  cr_assert_eq(fh_linear_ce_forward(ctx, &P->f.opt, &P->tE, &P->tC, bias, P->f.targets, NULL, NULL, &o, NULL, 0),
               FH_SUCCESS, "%s", fh_last_error());
  fh_tensor_t tE = fh_tensor_2d(dE, dt, N, D), tC = fh_tensor_2d(dC, dt, V, D), tb = fh_tensor_2d(db, dt, 1, V);
  fh_linear_ce_grads_t g = {&tE, &tC, P->bias ? &tb : NULL};
  fh_linear_ce_grad_inputs_t in = {lse, NULL, &gl, NULL};
  cr_assert_eq(fh_linear_ce_backward(ctx, &P->f.opt, &P->tE, &P->tC, bias, P->f.targets, NULL, NULL, &in, &g, NULL, 0),
               FH_SUCCESS, "%s", fh_last_error());
  out->loss = loss;
  for (int64_t q = 0; q < N * D; ++q) out->g.dE[q] = fh_load(dE, dt, q);
  for (int64_t q = 0; q < V * D; ++q) out->g.dC[q] = fh_load(dC, dt, q);
  for (int64_t q = 0; P->bias && q < V; ++q) out->g.db[q] = fh_load(db, dt, q);
  free(lse), free(dE), free(dC), free(db);
  fh_context_destroy(ctx);
}

/* Σ_i |G_ij| in fp64 (G of the mean / sum loss with GRAD_LOSS upstream), the scale of the
 * rounding error of a column sum over G stored in a 16-bit dtype. */
static void abs_g_colsum(const lk_problem_t* P, double* out) {
  const int64_t N = P->s.N, V = P->s.V, D = P->s.D;
  double* z = malloc(sizeof(double) * (size_t)V);
  int64_t nv = 0;
  for (int64_t i = 0; i < N; ++i) nv += P->f.targets[i] != P->f.opt.ignore_index;
  const double sc = P->f.opt.reduction == FH_REDUCTION_MEAN ? (nv ? GRAD_LOSS / (double)nv : 0.0) : GRAD_LOSS;
  memset(out, 0, sizeof(double) * (size_t)V);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t y = P->f.targets[i];
    if (y == P->f.opt.ignore_index) continue;
    double m = -INFINITY, s = 0;
    for (int64_t j = 0; j < V; ++j) {
      z[j] = P->bias ? fh_load(P->bias, P->s.dtype, j) : 0.0;
      for (int64_t k = 0; k < D; ++k) z[j] += P->e64[i * D + k] * P->c64[j * D + k];
      m = fmax(m, z[j]);
    }
    for (int64_t j = 0; j < V; ++j) s += exp(z[j] - m);
    for (int64_t j = 0; j < V; ++j) out[j] += sc * fabs(exp(z[j] - m) / s - (j == y ? 1.0 : 0.0));
  }
  free(z);
}

static void check_case(int64_t N, int64_t V, int64_t D, fh_dtype_t dt, fh_reduction_t red, int bias, int pad) {
  lk_spec_t s = lk_default(N, V, D, dt);
  s.bias = bias, s.pad = pad;
  lk_problem_t P;
  lk_init(&P, &s);
  P.f.opt.reduction = red;
  if (dt == FH_DTYPE_F32) /* the naive logits from the exact fp32 values, as the baseline's GEMM */
    for (int64_t r = 0; r < N + V; ++r)
      for (int64_t k = 0; k < D; ++k) {
        const int64_t ld = D + pad;
        if (r < N) P.e64[r * D + k] = fh_load(P.E, dt, r * ld + k);
        else P.c64[(r - N) * D + k] = fh_load(P.C, dt, (r - N) * ld + k);
      }
  bl_result_t x, c;
  lk_grads_alloc(&x.g, &P), lk_grads_alloc(&c.g, &P);
  cr_assert_eq(run_baseline(&P, &x), FH_SUCCESS, "%s", fh_last_error());
  run_cpu(&P, &c);
  lk_fwd_t nf;
  lk_fwd_alloc(&nf, N);
  lk_naive_forward(&P, &nf);
  lk_bwd_in_t in;
  lk_bwd_in_make(&in, &P, 0, s.seed + 5);
  cr_assert_eq(in.gl[0], GRAD_LOSS);
  lk_grads_t n;
  lk_grads_alloc(&n, &P);
  lk_naive_backward(&P, &in, &nf, &n, 0.0, NULL);
  printf("baseline %s N=%lld V=%lld D=%lld %s%s%s: cpu loss %.9g, baseline %.9g\n",
         dt == FH_DTYPE_F32 ? "f32" : dt == FH_DTYPE_F16 ? "f16" : "bf16", (long long)N, (long long)V, (long long)D,
         red == FH_REDUCTION_MEAN ? "mean" : "sum", bias ? " bias" : "", pad ? " padded" : "", c.loss, x.loss);
  int ok = lk_compare("  loss", &x.loss, &c.loss, &nf.loss, 1, 2.0, (double)(D + V), NULL);
  ok &= lk_compare("  dE", x.g.dE, c.g.dE, n.dE, N * D, 2.0, (double)(D + V), NULL);
  ok &= lk_compare("  dC", x.g.dC, c.g.dC, n.dC, V * D, 2.0, (double)(D + V + N), NULL);
  if (bias) {
    double* extra = NULL;
    if (dt != FH_DTYPE_F32) {
      extra = malloc(sizeof(double) * (size_t)V);
      abs_g_colsum(&P, extra);
      const double u = dt == FH_DTYPE_F16 ? 0x1p-11 : 0x1p-8;
      for (int64_t j = 0; j < V; ++j) extra[j] = u * extra[j] + 2.0 * u * fabs(c.g.db[j]);
    }
    ok &= lk_compare("  dbias", x.g.db, c.g.db, n.db, V, 2.0, (double)(D + V + N), extra);
    free(extra);
  }
  if (dt == FH_DTYPE_F32) { /* naive := cpu: only the reordering term remains */
    ok &= lk_compare("  dE (fp32 bound)", x.g.dE, c.g.dE, c.g.dE, N * D, 0.0, 4.0 * (double)(D + V), NULL);
    ok &= lk_compare("  dC (fp32 bound)", x.g.dC, c.g.dC, c.g.dC, V * D, 0.0, 4.0 * (double)(D + V + N), NULL);
  }
  cr_expect(ok, "baseline outside its budget (lines above)");
  lk_grads_free(&n), lk_grads_free(&x.g), lk_grads_free(&c.g);
  lk_bwd_in_free(&in);
  lk_fwd_free(&nf);
  lk_free(&P);
}

Test(kernel_baseline_lce, f32_37x1000x19) { check_case(37, 1000, 19, FH_DTYPE_F32, FH_REDUCTION_MEAN, 1, 0); }
Test(kernel_baseline_lce, f16_37x1000x19) { check_case(37, 1000, 19, FH_DTYPE_F16, FH_REDUCTION_MEAN, 1, 0); }
Test(kernel_baseline_lce, bf16_37x1000x19) { check_case(37, 1000, 19, FH_DTYPE_BF16, FH_REDUCTION_MEAN, 1, 0); }
Test(kernel_baseline_lce, f32_130x101x136) { check_case(130, 101, 136, FH_DTYPE_F32, FH_REDUCTION_MEAN, 1, 0); }
Test(kernel_baseline_lce, f16_130x101x136) { check_case(130, 101, 136, FH_DTYPE_F16, FH_REDUCTION_MEAN, 1, 0); }
Test(kernel_baseline_lce, bf16_130x101x136) { check_case(130, 101, 136, FH_DTYPE_BF16, FH_REDUCTION_MEAN, 1, 0); }
/* sum reduction, no bias, strided E / C / dE / dC (NaN in the padding) */
Test(kernel_baseline_lce, sum_nobias_padded) {
  check_case(37, 1000, 19, FH_DTYPE_BF16, FH_REDUCTION_SUM, 0, 3);
  check_case(130, 101, 136, FH_DTYPE_F32, FH_REDUCTION_SUM, 0, 5);
}

/* Every row ignored: loss 0 (mean over no rows) and zero gradients; N = 0 likewise. */
Test(kernel_baseline_lce, all_ignored_and_empty) {
  for (int64_t N = 0; N <= 5; N += 5) {
    lk_spec_t s = lk_default(N, 101, 19, FH_DTYPE_F16);
    lk_problem_t P;
    lk_init(&P, &s);
    for (int64_t i = 0; i < N; ++i) P.f.targets[i] = P.f.opt.ignore_index;
    bl_result_t x;
    lk_grads_alloc(&x.g, &P);
    cr_assert_eq(run_baseline(&P, &x), FH_SUCCESS, "%s", fh_last_error());
    cr_expect_eq(x.loss, 0.0);
    int zero = 1;
    for (int64_t q = 0; q < N * 19; ++q) zero &= x.g.dE[q] == 0.0;
    for (int64_t q = 0; q < 101 * 19; ++q) zero &= x.g.dC[q] == 0.0;
    for (int64_t q = 0; q < 101; ++q) zero &= x.g.db[q] == 0.0;
    cr_expect(zero, "N=%lld: a gradient entry is not 0", (long long)N);
    lk_grads_free(&x.g);
    lk_free(&P);
  }
}

/* A target outside [0, V) raises the device flag (fh_context_check reports it) and its row is
 * treated as ignored: the loss equals the one with that row ignored. */
Test(kernel_baseline_lce, target_out_of_range) {
  lk_spec_t s = lk_default(37, 101, 19, FH_DTYPE_BF16);
  lk_problem_t P;
  lk_init(&P, &s);
  P.f.targets[3] = 101;
  bl_result_t x, y;
  lk_grads_alloc(&x.g, &P), lk_grads_alloc(&y.g, &P);
  cr_assert_eq(run_baseline(&P, &x), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "outside [0, V)") != NULL, "%s", fh_last_error());
  P.f.targets[3] = P.f.opt.ignore_index;
  cr_assert_eq(run_baseline(&P, &y), FH_SUCCESS, "%s", fh_last_error());
  lk_grads_free(&x.g), lk_grads_free(&y.g);
  lk_free(&P);
}

/* Bad calls return a status naming the function; none crashes. */
Test(kernel_baseline_lce, bad_arguments) {
  lk_spec_t s = lk_default(5, 11, 7, FH_DTYPE_F32);
  lk_problem_t P;
  lk_init(&P, &s);
  fh_baseline_lce_args_t a = args_of(&P);
  fh_context_t *cpu = NULL, *gpu = NULL;
  cr_assert_eq(fh_context_create(&cpu, FH_BACKEND_CPU, 0), FH_SUCCESS);
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS);
  size_t wsb = 0;
  cr_assert_eq(fh_baseline_lce_workspace_size(5, 11, FH_DTYPE_F32, &wsb), FH_SUCCESS);
  cr_expect_geq(wsb, 4u * 5u * 11u, "the workspace holds the fp32 logits");
  void* ws = calloc(1, wsb);
  float loss = 0, gl = 1;
  cr_expect_eq(fh_baseline_lce_forward(cpu, &a, &loss, ws, wsb), FH_ERR_UNSUPPORTED);
  cr_expect(strstr(fh_last_error(), "fh_baseline_lce_forward") != NULL, "%s", fh_last_error());
  cr_expect_eq(fh_baseline_lce_forward(gpu, &a, &loss, ws, wsb - 1), FH_ERR_INSUFFICIENT_WORKSPACE);
  cr_expect_eq(fh_baseline_lce_forward(gpu, &a, NULL, ws, wsb), FH_ERR_INVALID_ARGUMENT);
  cr_expect_eq(fh_baseline_lce_forward(NULL, &a, &loss, ws, wsb), FH_ERR_INVALID_ARGUMENT);
  a.reduction = FH_REDUCTION_NONE;
  cr_expect_eq(fh_baseline_lce_forward(gpu, &a, &loss, ws, wsb), FH_ERR_UNSUPPORTED);
  a.reduction = FH_REDUCTION_MEAN, a.dtype = FH_DTYPE_F64;
  cr_expect_eq(fh_baseline_lce_forward(gpu, &a, &loss, ws, wsb), FH_ERR_UNSUPPORTED);
  a.dtype = FH_DTYPE_F32, a.lde = 3;
  cr_expect_eq(fh_baseline_lce_forward(gpu, &a, &loss, ws, wsb), FH_ERR_INVALID_ARGUMENT);
  a.lde = 7;
  cr_expect_eq(fh_baseline_lce_backward(gpu, &a, NULL, NULL, 0, NULL, 0, NULL, ws, wsb), FH_ERR_INVALID_ARGUMENT);
  float dE[35];
  cr_expect_eq(fh_baseline_lce_backward(gpu, &a, &gl, dE, 6, NULL, 0, NULL, ws, wsb), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "ld_dE") != NULL, "%s", fh_last_error());
  a.bias = NULL;
  cr_expect_eq(fh_baseline_lce_backward(gpu, &a, &gl, NULL, 0, NULL, 0, dE, ws, wsb), FH_ERR_INVALID_ARGUMENT);
  free(ws);
  fh_context_destroy(cpu), fh_context_destroy(gpu);
  lk_free(&P);
}
