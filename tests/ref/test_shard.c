/* Vocabulary-parallel heads (fusedhead_shard.h) with simulated ranks: the head is cut into P
 * contiguous slices of uneven size (some empty), each "rank" runs the shard calls on its slice,
 * the partials are laid out as an all-gather would ([P][N][width]) and merged, dE is summed in
 * rank order. Everything must equal the single-device op on the whole head to fp64 round-off
 * (fp64 inputs, so every float array holds doubles and nothing is rounded to fp32), the argmax
 * exactly. Tolerance: rtol = atol = 1e-11, a few thousand ulps of the O(1) values: the merge
 * reorders sums of at most V terms, each off by an ulp, and nothing else differs. Masked classes
 * (bias −inf, docs/conventions.md) on both sides of shard boundaries, masked targets and fully
 * masked rows must give the single-device results too (infinities equal, gradients exactly 0). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fusedhead.h"
#include "test_util.h"

#define TOL 1e-11
#define MAXP 5

typedef struct split {
  int64_t P;
  int64_t size[MAXP];
} split_t;

typedef struct head {
  int64_t N, V, D;
  double *E, *C, *b, *cw, *tw;
  int64_t* y;
} head_t;

static double* rnd(tu_rng_t* r, int64_t n, double sd) {
  double* a = (double*)malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
  for (int64_t k = 0; k < n; ++k) a[k] = sd * tu_normal(r);
  return a;
}

/* Random head; row 0's maximum logit is tied between class 1 and class V-2 (identical rows,
 * which lie on different ranks in every split used), so the argmax merge must keep the first. */
static void head_init(head_t* h, int64_t N, int64_t V, int64_t D, uint64_t seed) {
  tu_rng_t r = {seed};
  h->N = N, h->V = V, h->D = D;
  h->E = rnd(&r, N * D, 1.0);
  h->C = rnd(&r, V * D, 0.5);
  h->b = rnd(&r, V, 0.3);
  h->cw = (double*)malloc(sizeof(double) * (size_t)V);
  h->tw = (double*)malloc(sizeof(double) * (size_t)N);
  h->y = (int64_t*)malloc(sizeof(int64_t) * (size_t)N);
  for (int64_t j = 0; j < V; ++j) h->cw[j] = j == 0 ? 0.0 : 0.25 + 1.75 * tu_uniform(&r);
  for (int64_t i = 0; i < N; ++i) {
    h->tw[i] = i == 1 ? 0.0 : 0.25 + 1.75 * tu_uniform(&r);
    h->y[i] = i % 5 == 2 ? -100 : tu_randint(&r, V);
  }
  for (int64_t k = 0; k < D; ++k) h->C[1 * D + k] = h->C[(V - 2) * D + k] = 4.0 * h->E[k];
  h->b[1] = h->b[V - 2] = 0.0;
}

/* Classes masked by a −inf bias in the masked cases: around every boundary of S2..S5 below
 * (3, 9, 18, 20, 27, 31, 36) and the first class; never the tied classes 1 and V − 2. */
static const int64_t MASKED[] = {0, 2, 3, 9, 17, 20, 21, 27, 30, 36, 40};
#define NMASKED ((int64_t)(sizeof MASKED / sizeof MASKED[0]))

static int is_masked(int64_t j) {
  for (int64_t k = 0; k < NMASKED; ++k)
    if (MASKED[k] == j) return 1;
  return 0;
}

/* mask 1: −inf bias on MASKED, targets moved off them; mask 2: also masked targets (row 1, whose
 * token weight is 0, and row 3): loss +inf unless the weight is 0 (no 0·inf). */
static void head_mask(head_t* h, int mask) {
  if (!mask) return;
  for (int64_t k = 0; k < NMASKED; ++k)
    if (MASKED[k] < h->V) h->b[MASKED[k]] = -INFINITY;
  for (int64_t i = 0; i < h->N; ++i)
    while (h->y[i] >= 0 && is_masked(h->y[i])) h->y[i] = (h->y[i] + 1) % h->V;
  if (mask == 2) h->y[1] = 20, h->y[3] = 3;
}

static void head_free(head_t* h) {
  free(h->E), free(h->C), free(h->b), free(h->cw), free(h->tw), free(h->y);
}

static int64_t start_of(const split_t* s, int64_t r) {
  int64_t a = 0;
  for (int64_t k = 0; k < r; ++k) a += s->size[k];
  return a;
}

static fh_context_t* cpu(void) {
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  return ctx;
}

/* ---- linear cross-entropy ---- */

