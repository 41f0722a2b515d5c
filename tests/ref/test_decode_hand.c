/* Hand-built rows with known answers for every truncation rule of the fp64 decoding core
 * (fh_ref_decode_row), including ties at the k-th value, equality at thresholds, k = 1, k = V,
 * p = 1, T = 0 and T -> 0, and the degenerate rows. Rows are fp64 so that exact boundary cases
 * (s == m + ln min_p) are expressible. Expected sets are strings, one char per id ('1' = in A),
 * derived by hand in the comment above each case. p4 = (.5, .3, .15, .05) has entropy
 * h = 1.1421 nats and terms −p ln p = (.34657, .36119, .28457, .14979). */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "ref/decode_ref.h"

#define TOL 1e-12

static fh_decode_row_params_t defaults(fh_decode_sampler_t sampler) {
  fh_decode_options_t o;
  fh_decode_options_init(&o);
  o.sampler = sampler;
  fh_decode_row_params_t p;
  fh_ref_decode_row_params(&o, 0, &p);
  return p;
}

/* Decode z; compare the allowed set with `want` (NULL: no check); check the token is in A and
 * log q sums to 0 over A. */
static fh_decode_row_result_t run_q(const double* z, int64_t V, const fh_decode_row_params_t* p, const char* want,
                                    double* logq_out) {
  fh_decode_scratch_t w;
  cr_assert(fh_ref_decode_scratch_init(&w, V));
  fh_decode_row_result_t r;
  fh_ref_decode_row(z, V, p, -1, &w, &r);
  char got[64];
  int64_t ones = 0;
  double mass = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    got[v] = w.allowed[v] ? '1' : '0';
    ones += w.allowed[v];
    if (w.allowed[v]) mass += exp(w.logq[v]);
    if (logq_out) logq_out[v] = w.logq[v];
  }
  got[V] = '\0';
  if (want) cr_expect_str_eq(got, want, "allowed set");
  cr_expect_eq(r.allowed_count, ones);
  cr_expect(r.token >= 0 && r.token < V && w.allowed[r.token], "token %lld must be in A", (long long)r.token);
  cr_expect(fabs(mass - 1.0) < TOL, "sum q = %.17g", mass);
  fh_ref_decode_scratch_free(&w);
  return r;
}
static fh_decode_row_result_t run(const double* z, int64_t V, const fh_decode_row_params_t* p, const char* want) {
  return run_q(z, V, p, want, NULL);
}

static void logs(const double* p, int64_t n, double* z) {
  for (int64_t i = 0; i < n; ++i) z[i] = log(p[i]);
}
static const double P4[4] = {0.5, 0.3, 0.15, 0.05};

/* ---- greedy ---- */

/* Ties at the max go to the lowest id; A = {argmax}; logprob 0; the stats are those of T = 1. */
Test(ref_decode_hand, greedy_ties_lowest_id) {
  const double z[5] = {1, 3, 3, -INFINITY, 2};
  fh_decode_row_params_t p = defaults(FH_DECODE_STANDARD);
  p.temperature = 0.0;
  fh_decode_row_result_t r = run(z, 5, &p, "01000");
  cr_expect_eq(r.token, 1);
  cr_expect_eq(r.flags, FH_DECODE_FLAG_GREEDY);
  cr_expect_eq(r.logprob, 0.0);
  cr_expect_eq(r.rank, 1);
  const double Z = exp(1) + 2 * exp(3) + exp(2), lse = log(Z);
  cr_expect(fabs(r.lse - lse) < TOL);
  cr_expect(fabs(r.full_logprob - (3 - lse)) < TOL);
  const double h = -(exp(1 - lse) * (1 - lse) + 2 * exp(3 - lse) * (3 - lse) + exp(2 - lse) * (2 - lse));
  cr_expect(fabs(r.entropy - h) < TOL, "entropy %.17g want %.17g", r.entropy, h);
}

/* T -> 0: with logits 0.01 apart, T = 1e-6 puts mass exp(-1e4) = 0 off the argmax: every seed
 * gives the argmax, while T = 0 is flagged greedy and T = 1e-6 is not. */
