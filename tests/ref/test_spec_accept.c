/* fh_spec_accept on the CPU backend (semantics: fusedhead_decode.h, docs/decoding.md
 * "Speculative sampling"): known answers recomputed from the documented Philox keying, every edge
 * rule (p_d = 0, an all-zero residual, K = 0), invalid rows, batch invariance, and the defining
 * property: the emitted tokens follow the target distribution (χ² per position, drafts drawn
 * from p_d by fh_decode_from_probs under an independent key), with the acceptance rate
 * Σ min(p_t, p_d) of Leviathan et al. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fusedhead.h"
#include "philox.h"
#include "test_probs_util.h"
#include "test_util.h"

static fh_context_t* cpu(void) {
  fh_context_t* ctx;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  return ctx;
}

/* The documented draws, recomputed from Philox: the acceptance uniform of position i and the
 * correction/bonus argmax over weights w with the noise of words x2, x3. */
static double accept_u(uint64_t seed, uint64_t off, int64_t i) {
  return fh_philox_token_uniform(seed, off, UINT64_MAX - (uint64_t)i);
}
static int64_t second_argmax(const double* w, int64_t V, uint64_t seed, uint64_t off) {
  double best = -INFINITY;
  int64_t t = -1;
  for (int64_t v = 0; v < V; ++v) {
    if (!(w[v] > 0)) continue;
    const fh_philox4x32_t x = fh_philox_token_words(seed, off, (uint64_t)v);
    const double key = log(w[v]) - log(-log(fh_philox_u52(x.v[2], x.v[3])));
    if (key > best) {
      best = key;
      t = v;
    }
  }
  return t;
}

typedef struct run {
  int64_t tok[64], acc[8], emi[8], ind[8];
  uint32_t fl[8];
} run_t;

static fh_status_t spec(fh_context_t* ctx, const fh_spec_options_t* o, const int64_t* d, float* pd, float* pt,
                        int64_t B, int64_t K, int64_t V, run_t* r) {
  fh_tensor_t td = fh_tensor_2d(pd, FH_DTYPE_F32, B * K, V), tt = fh_tensor_2d(pt, FH_DTYPE_F32, B * (K + 1), V);
  fh_spec_outputs_t out = {r->tok, r->acc, r->emi, r->ind, r->fl};
  memset(r, 0x5a, sizeof *r);
  return fh_spec_accept(ctx, o, d, &td, &tt, K, &out, NULL, 0);
}

static fh_spec_options_t sopts(uint64_t seed, uint64_t off) {
  fh_spec_options_t o;
  fh_spec_options_init(&o);
  o.seed = seed;
  o.offset = off;
  return o;
}

/* p_d == p_t: every ratio is 1, all K accepted; the bonus is the keyed draw from p_t at K. */
Test(ref_spec, equal_models_accept_all) {
  fh_context_t* ctx = cpu();
  float pd[2 * 4] = {.5f, .25f, .125f, .125f, .25f, .25f, .25f, .25f};
  float pt[3 * 4] = {.5f, .25f, .125f, .125f, .25f, .25f, .25f, .25f, .125f, .5f, .25f, .125f};
  const int64_t d[2] = {2, 0};
  const double bonus[4] = {.125, .5, .25, .125};
  for (uint64_t seed = 0; seed < 30; ++seed) {
    run_t r;
    fh_spec_options_t o = sopts(seed, 5);
    cr_assert_eq(spec(ctx, &o, d, pd, pt, 1, 2, 4, &r), FH_SUCCESS, "%s", fh_last_error());
    cr_expect(r.acc[0] == 2 && r.emi[0] == 3 && r.ind[0] == 2 && r.fl[0] == 0);
    cr_expect(r.tok[0] == 2 && r.tok[1] == 0);
    cr_expect_eq(r.tok[2], second_argmax(bonus, 4, seed, 5));
  }
  fh_context_destroy(ctx);
}

