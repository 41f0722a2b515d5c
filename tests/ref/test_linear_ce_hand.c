/* Hand-computed cases for the fp64 linear cross-entropy core, one per option, to 1e-12.
 *
 * The problem is tiny (N=3, D=2, V=4) and every input is a small dyadic number, so every raw
 * logit r = E·C + b is exact; the table R below was computed by hand and the first test checks
 * it. Expected values are written in each test straight from the header's formulas on the
 * materialized logits (direct exp/log sums, no online rescaling), independent of how the
 * reference streams. 1e-12 absolute: the values are O(1) and both sides are fp64 computations
 * a few dozen roundings long (~1e-15), so 1e-12 leaves room only for rounding, not for a term. */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "lce_fixture.h"
#include "test_util.h"

#define TOL 1e-12
#define NR 3
#define NV 4
#define ND 2

static float hE[NR * ND] = {1, 0.5f, 0.25f, -1, -0.5f, 2};
static float hC[NV * ND] = {1, 0, 0, 1, 0.5f, 0.5f, -1, 0.25f};
static float hb[NV] = {0.125f, -0.25f, 0, 0.5f};
/* R[i][j] = E_i · C_j + b_j, by hand. */
static const double R[NR][NV] = {
    {1.125, 0.25, 0.75, -0.375},
    {0.375, -1.25, -0.375, 0.0},
    {-0.375, 1.75, 0.75, 1.5},
};

typedef struct hand {
  fh_tensor_t tE, tC, tb;
  int64_t targets[NR];
  float cw[NV], tw[NR];
  int use_bias, use_cw, use_tw;
  fh_linear_ce_options_t opt;
  lce_fwd64_t out;
} hand_t;

static void hand_init(hand_t* h, int64_t t0, int64_t t1, int64_t t2) {
  memset(h, 0, sizeof *h);
  h->tE = fh_tensor_2d(hE, FH_DTYPE_F32, NR, ND);
  h->tC = fh_tensor_2d(hC, FH_DTYPE_F32, NV, ND);
  h->tb = fh_tensor_2d(hb, FH_DTYPE_F32, 1, NV);
  h->use_bias = 1;
  h->targets[0] = t0;
  h->targets[1] = t1;
  h->targets[2] = t2;
  fh_linear_ce_options_init(&h->opt);
  lce_fwd64_alloc(&h->out, NR);
}

static const fh_lce_ref_forward_t* hand_run(hand_t* h) {
  fh_lce_problem_t p;
  memset(&p, 0, sizeof p);
  p.N = NR;
  p.V = NV;
  p.D = ND;
  p.dtype = FH_DTYPE_F32;
  p.E = &h->tE;
  p.C = &h->tC;
  p.bias = h->use_bias ? &h->tb : NULL;
  p.targets = h->targets;
  p.class_weights = h->use_cw ? h->cw : NULL;
  p.token_weights = h->use_tw ? h->tw : NULL;
  p.opt = h->opt;
  cr_assert_eq(fh_ref_lce_forward_f64(&p, &h->out.r), FH_SUCCESS, "%s", fh_last_error());
  return &h->out.r;
}

static void hand_free(hand_t* h) { lce_fwd64_free(&h->out); }

/* Direct formulas on one row of logits. */
static double lse_of(const double* z) {
  double s = 0;
  for (int j = 0; j < NV; ++j) s += exp(z[j]);
  return log(s);
}
static double ent_of(const double* z) {
  double l = lse_of(z), h = 0;
  for (int j = 0; j < NV; ++j) h -= exp(z[j] - l) * (z[j] - l);
  return h;
}
static double nll_of(const double* z, int64_t y) { return lse_of(z) - z[y]; }

#define NEAR(got, want, what) \
  cr_expect(fabs((got) - (want)) <= TOL, "%s: got %.17g want %.17g (diff %.3e)", what, (double)(got), (double)(want), \
            fabs((got) - (want)))