Test(ref_decode_hand, temperature_to_zero) {
  const double z[4] = {0.5, 0.51, 0.49, 0.3};
  fh_decode_row_params_t p = defaults(FH_DECODE_STANDARD);
  p.temperature = 1e-6;
  for (uint64_t seed = 0; seed < 200; ++seed) {
    p.seed = seed;
    fh_decode_row_result_t r = run(z, 4, &p, NULL);
    cr_assert_eq(r.token, 1);
    cr_assert_eq(r.flags, 0u);
  }
}

/* ---- top-k ---- */

/* z = (5, 4, 4, 3, 1): k = 2 has a tie at the 2nd value, so both 4s stay (tie-inclusive):
 * {0, 1, 2}; k = 1 -> {0}; k = 3 -> {0, 1, 2}; k = 4 -> 4 tokens; k = V and k = 0 are off. */
Test(ref_decode_hand, top_k_ties_at_kth) {
  const double z[5] = {5, 4, 4, 3, 1};
  fh_decode_row_params_t p = defaults(FH_DECODE_STANDARD);
  p.top_k = 1;
  run(z, 5, &p, "10000");
  p.top_k = 2;
  run(z, 5, &p, "11100");
  p.top_k = 3;
  run(z, 5, &p, "11100");
  p.top_k = 4;
  run(z, 5, &p, "11110");
  p.top_k = 5;
  run(z, 5, &p, "11111");
  p.top_k = 0;
  run(z, 5, &p, "11111");
  p.top_k = -1;
  run(z, 5, &p, "11111");
  p.top_k = 1000;
  run(z, 5, &p, "11111");
}

/* Logprob of the sampled token under the renormalised top-k distribution, rank, full logprob. */
Test(ref_decode_hand, top_k_logprobs) {
  const double z[5] = {5, 4, 4, 3, 1};
  fh_decode_row_params_t p = defaults(FH_DECODE_STANDARD);
  p.top_k = 2;
  const double ZA = exp(5) + 2 * exp(4), Z = ZA + exp(3) + exp(1);
  for (uint64_t seed = 0; seed < 20; ++seed) {
    p.seed = seed;
    fh_decode_row_result_t r = run(z, 5, &p, "11100");
    cr_expect(fabs(r.logprob - (z[r.token] - log(ZA))) < TOL);
    cr_expect(fabs(r.full_logprob - (z[r.token] - log(Z))) < TOL);
    cr_expect_eq(r.rank, r.token == 0 ? 1 : 2);
  }
}

/* ---- top-p ---- */

/* REFERENCE §4.2: p = (.30, .25, .24, .11, .10), k = 3, P = .35: top_k_first renormalises
 * {0, 1, 2} to (.380, .316, .304) and keeps {0}; without top-k, P = .35 keeps {0, 1} (mass above
 * id 1 is .30 < .35, above id 2 is .55); P = 1 is off; tiny P keeps {argmax}. */
Test(ref_decode_hand, top_p_sequential_after_top_k) {
  const double pr[5] = {0.30, 0.25, 0.24, 0.11, 0.10};
  double z[5];
  logs(pr, 5, z);
  fh_decode_row_params_t p = defaults(FH_DECODE_STANDARD);
  p.top_k = 3;
  p.top_p = 0.35;
  run(z, 5, &p, "10000");
  p.top_k = 0;
  run(z, 5, &p, "11000");
  p.top_p = 1.0;
  run(z, 5, &p, "11111");
  p.top_p = 1e-9;
  run(z, 5, &p, "10000");
  /* .30 + .25 + .24 = .79 < .8: the 4th token is kept at P = .8, not at P = .79 (mass above must
   * be strictly below P). */
  p.top_p = 0.8;
  run(z, 5, &p, "11110");
}

/* Ties in top-p are all in or all out: z = (2, 1, 1, 0). Mass above the tie group is p_0; any
 * P just above p_0 keeps both tied tokens. */
Test(ref_decode_hand, top_p_ties) {
  const double z[4] = {2, 1, 1, 0};
  const double Z = exp(2) + 2 * exp(1) + 1, p0 = exp(2) / Z;
  fh_decode_row_params_t p = defaults(FH_DECODE_STANDARD);
  p.top_p = p0 * 1.0001;
  run(z, 4, &p, "1110");
  p.top_p = p0 * 0.9999;
  run(z, 4, &p, "1000");
}

