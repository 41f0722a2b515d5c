/* kernel_linear_ce_fwd: the CUDA linear cross-entropy forward (kernels/linear_ce_fwd.cu) under
 * the SIMT emulator, through the public API, against the fp64 CPU reference with the tolerance
 * rule of test_linear_ce_common.h (2x a naive same-precision computation + a stated γ_n floor).
 * Shapes cross every tile edge (64 rows, 64 classes, 32-wide D chunks, 16-wide fragments):
 * N in {1, 37, 130}, D in {8, 19, 136}, V in {1, 101, 1000, 4099}; peaked rows (target logit
 * raised by 10) and ignored rows in every problem. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "fh_emu.h"
#include "test_linear_ce_common.h"
#include "test_util.h"

static const fh_dtype_t DTYPES[3] = {FH_DTYPE_F32, FH_DTYPE_F16, FH_DTYPE_BF16};
static const char* const DNAME[3] = {"f32", "f16", "bf16"};

static fh_context_t* cuda_ctx(void) {
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  return ctx;
}

/* Raw fp64 logit r_ij of the stored inputs, and Σ_k |e_ik c_jk| (for error bounds). */
static double raw64(const lk_problem_t* P, int64_t i, int64_t j, double* sabs) {
  double r = 0, a = 0;
  for (int64_t k = 0; k < P->s.D; ++k) {
    const double t = fh_tensor_get(&P->tE, i, k) * fh_tensor_get(&P->tC, j, k);
    r += t, a += fabs(t);
  }
  if (sabs) *sabs = a;
  return r + (P->bias ? fh_tensor_get(&P->tb, 0, j) : 0.0);
}

/* Runs the CUDA forward, the reference and the naive computation and compares every output.
 * Returns 1 when all pass. */
static int check_forward(const char* label, lk_problem_t* P) {
  const int64_t N = P->s.N, V = P->s.V, D = P->s.D;
  const int none = P->f.opt.reduction == FH_REDUCTION_NONE;
  fh_context_t* ctx = cuda_ctx();
  lk_fwd_t k, r, n;
  lk_fwd_alloc(&k, N), lk_fwd_alloc(&r, N), lk_fwd_alloc(&n, N);
  cr_assert_eq(lk_run_forward(ctx, P, &k, NULL, NULL), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_check(ctx), FH_SUCCESS, "%s", fh_last_error());
  lk_ref_forward(P, &r);
  lk_naive_forward(P, &n);
  char nm[160];
  int ok = 1;
  const double terms = (double)(D + V), sum_terms = (double)(D + V + N);
  printf("[%s] N=%lld V=%lld D=%lld\n", label, (long long)N, (long long)V, (long long)D);
  snprintf(nm, sizeof nm, "%s lse", label);
  ok &= lk_compare(nm, k.lse, r.lse, n.lse, N, 2.0, terms, NULL);
  snprintf(nm, sizeof nm, "%s entropy", label);
  ok &= lk_compare(nm, k.entropy, r.entropy, n.entropy, N, 2.0, terms, NULL);
  if (none) {
    snprintf(nm, sizeof nm, "%s loss[i]", label);
    ok &= lk_compare(nm, k.loss_rows, r.loss_rows, n.loss_rows, N, 2.0, terms, NULL);
    snprintf(nm, sizeof nm, "%s z_loss[i]", label);
    ok &= lk_compare(nm, k.zloss_rows, r.zloss_rows, n.zloss_rows, N, 2.0, terms, NULL);
  } else {
    snprintf(nm, sizeof nm, "%s loss", label);
    ok &= lk_compare(nm, &k.loss, &r.loss, &n.loss, 1, 2.0, sum_terms, NULL);
    snprintf(nm, sizeof nm, "%s z_loss", label);
    ok &= lk_compare(nm, &k.z_loss, &r.z_loss, &n.z_loss, 1, 2.0, sum_terms, NULL);
  }
  /* argmax, tie-aware: the kernel's pick must be within the logit error of the true maximum
   * (2x the naive logit error of the row + the γ_D floor); -1 exactly at ignored rows. */
  int64_t n_valid = 0, correct = 0, differ = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (r.argmax[i] < 0) {
      ok &= k.argmax[i] == -1;
      continue;
    }
    ++n_valid;
    correct += k.argmax[i] == P->f.targets[i];
    if (k.argmax[i] == r.argmax[i]) continue;
    ++differ;
    double a1 = 0, a2 = 0;
    const double best = raw64(P, i, r.argmax[i], &a1);
    if (isnan(best)) {
      ok &= 0;
      printf("%s argmax row %lld: NaN row picked %lld, want %lld\n", label, (long long)i, (long long)k.argmax[i],
             (long long)r.argmax[i]);
      continue;
    }
    /* Error bound of a dot product of D terms: the three-piece split of fp32 inputs (fp32 only)
     * 2^-21·Σ|e c| (representation and dropped terms, generously), fp32 accumulation
     * γ_D·Σ|e c|; two logits compared, so twice. */
    const int in_range0 = k.argmax[i] >= 0 && k.argmax[i] < V;
    const double got = in_range0 ? raw64(P, i, k.argmax[i], &a2) : NAN;
    const double u = (P->s.dtype == FH_DTYPE_F32 ? 0x1p-21 : 0.0) + 0x1p-24 * (double)D;
    const double tol = 2.0 * u * fmax(a1, a2);
    const int in_range = k.argmax[i] >= 0 && k.argmax[i] < V;
    const int near = in_range && got >= best - tol;
    if (!near) printf("%s argmax row %lld: got %lld want %lld (not a near tie)\n", label, (long long)i,
                      (long long)k.argmax[i], (long long)r.argmax[i]);
    ok &= near;
  }
  const double acc_own = n_valid ? (double)correct / (double)n_valid : 0.0;
  printf("%s argmax: %lld of %lld valid rows differ from the reference (near ties); accuracy %.6f (ref %.6f)\n",
         label, (long long)differ, (long long)n_valid, k.accuracy, r.accuracy);
  ok &= fabs(k.accuracy - acc_own) <= 1e-7;
  lk_fwd_free(&k), lk_fwd_free(&r), lk_fwd_free(&n);
  fh_context_destroy(ctx);
  return ok;
}

