/* gpu_linear_ce: the CUDA linear cross-entropy on a real device, through the public API with
 * device buffers, against the fp64 CPU reference with the tolerance rule of
 * tests/kernel/test_linear_ce_common.h (2x a naive same-precision computation + a γ_n floor).
 * A compact selection of the kernel_linear_ce_* cases (every dtype, every accumulation mode,
 * shapes that cross the 64-row / 64-class / 32-wide-D tile edges).
 *
 * Every test skips when no CUDA device is present (fh_context_create fails). The same file is
 * also built against the SIMT emulator (test_gpu_emu), where "device" buffers come from the
 * emulated cudaMalloc, so the device-memory path of the suite itself is exercised in CI. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>

#include "bench_cuda.h"
#include "test_linear_ce_common.h"

static void* gpu_alloc(size_t bytes) { return bc_malloc(bytes); }
static int gpu_to_device(void* dst, const void* src, size_t bytes) { return bc_copy_to_device(dst, src, bytes); }
static int gpu_to_host(void* dst, const void* src, size_t bytes) { return bc_copy_to_host(dst, src, bytes); }

/* A CUDA context on device 0 with the suite's device-memory hooks, or a skipped test. */
static fh_context_t* gpu_ctx(void) {
  fh_context_t* ctx = NULL;
  fh_status_t st = fh_context_create(&ctx, FH_BACKEND_CUDA, 0);
  if (st != FH_SUCCESS) cr_skip_test("no CUDA device: %s", fh_last_error());
  const lk_memory_t m = {gpu_alloc, bc_free, gpu_to_device, gpu_to_host};
  lk_set_memory(&m);
  return ctx;
}

static const fh_dtype_t DTYPES[3] = {FH_DTYPE_F32, FH_DTYPE_F16, FH_DTYPE_BF16};
static const char* const DNAME[3] = {"f32", "f16", "bf16"};

static int forward_case(fh_context_t* ctx, const char* label, const lk_spec_t* s, lk_fwd_t* k, lk_fwd_t* r,
                        float* lse32, float* ent32, lk_problem_t* P) {
  lk_init(P, s);
  const int64_t N = s->N;
  lk_fwd_t n;
  lk_fwd_alloc(k, N), lk_fwd_alloc(r, N), lk_fwd_alloc(&n, N);
  cr_assert_eq(lk_run_forward(ctx, P, k, lse32, ent32), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_check(ctx), FH_SUCCESS, "%s", fh_last_error());
  lk_ref_forward(P, r);
  lk_naive_forward(P, &n);
  const double terms = (double)(s->D + s->V);
  char nm[128];
  int ok = 1;
  snprintf(nm, sizeof nm, "%s lse", label);
  ok &= lk_compare(nm, k->lse, r->lse, n.lse, N, 2.0, terms, NULL);
  snprintf(nm, sizeof nm, "%s entropy", label);
  ok &= lk_compare(nm, k->entropy, r->entropy, n.entropy, N, 2.0, terms, NULL);
  snprintf(nm, sizeof nm, "%s loss", label);
  ok &= lk_compare(nm, &k->loss, &r->loss, &n.loss, 1, 2.0, terms, NULL);
  lk_fwd_free(&n);
  return ok;
}

Test(gpu_linear_ce, forward_every_dtype, .timeout = 600) {
  fh_context_t* ctx = gpu_ctx();
  const int64_t shapes[2][3] = {{130, 1000, 136}, {37, 4099, 19}};
  int ok = 1;
  for (int d = 0; d < 3; ++d)
    for (int q = 0; q < 2; ++q) {
      lk_spec_t s = lk_default(shapes[q][0], shapes[q][1], shapes[q][2], DTYPES[d]);
      lk_problem_t P;
      lk_fwd_t k, r;
      char label[64];
      snprintf(label, sizeof label, "gpu/%s %lldx%lldx%lld", DNAME[d], (long long)s.N, (long long)s.V,
               (long long)s.D);
      ok &= forward_case(ctx, label, &s, &k, &r, NULL, NULL, &P);
      lk_fwd_free(&k), lk_fwd_free(&r), lk_free(&P);
    }
  lk_set_memory(NULL);
  fh_context_destroy(ctx);
  cr_assert(ok, "a forward output exceeds its error budget (see the lines above)");
}