/* A draft token with p_t = 0 is always rejected; the correction comes from max(0, p_t − p_d):
 * a one-hot target gives its token, a general one the keyed draw from the residual. */
Test(ref_spec, rejection_and_residual) {
  fh_context_t* ctx = cpu();
  float pd[4] = {.5f, .5f, 0.f, 0.f};
  float pt[2 * 4] = {0.f, .75f, .25f, 0.f, .25f, .25f, .25f, .25f};
  const int64_t d[1] = {0};
  const double resid[4] = {0, .25, .25, 0};
  int seen[4] = {0};
  for (uint64_t seed = 0; seed < 60; ++seed) {
    run_t r;
    fh_spec_options_t o = sopts(seed, 1);
    cr_assert_eq(spec(ctx, &o, d, pd, pt, 1, 1, 4, &r), FH_SUCCESS, "%s", fh_last_error());
    cr_expect(r.acc[0] == 0 && r.emi[0] == 1 && r.ind[0] == 0 && r.fl[0] == 0);
    cr_expect_eq(r.tok[0], second_argmax(resid, 4, seed, 1));
    cr_expect_eq(r.tok[1], -1);
    seen[r.tok[0]]++;
  }
  cr_expect(seen[1] > 0 && seen[2] > 0 && seen[0] == 0 && seen[3] == 0);
  float onehot[2 * 4] = {0.f, 0.f, 1.f, 0.f, .25f, .25f, .25f, .25f};
  run_t r;
  fh_spec_options_t o = sopts(3, 3);
  cr_assert_eq(spec(ctx, &o, d, pd, onehot, 1, 1, 4, &r), FH_SUCCESS);
  cr_expect(r.tok[0] == 2 && r.tok[1] == -1 && r.acc[0] == 0);
  fh_context_destroy(ctx);
}

/* Acceptance exactly as documented: accept iff a_0 < p_t(d)/p_d(d), here .5; both outcomes
 * occur over the seeds and each matches the recomputed uniform. */
Test(ref_spec, acceptance_rule) {
  fh_context_t* ctx = cpu();
  float pd[4] = {.5f, .5f, 0.f, 0.f};
  float pt[2 * 4] = {.25f, .25f, .5f, 0.f, 0.f, 0.f, 0.f, 1.f};
  const int64_t d[1] = {0};
  int acc = 0, rej = 0;
  for (uint64_t seed = 0; seed < 200; ++seed) {
    run_t r;
    fh_spec_options_t o = sopts(seed, 42);
    cr_assert_eq(spec(ctx, &o, d, pd, pt, 1, 1, 4, &r), FH_SUCCESS);
    const int want = accept_u(seed, 42, 0) < 0.5;
    cr_expect_eq(r.acc[0], want, "seed %llu", (unsigned long long)seed);
    if (want) cr_expect(r.tok[0] == 0 && r.tok[1] == 3 && r.emi[0] == 2); /* bonus: one-hot at 3 */
    else cr_expect(r.tok[0] == 2 && r.tok[1] == -1 && r.emi[0] == 1);   /* residual (0, 0, .5, 0) */
    acc += want;
    rej += !want;
  }
  cr_expect(acc > 60 && rej > 60, "accepted %d, rejected %d of 200", acc, rej);
  fh_context_destroy(ctx);
}

/* p_d(d) = 0: accepted when p_t(d) > 0 (flag); rejected when p_t(d) = 0, and with p_t <= p_d
 * elsewhere the residual is all zero, so the correction comes from p_t (flag). */