Test(ref_linear_ce_hand, logit_table_is_exact) {
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NV; ++j) {
      double r = (double)hE[i * ND] * hC[j * ND] + (double)hE[i * ND + 1] * hC[j * ND + 1] + hb[j];
      cr_assert_eq(r, R[i][j], "R[%d][%d]", i, j);
    }
}

/* Plain CE with the default ignore_index, every reduction; lse, entropy, argmax, accuracy. */
Test(ref_linear_ce_hand, plain_all_reductions_and_outputs) {
  const double L0 = nll_of(R[0], 2), L2 = nll_of(R[2], 1);
  const fh_reduction_t reds[3] = {FH_REDUCTION_MEAN, FH_REDUCTION_SUM, FH_REDUCTION_NONE};
  const double want[3] = {(L0 + L2) / 2, L0 + L2, L0 + L2};
  for (int k = 0; k < 3; ++k) {
    hand_t h;
    hand_init(&h, 2, -100, 1);
    h.opt.reduction = reds[k];
    const fh_lce_ref_forward_t* r = hand_run(&h);
    NEAR(r->loss, want[k], "loss");
    NEAR(r->row_loss[0], L0, "row_loss[0]");
    cr_expect_eq(r->row_loss[1], 0.0, "ignored row loss");
    NEAR(r->row_loss[2], L2, "row_loss[2]");
    NEAR(r->lse[0], lse_of(R[0]), "lse[0]");
    cr_expect_eq(r->lse[1], 0.0, "ignored lse");
    NEAR(r->lse[2], lse_of(R[2]), "lse[2]");
    NEAR(r->entropy[0], ent_of(R[0]), "entropy[0]");
    cr_expect_eq(r->entropy[1], 0.0);
    NEAR(r->entropy[2], ent_of(R[2]), "entropy[2]");
    cr_expect_eq(r->argmax[0], 0);
    cr_expect_eq(r->argmax[1], -1);
    cr_expect_eq(r->argmax[2], 1);
    /* row 0: target 2, argmax 0 (wrong); row 2: target 1, argmax 1 (right) */
    NEAR(r->accuracy, 0.5, "accuracy");
    cr_expect_eq(r->n_valid, 2);
    NEAR(r->z_loss, 0.0, "z_loss");
    hand_free(&h);
  }
}

/* ignore_index may be a valid class id: rows with that target are skipped. */
Test(ref_linear_ce_hand, ignore_index_is_a_class_id) {
  hand_t h;
  hand_init(&h, 2, 0, 1);
  h.opt.ignore_index = 2;
  const fh_lce_ref_forward_t* r = hand_run(&h);
  NEAR(r->loss, (nll_of(R[1], 0) + nll_of(R[2], 1)) / 2, "loss");
  cr_expect_eq(r->argmax[0], -1);
  cr_expect_eq(r->argmax[1], 0);
  NEAR(r->accuracy, 1.0, "accuracy");
  hand_free(&h);
}

Test(ref_linear_ce_hand, no_bias) {
  hand_t h;
  hand_init(&h, 3, 1, 0);
  h.use_bias = 0;
  double z[NR][NV];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NV; ++j) z[i][j] = R[i][j] - hb[j];
  const fh_lce_ref_forward_t* r = hand_run(&h);
  NEAR(r->loss, (nll_of(z[0], 3) + nll_of(z[1], 1) + nll_of(z[2], 0)) / 3, "loss");
  hand_free(&h);
}

Test(ref_linear_ce_hand, softcap) {
  hand_t h;
  hand_init(&h, 2, -100, 1);
  h.opt.softcap = 1.0f;
  double z[NR][NV];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NV; ++j) z[i][j] = tanh(R[i][j]);
  const fh_lce_ref_forward_t* r = hand_run(&h);
  NEAR(r->loss, (nll_of(z[0], 2) + nll_of(z[2], 1)) / 2, "loss");
  NEAR(r->lse[0], lse_of(z[0]), "lse of the capped logits");
  NEAR(r->entropy[2], ent_of(z[2]), "entropy of the capped logits");
  hand_free(&h);
}

