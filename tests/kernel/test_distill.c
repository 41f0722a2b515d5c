/* kernel_distill: the CUDA distillation forward (kernels/distill.cu) under the SIMT emulator,
 * through the public API, against the fp64 CPU reference (src/ref/distill.c) with the tolerance
 * rule of test_linear_ce_common.h: |kernel − ref| <= 2 |naive − ref| + 2^-24 (D + V) max|ref|,
 * the naive computation being the same math in fp32 on what the tensor core reads (logits summed
 * in fp32 in k order from the fp16/bf16 values, or from the tf32-rounded fp32 values; softmax
 * statistics, X, Y and the row sums in fp32; each element's term and qa rounded to fp32).
 * Shapes cross the engine's tile edges (128 rows, 128 classes, 64-byte k-stages): N = 130,
 * V = 300, D_s = 72, D_t = 40 and a padded teacher vocabulary V_t = 317 > V; every divergence in
 * fp32, fp16 and bf16; ignored rows; NaN rows confined; the scalar fallback (odd row stride)
 * bitwise equal to the 16-byte path; batch invariance (a row's outputs do not depend on the
 * other rows); N = 0; the workspace formula at the Llama-3 8B -> 1B shape.
 * Backward (kernels/distill_bwd.cu): dEs, dCs, dbs against the fp64 reference backward, each side
 * from its own forward state (kernel: the CUDA forward's fp32 state; naive: its fp32 state, G in
 * fp32 rounded to the operand type before the GEMMs, which sum in fp32; reference: fp64), for
 * several divergences x the three accumulation modes x three dtypes, the accumulate flag, the
 * scalar fallback and reduction none. FH_ACCUM_OUTPUT_DTYPE with 16-bit outputs rounds the
 * running sum once per 128-class tile (dE) or 128-row block (dC): its budget is the naive error
 * times the number of those roundings (rounding errors add at most linearly), as in
 * kernel_linear_ce_bwd. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill.h"
#include "dtype.h"
#include "fh_emu.h"
#include "ref/distill_ref.h"
#include "test_linear_ce_common.h"
#include "test_util.h"

static const fh_dtype_t DTYPES[3] = {FH_DTYPE_F32, FH_DTYPE_F16, FH_DTYPE_BF16};
static const char* const DNAME[3] = {"f32", "f16", "bf16"};
#define NS FH_DISTILL_ROW_STATE

typedef struct dk_spec {
  int64_t N, V, Ds, Vt, Dt;
  fh_dtype_t dtype;
  uint64_t seed;
  int pad;         /* > 0: every matrix stored with row_stride = cols + pad (scalar fallback) */
  int nan_row;     /* >= 0: that row of Es is NaN */
  int every_ign;   /* > 0: every every_ign-th row (from 1) ignored; 0: targets NULL */
} dk_spec_t;

typedef struct dk_problem {
  dk_spec_t s;
  void *Es, *Cs, *bs, *Et, *Ct, *bt;
  fh_tensor_t tEs, tCs, tbs, tEt, tCt, tbt;
  int64_t* targets;
} dk_problem_t;

static dk_spec_t dk_default(int64_t N, int64_t V, int64_t Ds, int64_t Vt, int64_t Dt, fh_dtype_t dt) {
  dk_spec_t s;
  memset(&s, 0, sizeof s);
  s.N = N, s.V = V, s.Ds = Ds, s.Vt = Vt, s.Dt = Dt, s.dtype = dt;
  s.seed = 1234;
  s.nan_row = -1;
  s.every_ign = 5;
  return s;
}

/* rows x cols N(0, sd) values in dtype, stride cols + pad (NaN in the padding). */
static void* mat(tu_rng_t* r, fh_tensor_t* t, fh_dtype_t dt, int64_t rows, int64_t cols, int pad, double sd) {
  const int64_t ld = cols + pad;
  void* p = malloc((size_t)(rows * ld > 0 ? rows * ld : 1) * fh_dtype_size(dt));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < ld; ++k) fh_store(p, dt, i * ld + k, k < cols ? sd * tu_normal(r) : NAN);
  *t = fh_tensor_2d(p, dt, rows, cols);
  t->row_stride = ld;
  return p;
}

static void dk_init(dk_problem_t* P, const dk_spec_t* s) {
  memset(P, 0, sizeof *P);
  P->s = *s;
  tu_rng_t r = {s->seed};
  const fh_dtype_t dt = s->dtype;
  P->Es = mat(&r, &P->tEs, dt, s->N, s->Ds, s->pad, 1.0);
  P->Cs = mat(&r, &P->tCs, dt, s->V, s->Ds, s->pad, 2.0 / sqrt((double)s->Ds));
  P->bs = mat(&r, &P->tbs, dt, 1, s->V, 0, 0.5);
  P->Et = mat(&r, &P->tEt, dt, s->N, s->Dt, s->pad, 1.0);
  P->Ct = mat(&r, &P->tCt, dt, s->Vt, s->Dt, s->pad, 2.5 / sqrt((double)s->Dt));
  P->bt = mat(&r, &P->tbt, dt, 1, s->Vt, 0, 0.5);
  if (s->nan_row >= 0 && s->nan_row < s->N)
    for (int64_t k = 0; k < s->Ds; ++k) fh_tensor_set(&P->tEs, s->nan_row, k, NAN);
  if (s->every_ign > 0) {
    P->targets = malloc(sizeof(int64_t) * (size_t)(s->N > 0 ? s->N : 1));
    for (int64_t i = 0; i < s->N; ++i) P->targets[i] = (i % s->every_ign == 1) ? -100 : tu_randint(&r, s->V);
  }
}

static void dk_free(dk_problem_t* P) {
  free(P->Es), free(P->Cs), free(P->bs), free(P->Et), free(P->Ct), free(P->bt), free(P->targets);
  memset(P, 0, sizeof *P);
}

static fh_distill_problem_t dk_ref_problem(const dk_problem_t* P, const fh_distill_options_t* o) {
  fh_distill_problem_t p;
  memset(&p, 0, sizeof p);
  p.fn = "test";
  p.N = P->s.N, p.V = P->s.V, p.D_s = P->s.Ds, p.V_t = P->s.Vt, p.D_t = P->s.Dt;
  p.Es = &P->tEs, p.Cs = &P->tCs, p.bs = &P->tbs, p.Et = &P->tEt, p.Ct = &P->tCt, p.bt = &P->tbt;
  p.targets = P->targets;
  p.opt = *o;
  return p;
}

