/* fh_decode_from_probs, fh_decode_renorm_probs and fh_decode_mask_logits on the CPU backend
 * (semantics: fusedhead_decode.h, docs/decoding.md "From probabilities"): hand-derived sets on
 * dyadic rows (exact in fp32 and in fp64 sums, so the boundaries top-p = mass above and
 * p = min_p·p_max are hit exactly), every output of a sampled row, the keying contract, indices,
 * invalid rows, the mask against fh_decode_from_logits, and χ² fits of the sampled tokens. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fusedhead.h"
#include "philox.h"
#include "test_probs_util.h"
#include "test_util.h"

#define MAXV 64

static fh_context_t* cpu(void) {
  fh_context_t* ctx;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  return ctx;
}

static fh_filter_options_t fopts(int64_t k, float top_p, float min_p) {
  fh_filter_options_t o;
  fh_filter_options_init(&o);
  o.top_k = k;
  o.top_p = top_p;
  o.min_p = min_p;
  return o;
}

/* The renormalised row of one probability row; returns the kept set as a '0'/'1' string. */
static void renorm(const float* p, int64_t V, const fh_filter_options_t* o, float* out, char* set) {
  fh_context_t* ctx = cpu();
  float row[MAXV];
  memcpy(row, p, (size_t)V * sizeof *p);
  fh_tensor_t in = fh_tensor_2d(row, FH_DTYPE_F32, 1, V), ot = fh_tensor_2d(out, FH_DTYPE_F32, 1, V);
  uint32_t flags = 99;
  cr_assert_eq(fh_decode_renorm_probs(ctx, o, &in, &ot, &flags, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_expect_eq(flags, 0u);
  double sum = 0;
  for (int64_t v = 0; v < V; ++v) {
    set[v] = out[v] > 0 ? '1' : '0';
    sum += out[v];
  }
  set[V] = '\0';
  cr_expect(fabs(sum - 1.0) < 1e-6, "renormalised row sums to %.9g", sum);
  fh_context_destroy(ctx);
}

static void expect_set(const float* p, int64_t V, fh_filter_options_t o, const char* want) {
  float out[MAXV];
  char set[MAXV + 1];
  renorm(p, V, &o, out, set);
  cr_expect_str_eq(set, want, "k %lld top_p %g min_p %g", (long long)o.top_k, (double)o.top_p, (double)o.min_p);
}

static const float P4[4] = {0.5f, 0.25f, 0.125f, 0.125f};

/* top-p keeps a tie group when the renormalised mass strictly above it is < top_p: with P4 the
 * mass above id 1 is .5 and above ids 2, 3 is .75. */
Test(ref_decode_probs, top_p_boundaries) {
  expect_set(P4, 4, fopts(0, 0.5f, 0.f), "1000");  /* .5 is not < .5 */
  expect_set(P4, 4, fopts(0, 0.5000001f, 0.f), "1100");
  expect_set(P4, 4, fopts(0, 0.75f, 0.f), "1100"); /* .75 is not < .75 */
  expect_set(P4, 4, fopts(0, 0.7500001f, 0.f), "1111"); /* the tie group enters whole */
  expect_set(P4, 4, fopts(0, 1.0f, 0.f), "1111");
  expect_set(P4, 4, fopts(0, 1e-6f, 0.f), "1000"); /* the largest group always stays */
}

/* top-k is tie-inclusive (#{p_j > p_v} < k), as fh_decode_from_logits. */
Test(ref_decode_probs, top_k_ties) {
  static const float p[5] = {0.25f, 0.125f, 0.25f, 0.125f, 0.25f};
  expect_set(p, 5, fopts(1, 1.f, 0.f), "10101");
  expect_set(p, 5, fopts(3, 1.f, 0.f), "10101");
  expect_set(p, 5, fopts(4, 1.f, 0.f), "11111");
  expect_set(p, 5, fopts(5, 1.f, 0.f), "11111"); /* k >= V is off */
  expect_set(p, 5, fopts(-1, 1.f, 0.f), "11111");
}

/* min-p keeps p >= min_p·p_max, equality kept (the product is exact in fp64). */
Test(ref_decode_probs, min_p_equality) {
  expect_set(P4, 4, fopts(0, 1.f, 0.25f), "1111"); /* .125 == .25·.5 */
  expect_set(P4, 4, fopts(0, 1.f, 0.2500001f), "1100");
  expect_set(P4, 4, fopts(0, 1.f, 0.5f), "1100");
  expect_set(P4, 4, fopts(0, 1.f, 1.f), "1000");
}

/* min-p → top-k → top-p, each on the survivors of the previous stage (top-p renormalised over
 * them, the sequential rule): with min_p .25 and k = 2, the survivors are {0, 1} (mass .75);
 * top_p .6 keeps a group whose mass above is < .6·.75 = .45: id 1 has .5 above, out. */
Test(ref_decode_probs, chain_sequential) {
  expect_set(P4, 4, fopts(2, 0.6f, 0.25f), "1000");
  expect_set(P4, 4, fopts(2, 0.7f, 0.25f), "1100"); /* .5 / .75 = .667 < .7 */
  expect_set(P4, 4, fopts(3, 1.f, 0.25f), "1111"); /* the 3rd value is tied: 4 tokens */
}

/* Zero probabilities are never kept nor drawn; renorm writes 0 there. */
Test(ref_decode_probs, zeros_never_drawn) {
  static const float p[6] = {0.f, 0.5f, 0.f, 0.25f, 0.25f, 0.f};
  expect_set(p, 6, fopts(0, 1.f, 0.f), "010110");
  expect_set(p, 6, fopts(5, 1.f, 0.f), "010110");
  fh_context_t* ctx = cpu();
  enum { N = 2000 };
  static float rows[6];
  memcpy(rows, p, sizeof rows);
  int64_t idx[N], tok[N], cnt[N];
  uint64_t offs[N];
  for (int i = 0; i < N; ++i) {
    idx[i] = 0;
    offs[i] = (uint64_t)i;
  }
  fh_filter_options_t o = fopts(0, 1.f, 0.f);
  o.indices = idx;
  o.num_indices = N;
  o.offset_per_row = offs;
  fh_tensor_t in = fh_tensor_2d(rows, FH_DTYPE_F32, 1, 6);
  fh_decode_outputs_t out;
  memset(&out, 0, sizeof out);
  out.tokens = tok;
  out.allowed_count = cnt;
  cr_assert_eq(fh_decode_from_probs(ctx, &o, &in, &out, NULL, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  long c[6] = {0};
  for (int i = 0; i < N; ++i) {
    cr_assert(tok[i] >= 0 && tok[i] < 6);
    c[tok[i]]++;
    cr_expect_eq(cnt[i], 3);
  }
  cr_expect(c[0] == 0 && c[2] == 0 && c[5] == 0, "zero-probability ids drawn: %ld %ld %ld", c[0], c[2], c[5]);
  cr_expect(c[1] > 0 && c[3] > 0 && c[4] > 0);
  fh_context_destroy(ctx);
}

/* The renormalised values: one rounding of p_v / Σ_A p. */
Test(ref_decode_probs, renorm_values) {
  float out[4];
  char set[5];
  fh_filter_options_t o = fopts(2, 1.f, 0.f);
  renorm(P4, 4, &o, out, set);
  cr_expect_eq(out[0], (float)(0.5 / 0.75));
  cr_expect_eq(out[1], (float)(0.25 / 0.75));
  cr_expect(out[2] == 0.f && out[3] == 0.f);
}

/* Every output of a sampled row, and the token is the documented keyed Gumbel-max:
 * argmax_{v in A} ln p_v + g_v with g from (seed, offset, v), recomputed here from Philox. */
Test(ref_decode_probs, outputs_and_key) {
  fh_context_t* ctx = cpu();
  float p[4];
  const double S = 1.0 + 1.0 / 2048; /* within the default tolerance 1e-3 */
  for (int v = 0; v < 4; ++v) p[v] = (float)(P4[v] * S);
  fh_tensor_t in = fh_tensor_2d(p, FH_DTYPE_F32, 1, 4);
  for (uint64_t seed = 0; seed < 40; ++seed) {
    fh_filter_options_t o = fopts(0, 0.75f, 0.f); /* A = {0, 1}: mass above id 2 is .75, not < .75 */
    o.seed = seed;
    o.offset = 7;
    o.num_logprobs = 3;
    int64_t tok, rank, cnt, ids[3];
    int32_t tok32;
    float lp, flp, lse, ent, tlp[3];
    uint32_t flags;
    fh_decode_outputs_t out = {&tok, &lp, &flp, &rank, &lse, &ent, &cnt, ids, tlp, &flags};
    cr_assert_eq(fh_decode_from_probs(ctx, &o, &in, &out, &tok32, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
    double best = -INFINITY;
    int64_t want = -1;
    for (int v = 0; v < 2; ++v) {
      const double u = fh_philox_token_uniform(seed, 7, (uint64_t)v);
      const double key = log((double)p[v]) - log(-log(u));
      if (key > best) {
        best = key;
        want = v;
      }
    }
    cr_expect_eq(tok, want, "seed %llu", (unsigned long long)seed);
    cr_expect_eq(tok32, (int32_t)want);
    const double pt = p[tok];
    cr_expect_eq(lp, (float)(log(pt) - log((double)p[0] + (double)p[1])));
    cr_expect_eq(flp, (float)(log(pt) - log(S)));
    cr_expect_eq(rank, tok + 1);
    cr_expect(fabs(lse - log(S)) < 1e-7);
    cr_expect(fabs(ent - 1.75 * log(2.0)) < 1e-6, "entropy %.9g", (double)ent); /* scale-free */
    cr_expect_eq(cnt, 2);
    cr_expect_eq(flags, 0u);
    for (int j = 0; j < 3; ++j) {
      cr_expect_eq(ids[j], j);
      cr_expect(fabs(tlp[j] - (log(P4[j]))) < 1e-6);
    }
  }
  fh_context_destroy(ctx);
}

/* Output row i reads input row indices[i] (int64 or int32); per-row arrays follow the output
 * row; the token depends on (seed, offset, row contents) only, not on the row's position. */
Test(ref_decode_probs, indices_and_batch_invariance) {
  fh_context_t* ctx = cpu();
  enum { BIN = 3, B = 6, V = 40 };
  float p[BIN * V];
  tu_rng_t r = {5};
  for (int b = 0; b < BIN; ++b) {
    double s = 0, w[V];
    for (int v = 0; v < V; ++v) s += (w[v] = tu_uniform(&r) * tu_uniform(&r));
    for (int v = 0; v < V; ++v) p[b * V + v] = (float)(w[v] / s);
  }
  const int64_t idx[B] = {2, 0, 2, 1, 1, 0};
  const int32_t idx32[B] = {2, 0, 2, 1, 1, 0};
  const uint64_t offs[B] = {3, 3, 3, 9, 3, 9};
  fh_tensor_t in = fh_tensor_2d(p, FH_DTYPE_F32, BIN, V);
  int64_t t64[B], t64b[B];
  fh_filter_options_t o = fopts(8, 0.9f, 0.f);
  o.seed = 77;
  o.offset_per_row = offs;
  o.num_indices = B;
  o.indices = idx;
  fh_decode_outputs_t out;
  memset(&out, 0, sizeof out);
  out.tokens = t64;
  cr_assert_eq(fh_decode_from_probs(ctx, &o, &in, &out, NULL, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  o.indices = NULL;
  o.indices_i32 = idx32;
  out.tokens = t64b;
  cr_assert_eq(fh_decode_from_probs(ctx, &o, &in, &out, NULL, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  for (int i = 0; i < B; ++i) {
    cr_expect_eq(t64[i], t64b[i]);
    /* each alone: one row, the same key */
    fh_tensor_t one = fh_tensor_2d(p + idx[i] * V, FH_DTYPE_F32, 1, V);
    fh_filter_options_t o1 = fopts(8, 0.9f, 0.f);
    o1.seed = 77;
    o1.offset = offs[i];
    int64_t t1;
    out.tokens = &t1;
    cr_assert_eq(fh_decode_from_probs(ctx, &o1, &one, &out, NULL, NULL, 0), FH_SUCCESS);
    cr_expect_eq(t1, t64[i], "output row %d", i);
  }
  cr_expect_eq(t64[0], t64[2]); /* same input row, same key */
  fh_context_destroy(ctx);
}

/* Invalid rows are degenerate (flags, token, NaN outputs) or, with strict_rows, an error that
 * names the row and the problem. */
Test(ref_decode_probs, invalid_rows) {
  fh_context_t* ctx = cpu();
  enum { B = 7, V = 4 };
  float p[B * V] = {0.5f, 0.25f, 0.125f, 0.125f, /* valid */
                    0.5f, NAN, 0.25f, 0.25f,     /* NaN */
                    0.5f, 0.75f, -0.25f, 0.f,    /* negative */
                    0.5f, INFINITY, 0.f, 0.f,    /* inf */
                    0.f, 0.f, 0.f, 0.f,          /* no mass */
                    0.5f, 0.25f, 0.125f, 0.f,    /* sums to .875 */
                    0.5f, 0.25f, 0.125f, 0.125f};
  fh_tensor_t in = fh_tensor_2d(p, FH_DTYPE_F32, B, V);
  fh_filter_options_t o = fopts(0, 1.f, 0.f);
  o.degenerate_token = 3;
  int64_t tok[B], cnt[B], rank[B];
  float lp[B], lse[B];
  uint32_t fl[B];
  fh_decode_outputs_t out;
  memset(&out, 0, sizeof out);
  out.tokens = tok;
  out.allowed_count = cnt;
  out.rank = rank;
  out.logprob = lp;
  out.lse = lse;
  out.flags = fl;
  cr_assert_eq(fh_decode_from_probs(ctx, &o, &in, &out, NULL, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  for (int b = 0; b < B; ++b) {
    const int bad = b >= 1 && b <= 5;
    cr_expect_eq(fl[b], bad ? FH_DECODE_FLAG_DEGENERATE | FH_DECODE_FLAG_INVALID_PROBS : 0u, "row %d", b);
    if (bad) {
      cr_expect(tok[b] == 3 && cnt[b] == 0 && rank[b] == 0 && isnan(lp[b]) && isnan(lse[b]), "row %d", b);
    } else {
      cr_expect(tok[b] >= 0 && tok[b] < V && cnt[b] == 4);
    }
  }
  /* renorm: NaN rows */
  float ro[B * V];
  fh_tensor_t ot = fh_tensor_2d(ro, FH_DTYPE_F32, B, V);
  cr_assert_eq(fh_decode_renorm_probs(ctx, &o, &in, &ot, fl, NULL, 0), FH_SUCCESS);
  for (int b = 0; b < B; ++b)
    for (int v = 0; v < V; ++v) cr_expect(isnan(ro[b * V + v]) == (b >= 1 && b <= 5), "renorm [%d, %d]", b, v);
  /* a looser tolerance admits the .875 row; +inf admits any positive sum */
  o.sum_tolerance = 0.125f;
  cr_assert_eq(fh_decode_from_probs(ctx, &o, &in, &out, NULL, NULL, 0), FH_SUCCESS);
  cr_expect_eq(fl[5], 0u);
  cr_expect(fabs(lse[5] - log(0.875)) < 1e-7);
  o.sum_tolerance = 0.1249f;
  cr_assert_eq(fh_decode_from_probs(ctx, &o, &in, &out, NULL, NULL, 0), FH_SUCCESS);
  cr_expect_neq(fl[5], 0u);
  /* strict: the first invalid row, named */
  o.strict_rows = 1;
  memset(tok, 0x7f, sizeof tok);
  cr_expect_eq(fh_decode_from_probs(ctx, &o, &in, &out, NULL, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "fh_decode_from_probs: probs[1, 1] is NaN"), "%s", fh_last_error());
  cr_expect_eq(tok[0], 0x7f7f7f7f7f7f7f7fll, "nothing written before the error");
  const int64_t sel[2] = {0, 5};
  o.indices = sel;
  o.num_indices = 2;
  cr_expect_eq(fh_decode_from_probs(ctx, &o, &in, &out, NULL, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "probs row 5 sums to 0.875"), "%s", fh_last_error());
  const int64_t sel2[2] = {4, 0};
  o.indices = sel2;
  ot.rows = 2;
  cr_expect_eq(fh_decode_renorm_probs(ctx, &o, &in, &ot, NULL, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "probs row 4 sums to 0"), "%s", fh_last_error());
  fh_context_destroy(ctx);
}

/* The mask: tie-inclusive top-k on logits; −inf entries never kept; degenerate rows NaN. */
Test(ref_decode_probs, mask_logits_hand) {
  fh_context_t* ctx = cpu();
  enum { B = 3, V = 6 };
  float z[B * V] = {1, 3, 3, 2, -INFINITY, 2, 0, NAN, 1, 2, 3, 4, -INFINITY, -INFINITY, -INFINITY, -INFINITY,
                    -INFINITY, -INFINITY};
  float m[B * V];
  uint32_t fl[B];
  fh_tensor_t in = fh_tensor_2d(z, FH_DTYPE_F32, B, V), ot = fh_tensor_2d(m, FH_DTYPE_F32, B, V);
  const float NI = -INFINITY;
  fh_filter_options_t o = fopts(2, 1.f, 0.f);
  cr_assert_eq(fh_decode_mask_logits(ctx, &o, &in, &ot, fl, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  const float want2[V] = {NI, 3, 3, NI, NI, NI};
  for (int v = 0; v < V; ++v) cr_expect_eq(m[v], want2[v], "k=2 id %d: %g", v, (double)m[v]);
  cr_expect(fl[0] == 0 && fl[1] == FH_DECODE_FLAG_DEGENERATE && fl[2] == FH_DECODE_FLAG_DEGENERATE);
  for (int v = 0; v < V; ++v) cr_expect(isnan(m[V + v]) && isnan(m[2 * V + v]));
  o.top_k = 3;
  cr_assert_eq(fh_decode_mask_logits(ctx, &o, &in, &ot, NULL, NULL, 0), FH_SUCCESS);
  const float want3[V] = {NI, 3, 3, 2, NI, 2};
  for (int v = 0; v < V; ++v) cr_expect_eq(m[v], want3[v], "k=3 id %d", v);
  o.top_k = 0;
  cr_assert_eq(fh_decode_mask_logits(ctx, &o, &in, &ot, NULL, NULL, 0), FH_SUCCESS);
  for (int v = 0; v < V; ++v) cr_expect(m[v] == z[v]);
  fh_context_destroy(ctx);
}

/* The mask's kept set is fh_decode_from_logits's A (STANDARD, T = 1): the same count, and
 * decoding the masked logits without truncation under the same key gives the same token
 * (the keyed Gumbel-max over A ignores the −inf entries). Rows of bf16 integers have long ties. */
Test(ref_decode_probs, mask_matches_sampler) {
  fh_context_t* ctx = cpu();
  enum { B = 48, V = 301 };
  float* z = (float*)malloc(sizeof(float) * B * V);
  float* m = (float*)malloc(sizeof(float) * B * V);
  uint16_t* zb = (uint16_t*)malloc(sizeof(uint16_t) * B * V);
  cr_assert(z && m && zb);
  tu_rng_t r = {11};
  int64_t k[B];
  float tp[B], mp[B];
  for (int b = 0; b < B; ++b) {
    for (int v = 0; v < V; ++v) {
      const double x = b % 3 == 0 ? floor(4 * tu_normal(&r)) : 2.5 * tu_normal(&r);
      z[b * V + v] = (float)x;
      uint32_t bits;
      memcpy(&bits, &z[b * V + v], 4);
      zb[b * V + v] = (uint16_t)(bits >> 16);
      memcpy(&z[b * V + v], &(uint32_t){(uint32_t)zb[b * V + v] << 16}, 4); /* the bf16 value */
    }
    k[b] = b % 4 == 0 ? 0 : 1 + tu_randint(&r, 40);
    tp[b] = b % 5 == 0 ? 1.0f : (float)(0.3 + 0.7 * tu_uniform(&r));
    mp[b] = b % 2 == 0 ? 0.0f : (float)(0.2 * tu_uniform(&r));
  }
  fh_filter_options_t o = fopts(0, 1.f, 0.f);
  o.top_k_per_row = k;
  o.top_p_per_row = tp;
  o.min_p_per_row = mp;
  fh_tensor_t in = fh_tensor_2d(zb, FH_DTYPE_BF16, B, V), ot = fh_tensor_2d(m, FH_DTYPE_F32, B, V);
  cr_assert_eq(fh_decode_mask_logits(ctx, &o, &in, &ot, NULL, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  fh_decode_options_t d;
  fh_decode_options_init(&d);
  d.top_k_per_row = k;
  d.top_p_per_row = tp;
  d.min_p_per_row = mp;
  d.seed = 1234;
  int64_t tok[B], cnt[B], tok2[B];
  fh_decode_outputs_t out;
  memset(&out, 0, sizeof out);
  out.tokens = tok;
  out.allowed_count = cnt;
  fh_tensor_t zt = fh_tensor_2d(z, FH_DTYPE_F32, B, V);
  cr_assert_eq(fh_decode_from_logits(ctx, &d, &zt, &out, NULL, 0), FH_SUCCESS);
  fh_decode_options_t plain;
  fh_decode_options_init(&plain);
  plain.seed = 1234;
  out.tokens = tok2;
  out.allowed_count = NULL;
  fh_tensor_t mt = fh_tensor_2d(m, FH_DTYPE_F32, B, V);
  cr_assert_eq(fh_decode_from_logits(ctx, &plain, &mt, &out, NULL, 0), FH_SUCCESS);
  int64_t total = 0;
  for (int b = 0; b < B; ++b) {
    int64_t kept = 0;
    for (int v = 0; v < V; ++v) {
      const float x = m[b * V + v];
      kept += x > -INFINITY;
      cr_expect(x == -INFINITY || x == z[b * V + v], "row %d id %d keeps the logit itself", b, v);
    }
    cr_expect_eq(kept, cnt[b], "row %d: mask keeps %lld, sampler's A has %lld", b, (long long)kept, (long long)cnt[b]);
    cr_expect_eq(tok2[b], tok[b], "row %d", b);
    total += kept;
  }
  cr_expect(total > B && total < (int64_t)B * V / 2, "the rows exercise truncation (kept %lld)", (long long)total);
  free(z);
  free(m);
  free(zb);
  fh_context_destroy(ctx);
}

/* χ²: 100k draws of one row (V = 50, a tie at the 4th value) through indices and per-row
 * offsets, against the renormalised row. */
static void chi2_probs(const char* name, fh_filter_options_t o, int want_kept) {
  enum { V = 50, N = 100000 };
  float p[V], q[V];
  double w[V], s = 0;
  tu_rng_t r = {99};
  for (int v = 0; v < V; ++v) s += (w[v] = exp(fmin(tu_quantize(1.5 * tu_normal(&r), 8), 1.75)));
  w[7] = exp(4.0), w[11] = exp(3.0), w[20] = exp(2.5), w[3] = w[30] = exp(2.0), w[40] = 0.0;
  s = 0;
  for (int v = 0; v < V; ++v) s += w[v];
  for (int v = 0; v < V; ++v) p[v] = (float)(w[v] / s);
  char set[V + 1];
  renorm(p, V, &o, q, set);
  int kept = 0;
  for (int v = 0; v < V; ++v) kept += set[v] == '1';
  if (want_kept > 0) cr_expect_eq(kept, want_kept, "%s: |A|", name);
  int64_t* idx = (int64_t*)calloc(N, sizeof(int64_t));
  uint64_t* offs = (uint64_t*)malloc(N * sizeof(uint64_t));
  int32_t* tok = (int32_t*)malloc(N * sizeof(int32_t));
  cr_assert(idx && offs && tok);
  for (int i = 0; i < N; ++i) offs[i] = (uint64_t)i;
  o.seed = 0xabcdef00ull + strlen(name); /* each test its own noise: the sets are nested */
  o.indices = idx;
  o.num_indices = N;
  o.offset_per_row = offs;
  fh_context_t* ctx = cpu();
  fh_tensor_t in = fh_tensor_2d(p, FH_DTYPE_F32, 1, V);
  fh_decode_outputs_t out;
  memset(&out, 0, sizeof out);
  cr_assert_eq(fh_decode_from_probs(ctx, &o, &in, &out, tok, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  long cnt[V] = {0};
  double qe[V];
  for (int v = 0; v < V; ++v) qe[v] = q[v];
  for (int i = 0; i < N; ++i) {
    cr_assert(tok[i] >= 0 && tok[i] < V);
    cnt[tok[i]]++;
  }
  cr_expect(tp_chi2_ok(name, cnt, qe, V, N), "%s: the draws do not follow the renormalised row", name);
  free(idx);
  free(offs);
  free(tok);
  fh_context_destroy(ctx);
}

Test(ref_decode_probs, chi2_plain, .timeout = 120) { chi2_probs("probs_plain", fopts(0, 1.f, 0.f), 49); }
Test(ref_decode_probs, chi2_top_k_tie, .timeout = 120) { chi2_probs("probs_top_k_tie", fopts(4, 1.f, 0.f), 5); }
Test(ref_decode_probs, chi2_top_p, .timeout = 120) { chi2_probs("probs_top_p", fopts(0, 0.8f, 0.f), -1); }
Test(ref_decode_probs, chi2_chain, .timeout = 120) { chi2_probs("probs_chain", fopts(12, 0.9f, 0.01f), -1); }
