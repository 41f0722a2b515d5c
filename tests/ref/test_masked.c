/* Masked classes (a logit of -inf, docs/conventions.md) on the CPU backend, and fp32 gradients
 * at large logit magnitude (docs/linear_ce.md and docs/distillation.md, "Precision").
 *
 * Masked classes: the oracle is the same problem with the masked classes removed from the
 * vocabulary (their C rows, bias entries and class weights dropped, targets renumbered). Loss,
 * lse, entropy and the gradients of the kept classes must agree to fp64 rounding, and the
 * gradients of masked classes must be exactly 0, whether the -inf comes from the bias or from C.
 * Everything runs through the public API in fp64 (FH_DTYPE_F64: per-row arrays are double).
 *
 * Precision: fp32 inputs whose logits reach 1, 1e2, 1e4; the fp32 gradients must be the fp64
 * gradients of the same inputs rounded once (relative error <= 2^-24 per element, plus an
 * absolute floor of 2^-24 of the largest gradient for the entries that cancel). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fusedhead.h"
#include "test_util.h"

#define N_ 6
#define V_ 11
#define D_ 5
#define TOL 1e-11

/* fh_tensor_t has a non-const data pointer for inputs and outputs alike. */
static void* mut(const void* p) {
  void* q;
  memcpy(&q, &p, sizeof q);
  return q;
}

static fh_context_t* cpu(void) {
  fh_context_t* c = NULL;
  cr_assert_eq(fh_context_create(&c, FH_BACKEND_CPU, 0), FH_SUCCESS);
  return c;
}

/* A problem in fp64 with optional bias, class and token weights. */
typedef struct lp {
  int64_t N, V, D;
  double E[N_ * D_], C[V_ * D_], b[V_], cw[V_], tw[N_];
  int64_t y[N_];
  int has_b, has_cw, has_tw;
} lp_t;

typedef struct lres {
  double loss[N_], lse[N_], ent[N_], dE[N_ * D_], dC[V_ * D_], db[V_];
} lres_t;

static void lce_run(const lp_t* p, const fh_linear_ce_options_t* o, const double* glse, lres_t* r) {
  fh_context_t* ctx = cpu();
  fh_tensor_t E = fh_tensor_2d(mut(p->E), FH_DTYPE_F64, p->N, p->D);
  fh_tensor_t C = fh_tensor_2d(mut(p->C), FH_DTYPE_F64, p->V, p->D);
  fh_tensor_t B = fh_tensor_2d(mut(p->b), FH_DTYPE_F64, 1, p->V);
  const float* cw = p->has_cw ? (const float*)(const void*)p->cw : NULL;
  const float* tw = p->has_tw ? (const float*)(const void*)p->tw : NULL;
  memset(r, 0, sizeof *r);
  fh_linear_ce_outputs_t out = {(float*)r->loss, (float*)r->lse, (float*)r->ent, NULL, NULL, NULL};
  cr_assert_eq(fh_linear_ce_forward(ctx, o, &E, &C, p->has_b ? &B : NULL, p->y, cw, tw, &out, NULL, 0),
               FH_SUCCESS, "%s", fh_last_error());
  double gl[N_];
  for (int64_t i = 0; i < N_; ++i) gl[i] = 1.0 + 0.25 * (double)i;
  fh_linear_ce_grad_inputs_t in = {(const float*)r->lse, (const float*)r->ent, (const float*)gl,
                                   (const float*)(const void*)glse};
  fh_tensor_t dE = fh_tensor_2d(r->dE, FH_DTYPE_F64, p->N, p->D), dC = fh_tensor_2d(r->dC, FH_DTYPE_F64, p->V, p->D);
  fh_tensor_t db = fh_tensor_2d(r->db, FH_DTYPE_F64, 1, p->V);
  fh_linear_ce_grads_t g = {&dE, &dC, p->has_b ? &db : NULL};
  cr_assert_eq(fh_linear_ce_backward(ctx, o, &E, &C, p->has_b ? &B : NULL, p->y, cw, tw, &in, &g, NULL, 0),
               FH_SUCCESS, "%s", fh_last_error());
  fh_context_destroy(ctx);
}

