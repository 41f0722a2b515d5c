/* ref/distill_sparse: the sparse (offline) teacher. With K = V and the teacher's exact
 * log-probabilities it must equal the dense forward KL (loss and gradient); the remainder bucket
 * must match its closed form; the support's order must not matter. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_distill_fixture.h"

#define N_ 29
#define V_ 97
#define DS_ 13

typedef struct sparse_case {
  dfx_t f;              /* student + a dense teacher whose logits are exactly the fp32 log-probs */
  int64_t* ids;         /* [N x K] */
  float* lp;            /* [N x K] */
  int64_t K;
} sparse_case_t;

/* Teacher log-probs: log_softmax of random logits in fp64, rounded to fp32. The dense teacher is
 * E_t = those log-probs, C_t = identity (D_t = V), so its logits are exactly the fp32 values and
 * its softmax is the renormalized sparse teacher. Row i lists ids in a shuffled order; K < V
 * keeps the first K of the shuffle. */
static void sparse_case_init(sparse_case_t* c, int64_t K, uint64_t seed) {
  dfx_init(&c->f, N_, V_, DS_, V_, V_, seed, 1, 1, 3);
  memset(c->f.Ct, 0, sizeof(float) * V_ * V_);
  for (int64_t j = 0; j < V_; ++j) c->f.Ct[j * V_ + j] = 1.0f;
  memset(c->f.bt, 0, sizeof(float) * V_);
  c->f.bias = 1; /* the student keeps its bias; the teacher's is 0 */
  c->K = K;
  c->ids = (int64_t*)malloc(sizeof(int64_t) * N_ * (size_t)K);
  c->lp = (float*)malloc(sizeof(float) * N_ * (size_t)K);
  tu_rng_t r = {seed * 31 + 1};
  for (int64_t i = 0; i < N_; ++i) {
    double z[V_], m = -INFINITY, Z = 0;
    for (int64_t j = 0; j < V_; ++j) m = fmax(m, z[j] = 2.0 * tu_normal(&r));
    for (int64_t j = 0; j < V_; ++j) Z += exp(z[j] - m);
    for (int64_t j = 0; j < V_; ++j) c->f.Et[i * V_ + j] = (float)(z[j] - m - log(Z));
    int64_t perm[V_];
    for (int64_t j = 0; j < V_; ++j) perm[j] = j;
    for (int64_t j = V_ - 1; j > 0; --j) {
      const int64_t k = tu_randint(&r, j + 1), t = perm[j];
      perm[j] = perm[k], perm[k] = t;
    }
    for (int64_t k = 0; k < K; ++k) {
      c->ids[i * K + k] = perm[k];
      c->lp[i * K + k] = c->f.Et[i * V_ + perm[k]];
    }
  }
}

static void sparse_case_free(sparse_case_t* c) {
  free(c->ids);
  free(c->lp);
  dfx_free(&c->f);
}

static void sparse_problem(sparse_case_t* c, const fh_distill_options_t* o, fh_distill_problem_t* p) {
  dfx_problem(&c->f, o, 1, p);
  p->sparse = 1, p->K = c->K, p->ids = c->ids, p->logprobs = c->lp;
  p->Et = p->Ct = p->bt = NULL;
  p->V_t = p->D_t = 0;
}

static double loss_grad(const fh_distill_problem_t* p, double* g) {
  const double one = 1.0;
  double* st = (double*)malloc(sizeof(double) * FH_DISTILL_ROW_STATE * N_);
  const double L = dfx_loss(p, &one, st);
  cr_assert(fh_ref_distill_backward_f64(p, st, &one, g, g + N_ * DS_, g + N_ * DS_ + V_ * DS_, NULL) == FH_SUCCESS);
  free(st);
  return L;
}

static void compare_dense(fh_distill_sparse_mass_t mass, float T, double tol, const char* name) {
  sparse_case_t c;
  sparse_case_init(&c, V_, 21);
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.temperature = T, o.sparse_mass = mass, o.hard_weight = 0.25f;
  const int64_t n = N_ * DS_ + V_ * DS_ + V_;
  double *gs = (double*)calloc((size_t)n, sizeof(double)), *gd = (double*)calloc((size_t)n, sizeof(double));
  fh_distill_problem_t ps, pd;
  sparse_problem(&c, &o, &ps);
  dfx_problem(&c.f, &o, 1, &pd);
  const double Ls = loss_grad(&ps, gs), Ld = loss_grad(&pd, gd);
  double gm = 0;
  for (int64_t k = 0; k < n; ++k) gm = fmax(gm, fabs(gd[k]));
  const int ok = tu_check_close(name, &Ls, &Ld, 1, 0, tol) && tu_check_close(name, gs, gd, n, tol * gm, tol);
  cr_expect(ok, "%s: sparse K = V differs from the dense forward KL", name);
  free(gs);
  free(gd);
  sparse_case_free(&c);
}

