/* Invariants of linear cross-entropy: on the fp64 core (shift invariance, reductions,
 * smoothing) and through the public CPU API (accumulate mode, untouched buffers, fp32 rounding
 * of the fp64 core, fp16/bf16 inputs). Problem: the FD suite's N=37, D=19, V=101 fixture. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "lce_fixture.h"
#include "test_util.h"

/* fp64 identities computed two ways by a few hundred roundings of O(1..100) values. */
#define TOL64 1e-12
/* One rounding of an fp64 value to fp32: |fl(x) − x| <= 2^-24 |x| (normal range); the atol
 * covers results that land in fp32's subnormal range (spacing 2^-149). */
#define F32_RTOL 0x1p-24
#define F32_ATOL 0x1p-149

static void everything(fh_linear_ce_options_t* o) {
  o->softcap = 4.0f;
  o->label_smoothing = 0.125f;
  o->logit_scale = 0.75f;
  o->z_loss_scale = 0.03f;
  o->entropy_weight = 0.2f;
}

static double* run64(lce_fix_t* f, lce_fwd64_t* o) {
  lce_fwd64_alloc(o, f->N);
  cr_assert_eq(lce_fix_forward64(f, o), FH_SUCCESS, "%s", fh_last_error());
  return o->r.lse;
}

/* Backward on the fixture through the fp64 core; returns dE, dC, db in one allocation. */
static double* grads64(lce_fix_t* f, const lce_fwd64_t* fw, const double* gl, const double* glse) {
  const int64_t N = f->N, V = f->V, D = f->D;
  double* g = (double*)calloc((size_t)(N * D + V * D + V), sizeof(double));
  fh_lce_problem_t p = lce_fix_problem(f);
  cr_assert_eq(fh_ref_lce_backward_f64(&p, fw->r.lse, fw->r.entropy, gl, glse, g, g + N * D,
                                       f->bias ? g + N * D + V * D : NULL, NULL),
               FH_SUCCESS);
  return g;
}

/* bias + c adds c to every logit of every row: without softcap the loss, entropy and
 * gradients are unchanged and lse moves by c (label smoothing and class weights included). */
Test(ref_linear_ce_inv, bias_shift_leaves_loss_unchanged) {
  lce_fix_spec_t s = lce_fix_default_spec(201);
  s.class_weights = s.token_weights = 1;
  lce_fix_t f;
  lce_fix_init(&f, &s);
  f.opt.label_smoothing = 0.2f;
  f.opt.entropy_weight = 0.3f;
  f.opt.logit_scale = 1.5f;
  lce_fwd64_t a, b;
  run64(&f, &a);
  const double gl = 1.0;
  double* ga = grads64(&f, &a, &gl, NULL);
  const double c = 0.75; /* dyadic: bias + c stays exact in fp32 */
  for (int64_t j = 0; j < f.V; ++j) f.bias[j] += (float)c;
  run64(&f, &b);
  double* gb = grads64(&f, &b, &gl, NULL);
  cr_expect(fabs(a.r.loss - b.r.loss) <= TOL64, "loss %.17g vs %.17g", a.r.loss, b.r.loss);
  int bad = 0;
  for (int64_t i = 0; i < f.N; ++i) {
    const int valid = f.targets[i] != -100;
    bad += fabs(b.r.lse[i] - a.r.lse[i] - (valid ? 1.5 * c : 0.0)) > TOL64;
    bad += fabs(b.r.entropy[i] - a.r.entropy[i]) > TOL64;
  }
  cr_expect_eq(bad, 0, "lse must move by scale*c, entropy not at all");
  const int64_t n = f.N * f.D + f.V * f.D + f.V;
  cr_expect(tu_check_close("gradients after shift", gb, ga, n, TOL64, 0));
  free(ga);
  free(gb);
  lce_fwd64_free(&a);
  lce_fwd64_free(&b);
  lce_fix_free(&f);
}

