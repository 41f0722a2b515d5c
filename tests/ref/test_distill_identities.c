/* ref/distill_identities: identities every divergence must satisfy, the β and α limits
 * approached numerically, exact endpoint cases, T² scaling, the shared-vocabulary rule and
 * ignored rows, all on the fp64 core with the odd shapes of the gradient suite. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "test_distill_fixture.h"

#define N_ 29
#define V_ 97
#define DS_ 13
#define VT_ 103
#define DT_ 17

/* Loss (mean) and fp64 gradients of a problem. g must hold N*Ds + V*Ds + V doubles. */
static double loss_and_grad(const fh_distill_problem_t* p, double* g) {
  const double one = 1.0;
  double* st = (double*)malloc(sizeof(double) * FH_DISTILL_ROW_STATE * (size_t)(p->N + 1));
  const double L = dfx_loss(p, &one, st);
  if (g) {
    double* dE = g;
    double* dC = dE + p->N * p->D_s;
    double* db = dC + p->V * p->D_s;
    cr_assert(fh_ref_distill_backward_f64(p, st, &one, dE, dC, p->bs ? db : NULL, NULL) == FH_SUCCESS);
  }
  free(st);
  return L;
}
static int64_t grad_len(void) { return N_ * DS_ + V_ * DS_ + V_; }

typedef struct dvcase {
  fh_distill_divergence_t dv;
  float beta, skew, alpha;
  const char* name;
} dvcase_t;

static const dvcase_t ALL[] = {
    {FH_DISTILL_FORWARD_KL, 0.5f, 0.1f, 0.5f, "forward_kl"},
    {FH_DISTILL_REVERSE_KL, 0.5f, 0.1f, 0.5f, "reverse_kl"},
    {FH_DISTILL_JSD, 0.3f, 0.1f, 0.5f, "jsd"},
    {FH_DISTILL_JSD, 0.0f, 0.1f, 0.5f, "jsd_beta0"},
    {FH_DISTILL_JSD_SCALED, 0.6f, 0.1f, 0.5f, "jsd_scaled"},
    {FH_DISTILL_TVD, 0.5f, 0.1f, 0.5f, "tvd"},
    {FH_DISTILL_SKEW_FORWARD_KL, 0.5f, 0.3f, 0.5f, "skew_forward_kl"},
    {FH_DISTILL_SKEW_REVERSE_KL, 0.5f, 0.3f, 0.5f, "skew_reverse_kl"},
    {FH_DISTILL_ALPHA, 0.5f, 0.1f, -0.7f, "alpha"},
    {FH_DISTILL_HELLINGER, 0.5f, 0.1f, 0.5f, "hellinger"},
    {FH_DISTILL_CHI_SQUARE, 0.5f, 0.1f, 0.5f, "chi_square"},
};

static fh_distill_options_t case_opts(const dvcase_t* c, float T) {
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.divergence = c->dv, o.beta = c->beta, o.skew = c->skew, o.alpha = c->alpha, o.temperature = T;
  return o;
}

/* Teacher = student (same head): every divergence is 0 and so is its gradient. */
Test(ref_distill_identities, zero_when_teacher_equals_student) {
  dfx_t f;
  dfx_init(&f, N_, V_, DS_, V_, DS_, 3, 1, 1, 3);
  memcpy(f.Et, f.Es, sizeof(float) * N_ * DS_);
  memcpy(f.Ct, f.Cs, sizeof(float) * V_ * DS_);
  memcpy(f.bt, f.bs, sizeof(float) * V_);
  double* g = (double*)malloc(sizeof(double) * (size_t)grad_len());
  for (size_t k = 0; k < sizeof ALL / sizeof ALL[0]; ++k) {
    const fh_distill_options_t o = case_opts(&ALL[k], 1.7f);
    fh_distill_problem_t p;
    dfx_problem(&f, &o, 1, &p);
    const double L = loss_and_grad(&p, g);
    double gm = 0;
    for (int64_t e = 0; e < grad_len(); ++e) gm = fmax(gm, fabs(g[e]));
    /* X == Y bit for bit, so every element is 0 up to the rounding of q Σ p ≈ q (1e-16). */
    cr_expect(fabs(L) <= 1e-14 && gm <= 1e-14, "%s: loss %.3g, max |grad| %.3g", ALL[k].name, L, gm);
  }
  free(g);
  dfx_free(&f);
}