Test(ref_spec, zero_draft_probability) {
  fh_context_t* ctx = cpu();
  const int64_t d[1] = {0};
  float pd[3] = {0.f, .5f, .5f};
  float pt_pos[2 * 3] = {.5f, .25f, .25f, 1.f, 0.f, 0.f};
  run_t r;
  fh_spec_options_t o = sopts(1, 1);
  cr_assert_eq(spec(ctx, &o, d, pd, pt_pos, 1, 1, 3, &r), FH_SUCCESS);
  cr_expect(r.acc[0] == 1 && r.tok[0] == 0 && r.tok[1] == 0 && r.fl[0] == FH_SPEC_FLAG_ZERO_DRAFT);
  float pt_same[2 * 3] = {0.f, .5f, .5f, 1.f, 0.f, 0.f};
  const double w[3] = {0, .5, .5};
  for (uint64_t seed = 0; seed < 20; ++seed) {
    o = sopts(seed, 2);
    cr_assert_eq(spec(ctx, &o, d, pd, pt_same, 1, 1, 3, &r), FH_SUCCESS);
    cr_expect(r.acc[0] == 0 && r.emi[0] == 1);
    cr_expect_eq(r.fl[0], FH_SPEC_FLAG_ZERO_DRAFT | FH_SPEC_FLAG_RESIDUAL_FALLBACK);
    cr_expect_eq(r.tok[0], second_argmax(w, 3, seed, 2));
  }
  fh_context_destroy(ctx);
}

/* accepted_independent applies the test at every position, past the first rejection too;
 * K = 0 draws the bonus only. */
Test(ref_spec, independent_count_and_k0) {
  fh_context_t* ctx = cpu();
  enum { K = 3, V = 2 };
  float pd[K * V] = {1.f, 0.f, .5f, .5f, .5f, .5f};
  float pt[(K + 1) * V] = {0.f, 1.f, .5f, .5f, .5f, .5f, .5f, .5f};
  const int64_t d[K] = {0, 1, 0};
  run_t r;
  fh_spec_options_t o = sopts(9, 9);
  cr_assert_eq(spec(ctx, &o, d, pd, pt, 1, K, V, &r), FH_SUCCESS);
  cr_expect(r.acc[0] == 0 && r.emi[0] == 1 && r.ind[0] == 2);
  cr_expect(r.tok[0] == 1 && r.tok[1] == -1 && r.tok[2] == -1 && r.tok[3] == -1);
  float pt0[2 * V] = {.25f, .75f, .5f, .5f};
  const double w0[V] = {.25, .75}, w1[V] = {.5, .5};
  for (uint64_t seed = 0; seed < 10; ++seed) {
    o = sopts(seed, 0);
    cr_assert_eq(spec(ctx, &o, NULL, NULL, pt0, 2, 0, V, &r), FH_SUCCESS, "%s", fh_last_error());
    cr_expect(r.acc[0] == 0 && r.emi[0] == 1 && r.acc[1] == 0 && r.emi[1] == 1);
    cr_expect_eq(r.tok[0], second_argmax(w0, V, seed, 0));
    cr_expect_eq(r.tok[1], second_argmax(w1, V, seed, 0));
  }
  fh_context_destroy(ctx);
}

/* Invalid probability rows: a degenerate row (all −1, counts 0) that leaves the other rows
 * alone, or with strict_rows an error naming the tensor and the row. */
Test(ref_spec, invalid_rows) {
  fh_context_t* ctx = cpu();
  enum { B = 3, K = 1, V = 2 };
  float pd[B * K * V] = {.5f, .5f, .5f, NAN, .5f, .5f};
  float pt[B * (K + 1) * V] = {.5f, .5f, .5f, .5f, .5f, .5f, .5f, .5f, .5f, .5f, .5f, .25f};
  const int64_t d[B] = {0, 1, 1};
  run_t r;
  fh_spec_options_t o = sopts(4, 4);
  cr_assert_eq(spec(ctx, &o, d, pd, pt, B, K, V, &r), FH_SUCCESS, "%s", fh_last_error());
  cr_expect(r.fl[0] == 0 && r.acc[0] == 1 && r.emi[0] == 2);
  for (int b = 1; b < B; ++b) {
    cr_expect_eq(r.fl[b], FH_SPEC_FLAG_DEGENERATE, "row %d", b);
    cr_expect(r.acc[b] == 0 && r.emi[b] == 0 && r.ind[b] == 0 && r.tok[2 * b] == -1 && r.tok[2 * b + 1] == -1);
  }
  o.sum_tolerance = 0.25f; /* admits the .75 row */
  cr_assert_eq(spec(ctx, &o, d, pd, pt, B, K, V, &r), FH_SUCCESS);
  cr_expect(r.fl[2] == 0 && r.emi[2] >= 1);
  o.sum_tolerance = 1e-3f;
  o.strict_rows = 1;
  cr_expect_eq(spec(ctx, &o, d, pd, pt, B, K, V, &r), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "fh_spec_accept: draft_probs[1, 1] is NaN"), "%s", fh_last_error());
  pd[3] = .5f;
  cr_expect_eq(spec(ctx, &o, d, pd, pt, B, K, V, &r), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "target_probs row 5 sums to 0.75"), "%s", fh_last_error());
  fh_context_destroy(ctx);
}