static double run_loss(lce_fix_t* f, fh_reduction_t red, double* zl) {
  lce_fwd64_t o;
  f->opt.reduction = red;
  run64(f, &o);
  double L = o.r.loss;
  if (zl) *zl = o.r.z_loss;
  lce_fwd64_free(&o);
  return L;
}

/* sum = mean × denominator, with the denominators recomputed here from the header. */
Test(ref_linear_ce_inv, sum_is_mean_times_denominator) {
  lce_fix_spec_t s = lce_fix_default_spec(202);
  s.class_weights = s.token_weights = 1;
  lce_fix_t f;
  lce_fix_init(&f, &s);
  double Dce = 0, Dreg = 0;
  for (int64_t i = 0; i < f.N; ++i)
    if (f.targets[i] != -100) {
      Dce += (double)f.tw[i] * f.cw[f.targets[i]];
      Dreg += f.tw[i];
    }
  /* (a) class and token weights, CE only: D_ce = Σ ω w_y */
  f.opt.label_smoothing = 0.1f;
  double m = run_loss(&f, FH_REDUCTION_MEAN, NULL), su = run_loss(&f, FH_REDUCTION_SUM, NULL);
  cr_expect(fabs(su - m * Dce) <= TOL64 * fabs(su), "CE: sum %.17g, mean x D_ce %.17g", su, m * Dce);
  /* (b) z-loss and entropy only see D_reg = Σ ω: without class weights both are Σ ω */
  float* cw = f.cw;
  f.cw = NULL;
  f.opt.z_loss_scale = 0.05f;
  f.opt.entropy_weight = -0.1f;
  double zm, zs;
  m = run_loss(&f, FH_REDUCTION_MEAN, &zm);
  su = run_loss(&f, FH_REDUCTION_SUM, &zs);
  cr_expect(fabs(su - m * Dreg) <= TOL64 * fabs(su), "regularized: sum %.17g, mean x D_reg %.17g", su, m * Dreg);
  cr_expect(fabs(zs - zm * Dreg) <= TOL64 * fabs(zs), "z_loss: sum %.17g, mean x D_reg %.17g", zs, zm * Dreg);
  /* (c) divisor replaces both */
  f.cw = cw;
  f.opt.divisor = 29.0f;
  m = run_loss(&f, FH_REDUCTION_MEAN, &zm);
  su = run_loss(&f, FH_REDUCTION_SUM, &zs);
  cr_expect(fabs(su - m * 29.0) <= TOL64 * fabs(su), "divisor: sum %.17g, mean x 29 %.17g", su, m * 29.0);
  cr_expect(fabs(zs - zm * 29.0) <= TOL64 * fabs(zs));
  lce_fix_free(&f);
}

Test(ref_linear_ce_inv, none_sums_to_sum) {
  lce_fix_spec_t s = lce_fix_default_spec(203);
  s.class_weights = s.token_weights = 1;
  lce_fix_t f;
  lce_fix_init(&f, &s);
  everything(&f.opt);
  double zs;
  const double su = run_loss(&f, FH_REDUCTION_SUM, &zs);
  lce_fwd64_t o;
  f.opt.reduction = FH_REDUCTION_NONE;
  run64(&f, &o);
  double t = 0, tz = 0;
  for (int64_t i = 0; i < f.N; ++i) {
    t += o.r.row_loss[i];
    tz += o.r.row_zloss[i];
  }
  cr_expect(fabs(t - su) <= TOL64 * fabs(su), "Σ none %.17g, sum %.17g", t, su);
  cr_expect(fabs(tz - zs) <= TOL64 * fabs(zs), "Σ none z_loss %.17g, sum z_loss %.17g", tz, zs);
  lce_fwd64_free(&o);
  lce_fix_free(&f);
}

/* α = 0 is plain (weighted) CE, recomputed here from lse and a direct dot for z_y; and the
 * loss is affine in α, so loss(1/2) is the average of loss(0) and loss(1). */