static void lce_case(const char* name, const fh_linear_ce_options_t* o, int bias, int weights, int mask,
                     const split_t* s, uint64_t seed) {
  const int64_t N = 23, V = 41, D = 7, W = FH_SHARD_LCE_PARTIAL;
  int64_t tot = 0;
  for (int64_t r = 0; r < s->P; ++r) tot += s->size[r];
  cr_assert_eq(tot, V, "%s: split does not cover V", name);
  head_t h;
  head_init(&h, N, V, D, seed);
  head_mask(&h, mask);
  fh_context_t* ctx = cpu();
  const int none = o->reduction == FH_REDUCTION_NONE;
  const int64_t nl = none ? N : 1;
  const double* cw = weights ? h.cw : NULL;
  const double* tw = weights ? h.tw : NULL;
  fh_tensor_t tE = fh_tensor_2d(h.E, FH_DTYPE_F64, N, D), tC = fh_tensor_2d(h.C, FH_DTYPE_F64, V, D);
  fh_tensor_t tb = fh_tensor_2d(h.b, FH_DTYPE_F64, 1, V);

  /* The single-device op. */
  double loss[23], lse[23], ent[23], zl[23], acc, loss2[23], lse2[23], ent2[23], zl2[23], acc2;
  int64_t am[23], am2[23];
  fh_linear_ce_outputs_t out = {(float*)loss, (float*)lse, (float*)ent, (float*)zl, am, (float*)&acc};
  cr_assert_eq(fh_linear_ce_forward(ctx, o, &tE, &tC, bias ? &tb : NULL, h.y, (const float*)cw, (const float*)tw,
                                    &out, NULL, 0),
               FH_SUCCESS, "%s: %s", name, fh_last_error());

  /* P ranks, then the merge. */
  double* gathered = (double*)malloc(sizeof(double) * (size_t)(s->P * N * W));
  for (int64_t r = 0; r < s->P; ++r) {
    const int64_t a = start_of(s, r), n = s->size[r];
    fh_shard_t sh = {a, n, V};
    fh_tensor_t Cr = fh_tensor_2d(h.C + a * D, FH_DTYPE_F64, n, D), br = fh_tensor_2d(h.b + a, FH_DTYPE_F64, 1, n);
    cr_assert_eq(fh_linear_ce_shard_forward(ctx, o, &sh, &tE, &Cr, bias ? &br : NULL, h.y, (const float*)cw,
                                            (const float*)tw, gathered + r * N * W),
                 FH_SUCCESS, "%s: rank %lld: %s", name, (long long)r, fh_last_error());
  }
  fh_linear_ce_outputs_t out2 = {(float*)loss2, (float*)lse2, (float*)ent2, (float*)zl2, am2, (float*)&acc2};
  cr_assert_eq(fh_linear_ce_shard_combine(ctx, o, FH_DTYPE_F64, N, V, s->P, gathered, h.y, (const float*)cw,
                                          (const float*)tw, &out2),
               FH_SUCCESS, "%s: combine: %s", name, fh_last_error());
  cr_expect(tu_check_close(name, loss2, loss, nl, TOL, TOL), "%s: loss", name);
  cr_expect(tu_check_close(name, lse2, lse, N, TOL, TOL), "%s: lse", name);
  cr_expect(tu_check_close(name, ent2, ent, N, TOL, TOL), "%s: entropy", name);
  cr_expect(tu_check_close(name, zl2, zl, nl, TOL, TOL), "%s: z_loss", name);
  cr_expect(memcmp(am, am2, sizeof am) == 0, "%s: argmax differs", name);
  cr_expect_eq(am[0], 1, "%s: the tied maximum of row 0 must go to class 1, got %lld", name, (long long)am[0]);
  cr_expect_eq(acc, acc2, "%s: accuracy", name);

  /* Backward: whole head vs the shards from the merged statistics, dE summed in rank order. */
  tu_rng_t rr = {seed ^ 0xbeef};
  double gl[23], glse[23];
  for (int64_t i = 0; i < N; ++i) gl[i] = 0.5 + tu_uniform(&rr), glse[i] = 0.3 * tu_normal(&rr);
  double *dE = rnd(&rr, N * D, 0), *dC = rnd(&rr, V * D, 0), *db = rnd(&rr, V, 0);
  double *dE2 = rnd(&rr, N * D, 0), *dEr = rnd(&rr, N * D, 0), *dC2 = rnd(&rr, V * D, 0), *db2 = rnd(&rr, V, 0);
  fh_tensor_t gE = fh_tensor_2d(dE, FH_DTYPE_F64, N, D), gC = fh_tensor_2d(dC, FH_DTYPE_F64, V, D);
  fh_tensor_t gb = fh_tensor_2d(db, FH_DTYPE_F64, 1, V);
  fh_linear_ce_grads_t g = {&gE, &gC, bias ? &gb : NULL};
  fh_linear_ce_grad_inputs_t in = {(float*)lse, (float*)ent, (float*)gl, (float*)glse};
  cr_assert_eq(fh_linear_ce_backward(ctx, o, &tE, &tC, bias ? &tb : NULL, h.y, (const float*)cw, (const float*)tw,
                                     &in, &g, NULL, 0),
               FH_SUCCESS, "%s: %s", name, fh_last_error());
  /* lse and entropy are not read on a shard (the merged partials give them): NULL. */
  fh_linear_ce_grad_inputs_t in2 = {NULL, NULL, (float*)gl, (float*)glse};
  memset(dE2, 0, sizeof(double) * (size_t)(N * D));
  for (int64_t r = 0; r < s->P; ++r) {
    const int64_t a = start_of(s, r), n = s->size[r];
    fh_shard_t sh = {a, n, V};
    fh_tensor_t Cr = fh_tensor_2d(h.C + a * D, FH_DTYPE_F64, n, D), br = fh_tensor_2d(h.b + a, FH_DTYPE_F64, 1, n);
    fh_tensor_t gEr = fh_tensor_2d(dEr, FH_DTYPE_F64, N, D), gCr = fh_tensor_2d(dC2 + a * D, FH_DTYPE_F64, n, D);
    fh_tensor_t gbr = fh_tensor_2d(db2 + a, FH_DTYPE_F64, 1, n);
    fh_linear_ce_grads_t gr = {&gEr, &gCr, bias ? &gbr : NULL};
    cr_assert_eq(fh_linear_ce_shard_backward(ctx, o, &sh, &tE, &Cr, bias ? &br : NULL, h.y, (const float*)cw,
                                             (const float*)tw, s->P, gathered, &in2, &gr),
                 FH_SUCCESS, "%s: rank %lld: %s", name, (long long)r, fh_last_error());
    for (int64_t k = 0; k < N * D; ++k) dE2[k] += dEr[k]; /* the all-reduce */
  }
  cr_expect(tu_check_close(name, dE2, dE, N * D, TOL, TOL), "%s: dE", name);
  cr_expect(tu_check_close(name, dC2, dC, V * D, TOL, TOL), "%s: dC", name);
  if (bias) cr_expect(tu_check_close(name, db2, db, V, TOL, TOL), "%s: dbias", name);
  for (int64_t j = 0; mask && j < V; ++j) /* masked classes: gradient exactly 0 */
    for (int64_t k = 0; is_masked(j) && k < D; ++k)
      cr_expect(dC2[j * D + k] == 0.0 && db2[j] == 0.0, "%s: masked class %lld has dC %g, dbias %g", name,
                (long long)j, dC2[j * D + k], db2[j]);
  if (mask == 2 && none) {
    cr_expect(isinf(loss2[3]) && loss2[3] > 0, "%s: a masked target gives loss +inf, got %g", name, loss2[3]);
    if (weights) cr_expect(isfinite(loss2[1]), "%s: a masked target under token weight 0: loss %g", name, loss2[1]);
  }
  free(dE), free(dC), free(db), free(dE2), free(dEr), free(dC2), free(db2), free(gathered);
  fh_context_destroy(ctx);
  head_free(&h);
}