/* A row's result depends on its data and key only: alone or inside a batch. */
Test(ref_spec, batch_invariance) {
  fh_context_t* ctx = cpu();
  enum { B = 5, K = 2, V = 7 };
  static float pd[B * K * V], pt[B * (K + 1) * V];
  int64_t d[B * K];
  uint64_t seeds[B] = {1, 2, 3, 4, 5}, offs[B] = {10, 10, 11, 11, 12};
  tu_rng_t g = {3};
  for (int r = 0; r < B * (2 * K + 1); ++r) {
    float* row = r < B * K ? pd + r * V : pt + (r - B * K) * V;
    double w[V], s = 0;
    for (int v = 0; v < V; ++v) s += (w[v] = tu_uniform(&g) < 0.2 ? 0.0 : tu_uniform(&g));
    for (int v = 0; v < V; ++v) row[v] = (float)(w[v] / s);
  }
  for (int j = 0; j < B * K; ++j) d[j] = tu_randint(&g, V);
  run_t all, one;
  fh_spec_options_t o = sopts(0, 0);
  o.seed_per_row = seeds;
  o.offset_per_row = offs;
  cr_assert_eq(spec(ctx, &o, d, pd, pt, B, K, V, &all), FH_SUCCESS, "%s", fh_last_error());
  for (int b = 0; b < B; ++b) {
    fh_spec_options_t o1 = sopts(seeds[b], offs[b]);
    cr_assert_eq(spec(ctx, &o1, d + b * K, pd + b * K * V, pt + b * (K + 1) * V, 1, K, V, &one), FH_SUCCESS);
    cr_expect(one.acc[0] == all.acc[b] && one.emi[0] == all.emi[b] && one.ind[0] == all.ind[b] &&
              one.fl[0] == all.fl[b], "row %d", b);
    for (int i = 0; i <= K; ++i) cr_expect_eq(one.tok[i], all.tok[b * (K + 1) + i], "row %d pos %d", b, i);
  }
  fh_context_destroy(ctx);
}

/* The defining property. Fixed p_d,i and p_t,i (with ids where one of them is 0), N rows with
 * their own offsets, drafts drawn from p_d,i by fh_decode_from_probs under another seed. The
 * token at position i, over the rows that reach it, must follow p_t,i; the share of rows that
 * accept draft 0 must be Σ_v min(p_t,0, p_d,0) (binomial, within 5.5 σ). */
