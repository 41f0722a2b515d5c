/* kernel_linear_ce_masked: classes masked by a -inf bias on the CUDA backend (docs/conventions.md:
 * p = 0, left out of every sum, label smoothing over the row's unmasked classes, gradient exactly
 * 0; a masked target gives +inf).
 *
 * Problem A has every class j with j % 5 == 3 masked through the bias; problem B is A without
 * those classes. The CUDA results on A are compared with the fp64 reference on A (which follows
 * the rule) under the tolerance rule of docs/testing.md, with the CUDA results on B as the fp32
 * yardstick (the same math computed without the masked classes). dC and dbias rows of masked
 * classes must be exactly 0, and a row whose target is masked must have loss +inf. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "test_linear_ce_common.h"

static int masked_class(int64_t j) { return j % 5 == 3; }

typedef struct mcase {
  const char* name;
  float smooth, entropy, zloss, softcap;
  int class_weights;
} mcase_t;

/* via_c: the masked classes get their -inf from C (C_j0 = -inf with E_i0 > 0 in every row, so
 * r_ij = -inf) instead of from the bias; the gradient GEMMs must not form 0·∞ with those rows. */
static void setup_pair(lk_problem_t* A, lk_problem_t* B, int64_t N, int64_t V, int64_t D, fh_dtype_t dt,
                       const mcase_t* mc, int64_t* map, int via_c) {
  lk_spec_t s = lk_default(N, V, D, dt);
  s.class_weights = mc->class_weights;
  s.every_ignored = 0;
  lk_init(A, &s);
  int64_t Vb = 0;
  for (int64_t j = 0; j < V; ++j) map[j] = masked_class(j) ? -1 : Vb++;
  lk_spec_t sb = s;
  sb.V = Vb;
  lk_init(B, &sb);
  const size_t es = fh_dtype_size(dt);
  if (via_c)
    for (int64_t i = 0; i < N; ++i) fh_store(A->E, dt, i * D, fabs(fh_load(A->E, dt, i * D)) + 0.25);
  memcpy(B->E, A->E, (size_t)(N * D) * es);
  for (int64_t j = 0; j < V; ++j) {
    if (map[j] < 0) {
      if (via_c) fh_store(A->C, dt, j * D, -INFINITY);
      else fh_store(A->bias, dt, j, -INFINITY);
      continue;
    }
    memcpy((char*)B->C + (size_t)(map[j] * D) * es, (const char*)A->C + (size_t)(j * D) * es, (size_t)D * es);
    fh_store(B->bias, dt, map[j], fh_load(A->bias, dt, j));
    if (mc->class_weights) B->f.cw[map[j]] = A->f.cw[j];
  }
  for (int64_t i = 0; i < N; ++i) {
    if (masked_class(A->f.targets[i])) A->f.targets[i] += 1; /* targets stay unmasked here */
    B->f.targets[i] = map[A->f.targets[i]];
  }
  for (int q = 0; q < 2; ++q) {
    fh_linear_ce_options_t* o = q ? &B->f.opt : &A->f.opt;
    o->reduction = FH_REDUCTION_NONE;
    o->label_smoothing = mc->smooth, o->entropy_weight = mc->entropy, o->z_loss_scale = mc->zloss;
    o->softcap = mc->softcap;
    o->accum_mode = FH_ACCUM_DETERMINISTIC;
    o->filter_eps = 0.0f;
  }
}

