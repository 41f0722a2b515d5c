/* Decoding on vocabulary shards (fusedhead_shard.h) with simulated ranks: each rank's candidates
 * and Gumbel winner, gathered in rank order and merged, must give bitwise the tokens (and top-n
 * ids, allowed counts, flags) of fh_decode_fused on the whole head, for many seeds, uneven and
 * empty shards, greedy, plain sampling, top-k, min-p, sparse bias and bans, and degenerate rows.
 * lse, entropy and log-probabilities come from merged fp64 sums rounded once to fp32: they may
 * differ from the single-device value by the rounding of that last step, so 4 fp32 ulps
 * (rtol 5e-7) with atol 1e-6 for values near 0. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fusedhead.h"
#include "test_util.h"

#define B 9
#define V 53
#define D 5
#define MAXP 4

typedef struct split {
  int64_t P;
  int64_t size[MAXP];
} split_t;

static const split_t SPL[] = {{1, {53}}, {2, {26, 27}}, {3, {7, 0, 46}}, {4, {20, 3, 19, 11}}};

typedef struct res {
  int64_t tok[B], cnt[B], topn[B * 4];
  float lp[B], flp[B], lse[B], ent[B], topl[B * 4];
  uint32_t flags[B];
} res_t;

static fh_decode_outputs_t outs(res_t* r, int with_rank) {
  static int64_t rank[B];
  fh_decode_outputs_t o = {r->tok, r->lp, r->flp, with_rank ? rank : NULL, r->lse, r->ent, r->cnt, r->topn,
                           r->topl, r->flags};
  return o;
}

static float Hm[B * D], Cm[V * D], bm[V];

static void init_head(uint64_t seed) {
  tu_rng_t r = {seed};
  for (int i = 0; i < B * D; ++i) Hm[i] = (float)tu_normal(&r);
  for (int i = 0; i < V * D; ++i) Cm[i] = (float)(0.8 * tu_normal(&r));
  for (int i = 0; i < V; ++i) bm[i] = (float)(0.5 * tu_normal(&r));
  for (int k = 0; k < D; ++k) Cm[40 * D + k] = Cm[3 * D + k]; /* tied logits across ranks */
  bm[40] = bm[3];
  Hm[5 * D + 2] = NAN; /* row 5 is degenerate */
}

/* Returns the combine status; fills r. */
static fh_status_t sharded(const fh_decode_options_t* o, const split_t* s, int64_t K, res_t* r) {
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  const int64_t W = FH_SHARD_DECODE_WIDTH(K);
  double* g = (double*)malloc(sizeof(double) * (size_t)(s->P * B * W));
  fh_tensor_t tH = fh_tensor_2d(Hm, FH_DTYPE_F32, B, D);
  int64_t a = 0;
  for (int64_t k = 0; k < s->P; ++k) {
    fh_shard_t sh = {a, s->size[k], V};
    fh_tensor_t tC = fh_tensor_2d(Cm + a * D, FH_DTYPE_F32, s->size[k], D);
    fh_tensor_t tb = fh_tensor_2d(bm + a, FH_DTYPE_F32, 1, s->size[k]);
    cr_assert_eq(fh_decode_shard_candidates(ctx, o, &sh, &tH, &tC, &tb, K, g + k * B * W), FH_SUCCESS, "%s",
                 fh_last_error());
    a += s->size[k];
  }
  fh_decode_outputs_t out = outs(r, 0);
  fh_status_t st = fh_decode_shard_combine(ctx, o, B, V, s->P, K, g, &out);
  free(g);
  fh_context_destroy(ctx);
  return st;
}