/* Scale first, then the cap: z = c tanh(scale r / c). */
Test(ref_linear_ce_hand, logit_scale_then_softcap) {
  hand_t h;
  hand_init(&h, 2, 3, 1);
  h.opt.logit_scale = 0.5f;
  h.opt.softcap = 2.0f;
  double z[NR][NV], s[NR][NV];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NV; ++j) {
      z[i][j] = 2.0 * tanh(0.5 * R[i][j] / 2.0);
      s[i][j] = 0.5 * R[i][j];
    }
  const fh_lce_ref_forward_t* r = hand_run(&h);
  NEAR(r->loss, (nll_of(z[0], 2) + nll_of(z[1], 3) + nll_of(z[2], 1)) / 3, "loss");
  /* scale alone (temperature 2) */
  h.opt.softcap = 0.0f;
  r = hand_run(&h);
  NEAR(r->loss, (nll_of(s[0], 2) + nll_of(s[1], 3) + nll_of(s[2], 1)) / 3, "loss, scale only");
  NEAR(r->lse[1], lse_of(s[1]), "lse, scale only");
  hand_free(&h);
}

/* PyTorch: (1-α)·nll + α·mean_j(lse − z_j), the uniform part including the target. */
Test(ref_linear_ce_hand, label_smoothing) {
  const double a = 0.25;
  hand_t h;
  hand_init(&h, 2, -100, 1);
  h.opt.label_smoothing = (float)a;
  const int64_t y[NR] = {2, -1, 1};
  double rows[NR] = {0};
  for (int i = 0; i < NR; i += 2) {
    double u = 0;
    for (int j = 0; j < NV; ++j) u += lse_of(R[i]) - R[i][j];
    rows[i] = (1 - a) * nll_of(R[i], y[i]) + a * u / NV;
  }
  const fh_lce_ref_forward_t* r = hand_run(&h);
  NEAR(r->loss, (rows[0] + rows[2]) / 2, "mean");
  NEAR(r->row_loss[2], rows[2], "row 2");
  /* α = 1: only the uniform part remains */
  h.opt.label_smoothing = 1.0f;
  r = hand_run(&h);
  double u0 = 0;
  for (int j = 0; j < NV; ++j) u0 += (lse_of(R[0]) - R[0][j]) / NV;
  NEAR(r->row_loss[0], u0, "alpha 1");
  hand_free(&h);
}

/* Class weights: ce_i = w_y nll_i (+ smoothing Σ_j w_j), mean over Σ w_y. */
Test(ref_linear_ce_hand, class_weights_all_reductions) {
  const float w[NV] = {0.5f, 2.0f, 1.5f, 0.25f};
  const double L0 = nll_of(R[0], 2), L1 = nll_of(R[1], 3), L2 = nll_of(R[2], 1);
  const double S = w[2] * L0 + w[3] * L1 + w[1] * L2, Dce = w[2] + w[3] + w[1];
  hand_t h;
  hand_init(&h, 2, 3, 1);
  memcpy(h.cw, w, sizeof w);
  h.use_cw = 1;
  const fh_lce_ref_forward_t* r = hand_run(&h);
  NEAR(r->loss, S / Dce, "mean");
  NEAR(r->denom_ce, Dce, "D_ce");
  h.opt.reduction = FH_REDUCTION_SUM;
  r = hand_run(&h);
  NEAR(r->loss, S, "sum");
  h.opt.reduction = FH_REDUCTION_NONE;
  r = hand_run(&h);
  NEAR(r->row_loss[1], w[3] * L1, "none row 1");
  /* with smoothing: ε Σ_j w_j (lse − z_j) */
  h.opt.reduction = FH_REDUCTION_MEAN;
  h.opt.label_smoothing = 0.5f;
  r = hand_run(&h);
  const int64_t y[NR] = {2, 3, 1};
  double tot = 0;
  for (int i = 0; i < NR; ++i) {
    double u = 0;
    for (int j = 0; j < NV; ++j) u += w[j] * (lse_of(R[i]) - R[i][j]);
    tot += w[y[i]] * 0.5 * nll_of(R[i], y[i]) + 0.5 / NV * u;
  }
  NEAR(r->loss, tot / Dce, "mean with smoothing");
  hand_free(&h);
}