Test(ref_linear_ce_inv, label_smoothing_zero_is_plain_ce) {
  lce_fix_spec_t s = lce_fix_default_spec(204);
  s.class_weights = 1;
  lce_fix_t f;
  lce_fix_init(&f, &s);
  lce_fwd64_t o;
  run64(&f, &o);
  double num = 0, den = 0;
  for (int64_t i = 0; i < f.N; ++i) {
    const int64_t y = f.targets[i];
    if (y == -100) continue;
    double zy = f.bias[y];
    for (int64_t k = 0; k < f.D; ++k) zy += (double)f.E[i * f.D + k] * f.C[y * f.D + k];
    num += f.cw[y] * (o.r.lse[i] - zy);
    den += f.cw[y];
  }
  cr_expect(fabs(o.r.loss - num / den) <= TOL64, "alpha 0: %.17g, plain %.17g", o.r.loss, num / den);
  lce_fwd64_free(&o);
  f.opt.label_smoothing = 0.0f;
  const double l0 = run_loss(&f, FH_REDUCTION_MEAN, NULL);
  f.opt.label_smoothing = 1.0f;
  const double l1 = run_loss(&f, FH_REDUCTION_MEAN, NULL);
  f.opt.label_smoothing = 0.5f;
  const double lh = run_loss(&f, FH_REDUCTION_MEAN, NULL);
  cr_expect(fabs(lh - 0.5 * (l0 + l1)) <= TOL64, "affine in alpha: %.17g vs %.17g", lh, 0.5 * (l0 + l1));
  cr_expect(fabs(l1 - l0) > 1e-3, "smoothing must change the loss");
  lce_fix_free(&f);
}

static fh_context_t* cpu_ctx(void) {
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  return ctx;
}

/* Public backward of fixture f (dtype of f) into freshly allocated tensors; `old` (may be NULL)
 * (dE, dC, dbias one after the other) prefills them; returns the three buffers in bufs[3]. */
static void api_backward(fh_context_t* ctx, lce_fix_t* f, const float* lse, const float* ent, float gl,
                         void* bufs[3], const double* old) {
  const size_t es = fh_dtype_size(f->tE.dtype);
  const int64_t n[3] = {f->N * f->D, f->V * f->D, f->V};
  fh_tensor_t t[3];
  int64_t off = 0;
  for (int k = 0; k < 3; ++k) {
    bufs[k] = tu_alloc_guarded((size_t)n[k] * es);
    if (old)
      for (int64_t e = 0; e < n[k]; ++e) fh_store(bufs[k], f->tE.dtype, e, old[off + e]);
    off += n[k];
  }
  t[0] = fh_tensor_2d(bufs[0], f->tE.dtype, f->N, f->D);
  t[1] = fh_tensor_2d(bufs[1], f->tE.dtype, f->V, f->D);
  t[2] = fh_tensor_2d(bufs[2], f->tE.dtype, 1, f->V);
  fh_linear_ce_grad_inputs_t in = {lse, ent, &gl, NULL};
  fh_linear_ce_grads_t g = {&t[0], &t[1], &t[2]};
  cr_assert_eq(lce_fix_api_backward(ctx, f, &in, &g), FH_SUCCESS, "%s", fh_last_error());
  for (int k = 0; k < 3; ++k) cr_assert(tu_guards_intact(bufs[k], (size_t)n[k] * es), "guard words after grad %d", k);
}

/* accumulate = overwrite + old: the reference adds in fp64 and rounds once, so the result is
 * exactly fl(g64 + old); and it is within one output ulp of fl(g64) + old. */
