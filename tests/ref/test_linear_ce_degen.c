/* Degenerate and hostile inputs for linear cross-entropy on the CPU backend: N=0, V=1, every
 * row ignored, zero weights, NaN rows (valid and ignored), huge logits, strided tensors with
 * NaN-poisoned padding, and guard words after every output. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "lce_fixture.h"
#include "test_util.h"

static fh_context_t* cpu_ctx(void) {
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  return ctx;
}

static void all_options(fh_linear_ce_options_t* o) {
  o->softcap = 4.0f;
  o->label_smoothing = 0.125f;
  o->logit_scale = 0.75f;
  o->z_loss_scale = 0.03f;
  o->entropy_weight = 0.2f;
}

/* Every public output of a forward, guarded, plus the backward's gradients, guarded. */
typedef struct outs {
  int64_t N, V, D;
  float *loss, *lse, *ent, *zl, *acc;
  int64_t* am;
  float *dE, *dC, *db;
} outs_t;

static void outs_alloc(outs_t* o, int64_t N, int64_t V, int64_t D, int none) {
  const size_t n = (size_t)(none && N > 0 ? N : 1);
  o->N = N;
  o->V = V;
  o->D = D;
  o->loss = (float*)tu_alloc_guarded(n * 4);
  o->zl = (float*)tu_alloc_guarded(n * 4);
  o->lse = (float*)tu_alloc_guarded((size_t)N * 4);
  o->ent = (float*)tu_alloc_guarded((size_t)N * 4);
  o->acc = (float*)tu_alloc_guarded(4);
  o->am = (int64_t*)tu_alloc_guarded((size_t)N * 8);
  o->dE = (float*)tu_alloc_guarded((size_t)(N * D) * 4);
  o->dC = (float*)tu_alloc_guarded((size_t)(V * D) * 4);
  o->db = (float*)tu_alloc_guarded((size_t)V * 4);
  /* garbage the calls must overwrite */
  for (int64_t k = 0; k < N * D; ++k) o->dE[k] = 12345.0f;
  for (int64_t k = 0; k < V * D; ++k) o->dC[k] = 12345.0f;
  for (int64_t k = 0; k < V; ++k) o->db[k] = 12345.0f;
  o->acc[0] = 12345.0f;
  o->loss[0] = 12345.0f;
}

static void outs_check_guards(const outs_t* o, int none) {
  const size_t n = (size_t)(none && o->N > 0 ? o->N : 1);
  cr_expect(tu_guards_intact(o->loss, n * 4), "loss guard");
  cr_expect(tu_guards_intact(o->zl, n * 4), "z_loss guard");
  cr_expect(tu_guards_intact(o->lse, (size_t)o->N * 4), "lse guard");
  cr_expect(tu_guards_intact(o->ent, (size_t)o->N * 4), "entropy guard");
  cr_expect(tu_guards_intact(o->acc, 4), "accuracy guard");
  cr_expect(tu_guards_intact(o->am, (size_t)o->N * 8), "argmax guard");
  cr_expect(tu_guards_intact(o->dE, (size_t)(o->N * o->D) * 4), "dE guard");
  cr_expect(tu_guards_intact(o->dC, (size_t)(o->V * o->D) * 4), "dC guard");
  cr_expect(tu_guards_intact(o->db, (size_t)o->V * 4), "dbias guard");
}

static void outs_free(outs_t* o) {
  free(o->loss);
  free(o->zl);
  free(o->lse);
  free(o->ent);
  free(o->acc);
  free(o->am);
  free(o->dE);
  free(o->dC);
  free(o->db);
}

/* Forward then backward (grad_loss 1, or all ones for none; grad_lse = the lse output when
 * `with_glse`) through the public API. */
