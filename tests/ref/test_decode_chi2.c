/* Chi-square goodness of fit of sampled tokens against the sampling distribution, for every
 * sampler, through the public fh_decode_from_logits path: one fixed row of V = 50 logits
 * repeated over B = 100000 rows, each row with its own offset (deterministic seed), so one call
 * draws 100k samples. The expected distribution q is the fp64 core's (its sets are pinned by
 * the hand tests; here the sampling path is under test). Draws outside A must be 0. Cells with
 * expected count < 5 are pooled; the critical value is tu_chi2_crit's (p = 1e-6): the seeds are
 * fixed, so this is a deterministic check whose threshold a correct sampler passes with a wide
 * margin and a wrong one (a missing Gumbel sign, a wrong set, q ∝ p for α-Bregman) fails by
 * orders of magnitude. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ref/decode_ref.h"
#include "test_util.h"

#define V 50
#define NDRAW 100000

/* A row with spread (values <= 1.75 except the five set below: 4, 3, 2.5, 2, 2, so the 4th
 * value is a tie) and a banned-like −inf. */
static void make_row(float* z) {
  tu_rng_t r = {99};
  for (int v = 0; v < V; ++v) z[v] = (float)fmin(tu_quantize(1.5 * tu_normal(&r), 8), 1.75);
  z[7] = 4.0f; /* the max */
  z[11] = 3.0f;
  z[20] = 2.5f;
  z[3] = 2.0f;
  z[30] = 2.0f; /* a tie at the 4th/5th value */
  z[40] = -INFINITY;
}