/* ---- min-p ---- */

/* Equality is kept: z = (0, ln .5, ln .25) with min_p = .5 keeps {0, 1}; min_p = 1 keeps the
 * maximal tie class; min_p = 0 is off. Then min-p before top-k: min_p = .3 and k = 1. */
Test(ref_decode_hand, min_p_equality_and_ties) {
  const double z[3] = {0, log(0.5), log(0.25)};
  fh_decode_row_params_t p = defaults(FH_DECODE_STANDARD);
  p.min_p = 0.5;
  run(z, 3, &p, "110");
  p.min_p = 0.0;
  run(z, 3, &p, "111");
  const double t[4] = {1, 1, 0, 1};
  p.min_p = 1.0;
  run(t, 4, &p, "1101");
  p.min_p = 0.3;
  p.top_k = 1;
  run(z, 3, &p, "100");
}

/* The full chain on p = (.30, .25, .24, .11, .10): min_p = .4 drops ids 3, 4 (p < .12), top-k = 2
 * keeps {0, 1}, top-p = .5 on the renormalised (.545, .455) keeps {0}; with top-p = .6, {0, 1}. */
Test(ref_decode_hand, chain_min_p_top_k_top_p) {
  const double pr[5] = {0.30, 0.25, 0.24, 0.11, 0.10};
  double z[5];
  logs(pr, 5, z);
  fh_decode_row_params_t p = defaults(FH_DECODE_STANDARD);
  p.min_p = 0.4;
  run(z, 5, &p, "11100");
  p.top_k = 2;
  run(z, 5, &p, "11000");
  p.top_p = 0.5;
  run(z, 5, &p, "10000");
  p.top_p = 0.6;
  run(z, 5, &p, "11000");
}

/* ---- joint top-k / top-p ---- */

/* REFERENCE §4.2's example, joint: p = (.30, .25, .24, .11, .10), k = 3, P = .35. Both tests on
 * the original p: id 1 has 1 token and mass .30 < .35 above it (kept), id 2 has mass .55 (out):
 * {0, 1}, where the sequential rule keeps {0}. With P = .8 top-k binds (top-p alone keeps 4):
 * {0, 1, 2}; k = 0 (off) leaves top-p alone, as sequential. */
Test(ref_decode_hand, top_k_top_p_joint) {
  const double pr[5] = {0.30, 0.25, 0.24, 0.11, 0.10};
  double z[5];
  logs(pr, 5, z);
  fh_decode_row_params_t p = defaults(FH_DECODE_STANDARD);
  p.top_k = 3;
  p.top_p = 0.35;
  p.joint = 1;
  run(z, 5, &p, "11000");
  p.top_p = 0.8;
  run(z, 5, &p, "11100");
  p.top_k = 0;
  p.top_p = 0.35;
  run(z, 5, &p, "11000");
  p.top_p = 1.0; /* top-p off: top-k alone */
  p.top_k = 2;
  run(z, 5, &p, "11000");
}

/* Joint after min-p: min_p = .4 drops ids 3, 4; the survivors renormalised are (.3797, .3165,
 * .3038). k = 2, P = .5: mass above id 1 is .3797 < .5, above id 2 is .6962: top-p keeps
 * {0, 1}, top-k keeps {0, 1}: {0, 1} (sequential renormalises over {0, 1} to (.545, .455) and
 * keeps {0}). P = .3 keeps {0} either way; ties stay whole: z = (2, 1, 1, 0), k = 2 and P just
 * above p_0 keep {0, 1, 2}. */
