/* The public decoding paths on the CPU backend: fused == from_logits, exact top-k, bias and bans,
 * every output field against direct formulas, guard words, and the invariances the RNG contract
 * promises (batch position, vocabulary chunking and chunk order) and the rules promise (top-k
 * and top-nσ sets under temperature). Logits are small dyadic numbers, so fp32 storage and the
 * fp64 dot products H·C are exact and both paths see identical logits. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ref/decode_ref.h"
#include "test_util.h"

static fh_context_t* cpu(void) {
  fh_context_t* c = NULL;
  cr_assert_eq(fh_context_create(&c, FH_BACKEND_CPU, 0), FH_SUCCESS);
  return c;
}

typedef struct all_out {
  int64_t tok[64], rank[64], cnt[64], tid[64 * 4];
  float lp[64], flp[64], lse[64], ent[64], tlp[64 * 4];
  uint32_t flags[64];
  fh_decode_outputs_t o;
} all_out_t;

static void all_out_init(all_out_t* a) {
  memset(a, 0, sizeof *a);
  a->o.tokens = a->tok;
  a->o.logprob = a->lp;
  a->o.full_logprob = a->flp;
  a->o.rank = a->rank;
  a->o.lse = a->lse;
  a->o.entropy = a->ent;
  a->o.allowed_count = a->cnt;
  a->o.topn_ids = a->tid;
  a->o.topn_logprobs = a->tlp;
  a->o.flags = a->flags;
}

/* H [B x D], C [V x D] with small integers / 4 and a bias: logits exact in fp32. */
#define B 24
#define D 5
#define NV 37
static float hH[B * D], hC[NV * D], hb[NV], hZ[B * NV];
static void build(void) {
  tu_rng_t r = {2024};
  for (int i = 0; i < B * D; ++i) hH[i] = (float)(tu_randint(&r, 9) - 4) * 0.25f;
  for (int i = 0; i < NV * D; ++i) hC[i] = (float)(tu_randint(&r, 9) - 4) * 0.25f;
  for (int i = 0; i < NV; ++i) hb[i] = (float)(tu_randint(&r, 5) - 2) * 0.125f;
  for (int b = 0; b < B; ++b)
    for (int v = 0; v < NV; ++v) {
      double s = hb[v];
      for (int k = 0; k < D; ++k) s += (double)hH[b * D + k] * hC[v * D + k];
      hZ[b * NV + v] = (float)s; /* exact: |s| <= 5·1 + 0.25, multiples of 1/16 */
    }
}