/* Results as doubles: per-row loss/soft/hard (reduction none), the state, the reduced values. */
typedef struct dk_out {
  double *loss, *soft, *hard, *state;
  double rloss, rsoft, rhard;
} dk_out_t;
static void dk_out_alloc(dk_out_t* o, int64_t N) {
  const size_t n = (size_t)(N > 0 ? N : 1);
  memset(o, 0, sizeof *o);
  o->loss = calloc(n, sizeof(double)), o->soft = calloc(n, sizeof(double)), o->hard = calloc(n, sizeof(double));
  o->state = calloc(n * NS, sizeof(double));
}
static void dk_out_free(dk_out_t* o) { free(o->loss), free(o->soft), free(o->hard), free(o->state); }

static fh_context_t* cuda_ctx(void) {
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  return ctx;
}

/* The CUDA forward through the public API (guarded outputs). */
static fh_status_t dk_run(const dk_problem_t* P, const fh_distill_options_t* o, dk_out_t* out) {
  const int64_t N = P->s.N;
  const int none = o->reduction == FH_REDUCTION_NONE;
  const int64_t nl = none ? (N > 0 ? N : 1) : 1;
  fh_context_t* ctx = cuda_ctx();
  fh_distill_shape_t sh = {P->s.N, P->s.V, P->s.Ds, P->s.Vt, P->s.Dt, 0, P->s.dtype, P->s.dtype};
  size_t ws = 0;
  cr_assert_eq(fh_distill_forward_workspace_size(ctx, o, &sh, &ws), FH_SUCCESS, "%s", fh_last_error());
  void* w = ws ? aligned_alloc(256, (ws + 255) & ~(size_t)255) : NULL;
  if (w) memset(w, 0xA5, ws); /* garbage: nothing may be read before it is written */
  float* loss = tu_alloc_guarded(sizeof(float) * (size_t)nl);
  float* soft = tu_alloc_guarded(sizeof(float) * (size_t)nl);
  float* hard = tu_alloc_guarded(sizeof(float) * (size_t)nl);
  float* st = tu_alloc_guarded(sizeof(float) * (size_t)(N > 0 ? N : 1) * NS);
  fh_distill_head_t hs = {&P->tEs, &P->tCs, &P->tbs}, ht = {&P->tEt, &P->tCt, &P->tbt};
  fh_distill_outputs_t O = {loss, st, soft, hard};
  const fh_status_t rc = fh_distill_forward(ctx, o, &hs, &ht, P->targets, &O, w, ws);
  if (rc == FH_SUCCESS) {
    cr_assert_eq(fh_context_check(ctx), FH_SUCCESS, "%s", fh_last_error());
    cr_assert(tu_guards_intact(loss, sizeof(float) * (size_t)nl) && tu_guards_intact(soft, sizeof(float) * (size_t)nl) &&
              tu_guards_intact(hard, sizeof(float) * (size_t)nl) &&
              tu_guards_intact(st, sizeof(float) * (size_t)(N > 0 ? N : 1) * NS), "an output guard was overwritten");
    if (none)
      for (int64_t i = 0; i < N; ++i) out->loss[i] = loss[i], out->soft[i] = soft[i], out->hard[i] = hard[i];
    else
      out->rloss = loss[0], out->rsoft = soft[0], out->rhard = hard[0];
    for (int64_t k = 0; k < N * NS; ++k) out->state[k] = st[k];
  }
  free(loss), free(soft), free(hard), free(st), free(w);
  fh_context_destroy(ctx);
  return rc;
}

static void dk_reference(const dk_problem_t* P, const fh_distill_options_t* o, dk_out_t* out) {
  fh_distill_problem_t p = dk_ref_problem(P, o);
  fh_distill_ref_fwd_t r;
  memset(&r, 0, sizeof r);
  r.row_loss = out->loss, r.row_soft = out->soft, r.row_hard = out->hard, r.state = out->state;
  cr_assert_eq(fh_ref_distill_forward_f64(&p, &r), FH_SUCCESS, "%s", fh_last_error());
  out->rloss = r.loss, out->rsoft = r.soft, out->rhard = r.hard;
}

/* Logits of one head for row i in fp32 (k order) from the tensor-core view, plus the bias. */
static void naive_logits(const fh_tensor_t* E, const fh_tensor_t* C, const fh_tensor_t* b, int64_t i, int64_t V,
                         float* z) {
  const int f32 = E->dtype == FH_DTYPE_F32;
  for (int64_t j = 0; j < V; ++j) {
    float a = 0.0f;
    for (int64_t k = 0; k < E->cols; ++k) {
      const double e = fh_tensor_get(E, i, k), c = fh_tensor_get(C, j, k);
      a += (float)((f32 ? lk_tf32_round(e) : e) * (f32 ? lk_tf32_round(c) : c));
    }
    z[j] = a + (float)fh_tensor_get(b, 0, j);
  }
}
static float lse32(const float* z, int64_t V) {
  float m = -INFINITY, s = 0.0f;
  for (int64_t j = 0; j < V; ++j) m = fmaxf(m, z[j]);
  for (int64_t j = 0; j < V; ++j) s += expf(z[j] - m);
  return m + logf(s);
}