static void accumulate_case(fh_dtype_t dtype) {
  fh_context_t* ctx = cpu_ctx();
  lce_fix_spec_t s = lce_fix_default_spec(205);
  s.class_weights = 1;
  lce_fix_t f32, f;
  lce_fix_init(&f32, &s);
  lce_fix_round_to_bf16(&f32);
  everything(&f32.opt);
  lce_fix_convert(&f32, dtype, &f);
  const int64_t N = f.N, nE = f.N * f.D, nC = f.V * f.D, ntot = nE + nC + f.V;
  float* lse = (float*)calloc((size_t)N, sizeof(float));
  float* ent = (float*)calloc((size_t)N, sizeof(float));
  float loss;
  fh_linear_ce_outputs_t out = {&loss, lse, ent, NULL, NULL, NULL};
  cr_assert_eq(lce_fix_api_forward(ctx, &f, &out), FH_SUCCESS, "%s", fh_last_error());
  /* The fp64 gradient, with lse / entropy recomputed in fp64 as the public backward does (NULL). */
  const double gl = 0.5;
  double* g64 = (double*)calloc((size_t)ntot, sizeof(double));
  fh_lce_problem_t p = lce_fix_problem(&f);
  cr_assert_eq(fh_ref_lce_backward_f64(&p, NULL, NULL, &gl, NULL, g64, g64 + nE, g64 + nE + nC, NULL), FH_SUCCESS);
  double* old = (double*)calloc((size_t)ntot, sizeof(double));
  tu_rng_t rng = {77};
  /* old values representable in bf16 (so in fp32 too), of the gradients' order of magnitude */
  for (int64_t k = 0; k < ntot; ++k) old[k] = fh_bf16_bits_to_double(fh_double_to_bf16_bits(0.05 * tu_normal(&rng)));
  void *ow[3], *ac[3];
  api_backward(ctx, &f, lse, ent, (float)gl, ow, NULL);
  f.opt.accumulate = 1;
  api_backward(ctx, &f, lse, ent, (float)gl, ac, old);
  const int64_t off[3] = {0, nE, nE + nC}, cnt[3] = {nE, nC, f.V};
  int bad_exact = 0, bad_sum = 0;
  for (int t = 0; t < 3; ++t)
    for (int64_t e = 0; e < cnt[t]; ++e) {
      const double o = old[off[t] + e], g = g64[off[t] + e];
      const double a = fh_load(ac[t], dtype, e), w = fh_load(ow[t], dtype, e);
      double want_exact;
      if (dtype == FH_DTYPE_F32) {
        want_exact = (double)(float)(g + o);
      } else {
        want_exact = fh_bf16_bits_to_double(fh_double_to_bf16_bits(g + o));
      }
      bad_exact += a != want_exact;
      /* one ulp of the output dtype at the largest magnitude involved */
      const double m = fmax(fabs(a), fmax(fabs(w), fabs(o)));
      const double ulp = ldexp(1.0, ilogb(m > 0 ? m : 1) - (dtype == FH_DTYPE_F32 ? 23 : 7));
      bad_sum += !(fabs(a - (w + o)) <= ulp);
    }
  cr_expect_eq(bad_exact, 0, "dtype %d: %d accumulated entries differ from fl(g64 + old)", (int)dtype, bad_exact);
  cr_expect_eq(bad_sum, 0, "dtype %d: %d accumulated entries differ from overwrite + old by more than 1 ulp",
               (int)dtype, bad_sum);
  for (int t = 0; t < 3; ++t) {
    free(ow[t]);
    free(ac[t]);
  }
  free(old);
  free(g64);
  free(lse);
  free(ent);
  lce_fix_free_converted(&f);
  lce_fix_free(&f32);
  fh_context_destroy(ctx);
}

Test(ref_linear_ce_inv, accumulate_fp32) { accumulate_case(FH_DTYPE_F32); }
Test(ref_linear_ce_inv, accumulate_bf16) { accumulate_case(FH_DTYPE_BF16); }