typedef struct opt_cfg {
  const char* name;
  fh_reduction_t reduction;
  float softcap, smooth, scale, zloss, entropy, divisor;
  int64_t ignore_index; /* 0: default */
  int no_bias, cw, tw, pad;
} opt_cfg_t;

static void apply_cfg(lk_spec_t* s, fh_linear_ce_options_t* o, const opt_cfg_t* c) {
  if (c->no_bias) s->bias = 0;
  s->pad = c->pad;
  s->class_weights = c->cw, s->token_weights = c->tw;
  (void)o;
}
static void apply_opts(fh_linear_ce_options_t* o, const opt_cfg_t* c) {
  o->reduction = c->reduction;
  o->softcap = c->softcap;
  o->label_smoothing = c->smooth;
  o->logit_scale = c->scale > 0 ? c->scale : 1.0f;
  o->z_loss_scale = c->zloss;
  o->entropy_weight = c->entropy;
  o->divisor = c->divisor;
  if (c->ignore_index) o->ignore_index = c->ignore_index;
}

static void run_cfg(int64_t N, int64_t V, int64_t D, int dt, const opt_cfg_t* c) {
  lk_spec_t s = lk_default(N, V, D, DTYPES[dt]);
  apply_cfg(&s, NULL, c);
  lk_problem_t P;
  lk_init(&P, &s);
  apply_opts(&P.f.opt, c);
  if (c->ignore_index) /* move the ignored rows to the custom index */
    for (int64_t i = 0; i < N; ++i)
      if (P.f.targets[i] == -100) P.f.targets[i] = c->ignore_index;
  char label[128];
  snprintf(label, sizeof label, "%s/%s", c->name, DNAME[dt]);
  cr_expect(check_forward(label, &P), "%s failed (see the lines above)", label);
  lk_free(&P);
}

static const opt_cfg_t BASE = {"default", FH_REDUCTION_MEAN, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};