static void dk_naive(const dk_problem_t* P, const fh_distill_options_t* o, dk_out_t* out) {
  const int64_t N = P->s.N, V = P->s.V;
  fh_div_t dv;
  fh_div_resolve(o, &dv);
  const float invT = 1.0f / o->temperature, kap = o->scale_by_t_squared ? o->temperature * o->temperature : 1.0f;
  float *s = malloc(sizeof(float) * (size_t)V), *t = malloc(sizeof(float) * (size_t)V);
  float *u = malloc(sizeof(float) * (size_t)V), *v = malloc(sizeof(float) * (size_t)V);
  double l = 0, so = 0, ha = 0, nv = 0;
  for (int64_t i = 0; i < N; ++i) {
    double* st = out->state + i * NS;
    out->loss[i] = out->soft[i] = out->hard[i] = 0;
    for (int q = 0; q < NS; ++q) st[q] = 0;
    if (P->targets && P->targets[i] == o->ignore_index) continue;
    naive_logits(&P->tEs, &P->tCs, &P->tbs, i, V, s);
    naive_logits(&P->tEt, &P->tCt, &P->tbt, i, V, t);
    for (int64_t j = 0; j < V; ++j) u[j] = s[j] * invT, v[j] = t[j] * invT;
    const float lu = lse32(u, V), lv = lse32(v, V);
    float D = 0.0f, S = 0.0f;
    for (int64_t j = 0; j < V; ++j) {
      double term, qa;
      fh_div_eval(&dv, (double)(u[j] - lu), (double)(v[j] - lv), &term, &qa);
      D += (float)term, S += (float)qa;
    }
    const int hard = o->hard_weight != 0.0f;
    const float ls = hard ? lse32(s, V) : 0.0f;
    const float h = hard ? ls - s[P->targets[i]] : 0.0f;
    st[0] = lu, st[1] = lv, st[2] = S, st[3] = ls;
    out->soft[i] = (double)kap * D;
    out->hard[i] = h;
    out->loss[i] = (double)o->hard_weight * h + (double)o->soft_weight * out->soft[i];
    l += out->loss[i], so += out->soft[i], ha += out->hard[i], nv += 1;
  }
  const double den = o->divisor > 0 ? o->divisor : nv, inv = o->reduction != FH_REDUCTION_MEAN ? 1.0 : den > 0 ? 1.0 / den : 0.0;
  out->rloss = l * inv, out->rsoft = so * inv, out->rhard = ha * inv;
  free(s), free(t), free(u), free(v);
}

/* One forward compared in full: per-row outputs (none) or the reduced ones, and the state. */
static int check(const char* label, const dk_problem_t* P, const fh_distill_options_t* o, dk_out_t* kout) {
  const int64_t N = P->s.N;
  dk_out_t k, r, n;
  dk_out_alloc(&k, N), dk_out_alloc(&r, N), dk_out_alloc(&n, N);
  cr_assert_eq(dk_run(P, o, &k), FH_SUCCESS, "%s: %s", label, fh_last_error());
  dk_reference(P, o, &r);
  dk_naive(P, o, &n);
  const double terms = (double)(P->s.Ds + P->s.Dt + P->s.V);
  char nm[200];
  int ok = 1;
  if (o->reduction == FH_REDUCTION_NONE) {
    snprintf(nm, sizeof nm, "%s loss[i]", label);
    ok &= lk_compare(nm, k.loss, r.loss, n.loss, N, 2.0, terms, NULL);
    snprintf(nm, sizeof nm, "%s soft[i]", label);
    ok &= lk_compare(nm, k.soft, r.soft, n.soft, N, 2.0, terms, NULL);
    snprintf(nm, sizeof nm, "%s hard[i]", label);
    ok &= lk_compare(nm, k.hard, r.hard, n.hard, N, 2.0, terms, NULL);
  } else {
    snprintf(nm, sizeof nm, "%s loss", label);
    ok &= lk_compare(nm, &k.rloss, &r.rloss, &n.rloss, 1, 2.0, terms + (double)N, NULL);
    snprintf(nm, sizeof nm, "%s soft", label);
    ok &= lk_compare(nm, &k.rsoft, &r.rsoft, &n.rsoft, 1, 2.0, terms + (double)N, NULL);
    snprintf(nm, sizeof nm, "%s hard", label);
    ok &= lk_compare(nm, &k.rhard, &r.rhard, &n.rhard, 1, 2.0, terms + (double)N, NULL);
  }
  /* The state's columns one at a time (different scales). */
  double *kc = malloc(sizeof(double) * (size_t)(N + 1)), *rc = malloc(sizeof(double) * (size_t)(N + 1)),
         *nc = malloc(sizeof(double) * (size_t)(N + 1));
  static const char* const SN[NS] = {"lse(u)", "lse(v)", "sum qa", "lse(s)"};
  for (int q = 0; q < NS; ++q) {
    for (int64_t i = 0; i < N; ++i) kc[i] = k.state[i * NS + q], rc[i] = r.state[i * NS + q], nc[i] = n.state[i * NS + q];
    snprintf(nm, sizeof nm, "%s state %s", label, SN[q]);
    ok &= lk_compare(nm, kc, rc, nc, N, 2.0, terms, NULL);
  }
  free(kc), free(rc), free(nc);
  if (kout) {
    const size_t n1 = (size_t)(N > 0 ? N : 1);
    memcpy(kout->loss, k.loss, n1 * sizeof(double)), memcpy(kout->soft, k.soft, n1 * sizeof(double));
    memcpy(kout->hard, k.hard, n1 * sizeof(double)), memcpy(kout->state, k.state, n1 * NS * sizeof(double));
    kout->rloss = k.rloss, kout->rsoft = k.rsoft, kout->rhard = k.rhard;
  }
  dk_out_free(&k), dk_out_free(&r), dk_out_free(&n);
  return ok;
}

static fh_distill_options_t opts_for(fh_distill_divergence_t d, float param) {
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.divergence = d;
  o.temperature = 2.0f;
  o.hard_weight = 0.5f;
  o.soft_weight = 0.75f;
  o.reduction = FH_REDUCTION_NONE;
  if (d == FH_DISTILL_JSD || d == FH_DISTILL_JSD_SCALED) o.beta = param;
  if (d == FH_DISTILL_SKEW_FORWARD_KL || d == FH_DISTILL_SKEW_REVERSE_KL) o.skew = param;
  if (d == FH_DISTILL_ALPHA) o.alpha = param;
  return o;
}

/* Every divergence (and the resolved special cases: JSD endpoints both ways, the α limits) in
 * every dtype, on the tile-crossing shape with a padded teacher vocabulary. */