Test(ref_decode_hand, top_k_top_p_joint_after_min_p) {
  const double pr[5] = {0.30, 0.25, 0.24, 0.11, 0.10};
  double z[5];
  logs(pr, 5, z);
  fh_decode_row_params_t p = defaults(FH_DECODE_STANDARD);
  p.min_p = 0.4;
  p.top_k = 2;
  p.top_p = 0.5;
  p.joint = 0;
  run(z, 5, &p, "10000");
  p.joint = 1;
  run(z, 5, &p, "11000");
  p.top_p = 0.3;
  run(z, 5, &p, "10000");
  const double t[4] = {2, 1, 1, 0};
  const double p0 = exp(2) / (exp(2) + 2 * exp(1) + 1);
  fh_decode_row_params_t q = defaults(FH_DECODE_STANDARD);
  q.joint = 1;
  q.top_k = 2;
  q.top_p = p0 * 1.0001;
  run(t, 4, &q, "1110");
  q.top_p = p0 * 0.9999;
  run(t, 4, &q, "1000");
}

/* ---- p-less ---- */

/* Known answers of keep p_v ≥ Σ p²: p4 = (.5, .3, .15, .05) has Σ p² = .365: {0}.
 * (.35, .35, .2, .1): Σ p² = .295: the tied pair {0, 1}. T = 2 on p4 gives p ∝ √p4 =
 * (.3790, .2936, .2076, .1198), Σ p² = .2873: {0, 1}; T = .5 sharpens: {0}. A uniform row keeps
 * every finite id (p = Σ p², equality kept) and never a −inf one. */
Test(ref_decode_hand, p_less_known_answers) {
  double z[4];
  logs(P4, 4, z);
  fh_decode_row_params_t p = defaults(FH_DECODE_P_LESS);
  run(z, 4, &p, "1000");
  p.temperature = 2.0;
  fh_decode_row_result_t r = run(z, 4, &p, "1100");
  cr_expect_eq(r.flags, 0u);
  p.temperature = 0.5;
  run(z, 4, &p, "1000");
  const double pr[4] = {0.35, 0.35, 0.2, 0.1};
  logs(pr, 4, z);
  p.temperature = 1.0;
  run(z, 4, &p, "1100");
  const double u[5] = {0.5, 0.5, -INFINITY, 0.5, 0.5};
  r = run(u, 5, &p, "11011");
  cr_expect_eq(r.flags, 0u);
}

/* On random rows the set is {v : p_v ≥ Σ p²} with Σ p² summed directly in fp64 (rows where some
 * p_v lies within 1e-12 relative of the threshold are skipped: the two computations differ by
 * rounding there), the argmax is always in, and the logprob is log of p renormalised on A. */
Test(ref_decode_hand, p_less_matches_direct_sum) {
  enum { NV = 40 };
  double z[NV], lq[NV];
  uint64_t x = 12345;
  int checked = 0;
  for (int trial = 0; trial < 200; ++trial) {
    for (int v = 0; v < NV; ++v) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      z[v] = (double)(x >> 11) * 0x1p-53 * (1.0 + trial % 7) * 2.0;
    }
    if (trial % 5 == 0) z[trial % NV] = -INFINITY;
    double mx = -INFINITY, Z = 0.0, S2 = 0.0;
    for (int v = 0; v < NV; ++v) mx = fmax(mx, z[v]);
    for (int v = 0; v < NV; ++v) Z += exp(z[v] - mx);
    for (int v = 0; v < NV; ++v) S2 += exp(z[v] - mx) / Z * (exp(z[v] - mx) / Z);
    char want[NV + 1];
    int near = 0;
    for (int v = 0; v < NV; ++v) {
      const double pv = exp(z[v] - mx) / Z;
      want[v] = pv >= S2 ? '1' : '0';
      near |= fabs(pv - S2) <= 1e-12 * S2;
    }
    want[NV] = '\0';
    if (near) continue;
    fh_decode_row_params_t p = defaults(FH_DECODE_P_LESS);
    p.seed = (uint64_t)trial;
    run_q(z, NV, &p, want, lq);
    ++checked;
  }
  cr_expect(checked > 190, "only %d rows checked", checked);
}

/* ---- top-nσ ---- */

/* z = (4, 2, 0, -2, -inf): finite mean 1, population variance (9+1+1+9)/4 = 5, σ = √5 = 2.236.
 * n = 1: threshold 1.764 -> {0, 1}; n = 2: -0.472 -> {0, 1, 2}; n = 3: -2.708 -> all finite;
 * n = 0: off. n = 1.6 separates population from sample std (√(20/3) = 2.582): population gives
 * 0.422 -> {0, 1}, sample would give -0.131 -> {0, 1, 2}. */