Test(kernel_linear_ce_fwd, shapes_every_tile_edge, .timeout = 600) {
  /* Every N, D, V value of the issue appears; each crosses a different tile edge. */
  static const int64_t shapes[][3] = {{1, 1, 8}, {37, 101, 19}, {130, 1000, 8}, {37, 4099, 136}, {130, 101, 136},
                                      {1, 4099, 19}};
  for (int dt = 0; dt < 3; ++dt)
    for (size_t q = 0; q < sizeof shapes / sizeof shapes[0]; ++q) {
      opt_cfg_t c = BASE;
      c.name = "shape";
      run_cfg(shapes[q][0], shapes[q][1], shapes[q][2], dt, &c);
    }
}

Test(kernel_linear_ce_fwd, every_option, .timeout = 600) {
  static const opt_cfg_t cfgs[] = {
      {"softcap2", FH_REDUCTION_MEAN, 2.0f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
      {"softcap30", FH_REDUCTION_MEAN, 30.0f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
      {"smoothing", FH_REDUCTION_MEAN, 0, 0.1f, 0, 0, 0, 0, 0, 0, 0, 0, 0},
      {"scale", FH_REDUCTION_MEAN, 0, 0, 0.5f, 0, 0, 0, 0, 0, 0, 0, 0},
      {"zloss", FH_REDUCTION_MEAN, 0, 0, 0, 1e-2f, 0, 0, 0, 0, 0, 0, 0},
      {"entropy", FH_REDUCTION_MEAN, 0, 0, 0, 0, 0.3f, 0, 0, 0, 0, 0, 0},
      {"class_w", FH_REDUCTION_MEAN, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0},
      {"token_w", FH_REDUCTION_MEAN, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0},
      {"divisor", FH_REDUCTION_MEAN, 0, 0, 0, 1e-2f, 0.2f, 10.0f, 0, 0, 0, 0, 0},
      {"sum", FH_REDUCTION_SUM, 0, 0, 0, 1e-2f, 0, 0, 0, 0, 0, 0, 0},
      {"none", FH_REDUCTION_NONE, 0, 0, 0, 1e-2f, 0, 0, 0, 0, 0, 0, 0},
      {"ignore5", FH_REDUCTION_MEAN, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0},
      {"no_bias", FH_REDUCTION_MEAN, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0},
      {"all", FH_REDUCTION_MEAN, 20.0f, 0.1f, 0.7f, 1e-3f, -0.1f, 0, 0, 0, 1, 1, 0},
      {"all_none", FH_REDUCTION_NONE, 20.0f, 0.1f, 0.7f, 1e-3f, 0.1f, 0, 0, 0, 1, 1, 0},
      {"all_sum", FH_REDUCTION_SUM, 5.0f, 0.2f, 1.5f, 1e-3f, 0.1f, 0, 0, 0, 1, 1, 0},
      {"strided", FH_REDUCTION_MEAN, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3},
  };
  for (int dt = 0; dt < 3; ++dt)
    for (size_t q = 0; q < sizeof cfgs / sizeof cfgs[0]; ++q) run_cfg(37, 101, 19, dt, &cfgs[q]);
  /* the combination again across more tiles */
  run_cfg(130, 1000, 19, 2, &cfgs[13]);
  run_cfg(130, 1000, 19, 0, &cfgs[16]);
}

Test(kernel_linear_ce_fwd, nan_row_propagates_and_stays_in_its_row) {
  for (int dt = 0; dt < 3; ++dt) {
    lk_spec_t s = lk_default(37, 101, 19, DTYPES[dt]);
    s.nan_row = 3;
    lk_problem_t P;
    lk_init(&P, &s);
    P.f.opt.reduction = FH_REDUCTION_NONE;
    cr_expect(check_forward(DNAME[dt], &P), "NaN row, reduction none");
    P.f.opt.reduction = FH_REDUCTION_MEAN;
    cr_expect(check_forward(DNAME[dt], &P), "NaN row, reduction mean (NaN loss)");
    lk_free(&P);
  }
}

Test(kernel_linear_ce_fwd, all_ignored_and_empty) {
  fh_context_t* ctx = cuda_ctx();
  for (int red = 0; red < 3; ++red) {
    lk_spec_t s = lk_default(37, 101, 19, FH_DTYPE_BF16);
    lk_problem_t P;
    lk_init(&P, &s);
    P.f.opt.reduction = (fh_reduction_t)red;
    P.f.opt.z_loss_scale = 0.1f;
    for (int64_t i = 0; i < 37; ++i) P.f.targets[i] = -100;
    lk_fwd_t k;
    lk_fwd_alloc(&k, 37);
    cr_assert_eq(lk_run_forward(ctx, &P, &k, NULL, NULL), FH_SUCCESS, "%s", fh_last_error());
    cr_expect(k.loss == 0.0 && k.z_loss == 0.0 && k.accuracy == 0.0, "all ignored: loss %g z %g acc %g", k.loss,
              k.z_loss, k.accuracy);
    for (int64_t i = 0; i < 37; ++i)
      cr_expect(k.lse[i] == 0.0 && k.entropy[i] == 0.0 && k.argmax[i] == -1 && k.loss_rows[i] == 0.0,
                "row %lld of an all-ignored batch", (long long)i);
    lk_fwd_free(&k);
    lk_free(&P);
  }
  lk_spec_t s = lk_default(0, 101, 19, FH_DTYPE_F32);
  lk_problem_t P;
  lk_init(&P, &s);
  lk_fwd_t k;
  lk_fwd_alloc(&k, 0);
  k.loss = 7;
  cr_assert_eq(lk_run_forward(ctx, &P, &k, NULL, NULL), FH_SUCCESS, "N = 0: %s", fh_last_error());
  cr_expect(k.loss == 0.0 && k.accuracy == 0.0, "N = 0 gives loss 0 (got %g)", k.loss);
  lk_fwd_free(&k);
  lk_free(&P);
  fh_context_destroy(ctx);
}

Test(kernel_linear_ce_fwd, target_out_of_range_raises_the_device_flag) {
  fh_context_t* ctx = cuda_ctx();
  const int64_t bad[2] = {101, -7};
  for (int q = 0; q < 2; ++q) {
    lk_spec_t s = lk_default(37, 101, 19, FH_DTYPE_F16);
    lk_problem_t P;
    lk_init(&P, &s);
    P.f.opt.reduction = FH_REDUCTION_NONE;
    P.f.targets[4] = bad[q];
    lk_fwd_t k;
    lk_fwd_alloc(&k, 37);
    cr_assert_eq(lk_run_forward(ctx, &P, &k, NULL, NULL), FH_SUCCESS, "the launch itself succeeds (asynchronous)");
    cr_expect_eq(fh_context_check(ctx), FH_ERR_INVALID_ARGUMENT, "target %lld must raise the flag",
                 (long long)bad[q]);
    cr_expect_eq(fh_context_check(ctx), FH_SUCCESS, "the flag is cleared once reported");
    cr_expect(k.loss_rows[4] == 0.0 && k.argmax[4] == -1, "the bad row is treated as ignored");
    lk_fwd_free(&k);
    lk_free(&P);
  }
  fh_context_destroy(ctx);
}

Test(kernel_linear_ce_fwd, bitwise_identical_across_block_orders) {
  lk_spec_t s = lk_default(130, 1000, 19, FH_DTYPE_BF16);
  lk_problem_t P;
  lk_init(&P, &s);
  P.f.opt.reduction = FH_REDUCTION_NONE;
  P.f.opt.label_smoothing = 0.1f;
  fh_context_t* ctx = cuda_ctx();
  lk_fwd_t a, b;
  lk_fwd_alloc(&a, 130), lk_fwd_alloc(&b, 130);
  fh_emu_set_seed(1);
  cr_assert_eq(lk_run_forward(ctx, &P, &a, NULL, NULL), FH_SUCCESS);
  fh_emu_set_seed(987654321);
  cr_assert_eq(lk_run_forward(ctx, &P, &b, NULL, NULL), FH_SUCCESS);
  cr_expect(lk_same_bits(a.lse, b.lse, 130) && lk_same_bits(a.loss_rows, b.loss_rows, 130) &&
                lk_same_bits(a.entropy, b.entropy, 130),
            "forward outputs differ between block orders");
  lk_fwd_free(&a), lk_fwd_free(&b);
  lk_free(&P);
  fh_context_destroy(ctx);
}

/* The tensor-core FLOPs the emulator counted equal the tile model exactly, and their ratio to
 * the analytic 2·N_valid·V·D is the padding overhead (printed). */
Test(kernel_linear_ce_fwd, tensor_core_flops) {
  static const int64_t shapes[][3] = {{130, 1000, 136}, {37, 4099, 19}};
  for (int dt = 0; dt < 3; ++dt)
    for (int q = 0; q < 2; ++q) {
      const int64_t N = shapes[q][0], V = shapes[q][1], D = shapes[q][2];
      lk_spec_t s = lk_default(N, V, D, DTYPES[dt]);
      lk_problem_t P;
      lk_init(&P, &s);
      fh_context_t* ctx = cuda_ctx();
      lk_fwd_t k;
      lk_fwd_alloc(&k, N);
      fh_emu_reset_counters();
      cr_assert_eq(lk_run_forward(ctx, &P, &k, NULL, NULL), FH_SUCCESS);
      const fh_emu_counters_t c = fh_emu_total_counters();
      int64_t nv = 0;
      for (int64_t i = 0; i < N; ++i) nv += P.f.targets[i] != -100;
      const uint64_t model = lk_engine_gemm_flops(N, nv, V, D, DTYPES[dt]);
      const double analytic = 2.0 * (double)nv * (double)V * (double)D;
      printf("forward tensor-core FLOPs %s N=%lld (valid %lld) V=%lld D=%lld: counted %llu, tile model %llu, "
             "analytic 2*Nv*V*D %.0f, counted/analytic %.3f\n",
             DNAME[dt], (long long)N, (long long)nv, (long long)V, (long long)D, (unsigned long long)c.mma_flops,
             (unsigned long long)model, analytic, (double)c.mma_flops / analytic);
      cr_expect_eq(c.mma_flops, model, "counted MMA FLOPs differ from the tile model");
      lk_fwd_free(&k);
      lk_free(&P);
      fh_context_destroy(ctx);
    }
}

/* Optional outputs left NULL are neither written nor needed: the loss alone equals, bit for bit,
 * the loss of a run that asked for everything (the same kernels run in the same order). */
Test(kernel_linear_ce_fwd, only_the_loss_requested) {
  for (int dt = 0; dt < 3; ++dt) {
    lk_spec_t s = lk_default(37, 101, 19, DTYPES[dt]);
    lk_problem_t P;
    lk_init(&P, &s);
    P.f.opt.label_smoothing = 0.1f, P.f.opt.z_loss_scale = 1e-2f, P.f.opt.entropy_weight = 0.2f;
    fh_context_t* ctx = cuda_ctx();
    lk_fwd_t full;
    lk_fwd_alloc(&full, 37);
    cr_assert_eq(lk_run_forward(ctx, &P, &full, NULL, NULL), FH_SUCCESS);
    float* loss = tu_alloc_guarded(sizeof(float));
    fh_linear_ce_outputs_t o = {loss, NULL, NULL, NULL, NULL, NULL};
    size_t wsb = 0;
    cr_assert_eq(fh_linear_ce_forward_workspace_size(ctx, &P.f.opt, 37, 101, 19, DTYPES[dt], &wsb), FH_SUCCESS);
    void* ws = tu_alloc_guarded(wsb);
    cr_assert_eq(fh_linear_ce_forward(ctx, &P.f.opt, &P.tE, &P.tC, &P.tb, P.f.targets, NULL, NULL, &o, ws, wsb),
                 FH_SUCCESS, "%s", fh_last_error());
    cr_expect(tu_guards_intact(loss, sizeof(float)) && tu_guards_intact(ws, wsb), "guard words");
    cr_expect((double)loss[0] == full.loss, "%s: loss %.9g alone vs %.9g with every output", DNAME[dt], loss[0],
              full.loss);
    free(loss), free(ws);
    lk_fwd_free(&full);
    lk_free(&P);
    fh_context_destroy(ctx);
  }
}