static void whole(const fh_decode_options_t* o, res_t* r) {
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  fh_tensor_t tH = fh_tensor_2d(Hm, FH_DTYPE_F32, B, D), tC = fh_tensor_2d(Cm, FH_DTYPE_F32, V, D);
  fh_tensor_t tb = fh_tensor_2d(bm, FH_DTYPE_F32, 1, V);
  fh_decode_outputs_t out = outs(r, 1);
  cr_assert_eq(fh_decode_fused(ctx, o, &tH, &tC, &tb, &out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  fh_context_destroy(ctx);
}

static int close_f(const float* a, const float* b, int n) {
  for (int i = 0; i < n; ++i) {
    if (isnan(a[i]) && isnan(b[i])) continue;
    if (a[i] == b[i]) continue;
    if (!(fabsf(a[i] - b[i]) <= 1e-6f + 5e-7f * fabsf(b[i]))) return 0;
  }
  return 1;
}

static void compare(const char* name, const fh_decode_options_t* o, int64_t K) {
  res_t w, s;
  whole(o, &w);
  for (size_t k = 0; k < sizeof SPL / sizeof SPL[0]; ++k) {
    memset(&s, 0, sizeof s);
    cr_assert_eq(sharded(o, &SPL[k], K, &s), FH_SUCCESS, "%s split %zu: %s", name, k, fh_last_error());
    cr_expect(memcmp(w.tok, s.tok, sizeof w.tok) == 0, "%s split %zu: tokens differ (row 0: %lld vs %lld)", name, k,
              (long long)w.tok[0], (long long)s.tok[0]);
    cr_expect(memcmp(w.cnt, s.cnt, sizeof w.cnt) == 0, "%s split %zu: allowed counts differ", name, k);
    cr_expect(memcmp(w.flags, s.flags, sizeof w.flags) == 0, "%s split %zu: flags differ", name, k);
    const int n = (int)(B * o->num_logprobs);
    cr_expect(memcmp(w.topn, s.topn, sizeof(int64_t) * (size_t)n) == 0, "%s split %zu: top-n ids differ", name, k);
    cr_expect(close_f(s.lp, w.lp, B) && close_f(s.flp, w.flp, B) && close_f(s.lse, w.lse, B) &&
                  close_f(s.ent, w.ent, B) && close_f(s.topl, w.topl, n),
              "%s split %zu: log-probabilities or statistics differ beyond fp32 rounding", name, k);
  }
}

static fh_decode_options_t base(void) {
  fh_decode_options_t o;
  fh_decode_options_init(&o);
  o.num_logprobs = 4;
  return o;
}

/* Many keys per case: the sampled token changes with the offset, and each must match. */
#define EACH_OFFSET(o, body)                                \
  for (uint64_t off = 0; off < 24; ++off) {                 \
    (o).offset = off;                                       \
    (o).seed = 0x5eed0000u + off * 7919u;                   \
    body;                                                   \
  }

Test(ref_shard_decode, greedy_and_plain_sampling) {
  init_head(11);
  fh_decode_options_t o = base();
  o.temperature = 0.0f;
  compare("greedy", &o, 4);
  o.temperature = 0.9f;
  EACH_OFFSET(o, compare("plain", &o, 4));
  o.temperature = 3.0f;
  EACH_OFFSET(o, compare("hot", &o, 4));
}

Test(ref_shard_decode, top_k_and_min_p) {
  init_head(12);
  fh_decode_options_t o = base();
  o.top_k = 5;
  EACH_OFFSET(o, compare("top-k 5", &o, 6));
  o.top_k = 1;
  EACH_OFFSET(o, compare("top-k 1", &o, 4));
  o.top_k = 0;
  o.min_p = 0.2f;
  EACH_OFFSET(o, compare("min-p", &o, V));
  o.top_k = 7;
  o.min_p = 0.05f;
  o.temperature = 1.7f;
  EACH_OFFSET(o, compare("top-k 7 + min-p", &o, 8));
}

/* top-p after top-k or min-p: its sums run over their survivors, which the candidates hold. */
Test(ref_shard_decode, top_p_after_top_k_or_min_p) {
  init_head(16);
  fh_decode_options_t o = base();
  o.top_k = 8;
  o.top_p = 0.7f;
  EACH_OFFSET(o, compare("top-k 8 + top-p", &o, 10));
  o.top_k = 0;
  o.min_p = 0.1f;
  o.top_p = 0.5f;
  o.temperature = 2.0f;
  EACH_OFFSET(o, compare("min-p + top-p", &o, V));
}

Test(ref_shard_decode, bias_bans_per_row) {
  init_head(13);
  fh_decode_options_t o = base();
  int64_t bias_ids[B * 2], bias_count[B], ban_ids[B * 2], ban_count[B];
  float bias_vals[B * 2], temps[B];
  uint64_t seeds[B];
  for (int b = 0; b < B; ++b) {
    bias_ids[2 * b] = (b * 7) % V, bias_ids[2 * b + 1] = 40, bias_vals[2 * b] = 3.0f, bias_vals[2 * b + 1] = 1.5f;
    bias_count[b] = b % 3;
    ban_ids[2 * b] = 3, ban_ids[2 * b + 1] = (b * 11) % V, ban_count[b] = b % 2 ? 2 : 0;
    temps[b] = b == 2 ? 0.0f : 0.5f + 0.2f * (float)b;
    seeds[b] = 77u * (uint64_t)b + 1;
  }
  o.bias_width = 2, o.bias_ids = bias_ids, o.bias_values = bias_vals, o.bias_count = bias_count;
  o.banned_width = 2, o.banned_ids = ban_ids, o.banned_count = ban_count;
  o.temperature_per_row = temps;
  o.seed_per_row = seeds;
  EACH_OFFSET(o, compare("bias and bans", &o, 4));
  o.top_k = 3;
  EACH_OFFSET(o, compare("bias, bans, top-k", &o, 4));
}

/* min-p keeps more tokens than K lists: the merge must refuse (not guess), and succeed with K = V;
 * rules that need unlisted mass are refused; rank must be NULL. */
Test(ref_shard_decode, refusals) {
  init_head(14);
  fh_decode_options_t o = base();
  o.min_p = 1e-4f;
  res_t r;
  cr_expect_eq(sharded(&o, &SPL[1], 4, &r), FH_ERR_UNSUPPORTED);
  cr_expect(strstr(fh_last_error(), "larger K") != NULL, "%s", fh_last_error());
  cr_expect_eq(sharded(&o, &SPL[1], V, &r), FH_SUCCESS, "%s", fh_last_error());
  o.min_p = 0.0f;
  o.top_p = 0.9f;
  cr_expect_eq(sharded(&o, &SPL[1], 8, &r), FH_ERR_UNSUPPORTED);
  cr_expect(strstr(fh_last_error(), "top-p") != NULL, "%s", fh_last_error());
  o.top_p = 1.0f;
  o.num_logprobs = 9;
  cr_expect_eq(sharded(&o, &SPL[1], 8, &r), FH_ERR_INVALID_ARGUMENT);
}

/* Joint top-k/top-p sums top-p's mass over every min-p survivor (docs/decoding.md): exact when
 * the candidates list them all (K = V, or min-p cutting inside the lists), refused otherwise;
 * p-less (not FH_DECODE_STANDARD) is refused. */
Test(ref_shard_decode, joint_top_k_top_p_and_p_less) {
  init_head(17);
  fh_decode_options_t o = base();
  o.top_k_top_p_order = FH_DECODE_TOP_K_TOP_P_JOINT;
  o.top_k = 8;
  o.top_p = 0.7f;
  EACH_OFFSET(o, compare("joint, K = V", &o, V));
  res_t r;
  cr_expect_eq(sharded(&o, &SPL[1], 10, &r), FH_ERR_UNSUPPORTED);
  cr_expect(strstr(fh_last_error(), "joint") != NULL, "%s", fh_last_error());
  o.min_p = 0.1f;
  o.temperature = 2.0f;
  EACH_OFFSET(o, compare("joint after min-p", &o, V));
  o = base();
  o.sampler = FH_DECODE_P_LESS;
  cr_expect_eq(sharded(&o, &SPL[1], V, &r), FH_ERR_UNSUPPORTED);
}

/* From logits: each rank's slice is a column block of the [B x V] logits (row stride V). */
Test(ref_shard_decode, from_logits) {
  init_head(15);
  float L[B * V];
  for (int b = 0; b < B; ++b)
    for (int v = 0; v < V; ++v) {
      double z = bm[v];
      for (int k = 0; k < D; ++k) z += (double)Hm[b * D + k] * Cm[v * D + k];
      L[b * V + v] = (float)z;
    }
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  fh_decode_options_t o = base();
  o.top_k = 6;
  const int64_t K = 8, W = FH_SHARD_DECODE_WIDTH(8);
  double g[4 * B * FH_SHARD_DECODE_WIDTH(8)];
  for (uint64_t off = 0; off < 24; ++off) {
    o.offset = off;
    res_t w, s;
    fh_tensor_t all = fh_tensor_2d(L, FH_DTYPE_F32, B, V);
    fh_decode_outputs_t ow = outs(&w, 1), os = outs(&s, 0);
    cr_assert_eq(fh_decode_from_logits(ctx, &o, &all, &ow, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
    const split_t* sp = &SPL[3];
    int64_t a = 0;
    for (int64_t k = 0; k < sp->P; ++k) {
      fh_shard_t sh = {a, sp->size[k], V};
      fh_tensor_t part = {L + a, FH_DTYPE_F32, B, sp->size[k], V};
      cr_assert_eq(fh_decode_shard_candidates_from_logits(ctx, &o, &sh, &part, K, g + k * B * W), FH_SUCCESS, "%s",
                   fh_last_error());
      a += sp->size[k];
    }
    cr_assert_eq(fh_decode_shard_combine(ctx, &o, B, V, sp->P, K, g, &os), FH_SUCCESS, "%s", fh_last_error());
    cr_expect(memcmp(w.tok, s.tok, sizeof w.tok) == 0, "offset %llu: tokens differ", (unsigned long long)off);
    cr_expect(memcmp(w.topn, s.topn, sizeof(int64_t) * B * 4) == 0, "offset %llu: top-n ids differ",
              (unsigned long long)off);
  }
  fh_context_destroy(ctx);
}