Test(ref_linear_ce_hand, token_weights) {
  const float om[NR] = {0.75f, 3.0f, 0.5f};
  const double L0 = nll_of(R[0], 2), L2 = nll_of(R[2], 1);
  hand_t h;
  hand_init(&h, 2, -100, 1);
  memcpy(h.tw, om, sizeof om);
  h.use_tw = 1;
  const fh_lce_ref_forward_t* r = hand_run(&h);
  NEAR(r->loss, (om[0] * L0 + om[2] * L2) / (om[0] + om[2]), "mean (ignored row's weight not counted)");
  h.opt.reduction = FH_REDUCTION_NONE;
  r = hand_run(&h);
  NEAR(r->row_loss[0], om[0] * L0, "none row 0");
  cr_expect_eq(r->row_loss[1], 0.0);
  hand_free(&h);
}

/* z-loss with class and token weights: ce over D_ce = Σ ω w_y, λ lse² over D_reg = Σ ω;
 * z_loss reports the λ part alone. */
Test(ref_linear_ce_hand, z_loss_with_weights) {
  const float w[NV] = {0.5f, 2.0f, 1.5f, 0.25f}, om[NR] = {0.75f, 3.0f, 0.5f};
  const double lam = 0.25;
  const int64_t y[NR] = {2, 3, 1};
  double Sce = 0, Sz = 0, Dce = 0, Dreg = 0, zrow[NR];
  for (int i = 0; i < NR; ++i) {
    Sce += om[i] * w[y[i]] * nll_of(R[i], y[i]);
    zrow[i] = om[i] * lam * lse_of(R[i]) * lse_of(R[i]);
    Sz += zrow[i];
    Dce += om[i] * w[y[i]];
    Dreg += om[i];
  }
  hand_t h;
  hand_init(&h, 2, 3, 1);
  memcpy(h.cw, w, sizeof w);
  memcpy(h.tw, om, sizeof om);
  h.use_cw = h.use_tw = 1;
  h.opt.z_loss_scale = (float)lam;
  const fh_lce_ref_forward_t* r = hand_run(&h);
  NEAR(r->loss, Sce / Dce + Sz / Dreg, "mean");
  NEAR(r->z_loss, Sz / Dreg, "z_loss mean");
  NEAR(r->denom_reg, Dreg, "D_reg");
  h.opt.reduction = FH_REDUCTION_SUM;
  r = hand_run(&h);
  NEAR(r->loss, Sce + Sz, "sum");
  NEAR(r->z_loss, Sz, "z_loss sum");
  h.opt.reduction = FH_REDUCTION_NONE;
  r = hand_run(&h);
  for (int i = 0; i < NR; ++i) {
    NEAR(r->row_loss[i], om[i] * w[y[i]] * nll_of(R[i], y[i]) + zrow[i], "none row");
    NEAR(r->row_zloss[i], zrow[i], "none z_loss row");
  }
  hand_free(&h);
}

/* Entropy weight η (both signs): η h_i per row, over D_reg; h reported per row. */
Test(ref_linear_ce_hand, entropy_weight) {
  const double etas[2] = {0.5, -0.375};
  for (int k = 0; k < 2; ++k) {
    hand_t h;
    hand_init(&h, 2, -100, 1);
    h.opt.entropy_weight = (float)etas[k];
    const fh_lce_ref_forward_t* r = hand_run(&h);
    const double want = (nll_of(R[0], 2) + nll_of(R[2], 1)) / 2 + etas[k] * (ent_of(R[0]) + ent_of(R[2])) / 2;
    NEAR(r->loss, want, "mean");
    NEAR(r->entropy[0], ent_of(R[0]), "entropy[0]");
    /* h = lse − Σ p z, an independent form of the same quantity */
    double ez = 0;
    for (int j = 0; j < NV; ++j) ez += exp(R[2][j] - lse_of(R[2])) * R[2][j];
    NEAR(r->entropy[2], lse_of(R[2]) - ez, "entropy[2] as lse - E[z]");
    hand_free(&h);
  }
}