static void run_api(fh_context_t* ctx, const lce_fix_t* f, outs_t* o, int with_glse) {
  fh_linear_ce_outputs_t out = {o->loss, o->lse, o->ent, o->zl, o->am, o->acc};
  cr_assert_eq(lce_fix_api_forward(ctx, f, &out), FH_SUCCESS, "%s", fh_last_error());
  float* gl = (float*)calloc((size_t)(f->N > 0 ? f->N : 1), sizeof(float));
  for (int64_t i = 0; i < (f->N > 0 ? f->N : 1); ++i) gl[i] = 1.0f;
  fh_tensor_t tE = fh_tensor_2d(o->dE, FH_DTYPE_F32, f->N, f->D), tC = fh_tensor_2d(o->dC, FH_DTYPE_F32, f->V, f->D),
              tb = fh_tensor_2d(o->db, FH_DTYPE_F32, 1, f->V);
  fh_linear_ce_grad_inputs_t in = {o->lse, o->ent, gl, with_glse ? o->lse : NULL};
  fh_linear_ce_grads_t g = {&tE, &tC, f->bias ? &tb : NULL};
  cr_assert_eq(lce_fix_api_backward(ctx, f, &in, &g), FH_SUCCESS, "%s", fh_last_error());
  free(gl);
  outs_check_guards(o, f->opt.reduction == FH_REDUCTION_NONE);
}

static int all_zero(const float* x, int64_t n) {
  for (int64_t k = 0; k < n; ++k)
    if (x[k] != 0.0f) return 0;
  return 1;
}

Test(ref_linear_ce_degen, n_zero) {
  fh_context_t* ctx = cpu_ctx();
  for (int red = 0; red < FH_REDUCTION_COUNT; ++red) {
    lce_fix_spec_t s = lce_fix_default_spec(301);
    s.N = 0;
    s.class_weights = s.token_weights = 1;
    lce_fix_t f;
    lce_fix_init(&f, &s);
    all_options(&f.opt);
    f.opt.reduction = (fh_reduction_t)red;
    outs_t o;
    outs_alloc(&o, 0, f.V, f.D, red == FH_REDUCTION_NONE);
    run_api(ctx, &f, &o, 1);
    if (red != FH_REDUCTION_NONE) {
      cr_expect_eq(o.loss[0], 0.0f, "loss %g", (double)o.loss[0]);
      cr_expect_eq(o.zl[0], 0.0f);
    } else {
      cr_expect_eq(o.loss[0], 12345.0f, "none with N = 0 writes nothing");
    }
    cr_expect_eq(o.acc[0], 0.0f);
    cr_expect(all_zero(o.dC, f.V * f.D) && all_zero(o.db, f.V), "dC, dbias of an empty batch are 0");
    outs_free(&o);
    lce_fix_free(&f);
  }
  fh_context_destroy(ctx);
}

/* V = 1: p = 1, so CE, smoothing and entropy vanish and only the z-loss λ z² remains, with
 * gradient 2λ z ∂z; argmax 0. */