typedef struct dcase {
  const char* name;
  fh_distill_divergence_t d;
  float param;
  int plain;
} dcase_t;
static const dcase_t CASES[] = {
    {"fkl", FH_DISTILL_FORWARD_KL, 0, 0},         {"rkl", FH_DISTILL_REVERSE_KL, 0, 0},
    {"jsd0.3", FH_DISTILL_JSD, 0.3f, 0},          {"jsd_b0_kl", FH_DISTILL_JSD, 0.0f, 0},
    {"jsd_b1_plain", FH_DISTILL_JSD, 1.0f, 1},    {"jsd_scaled0.9", FH_DISTILL_JSD_SCALED, 0.9f, 0},
    {"tvd", FH_DISTILL_TVD, 0, 0},                {"skew_fkl0.1", FH_DISTILL_SKEW_FORWARD_KL, 0.1f, 0},
    {"skew_rkl0.3", FH_DISTILL_SKEW_REVERSE_KL, 0.3f, 0}, {"alpha0", FH_DISTILL_ALPHA, 0.0f, 0},
    {"alpha1", FH_DISTILL_ALPHA, 1.0f, 0},        {"alpha-0.5", FH_DISTILL_ALPHA, -0.5f, 0},
    {"hellinger", FH_DISTILL_HELLINGER, 0, 0},    {"chi_square", FH_DISTILL_CHI_SQUARE, 0, 0},
};
#define NCASES ((int)(sizeof CASES / sizeof CASES[0]))

static void run_divergences(int di) {
  dk_spec_t s = dk_default(130, 300, 72, 317, 40, DTYPES[di]);
  dk_problem_t P;
  dk_init(&P, &s);
  int ok = 1;
  for (int c = 0; c < NCASES; ++c) {
    fh_distill_options_t o = opts_for(CASES[c].d, CASES[c].param);
    if (CASES[c].plain) o.jsd_endpoints = FH_DISTILL_JSD_ENDPOINTS_PLAIN;
    char label[96];
    snprintf(label, sizeof label, "%s %s", DNAME[di], CASES[c].name);
    ok &= check(label, &P, &o, NULL);
  }
  dk_free(&P);
  cr_assert(ok, "a comparison failed (see the lines above)");
}

Test(kernel_distill, divergences_f32, .timeout = 1200) { run_divergences(0); }
Test(kernel_distill, divergences_f16, .timeout = 1200) { run_divergences(1); }
Test(kernel_distill, divergences_bf16, .timeout = 1200) { run_divergences(2); }

/* Reductions (mean, sum, divisor), no targets, T = 1 without T² and every row ignored. */
Test(kernel_distill, reductions, .timeout = 1200) {
  dk_spec_t s = dk_default(37, 150, 24, 150, 16, FH_DTYPE_BF16);
  dk_problem_t P;
  dk_init(&P, &s);
  int ok = 1;
  fh_distill_options_t o = opts_for(FH_DISTILL_JSD, 0.5f);
  o.reduction = FH_REDUCTION_MEAN;
  ok &= check("mean", &P, &o, NULL);
  o.reduction = FH_REDUCTION_SUM;
  ok &= check("sum", &P, &o, NULL);
  o.reduction = FH_REDUCTION_MEAN, o.divisor = 1000.0f;
  ok &= check("mean/divisor", &P, &o, NULL);
  o.divisor = 0.0f, o.temperature = 1.0f, o.scale_by_t_squared = 0;
  ok &= check("T=1", &P, &o, NULL);
  for (int64_t i = 0; i < P.s.N; ++i) P.targets[i] = -100;
  dk_out_t k;
  dk_out_alloc(&k, P.s.N);
  ok &= check("all ignored", &P, &o, &k);
  cr_expect(k.rloss == 0.0 && k.rsoft == 0.0 && k.rhard == 0.0, "every row ignored: loss 0");
  dk_out_free(&k);
  free(P.targets);
  P.targets = NULL;
  o.hard_weight = 0.0f, o.reduction = FH_REDUCTION_NONE;
  ok &= check("no targets", &P, &o, NULL);
  dk_free(&P);
  cr_assert(ok, "a comparison failed (see the lines above)");
}