/* KL(P‖Q) = CE(P, Q) − H(P), per row, with the cross-entropy and entropy computed naively here
 * (teacher renormalized over the shared V < V_t). */
Test(ref_distill_identities, kl_is_cross_entropy_minus_entropy) {
  dfx_t f;
  dfx_init(&f, N_, V_, DS_, VT_, DT_, 4, 1, 1, 0);
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.reduction = FH_REDUCTION_NONE, o.temperature = 0.8f, o.scale_by_t_squared = 0;
  fh_distill_problem_t p;
  dfx_problem(&f, &o, 0, &p);
  double* w = (double*)malloc(sizeof(double) * N_);
  double rows[N_];
  for (int64_t i = 0; i < N_; ++i) {
    for (int64_t k = 0; k < N_; ++k) w[k] = k == i;
    rows[i] = dfx_loss(&p, w, NULL);
  }
  for (int64_t i = 0; i < N_; ++i) {
    double s[V_], t[V_], ms = -INFINITY, mt = -INFINITY, zs = 0, zt = 0;
    for (int64_t j = 0; j < V_; ++j) {
      s[j] = f.bs[j], t[j] = f.bt[j];
      for (int64_t k = 0; k < DS_; ++k) s[j] += (double)f.Es[i * DS_ + k] * f.Cs[j * DS_ + k];
      for (int64_t k = 0; k < DT_; ++k) t[j] += (double)f.Et[i * DT_ + k] * f.Ct[j * DT_ + k];
      s[j] /= (double)0.8f, t[j] /= (double)0.8f; /* the option is a float */
      ms = fmax(ms, s[j]), mt = fmax(mt, t[j]);
    }
    for (int64_t j = 0; j < V_; ++j) zs += exp(s[j] - ms), zt += exp(t[j] - mt);
    double ce = 0, h = 0;
    for (int64_t j = 0; j < V_; ++j) {
      const double lp = t[j] - mt - log(zt), lq = s[j] - ms - log(zs);
      ce -= exp(lp) * lq;
      h -= exp(lp) * lp;
    }
    cr_expect(fabs(rows[i] - (ce - h)) <= 1e-12 * (1 + ce), "row %lld: KL %.17g, CE − H %.17g", (long long)i,
              rows[i], ce - h);
  }
  free(w);
  dfx_free(&f);
}

static double rel_dev(double a, double b, const double* ga, const double* gb) {
  double e = fabs(a - b) / fmax(fabs(b), 1e-300), gm = 0;
  for (int64_t k = 0; k < grad_len(); ++k) gm = fmax(gm, fabs(gb[k]));
  for (int64_t k = 0; k < grad_len(); ++k) e = fmax(e, fabs(ga[k] - gb[k]) / gm);
  return e;
}

/* scale_by_t_squared multiplies loss and gradient by exactly T² and nothing else. */
Test(ref_distill_identities, t_squared_scaling) {
  dfx_t f;
  dfx_init(&f, N_, V_, DS_, VT_, DT_, 5, 1, 1, 3);
  double* g1 = (double*)malloc(sizeof(double) * (size_t)grad_len());
  double* g0 = (double*)malloc(sizeof(double) * (size_t)grad_len());
  for (size_t k = 0; k < sizeof ALL / sizeof ALL[0]; ++k) {
    fh_distill_options_t o = case_opts(&ALL[k], 3.0f);
    fh_distill_problem_t p;
    dfx_problem(&f, &o, 1, &p);
    const double L1 = loss_and_grad(&p, g1);
    p.opt.scale_by_t_squared = 0;
    const double L0 = loss_and_grad(&p, g0);
    for (int64_t e = 0; e < grad_len(); ++e) g0[e] *= 9;
    /* Only the rounding of the factor's position in the products differs (a few ulp). */
    const double err = rel_dev(L1, 9 * L0, g1, g0);
    cr_expect(err <= 1e-13 && fabs(L0) > 0, "%s: relative deviation from T² = 9 is %.3g", ALL[k].name, err);
  }
  free(g1);
  free(g0);
  dfx_free(&f);
}

