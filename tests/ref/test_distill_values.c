/* ref/distill_values: the fp64 reference against hand-computed values on V = 3..5, every
 * divergence. Heads are built so the logits are exactly the chosen numbers (E = logits,
 * C = identity), and the expected values come from the textbook definitions written out
 * naively here (softmax, then sums of p log(p/q) and so on), not from the (f, a) form. */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "test_distill_fixture.h"

enum { MAXV = 5 };

typedef struct hand {
  int64_t V;
  float s[MAXV], t[MAXV]; /* one row: student and teacher logits */
  float Es[MAXV], Cs[MAXV * MAXV], Et[MAXV], Ct[MAXV * MAXV];
  fh_tensor_t tEs, tCs, tEt, tCt;
  int64_t target;
} hand_t;

static void hand_init(hand_t* h, int64_t V, const float* s, const float* t) {
  memset(h, 0, sizeof *h);
  h->V = V;
  for (int64_t j = 0; j < V; ++j) {
    h->Es[j] = s[j], h->Et[j] = t[j];
    h->Cs[j * V + j] = 1.0f, h->Ct[j * V + j] = 1.0f;
  }
  h->tEs = fh_tensor_2d(h->Es, FH_DTYPE_F32, 1, V);
  h->tCs = fh_tensor_2d(h->Cs, FH_DTYPE_F32, V, V);
  h->tEt = fh_tensor_2d(h->Et, FH_DTYPE_F32, 1, V);
  h->tCt = fh_tensor_2d(h->Ct, FH_DTYPE_F32, V, V);
  h->target = V - 1;
}

static double hand_loss(hand_t* h, const fh_distill_options_t* o) {
  fh_distill_problem_t p;
  memset(&p, 0, sizeof p);
  p.fn = "test";
  p.N = 1, p.V = h->V, p.D_s = h->V, p.V_t = h->V, p.D_t = h->V;
  p.Es = &h->tEs, p.Cs = &h->tCs, p.Et = &h->tEt, p.Ct = &h->tCt;
  p.targets = &h->target;
  p.opt = *o;
  const double g = 1.0;
  return dfx_loss(&p, &g, NULL);
}

static void softmax(const float* z, int64_t V, double T, double* out) {
  double m = -INFINITY, Z = 0;
  for (int64_t j = 0; j < V; ++j) m = fmax(m, z[j] / T);
  for (int64_t j = 0; j < V; ++j) Z += exp(z[j] / T - m);
  for (int64_t j = 0; j < V; ++j) out[j] = exp(z[j] / T - m) / Z;
}

static double kl(const double* a, const double* b, int64_t V) {
  double s = 0;
  for (int64_t j = 0; j < V; ++j) s += a[j] > 0 ? a[j] * log(a[j] / b[j]) : 0.0;
  return s;
}

/* The textbook definitions. */
static double naive(fh_distill_divergence_t dv, double beta, double lam, double alpha, const double* p,
                    const double* q, int64_t V) {
  double m[MAXV], s = 0;
  switch (dv) {
    case FH_DISTILL_FORWARD_KL: return kl(p, q, V);
    case FH_DISTILL_REVERSE_KL: return kl(q, p, V);
    case FH_DISTILL_JSD:
    case FH_DISTILL_JSD_SCALED:
      for (int64_t j = 0; j < V; ++j) m[j] = beta * p[j] + (1 - beta) * q[j];
      s = beta * kl(p, m, V) + (1 - beta) * kl(q, m, V);
      return dv == FH_DISTILL_JSD ? s : s / (beta * (1 - beta));
    case FH_DISTILL_TVD:
      for (int64_t j = 0; j < V; ++j) s += 0.5 * fabs(p[j] - q[j]);
      return s;
    case FH_DISTILL_SKEW_FORWARD_KL:
      for (int64_t j = 0; j < V; ++j) m[j] = lam * p[j] + (1 - lam) * q[j];
      return kl(p, m, V);
    case FH_DISTILL_SKEW_REVERSE_KL:
      for (int64_t j = 0; j < V; ++j) m[j] = lam * q[j] + (1 - lam) * p[j];
      return kl(q, m, V);
    case FH_DISTILL_ALPHA:
      for (int64_t j = 0; j < V; ++j) s += pow(p[j], alpha) * pow(q[j], 1 - alpha);
      return (1 - s) / (alpha * (1 - alpha));
    case FH_DISTILL_HELLINGER:
      for (int64_t j = 0; j < V; ++j) s += 2 * (sqrt(p[j]) - sqrt(q[j])) * (sqrt(p[j]) - sqrt(q[j]));
      return s;
    case FH_DISTILL_CHI_SQUARE:
      for (int64_t j = 0; j < V; ++j) s += 0.5 * (p[j] - q[j]) * (p[j] - q[j]) / q[j];
      return s;
    default: return NAN;
  }
}

static const float S3[3] = {0.5f, -1.25f, 2.0f}, T3[3] = {1.0f, 0.25f, -0.75f};
static const float S4[4] = {-0.5f, 1.5f, 0.0f, 3.0f}, T4[4] = {2.0f, -1.0f, 0.5f, 0.75f};
static const float S5[5] = {1.0f, -2.0f, 0.25f, 4.0f, -0.5f}, T5[5] = {0.0f, 1.5f, -0.25f, 2.5f, 3.5f};

