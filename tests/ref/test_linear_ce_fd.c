/* Central finite differences of the fp64 reference loss against the analytic fp64 gradients
 * dE, dC, dbias of fh_ref_lce_backward_f64, for every option alone and in combination, for the
 * three reductions, on N=37, D=19, V=101 (multiples of nothing) with peaked and ignored rows.
 *
 * The objective differentiated is what the backward's inputs define:
 *     J = grad_loss · loss                      (mean, sum: scalar grad_loss)
 *     J = Σ_i grad_loss_i · loss_i               (none: a random grad_loss vector)
 *       + Σ_i grad_lse_i · lse_i                 (when grad_lse is given)
 * Inputs are multiples of 2^-12 stored in fp32; the perturbations ±h and ±2h with h = 2^-10 keep
 * them exact in fp32, so the loss is evaluated at exactly x ± h.
 *
 * Tolerance. The central difference D(h) = (J(x+h) − J(x−h)) / 2h has the truncation error
 * T(h) = h²/6 · J''' + O(h⁴), and rounding error ~ ulp(J) / h. Rather than guessing J''' (it is
 * large in softcapped and peaked rows, small elsewhere), each sampled element also gets D(2h):
 * D(2h) − D(h) = 3 T(h) + O(h⁴), an estimate of the truncation error that depends only on the
 * loss, never on the gradient under test. So an element passes when
 *     |analytic − D(h)| <= |D(2h) − D(h)| + 1e-9 · max|grad|,
 * i.e. about 3x the estimated truncation error plus a floor for rounding (|J| <= ~1e3 here, so
 * ulp(J)/h <= 1e-13·1e3/1e-3 ≈ 1e-10, below the floor for max|grad| >= 1e-1; the floor is
 * 1e-9 relative so it is far below any dropped term). As a sanity bound the truncation estimate
 * itself must stay below 1e-4 · max|grad| (h² ≈ 1e-6 times a third derivative of order 10-100
 * relative to the gradient), so a noisy loss cannot make the check vacuous. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lce_fixture.h"
#include "test_util.h"

#define FD_H 0x1p-10
#define FD_SAMPLES 40
#define FD_FLOOR 1e-9
#define FD_TRUNC_MAX 1e-4

typedef struct fd_cfg {
  int class_w, token_w, no_bias, grad_lse;
  int64_t ignore_index; /* 0: default -100 */
  float softcap, smooth, scale, zloss, entropy, divisor;
} fd_cfg_t;

typedef struct fd_ctx {
  lce_fix_t f;
  double* gl;   /* grad_loss [N] (none) or [1] */
  double* glse; /* [N] or NULL */
  lce_fwd64_t fw;
} fd_ctx_t;

/* J at the fixture's current inputs. */
static double objective(fd_ctx_t* c) {
  cr_assert_eq(lce_fix_forward64(&c->f, &c->fw), FH_SUCCESS, "forward: %s", fh_last_error());
  const fh_lce_ref_forward_t* r = &c->fw.r;
  double J = 0;
  if (c->f.opt.reduction == FH_REDUCTION_NONE) {
    for (int64_t i = 0; i < c->f.N; ++i) J += c->gl[i] * r->row_loss[i];
  } else {
    J = c->gl[0] * r->loss;
  }
  if (c->glse)
    for (int64_t i = 0; i < c->f.N; ++i) J += c->glse[i] * r->lse[i];
  return J;
}

/* Sample FD_SAMPLES distinct flat indices of an R x K tensor: first `n_forced` forced rows
 * (peaked rows, target columns), one element each, then random ones. */
static int sample_indices(tu_rng_t* rng, const int64_t* forced_rows, int n_forced, int64_t R, int64_t K,
                          int64_t* idx) {
  int n = 0;
  const int64_t total = R * K;
  const int want = total < FD_SAMPLES ? (int)total : FD_SAMPLES;
  for (int t = 0; t < n_forced && n < want; ++t) idx[n++] = forced_rows[t] * K + tu_randint(rng, K);
  while (n < want) {
    int64_t k = tu_randint(rng, total);
    int dup = 0;
    for (int t = 0; t < n; ++t) dup |= idx[t] == k;
    if (!dup) idx[n++] = k;
  }
  return n;
}