static void check_sampler(const char* name, const fh_decode_options_t* base, int64_t want_count) {
  float* row = (float*)malloc(V * sizeof(float));
  float* logits = (float*)malloc((size_t)NDRAW * V * sizeof(float));
  uint64_t* offs = (uint64_t*)malloc(NDRAW * sizeof(uint64_t));
  int64_t* tok = (int64_t*)malloc(NDRAW * sizeof(int64_t));
  cr_assert(row && logits && offs && tok);
  make_row(row);
  for (int64_t b = 0; b < NDRAW; ++b) {
    memcpy(logits + b * V, row, V * sizeof(float));
    offs[b] = (uint64_t)b;
  }
  fh_decode_options_t o = *base;
  o.seed = 0x5eed0000ull + (uint64_t)strlen(name);
  o.offset_per_row = offs;
  fh_context_t* ctx;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  fh_tensor_t t = fh_tensor_2d(logits, FH_DTYPE_F32, NDRAW, V);
  fh_decode_outputs_t out;
  memset(&out, 0, sizeof out);
  out.tokens = tok;
  cr_assert_eq(fh_decode_from_logits(ctx, &o, &t, &out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  /* expected q from the core */
  double z[V];
  for (int v = 0; v < V; ++v) z[v] = row[v];
  fh_decode_row_params_t prm;
  fh_ref_decode_row_params(&o, 0, &prm);
  fh_decode_scratch_t w;
  cr_assert(fh_ref_decode_scratch_init(&w, V));
  fh_decode_row_result_t r;
  fh_ref_decode_row(z, V, &prm, -1, &w, &r);
  long cnt[V] = {0};
  long outside = 0;
  for (int64_t b = 0; b < NDRAW; ++b) {
    cr_assert(tok[b] >= 0 && tok[b] < V);
    cnt[tok[b]]++;
    outside += !w.allowed[tok[b]];
  }
  double expect[V];
  for (int v = 0; v < V; ++v) expect[v] = w.allowed[v] ? NDRAW * exp(w.logq[v]) : 0.0;
  int cells = 0;
  const double chi2 = tu_chi2_pooled(cnt, expect, V, &cells);
  const double df = cells > 1 ? cells - 1 : 1, crit = tu_chi2_crit(df);
  printf("chi2 %s: |A| = %lld, cells %d, chi2 = %.2f, critical(p=1e-6, df=%g) = %.2f, outside A = %ld\n", name,
         (long long)r.allowed_count, cells, chi2, df, crit, outside);
  fflush(stdout);
  if (want_count > 0) cr_expect_eq(r.allowed_count, want_count, "%s: |A|", name);
  cr_expect_eq(outside, 0, "%s: %ld draws outside the allowed set", name, outside);
  if (r.allowed_count > 1) cr_expect(chi2 < crit, "%s: chi2 %.2f >= %.2f", name, chi2, crit);
  else cr_expect_eq(cnt[r.token], NDRAW);
  fh_ref_decode_scratch_free(&w);
  fh_context_destroy(ctx);
  free(row);
  free(logits);
  free(offs);
  free(tok);
}

static fh_decode_options_t opts(fh_decode_sampler_t s) {
  fh_decode_options_t o;
  fh_decode_options_init(&o);
  o.sampler = s;
  return o;
}

Test(ref_decode_chi2, temperature, .timeout = 120) {
  fh_decode_options_t o = opts(FH_DECODE_STANDARD);
  o.temperature = 1.7f;
  check_sampler("temperature", &o, -1);
}
Test(ref_decode_chi2, min_p, .timeout = 120) {
  fh_decode_options_t o = opts(FH_DECODE_STANDARD);
  o.min_p = 0.05f;
  check_sampler("min_p", &o, -1);
}
Test(ref_decode_chi2, top_k_tie, .timeout = 120) {
  fh_decode_options_t o = opts(FH_DECODE_STANDARD);
  o.top_k = 4; /* the 4th value is tied: 5 tokens */
  check_sampler("top_k_tie", &o, 5);
}
Test(ref_decode_chi2, top_p, .timeout = 120) {
  fh_decode_options_t o = opts(FH_DECODE_STANDARD);
  o.top_p = 0.9f;
  o.temperature = 0.8f;
  check_sampler("top_p", &o, -1);
}
Test(ref_decode_chi2, chain, .timeout = 120) {
  fh_decode_options_t o = opts(FH_DECODE_STANDARD);
  o.temperature = 1.3f;
  o.min_p = 0.02f;
  o.top_k = 12;
  o.top_p = 0.8f;
  check_sampler("chain", &o, -1);
}
Test(ref_decode_chi2, top_n_sigma, .timeout = 120) {
  fh_decode_options_t o = opts(FH_DECODE_TOP_N_SIGMA);
  o.top_n_sigma = 1.2f;
  check_sampler("top_n_sigma", &o, -1);
}
Test(ref_decode_chi2, epsilon, .timeout = 120) {
  fh_decode_options_t o = opts(FH_DECODE_EPSILON);
  o.epsilon = 0.01f;
  check_sampler("epsilon", &o, -1);
}
Test(ref_decode_chi2, eta, .timeout = 120) {
  fh_decode_options_t o = opts(FH_DECODE_ETA);
  o.epsilon = 0.004f;
  o.temperature = 1.5f;
  check_sampler("eta", &o, -1);
}
Test(ref_decode_chi2, top_h, .timeout = 120) {
  fh_decode_options_t o = opts(FH_DECODE_TOP_H);
  o.temperature = 1.5f;
  o.top_h_alpha = 0.6f;
  check_sampler("top_h", &o, -1);
}
Test(ref_decode_chi2, bregman_kl, .timeout = 120) {
  fh_decode_options_t o = opts(FH_DECODE_BREGMAN);
  o.temperature = 2.0f;
  o.bregman_lambda = 0.05f;
  check_sampler("bregman_kl", &o, -1);
}
Test(ref_decode_chi2, bregman_alpha, .timeout = 120) {
  fh_decode_options_t o = opts(FH_DECODE_BREGMAN);
  o.temperature = 2.0f;
  o.bregman_lambda = 0.05f;
  o.bregman_alpha = 0.5f;
  check_sampler("bregman_alpha", &o, -1);
}
Test(ref_decode_chi2, p_less, .timeout = 120) {
  fh_decode_options_t o = opts(FH_DECODE_P_LESS);
  o.temperature = 2.5f; /* flat enough for several tokens to pass p >= sum p^2 */
  check_sampler("p_less", &o, -1);
}
Test(ref_decode_chi2, chain_joint, .timeout = 120) {
  fh_decode_options_t o = opts(FH_DECODE_STANDARD);
  o.top_k_top_p_order = FH_DECODE_TOP_K_TOP_P_JOINT;
  o.temperature = 1.3f;
  o.min_p = 0.02f;
  o.top_k = 12;
  o.top_p = 0.8f;
  check_sampler("chain_joint", &o, -1);
}