Test(kernel_linear_ce_masked, bias_masked_classes_against_the_vocabulary_without_them, .timeout = 900) {
  static const mcase_t cases[] = {{"plain", 0, 0, 0, 0, 0},
                                  {"smoothing+weights", 0.1f, 0, 0, 0, 1},
                                  {"entropy+zloss", 0, 0.05f, 1e-3f, 0, 0},
                                  {"softcap+smoothing", 0.2f, 0, 0, 30.0f, 0}};
  /* fp32 masks through the bias only: fp32 reaches the tensor cores as three bf16 pieces, and a
   * piece product 0·∞ makes an infinity inside E or C a NaN logit (docs/conventions.md). */
  static const fh_dtype_t dts[4] = {FH_DTYPE_BF16, FH_DTYPE_F32, FH_DTYPE_F16, FH_DTYPE_BF16};
  static const int via_cs[4] = {0, 0, 1, 1};
  const int64_t N = 70, V = 300, D = 40;
  int64_t map[300];
  for (int d = 0; d < 4; ++d)
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; ++c) {
      lk_problem_t A, B;
      setup_pair(&A, &B, N, V, D, dts[d], &cases[c], map, via_cs[d]);
      fh_context_t* ctx = NULL;
      cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CUDA, 0), FH_SUCCESS);
      lk_fwd_t ka, kb, ra;
      lk_fwd_alloc(&ka, N), lk_fwd_alloc(&kb, N), lk_fwd_alloc(&ra, N);
      float *la = malloc(sizeof(float) * N), *ea = malloc(sizeof(float) * N);
      float *lb = malloc(sizeof(float) * N), *eb = malloc(sizeof(float) * N);
      cr_assert_eq(lk_run_forward(ctx, &A, &ka, la, ea), FH_SUCCESS);
      cr_assert_eq(lk_run_forward(ctx, &B, &kb, lb, eb), FH_SUCCESS);
      lk_ref_forward(&A, &ra);
      char nm[128];
      const double terms = (double)(D + V);
      snprintf(nm, sizeof nm, "masked%s/%s/%s lse", via_cs[d] ? "-in-C" : "", cases[c].name, fh_dtype_name(dts[d]));
      cr_expect(lk_compare(nm, ka.lse, ra.lse, kb.lse, N, 2.0, terms, NULL), "%s", nm);
      snprintf(nm, sizeof nm, "masked%s/%s/%s entropy", via_cs[d] ? "-in-C" : "", cases[c].name, fh_dtype_name(dts[d]));
      cr_expect(lk_compare(nm, ka.entropy, ra.entropy, kb.entropy, N, 2.0, terms, NULL), "%s", nm);
      snprintf(nm, sizeof nm, "masked%s/%s/%s loss", via_cs[d] ? "-in-C" : "", cases[c].name, fh_dtype_name(dts[d]));
      cr_expect(lk_compare(nm, ka.loss_rows, ra.loss_rows, kb.loss_rows, N, 2.0, terms, NULL), "%s", nm);

      lk_bwd_in_t ia, ib;
      lk_bwd_in_make(&ia, &A, 1, 9), lk_bwd_in_make(&ib, &B, 1, 9); /* same seed and N: same values */
      lk_grads_t ga, gb, gr;
      lk_grads_alloc(&ga, &A), lk_grads_alloc(&gb, &B), lk_grads_alloc(&gr, &A);
      cr_assert_eq(lk_run_backward(ctx, &A, &ia, la, ea, 7, NULL, &ga), FH_SUCCESS);
      cr_assert_eq(lk_run_backward(ctx, &B, &ib, lb, eb, 7, NULL, &gb), FH_SUCCESS);
      lk_ref_backward(&A, &ia, &ra, &gr);
      /* B's gradients in A's layout: masked classes' rows are 0 */
      double* dCb = calloc((size_t)(V * D), sizeof(double));
      double* dbb = calloc((size_t)V, sizeof(double));
      int zero_ok = 1;
      for (int64_t j = 0; j < V; ++j) {
        if (map[j] < 0) {
          for (int64_t k = 0; k < D; ++k) zero_ok &= ga.dC[j * D + k] == 0.0;
          zero_ok &= ga.db[j] == 0.0;
          continue;
        }
        memcpy(dCb + j * D, gb.dC + map[j] * D, sizeof(double) * (size_t)D);
        dbb[j] = gb.db[map[j]];
      }
      cr_expect(zero_ok, "masked%s/%s/%s: a masked class got a nonzero dC or dbias", via_cs[d] ? "-in-C" : "",
                cases[c].name, fh_dtype_name(dts[d]));
      snprintf(nm, sizeof nm, "masked%s/%s/%s dE", via_cs[d] ? "-in-C" : "", cases[c].name, fh_dtype_name(dts[d]));
      cr_expect(lk_compare(nm, ga.dE, gr.dE, gb.dE, N * D, 2.0, terms, NULL), "%s", nm);
      snprintf(nm, sizeof nm, "masked%s/%s/%s dC", via_cs[d] ? "-in-C" : "", cases[c].name, fh_dtype_name(dts[d]));
      cr_expect(lk_compare(nm, ga.dC, gr.dC, dCb, V * D, 2.0, terms, NULL), "%s", nm);
      snprintf(nm, sizeof nm, "masked%s/%s/%s dbias", via_cs[d] ? "-in-C" : "", cases[c].name, fh_dtype_name(dts[d]));
      cr_expect(lk_compare(nm, ga.db, gr.db, dbb, V, 2.0, terms, NULL), "%s", nm);
      free(dCb), free(dbb);
      lk_grads_free(&ga), lk_grads_free(&gb), lk_grads_free(&gr);
      lk_bwd_in_free(&ia), lk_bwd_in_free(&ib);
      free(la), free(ea), free(lb), free(eb);
      lk_fwd_free(&ka), lk_fwd_free(&kb), lk_fwd_free(&ra);
      fh_context_destroy(ctx);
      lk_free(&A), lk_free(&B);
    }
}