/* Random problem; classes with mask[j] get -inf through the bias (via_c = 0) or through C
 * (C_j[0] = -inf, every E_i[0] > 0). */
static void lce_make(lp_t* p, const int* mask, int via_c, uint64_t seed) {
  tu_rng_t rng = {seed};
  memset(p, 0, sizeof *p);
  p->N = N_, p->V = V_, p->D = D_, p->has_b = 1;
  for (int64_t k = 0; k < N_ * D_; ++k) p->E[k] = tu_normal(&rng);
  for (int64_t i = 0; i < N_; ++i) p->E[i * D_] = fabs(p->E[i * D_]) + 0.5;
  for (int64_t k = 0; k < V_ * D_; ++k) p->C[k] = tu_normal(&rng);
  for (int64_t j = 0; j < V_; ++j) {
    p->b[j] = 0.5 * tu_normal(&rng);
    p->cw[j] = 0.5 + tu_uniform(&rng);
    if (mask[j] && via_c) p->C[j * D_] = -INFINITY;
    if (mask[j] && !via_c) p->b[j] = -INFINITY;
  }
  for (int64_t i = 0; i < N_; ++i) {
    p->tw[i] = 0.5 + tu_uniform(&rng);
    do p->y[i] = tu_randint(&rng, V_);
    while (mask[p->y[i]]);
  }
}

/* The same problem without the masked classes. */
static void lce_reduce(const lp_t* p, const int* mask, lp_t* q, int64_t* keep) {
  *q = *p;
  int64_t V = 0, idx[V_];
  for (int64_t j = 0; j < p->V; ++j) {
    idx[j] = -1;
    if (mask[j]) continue;
    idx[j] = V;
    keep[V] = j;
    memcpy(q->C + V * D_, p->C + j * D_, sizeof(double) * D_);
    q->b[V] = p->b[j];
    q->cw[V] = p->cw[j];
    ++V;
  }
  q->V = V;
  for (int64_t i = 0; i < p->N; ++i) q->y[i] = idx[p->y[i]];
}

static const int MASK[V_] = {0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0};

typedef struct lcase {
  const char* name;
  void (*set)(fh_linear_ce_options_t*, lp_t*);
  int glse;
} lcase_t;

static void o_plain(fh_linear_ce_options_t* o, lp_t* p) { (void)o, (void)p; }
static void o_smooth(fh_linear_ce_options_t* o, lp_t* p) { o->label_smoothing = 0.2f, (void)p; }
static void o_zloss(fh_linear_ce_options_t* o, lp_t* p) { o->z_loss_scale = 0.05f, (void)p; }
static void o_entropy(fh_linear_ce_options_t* o, lp_t* p) { o->entropy_weight = 0.3f, (void)p; }
static void o_softcap(fh_linear_ce_options_t* o, lp_t* p) { o->softcap = 2.0f, o->logit_scale = 0.7f, (void)p; }
static void o_weights(fh_linear_ce_options_t* o, lp_t* p) {
  o->label_smoothing = 0.1f;
  p->has_cw = p->has_tw = 1;
}
static void o_sum_all(fh_linear_ce_options_t* o, lp_t* p) {
  o->reduction = FH_REDUCTION_SUM;
  o->label_smoothing = 0.15f, o->z_loss_scale = 0.01f, o->entropy_weight = -0.2f, o->softcap = 3.0f;
  p->has_cw = p->has_tw = 1;
}
static void o_none(fh_linear_ce_options_t* o, lp_t* p) {
  o->reduction = FH_REDUCTION_NONE;
  o->label_smoothing = 0.05f;
  (void)p;
}

static const lcase_t LCASES[] = {
    {"plain", o_plain, 0},     {"smoothing", o_smooth, 0}, {"z_loss", o_zloss, 0},   {"entropy", o_entropy, 0},
    {"softcap", o_softcap, 0}, {"weights", o_weights, 0},  {"sum_all", o_sum_all, 1}, {"none", o_none, 1},
};