/* Nothing the caller did not ask for is written, and inputs are never written. */
Test(ref_linear_ce_inv, unrequested_buffers_and_inputs_bit_identical) {
  fh_context_t* ctx = cpu_ctx();
  lce_fix_spec_t s = lce_fix_default_spec(206);
  s.class_weights = s.token_weights = 1;
  lce_fix_t f;
  lce_fix_init(&f, &s);
  everything(&f.opt);
  const int64_t N = f.N, V = f.V, D = f.D;
  lce_fix_t snap;
  lce_fix_convert(&f, FH_DTYPE_F32, &snap); /* copies of E, C, bias */
  int64_t* tg = (int64_t*)malloc(sizeof(int64_t) * (size_t)N);
  float* cw = (float*)malloc(sizeof(float) * (size_t)V);
  float* tw = (float*)malloc(sizeof(float) * (size_t)N);
  memcpy(tg, f.targets, sizeof(int64_t) * (size_t)N);
  memcpy(cw, f.cw, sizeof(float) * (size_t)V);
  memcpy(tw, f.tw, sizeof(float) * (size_t)N);
  float loss, lse[37], ent[37], glse[37];
  fh_linear_ce_outputs_t out = {&loss, lse, ent, NULL, NULL, NULL};
  cr_assert_eq(lce_fix_api_forward(ctx, &f, &out), FH_SUCCESS);
  for (int64_t i = 0; i < N; ++i) glse[i] = (float)(i % 3) - 1.0f;
  float lse_c[37], ent_c[37], glse_c[37];
  memcpy(lse_c, lse, sizeof lse);
  memcpy(ent_c, ent, sizeof ent);
  memcpy(glse_c, glse, sizeof glse);
  const float gl = 1.0f;
  /* dE only; dC passed with data == NULL, dbias pointer NULL; a canary buffer for dC that
   * the call never sees must stay as it was. */
  float* dE = (float*)calloc((size_t)(N * D), sizeof(float));
  fh_tensor_t tdE = fh_tensor_2d(dE, FH_DTYPE_F32, N, D), tdC = fh_tensor_2d(NULL, FH_DTYPE_F32, V, D);
  fh_linear_ce_grad_inputs_t in = {lse, ent, &gl, glse};
  fh_linear_ce_grads_t g = {&tdE, &tdC, NULL};
  cr_assert_eq(lce_fix_api_backward(ctx, &f, &in, &g), FH_SUCCESS, "%s", fh_last_error());
  /* no gradient at all: a no-op that succeeds */
  fh_linear_ce_grads_t none = {NULL, NULL, NULL};
  cr_assert_eq(lce_fix_api_backward(ctx, &f, &in, &none), FH_SUCCESS, "%s", fh_last_error());
  cr_expect(memcmp(f.E, snap.E, sizeof(float) * (size_t)(N * D)) == 0, "E written");
  cr_expect(memcmp(f.C, snap.C, sizeof(float) * (size_t)(V * D)) == 0, "C written");
  cr_expect(memcmp(f.bias, snap.bias, sizeof(float) * (size_t)V) == 0, "bias written");
  cr_expect(memcmp(f.targets, tg, sizeof(int64_t) * (size_t)N) == 0, "targets written");
  cr_expect(memcmp(f.cw, cw, sizeof(float) * (size_t)V) == 0, "class weights written");
  cr_expect(memcmp(f.tw, tw, sizeof(float) * (size_t)N) == 0, "token weights written");
  cr_expect(memcmp(lse, lse_c, sizeof lse) == 0 && memcmp(ent, ent_c, sizeof ent) == 0, "lse/entropy written");
  cr_expect(memcmp(glse, glse_c, sizeof glse) == 0, "grad_lse written");
  double nz = 0;
  for (int64_t k = 0; k < N * D; ++k) nz += fabs(dE[k]);
  cr_expect(nz > 0, "dE was requested and must be written");
  free(dE);
  free(tg);
  free(cw);
  free(tw);
  lce_fix_free_converted(&snap);
  lce_fix_free(&f);
  fh_context_destroy(ctx);
}