static const split_t S1 = {1, {41}}, S2 = {2, {20, 21}}, S3 = {3, {5, 0, 36}}, S4 = {4, {3, 17, 11, 10}},
                     S5 = {5, {9, 9, 9, 9, 5}};
static const split_t* const SPLITS[] = {&S1, &S2, &S3, &S4, &S5};

static fh_linear_ce_options_t lce_opts(fh_reduction_t red) {
  fh_linear_ce_options_t o;
  fh_linear_ce_options_init(&o);
  o.reduction = red;
  return o;
}

static void lce_all_splits_masked(const char* name, const fh_linear_ce_options_t* o, int bias, int weights,
                                  int mask) {
  for (int k = 0; k < 5; ++k) lce_case(name, o, bias, weights, mask, SPLITS[k], 0x5a4d00 + (uint64_t)k);
}

static void lce_all_splits(const char* name, const fh_linear_ce_options_t* o, int bias, int weights) {
  lce_all_splits_masked(name, o, bias, weights, 0);
}

Test(ref_shard, lce_plain_mean) {
  fh_linear_ce_options_t o = lce_opts(FH_REDUCTION_MEAN);
  lce_all_splits("plain mean", &o, 0, 0);
}

Test(ref_shard, lce_every_option) {
  const fh_reduction_t reds[3] = {FH_REDUCTION_MEAN, FH_REDUCTION_SUM, FH_REDUCTION_NONE};
  for (int k = 0; k < 3; ++k) {
    fh_linear_ce_options_t o = lce_opts(reds[k]);
    o.label_smoothing = 0.1f;
    o.z_loss_scale = 1e-2f;
    o.entropy_weight = -0.05f;
    o.softcap = 3.0f;
    o.logit_scale = 0.7f;
    o.ignore_index = -100;
    lce_all_splits("every option", &o, 1, 1);
  }
}

Test(ref_shard, lce_divisor_and_weights) {
  fh_linear_ce_options_t o = lce_opts(FH_REDUCTION_MEAN);
  o.divisor = 11.0f;
  o.label_smoothing = 0.3f;
  lce_all_splits("divisor", &o, 1, 1);
}

/* Masked classes (−inf bias) across every shard boundary, with label smoothing over each row's
 * unmasked classes (ε_i = α/V_i, W_i), class weights, z-loss, entropy, softcap: the partials'
 * V_r and W_r must be merged, or smoothing differs from the single-device op. */
Test(ref_shard, lce_masked_classes) {
  const fh_reduction_t reds[3] = {FH_REDUCTION_MEAN, FH_REDUCTION_SUM, FH_REDUCTION_NONE};
  for (int k = 0; k < 3; ++k) {
    fh_linear_ce_options_t o = lce_opts(reds[k]);
    o.label_smoothing = 0.2f;
    o.z_loss_scale = 1e-2f;
    o.entropy_weight = -0.05f;
    o.softcap = 3.0f;
    o.logit_scale = 0.7f;
    lce_all_splits_masked("masked classes", &o, 1, 1, 1);
    lce_all_splits_masked("masked classes, no weights", &o, 1, 0, 1);
  }
}

/* Masked targets: +inf loss on the owner's rank, told apart from "another rank owns it" (0);
 * under token weight 0 the row contributes 0 (no 0·inf), gradients stay finite and equal. */
Test(ref_shard, lce_masked_targets) {
  const fh_reduction_t reds[2] = {FH_REDUCTION_NONE, FH_REDUCTION_MEAN};
  for (int k = 0; k < 2; ++k) {
    fh_linear_ce_options_t o = lce_opts(reds[k]);
    o.label_smoothing = 0.1f;
    lce_all_splits_masked("masked targets", &o, 1, 1, 2);
    lce_all_splits_masked("masked targets, no weights", &o, 1, 0, 2);
  }
}

/* Every class masked (the shards' Z all 0, one shard empty): lse −inf, entropy 0, loss +inf,
 * argmax the first class, zero gradients; as the single-device op. */