static void lce_masked(int via_c) {
  for (size_t c = 0; c < sizeof LCASES / sizeof LCASES[0]; ++c) {
    lp_t p, q;
    int64_t keep[V_];
    lce_make(&p, MASK, via_c, 11 + c);
    fh_linear_ce_options_t o;
    fh_linear_ce_options_init(&o);
    LCASES[c].set(&o, &p);
    lce_reduce(&p, MASK, &q, keep);
    double glse[N_];
    for (int64_t i = 0; i < N_; ++i) glse[i] = 0.1 * (double)(i % 3);
    lres_t a, b;
    lce_run(&p, &o, LCASES[c].glse ? glse : NULL, &a);
    lce_run(&q, &o, LCASES[c].glse ? glse : NULL, &b);
    const int64_t nl = o.reduction == FH_REDUCTION_NONE ? N_ : 1;
    cr_log_info("case %s (-inf in %s)", LCASES[c].name, via_c ? "C" : "bias");
    cr_expect(tu_check_close("loss", a.loss, b.loss, nl, TOL, TOL), "%s", LCASES[c].name);
    cr_expect(tu_check_close("lse", a.lse, b.lse, N_, TOL, TOL), "%s", LCASES[c].name);
    cr_expect(tu_check_close("entropy", a.ent, b.ent, N_, TOL, TOL), "%s", LCASES[c].name);
    cr_expect(tu_check_close("dE", a.dE, b.dE, N_ * D_, TOL, TOL), "%s", LCASES[c].name);
    double dCk[V_ * D_], dbk[V_];
    int zero = 1;
    for (int64_t j = 0, v = 0; j < V_; ++j) {
      if (MASK[j]) {
        for (int k = 0; k < D_; ++k) zero &= a.dC[j * D_ + k] == 0.0;
        zero &= a.db[j] == 0.0;
        continue;
      }
      memcpy(dCk + v * D_, a.dC + j * D_, sizeof(double) * D_);
      dbk[v++] = a.db[j];
    }
    cr_expect(zero, "%s: masked classes must have exactly zero dC and dbias", LCASES[c].name);
    cr_expect(tu_check_close("dC kept", dCk, b.dC, q.V * D_, TOL, TOL), "%s", LCASES[c].name);
    cr_expect(tu_check_close("dbias kept", dbk, b.db, q.V, TOL, TOL), "%s", LCASES[c].name);
  }
}

Test(ref_masked, linear_ce_bias_minus_inf_equals_vocabulary_without_the_class) { lce_masked(0); }
Test(ref_masked, linear_ce_c_minus_inf_equals_vocabulary_without_the_class) { lce_masked(1); }

/* A target whose logit is -inf: loss +inf (PyTorch's), every gradient finite, masked classes 0;
 * with class weight 0 on that target the row contributes 0 (no 0 · inf). */
Test(ref_masked, linear_ce_masked_target_gives_inf_loss_finite_gradients) {
  lp_t p;
  lce_make(&p, MASK, 0, 5);
  p.y[2] = 4; /* masked */
  fh_linear_ce_options_t o;
  fh_linear_ce_options_init(&o);
  o.reduction = FH_REDUCTION_NONE;
  o.label_smoothing = 0.1f;
  o.z_loss_scale = 0.01f;
  lres_t a;
  lce_run(&p, &o, NULL, &a);
  cr_expect(isinf(a.loss[2]) && a.loss[2] > 0, "loss[2] = %g, want +inf", a.loss[2]);
  int finite = 1;
  for (int64_t i = 0; i < N_; ++i) finite &= i == 2 || isfinite(a.loss[i]);
  for (int64_t k = 0; k < N_ * D_; ++k) finite &= isfinite(a.dE[k]);
  for (int64_t k = 0; k < V_ * D_; ++k) finite &= isfinite(a.dC[k]);
  cr_expect(finite, "other rows' losses and every gradient must be finite");
  cr_expect(a.dC[4 * D_] == 0.0 && a.db[4] == 0.0, "masked target class: zero gradient");
  p.has_cw = 1;
  p.cw[4] = 0.0;
  o.label_smoothing = 0.0f;
  o.z_loss_scale = 0.0f;
  lce_run(&p, &o, NULL, &a);
  cr_expect(a.loss[2] == 0.0, "class weight 0 on a masked target: loss %g, want 0", a.loss[2]);
}