/* The public fp32 outputs are the fp64 core's values rounded once to fp32. */
static void wrapper_case(fh_reduction_t red) {
  fh_context_t* ctx = cpu_ctx();
  lce_fix_spec_t s = lce_fix_default_spec(207);
  s.class_weights = s.token_weights = 1;
  lce_fix_t f;
  lce_fix_init(&f, &s);
  everything(&f.opt);
  f.opt.reduction = red;
  const int64_t N = f.N, V = f.V, D = f.D, nl = red == FH_REDUCTION_NONE ? N : 1;
  lce_fwd64_t r;
  run64(&f, &r);
  float loss[37], zl[37], lse[37], ent[37], acc;
  int64_t am[37];
  fh_linear_ce_outputs_t out = {loss, lse, ent, zl, am, &acc};
  cr_assert_eq(lce_fix_api_forward(ctx, &f, &out), FH_SUCCESS, "%s", fh_last_error());
  const double* rl = red == FH_REDUCTION_NONE ? r.r.row_loss : &r.r.loss;
  const double* rz = red == FH_REDUCTION_NONE ? r.r.row_zloss : &r.r.z_loss;
  cr_expect(tu_check_close_f("loss", loss, rl, nl, F32_ATOL, F32_RTOL));
  cr_expect(tu_check_close_f("z_loss", zl, rz, nl, F32_ATOL, F32_RTOL));
  cr_expect(tu_check_close_f("lse", lse, r.r.lse, N, F32_ATOL, F32_RTOL));
  cr_expect(tu_check_close_f("entropy", ent, r.r.entropy, N, F32_ATOL, F32_RTOL));
  cr_expect(tu_check_close_f("accuracy", &acc, &r.r.accuracy, 1, F32_ATOL, F32_RTOL));
  cr_expect(memcmp(am, r.r.argmax, sizeof(int64_t) * (size_t)N) == 0, "argmax");
  /* gradients: the fp64 core fed with the fp64 lse/entropy, which the public backward
   * recomputes instead of trusting the fp32-rounded ones (docs/linear_ce.md, "Precision") */
  float gl[37];
  double gl64[37], l64[37], h64[37], glse64[37];
  float glse[37];
  for (int64_t i = 0; i < N; ++i) {
    gl[i] = (float)((i % 5) - 2) * 0.25f;
    gl64[i] = gl[i];
    l64[i] = r.r.lse[i];
    h64[i] = r.r.entropy[i];
    glse[i] = (float)(i % 3) * 0.5f;
    glse64[i] = glse[i];
  }
  if (red != FH_REDUCTION_NONE) gl[0] = 0.75f, gl64[0] = 0.75;
  double* g64 = (double*)calloc((size_t)(N * D + V * D + V), sizeof(double));
  fh_lce_problem_t p = lce_fix_problem(&f);
  cr_assert_eq(fh_ref_lce_backward_f64(&p, l64, h64, gl64, glse64, g64, g64 + N * D, g64 + N * D + V * D, NULL),
               FH_SUCCESS);
  float* gf = (float*)calloc((size_t)(N * D + V * D + V), sizeof(float));
  fh_tensor_t t0 = fh_tensor_2d(gf, FH_DTYPE_F32, N, D), t1 = fh_tensor_2d(gf + N * D, FH_DTYPE_F32, V, D),
              t2 = fh_tensor_2d(gf + N * D + V * D, FH_DTYPE_F32, 1, V);
  fh_linear_ce_grad_inputs_t in = {lse, ent, gl, glse};
  fh_linear_ce_grads_t g = {&t0, &t1, &t2};
  cr_assert_eq(lce_fix_api_backward(ctx, &f, &in, &g), FH_SUCCESS, "%s", fh_last_error());
  cr_expect(tu_check_close_f("dE dC dbias", gf, g64, N * D + V * D + V, F32_ATOL, F32_RTOL));
  free(g64);
  free(gf);
  lce_fwd64_free(&r);
  lce_fix_free(&f);
  fh_context_destroy(ctx);
}

Test(ref_linear_ce_inv, fp32_wrapper_rounds_fp64_core_mean) { wrapper_case(FH_REDUCTION_MEAN); }
Test(ref_linear_ce_inv, fp32_wrapper_rounds_fp64_core_sum) { wrapper_case(FH_REDUCTION_SUM); }
Test(ref_linear_ce_inv, fp32_wrapper_rounds_fp64_core_none) { wrapper_case(FH_REDUCTION_NONE); }