Test(ref_linear_ce_degen, v_one) {
  fh_context_t* ctx = cpu_ctx();
  lce_fix_spec_t s = lce_fix_default_spec(302);
  s.N = 6;
  s.V = 1;
  s.D = 3;
  s.every_ignored = 0;
  lce_fix_t f;
  lce_fix_init(&f, &s);
  f.opt.label_smoothing = 0.5f;
  f.opt.entropy_weight = 0.7f;
  outs_t o;
  outs_alloc(&o, f.N, 1, f.D, 0);
  run_api(ctx, &f, &o, 0);
  cr_expect_eq(o.loss[0], 0.0f, "loss %g", (double)o.loss[0]);
  cr_expect_eq(o.acc[0], 1.0f);
  for (int64_t i = 0; i < f.N; ++i) {
    double z = f.bias[0];
    for (int64_t k = 0; k < f.D; ++k) z += (double)f.E[i * f.D + k] * f.C[k];
    cr_expect_eq(o.am[i], 0);
    cr_expect_eq(o.ent[i], 0.0f);
    cr_expect_eq(o.lse[i], (float)z, "lse of one logit is the logit");
  }
  /* The public backward reads the fp32 lse, so p = exp(z − fl32(z)) = 1 + O(2^-24 |z|): the
   * gradients are rounding-sized there (|z| < 4, |E|, |C| < 4, 6 rows: < 1e-5), and exactly 0
   * from the fp64 core below. */
  double gmax = 0;
  for (int64_t k = 0; k < f.N * f.D; ++k) gmax = fmax(gmax, fabs(o.dE[k]));
  for (int64_t k = 0; k < f.D; ++k) gmax = fmax(gmax, fabs(o.dC[k]));
  gmax = fmax(gmax, fabs(o.db[0]));
  cr_expect(gmax < 1e-5, "public gradients %g", gmax);
  outs_free(&o);
  {
    lce_fwd64_t r0;
    lce_fwd64_alloc(&r0, f.N);
    cr_assert_eq(lce_fix_forward64(&f, &r0), FH_SUCCESS);
    double dE[6 * 3], dC[3], db0 = 1;
    const double g1 = 1.0;
    fh_lce_problem_t p0 = lce_fix_problem(&f);
    cr_assert_eq(fh_ref_lce_backward_f64(&p0, r0.r.lse, r0.r.entropy, &g1, NULL, dE, dC, &db0, NULL), FH_SUCCESS);
    int nz = db0 != 0;
    for (int k = 0; k < 18; ++k) nz += dE[k] != 0;
    for (int k = 0; k < 3; ++k) nz += dC[k] != 0;
    cr_expect_eq(nz, 0, "fp64 gradients with V = 1 must vanish exactly");
    lce_fwd64_free(&r0);
  }
  /* z-loss: loss = λ mean z², dbias = 2λ mean z (sum reduction here: 2λ Σ z) */
  f.opt.z_loss_scale = 0.25f;
  f.opt.reduction = FH_REDUCTION_SUM;
  lce_fwd64_t r;
  lce_fwd64_alloc(&r, f.N);
  cr_assert_eq(lce_fix_forward64(&f, &r), FH_SUCCESS);
  double zs = 0, z2 = 0;
  for (int64_t i = 0; i < f.N; ++i) {
    double z = f.bias[0];
    for (int64_t k = 0; k < f.D; ++k) z += (double)f.E[i * f.D + k] * f.C[k];
    zs += z;
    z2 += z * z;
  }
  cr_expect(fabs(r.r.loss - 0.25 * z2) <= 1e-12, "loss %.17g want %.17g", r.r.loss, 0.25 * z2);
  double db = 0;
  const double gl = 1.0;
  fh_lce_problem_t p = lce_fix_problem(&f);
  cr_assert_eq(fh_ref_lce_backward_f64(&p, r.r.lse, r.r.entropy, &gl, NULL, NULL, NULL, &db, NULL), FH_SUCCESS);
  cr_expect(fabs(db - 0.5 * zs) <= 1e-12, "dbias %.17g want %.17g", db, 0.5 * zs);
  lce_fwd64_free(&r);
  lce_fix_free(&f);
  fh_context_destroy(ctx);
}