/* Backward in one accumulation mode: dE, dC, dbias against the reference. */
static int backward_case(fh_context_t* ctx, fh_dtype_t dt, const char* dname, fh_accum_mode_t mode) {
  lk_spec_t s = lk_default(130, 1000, 136, dt);
  lk_problem_t P;
  lk_fwd_t k, r;
  const int64_t N = s.N, V = s.V, D = s.D;
  float* lse32 = malloc(sizeof(float) * (size_t)N);
  float* ent32 = malloc(sizeof(float) * (size_t)N);
  char label[64];
  snprintf(label, sizeof label, "gpu/%s mode %d", dname, (int)mode);
  int ok = forward_case(ctx, label, &s, &k, &r, lse32, ent32, &P);
  P.f.opt.accum_mode = mode;
  P.f.opt.filter_eps = 0.0f; /* the filter and its bound are kernel_linear_ce_bwd's subject */
  int64_t nv = 0;
  for (int64_t i = 0; i < N; ++i) nv += P.f.targets[i] != P.f.opt.ignore_index;
  lk_bwd_in_t in;
  lk_bwd_in_make(&in, &P, 0, 99);
  lk_grads_t g, gr, gn;
  lk_grads_alloc(&g, &P), lk_grads_alloc(&gr, &P), lk_grads_alloc(&gn, &P);
  lk_fwd_t nf;
  lk_fwd_alloc(&nf, N);
  lk_naive_forward(&P, &nf);
  cr_assert_eq(lk_run_backward(ctx, &P, &in, lse32, ent32, 7, NULL, &g), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_check(ctx), FH_SUCCESS, "%s", fh_last_error());
  lk_ref_backward(&P, &in, &r, &gr);
  lk_naive_backward(&P, &in, &nf, &gn, 0.0, NULL);
  /* OUTPUT_DTYPE rounds once per 64-class tile (dE) or 64-row block (dC): its documented error
   * is that many naive roundings, the bound kernel_linear_ce_bwd states. */
  const double fE = mode == FH_ACCUM_OUTPUT_DTYPE && dt != FH_DTYPE_F32 ? 2.0 * (double)((V + 63) / 64) : 2.0;
  const double fC = mode == FH_ACCUM_OUTPUT_DTYPE && dt != FH_DTYPE_F32 ? 2.0 * (double)((nv + 63) / 64) : 2.0;
  char nm[96];
  snprintf(nm, sizeof nm, "%s dE", label);
  ok &= lk_compare(nm, g.dE, gr.dE, gn.dE, N * D, fE, (double)(D + V), NULL);
  snprintf(nm, sizeof nm, "%s dC", label);
  ok &= lk_compare(nm, g.dC, gr.dC, gn.dC, V * D, fC, (double)(D + N), NULL);
  snprintf(nm, sizeof nm, "%s dbias", label);
  ok &= lk_compare(nm, g.db, gr.db, gn.db, V, 2.0, (double)(D + N), NULL);
  lk_grads_free(&g), lk_grads_free(&gr), lk_grads_free(&gn), lk_fwd_free(&nf);
  lk_bwd_in_free(&in), lk_fwd_free(&k), lk_fwd_free(&r), lk_free(&P);
  free(lse32), free(ent32);
  return ok;
}

Test(gpu_linear_ce, backward_every_mode, .timeout = 600) {
  fh_context_t* ctx = gpu_ctx();
  int ok = 1;
  for (int d = 0; d < 3; ++d)
    for (int m = 0; m < FH_ACCUM_MODE_COUNT; ++m) ok &= backward_case(ctx, DTYPES[d], DNAME[d], (fh_accum_mode_t)m);
  lk_set_memory(NULL);
  fh_context_destroy(ctx);
  cr_assert(ok, "a gradient exceeds its error budget (see the lines above)");
}