/* fp16 and bf16 inputs are converted exactly: on values exactly representable in both, the
 * fp64 core gives bit-identical results to the fp32 path, and the public gradients are the
 * fp64 gradients rounded once to the input dtype. */
static void half_case(fh_dtype_t dtype) {
  fh_context_t* ctx = cpu_ctx();
  lce_fix_spec_t s = lce_fix_default_spec(208);
  s.class_weights = 1;
  lce_fix_t f, h;
  lce_fix_init(&f, &s);
  lce_fix_round_to_bf16(&f);
  everything(&f.opt);
  lce_fix_convert(&f, dtype, &h);
  const int64_t N = f.N, V = f.V, D = f.D, n = N * D + V * D + V;
  lce_fwd64_t a, b;
  run64(&f, &a);
  run64(&h, &b);
  cr_expect(a.r.loss == b.r.loss && a.r.z_loss == b.r.z_loss && a.r.accuracy == b.r.accuracy, "scalars");
  cr_expect(memcmp(a.r.lse, b.r.lse, sizeof(double) * (size_t)N) == 0, "lse");
  cr_expect(memcmp(a.r.row_loss, b.r.row_loss, sizeof(double) * (size_t)N) == 0, "row loss");
  cr_expect(memcmp(a.r.entropy, b.r.entropy, sizeof(double) * (size_t)N) == 0, "entropy");
  cr_expect(memcmp(a.r.argmax, b.r.argmax, sizeof(int64_t) * (size_t)N) == 0, "argmax");
  const double gl = 1.0;
  double* ga = grads64(&f, &a, &gl, NULL);
  double* gb = grads64(&h, &b, &gl, NULL);
  cr_expect(memcmp(ga, gb, sizeof(double) * (size_t)n) == 0, "fp64 gradients differ between fp32 and dtype %d",
            (int)dtype);
  /* public: fp32 loss identical, gradients in the input dtype = fl_dtype(fp64 gradient) */
  float loss32, lossh, lse[37], ent[37];
  fh_linear_ce_outputs_t o32 = {&loss32, lse, ent, NULL, NULL, NULL}, oh = {&lossh, NULL, NULL, NULL, NULL, NULL};
  cr_assert_eq(lce_fix_api_forward(ctx, &f, &o32), FH_SUCCESS);
  cr_assert_eq(lce_fix_api_forward(ctx, &h, &oh), FH_SUCCESS, "%s", fh_last_error());
  cr_expect(loss32 == lossh, "public loss %a vs %a", (double)loss32, (double)lossh);
  void* bufs[3];
  api_backward(ctx, &h, lse, ent, 1.0f, bufs, NULL);
  fh_lce_problem_t p = lce_fix_problem(&h); /* lse recomputed in fp64 (NULL), as the API does */
  cr_assert_eq(fh_ref_lce_backward_f64(&p, NULL, NULL, &gl, NULL, gb, gb + N * D, gb + N * D + V * D, NULL),
               FH_SUCCESS);
  const int64_t off[3] = {0, N * D, N * D + V * D}, cnt[3] = {N * D, V * D, V};
  int bad = 0;
  for (int t = 0; t < 3; ++t)
    for (int64_t e = 0; e < cnt[t]; ++e) {
      uint16_t got = ((uint16_t*)bufs[t])[e];
      double x = gb[off[t] + e];
      uint16_t want = dtype == FH_DTYPE_BF16 ? fh_double_to_bf16_bits(x) : fh_double_to_half_bits(x);
      bad += got != want;
    }
  cr_expect_eq(bad, 0, "%d gradient entries are not fl_dtype(fp64 gradient)", bad);
  for (int t = 0; t < 3; ++t) free(bufs[t]);
  free(ga);
  free(gb);
  lce_fwd64_free(&a);
  lce_fwd64_free(&b);
  lce_fix_free_converted(&h);
  lce_fix_free(&f);
  fh_context_destroy(ctx);
}