/* Divergences that must coincide exactly (same numbers up to fp64 rounding). */
static double loss_of(dfx_t* f, fh_distill_divergence_t dv, float beta, float skew, float alpha,
                      fh_distill_jsd_endpoints_t ep, double* g) {
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.divergence = dv, o.beta = beta, o.skew = skew, o.alpha = alpha, o.jsd_endpoints = ep;
  o.temperature = 1.25f;
  fh_distill_problem_t p;
  dfx_problem(f, &o, 1, &p);
  return loss_and_grad(&p, g);
}

Test(ref_distill_identities, exact_endpoints_and_named_cases) {
  dfx_t f;
  dfx_init(&f, N_, V_, DS_, VT_, DT_, 6, 1, 1, 3);
  const int64_t n = grad_len();
  double *ga = (double*)malloc(sizeof(double) * (size_t)n), *gb = (double*)malloc(sizeof(double) * (size_t)n);
  const fh_distill_jsd_endpoints_t KL = FH_DISTILL_JSD_ENDPOINTS_KL, PL = FH_DISTILL_JSD_ENDPOINTS_PLAIN;
  const double fkl = loss_of(&f, FH_DISTILL_FORWARD_KL, 0, 0, 0, KL, gb);
  struct {
    fh_distill_divergence_t dv;
    float beta, skew, alpha;
    fh_distill_jsd_endpoints_t ep;
    int ref_is_rkl;
    const char* name;
  } c[] = {
      {FH_DISTILL_JSD, 0.0f, 0, 0, KL, 0, "JSD β=0 (Liger) = KL(P‖Q)"},
      {FH_DISTILL_JSD, 1.0f, 0, 0, KL, 1, "JSD β=1 (Liger) = KL(Q‖P)"},
      {FH_DISTILL_JSD_SCALED, 0.0f, 0, 0, PL, 0, "scaled JSD β=0 = KL(P‖Q)"},
      {FH_DISTILL_JSD_SCALED, 1.0f, 0, 0, PL, 1, "scaled JSD β=1 = KL(Q‖P)"},
      {FH_DISTILL_ALPHA, 0, 0, 1.0f, KL, 0, "alpha 1 = KL(P‖Q)"},
      {FH_DISTILL_ALPHA, 0, 0, 0.0f, KL, 1, "alpha 0 = KL(Q‖P)"},
      {FH_DISTILL_SKEW_FORWARD_KL, 0, 0.0f, 0, KL, 0, "skew forward λ=0 = KL(P‖Q)"},
      {FH_DISTILL_SKEW_REVERSE_KL, 0, 0.0f, 0, KL, 1, "skew reverse λ=0 = KL(Q‖P)"},
  };
  double* gr = (double*)malloc(sizeof(double) * (size_t)n);
  const double rkl = loss_of(&f, FH_DISTILL_REVERSE_KL, 0, 0, 0, KL, gr);
  for (size_t k = 0; k < sizeof c / sizeof c[0]; ++k) {
    const double L = loss_of(&f, c[k].dv, c[k].beta, c[k].skew, c[k].alpha, c[k].ep, ga);
    const double e = c[k].ref_is_rkl ? rel_dev(L, rkl, ga, gr) : rel_dev(L, fkl, ga, gb);
    cr_expect(e <= 1e-12, "%s: relative deviation %.3g", c[k].name, e);
  }
  /* Named alpha members, and the plain JSD and λ = 1 skews, which are identically 0. */
  double L = loss_of(&f, FH_DISTILL_HELLINGER, 0, 0, 0, KL, ga);
  cr_expect(rel_dev(L, loss_of(&f, FH_DISTILL_ALPHA, 0, 0, 0.5f, KL, gb), ga, gb) <= 1e-13, "Hellinger = alpha ½");
  L = loss_of(&f, FH_DISTILL_CHI_SQUARE, 0, 0, 0, KL, ga);
  cr_expect(rel_dev(L, loss_of(&f, FH_DISTILL_ALPHA, 0, 0, 2.0f, KL, gb), ga, gb) <= 1e-13, "chi-square = alpha 2");
  const double zeros[] = {loss_of(&f, FH_DISTILL_JSD, 0.0f, 0, 0, PL, NULL), loss_of(&f, FH_DISTILL_JSD, 1.0f, 0, 0, PL, NULL),
                          loss_of(&f, FH_DISTILL_SKEW_FORWARD_KL, 0, 1.0f, 0, KL, NULL),
                          loss_of(&f, FH_DISTILL_SKEW_REVERSE_KL, 0, 1.0f, 0, KL, NULL)};
  for (int k = 0; k < 4; ++k) cr_expect(fabs(zeros[k]) <= 1e-15, "case %d should be 0, is %.3g", k, zeros[k]);
  free(ga);
  free(gb);
  free(gr);
  dfx_free(&f);
}