/* A NaN row of Es: that row's outputs are NaN, every other row equals the NaN-free run bitwise. */
Test(kernel_distill, nan_row_confined, .timeout = 1200) {
  dk_spec_t s = dk_default(40, 200, 16, 210, 24, FH_DTYPE_F16);
  fh_distill_options_t o = opts_for(FH_DISTILL_REVERSE_KL, 0);
  dk_problem_t P, Q;
  dk_init(&P, &s);
  s.nan_row = 3;
  dk_init(&Q, &s);
  dk_out_t a, b;
  dk_out_alloc(&a, s.N), dk_out_alloc(&b, s.N);
  cr_assert_eq(dk_run(&P, &o, &a), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(dk_run(&Q, &o, &b), FH_SUCCESS, "%s", fh_last_error());
  for (int64_t i = 0; i < s.N; ++i) {
    if (i == 3) {
      cr_expect(isnan(b.loss[i]) && isnan(b.state[i * NS]), "row 3 is NaN");
      continue;
    }
    cr_expect(lk_same_bits(a.loss + i, b.loss + i, 1) && lk_same_bits(a.state + i * NS, b.state + i * NS, NS),
              "row %lld changed by the NaN row", (long long)i);
  }
  dk_out_free(&a), dk_out_free(&b);
  dk_free(&P), dk_free(&Q);
}

/* The scalar fallback (odd row strides) gives bitwise the 16-byte path's results, and a row's
 * results do not depend on the batch (the first 37 rows alone). */
Test(kernel_distill, fallback_and_batch_invariance, .timeout = 1200) {
  for (int di = 0; di < 3; ++di) {
    dk_spec_t s = dk_default(130, 260, 40, 270, 32, DTYPES[di]);
    fh_distill_options_t o = opts_for(FH_DISTILL_TVD, 0);
    dk_problem_t P, Q, R;
    dk_init(&P, &s);
    s.pad = 1;
    dk_init(&Q, &s);
    s.pad = 0, s.N = 37;
    dk_init(&R, &s); /* same seed: the first rows are the same values */
    dk_out_t a, b, c;
    dk_out_alloc(&a, 130), dk_out_alloc(&b, 130), dk_out_alloc(&c, 37);
    cr_assert_eq(dk_run(&P, &o, &a), FH_SUCCESS, "%s", fh_last_error());
    cr_assert_eq(dk_run(&Q, &o, &b), FH_SUCCESS, "%s", fh_last_error());
    cr_assert_eq(dk_run(&R, &o, &c), FH_SUCCESS, "%s", fh_last_error());
    cr_expect(lk_same_bits(a.loss, b.loss, 130) && lk_same_bits(a.state, b.state, 130 * NS),
              "%s: scalar fallback differs from the 16-byte path", DNAME[di]);
    int same_rows = 1;
    for (int64_t i = 0; i < 37; ++i) {
      double x[2] = {fh_tensor_get(&P.tEs, i, 0), fh_tensor_get(&P.tEt, i, 0)};
      double y[2] = {fh_tensor_get(&R.tEs, i, 0), fh_tensor_get(&R.tEt, i, 0)};
      same_rows &= x[0] == y[0] && x[1] == y[1];
    }
    if (same_rows)
      cr_expect(lk_same_bits(a.loss, c.loss, 37) && lk_same_bits(a.state, c.state, 37 * NS),
                "%s: a row's results depend on the batch", DNAME[di]);
    dk_out_free(&a), dk_out_free(&b), dk_out_free(&c);
    dk_free(&P), dk_free(&Q), dk_free(&R);
  }
}

/* ---- backward ---- */

typedef struct dk_grads {
  double *dE, *dC, *db;
} dk_grads_t;
static void dk_grads_alloc(dk_grads_t* g, const dk_problem_t* P) {
  g->dE = calloc((size_t)(P->s.N * P->s.Ds + 1), sizeof(double));
  g->dC = calloc((size_t)(P->s.V * P->s.Ds + 1), sizeof(double));
  g->db = calloc((size_t)(P->s.V + 1), sizeof(double));
}
static void dk_grads_free(dk_grads_t* g) { free(g->dE), free(g->dC), free(g->db); }

static double round_to(fh_dtype_t dt, double x) {
  unsigned char b[8];
  fh_store(b, dt, 0, x);
  return fh_load(b, dt, 0);
}

/* Upstream gradients: [N] random for reduction none, else one value. */
static double* make_gl(const dk_problem_t* P, const fh_distill_options_t* o) {
  const int64_t n = o->reduction == FH_REDUCTION_NONE ? (P->s.N > 0 ? P->s.N : 1) : 1;
  double* gl = malloc(sizeof(double) * (size_t)n);
  tu_rng_t r = {99};
  for (int64_t i = 0; i < n; ++i) gl[i] = o->reduction == FH_REDUCTION_NONE ? 0.5 + tu_uniform(&r) : 1.3;
  return gl;
}

/* The CUDA backward through the public API from the fp32 `state`; init (may be NULL) preloads
 * the gradient buffers (accumulate). Gradient buffers in the student dtype with the inputs'
 * row strides, NaN in the padding. */
static fh_status_t dk_run_backward(const dk_problem_t* P, const fh_distill_options_t* o, const double* state,
                                   const double* gl, const dk_grads_t* init, dk_grads_t* out) {
  const int64_t N = P->s.N, V = P->s.V, D = P->s.Ds, ld = D + P->s.pad;
  const fh_dtype_t dt = P->s.dtype;
  const size_t es = fh_dtype_size(dt);
  fh_context_t* ctx = cuda_ctx();
  fh_distill_shape_t sh = {N, V, D, P->s.Vt, P->s.Dt, 0, dt, dt};
  size_t ws = 0;
  cr_assert_eq(fh_distill_backward_workspace_size(ctx, o, &sh, &ws), FH_SUCCESS, "%s", fh_last_error());
  void* w = ws ? aligned_alloc(256, (ws + 255) & ~(size_t)255) : NULL;
  if (w) memset(w, 0xA5, ws);
  void* dE = aligned_alloc(256, ((size_t)(N * ld + 1) * es + 255) & ~(size_t)255);
  void* dC = aligned_alloc(256, ((size_t)(V * ld + 1) * es + 255) & ~(size_t)255);
  void* db = aligned_alloc(256, ((size_t)(V + 1) * es + 255) & ~(size_t)255);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t k = 0; k < ld; ++k) fh_store(dE, dt, i * ld + k, k < D ? (init ? init->dE[i * D + k] : NAN) : NAN);
  for (int64_t j = 0; j < V; ++j)
    for (int64_t k = 0; k < ld; ++k) fh_store(dC, dt, j * ld + k, k < D ? (init ? init->dC[j * D + k] : NAN) : NAN);
  for (int64_t j = 0; j < V; ++j) fh_store(db, dt, j, init ? init->db[j] : NAN);
  fh_tensor_t tE = fh_tensor_2d(dE, dt, N, D), tC = fh_tensor_2d(dC, dt, V, D), tb = fh_tensor_2d(db, dt, 1, V);
  tE.row_stride = tC.row_stride = ld;
  const size_t nst = (size_t)(N > 0 ? N : 1) * NS;
  float* st = malloc(sizeof(float) * nst);
  for (int64_t k = 0; k < N * NS; ++k) st[k] = (float)state[k];
  const int64_t ng = o->reduction == FH_REDUCTION_NONE ? (N > 0 ? N : 1) : 1;
  float* g32 = malloc(sizeof(float) * (size_t)ng);
  for (int64_t k = 0; k < ng; ++k) g32[k] = (float)gl[k];
  fh_distill_head_t hs = {&P->tEs, &P->tCs, &P->tbs}, ht = {&P->tEt, &P->tCt, &P->tbt};
  fh_distill_grad_inputs_t in = {st, g32};
  fh_distill_grads_t G = {&tE, &tC, &tb};
  const fh_status_t rc = fh_distill_backward(ctx, o, &hs, &ht, P->targets, &in, &G, w, ws);
  if (rc == FH_SUCCESS) {
    cr_assert_eq(fh_context_check(ctx), FH_SUCCESS, "%s", fh_last_error());
    for (int64_t i = 0; i < N; ++i)
      for (int64_t k = 0; k < ld; ++k) {
        const double v = fh_load(dE, dt, i * ld + k);
        if (k < D) out->dE[i * D + k] = v;
        else cr_assert(isnan(v), "dE padding written");
      }
    for (int64_t j = 0; j < V; ++j)
      for (int64_t k = 0; k < ld; ++k) {
        const double v = fh_load(dC, dt, j * ld + k);
        if (k < D) out->dC[j * D + k] = v;
        else cr_assert(isnan(v), "dC padding written");
      }
    for (int64_t j = 0; j < V; ++j) out->db[j] = fh_load(db, dt, j);
  }
  free(w), free(dE), free(dC), free(db), free(st), free(g32);
  fh_context_destroy(ctx);
  return rc;
}