/* Compare analytic gradient g (flat, n_total entries) with central differences on `x`. */
static int check_tensor(fd_ctx_t* c, const char* what, float* x, const double* g, int64_t R, int64_t K,
                        const int64_t* forced_rows, int n_forced, tu_rng_t* rng) {
  int64_t idx[FD_SAMPLES];
  const int n = sample_indices(rng, forced_rows, n_forced, R, K, idx);
  double gmax = 0;
  for (int64_t k = 0; k < R * K; ++k) gmax = fmax(gmax, fabs(g[k]));
  int bad = 0;
  double worst_share = 0, worst_err = 0, worst_trunc = 0;
  for (int t = 0; t < n; ++t) {
    const int64_t k = idx[t];
    const float x0 = x[k];
    double J[4];
    const double steps[4] = {FD_H, -FD_H, 2 * FD_H, -2 * FD_H};
    for (int s = 0; s < 4; ++s) {
      x[k] = (float)(x0 + steps[s]);
      cr_assert_eq((double)x[k], (double)x0 + steps[s], "perturbation not exact in fp32");
      J[s] = objective(c);
    }
    x[k] = x0;
    const double d1 = (J[0] - J[1]) / (2 * FD_H), d2 = (J[2] - J[3]) / (4 * FD_H);
    const double trunc = fabs(d2 - d1), err = fabs(g[k] - d1);
    const double tol = trunc + FD_FLOOR * gmax;
    worst_trunc = fmax(worst_trunc, trunc);
    worst_err = fmax(worst_err, err);
    worst_share = fmax(worst_share, err / tol);
    if (!(err <= tol) || !(trunc <= FD_TRUNC_MAX * gmax)) {
      if (bad < 3)
        printf("  %s[%lld]: analytic %.12e fd %.12e (fd 2h %.12e) err %.3e tol %.3e\n", what, (long long)k, g[k],
               d1, d2, err, tol);
      ++bad;
    }
  }
  printf("  %s: %d samples, max|grad| %.3e, max err %.3e (%.2e rel), max trunc est %.3e, tolerance used %.1f%%\n",
         what, n, gmax, worst_err, gmax > 0 ? worst_err / gmax : 0.0, worst_trunc, 100 * worst_share);
  if (gmax == 0) {
    printf("  %s: gradient is identically zero\n", what);
    return 0;
  }
  return bad == 0;
}

static void run_one(const char* name, const fd_cfg_t* cfg, fh_reduction_t red, uint64_t seed) {
  fd_ctx_t c;
  memset(&c, 0, sizeof c);
  lce_fix_spec_t s = lce_fix_default_spec(seed);
  s.class_weights = cfg->class_w;
  s.token_weights = cfg->token_w;
  s.bias = !cfg->no_bias;
  lce_fix_init(&c.f, &s);
  const int64_t N = c.f.N, V = c.f.V, D = c.f.D;
  cr_assert(N > 0 && V > 0 && D > 0);
  const size_t n = (size_t)N;
  fh_linear_ce_options_t* o = &c.f.opt;
  o->reduction = red;
  o->softcap = cfg->softcap;
  o->label_smoothing = cfg->smooth;
  o->logit_scale = cfg->scale != 0 ? cfg->scale : 1.0f;
  o->z_loss_scale = cfg->zloss;
  o->entropy_weight = cfg->entropy;
  o->divisor = cfg->divisor;
  if (cfg->ignore_index) {
    /* A valid class id as ignore_index: the ignored rows get it as their target, and any
     * other row whose random target happens to equal it is ignored too. */
    o->ignore_index = cfg->ignore_index;
    for (int64_t i = 0; i < N; ++i)
      if (c.f.targets[i] == -100) c.f.targets[i] = cfg->ignore_index;
  }
  tu_rng_t rng = {seed ^ 0xF00Dull};
  c.gl = (double*)calloc(n, sizeof(double));
  if (red == FH_REDUCTION_NONE) {
    for (int64_t i = 0; i < N; ++i) c.gl[i] = tu_quantize(2 * tu_uniform(&rng) - 1, 8);
  } else {
    c.gl[0] = 0.75;
  }
  if (cfg->grad_lse) {
    c.glse = (double*)calloc(n, sizeof(double));
    for (int64_t i = 0; i < N; ++i) c.glse[i] = tu_quantize(2 * tu_uniform(&rng) - 1, 8);
  }
  lce_fwd64_alloc(&c.fw, N);
  cr_assert_eq(lce_fix_forward64(&c.f, &c.fw), FH_SUCCESS);
  double* lse = (double*)malloc(sizeof(double) * n);
  double* h = (double*)malloc(sizeof(double) * n);
  memcpy(lse, c.fw.r.lse, sizeof(double) * n);
  memcpy(h, c.fw.r.entropy, sizeof(double) * n);
  double* dE = (double*)calloc((size_t)(N * D), sizeof(double));
  double* dC = (double*)calloc((size_t)(V * D), sizeof(double));
  double* db = (double*)calloc((size_t)V, sizeof(double));
  fh_lce_problem_t p = lce_fix_problem(&c.f);
  cr_assert_eq(fh_ref_lce_backward_f64(&p, lse, h, c.gl, c.glse, dE, dC, c.f.bias ? db : NULL, NULL), FH_SUCCESS,
               "backward: %s", fh_last_error());

  /* Forced samples: peaked rows of E (every 5th), C rows at their targets, bias at targets,
   * plus an ignored row of E (its gradient must be exactly 0 both ways). */
  int64_t rowsE[8], rowsC[8], cols_b[8];
  int nE = 0, nC = 0;
  for (int64_t i = 0; i < N && nE < 6; i += 5) {
    rowsE[nE++] = i;
    if (c.f.targets[i] != o->ignore_index) rowsC[nC++] = c.f.targets[i];
  }
  rowsE[nE++] = 2; /* every 7th row from 2 is ignored */
  for (int t = 0; t < nC; ++t) cols_b[t] = rowsC[t];
  printf("%s / %s\n", name, red == FH_REDUCTION_MEAN ? "mean" : red == FH_REDUCTION_SUM ? "sum" : "none");
  int okE = check_tensor(&c, "dE", c.f.E, dE, N, D, rowsE, nE, &rng);
  int okC = check_tensor(&c, "dC", c.f.C, dC, V, D, rowsC, nC, &rng);
  int okb = 1;
  if (c.f.bias) {
    /* bias is 1 x V: the forced "rows" are columns here, so sample it as V x 1. */
    okb = check_tensor(&c, "dbias", c.f.bias, db, V, 1, cols_b, nC, &rng);
  }
  free(lse);
  free(h);
  free(dE);
  free(dC);
  free(db);
  free(c.gl);
  free(c.glse);
  lce_fwd64_free(&c.fw);
  lce_fix_free(&c.f);
  cr_assert(okE && okC && okb, "%s (reduction %d): finite differences disagree: dE %d dC %d dbias %d", name, (int)red,
            okE, okC, okb);
}