/* Every row ignored, or every weight 0: loss 0, gradients 0, accuracy 0, nothing NaN. */
Test(ref_linear_ce_degen, all_ignored_and_zero_weights) {
  fh_context_t* ctx = cpu_ctx();
  for (int variant = 0; variant < 2; ++variant)
    for (int red = 0; red < FH_REDUCTION_COUNT; ++red) {
      lce_fix_spec_t s = lce_fix_default_spec(303);
      s.token_weights = 1;
      s.class_weights = 1;
      lce_fix_t f;
      lce_fix_init(&f, &s);
      all_options(&f.opt);
      f.opt.reduction = (fh_reduction_t)red;
      for (int64_t i = 0; i < f.N; ++i) {
        if (variant == 0) f.targets[i] = -100;
        else f.tw[i] = 0.0f;
      }
      outs_t o;
      outs_alloc(&o, f.N, f.V, f.D, red == FH_REDUCTION_NONE);
      /* grad_lse is not weighted (header), so only the all-ignored variant may pass one */
      run_api(ctx, &f, &o, variant == 0);
      const int64_t nl = red == FH_REDUCTION_NONE ? f.N : 1;
      cr_expect(all_zero(o.loss, nl) && all_zero(o.zl, nl), "variant %d red %d: loss must be 0, is %g", variant, red,
                (double)o.loss[0]);
      cr_expect(all_zero(o.dE, f.N * f.D) && all_zero(o.dC, f.V * f.D) && all_zero(o.db, f.V),
                "variant %d red %d: gradients must be 0", variant, red);
      if (variant == 0) {
        cr_expect_eq(o.acc[0], 0.0f, "accuracy of no valid row");
        cr_expect(all_zero(o.lse, f.N) && all_zero(o.ent, f.N), "lse/entropy 0 at ignored rows");
        for (int64_t i = 0; i < f.N; ++i) cr_expect_eq(o.am[i], -1);
      } else {
        for (int64_t i = 0; i < f.N; ++i)
          if (f.targets[i] != -100) cr_expect(isfinite(o.lse[i]) && o.lse[i] != 0.0f, "valid rows keep lse");
      }
      outs_free(&o);
      lce_fix_free(&f);
    }
  fh_context_destroy(ctx);
}

/* A NaN in a valid row reaches that row's loss, lse, dE row, and the mean; other rows are
 * bit-identical to a clean run; an ignored NaN row changes nothing. */
Test(ref_linear_ce_degen, nan_row) {
  lce_fix_spec_t s = lce_fix_default_spec(304);
  lce_fix_t f;
  lce_fix_init(&f, &s);
  all_options(&f.opt);
  f.opt.reduction = FH_REDUCTION_NONE;
  const int64_t N = f.N, D = f.D, V = f.V, bad = 4;
  cr_assert_neq(f.targets[bad], -100);
  lce_fwd64_t clean, dirty;
  lce_fwd64_alloc(&clean, N);
  lce_fwd64_alloc(&dirty, N);
  double* gl = (double*)calloc((size_t)N, sizeof(double));
  for (int64_t i = 0; i < N; ++i) gl[i] = 1.0;
  double* dE0 = (double*)calloc((size_t)(N * D), sizeof(double));
  double* dE1 = (double*)calloc((size_t)(N * D), sizeof(double));
  double* dC1 = (double*)calloc((size_t)(V * D), sizeof(double));
  fh_lce_problem_t p = lce_fix_problem(&f);
  cr_assert_eq(lce_fix_forward64(&f, &clean), FH_SUCCESS);
  cr_assert_eq(fh_ref_lce_backward_f64(&p, clean.r.lse, clean.r.entropy, gl, NULL, dE0, NULL, NULL, NULL), FH_SUCCESS);
  const float keep = f.E[bad * D + 3];
  f.E[bad * D + 3] = NAN;
  cr_assert_eq(lce_fix_forward64(&f, &dirty), FH_SUCCESS);
  cr_assert_eq(fh_ref_lce_backward_f64(&p, dirty.r.lse, dirty.r.entropy, gl, NULL, dE1, dC1, NULL, NULL), FH_SUCCESS);
  cr_expect(isnan(dirty.r.row_loss[bad]) && isnan(dirty.r.lse[bad]), "NaN row's loss and lse");
  cr_expect(isnan(dirty.r.loss), "the none-sum includes the NaN row");
  int other = 0, nanE = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (i == bad) continue;
    other += dirty.r.row_loss[i] != clean.r.row_loss[i] || dirty.r.lse[i] != clean.r.lse[i];
    for (int64_t k = 0; k < D; ++k) other += dE1[i * D + k] != dE0[i * D + k];
  }
  for (int64_t k = 0; k < D; ++k) nanE += isnan(dE1[bad * D + k]);
  cr_expect_eq(other, 0, "other rows must be unaffected in none mode");
  cr_expect_eq(nanE, D, "the NaN row's dE is NaN");
  /* mean */
  f.opt.reduction = FH_REDUCTION_MEAN;
  cr_assert_eq(lce_fix_forward64(&f, &dirty), FH_SUCCESS);
  cr_expect(isnan(dirty.r.loss), "mean must be NaN");
  /* the same row ignored: nothing propagates; equal to the clean run with the row ignored */
  f.targets[bad] = -100;
  cr_assert_eq(lce_fix_forward64(&f, &dirty), FH_SUCCESS);
  f.E[bad * D + 3] = keep;
  cr_assert_eq(lce_fix_forward64(&f, &clean), FH_SUCCESS);
  cr_expect(isfinite(dirty.r.loss) && dirty.r.loss == clean.r.loss, "ignored NaN row: %g vs %g", dirty.r.loss,
            clean.r.loss);
  f.E[bad * D + 3] = NAN;
  p = lce_fix_problem(&f);
  cr_assert_eq(fh_ref_lce_backward_f64(&p, dirty.r.lse, dirty.r.entropy, gl, NULL, dE1, dC1, NULL, NULL), FH_SUCCESS);
  int nonfinite = 0;
  for (int64_t k = 0; k < N * D; ++k) nonfinite += !isfinite(dE1[k]);
  for (int64_t k = 0; k < V * D; ++k) nonfinite += !isfinite(dC1[k]);
  cr_expect_eq(nonfinite, 0, "ignored NaN row leaks into gradients");
  free(gl);
  free(dE0);
  free(dE1);
  free(dC1);
  lce_fwd64_free(&clean);
  lce_fwd64_free(&dirty);
  lce_fix_free(&f);
}