static int64_t count_valid(const dk_problem_t* P, const fh_distill_options_t* o) {
  int64_t n = 0;
  for (int64_t i = 0; i < P->s.N; ++i) n += !P->targets || P->targets[i] != o->ignore_index;
  return n;
}
static double upstream(const dk_problem_t* P, const fh_distill_options_t* o, const double* gl, int64_t i) {
  if (o->reduction == FH_REDUCTION_NONE) return gl[i];
  if (o->reduction == FH_REDUCTION_SUM) return gl[0];
  const double den = o->divisor > 0 ? o->divisor : (double)count_valid(P, o);
  return den > 0 ? gl[0] / den : 0.0;
}

/* The naive backward from the naive fp32 state (see the file comment). */
static void dk_naive_backward(const dk_problem_t* P, const fh_distill_options_t* o, const double* state,
                              const double* gl, dk_grads_t* out) {
  const int64_t N = P->s.N, V = P->s.V, D = P->s.Ds;
  const fh_dtype_t dt = P->s.dtype;
  const int f32 = dt == FH_DTYPE_F32;
  fh_div_t dv;
  fh_div_resolve(o, &dv);
  const float invT = 1.0f / o->temperature;
  const double T = o->temperature, kap = o->scale_by_t_squared ? T * T : 1.0;
  float *s = malloc(sizeof(float) * (size_t)V), *t = malloc(sizeof(float) * (size_t)V);
  float* aE = malloc(sizeof(float) * (size_t)(D + 1));
  float* aC = calloc((size_t)(V * D + 1), sizeof(float));
  float* ab = calloc((size_t)(V + 1), sizeof(float));
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t k = 0; k < D; ++k) aE[k] = 0.0f;
    const int valid = !P->targets || P->targets[i] != o->ignore_index;
    if (valid) {
      const double* st = state + i * NS;
      const double a = upstream(P, o, gl, i);
      const float cs = (float)(a * o->soft_weight * kap / T), ch = (float)(a * o->hard_weight);
      naive_logits(&P->tEs, &P->tCs, &P->tbs, i, V, s);
      naive_logits(&P->tEt, &P->tCt, &P->tbt, i, V, t);
      for (int64_t j = 0; j < V; ++j) {
        const float X = s[j] * invT - (float)st[0], Y = t[j] * invT - (float)st[1];
        double term, qa;
        fh_div_eval(&dv, X, Y, &term, &qa);
        float g = cs * ((float)qa - expf(X) * (float)st[2]);
        if (o->hard_weight != 0.0f) {
          const float d = s[j] - (float)st[3];
          g += ch * (j == P->targets[i] ? expm1f(d) : expf(d));
        }
        const float gop = (float)(f32 ? lk_tf32_round(g) : round_to(dt, g));
        ab[j] += g;
        for (int64_t k = 0; k < D; ++k) {
          const double c = fh_tensor_get(&P->tCs, j, k), e = fh_tensor_get(&P->tEs, i, k);
          aE[k] += gop * (float)(f32 ? lk_tf32_round(c) : c);
          aC[j * D + k] += gop * (float)(f32 ? lk_tf32_round(e) : e);
        }
      }
    }
    for (int64_t k = 0; k < D; ++k) out->dE[i * D + k] = round_to(dt, out->dE[i * D + k] + aE[k]);
  }
  for (int64_t q = 0; q < V * D; ++q) out->dC[q] = round_to(dt, out->dC[q] + aC[q]);
  for (int64_t j = 0; j < V; ++j) out->db[j] = round_to(dt, out->db[j] + ab[j]);
  free(s), free(t), free(aE), free(aC), free(ab);
}

static const char* const MNAME[3] = {"fp32", "output_dtype", "deterministic"};

/* Forward (kernel, naive, reference), then the three backwards compared. init (may be NULL):
 * the accumulate flag's starting gradients. */
static int check_backward(const char* label, const dk_problem_t* P, const fh_distill_options_t* o,
                          const dk_grads_t* init) {
  const int64_t N = P->s.N, V = P->s.V, D = P->s.Ds;
  dk_out_t kf, nf, rf;
  dk_out_alloc(&kf, N), dk_out_alloc(&nf, N), dk_out_alloc(&rf, N);
  cr_assert_eq(dk_run(P, o, &kf), FH_SUCCESS, "%s: %s", label, fh_last_error());
  dk_naive(P, o, &nf);
  dk_reference(P, o, &rf);
  double* gl = make_gl(P, o);
  dk_grads_t k, n, r;
  dk_grads_alloc(&k, P), dk_grads_alloc(&n, P), dk_grads_alloc(&r, P);
  if (init) {
    memcpy(n.dE, init->dE, sizeof(double) * (size_t)(N * D)), memcpy(n.dC, init->dC, sizeof(double) * (size_t)(V * D));
    memcpy(n.db, init->db, sizeof(double) * (size_t)V);
  }
  cr_assert_eq(dk_run_backward(P, o, kf.state, gl, init, &k), FH_SUCCESS, "%s: %s", label, fh_last_error());
  dk_naive_backward(P, o, nf.state, gl, &n);
  fh_distill_problem_t p = dk_ref_problem(P, o);
  cr_assert_eq(fh_ref_distill_backward_f64(&p, rf.state, gl, r.dE, r.dC, r.db, NULL), FH_SUCCESS, "%s",
               fh_last_error());
  if (init) {
    for (int64_t q = 0; q < N * D; ++q) r.dE[q] += init->dE[q];
    for (int64_t q = 0; q < V * D; ++q) r.dC[q] += init->dC[q];
    for (int64_t q = 0; q < V; ++q) r.db[q] += init->db[q];
  }
  const int lowp = o->accum_mode == FH_ACCUM_OUTPUT_DTYPE && P->s.dtype != FH_DTYPE_F32;
  const double fE = lowp ? 2.0 * (double)((V + 127) / 128) : 2.0;
  const double fC = lowp ? 2.0 * (double)((count_valid(P, o) + 127) / 128) : 2.0;
  char nm[200];
  int ok = 1;
  snprintf(nm, sizeof nm, "%s %s dE", label, MNAME[o->accum_mode]);
  ok &= lk_compare(nm, k.dE, r.dE, n.dE, N * D, fE, (double)(D + V), NULL);
  snprintf(nm, sizeof nm, "%s %s dC", label, MNAME[o->accum_mode]);
  ok &= lk_compare(nm, k.dC, r.dC, n.dC, V * D, fC, (double)(D + V + N), NULL);
  snprintf(nm, sizeof nm, "%s %s dbias", label, MNAME[o->accum_mode]);
  ok &= lk_compare(nm, k.db, r.db, n.db, V, 2.0, (double)(V + N), NULL);
  dk_grads_free(&k), dk_grads_free(&n), dk_grads_free(&r);
  dk_out_free(&kf), dk_out_free(&nf), dk_out_free(&rf);
  free(gl);
  return ok;
}