/* Limits approached numerically at x = 2^-12, 2^-16, 2^-20 from the endpoint. The deviation from
 * the limit (loss and gradient, relative) is x times a χ²-like moment of the two distributions,
 * so it must shrink by about 16 per step (at least 8 is required) and be below 1e-3 at 2^-20.
 * Non-peaked heads: a peaked row makes that moment ~e^20 and pushes the asymptotic regime below
 * any β a float can hold near 1. */
static void approach(fh_distill_divergence_t dv, int to_one, int limit_is_rkl, const char* name) {
  dfx_t f;
  dfx_init(&f, N_, V_, DS_, VT_, DT_, 7, 0, 1, 3);
  const int64_t n = grad_len();
  double *ga = (double*)malloc(sizeof(double) * (size_t)n), *gl = (double*)malloc(sizeof(double) * (size_t)n);
  const double Ll = loss_of(&f, limit_is_rkl ? FH_DISTILL_REVERSE_KL : FH_DISTILL_FORWARD_KL, 0, 0, 0,
                            FH_DISTILL_JSD_ENDPOINTS_KL, gl);
  double prev = INFINITY;
  for (int e = 12; e <= 20; e += 4) {
    const double x = ldexp(1.0, -e);
    const float v = (float)(to_one ? 1.0 - x : x); /* exact in fp32 */
    const double L = loss_of(&f, dv, v, 0, v, FH_DISTILL_JSD_ENDPOINTS_KL, ga);
    const double dev = rel_dev(L, Ll, ga, gl);
    printf("%s at distance 2^-%d: relative deviation %.3g\n", name, e, dev);
    cr_expect(dev > 0 && dev <= prev / 8, "%s at distance 2^-%d: deviation %.3g does not shrink like x (prev %.3g)",
              name, e, dev, prev);
    if (e == 20) cr_expect(dev <= 1e-3, "%s at distance 2^-20: deviation %.3g", name, dev);
    prev = dev;
  }
  free(ga);
  free(gl);
  dfx_free(&f);
}

Test(ref_distill_identities, jsd_scaled_beta_to_0) { approach(FH_DISTILL_JSD_SCALED, 0, 0, "scaled JSD β→0"); }
Test(ref_distill_identities, jsd_scaled_beta_to_1) { approach(FH_DISTILL_JSD_SCALED, 1, 1, "scaled JSD β→1"); }
Test(ref_distill_identities, alpha_to_0) { approach(FH_DISTILL_ALPHA, 0, 1, "alpha→0"); }
Test(ref_distill_identities, alpha_to_1) { approach(FH_DISTILL_ALPHA, 1, 0, "alpha→1"); }