Test(ref_spec, chi2_target_distribution, .timeout = 240) {
  enum { N = 100000, K = 3, V = 20 };
  float base_d[K * V], base_t[(K + 1) * V];
  tu_rng_t g = {2024};
  for (int r = 0; r < 2 * K + 1; ++r) {
    float* row = r < K ? base_d + r * V : base_t + (r - K) * V;
    double w[V], s = 0;
    for (int v = 0; v < V; ++v) s += (w[v] = (v + r) % 7 == 0 ? 0.0 : exp(1.5 * tu_normal(&g)));
    for (int v = 0; v < V; ++v) row[v] = (float)(w[v] / s);
  }
  float* pd = (float*)malloc(sizeof(float) * N * K * V);
  float* pt = (float*)malloc(sizeof(float) * N * (K + 1) * V);
  int64_t* d = (int64_t*)malloc(sizeof(int64_t) * N * K);
  int64_t* tok = (int64_t*)malloc(sizeof(int64_t) * N * (K + 1));
  int64_t* acc = (int64_t*)malloc(sizeof(int64_t) * N);
  int64_t* idx = (int64_t*)malloc(sizeof(int64_t) * N);
  uint64_t* offs = (uint64_t*)malloc(sizeof(uint64_t) * N);
  int64_t* dt = (int64_t*)malloc(sizeof(int64_t) * N);
  cr_assert(pd && pt && d && tok && acc && idx && offs && dt);
  for (int64_t b = 0; b < N; ++b) {
    memcpy(pd + b * K * V, base_d, sizeof base_d);
    memcpy(pt + b * (K + 1) * V, base_t, sizeof base_t);
    offs[b] = (uint64_t)b;
  }
  fh_context_t* ctx = cpu();
  /* drafts: position i of row b from p_d,i, key (0xd4af7, b) */
  fh_tensor_t bd = fh_tensor_2d(base_d, FH_DTYPE_F32, K, V);
  for (int i = 0; i < K; ++i) {
    for (int64_t b = 0; b < N; ++b) idx[b] = i;
    fh_filter_options_t fo;
    fh_filter_options_init(&fo);
    fo.seed = 0xd4af7 + (uint64_t)i;
    fo.offset_per_row = offs;
    fo.indices = idx;
    fo.num_indices = N;
    fh_decode_outputs_t fout;
    memset(&fout, 0, sizeof fout);
    fout.tokens = dt;
    cr_assert_eq(fh_decode_from_probs(ctx, &fo, &bd, &fout, NULL, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
    for (int64_t b = 0; b < N; ++b) d[b * K + i] = dt[b];
  }
  fh_spec_options_t o = sopts(0x5eed, 0);
  o.offset_per_row = offs;
  fh_tensor_t td = fh_tensor_2d(pd, FH_DTYPE_F32, N * K, V), tt = fh_tensor_2d(pt, FH_DTYPE_F32, N * (K + 1), V);
  fh_spec_outputs_t out = {tok, acc, NULL, NULL, NULL};
  cr_assert_eq(fh_spec_accept(ctx, &o, d, &td, &tt, K, &out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  for (int i = 0; i <= K; ++i) {
    long cnt[V] = {0}, n = 0;
    double q[V];
    for (int v = 0; v < V; ++v) q[v] = base_t[i * V + v];
    for (int64_t b = 0; b < N; ++b) {
      if (acc[b] < i) continue; /* the row stopped before position i */
      const int64_t t = tok[b * (K + 1) + i];
      cr_assert(t >= 0 && t < V, "row %lld pos %d token %lld", (long long)b, i, (long long)t);
      cnt[t]++;
      ++n;
    }
    char name[32];
    snprintf(name, sizeof name, "spec_position_%d", i);
    cr_expect(n > 1000, "position %d reached by %ld rows", i, n);
    cr_expect(tp_chi2_ok(name, cnt, q, V, n), "position %d does not follow p_t", i);
  }
  double alpha = 0;
  for (int v = 0; v < V; ++v) alpha += fmin((double)base_t[v], (double)base_d[v]);
  long a0 = 0;
  for (int64_t b = 0; b < N; ++b) a0 += acc[b] >= 1;
  const double sd = sqrt(N * alpha * (1 - alpha));
  printf("spec acceptance at position 0: %ld of %d, expected %.1f (sd %.1f)\n", a0, N, N * alpha, sd);
  cr_expect(fabs(a0 - N * alpha) < 5.5 * sd, "acceptance %ld, expected %.1f", a0, N * alpha);
  free(pd);
  free(pt);
  free(d);
  free(tok);
  free(acc);
  free(idx);
  free(offs);
  free(dt);
  fh_context_destroy(ctx);
}