/* Logits of ±1e4 (exact in fp32): the streaming log-sum-exp must not overflow.
 * Row 0: z = (1e4, 9999, −1e4, 0), target 1: lse = 1e4 + log1p(e^-1), loss = 1 + log1p(e^-1).
 * Row 1: z = (−1e4, −9999, 1e4, 0), target 0: lse = 1e4 (the rest underflows), loss = 2e4.
 * Tolerance: lse ≈ 1e4 has an ulp of 1.8e-12, so allow 8e-12 (a few ulps) on lse and loss. */
Test(ref_linear_ce_degen, huge_logits) {
  float E[2] = {1, -1}, C[4] = {10000, 9999, -10000, 0};
  fh_tensor_t tE = fh_tensor_2d(E, FH_DTYPE_F32, 2, 1), tC = fh_tensor_2d(C, FH_DTYPE_F32, 4, 1);
  int64_t targets[2] = {1, 0};
  fh_lce_problem_t p;
  memset(&p, 0, sizeof p);
  p.N = 2;
  p.V = 4;
  p.D = 1;
  p.E = &tE;
  p.C = &tC;
  p.targets = targets;
  fh_linear_ce_options_init(&p.opt);
  p.opt.reduction = FH_REDUCTION_NONE;
  p.opt.z_loss_scale = 0.5f;
  lce_fwd64_t r;
  lce_fwd64_alloc(&r, 2);
  cr_assert_eq(fh_ref_lce_forward_f64(&p, &r.r), FH_SUCCESS);
  const double l0 = 1e4 + log1p(exp(-1.0)), l1 = 1e4;
  cr_expect(fabs(r.r.lse[0] - l0) <= 8e-12 && fabs(r.r.lse[1] - l1) <= 8e-12, "lse %.17g %.17g", r.r.lse[0],
            r.r.lse[1]);
  cr_expect(fabs(r.r.row_loss[0] - (l0 - 9999 + 0.5 * l0 * l0)) <= 8e-12 * l0, "row 0 %.17g", r.r.row_loss[0]);
  cr_expect(fabs(r.r.row_loss[1] - (2e4 + 0.5 * l1 * l1)) <= 8e-12 * l1, "row 1 %.17g", r.r.row_loss[1]);
  cr_expect_eq(r.r.argmax[0], 0);
  cr_expect_eq(r.r.argmax[1], 2);
  /* gradient: dE_0 = Σ_j G_0j C_j with G = (1 + 2λ lse) p − δ_y (sum over valid rows, g = 1) */
  const double gl[2] = {1, 1};
  double dE[2];
  cr_assert_eq(fh_ref_lce_backward_f64(&p, r.r.lse, r.r.entropy, gl, NULL, dE, NULL, NULL, NULL), FH_SUCCESS);
  const double p0 = 1 / (1 + exp(-1.0)), p1 = exp(-1.0) / (1 + exp(-1.0)), k0 = 1 + l0;
  const double want0 = k0 * (p0 * 10000 + p1 * 9999) - 9999;
  const double want1 = (1 + l1) * (-10000) - 10000; /* p = e_2 at row 1: z_2 = 1e4 from C_2 = −1e4 */
  cr_expect(fabs(dE[0] - want0) <= 1e-12 * fabs(want0), "dE0 %.17g want %.17g", dE[0], want0);
  cr_expect(fabs(dE[1] - want1) <= 1e-12 * fabs(want1), "dE1 %.17g want %.17g", dE[1], want1);
  lce_fwd64_free(&r);
}