/* Every class of the row masked: lse -inf, entropy 0, loss +inf, zero gradients. */
Test(ref_masked, linear_ce_all_classes_masked) {
  lp_t p;
  int all[V_];
  for (int j = 0; j < V_; ++j) all[j] = 1;
  lce_make(&p, MASK, 0, 9);
  for (int j = 0; j < V_; ++j) p.b[j] = -INFINITY;
  (void)all;
  p.N = 1;
  fh_linear_ce_options_t o;
  fh_linear_ce_options_init(&o);
  o.entropy_weight = 0.2f;
  o.label_smoothing = 0.1f;
  lres_t a;
  lce_run(&p, &o, NULL, &a);
  cr_expect(isinf(a.lse[0]) && a.lse[0] < 0, "lse %g", a.lse[0]);
  cr_expect(a.ent[0] == 0.0, "entropy %g", a.ent[0]);
  cr_expect(isinf(a.loss[0]) && a.loss[0] > 0, "loss %g", a.loss[0]);
  int zero = 1;
  for (int k = 0; k < D_; ++k) zero &= a.dE[k] == 0.0;
  for (int k = 0; k < V_ * D_; ++k) zero &= a.dC[k] == 0.0;
  for (int k = 0; k < V_; ++k) zero &= a.db[k] == 0.0;
  cr_expect(zero, "zero gradients");
}

/* ---- distillation: both heads masked on the same classes (a padded vocabulary) ---- */

typedef struct dres {
  double loss, dE[N_ * D_], dC[V_ * D_], db[V_];
} dres_t;