static void run_all(const char* name, fd_cfg_t cfg, uint64_t seed) {
  run_one(name, &cfg, FH_REDUCTION_MEAN, seed);
  run_one(name, &cfg, FH_REDUCTION_SUM, seed + 1);
  run_one(name, &cfg, FH_REDUCTION_NONE, seed + 2);
}

TestSuite(ref_linear_ce_fd, .init = lce_fix_serial);

#define FD_TEST(tname, seed, ...)                      \
  Test(ref_linear_ce_fd, tname, .timeout = 120) {      \
    fd_cfg_t cfg = {__VA_ARGS__};                      \
    run_all(#tname, cfg, seed);                        \
  }

/* Each option alone (the fixture always has ignored rows and a bias unless stated). */
FD_TEST(plain, 101)
FD_TEST(ignore_index_valid_class, 102, .ignore_index = 3)
FD_TEST(no_bias, 103, .no_bias = 1)
FD_TEST(softcap, 104, .softcap = 3.0f)
FD_TEST(label_smoothing, 105, .smooth = 0.1f)
FD_TEST(class_weights, 106, .class_w = 1)
FD_TEST(token_weights, 107, .token_w = 1)
FD_TEST(z_loss, 108, .zloss = 0.05f)
FD_TEST(logit_scale, 109, .scale = 1.5f)
FD_TEST(entropy_positive, 110, .entropy = 0.3f)
FD_TEST(entropy_negative, 111, .entropy = -0.2f)
FD_TEST(divisor, 112, .divisor = 50.0f)
FD_TEST(grad_lse, 113, .grad_lse = 1)
/* Combinations: the terms interact through the shared p, the weights and the denominators. */
FD_TEST(weights_smoothing_zloss, 114, .class_w = 1, .token_w = 1, .smooth = 0.2f, .zloss = 0.03f)
FD_TEST(softcap_scale_entropy_neg, 115, .softcap = 4.0f, .scale = 0.75f, .entropy = -0.15f)
FD_TEST(everything, 116, .class_w = 1, .token_w = 1, .grad_lse = 1, .softcap = 5.0f, .smooth = 0.15f,
        .scale = 0.5f, .zloss = 0.02f, .entropy = 0.25f)
FD_TEST(everything_divisor_ignore, 117, .class_w = 1, .token_w = 1, .grad_lse = 1, .ignore_index = 7,
        .softcap = 2.5f, .smooth = 0.3f, .scale = 1.25f, .zloss = 0.04f, .entropy = -0.3f, .divisor = 23.0f)