static void run_backward(int di) {
  static const dcase_t BC[] = {{"fkl", FH_DISTILL_FORWARD_KL, 0, 0},
                               {"jsd0.3", FH_DISTILL_JSD, 0.3f, 0},
                               {"tvd", FH_DISTILL_TVD, 0, 0},
                               {"skew_rkl0.3", FH_DISTILL_SKEW_REVERSE_KL, 0.3f, 0},
                               {"alpha-0.5", FH_DISTILL_ALPHA, -0.5f, 0}};
  dk_spec_t s = dk_default(130, 300, 72, 317, 40, DTYPES[di]);
  dk_problem_t P;
  dk_init(&P, &s);
  int ok = 1;
  for (int c = 0; c < 5; ++c) {
    fh_distill_options_t o = opts_for(BC[c].d, BC[c].param);
    o.reduction = c == 0 ? FH_REDUCTION_NONE : FH_REDUCTION_MEAN;
    o.accum_mode = (fh_accum_mode_t)(c % 3);
    char label[96];
    snprintf(label, sizeof label, "%s %s", DNAME[di], BC[c].name);
    ok &= check_backward(label, &P, &o, NULL);
  }
  dk_free(&P);
  cr_assert(ok, "a comparison failed (see the lines above)");
}

Test(kernel_distill, backward_f32, .timeout = 1200) { run_backward(0); }
Test(kernel_distill, backward_f16, .timeout = 1200) { run_backward(1); }
Test(kernel_distill, backward_bf16, .timeout = 1200) { run_backward(2); }

/* Every mode with the accumulate flag, every divergence's gradient once (bf16, small), and the
 * scalar fallback (odd strides, D_s % 8 != 0). */
Test(kernel_distill, backward_modes_divergences_fallback, .timeout = 1200) {
  int ok = 1;
  {
    dk_spec_t s = dk_default(37, 150, 24, 160, 16, FH_DTYPE_BF16);
    dk_problem_t P;
    dk_init(&P, &s);
    dk_grads_t init;
    dk_grads_alloc(&init, &P);
    tu_rng_t r = {5};
    for (int64_t q = 0; q < s.N * s.Ds; ++q) init.dE[q] = round_to(s.dtype, 0.01 * tu_normal(&r));
    for (int64_t q = 0; q < s.V * s.Ds; ++q) init.dC[q] = round_to(s.dtype, 0.01 * tu_normal(&r));
    for (int64_t q = 0; q < s.V; ++q) init.db[q] = round_to(s.dtype, 0.01 * tu_normal(&r));
    for (int m = 0; m < 3; ++m) {
      fh_distill_options_t o = opts_for(FH_DISTILL_JSD_SCALED, 0.9f);
      o.reduction = FH_REDUCTION_SUM, o.accum_mode = (fh_accum_mode_t)m, o.accumulate = 1;
      ok &= check_backward("accumulate", &P, &o, &init);
    }
    for (int c = 0; c < NCASES; ++c) {
      fh_distill_options_t o = opts_for(CASES[c].d, CASES[c].param);
      if (CASES[c].plain) o.jsd_endpoints = FH_DISTILL_JSD_ENDPOINTS_PLAIN;
      o.accum_mode = FH_ACCUM_DETERMINISTIC;
      ok &= check_backward(CASES[c].name, &P, &o, NULL);
    }
    dk_grads_free(&init);
    dk_free(&P);
  }
  for (int di = 0; di < 3; ++di) {
    dk_spec_t s = dk_default(70, 200, 19, 200, 13, DTYPES[di]);
    s.pad = 1;
    dk_problem_t P;
    dk_init(&P, &s);
    fh_distill_options_t o = opts_for(FH_DISTILL_REVERSE_KL, 0);
    o.accum_mode = FH_ACCUM_FP32;
    char label[64];
    snprintf(label, sizeof label, "%s scalar", DNAME[di]);
    ok &= check_backward(label, &P, &o, NULL);
    dk_free(&P);
  }
  cr_assert(ok, "a comparison failed (see the lines above)");
}

/* Bitwise the same forward and (deterministic modes) gradients under two block orders of the
 * emulator; a NaN row of Es leaves the other rows' dE bitwise unchanged (dC and dbias sum over
 * rows, so the NaN reaches them, as in the reference); every row ignored gives zero gradients. */