/* Every divergence, V = 3, 4, 5, T = 1 and T = 2 (with κ = T²), against the naive definition. */
static void check_all(fh_distill_divergence_t dv, double beta, double lam, double alpha) {
  const float* S[3] = {S3, S4, S5};
  const float* Tt[3] = {T3, T4, T5};
  for (int c = 0; c < 3; ++c) {
    const int64_t V = 3 + c;
    for (int ti = 0; ti < 2; ++ti) {
      const double T = ti ? 2.0 : 1.0;
      hand_t h;
      hand_init(&h, V, S[c], Tt[c]);
      fh_distill_options_t o;
      fh_distill_options_init(&o);
      o.divergence = dv, o.beta = (float)beta, o.skew = (float)lam, o.alpha = (float)alpha;
      o.temperature = (float)T;
      double p[MAXV], q[MAXV];
      softmax(Tt[c], V, T, p);
      softmax(S[c], V, T, q);
      const double want = T * T * naive(dv, beta, lam, alpha, p, q, V), got = hand_loss(&h, &o);
      /* 1e-12: both sides are a handful of fp64 operations on O(1) numbers. */
      cr_expect(fabs(got - want) <= 1e-12 * (1 + fabs(want)), "divergence %d V=%lld T=%g: got %.17g want %.17g",
                (int)dv, (long long)V, T, got, want);
    }
  }
}

Test(ref_distill_values, forward_kl) { check_all(FH_DISTILL_FORWARD_KL, 0, 0, 0); }
Test(ref_distill_values, reverse_kl) { check_all(FH_DISTILL_REVERSE_KL, 0, 0, 0); }
Test(ref_distill_values, jsd) {
  check_all(FH_DISTILL_JSD, 0.5, 0, 0);
  check_all(FH_DISTILL_JSD, 0.125, 0, 0);
  check_all(FH_DISTILL_JSD, 0.875, 0, 0);
}
Test(ref_distill_values, jsd_scaled) {
  check_all(FH_DISTILL_JSD_SCALED, 0.25, 0, 0);
  check_all(FH_DISTILL_JSD_SCALED, 0.75, 0, 0);
}
Test(ref_distill_values, tvd) { check_all(FH_DISTILL_TVD, 0, 0, 0); }
Test(ref_distill_values, skew_forward_kl) { check_all(FH_DISTILL_SKEW_FORWARD_KL, 0, 0.25, 0); }
Test(ref_distill_values, skew_reverse_kl) { check_all(FH_DISTILL_SKEW_REVERSE_KL, 0, 0.625, 0); }
Test(ref_distill_values, alpha) {
  check_all(FH_DISTILL_ALPHA, 0, 0, 0.25);
  check_all(FH_DISTILL_ALPHA, 0, 0, 0.75);
  check_all(FH_DISTILL_ALPHA, 0, 0, -1.5);
  check_all(FH_DISTILL_ALPHA, 0, 0, 3.0);
}
Test(ref_distill_values, hellinger) { check_all(FH_DISTILL_HELLINGER, 0, 0, 0); }
Test(ref_distill_values, chi_square) { check_all(FH_DISTILL_CHI_SQUARE, 0, 0, 0); }

/* Closed forms worked by hand: teacher uniform over 4, student logits (2, 0, 0, 0), so
 * q = (e², 1, 1, 1)/Z with Z = e² + 3. */
Test(ref_distill_values, closed_forms_v4) {
  const float s[4] = {2, 0, 0, 0}, t[4] = {0, 0, 0, 0};
  const double e2 = exp(2.0), Z = e2 + 3, L = log(Z);
  struct {
    fh_distill_divergence_t dv;
    double want;
  } c[] = {
      {FH_DISTILL_FORWARD_KL, L - log(4.0) - 0.5},       /* Σ ¼ log(¼/q_j) */
      {FH_DISTILL_REVERSE_KL, 2 * e2 / Z - L + log(4.0)}, /* Σ q_j log q_j + log 4 */
      {FH_DISTILL_TVD, e2 / Z - 0.25},                   /* only q_0 exceeds ¼ */
      {FH_DISTILL_CHI_SQUARE, 0.5 * (Z / 16 * (1 / e2 + 3) - 1)}, /* ½(Σ p²/q − 1) */
      {FH_DISTILL_HELLINGER, 4 * (1 - (exp(1.0) + 3) / (2 * sqrt(Z)))}, /* 4(1 − Σ √(pq)) */
  };
  hand_t h;
  hand_init(&h, 4, s, t);
  for (size_t k = 0; k < sizeof c / sizeof c[0]; ++k) {
    fh_distill_options_t o;
    fh_distill_options_init(&o);
    o.divergence = c[k].dv;
    const double got = hand_loss(&h, &o);
    cr_expect(fabs(got - c[k].want) <= 1e-12, "divergence %d: got %.17g want %.17g", (int)c[k].dv, got, c[k].want);
  }
}

/* Hard loss and the weights: loss = w_h (lse(s) − s_y) + w_s κ KL, with the untempered CE. */
Test(ref_distill_values, hard_and_soft_weights) {
  hand_t h;
  hand_init(&h, 5, S5, T5);
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.temperature = 2.0f, o.hard_weight = 0.25f, o.soft_weight = 0.5f;
  double p[MAXV], q[MAXV], q1[MAXV];
  softmax(T5, 5, 2.0, p);
  softmax(S5, 5, 2.0, q);
  softmax(S5, 5, 1.0, q1);
  const double want = 0.25 * -log(q1[4]) + 0.5 * 4.0 * kl(p, q, 5);
  const double got = hand_loss(&h, &o);
  cr_assert(fabs(got - want) <= 1e-12, "got %.17g want %.17g", got, want);
}