Test(ref_decode_hand, top_n_sigma_population) {
  const double z[5] = {4, 2, 0, -2, -INFINITY};
  fh_decode_row_params_t p = defaults(FH_DECODE_TOP_N_SIGMA);
  p.top_n_sigma = 1.0;
  run(z, 5, &p, "11000");
  p.top_n_sigma = 1.6;
  run(z, 5, &p, "11000");
  p.top_n_sigma = 2.0;
  run(z, 5, &p, "11100");
  p.top_n_sigma = 3.0;
  run(z, 5, &p, "11110");
  p.top_n_sigma = 0.0;
  run(z, 5, &p, "11110");
  /* Temperature does not change the set (evaluated on z). */
  p.top_n_sigma = 1.6;
  p.temperature = 7.5;
  run(z, 5, &p, "11000");
}

/* ---- ε and η ---- */

/* p4, ε = .16: keeps p ≥ .16 -> {0, 1}; ε = .15 keeps equality -> {0,1,2} (p = .15 exactly as
 * exp(ln .15 − ln 1) up to rounding: use ε slightly below); ε = .6 keeps nothing -> {argmax}
 * with the fallback flag. η at ε = .16: √.16·e^{−h} = .4·.3191 = .1276 < .16, so η = .1276 and
 * {0, 1, 2} is kept. */
Test(ref_decode_hand, epsilon_and_eta) {
  double z[4];
  logs(P4, 4, z);
  fh_decode_row_params_t p = defaults(FH_DECODE_EPSILON);
  p.epsilon = 0.16;
  fh_decode_row_result_t r = run(z, 4, &p, "1100");
  cr_expect_eq(r.flags, 0u);
  p.epsilon = 0.1499999;
  run(z, 4, &p, "1110");
  p.epsilon = 0.6;
  r = run(z, 4, &p, "1000");
  cr_expect_eq(r.flags, FH_DECODE_FLAG_ARGMAX_FALLBACK);
  p.epsilon = 0.0;
  run(z, 4, &p, "1111");
  p = defaults(FH_DECODE_ETA);
  p.epsilon = 0.16;
  run(z, 4, &p, "1110");
  /* η = min(ε, ...): at ε = .04 the entropy term is .2·.3191 = .0638 > .04, so η = ε = .04 and the
   * .05 token stays. */
  p.epsilon = 0.04;
  run(z, 4, &p, "1111");
  /* ε = .06: √.06·.3191 = .0782 > .06 -> η = .06 and the .05 token goes. */
  p.epsilon = 0.06;
  run(z, 4, &p, "1110");
}

/* ---- top-H ---- */

/* p4: H_j = (.34657, .70776, .99233, 1.14212), τ = α·H_4. α = .4: τ = .45685 -> k = 1;
 * α = .7: τ = .79948 -> k = 2; α = .9: τ = 1.0279 -> k = 3; α = 1: k = 4 (the guard: H_N ≤ τ).
 * With N = 2 candidates and α = .7: τ = .7·.70776 = .49543 -> k = 1. */
Test(ref_decode_hand, top_h) {
  double z[4];
  logs(P4, 4, z);
  fh_decode_row_params_t p = defaults(FH_DECODE_TOP_H);
  p.top_h_alpha = 0.4;
  run(z, 4, &p, "1000");
  p.top_h_alpha = 0.7;
  run(z, 4, &p, "1100");
  p.top_h_alpha = 0.9;
  run(z, 4, &p, "1110");
  p.top_h_alpha = 1.0;
  run(z, 4, &p, "1111");
  p.top_h_alpha = 0.7;
  p.top_h_candidates = 2;
  run(z, 4, &p, "1000");
}

/* ---- Bregman ---- */

/* p4: ln(1 + p_(k+1)/P_k) = (ln 1.6, ln 1.1875, ln(1 + .05/.95), 0) = (.470, .172, .0513, 0).
 * λ = .5 -> k* = 1; .3 -> 2; .1 -> 3; 0 -> 4. The ids are permuted to show order by p, not id. */