Test(ref_decode_paths, fused_equals_from_logits) {
  build();
  fh_context_t* ctx = cpu();
  fh_tensor_t tH = fh_tensor_2d(hH, FH_DTYPE_F32, B, D), tC = fh_tensor_2d(hC, FH_DTYPE_F32, NV, D);
  fh_tensor_t tb = fh_tensor_2d(hb, FH_DTYPE_F32, 1, NV), tZ = fh_tensor_2d(hZ, FH_DTYPE_F32, B, NV);
  for (int s = 0; s < FH_DECODE_SAMPLER_COUNT; ++s) {
    fh_decode_options_t o;
    fh_decode_options_init(&o);
    o.sampler = (fh_decode_sampler_t)s;
    o.top_k = 6;
    o.top_p = 0.9f;
    o.min_p = 0.01f;
    o.bregman_alpha = 0.7f;
    o.num_logprobs = 4;
    o.seed = 77;
    all_out_t a, f;
    all_out_init(&a);
    all_out_init(&f);
    cr_assert_eq(fh_decode_from_logits(ctx, &o, &tZ, &a.o, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
    cr_assert_eq(fh_decode_fused(ctx, &o, &tH, &tC, &tb, &f.o, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
    cr_expect(memcmp(&a, &f, offsetof(all_out_t, o)) == 0, "sampler %d: fused and from_logits differ", s);
  }
  fh_context_destroy(ctx);
}

/* Every output field of one row against direct formulas (fp32 rounding of fp64 values: 1 ulp). */
Test(ref_decode_paths, outputs_match_formulas) {
  float z[6] = {1.0f, 2.5f, 2.5f, -INFINITY, 0.0f, -1.0f};
  fh_context_t* ctx = cpu();
  fh_tensor_t t = fh_tensor_2d(z, FH_DTYPE_F32, 1, 6);
  fh_decode_options_t o;
  fh_decode_options_init(&o);
  o.temperature = 0.5f;
  o.top_k = 3;
  o.num_logprobs = 4;
  for (uint64_t seed = 0; seed < 16; ++seed) {
    o.seed = seed;
    all_out_t a;
    all_out_init(&a);
    cr_assert_eq(fh_decode_from_logits(ctx, &o, &t, &a.o, NULL, 0), FH_SUCCESS);
    double s[6], Z = 0, ZA = 0, F = 0;
    for (int v = 0; v < 6; ++v) s[v] = (double)z[v] / 0.5;
    for (int v = 0; v < 6; ++v)
      if (v != 3) Z += exp(s[v]);
    ZA = exp(s[0]) + exp(s[1]) + exp(s[2]); /* top-3 by s: ids 1, 2 (tied) and 0 */
    const double lse = log(Z);
    for (int v = 0; v < 6; ++v)
      if (v != 3) F += exp(s[v] - lse) * (s[v] - lse);
    const int64_t k = a.tok[0];
    cr_expect(k == 0 || k == 1 || k == 2);
    cr_expect_eq(a.cnt[0], 3);
    cr_expect_float_eq(a.lp[0], (float)(s[k] - log(ZA)), 1e-6);
    cr_expect_float_eq(a.flp[0], (float)(s[k] - lse), 1e-6);
    cr_expect_float_eq(a.lse[0], (float)lse, 1e-6);
    cr_expect_float_eq(a.ent[0], (float)(-F), 1e-6);
    cr_expect_eq(a.rank[0], k == 0 ? 3 : 1);
    cr_expect_eq(a.flags[0], 0u);
    const int64_t want_ids[4] = {1, 2, 0, 4};
    for (int i = 0; i < 4; ++i) {
      cr_expect_eq(a.tid[i], want_ids[i]);
      cr_expect_float_eq(a.tlp[i], (float)(s[want_ids[i]] - lse), 1e-6);
    }
  }
  fh_context_destroy(ctx);
}

/* Sparse bias and bans: bias lifts id 4 to the top (greedy picks it); banning it gives the old
 * argmax back; bans win over bias; all ids banned is degenerate (token = degenerate_token). */
Test(ref_decode_paths, bias_and_bans) {
  float z[2 * 5] = {3, 1, 0, 0, 0, 3, 1, 0, 0, 0};
  fh_context_t* ctx = cpu();
  fh_tensor_t t = fh_tensor_2d(z, FH_DTYPE_F32, 2, 5);
  fh_decode_options_t o;
  fh_decode_options_init(&o);
  o.temperature = 0.0f;
  const int64_t bid[4] = {4, 4, 1, 0}, bcnt[2] = {2, 1};
  const float bval[4] = {2.0f, 1.5f, 2.0f, 0.0f}; /* row 0: id 4 += 3.5; row 1: id 1 += 2 (ties id 0) */
  o.bias_width = 2;
  o.bias_ids = bid;
  o.bias_values = bval;
  o.bias_count = bcnt;
  int64_t tok[2];
  uint32_t fl[2];
  fh_decode_outputs_t out;
  memset(&out, 0, sizeof out);
  out.tokens = tok;
  out.flags = fl;
  cr_assert_eq(fh_decode_from_logits(ctx, &o, &t, &out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_expect_eq(tok[0], 4);
  cr_expect_eq(tok[1], 0); /* 3 vs 3: the lowest id */
  const int64_t ban[6] = {4, 0, 0, 0, 1, 2}, bancnt[2] = {1, 3};
  o.banned_width = 3;
  o.banned_ids = ban;
  o.banned_count = bancnt;
  cr_assert_eq(fh_decode_from_logits(ctx, &o, &t, &out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_expect_eq(tok[0], 0);
  cr_expect_eq(tok[1], 3); /* 0, 1, 2 banned (1 despite its bias): 3 and 4 tie at 0 */
  const int64_t banall[10] = {0, 1, 2, 3, 4, 0, 1, 2, 3, 4}, cnt5[2] = {5, 0};
  o.banned_width = 5;
  o.banned_ids = banall;
  o.banned_count = cnt5;
  o.degenerate_token = 2;
  cr_assert_eq(fh_decode_from_logits(ctx, &o, &t, &out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_expect_eq(tok[0], 2);
  cr_expect_eq(fl[0], FH_DECODE_FLAG_DEGENERATE);
  cr_expect_eq(fl[1], FH_DECODE_FLAG_GREEDY);
  fh_context_destroy(ctx);
}

/* NaN and all −inf rows through the API, next to a normal row, with guard words after every
 * output; fp16 and bf16 logits give the same tokens as the same values in fp32. */
Test(ref_decode_paths, degenerate_rows_guarded) {
  float z[3 * 4] = {1, 2, 3, 4, NAN, 0, 0, 0, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
  fh_context_t* ctx = cpu();
  fh_tensor_t t = fh_tensor_2d(z, FH_DTYPE_F32, 3, 4);
  fh_decode_options_t o;
  fh_decode_options_init(&o);
  o.num_logprobs = 2;
  fh_decode_outputs_t out;
  memset(&out, 0, sizeof out);
  out.tokens = (int64_t*)tu_alloc_guarded(3 * sizeof(int64_t));
  out.lse = (float*)tu_alloc_guarded(3 * sizeof(float));
  out.topn_ids = (int64_t*)tu_alloc_guarded(6 * sizeof(int64_t));
  out.topn_logprobs = (float*)tu_alloc_guarded(6 * sizeof(float));
  out.flags = (uint32_t*)tu_alloc_guarded(3 * sizeof(uint32_t));
  cr_assert_eq(fh_decode_from_logits(ctx, &o, &t, &out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_expect(out.tokens[0] >= 0 && out.tokens[0] < 4);
  cr_expect_eq(out.tokens[1], -1);
  cr_expect_eq(out.tokens[2], -1);
  cr_expect_eq(out.flags[1], FH_DECODE_FLAG_DEGENERATE);
  cr_expect_eq(out.flags[2], FH_DECODE_FLAG_DEGENERATE);
  cr_expect(isnan(out.lse[1]) && out.lse[2] == -INFINITY);
  cr_expect(out.topn_ids[0] == 3 && out.topn_ids[1] == 2 && out.topn_ids[2] == -1 && out.topn_ids[5] == -1);
  cr_expect(isnan(out.topn_logprobs[3]));
  cr_expect(tu_guards_intact(out.tokens, 3 * sizeof(int64_t)) && tu_guards_intact(out.lse, 3 * sizeof(float)) &&
            tu_guards_intact(out.topn_ids, 6 * sizeof(int64_t)) &&
            tu_guards_intact(out.topn_logprobs, 6 * sizeof(float)) && tu_guards_intact(out.flags, 3 * sizeof(uint32_t)));
  /* fp16 and bf16 inputs of the same (representable) values give the same first token. */
  uint16_t h16[4] = {0x3c00, 0x4000, 0x4200, 0x4400}, b16[4] = {0x3f80, 0x4000, 0x4040, 0x4080};
  int64_t tk;
  fh_decode_outputs_t o1;
  memset(&o1, 0, sizeof o1);
  o1.tokens = &tk;
  fh_tensor_t th = fh_tensor_2d(h16, FH_DTYPE_F16, 1, 4), tb = fh_tensor_2d(b16, FH_DTYPE_BF16, 1, 4);
  o.num_logprobs = 0;
  cr_assert_eq(fh_decode_from_logits(ctx, &o, &th, &o1, NULL, 0), FH_SUCCESS);
  cr_expect_eq(tk, out.tokens[0]);
  cr_assert_eq(fh_decode_from_logits(ctx, &o, &tb, &o1, NULL, 0), FH_SUCCESS);
  cr_expect_eq(tk, out.tokens[0]);
  free(out.tokens);
  free(out.lse);
  free(out.topn_ids);
  free(out.topn_logprobs);
  free(out.flags);
  fh_context_destroy(ctx);
}

/* Exact top-k: ties by lowest id, NaN first, −inf as values, k = 1 and k = V; fused == logits. */
Test(ref_decode_paths, topk_exact) {
  float z[2 * 6] = {1, 3, 3, -INFINITY, 2, 3, 0, NAN, -INFINITY, 5, -INFINITY, 5};
  fh_context_t* ctx = cpu();
  fh_tensor_t t = fh_tensor_2d(z, FH_DTYPE_F32, 2, 6);
  float val[12];
  int64_t id[12];
  cr_assert_eq(fh_topk_from_logits(ctx, &t, 6, val, id, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  const int64_t want[12] = {1, 2, 5, 4, 0, 3, 1, 3, 5, 0, 2, 4};
  for (int i = 0; i < 12; ++i) cr_expect_eq(id[i], want[i], "position %d", i);
  cr_expect(val[0] == 3 && val[5] == -INFINITY && isnan(val[6]) && val[7] == 5 && val[11] == -INFINITY);
  cr_assert_eq(fh_topk_from_logits(ctx, &t, 1, val, id, NULL, 0), FH_SUCCESS);
  cr_expect(id[0] == 1 && id[1] == 1);
  build();
  fh_tensor_t tH = fh_tensor_2d(hH, FH_DTYPE_F32, B, D), tC = fh_tensor_2d(hC, FH_DTYPE_F32, NV, D);
  fh_tensor_t tb = fh_tensor_2d(hb, FH_DTYPE_F32, 1, NV), tZ = fh_tensor_2d(hZ, FH_DTYPE_F32, B, NV);
  float v1[B * 7], v2[B * 7];
  int64_t i1[B * 7], i2[B * 7];
  cr_assert_eq(fh_topk_from_logits(ctx, &tZ, 7, v1, i1, NULL, 0), FH_SUCCESS);
  cr_assert_eq(fh_topk_fused(ctx, &tH, &tC, &tb, 7, v2, i2, NULL, 0), FH_SUCCESS);
  cr_expect(memcmp(v1, v2, sizeof v1) == 0 && memcmp(i1, i2, sizeof i1) == 0);
  /* Independent check of every row: values descending, ties by id, each value is z[id]. */
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < 7; ++i) {
      cr_expect_eq(v1[b * 7 + i], hZ[b * NV + i1[b * 7 + i]]);
      if (i > 0) cr_expect(v1[b * 7 + i - 1] > v1[b * 7 + i] || (v1[b * 7 + i - 1] == v1[b * 7 + i] && i1[b * 7 + i - 1] < i1[b * 7 + i]));
      int64_t above = 0;
      for (int v = 0; v < NV; ++v) above += hZ[b * NV + v] > v1[b * 7 + i];
      cr_expect(above <= i, "row %d position %d: %lld larger values", b, i, (long long)above);
    }
  fh_context_destroy(ctx);
}

/* The token of a row depends on (seed, offset, logits) only: the same row at another batch
 * position, in another batch, gives the same token. */
Test(ref_decode_paths, batch_position_invariance) {
  build();
  fh_context_t* ctx = cpu();
  fh_decode_options_t o;
  fh_decode_options_init(&o);
  o.top_p = 0.95f;
  uint64_t seeds[B], rev_seeds[B];
  float rev[B * NV];
  for (int b = 0; b < B; ++b) {
    seeds[b] = 1000 + (uint64_t)b;
    rev_seeds[B - 1 - b] = 1000 + (uint64_t)b;
    memcpy(rev + b * NV, hZ + (B - 1 - b) * NV, NV * sizeof(float));
  }
  int64_t t1[B], t2[B];
  fh_decode_outputs_t out;
  memset(&out, 0, sizeof out);
  fh_tensor_t tZ = fh_tensor_2d(hZ, FH_DTYPE_F32, B, NV), tR = fh_tensor_2d(rev, FH_DTYPE_F32, B, NV);
  o.seed_per_row = seeds;
  out.tokens = t1;
  cr_assert_eq(fh_decode_from_logits(ctx, &o, &tZ, &out, NULL, 0), FH_SUCCESS);
  o.seed_per_row = rev_seeds;
  out.tokens = t2;
  cr_assert_eq(fh_decode_from_logits(ctx, &o, &tR, &out, NULL, 0), FH_SUCCESS);
  int differ = 0;
  for (int b = 0; b < B; ++b) {
    cr_expect_eq(t1[b], t2[B - 1 - b], "row %d", b);
    differ += t1[b] != t1[0];
  }
  cr_expect(differ > 0, "tokens should vary across rows");
  fh_context_destroy(ctx);
}

/* The keyed Gumbel-max over A equals the argmax computed chunk by chunk in any chunk order and
 * any chunk size (what a tiled kernel or a TP split does). */
Test(ref_decode_paths, gumbel_chunk_order_invariance) {
  const int64_t V = 97;
  tu_rng_t r = {5};
  double z[97];
  for (int64_t v = 0; v < V; ++v) z[v] = tu_normal(&r);
  fh_decode_scratch_t w;
  cr_assert(fh_ref_decode_scratch_init(&w, V));
  int64_t order[97];
  int mismatches = 0, distinct = 0, first = -1;
  for (int trial = 0; trial < 300; ++trial) {
    fh_decode_options_t o;
    fh_decode_options_init(&o);
    o.sampler = trial % 3 == 2 ? FH_DECODE_BREGMAN : FH_DECODE_STANDARD;
    o.top_k = trial % 3 == 1 ? 20 : 0;
    o.bregman_alpha = 0.6f;
    o.bregman_lambda = 0.01f;
    o.seed = 31;
    o.offset = (uint64_t)trial;
    fh_decode_row_params_t prm;
    fh_ref_decode_row_params(&o, 0, &prm);
    fh_decode_row_result_t res;
    fh_ref_decode_row(z, V, &prm, -1, &w, &res);
    const double* base = o.sampler == FH_DECODE_BREGMAN ? w.logq : w.s;
    const int64_t chunk = 1 + tu_randint(&r, 40), n = (V + chunk - 1) / chunk;
    for (int64_t c = 0; c < n; ++c) order[c] = c;
    for (int64_t c = n - 1; c > 0; --c) { /* Fisher–Yates */
      const int64_t j = tu_randint(&r, c + 1), t = order[c];
      order[c] = order[j];
      order[j] = t;
    }
    const int64_t tok = fh_ref_gumbel_argmax_chunked(base, w.allowed, V, prm.seed, prm.offset, chunk, order);
    mismatches += tok != res.token;
    if (first < 0) first = (int)res.token;
    distinct += res.token != first;
  }
  cr_expect_eq(mismatches, 0);
  cr_expect(distinct > 0);
  fh_ref_decode_scratch_free(&w);
}

/* Top-k and top-nσ sets do not change with temperature (T in {0.25, 1, 3, 10}). */
Test(ref_decode_paths, sets_invariant_under_temperature) {
  build();
  fh_context_t* ctx = cpu();
  const float Ts[4] = {0.25f, 1.0f, 3.0f, 10.0f};
  for (int rule = 0; rule < 2; ++rule) {
    int64_t cnt[4][B];
    for (int i = 0; i < 4; ++i) {
      fh_decode_options_t o;
      fh_decode_options_init(&o);
      o.sampler = rule ? FH_DECODE_TOP_N_SIGMA : FH_DECODE_STANDARD;
      o.top_k = 5;
      o.top_n_sigma = 1.0f;
      o.temperature = Ts[i];
      int64_t tok[B];
      fh_decode_outputs_t out;
      memset(&out, 0, sizeof out);
      out.tokens = tok;
      out.allowed_count = cnt[i];
      fh_tensor_t tZ = fh_tensor_2d(hZ, FH_DTYPE_F32, B, NV);
      cr_assert_eq(fh_decode_from_logits(ctx, &o, &tZ, &out, NULL, 0), FH_SUCCESS);
      /* the set itself, per row, from the core */
      for (int b = 0; b < B; ++b) {
        double z[NV];
        for (int v = 0; v < NV; ++v) z[v] = hZ[b * NV + v];
        fh_decode_row_params_t prm;
        fh_ref_decode_row_params(&o, b, &prm);
        fh_decode_scratch_t w, w1;
        cr_assert(fh_ref_decode_scratch_init(&w, NV) && fh_ref_decode_scratch_init(&w1, NV));
        fh_decode_row_result_t res;
        fh_ref_decode_row(z, NV, &prm, -1, &w, &res);
        prm.temperature = 1.0;
        fh_ref_decode_row(z, NV, &prm, -1, &w1, &res);
        cr_expect(memcmp(w.allowed, w1.allowed, NV) == 0, "rule %d row %d T %g", rule, b, (double)Ts[i]);
        fh_ref_decode_scratch_free(&w);
        fh_ref_decode_scratch_free(&w1);
      }
    }
    for (int b = 0; b < B; ++b)
      for (int i = 1; i < 4; ++i) cr_expect_eq(cnt[i][b], cnt[0][b]);
  }
  fh_context_destroy(ctx);
}