Test(ref_linear_ce_inv, bf16_inputs_match_fp32_path) { half_case(FH_DTYPE_BF16); }
Test(ref_linear_ce_inv, fp16_inputs_match_fp32_path) { half_case(FH_DTYPE_F16); }

/* fp64 inputs (CPU only): every float array of the call is double, nothing is rounded, so the
 * public results are bit-identical to the fp64 core's. */
Test(ref_linear_ce_inv, fp64_inputs_are_the_fp64_core) {
  fh_context_t* ctx = cpu_ctx();
  lce_fix_spec_t s = lce_fix_default_spec(209);
  s.class_weights = s.token_weights = 1;
  lce_fix_t f, d;
  lce_fix_init(&f, &s);
  everything(&f.opt);
  f.opt.reduction = FH_REDUCTION_NONE;
  lce_fix_convert(&f, FH_DTYPE_F64, &d);
  const int64_t N = f.N, V = f.V, D = f.D, n = N * D + V * D + V;
  lce_fwd64_t r;
  run64(&f, &r); /* the fp32-stored fixture: the same values */
  double loss[37], lse[37], ent[37], zl[37], acc, gl[37], glse[37];
  int64_t am[37];
  fh_linear_ce_outputs_t out = {(float*)loss, (float*)lse, (float*)ent, (float*)zl, am, (float*)&acc};
  cr_assert_eq(lce_fix_api_forward(ctx, &d, &out), FH_SUCCESS, "%s", fh_last_error());
  cr_expect(memcmp(loss, r.r.row_loss, sizeof(double) * (size_t)N) == 0, "loss");
  cr_expect(memcmp(zl, r.r.row_zloss, sizeof(double) * (size_t)N) == 0, "z_loss");
  cr_expect(memcmp(lse, r.r.lse, sizeof(double) * (size_t)N) == 0, "lse");
  cr_expect(memcmp(ent, r.r.entropy, sizeof(double) * (size_t)N) == 0, "entropy");
  cr_expect(memcmp(am, r.r.argmax, sizeof(int64_t) * (size_t)N) == 0, "argmax");
  cr_expect(acc == r.r.accuracy, "accuracy");
  for (int64_t i = 0; i < N; ++i) {
    gl[i] = 0.25 * (double)(i % 7) - 0.5;
    glse[i] = 0.125 * (double)(i % 3);
  }
  double* g64 = (double*)calloc((size_t)n, sizeof(double));
  double* gp = (double*)calloc((size_t)n, sizeof(double));
  fh_lce_problem_t p = lce_fix_problem(&f);
  cr_assert_eq(fh_ref_lce_backward_f64(&p, r.r.lse, r.r.entropy, gl, glse, g64, g64 + N * D, g64 + N * D + V * D, NULL),
               FH_SUCCESS);
  fh_tensor_t t0 = fh_tensor_2d(gp, FH_DTYPE_F64, N, D), t1 = fh_tensor_2d(gp + N * D, FH_DTYPE_F64, V, D),
              t2 = fh_tensor_2d(gp + N * D + V * D, FH_DTYPE_F64, 1, V);
  fh_linear_ce_grad_inputs_t in = {(const float*)lse, (const float*)ent, (const float*)gl, (const float*)glse};
  fh_linear_ce_grads_t g = {&t0, &t1, &t2};
  cr_assert_eq(lce_fix_api_backward(ctx, &d, &in, &g), FH_SUCCESS, "%s", fh_last_error());
  cr_expect(memcmp(gp, g64, sizeof(double) * (size_t)n) == 0, "fp64 public gradients differ from the core");
  free(g64);
  free(gp);
  lce_fwd64_free(&r);
  lce_fix_free_converted(&d);
  lce_fix_free(&f);
  fh_context_destroy(ctx);
}