Test(kernel_distill, block_order_nan_row_ignored, .timeout = 1200) {
  dk_spec_t s = dk_default(130, 260, 24, 270, 16, FH_DTYPE_BF16);
  dk_problem_t P;
  dk_init(&P, &s);
  for (int m = 1; m < 3; ++m) {
    fh_distill_options_t o = opts_for(FH_DISTILL_JSD, 0.3f);
    o.accum_mode = (fh_accum_mode_t)m;
    dk_out_t f1, f2;
    dk_out_alloc(&f1, s.N), dk_out_alloc(&f2, s.N);
    dk_grads_t g1, g2;
    dk_grads_alloc(&g1, &P), dk_grads_alloc(&g2, &P);
    double* gl = make_gl(&P, &o);
    fh_emu_set_seed(3);
    cr_assert_eq(dk_run(&P, &o, &f1), FH_SUCCESS, "%s", fh_last_error());
    cr_assert_eq(dk_run_backward(&P, &o, f1.state, gl, NULL, &g1), FH_SUCCESS, "%s", fh_last_error());
    fh_emu_set_seed(0xdeadbeef);
    cr_assert_eq(dk_run(&P, &o, &f2), FH_SUCCESS, "%s", fh_last_error());
    cr_assert_eq(dk_run_backward(&P, &o, f2.state, gl, NULL, &g2), FH_SUCCESS, "%s", fh_last_error());
    cr_expect(lk_same_bits(f1.loss, f2.loss, s.N) && lk_same_bits(f1.state, f2.state, s.N * NS),
              "forward differs between block orders");
    cr_expect(lk_same_bits(g1.dE, g2.dE, s.N * s.Ds) && lk_same_bits(g1.dC, g2.dC, s.V * s.Ds) &&
                  lk_same_bits(g1.db, g2.db, s.V),
              "mode %s: gradients differ between block orders", MNAME[m]);
    if (m == FH_ACCUM_DETERMINISTIC) { /* the NaN row against this NaN-free run */
      dk_spec_t sn = s;
      sn.nan_row = 3;
      dk_problem_t Q;
      dk_init(&Q, &sn);
      dk_out_t fq;
      dk_out_alloc(&fq, s.N);
      dk_grads_t gq;
      dk_grads_alloc(&gq, &Q);
      cr_assert_eq(dk_run(&Q, &o, &fq), FH_SUCCESS, "%s", fh_last_error());
      cr_assert_eq(dk_run_backward(&Q, &o, fq.state, gl, NULL, &gq), FH_SUCCESS, "%s", fh_last_error());
      for (int64_t i = 0; i < s.N; ++i) {
        if (i == 3) {
          cr_expect(isnan(gq.dE[i * s.Ds]), "the NaN row's dE is NaN");
          continue;
        }
        cr_expect(lk_same_bits(gq.dE + i * s.Ds, g1.dE + i * s.Ds, s.Ds), "row %lld's dE changed by the NaN row",
                  (long long)i);
      }
      dk_out_free(&fq), dk_grads_free(&gq), dk_free(&Q);
    }
    free(gl);
    dk_out_free(&f1), dk_out_free(&f2), dk_grads_free(&g1), dk_grads_free(&g2);
  }
  fh_emu_set_seed(0);
  for (int64_t i = 0; i < s.N; ++i) P.targets[i] = -100;
  for (int m = 0; m < 3; ++m) {
    fh_distill_options_t o = opts_for(FH_DISTILL_FORWARD_KL, 0);
    o.accum_mode = (fh_accum_mode_t)m;
    o.reduction = FH_REDUCTION_MEAN;
    dk_grads_t g;
    dk_grads_alloc(&g, &P);
    double* st = calloc((size_t)(s.N * NS), sizeof(double));
    double gl = 1.0;
    cr_assert_eq(dk_run_backward(&P, &o, st, &gl, NULL, &g), FH_SUCCESS, "%s", fh_last_error());
    int zero = 1;
    for (int64_t q = 0; q < s.N * s.Ds; ++q) zero &= g.dE[q] == 0.0;
    for (int64_t q = 0; q < s.V * s.Ds; ++q) zero &= g.dC[q] == 0.0;
    for (int64_t q = 0; q < s.V; ++q) zero &= g.db[q] == 0.0;
    cr_expect(zero, "mode %s: every row ignored must give zero gradients", MNAME[m]);
    free(st);
    dk_grads_free(&g);
  }
  dk_free(&P);
}

/* N = 0: the loss is 0 and nothing else is touched; the workspace formula at the Llama-3
 * 8B -> 1B shape (N = 8192, V = 128256, bf16): 256 + 4N + 16N + 12N + 28·16·N bytes (each
 * piece rounded up to 256), no N x V term. The sparse teacher reports FH_ERR_UNSUPPORTED. */
Test(kernel_distill, empty_workspace_unsupported) {
  dk_spec_t s = dk_default(0, 50, 8, 50, 8, FH_DTYPE_BF16);
  dk_problem_t P;
  dk_init(&P, &s);
  fh_distill_options_t o = opts_for(FH_DISTILL_FORWARD_KL, 0);
  o.reduction = FH_REDUCTION_MEAN;
  dk_out_t k;
  dk_out_alloc(&k, 1);
  k.rloss = 7;
  cr_assert_eq(dk_run(&P, &o, &k), FH_SUCCESS, "%s", fh_last_error());
  cr_expect(k.rloss == 0.0, "N = 0: loss %g", k.rloss);
  dk_out_free(&k);
  dk_free(&P);
  fh_context_t* ctx = cuda_ctx();
  fh_distill_shape_t sh = {8192, 128256, 2048, 128256, 4096, 0, FH_DTYPE_BF16, FH_DTYPE_BF16};
  size_t ws = 0;
  cr_assert_eq(fh_distill_forward_workspace_size(ctx, &o, &sh, &ws), FH_SUCCESS, "%s", fh_last_error());
  const size_t want = 256 + 4 * 8192 + 16 * 8192 + 12 * 8192 + 28 * 16 * 8192;
  printf("distill forward workspace at N=8192 V=128256: %zu bytes (%.2f MiB)\n", ws, ws / 1048576.0);
  cr_expect_eq(ws, want, "workspace %zu, formula %zu", ws, want);
  cr_assert_eq(fh_distill_backward_workspace_size(ctx, &o, &sh, &ws), FH_SUCCESS, "%s", fh_last_error());
  printf("distill backward workspace (fp32 mode, bf16) at N=8192 V=128256 D_s=2048: %zu bytes (%.2f MiB)\n", ws,
         ws / 1048576.0);
  sh.K = 8;
  cr_expect_eq(fh_distill_forward_workspace_size(ctx, &o, &sh, &ws), FH_ERR_UNSUPPORTED);
  fh_context_destroy(ctx);
}