/* row_stride > cols with NaN in the padding: identical results to the dense layout, and the
 * padding of strided gradient outputs is left alone. */
static void strided_case(fh_dtype_t dtype) {
  fh_context_t* ctx = cpu_ctx();
  lce_fix_spec_t s = lce_fix_default_spec(305);
  s.class_weights = 1;
  lce_fix_t f32, f;
  lce_fix_init(&f32, &s);
  lce_fix_round_to_bf16(&f32);
  all_options(&f32.opt);
  lce_fix_convert(&f32, dtype, &f);
  const int64_t N = f.N, V = f.V, D = f.D, sE = D + 3, sC = D + 5, sb = V + 2, sg = D + 2;
  const size_t es = fh_dtype_size(dtype);
  unsigned char *E = (unsigned char*)malloc((size_t)(N * sE) * es), *C = (unsigned char*)malloc((size_t)(V * sC) * es),
                *b = (unsigned char*)malloc((size_t)sb * es);
  for (int64_t k = 0; k < N * sE; ++k) fh_store(E, dtype, k, NAN);
  for (int64_t k = 0; k < V * sC; ++k) fh_store(C, dtype, k, NAN);
  for (int64_t k = 0; k < sb; ++k) fh_store(b, dtype, k, NAN);
  for (int64_t i = 0; i < N; ++i) memcpy(E + (size_t)(i * sE) * es, (unsigned char*)f.E + (size_t)(i * D) * es, (size_t)D * es);
  for (int64_t j = 0; j < V; ++j) memcpy(C + (size_t)(j * sC) * es, (unsigned char*)f.C + (size_t)(j * D) * es, (size_t)D * es);
  memcpy(b, f.bias, (size_t)V * es);
  lce_fix_t g = f;
  g.tE = (fh_tensor_t){E, dtype, N, D, sE};
  g.tC = (fh_tensor_t){C, dtype, V, D, sC};
  g.tb = (fh_tensor_t){b, dtype, 1, V, sb};
  float la, lb, lse_a[37], lse_b[37], ea[37], eb[37];
  fh_linear_ce_outputs_t oa = {&la, lse_a, ea, NULL, NULL, NULL}, ob = {&lb, lse_b, eb, NULL, NULL, NULL};
  cr_assert_eq(lce_fix_api_forward(ctx, &f, &oa), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(lce_fix_api_forward(ctx, &g, &ob), FH_SUCCESS, "%s", fh_last_error());
  cr_expect(la == lb && isfinite(lb), "loss dense %g strided %g", (double)la, (double)lb);
  cr_expect(memcmp(lse_a, lse_b, sizeof lse_a) == 0 && memcmp(ea, eb, sizeof ea) == 0, "lse / entropy");
  /* gradients: dense vs strided outputs whose padding holds a sentinel */
  const float one = 1.0f;
  fh_linear_ce_grad_inputs_t in = {lse_a, ea, &one, NULL};
  unsigned char *dEa = (unsigned char*)calloc((size_t)(N * D), es), *dCa = (unsigned char*)calloc((size_t)(V * D), es);
  unsigned char *dEb = (unsigned char*)malloc((size_t)(N * sg) * es), *dCb = (unsigned char*)malloc((size_t)(V * sg) * es);
  memset(dEb, 0x7B, (size_t)(N * sg) * es);
  memset(dCb, 0x7B, (size_t)(V * sg) * es);
  fh_tensor_t tEa = fh_tensor_2d(dEa, dtype, N, D), tCa = fh_tensor_2d(dCa, dtype, V, D);
  fh_tensor_t tEb = {dEb, dtype, N, D, sg}, tCb = {dCb, dtype, V, D, sg};
  fh_linear_ce_grads_t ga = {&tEa, &tCa, NULL}, gb = {&tEb, &tCb, NULL};
  cr_assert_eq(lce_fix_api_backward(ctx, &f, &in, &ga), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(lce_fix_api_backward(ctx, &g, &in, &gb), FH_SUCCESS, "%s", fh_last_error());
  int diff = 0, pad = 0;
  for (int64_t i = 0; i < N; ++i) {
    diff += memcmp(dEb + (size_t)(i * sg) * es, dEa + (size_t)(i * D) * es, (size_t)D * es) != 0;
    for (size_t k = (size_t)D * es; k < (size_t)sg * es; ++k) pad += dEb[(size_t)(i * sg) * es + k] != 0x7B;
  }
  for (int64_t j = 0; j < V; ++j) {
    diff += memcmp(dCb + (size_t)(j * sg) * es, dCa + (size_t)(j * D) * es, (size_t)D * es) != 0;
    for (size_t k = (size_t)D * es; k < (size_t)sg * es; ++k) pad += dCb[(size_t)(j * sg) * es + k] != 0x7B;
  }
  cr_expect_eq(diff, 0, "dtype %d: %d strided gradient rows differ from dense", (int)dtype, diff);
  cr_expect_eq(pad, 0, "dtype %d: %d padding bytes of gradient outputs written", (int)dtype, pad);
  free(E);
  free(C);
  free(b);
  free(dEa);
  free(dCa);
  free(dEb);
  free(dCb);
  lce_fix_free_converted(&f);
  lce_fix_free(&f32);
  fh_context_destroy(ctx);
}

Test(ref_linear_ce_degen, strided_poisoned_padding_fp32) { strided_case(FH_DTYPE_F32); }
Test(ref_linear_ce_degen, strided_poisoned_padding_bf16) { strided_case(FH_DTYPE_BF16); }
Test(ref_linear_ce_degen, strided_poisoned_padding_fp16) { strided_case(FH_DTYPE_F16); }

/* Guard words after every forward and backward output, for each reduction. */
Test(ref_linear_ce_degen, guard_words_every_output) {
  fh_context_t* ctx = cpu_ctx();
  for (int red = 0; red < FH_REDUCTION_COUNT; ++red) {
    lce_fix_spec_t s = lce_fix_default_spec(306);
    s.class_weights = s.token_weights = 1;
    lce_fix_t f;
    lce_fix_init(&f, &s);
    all_options(&f.opt);
    f.opt.reduction = (fh_reduction_t)red;
    outs_t o;
    outs_alloc(&o, f.N, f.V, f.D, red == FH_REDUCTION_NONE);
    run_api(ctx, &f, &o, 1); /* checks the guards */
    cr_expect(isfinite(o.loss[0]) && o.acc[0] >= 0.0f && o.acc[0] <= 1.0f);
    outs_free(&o);
    lce_fix_free(&f);
  }
  fh_context_destroy(ctx);
}