Test(ref_decode_hand, bregman_adaptive_k) {
  const double pr[4] = {0.15, 0.5, 0.05, 0.3};
  double z[4];
  logs(pr, 4, z);
  fh_decode_row_params_t p = defaults(FH_DECODE_BREGMAN);
  p.bregman_lambda = 0.5;
  run(z, 4, &p, "0100");
  p.bregman_lambda = 0.3;
  run(z, 4, &p, "0101");
  p.bregman_lambda = 0.1;
  run(z, 4, &p, "1101");
  p.bregman_lambda = 0.0;
  run(z, 4, &p, "1111");
}

/* α = 2 is φ = x²/2 (a = 1): q_i = p_i + (1 − P_S)/|S|. p4, λ = .1: S = first 3, P = .95,
 * q = (.5 + .05/3, .3 + .05/3, .15 + .05/3). α = 1: q = p/P_S. */
Test(ref_decode_hand, bregman_alpha_closed_forms) {
  double z[4], lq[4];
  logs(P4, 4, z);
  fh_decode_row_params_t p = defaults(FH_DECODE_BREGMAN);
  p.bregman_lambda = 0.1;
  p.bregman_alpha = 2.0;
  run_q(z, 4, &p, "1110", lq);
  for (int i = 0; i < 3; ++i)
    cr_expect(fabs(exp(lq[i]) - (P4[i] + 0.05 / 3)) < TOL, "alpha 2: q[%d] = %.17g", i, exp(lq[i]));
  p.bregman_alpha = 1.0;
  run_q(z, 4, &p, "1110", lq);
  for (int i = 0; i < 3; ++i) cr_expect(fabs(exp(lq[i]) - P4[i] / 0.95) < TOL, "alpha 1: q[%d]", i);
  /* α → 1 is continuous: at 1 ± 1e-7 q differs from p/P by O(1e-7). */
  p.bregman_alpha = 1.0 + 1e-7;
  run_q(z, 4, &p, "1110", lq);
  for (int i = 0; i < 3; ++i) cr_expect(fabs(exp(lq[i]) - P4[i] / 0.95) < 1e-6, "alpha 1+: q[%d]", i);
  p.bregman_alpha = 1.0 - 1e-7;
  run_q(z, 4, &p, "1110", lq);
  for (int i = 0; i < 3; ++i) cr_expect(fabs(exp(lq[i]) - P4[i] / 0.95) < 1e-6, "alpha 1-: q[%d]", i);
}

/* α = .5 (a = −1/2): stationarity q_i^a − p_i^a = c is the same for every kept i, Σ q = 1, and
 * larger p gain relatively more: q_0/q_1 > p_0/p_1. α = 3 gives the opposite. */
Test(ref_decode_hand, bregman_alpha_stationarity) {
  double z[4], lq[4];
  logs(P4, 4, z);
  const double alphas[2] = {0.5, 3.0};
  for (int t = 0; t < 2; ++t) {
    fh_decode_row_params_t p = defaults(FH_DECODE_BREGMAN);
    p.bregman_lambda = 0.1;
    p.bregman_alpha = alphas[t];
    run_q(z, 4, &p, "1110", lq);
    const double a = alphas[t] - 1.0;
    const double c0 = pow(exp(lq[0]), a) - pow(P4[0], a);
    for (int i = 1; i < 3; ++i) {
      const double ci = pow(exp(lq[i]), a) - pow(P4[i], a);
      cr_expect(fabs(ci - c0) < 1e-12 * (1 + fabs(c0)), "alpha %g: c[%d] = %.17g vs %.17g", alphas[t], i, ci, c0);
    }
    const double ratio = exp(lq[0] - lq[1]), pratio = P4[0] / P4[1];
    if (a < 0) cr_expect(ratio > pratio * (1 + 1e-3), "alpha < 1 up-weights the top");
    else cr_expect(ratio < pratio * (1 - 1e-3), "alpha > 1 flattens");
  }
}

/* The KL objective J(k) = −ln P_k + λk is discretely convex in k and k* is its first minimiser,
 * on random rows (brute force over k). */