/* The teacher's columns beyond V are never read: NaN there changes nothing, and the result is
 * the one of a teacher cut to V columns. */
Test(ref_distill_identities, teacher_extra_columns_dropped) {
  dfx_t f;
  dfx_init(&f, N_, V_, DS_, VT_, DT_, 8, 1, 1, 3);
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.divergence = FH_DISTILL_JSD;
  fh_distill_problem_t p;
  dfx_problem(&f, &o, 1, &p);
  const double L1 = loss_and_grad(&p, NULL);
  for (int64_t k = V_ * DT_; k < VT_ * DT_; ++k) f.Ct[k] = NAN;
  for (int64_t k = V_; k < VT_; ++k) f.bt[k] = NAN;
  const double L2 = loss_and_grad(&p, NULL);
  fh_tensor_t ct = fh_tensor_2d(f.Ct, FH_DTYPE_F32, V_, DT_), bt = fh_tensor_2d(f.bt, FH_DTYPE_F32, 1, V_);
  p.Ct = &ct, p.bt = &bt, p.V_t = V_;
  const double L3 = loss_and_grad(&p, NULL);
  cr_expect(L1 == L2 && L1 == L3 && isfinite(L1), "losses %.17g %.17g %.17g", L1, L2, L3);
  dfx_free(&f);
}

/* Ignored rows: excluded from both terms and the denominator, never read (NaN there is
 * harmless); every row ignored gives 0 and zero gradients; NaN in a valid row stays in it. */
Test(ref_distill_identities, ignored_rows) {
  dfx_t f;
  dfx_init(&f, N_, V_, DS_, VT_, DT_, 9, 1, 1, 5);
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.divergence = FH_DISTILL_REVERSE_KL, o.hard_weight = 0.5f;
  fh_distill_problem_t p;
  dfx_problem(&f, &o, 1, &p);
  const double one = 1.0;
  const double mean = dfx_loss(&p, &one, NULL);
  p.opt.reduction = FH_REDUCTION_SUM;
  const double sum = dfx_loss(&p, &one, NULL);
  cr_expect(fabs(mean * (N_ - 5) - sum) <= 1e-12 * fabs(sum), "mean × N_valid %.17g != sum %.17g", mean * (N_ - 5), sum);
  for (int64_t k = 0; k < DS_; ++k) f.Es[1 * DS_ + k] = NAN; /* row 1 is ignored */
  cr_expect(dfx_loss(&p, &one, NULL) == sum, "NaN in an ignored row changed the loss");
  /* NaN in valid row 0: that row's loss is NaN, the others are unchanged. */
  p.opt.reduction = FH_REDUCTION_NONE;
  double w[N_];
  for (int64_t k = 0; k < N_; ++k) w[k] = k == 2;
  const double row2 = dfx_loss(&p, w, NULL);
  f.Es[0] = NAN;
  w[2] = 0, w[0] = 1;
  cr_expect(isnan(dfx_loss(&p, w, NULL)), "NaN in a valid row must propagate to its loss");
  w[0] = 0, w[2] = 1;
  cr_expect(dfx_loss(&p, w, NULL) == row2, "NaN in row 0 leaked into row 2");
  /* All rows ignored. */
  for (int64_t i = 0; i < N_; ++i) f.targets[i] = -100;
  p.opt.reduction = FH_REDUCTION_MEAN;
  double* g = (double*)malloc(sizeof(double) * (size_t)grad_len());
  const double L = loss_and_grad(&p, g);
  double gm = 0;
  for (int64_t e = 0; e < grad_len(); ++e) gm = fmax(gm, fabs(g[e]));
  cr_expect(L == 0.0 && gm == 0.0, "all ignored: loss %.3g, max |grad| %.3g (want exactly 0)", L, gm);
  free(g);
  dfx_free(&f);
}