/* divisor > 0 replaces both denominators. */
Test(ref_linear_ce_hand, divisor) {
  const float w[NV] = {0.5f, 2.0f, 1.5f, 0.25f};
  const double lam = 0.125, eta = 0.25;
  hand_t h;
  hand_init(&h, 2, 3, -100);
  memcpy(h.cw, w, sizeof w);
  h.use_cw = 1;
  h.opt.divisor = 8.0f;
  h.opt.z_loss_scale = (float)lam;
  h.opt.entropy_weight = (float)eta;
  const fh_lce_ref_forward_t* r = hand_run(&h);
  double s = 0, sz = 0;
  const int64_t y[2] = {2, 3};
  for (int i = 0; i < 2; ++i) {
    s += w[y[i]] * nll_of(R[i], y[i]) + lam * lse_of(R[i]) * lse_of(R[i]) + eta * ent_of(R[i]);
    sz += lam * lse_of(R[i]) * lse_of(R[i]);
  }
  NEAR(r->loss, s / 8, "mean with divisor");
  NEAR(r->z_loss, sz / 8, "z_loss with divisor");
  NEAR(r->denom_ce, 8.0, "D_ce");
  NEAR(r->denom_reg, 8.0, "D_reg");
  hand_free(&h);
}

/* argmax: first index of the maximum; NaN counts as the maximum (over +inf too). */
Test(ref_linear_ce_hand, argmax_ties_nan_and_accuracy) {
  /* D=2, V=5; C_3 has a 0 second component so E = (0, inf) gives 0·inf = NaN there only. */
  float E[3 * 2] = {1, 0, -1, 0, 0, INFINITY};
  float C[5 * 2] = {0.5f, 1, 1, 1, 1, 1, 0.25f, 0, -1, -1};
  fh_tensor_t tE = fh_tensor_2d(E, FH_DTYPE_F32, 3, 2), tC = fh_tensor_2d(C, FH_DTYPE_F32, 5, 2);
  int64_t targets[3] = {1, 0, 3};
  fh_lce_problem_t p;
  memset(&p, 0, sizeof p);
  p.N = 3;
  p.V = 5;
  p.D = 2;
  p.E = &tE;
  p.C = &tC;
  p.targets = targets;
  fh_linear_ce_options_init(&p.opt);
  p.opt.reduction = FH_REDUCTION_NONE;
  lce_fwd64_t o;
  lce_fwd64_alloc(&o, 3);
  cr_assert_eq(fh_ref_lce_forward_f64(&p, &o.r), FH_SUCCESS);
  cr_expect_eq(o.r.argmax[0], 1, "tie 1.0 at j=1,2: first wins (got %lld)", (long long)o.r.argmax[0]);
  cr_expect_eq(o.r.argmax[1], 4, "got %lld", (long long)o.r.argmax[1]);
  cr_expect_eq(o.r.argmax[2], 3, "NaN at j=3 beats +inf at j=0..2 (got %lld)", (long long)o.r.argmax[2]);
  NEAR(o.r.accuracy, 2.0 / 3.0, "accuracy counts rows 0 and 2");
  cr_expect(isnan(o.r.row_loss[2]), "NaN row loss");
  cr_expect(isfinite(o.r.row_loss[0]) && isfinite(o.r.row_loss[1]));
  lce_fwd64_free(&o);
}