static void dist_run(const lp_t* s, const lp_t* t, const fh_distill_options_t* o, dres_t* r) {
  fh_context_t* ctx = cpu();
  fh_tensor_t Es = fh_tensor_2d(mut(s->E), FH_DTYPE_F64, s->N, s->D), Cs = fh_tensor_2d(mut(s->C), FH_DTYPE_F64, s->V, s->D);
  fh_tensor_t Bs = fh_tensor_2d(mut(s->b), FH_DTYPE_F64, 1, s->V);
  fh_tensor_t Et = fh_tensor_2d(mut(t->E), FH_DTYPE_F64, t->N, t->D), Ct = fh_tensor_2d(mut(t->C), FH_DTYPE_F64, t->V, t->D);
  fh_tensor_t Bt = fh_tensor_2d(mut(t->b), FH_DTYPE_F64, 1, t->V);
  fh_distill_head_t hs = {&Es, &Cs, &Bs}, ht = {&Et, &Ct, &Bt};
  double state[N_ * FH_DISTILL_ROW_STATE], one = 1.0;
  fh_distill_outputs_t out = {(float*)&r->loss, (float*)state, NULL, NULL};
  cr_assert_eq(fh_distill_forward(ctx, o, &hs, &ht, s->y, &out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  fh_distill_grad_inputs_t in = {(const float*)state, (const float*)&one};
  fh_tensor_t dE = fh_tensor_2d(r->dE, FH_DTYPE_F64, s->N, s->D), dC = fh_tensor_2d(r->dC, FH_DTYPE_F64, s->V, s->D);
  fh_tensor_t db = fh_tensor_2d(r->db, FH_DTYPE_F64, 1, s->V);
  fh_distill_grads_t g = {&dE, &dC, &db};
  cr_assert_eq(fh_distill_backward(ctx, o, &hs, &ht, s->y, &in, &g, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  fh_context_destroy(ctx);
}

static void dist_masked(int student_via_c) {
  for (int dv = 0; dv < FH_DISTILL_DIVERGENCE_COUNT; ++dv) {
    lp_t s, t, sq, tq;
    int64_t keep[V_];
    lce_make(&s, MASK, student_via_c, 100 + (uint64_t)dv);
    lce_make(&t, MASK, 0, 200 + (uint64_t)dv);
    lce_reduce(&s, MASK, &sq, keep);
    lce_reduce(&t, MASK, &tq, keep);
    fh_distill_options_t o;
    fh_distill_options_init(&o);
    o.divergence = (fh_distill_divergence_t)dv;
    o.temperature = 1.5f;
    o.hard_weight = 0.5f;
    dres_t a, b;
    dist_run(&s, &t, &o, &a);
    dist_run(&sq, &tq, &o, &b);
    cr_log_info("divergence %d (student -inf in %s)", dv, student_via_c ? "C" : "bias");
    cr_expect(tu_check_close("loss", &a.loss, &b.loss, 1, TOL, TOL), "divergence %d", dv);
    cr_expect(tu_check_close("dE", a.dE, b.dE, N_ * D_, TOL, TOL), "divergence %d", dv);
    double dCk[V_ * D_];
    int zero = 1;
    for (int64_t j = 0, v = 0; j < V_; ++j) {
      if (MASK[j]) {
        for (int k = 0; k < D_; ++k) zero &= a.dC[j * D_ + k] == 0.0;
        zero &= a.db[j] == 0.0;
        continue;
      }
      memcpy(dCk + (v++) * D_, a.dC + j * D_, sizeof(double) * D_);
    }
    cr_expect(zero, "divergence %d: masked classes need exactly zero gradients", dv);
    cr_expect(tu_check_close("dC kept", dCk, b.dC, sq.V * D_, TOL, TOL), "divergence %d", dv);
  }
}

Test(ref_masked, distill_bias_minus_inf_every_divergence) { dist_masked(0); }
Test(ref_masked, distill_student_c_minus_inf_every_divergence) { dist_masked(1); }

/* ---- decoding: -inf logits never drawn, statistics as without them ---- */
Test(ref_masked, decode_minus_inf_logits) {
  fh_context_t* ctx = cpu();
  float z[2 * V_], zq[2 * 7];
  tu_rng_t rng = {3};
  for (int64_t i = 0; i < 2; ++i)
    for (int64_t j = 0, v = 0; j < V_; ++j) {
      z[i * V_ + j] = MASK[j] ? -INFINITY : (float)tu_normal(&rng);
      if (!MASK[j]) zq[i * 7 + v++] = z[i * V_ + j];
    }
  fh_tensor_t L = fh_tensor_2d(z, FH_DTYPE_F32, 2, V_), Lq = fh_tensor_2d(zq, FH_DTYPE_F32, 2, 7);
  fh_decode_options_t o;
  fh_decode_options_init(&o);
  o.top_p = 0.9f;
  int drawn_masked = 0;
  for (uint64_t seed = 0; seed < 200; ++seed) {
    o.seed = seed;
    int64_t tok[2], tq[2], cnt[2], cq[2];
    float lse[2], lq[2], ent[2], eq[2];
    fh_decode_outputs_t out = {tok, NULL, NULL, NULL, lse, ent, cnt, NULL, NULL, NULL};
    fh_decode_outputs_t oq = {tq, NULL, NULL, NULL, lq, eq, cq, NULL, NULL, NULL};
    cr_assert_eq(fh_decode_from_logits(ctx, &o, &L, &out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
    cr_assert_eq(fh_decode_from_logits(ctx, &o, &Lq, &oq, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
    for (int i = 0; i < 2; ++i) {
      drawn_masked += MASK[tok[i]];
      cr_assert(lse[i] == lq[i] && ent[i] == eq[i] && cnt[i] == cq[i], "row %d: lse %g/%g entropy %g/%g count %lld/%lld",
                i, (double)lse[i], (double)lq[i], (double)ent[i], (double)eq[i], (long long)cnt[i], (long long)cq[i]);
    }
  }
  cr_expect(drawn_masked == 0, "%d draws of a masked class", drawn_masked);
  fh_context_destroy(ctx);
}

/* ---- fp32 at large logits: gradients = fp64 gradients rounded once ---- */

/* f = fp32(scale · x), then x = f: the fp32 inputs and their exact fp64 copies. A function of its
 * own (noinline): GCC 12.2 at -O3 was seen to vectorize the equivalent loops written inline in
 * the tests below wrongly, leaving the last two doubles unrounded (reproduced in a 30-line
 * program), which made the two runs see different inputs. */
__attribute__((noinline)) static void to_f32(double* x, float* f, int64_t n, double scale) {
  for (int64_t k = 0; k < n; ++k) {
    f[k] = (float)(x[k] * scale);
    x[k] = f[k];
  }
}

static int close_rounded(const char* what, double scale, const float* g32, const double* g64, int64_t n) {
  /* Overflowing fp64 gradients (chi-square of one-hot rows: Σ p²/q) must stay non-finite with
   * the same sign; the others are compared. */
  double gmax = 0.0, worst = 0.0;
  for (int64_t k = 0; k < n; ++k)
    if (isfinite(g64[k]) && isfinite((float)g64[k])) gmax = fmax(gmax, fabs(g64[k]));
  int ok = 1;
  for (int64_t k = 0; k < n; ++k) {
    if (!isfinite(g64[k]) || !isfinite((float)g64[k])) {
      ok &= !isfinite(g32[k]) && (isnan(g64[k]) ? isnan(g32[k]) : (g32[k] > 0) == (g64[k] > 0));
      continue;
    }
    const double err = fabs((double)g32[k] - g64[k]), bound = 0x1p-24 * (fabs(g64[k]) + gmax) + 1e-300;
    worst = fmax(worst, err / bound);
    ok &= err <= bound;
  }
  cr_log_info("%s at logit scale %g: worst error %.3g of the rounding bound", what, scale, worst);
  return ok;
}

Test(ref_masked, fp32_linear_ce_gradients_at_logit_scales_1_1e2_1e4) {
  const double scales[3] = {1.0, 1e2, 1e4};
  for (int s = 0; s < 3; ++s) {
    lp_t p;
    int none[V_] = {0};
    lce_make(&p, none, 0, 31);
    float E32[N_ * D_], C32[V_ * D_], b32[V_];
    to_f32(p.E, E32, N_ * D_, scales[s]);
    to_f32(p.C, C32, V_ * D_, 1.0);
    to_f32(p.b, b32, V_, 1.0);
    fh_linear_ce_options_t o;
    fh_linear_ce_options_init(&o);
    o.label_smoothing = 0.1f;
    lres_t r64;
    lce_run(&p, &o, NULL, &r64);
    fh_context_t* ctx = cpu();
    fh_tensor_t E = fh_tensor_2d(E32, FH_DTYPE_F32, N_, D_), C = fh_tensor_2d(C32, FH_DTYPE_F32, V_, D_);
    fh_tensor_t B = fh_tensor_2d(b32, FH_DTYPE_F32, 1, V_);
    float loss, lse[N_], one = 1.0f, dE[N_ * D_], dC[V_ * D_], db[V_];
    fh_linear_ce_outputs_t out = {&loss, lse, NULL, NULL, NULL, NULL};
    cr_assert_eq(fh_linear_ce_forward(ctx, &o, &E, &C, &B, p.y, NULL, NULL, &out, NULL, 0), FH_SUCCESS);
    fh_linear_ce_grad_inputs_t in = {lse, NULL, &one, NULL};
    fh_tensor_t tE = fh_tensor_2d(dE, FH_DTYPE_F32, N_, D_), tC = fh_tensor_2d(dC, FH_DTYPE_F32, V_, D_);
    fh_tensor_t tb = fh_tensor_2d(db, FH_DTYPE_F32, 1, V_);
    fh_linear_ce_grads_t g = {&tE, &tC, &tb};
    cr_assert_eq(fh_linear_ce_backward(ctx, &o, &E, &C, &B, p.y, NULL, NULL, &in, &g, NULL, 0), FH_SUCCESS);
    fh_context_destroy(ctx);
    /* r64 used grad_loss 1 (mean): the same as `one` here */
    cr_expect(close_rounded("dE", scales[s], dE, r64.dE, N_ * D_), "dE at scale %g", scales[s]);
    cr_expect(close_rounded("dC", scales[s], dC, r64.dC, V_ * D_), "dC at scale %g", scales[s]);
    cr_expect(close_rounded("dbias", scales[s], db, r64.db, V_), "dbias at scale %g", scales[s]);
  }
}

/* Saturated rows: teacher and student logits near the scale, one-hot distributions. */
Test(ref_masked, fp32_distill_gradients_at_logit_scales_1_1e2_1e4) {
  const double scales[3] = {1.0, 1e2, 1e4};
  for (int s = 0; s < 3; ++s)
    for (int dv = 0; dv < FH_DISTILL_DIVERGENCE_COUNT; ++dv) {
      lp_t st, te;
      int none[V_] = {0};
      lce_make(&st, none, 0, 41);
      lce_make(&te, none, 0, 43);
      float f[4][V_ * D_ + N_ * D_];
      to_f32(st.E, f[0], N_ * D_, scales[s]);
      to_f32(te.E, f[1], N_ * D_, scales[s]);
      to_f32(st.C, f[2], V_ * D_, 1.0);
      to_f32(te.C, f[3], V_ * D_, 1.0);
      st.has_b = te.has_b = 0;
      fh_distill_options_t o;
      fh_distill_options_init(&o);
      o.divergence = (fh_distill_divergence_t)dv;
      dres_t r64;
      {
        /* no bias: dist_run passes one, so zero it */
        memset(st.b, 0, sizeof st.b);
        memset(te.b, 0, sizeof te.b);
        dist_run(&st, &te, &o, &r64);
      }
      fh_context_t* ctx = cpu();
      float zb[V_] = {0};
      fh_tensor_t Es = fh_tensor_2d(f[0], FH_DTYPE_F32, N_, D_), Et = fh_tensor_2d(f[1], FH_DTYPE_F32, N_, D_);
      fh_tensor_t Cs = fh_tensor_2d(f[2], FH_DTYPE_F32, V_, D_), Ct = fh_tensor_2d(f[3], FH_DTYPE_F32, V_, D_);
      fh_tensor_t Bs = fh_tensor_2d(zb, FH_DTYPE_F32, 1, V_), Bt = fh_tensor_2d(zb, FH_DTYPE_F32, 1, V_);
      fh_distill_head_t hs = {&Es, &Cs, &Bs}, ht = {&Et, &Ct, &Bt};
      float loss, state[N_ * FH_DISTILL_ROW_STATE], one = 1.0f, dE[N_ * D_], dC[V_ * D_];
      fh_distill_outputs_t out = {&loss, state, NULL, NULL};
      cr_assert_eq(fh_distill_forward(ctx, &o, &hs, &ht, st.y, &out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
      fh_distill_grad_inputs_t in = {state, &one};
      fh_tensor_t tE = fh_tensor_2d(dE, FH_DTYPE_F32, N_, D_), tC = fh_tensor_2d(dC, FH_DTYPE_F32, V_, D_);
      fh_distill_grads_t g = {&tE, &tC, NULL};
      cr_assert_eq(fh_distill_backward(ctx, &o, &hs, &ht, st.y, &in, &g, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
      fh_context_destroy(ctx);
      cr_expect(close_rounded("distill dE", scales[s], dE, r64.dE, N_ * D_), "divergence %d, scale %g", dv, scales[s]);
      cr_expect(close_rounded("distill dC", scales[s], dC, r64.dC, V_ * D_), "divergence %d, scale %g", dv, scales[s]);
    }
}