/* A masked target gives loss +inf (as PyTorch) and the row's other outputs stay finite; every
 * class masked gives lse -inf, entropy 0, loss +inf. */
Test(kernel_linear_ce_masked, masked_target_and_fully_masked_row) {
  const int64_t N = 3, V = 140, D = 16;
  lk_spec_t s = lk_default(N, V, D, FH_DTYPE_BF16);
  s.every_ignored = 0;
  lk_problem_t P;
  lk_init(&P, &s);
  P.f.opt.reduction = FH_REDUCTION_NONE;
  fh_store(P.bias, FH_DTYPE_BF16, P.f.targets[0], -INFINITY);
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CUDA, 0), FH_SUCCESS);
  lk_fwd_t k, r;
  lk_fwd_alloc(&k, N), lk_fwd_alloc(&r, N);
  cr_assert_eq(lk_run_forward(ctx, &P, &k, NULL, NULL), FH_SUCCESS);
  lk_ref_forward(&P, &r);
  cr_expect(isinf(k.loss_rows[0]) && k.loss_rows[0] > 0, "masked target: loss %g, want +inf", k.loss_rows[0]);
  cr_expect(isinf(r.loss_rows[0]) && r.loss_rows[0] > 0, "reference: masked target loss %g", r.loss_rows[0]);
  cr_expect(isfinite(k.lse[0]) && isfinite(k.entropy[0]), "masked target: lse/entropy must stay finite");
  for (int64_t j = 0; j < V; ++j) fh_store(P.bias, FH_DTYPE_BF16, j, -INFINITY);
  cr_assert_eq(lk_run_forward(ctx, &P, &k, NULL, NULL), FH_SUCCESS);
  lk_ref_forward(&P, &r);
  for (int64_t i = 0; i < N; ++i) {
    cr_expect(k.lse[i] == -INFINITY && r.lse[i] == -INFINITY, "row %lld: lse %g (ref %g), want -inf", (long long)i,
              k.lse[i], r.lse[i]);
    cr_expect(k.entropy[i] == 0.0, "row %lld: entropy %g, want 0", (long long)i, k.entropy[i]);
    cr_expect(isinf(k.loss_rows[i]) && k.loss_rows[i] > 0, "row %lld: loss %g, want +inf", (long long)i,
              k.loss_rows[i]);
  }
  lk_fwd_free(&k), lk_fwd_free(&r);
  fh_context_destroy(ctx);
  lk_free(&P);
}