Test(ref_shard, lce_fully_masked_rows) {
  const int64_t N = 3, V = 5, D = 2, P = 3, W = FH_SHARD_LCE_PARTIAL;
  const int64_t size[3] = {2, 0, 3};
  double E[6] = {1, -2, 0.5, 3, -1, 1}, C[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, b[5], gathered[3 * 3 * 9];
  for (int j = 0; j < 5; ++j) b[j] = -INFINITY;
  int64_t y[3] = {1, -100, 4};
  fh_context_t* ctx = cpu();
  fh_linear_ce_options_t o = lce_opts(FH_REDUCTION_NONE);
  o.label_smoothing = 0.1f;
  o.entropy_weight = 0.1f;
  fh_tensor_t tE = fh_tensor_2d(E, FH_DTYPE_F64, N, D), tC = fh_tensor_2d(C, FH_DTYPE_F64, V, D);
  fh_tensor_t tb = fh_tensor_2d(b, FH_DTYPE_F64, 1, V);
  double loss[3], lse[3], ent[3], loss2[3], lse2[3], ent2[3];
  int64_t am[3], am2[3];
  fh_linear_ce_outputs_t out = {(float*)loss, (float*)lse, (float*)ent, NULL, am, NULL};
  cr_assert_eq(fh_linear_ce_forward(ctx, &o, &tE, &tC, &tb, y, NULL, NULL, &out, NULL, 0), FH_SUCCESS, "%s",
               fh_last_error());
  for (int64_t r = 0, a = 0; r < P; a += size[r], ++r) {
    fh_shard_t sh = {a, size[r], V};
    fh_tensor_t Cr = fh_tensor_2d(C + a * D, FH_DTYPE_F64, size[r], D), br = fh_tensor_2d(b + a, FH_DTYPE_F64, 1, size[r]);
    cr_assert_eq(fh_linear_ce_shard_forward(ctx, &o, &sh, &tE, &Cr, &br, y, NULL, NULL, gathered + r * N * W),
                 FH_SUCCESS, "%s", fh_last_error());
  }
  fh_linear_ce_outputs_t out2 = {(float*)loss2, (float*)lse2, (float*)ent2, NULL, am2, NULL};
  cr_assert_eq(fh_linear_ce_shard_combine(ctx, &o, FH_DTYPE_F64, N, V, P, gathered, y, NULL, NULL, &out2), FH_SUCCESS,
               "%s", fh_last_error());
  for (int i = 0; i < 3; i += 2) {
    cr_expect(lse[i] == -INFINITY && lse2[i] == -INFINITY, "row %d: lse %g, shard %g (want -inf)", i, lse[i], lse2[i]);
    cr_expect(ent[i] == 0.0 && ent2[i] == 0.0, "row %d: entropy %g, shard %g (want 0)", i, ent[i], ent2[i]);
    cr_expect(loss[i] == INFINITY && loss2[i] == INFINITY, "row %d: loss %g, shard %g (want +inf)", i, loss[i],
              loss2[i]);
    cr_expect(am2[i] == am[i] && am[i] == 0, "row %d: argmax %lld, shard %lld (want 0)", i, (long long)am[i],
              (long long)am2[i]);
  }
  cr_expect(loss2[1] == 0.0 && am2[1] == -1, "the ignored row");
  double gl[3] = {1, 1, 1}, dE[6], dC[10];
  fh_linear_ce_grad_inputs_t in = {NULL, NULL, (float*)gl, NULL};
  for (int64_t r = 0, a = 0; r < P; a += size[r], ++r) {
    fh_shard_t sh = {a, size[r], V};
    fh_tensor_t Cr = fh_tensor_2d(C + a * D, FH_DTYPE_F64, size[r], D), br = fh_tensor_2d(b + a, FH_DTYPE_F64, 1, size[r]);
    fh_tensor_t gE = fh_tensor_2d(dE, FH_DTYPE_F64, N, D), gC = fh_tensor_2d(dC + a * D, FH_DTYPE_F64, size[r], D);
    for (int k = 0; k < 6; ++k) dE[k] = 7.0;
    fh_linear_ce_grads_t g = {&gE, &gC, NULL};
    cr_assert_eq(fh_linear_ce_shard_backward(ctx, &o, &sh, &tE, &Cr, &br, y, NULL, NULL, P, gathered, &in, &g),
                 FH_SUCCESS, "%s", fh_last_error());
    for (int k = 0; k < 6; ++k) cr_expect(dE[k] == 0.0, "rank %lld: dE[%d] = %g (want 0)", (long long)r, k, dE[k]);
  }
  for (int k = 0; k < 10; ++k) cr_expect(dC[k] == 0.0, "dC[%d] = %g (want 0)", k, dC[k]);
  fh_context_destroy(ctx);
}

/* fp32 inputs at logits ~1e3: the single-device CPU backward recomputes lse in fp64 (an fp32 lse
 * is off by up to 2^-24·|lse|, which exp(z − lse) turns into ~1e-4 relative gradient errors);
 * the shard backward must merge its statistics from the fp64 partials, so dC (complete on each
 * rank, no sum across ranks) agrees to fp32 rounding, and dE to the rounding of its P parts. */
Test(ref_shard, lce_f32_backward_uses_fp64_statistics) {
  const int64_t N = 9, V = 37, D = 4, P = 3, W = FH_SHARD_LCE_PARTIAL;
  const int64_t size[3] = {12, 13, 12};
  tu_rng_t r = {0xf32};
  float E[9 * 4], C[37 * 4], gl = 1.0f, loss, loss2, lse[9], dE[9 * 4], dC[37 * 4], dE2[9 * 4], dEr[9 * 4],
                                                          dC2[37 * 4];
  for (int k = 0; k < N * D; ++k) E[k] = (float)tu_normal(&r);
  for (int k = 0; k < V * D; ++k) C[k] = (float)(300.0 * tu_normal(&r));
  int64_t y[9];
  for (int i = 0; i < N; ++i) y[i] = tu_randint(&r, V);
  fh_context_t* ctx = cpu();
  fh_linear_ce_options_t o = lce_opts(FH_REDUCTION_SUM);
  o.label_smoothing = 0.1f;
  fh_tensor_t tE = fh_tensor_2d(E, FH_DTYPE_F32, N, D), tC = fh_tensor_2d(C, FH_DTYPE_F32, V, D);
  fh_linear_ce_outputs_t out = {&loss, lse, NULL, NULL, NULL, NULL};
  cr_assert_eq(fh_linear_ce_forward(ctx, &o, &tE, &tC, NULL, y, NULL, NULL, &out, NULL, 0), FH_SUCCESS, "%s",
               fh_last_error());
  fh_tensor_t gE = fh_tensor_2d(dE, FH_DTYPE_F32, N, D), gC = fh_tensor_2d(dC, FH_DTYPE_F32, V, D);
  fh_linear_ce_grads_t g = {&gE, &gC, NULL};
  fh_linear_ce_grad_inputs_t in = {lse, NULL, &gl, NULL};
  cr_assert_eq(fh_linear_ce_backward(ctx, &o, &tE, &tC, NULL, y, NULL, NULL, &in, &g, NULL, 0), FH_SUCCESS, "%s",
               fh_last_error());
  double* gathered = (double*)malloc(sizeof(double) * (size_t)(P * N * W));
  for (int64_t k = 0, a = 0; k < P; a += size[k], ++k) {
    fh_shard_t sh = {a, size[k], V};
    fh_tensor_t Cr = fh_tensor_2d(C + a * D, FH_DTYPE_F32, size[k], D);
    cr_assert_eq(fh_linear_ce_shard_forward(ctx, &o, &sh, &tE, &Cr, NULL, y, NULL, NULL, gathered + k * N * W),
                 FH_SUCCESS, "%s", fh_last_error());
  }
  fh_linear_ce_outputs_t out2 = {&loss2, NULL, NULL, NULL, NULL, NULL};
  cr_assert_eq(fh_linear_ce_shard_combine(ctx, &o, FH_DTYPE_F32, N, V, P, gathered, y, NULL, NULL, &out2), FH_SUCCESS,
               "%s", fh_last_error());
  cr_expect(fabsf(loss2 - loss) <= 1e-6f * fabsf(loss), "loss %.9g, shard %.9g", (double)loss, (double)loss2);
  for (int k = 0; k < N * D; ++k) dE2[k] = 0.0f;
  fh_linear_ce_grad_inputs_t in2 = {NULL, NULL, &gl, NULL};
  for (int64_t k = 0, a = 0; k < P; a += size[k], ++k) {
    fh_shard_t sh = {a, size[k], V};
    fh_tensor_t Cr = fh_tensor_2d(C + a * D, FH_DTYPE_F32, size[k], D);
    fh_tensor_t gEr = fh_tensor_2d(dEr, FH_DTYPE_F32, N, D), gCr = fh_tensor_2d(dC2 + a * D, FH_DTYPE_F32, size[k], D);
    fh_linear_ce_grads_t gr = {&gEr, &gCr, NULL};
    cr_assert_eq(fh_linear_ce_shard_backward(ctx, &o, &sh, &tE, &Cr, NULL, y, NULL, NULL, P, gathered, &in2, &gr),
                 FH_SUCCESS, "%s", fh_last_error());
    for (int j = 0; j < N * D; ++j) dE2[j] += dEr[j];
  }
  double ref[37 * 4], mC = 0.0, mE = 0.0;
  for (int k = 0; k < V * D; ++k) ref[k] = dC[k], mC = fmax(mC, fabs(ref[k]));
  cr_expect(tu_check_close_f("dC", dC2, ref, V * D, 2e-7 * mC, 1e-6), "f32 dC");
  for (int k = 0; k < N * D; ++k) ref[k] = dE[k], mE = fmax(mE, fabs(ref[k]));
  cr_expect(tu_check_close_f("dE", dE2, ref, N * D, 1e-6 * mE, 1e-6), "f32 dE");
  free(gathered);
  fh_context_destroy(ctx);
}

/* ---- distillation ---- */

static void distill_case(const char* name, const fh_distill_options_t* o, int mask, const split_t* s,
                         uint64_t seed) {
  const int64_t N = 13, V = 41, Ds = 6, Dt = 5, Vt = 44;
  head_t st, te;
  head_init(&st, N, V, Ds, seed);
  head_init(&te, N, Vt, Dt, seed + 7);
  /* masked in both heads (contributes nothing), student targets off the masked classes */
  head_mask(&st, mask);
  head_mask(&te, mask);
  fh_context_t* ctx = cpu();
  const int none = o->reduction == FH_REDUCTION_NONE;
  const int64_t nl = none ? N : 1, NS = FH_DISTILL_ROW_STATE;
  const int64_t* y = o->hard_weight != 0.0f ? st.y : NULL;
  fh_tensor_t tEs = fh_tensor_2d(st.E, FH_DTYPE_F64, N, Ds), tCs = fh_tensor_2d(st.C, FH_DTYPE_F64, V, Ds);
  fh_tensor_t tbs = fh_tensor_2d(st.b, FH_DTYPE_F64, 1, V);
  fh_tensor_t tEt = fh_tensor_2d(te.E, FH_DTYPE_F64, N, Dt), tCt = fh_tensor_2d(te.C, FH_DTYPE_F64, Vt, Dt);
  fh_tensor_t tbt = fh_tensor_2d(te.b, FH_DTYPE_F64, 1, Vt);
  fh_distill_head_t hs = {&tEs, &tCs, &tbs}, ht = {&tEt, &tCt, &tbt};
  double loss[13], state[13 * 4], soft[13], hard[13], loss2[13], state2[13 * 4], soft2[13], hard2[13];
  fh_distill_outputs_t out = {(float*)loss, (float*)state, (float*)soft, (float*)hard};
  cr_assert_eq(fh_distill_forward(ctx, o, &hs, &ht, y, &out, NULL, 0), FH_SUCCESS, "%s: %s", name, fh_last_error());

  double* gs = (double*)malloc(sizeof(double) * (size_t)(s->P * N * FH_SHARD_DISTILL_STATS));
  double* gd = (double*)malloc(sizeof(double) * (size_t)(s->P * N * FH_SHARD_DISTILL_DIV));
  fh_tensor_t Cs[MAXP], bs[MAXP], Ct[MAXP], bt[MAXP];
  fh_distill_head_t hsr[MAXP], htr[MAXP];
  fh_shard_t sh[MAXP];
  for (int64_t r = 0; r < s->P; ++r) {
    const int64_t a = start_of(s, r), n = s->size[r], nt = r == s->P - 1 ? Vt - a : n; /* the last has V_t − V more */
    sh[r] = (fh_shard_t){a, n, V};
    Cs[r] = fh_tensor_2d(st.C + a * Ds, FH_DTYPE_F64, n, Ds), bs[r] = fh_tensor_2d(st.b + a, FH_DTYPE_F64, 1, n);
    Ct[r] = fh_tensor_2d(te.C + a * Dt, FH_DTYPE_F64, nt, Dt), bt[r] = fh_tensor_2d(te.b + a, FH_DTYPE_F64, 1, nt);
    hsr[r] = (fh_distill_head_t){&tEs, &Cs[r], &bs[r]};
    htr[r] = (fh_distill_head_t){&tEt, &Ct[r], &bt[r]};
    cr_assert_eq(fh_distill_shard_stats(ctx, o, &sh[r], &hsr[r], &htr[r], y, gs + r * N * FH_SHARD_DISTILL_STATS),
                 FH_SUCCESS, "%s: %s", name, fh_last_error());
  }
  for (int64_t r = 0; r < s->P; ++r)
    cr_assert_eq(fh_distill_shard_divergence(ctx, o, &sh[r], &hsr[r], &htr[r], y, s->P, gs,
                                             gd + r * N * FH_SHARD_DISTILL_DIV),
                 FH_SUCCESS, "%s: %s", name, fh_last_error());
  fh_distill_outputs_t out2 = {(float*)loss2, (float*)state2, (float*)soft2, (float*)hard2};
  cr_assert_eq(fh_distill_shard_combine(ctx, o, FH_DTYPE_F64, N, s->P, gs, gd, y, &out2), FH_SUCCESS, "%s: %s", name,
               fh_last_error());
  cr_expect(tu_check_close(name, loss2, loss, nl, TOL, TOL), "%s: loss", name);
  cr_expect(tu_check_close(name, soft2, soft, nl, TOL, TOL), "%s: soft", name);
  cr_expect(tu_check_close(name, hard2, hard, nl, TOL, TOL), "%s: hard", name);
  cr_expect(tu_check_close(name, state2, state, N * NS, TOL, TOL), "%s: row_state", name);

  tu_rng_t rr = {seed ^ 0xfeed};
  double gl[13];
  for (int64_t i = 0; i < N; ++i) gl[i] = 0.5 + tu_uniform(&rr);
  double *dE = rnd(&rr, N * Ds, 0), *dC = rnd(&rr, V * Ds, 0), *db = rnd(&rr, V, 0);
  double *dE2 = rnd(&rr, N * Ds, 0), *dEr = rnd(&rr, N * Ds, 0), *dC2 = rnd(&rr, V * Ds, 0), *db2 = rnd(&rr, V, 0);
  fh_tensor_t gE = fh_tensor_2d(dE, FH_DTYPE_F64, N, Ds), gC = fh_tensor_2d(dC, FH_DTYPE_F64, V, Ds);
  fh_tensor_t gb = fh_tensor_2d(db, FH_DTYPE_F64, 1, V);
  fh_distill_grads_t g = {&gE, &gC, &gb};
  /* the shard's row state comes from the gathered buffers, not in->row_state: NULL */
  fh_distill_grad_inputs_t in = {(float*)state, (float*)gl}, in2 = {NULL, (float*)gl};
  cr_assert_eq(fh_distill_backward(ctx, o, &hs, &ht, y, &in, &g, NULL, 0), FH_SUCCESS, "%s: %s", name,
               fh_last_error());
  for (int64_t r = 0; r < s->P; ++r) {
    const int64_t a = start_of(s, r), n = s->size[r];
    fh_tensor_t gEr = fh_tensor_2d(dEr, FH_DTYPE_F64, N, Ds), gCr = fh_tensor_2d(dC2 + a * Ds, FH_DTYPE_F64, n, Ds);
    fh_tensor_t gbr = fh_tensor_2d(db2 + a, FH_DTYPE_F64, 1, n);
    fh_distill_grads_t gr = {&gEr, &gCr, &gbr};
    cr_assert_eq(fh_distill_shard_backward(ctx, o, &sh[r], &hsr[r], &htr[r], y, s->P, gs, gd, &in2, &gr), FH_SUCCESS,
                 "%s: %s", name, fh_last_error());
    for (int64_t k = 0; k < N * Ds; ++k) dE2[k] = (r ? dE2[k] : 0.0) + dEr[k];
  }
  cr_expect(tu_check_close(name, dE2, dE, N * Ds, TOL, TOL), "%s: dE", name);
  cr_expect(tu_check_close(name, dC2, dC, V * Ds, TOL, TOL), "%s: dC", name);
  cr_expect(tu_check_close(name, db2, db, V, TOL, TOL), "%s: dbias", name);
  for (int64_t j = 0; mask && j < V; ++j)
    if (is_masked(j)) cr_expect(db2[j] == 0.0 && dC2[j * Ds] == 0.0, "%s: masked student class %lld", name, (long long)j);
  cr_expect(isfinite(loss2[0]), "%s: classes masked in both heads contribute nothing: loss %g", name, loss2[0]);
  free(dE), free(dC), free(db), free(dE2), free(dEr), free(dC2), free(db2), free(gs), free(gd);
  fh_context_destroy(ctx);
  head_free(&st);
  head_free(&te);
}

Test(ref_shard, distill_every_divergence) {
  for (int dv = 0; dv < FH_DISTILL_DIVERGENCE_COUNT; ++dv) {
    fh_distill_options_t o;
    fh_distill_options_init(&o);
    o.divergence = (fh_distill_divergence_t)dv;
    o.temperature = 1.7f;
    o.hard_weight = dv % 2 ? 0.25f : 0.0f;
    o.reduction = (fh_reduction_t)(dv % 3);
    char name[64];
    snprintf(name, sizeof name, "distill divergence %d", dv);
    for (int k = 0; k < 5; ++k) distill_case(name, &o, 0, SPLITS[k], 0xd157 + (uint64_t)(dv * 8 + k));
  }
}

/* Classes masked in both heads across the shard boundaries: every divergence, hard loss on. */
Test(ref_shard, distill_masked_classes) {
  for (int dv = 0; dv < FH_DISTILL_DIVERGENCE_COUNT; ++dv) {
    fh_distill_options_t o;
    fh_distill_options_init(&o);
    o.divergence = (fh_distill_divergence_t)dv;
    o.temperature = 1.3f;
    o.hard_weight = 0.5f;
    o.reduction = (fh_reduction_t)(dv % 3);
    char name[64];
    snprintf(name, sizeof name, "distill masked, divergence %d", dv);
    for (int k = 0; k < 5; ++k) distill_case(name, &o, 1, SPLITS[k], 0xd1e7 + (uint64_t)(dv * 8 + k));
  }
}

/* ---- validation ---- */

Test(ref_shard, bad_arguments) {
  fh_context_t* ctx = cpu();
  enum { W_LCE = FH_SHARD_LCE_PARTIAL };
  double E[6] = {1, 2, 3, 4, 5, 6}, C[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1}, part[2 * W_LCE];
  int64_t y[2] = {0, 4};
  fh_tensor_t tE = fh_tensor_2d(E, FH_DTYPE_F64, 2, 3), tC = fh_tensor_2d(C, FH_DTYPE_F64, 3, 3);
  fh_linear_ce_options_t o = lce_opts(FH_REDUCTION_MEAN);
  fh_shard_t ok = {2, 3, 5}, past = {3, 3, 5}, wrong_rows = {0, 2, 5};
  cr_expect_eq(fh_linear_ce_shard_forward(ctx, &o, &ok, &tE, &tC, NULL, y, NULL, NULL, part), FH_SUCCESS, "%s",
               fh_last_error());
  cr_expect_eq(part[8], 4.0, "row 0: local argmax 2 has the global id 4 (got %g)", part[8]);
  cr_expect_eq(part[6], 0.0, "row 0's target 0 lies on another rank: z_y slot is 0");
  cr_expect_eq(part[5], 3.0, "row 0: 3 unmasked classes (got %g)", part[5]);
  cr_expect_eq(part[4], 3.0, "row 0: W_r = 3 without class weights (got %g)", part[4]);
  cr_expect_eq(part[W_LCE + 6], 6.0, "row 1's target 4 is here: z_y = its logit (got %g)", part[W_LCE + 6]);
  double bm[3] = {0.0, 0.0, -INFINITY}; /* global class 4 masked */
  fh_tensor_t tbm = fh_tensor_2d(bm, FH_DTYPE_F64, 1, 3);
  cr_expect_eq(fh_linear_ce_shard_forward(ctx, &o, &ok, &tE, &tC, &tbm, y, NULL, NULL, part), FH_SUCCESS, "%s",
               fh_last_error());
  cr_expect(part[W_LCE + 6] == -INFINITY, "row 1's masked target on its owner: z_y -inf (got %g)", part[W_LCE + 6]);
  cr_expect_eq(part[6], 0.0, "row 0's target elsewhere: still 0 (got %g)", part[6]);
  cr_expect(part[5] == 2.0 && part[4] == 2.0, "row 0: V_r = W_r = 2 unmasked classes (got %g, %g)", part[5], part[4]);
  /* the shard backward needs the gathered partials */
  double gl1 = 1.0, dEv[6];
  fh_tensor_t gEv = fh_tensor_2d(dEv, FH_DTYPE_F64, 2, 3);
  fh_linear_ce_grad_inputs_t gin = {NULL, NULL, (float*)&gl1, NULL};
  fh_linear_ce_grads_t gg = {&gEv, NULL, NULL};
  cr_expect_eq(fh_linear_ce_shard_backward(ctx, &o, &ok, &tE, &tC, NULL, y, NULL, NULL, 0, part, &gin, &gg),
               FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "nranks") != NULL, "%s", fh_last_error());
  cr_expect_eq(fh_linear_ce_shard_backward(ctx, &o, &ok, &tE, &tC, NULL, y, NULL, NULL, 1, NULL, &gin, &gg),
               FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "gathered") != NULL, "%s", fh_last_error());
  cr_expect_eq(fh_linear_ce_shard_backward(ctx, &o, &ok, &tE, &tC, NULL, y, NULL, NULL, 1, part, &gin, &gg),
               FH_SUCCESS, "%s", fh_last_error());
  cr_expect_eq(fh_linear_ce_shard_forward(ctx, &o, NULL, &tE, &tC, NULL, y, NULL, NULL, part),
               FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "shard is NULL") != NULL, "%s", fh_last_error());
  cr_expect_eq(fh_linear_ce_shard_forward(ctx, &o, &past, &tE, &tC, NULL, y, NULL, NULL, part),
               FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "outside") != NULL, "%s", fh_last_error());
  cr_expect_eq(fh_linear_ce_shard_forward(ctx, &o, &wrong_rows, &tE, &tC, NULL, y, NULL, NULL, part),
               FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "V_local") != NULL, "%s", fh_last_error());
  int64_t y_bad[2] = {0, 5};
  cr_expect_eq(fh_linear_ce_shard_forward(ctx, &o, &ok, &tE, &tC, NULL, y_bad, NULL, NULL, part),
               FH_ERR_INVALID_ARGUMENT, "targets are checked against V_global");
  double loss;
  fh_linear_ce_outputs_t out = {(float*)&loss, NULL, NULL, NULL, NULL, NULL};
  cr_expect_eq(fh_linear_ce_shard_combine(ctx, &o, FH_DTYPE_F64, 2, 5, 0, part, y, NULL, NULL, &out),
               FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "nranks") != NULL, "%s", fh_last_error());
  cr_expect_eq(fh_linear_ce_shard_combine(ctx, &o, FH_DTYPE_F64, 2, 5, 1, NULL, y, NULL, NULL, &out),
               FH_ERR_INVALID_ARGUMENT);
  /* distillation: a sparse teacher has no shard step; the stats need a teacher */
  fh_distill_options_t d;
  fh_distill_options_init(&d);
  fh_tensor_t tEt = fh_tensor_2d(E, FH_DTYPE_F64, 2, 3);
  fh_distill_head_t hs = {&tE, &tC, NULL}, ht = {&tEt, &tC, NULL};
  double st[2 * FH_SHARD_DISTILL_STATS];
  cr_expect_eq(fh_distill_shard_stats(ctx, &d, &ok, &hs, &ht, NULL, st), FH_SUCCESS, "%s", fh_last_error());
  cr_expect_eq(fh_distill_shard_stats(ctx, &d, &ok, &hs, NULL, NULL, st), FH_ERR_INVALID_ARGUMENT);
  cr_expect_eq(fh_distill_shard_stats(ctx, &d, &wrong_rows, &hs, &ht, NULL, st), FH_ERR_INVALID_ARGUMENT);
  cr_expect_eq(fh_distill_shard_divergence(ctx, &d, &ok, &hs, &ht, NULL, 0, st, st), FH_ERR_INVALID_ARGUMENT);
  /* decoding: K >= 1, rank is not available */
  fh_decode_options_t dec;
  fh_decode_options_init(&dec);
  double dp[2 * FH_SHARD_DECODE_WIDTH(2)];
  cr_expect_eq(fh_decode_shard_candidates(ctx, &dec, &ok, &tE, &tC, NULL, 0, dp), FH_ERR_INVALID_ARGUMENT);
  cr_expect_eq(fh_decode_shard_candidates(ctx, &dec, &ok, &tE, &tC, NULL, 2, dp), FH_SUCCESS, "%s", fh_last_error());
  int64_t tok[2], rk[2];
  fh_decode_outputs_t dout = {tok, NULL, NULL, rk, NULL, NULL, NULL, NULL, NULL, NULL};
  cr_expect_eq(fh_decode_shard_combine(ctx, &dec, 2, 5, 1, 2, dp, &dout), FH_ERR_UNSUPPORTED);
  cr_expect(strstr(fh_last_error(), "rank") != NULL, "%s", fh_last_error());
  dout.rank = NULL;
  cr_expect_eq(fh_decode_shard_combine(ctx, &dec, 2, 5, 1, 2, dp, &dout), FH_SUCCESS, "%s", fh_last_error());
  fh_context_destroy(ctx);
  if (fh_backend_available(FH_BACKEND_CUDA)) {
    fh_context_t* g = NULL;
    if (fh_context_create(&g, FH_BACKEND_CUDA, 0) == FH_SUCCESS) {
      cr_expect_eq(fh_linear_ce_shard_combine(g, &o, FH_DTYPE_F32, 2, 5, 1, part, y, NULL, NULL, &out),
                   FH_ERR_UNSUPPORTED);
      fh_context_destroy(g);
    }
  }
}