/* The backward on the plain problem, by hand: G_ij = g (p_ij − δ_jy) / n_valid. */
Test(ref_linear_ce_hand, backward_plain_mean) {
  hand_t h;
  hand_init(&h, 2, -100, 1);
  const fh_lce_ref_forward_t* r = hand_run(&h);
  const double g = 0.75;
  const int64_t y[NR] = {2, -1, 1};
  double G[NR][NV] = {{0}};
  for (int i = 0; i < NR; i += 2)
    for (int j = 0; j < NV; ++j) G[i][j] = g * (exp(R[i][j] - lse_of(R[i])) - (j == y[i])) / 2;
  double dE[NR * ND], dC[NV * ND], db[NV];
  fh_lce_problem_t p;
  memset(&p, 0, sizeof p);
  p.N = NR;
  p.V = NV;
  p.D = ND;
  p.E = &h.tE;
  p.C = &h.tC;
  p.bias = &h.tb;
  p.targets = h.targets;
  p.opt = h.opt;
  cr_assert_eq(fh_ref_lce_backward_f64(&p, r->lse, r->entropy, &g, NULL, dE, dC, db, NULL), FH_SUCCESS);
  for (int j = 0; j < NV; ++j) NEAR(db[j], G[0][j] + G[2][j], "dbias");
  for (int i = 0; i < NR; ++i)
    for (int k = 0; k < ND; ++k) {
      double want = 0;
      for (int j = 0; j < NV; ++j) want += G[i][j] * hC[j * ND + k];
      NEAR(dE[i * ND + k], want, "dE");
    }
  for (int j = 0; j < NV; ++j)
    for (int k = 0; k < ND; ++k) NEAR(dC[j * ND + k], G[0][j] * hE[k] + G[2][j] * hE[2 * ND + k], "dC");
  hand_free(&h);
}

/* The backward's grad_lse and z-loss terms by hand on one row: ∂/∂z_j = (2λ lse + glse) p_j
 * on top of the CE part, for sum reduction. */
Test(ref_linear_ce_hand, backward_zloss_and_grad_lse) {
  hand_t h;
  hand_init(&h, -100, 0, -100);
  h.opt.reduction = FH_REDUCTION_SUM;
  h.opt.z_loss_scale = 0.5f;
  const fh_lce_ref_forward_t* r = hand_run(&h);
  const double g = 1.0, glse[NR] = {7, -0.5, 9}, l = lse_of(R[1]);
  double db[NV];
  fh_lce_problem_t p;
  memset(&p, 0, sizeof p);
  p.N = NR;
  p.V = NV;
  p.D = ND;
  p.E = &h.tE;
  p.C = &h.tC;
  p.bias = &h.tb;
  p.targets = h.targets;
  p.opt = h.opt;
  cr_assert_eq(fh_ref_lce_backward_f64(&p, r->lse, r->entropy, &g, glse, NULL, NULL, db, NULL), FH_SUCCESS);
  for (int j = 0; j < NV; ++j) {
    const double pj = exp(R[1][j] - l);
    NEAR(db[j], (pj - (j == 0)) + (2 * 0.5 * l + glse[1]) * pj, "dbias (ignored rows' grad_lse unused)");
  }
  hand_free(&h);
}

/* D_ce = 0 (every valid target has class weight 0) while D_reg > 0: the CE part over the zero
 * denominator is 0 and the z-loss part keeps its own mean (the reference's per-part reading
 * of the header's "a denominator that is 0 gives loss 0"; see the report). */
Test(ref_linear_ce_hand, zero_ce_denominator_keeps_regularizers) {
  hand_t h;
  hand_init(&h, 0, -100, 0);
  const float w[NV] = {0, 1, 1, 1};
  memcpy(h.cw, w, sizeof w);
  h.use_cw = 1;
  h.opt.z_loss_scale = 0.25f;
  const fh_lce_ref_forward_t* r = hand_run(&h);
  const double zl = 0.25 * (lse_of(R[0]) * lse_of(R[0]) + lse_of(R[2]) * lse_of(R[2])) / 2;
  NEAR(r->loss, zl, "loss = z-loss mean only");
  NEAR(r->z_loss, zl, "z_loss");
  cr_expect(r->denom_ce == 0.0 && r->denom_reg == 2.0, "denominators %g %g", r->denom_ce, r->denom_reg);
  hand_free(&h);
}