Test(ref_decode_hand, bregman_objective_convex) {
  uint64_t st = 12345;
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t V = 12;
    double z[12], pr[12];
    for (int64_t v = 0; v < V; ++v) {
      st = st * 6364136223846793005ull + 1442695040888963407ull;
      z[v] = 4.0 * (double)(st >> 11) / 9007199254740992.0 - 2.0;
    }
    fh_decode_row_params_t p = defaults(FH_DECODE_BREGMAN);
    p.bregman_lambda = 0.02 + 0.05 * (trial % 7);
    fh_decode_row_result_t r = run(z, V, &p, NULL);
    /* sorted p by hand */
    double Z = 0;
    for (int64_t v = 0; v < V; ++v) Z += exp(z[v]);
    for (int64_t v = 0; v < V; ++v) pr[v] = exp(z[v]) / Z;
    for (int64_t i = 0; i < V; ++i)
      for (int64_t j = i + 1; j < V; ++j)
        if (pr[j] > pr[i]) {
          const double t = pr[i];
          pr[i] = pr[j];
          pr[j] = t;
        }
    double J[13], P = 0;
    int64_t best = 1;
    for (int64_t k = 1; k <= V; ++k) {
      P += pr[k - 1];
      J[k] = -log(P) + p.bregman_lambda * (double)k;
      if (J[k] < J[best] - 1e-13) best = k;
    }
    for (int64_t k = 2; k < V; ++k) cr_assert(J[k + 1] - 2 * J[k] + J[k - 1] > -1e-12, "J not convex at %lld", (long long)k);
    cr_assert_eq(r.allowed_count, best, "trial %d: k* %lld, argmin J %lld", trial, (long long)r.allowed_count,
                 (long long)best);
  }
}

/* ---- degenerate rows ---- */

Test(ref_decode_hand, degenerate_rows) {
  fh_decode_row_params_t p = defaults(FH_DECODE_STANDARD);
  fh_decode_scratch_t w;
  cr_assert(fh_ref_decode_scratch_init(&w, 3));
  fh_decode_row_result_t r;
  const double nanrow[3] = {1, NAN, 2}, ninf[3] = {-INFINITY, -INFINITY, -INFINITY}, pinf[3] = {0, INFINITY, 1};
  fh_ref_decode_row(nanrow, 3, &p, -1, &w, &r);
  cr_expect_eq(r.token, -1);
  cr_expect_eq(r.flags, FH_DECODE_FLAG_DEGENERATE);
  cr_expect(isnan(r.lse) && isnan(r.logprob) && isnan(r.entropy));
  cr_expect_eq(r.allowed_count, 0);
  cr_expect_eq(r.rank, 0);
  fh_ref_decode_row(ninf, 3, &p, 2, &w, &r);
  cr_expect_eq(r.token, 2); /* the caller's degenerate_token */
  cr_expect(r.lse == -INFINITY);
  p.temperature = 0.0; /* greedy does not rescue a degenerate row */
  fh_ref_decode_row(pinf, 3, &p, -1, &w, &r);
  cr_expect_eq(r.token, -1);
  cr_expect(r.lse == INFINITY);
  cr_expect_eq(r.flags, FH_DECODE_FLAG_DEGENERATE);
  fh_ref_decode_scratch_free(&w);
}

/* A row with a single finite logit: every rule allows exactly it; V = 1 works. */
Test(ref_decode_hand, single_finite_and_v1) {
  const double z[4] = {-INFINITY, 0.25, -INFINITY, -INFINITY};
  for (int s = 0; s < FH_DECODE_SAMPLER_COUNT; ++s) {
    fh_decode_row_params_t p = defaults((fh_decode_sampler_t)s);
    p.top_p = 0.5;
    p.top_k = 3;
    fh_decode_row_result_t r = run(z, 4, &p, "0100");
    cr_expect_eq(r.token, 1);
    cr_expect(fabs(r.logprob) < TOL && fabs(r.full_logprob) < TOL && fabs(r.entropy) < TOL);
    const double one[1] = {-3.0};
    r = run(one, 1, &p, "1");
    cr_expect_eq(r.token, 0);
  }
}