/* Renormalize: the same softmax of the same fp32 numbers, summed in another order: 1e-12. */
Test(ref_distill_sparse, k_equals_v_renormalize_matches_dense) {
  compare_dense(FH_DISTILL_SPARSE_RENORMALIZE, 1.3f, 1e-12, "renormalize K=V T=1.3");
}
/* Remainder at T = 1: no bucket (the support is all of V), the teacher is exp(logp) as given,
 * whose sum differs from 1 by the fp32 rounding of the log-probs (≤ ~1e-7 relative per entry),
 * while the dense path renormalizes: agreement to 1e-6 relative. */
Test(ref_distill_sparse, k_equals_v_remainder_matches_dense) {
  compare_dense(FH_DISTILL_SPARSE_REMAINDER, 1.0f, 1e-6, "remainder K=V T=1");
}

/* K < V, remainder: loss = Σ_S p log(p/q) + ρ log(ρ/q_R), computed here from the dense teacher's
 * columns; renormalize: KL of the conditioned distributions. Both against naive sums. */
Test(ref_distill_sparse, k_less_than_v_closed_forms) {
  enum { K = 9 };
  sparse_case_t c;
  sparse_case_init(&c, K, 22);
  for (int mode = 0; mode < 2; ++mode) {
    fh_distill_options_t o;
    fh_distill_options_init(&o);
    o.sparse_mass = mode ? FH_DISTILL_SPARSE_REMAINDER : FH_DISTILL_SPARSE_RENORMALIZE;
    o.temperature = mode ? 1.0f : 0.7f;
    o.reduction = FH_REDUCTION_SUM;
    fh_distill_problem_t p;
    sparse_problem(&c, &o, &p);
    const double one = 1.0, got = dfx_loss(&p, &one, NULL);
    const double T = (double)o.temperature;
    double want = 0;
    for (int64_t i = 0; i < N_; ++i) {
      if (c.f.targets[i] == -100) continue;
      double s[V_], m = -INFINITY, Z = 0, inS[V_] = {0};
      for (int64_t j = 0; j < V_; ++j) {
        s[j] = c.f.bs[j];
        for (int64_t k = 0; k < DS_; ++k) s[j] += (double)c.f.Es[i * DS_ + k] * c.f.Cs[j * DS_ + k];
        s[j] /= T;
        m = fmax(m, s[j]);
      }
      for (int64_t j = 0; j < V_; ++j) Z += exp(s[j] - m);
      double pk[K], psum = 0, zt = 0;
      for (int64_t k = 0; k < K; ++k) zt += exp(c.lp[i * K + k] / T);
      for (int64_t k = 0; k < K; ++k) {
        pk[k] = mode ? exp((double)c.lp[i * K + k]) : exp(c.lp[i * K + k] / T) / zt;
        psum += pk[k];
        inS[c.ids[i * K + k]] = 1;
      }
      for (int64_t k = 0; k < K; ++k) want += pk[k] * log(pk[k] / (exp(s[c.ids[i * K + k]] - m) / Z));
      if (mode) {
        double qR = 0;
        for (int64_t j = 0; j < V_; ++j) qR += inS[j] ? 0.0 : exp(s[j] - m) / Z;
        want += (1 - psum) * log((1 - psum) / qR);
      }
    }
    want *= T * T; /* scale_by_t_squared (default on) */
    cr_expect(fabs(got - want) <= 1e-12 * fabs(want), "mode %d: got %.17g want %.17g", mode, got, want);
  }
  sparse_case_free(&c);
}

/* Reversing every row's (id, logprob) list changes nothing but summation order. */
Test(ref_distill_sparse, support_order_irrelevant) {
  enum { K = 13 };
  sparse_case_t c;
  sparse_case_init(&c, K, 23);
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.sparse_mass = FH_DISTILL_SPARSE_REMAINDER;
  fh_distill_problem_t p;
  sparse_problem(&c, &o, &p);
  const int64_t n = N_ * DS_ + V_ * DS_ + V_;
  double *g1 = (double*)calloc((size_t)n, sizeof(double)), *g2 = (double*)calloc((size_t)n, sizeof(double));
  const double L1 = loss_grad(&p, g1);
  for (int64_t i = 0; i < N_; ++i)
    for (int64_t k = 0; k < K / 2; ++k) {
      const int64_t a = i * K + k, b = i * K + K - 1 - k, ti = c.ids[a];
      const float tl = c.lp[a];
      c.ids[a] = c.ids[b], c.lp[a] = c.lp[b];
      c.ids[b] = ti, c.lp[b] = tl;
    }
  const double L2 = loss_grad(&p, g2);
  double gm = 0;
  for (int64_t k = 0; k < n; ++k) gm = fmax(gm, fabs(g1[k]));
  cr_expect(tu_check_close("order", &L2, &L1, 1, 0, 1e-13) && tu_check_close("order grads", g2, g1, n, 1e-13 * gm, 0),
            "the support's order changed the result");
  free(g1);
  free(g2);
  sparse_case_free(&c);
}
