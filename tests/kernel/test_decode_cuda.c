/* Suite kernel_decode: kernels/decode.cu end to end through fh_decode_from_logits with an
 * FH_BACKEND_CUDA context on the SIMT emulator, against the FH_BACKEND_CPU reference on the same
 * stored logits: every sampler (greedy, temperature, min-p, top-k, top-p and their chain,
 * top-nσ, ε, η, top-H, Bregman with α = 1 and α != 1), per-row parameter arrays (device
 * memory), sparse bias and bans, fp32/fp16/bf16 logits with a padded row stride (NaN padding),
 * B in {1, 5, 37}, V in {1, 101, 4099} (one case at V = 20011), and guard words after every
 * output.
 *
 * Rows: Gaussian logits, peaked rows (one class 12 above the rest), integer logits in [-3, 3]
 * with scattered -inf (long ties: top-k at a tie, equal Gumbel bases), and degenerate rows (a
 * NaN, a +inf, all -inf; bans that remove every class at V = 1).
 *
 * What must match. Tokens, ranks, allowed counts, flags and top-n ids: exactly (the token is a
 * keyed Gumbel-max whose keys s_v + g_v are the same fp64 numbers on both backends, the noise
 * from the same Philox words and, under the emulator, the same libm). Floats (logprob,
 * full_logprob, lse, entropy, top-n logprobs): both are one fp64 value rounded to fp32; the fp64
 * values differ only by the order of the sums (Z, F, the kept mass), a few units of 2^-53
 * relative of |lse| at these V, so |x - ref| <= 2^-23·|ref| (one fp32 ulp of the reference) +
 * 2^-40·(1 + |lse|) (the fp64 difference where ref is near 0 after the cancellation s - lse).
 * NaN must match NaN, infinities must be equal. docs/decoding.md, "CUDA backend". */
#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "fh_emu.h"
#include "fusedhead.h"
#include "test_dev_util.h"
#include "test_util.h"

typedef struct cfg {
  const char* name;
  fh_decode_sampler_t sampler;
  float T, top_p, min_p, nsig, eps, h_alpha, lambda, b_alpha;
  int64_t top_k, cand; /* top_k -1: V (off by k >= V) */
  int per_row, lists;
  int64_t nlp;
} cfg_t;

/* Defaults of fh_decode_options_init, so a cfg names only what it changes (designated
 * initializers after CFG override its fields on purpose). */
#pragma GCC diagnostic ignored "-Woverride-init"
#define CFG(nm, smp) .name = nm, .sampler = smp, .T = 1.0f, .top_p = 1.0f, .min_p = 0.0f, .nsig = 1.0f, \
  .eps = 3e-4f, .h_alpha = 0.4f, .lambda = 0.1f, .b_alpha = 1.0f, .top_k = 0, .cand = 100, .nlp = 3

static double logit_value(tu_rng_t* rng, int64_t r, int64_t j, int64_t V) {
  if (r % 9 == 4 && j == V / 2) return NAN;
  if (r % 11 == 7 && j == V / 3) return INFINITY;
  if (r % 13 == 6) return -INFINITY;
  if (r % 3 == 1) return j % 5 == 0 && j != V / 4 ? -INFINITY : (double)(tu_randint(rng, 7) - 3);
  if (r % 3 == 2) return 2.0 * tu_normal(rng) + (j == (r * 7919) % V ? 12.0 : 0.0);
  return 3.0 * tu_normal(rng);
}

static void* fetch(const void* d, size_t bytes) {
  const size_t gb = TU_GUARD_WORDS * sizeof(uint32_t);
  void* h = malloc(bytes + gb);
  cr_assert_eq(cudaMemcpy(h, d, bytes + gb, cudaMemcpyDeviceToHost), cudaSuccess);
  cr_assert(tu_guards_intact(h, bytes), "an output was written past its end");
  return h;
}

typedef struct outs {
  int64_t *tok, *rank, *cnt, *tid;
  float *lp, *flp, *lse, *ent, *tlp;
  uint32_t* flags;
} outs_t;

static void outs_alloc(outs_t* o, int64_t B, int64_t n, int dev) {
  const size_t b8 = (size_t)B * 8, b4 = (size_t)B * 4, n8 = (size_t)(B * n) * 8, n4 = (size_t)(B * n) * 4;
  void* (*al)(size_t) = dev ? alloc_out : tu_alloc_guarded;
  o->tok = al(b8), o->rank = al(b8), o->cnt = al(b8), o->tid = al(n8);
  o->lp = al(b4), o->flp = al(b4), o->lse = al(b4), o->ent = al(b4), o->tlp = al(n4);
  o->flags = al(b4);
}
static fh_decode_outputs_t outs_view(const outs_t* o) {
  fh_decode_outputs_t r = {o->tok, o->lp, o->flp, o->rank, o->lse, o->ent, o->cnt, o->tid, o->tlp, o->flags};
  return r;
}
static void outs_fetch(outs_t* h, const outs_t* d, int64_t B, int64_t n) {
  const size_t b8 = (size_t)B * 8, b4 = (size_t)B * 4, n8 = (size_t)(B * n) * 8, n4 = (size_t)(B * n) * 4;
  h->tok = fetch(d->tok, b8), h->rank = fetch(d->rank, b8), h->cnt = fetch(d->cnt, b8), h->tid = fetch(d->tid, n8);
  h->lp = fetch(d->lp, b4), h->flp = fetch(d->flp, b4), h->lse = fetch(d->lse, b4), h->ent = fetch(d->ent, b4);
  h->tlp = fetch(d->tlp, n4), h->flags = fetch(d->flags, b4);
}
static void outs_free(outs_t* o, int dev) {
  void* p[10] = {o->tok, o->rank, o->cnt, o->tid, o->lp, o->flp, o->lse, o->ent, o->tlp, o->flags};
  for (int i = 0; i < 10; ++i) dev ? (void)cudaFree(p[i]) : free(p[i]);
}

static double worst_share; /* the largest share of a float tolerance used, for the log */

static void check_float(const char* what, float got, float ref, float lse, const cfg_t* c, int64_t b) {
  if (isnan(ref) || isnan(got)) {
    cr_assert(isnan(ref) && isnan(got), "%s row %lld: %s CUDA %a CPU %a", c->name, (long long)b, what, (double)got,
              (double)ref);
    return;
  }
  if (isinf(ref) || isinf(got)) {
    cr_assert(got == ref, "%s row %lld: %s CUDA %a CPU %a", c->name, (long long)b, what, (double)got, (double)ref);
    return;
  }
  const double tol = ldexp(fabs((double)ref), -23) + ldexp(1.0 + (isfinite(lse) ? fabs((double)lse) : 0.0), -40);
  const double err = fabs((double)got - (double)ref);
  if (err / tol > worst_share) worst_share = err / tol;
  cr_assert(err <= tol, "%s row %lld: %s CUDA %.9g CPU %.9g (err %.3g, tol %.3g)", c->name, (long long)b, what,
            (double)got, (double)ref, err, tol);
}

/* Per-row arrays of a cfg with per_row set, for B rows (host copies; the device gets copies). */
typedef struct rows {
  float *T, *top_p, *min_p, *nsig, *eps, *h_alpha, *lambda;
  int64_t* top_k;
  uint64_t *seed, *offset;
  int64_t *bias_ids, *bias_count, *ban_ids, *ban_count;
  float* bias_values;
} rows_t;

enum { BIAS_W = 3, BAN_W = 2 };

static void rows_make(rows_t* r, int64_t B, int64_t V, tu_rng_t* rng) {
  r->T = malloc(B * 4), r->top_p = malloc(B * 4), r->min_p = malloc(B * 4), r->nsig = malloc(B * 4);
  r->eps = malloc(B * 4), r->h_alpha = malloc(B * 4), r->lambda = malloc(B * 4), r->top_k = malloc(B * 8);
  r->seed = malloc(B * 8), r->offset = malloc(B * 8);
  r->bias_ids = malloc(B * BIAS_W * 8), r->bias_values = malloc(B * BIAS_W * 4), r->bias_count = malloc(B * 8);
  r->ban_ids = malloc(B * BAN_W * 8), r->ban_count = malloc(B * 8);
  for (int64_t b = 0; b < B; ++b) {
    r->T[b] = b % 4 == 1 ? 0.0f : 0.5f + 0.25f * (float)(b % 3);
    r->top_p[b] = b % 2 ? 0.7f : 1.0f;
    r->min_p[b] = b % 5 == 2 ? 0.2f : 0.0f;
    r->nsig[b] = b % 6 == 5 ? 0.0f : 0.5f + 0.5f * (float)(b % 3);
    r->eps[b] = b % 2 ? 1e-3f : 0.02f;
    r->h_alpha[b] = b % 2 ? 0.4f : 1.0f;
    r->lambda[b] = 0.05f * (float)(b % 3);
    r->top_k[b] = b % 3 == 0 ? 0 : 1 + b % 7;
    r->seed[b] = 1000u + 77u * (uint64_t)b;
    r->offset[b] = 3u * (uint64_t)b + ((uint64_t)b << 33);
    r->bias_count[b] = b % 4;
    for (int i = 0; i < BIAS_W; ++i) {
      r->bias_ids[b * BIAS_W + i] = i == 2 ? r->bias_ids[b * BIAS_W] : tu_randint(rng, V); /* a repeated id */
      r->bias_values[b * BIAS_W + i] = (float)(tu_randint(rng, 13) - 6) * 0.5f;
    }
    r->ban_count[b] = b % 3;
    for (int i = 0; i < BAN_W; ++i) r->ban_ids[b * BAN_W + i] = tu_randint(rng, V);
  }
}
static void rows_free(rows_t* r) {
  void* p[15] = {r->T, r->top_p, r->min_p, r->nsig, r->eps, r->h_alpha, r->lambda, r->top_k, r->seed, r->offset,
                 r->bias_ids, r->bias_values, r->bias_count, r->ban_ids, r->ban_count};
  for (int i = 0; i < 15; ++i) free(p[i]);
}

static void options_of(const cfg_t* c, int64_t V, fh_decode_options_t* o) {
  fh_decode_options_init(o);
  o->sampler = c->sampler, o->temperature = c->T, o->top_p = c->top_p, o->min_p = c->min_p;
  o->top_n_sigma = c->nsig, o->epsilon = c->eps, o->top_h_alpha = c->h_alpha, o->bregman_lambda = c->lambda;
  o->bregman_alpha = c->b_alpha, o->top_h_candidates = c->cand;
  o->top_k = c->top_k < 0 ? V : c->top_k;
  o->seed = 0x9E3779B97F4A7C15ull, o->offset = 42;
  o->num_logprobs = c->nlp < V ? c->nlp : V;
  o->degenerate_token = V > 1 ? 1 : -1;
}

/* Sets the per-row arrays (and lists) of o to r's pointers, device copies when dev. */
static void options_rows(fh_decode_options_t* o, const cfg_t* c, const rows_t* r, int64_t B, int dev, void** keep) {
#define ROWS(field, arr, sz) o->field = dev ? (keep[n++] = to_device(r->arr, (size_t)(sz))) : (void*)r->arr
  int n = 0;
  if (c->per_row) {
    ROWS(temperature_per_row, T, B * 4);
    ROWS(top_k_per_row, top_k, B * 8);
    ROWS(top_p_per_row, top_p, B * 4);
    ROWS(min_p_per_row, min_p, B * 4);
    ROWS(top_n_sigma_per_row, nsig, B * 4);
    ROWS(epsilon_per_row, eps, B * 4);
    ROWS(top_h_alpha_per_row, h_alpha, B * 4);
    ROWS(bregman_lambda_per_row, lambda, B * 4);
    ROWS(seed_per_row, seed, B * 8);
    ROWS(offset_per_row, offset, B * 8);
  }
  if (c->lists) {
    o->bias_width = BIAS_W, o->banned_width = BAN_W;
    ROWS(bias_ids, bias_ids, B * BIAS_W * 8);
    ROWS(bias_values, bias_values, B * BIAS_W * 4);
    ROWS(bias_count, bias_count, B * 8);
    ROWS(banned_ids, ban_ids, B * BAN_W * 8);
    ROWS(banned_count, ban_count, B * 8);
  }
#undef ROWS
}

static void run_case(const cfg_t* c, fh_dtype_t dtype, int64_t B, int64_t V) {
  fh_context_t *gpu = NULL, *cpu = NULL;
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_create(&cpu, FH_BACKEND_CPU, 0), FH_SUCCESS);
  tu_rng_t rng = {(uint64_t)(B * 1000003 + V * 7919 + dtype * 31 + 17) ^ (uint64_t)strlen(c->name) << 40};
  const size_t es = fh_dtype_size(dtype);
  const int64_t stride = V + 3; /* NaN padding: read, it would make rows degenerate */
  const size_t bytes = (size_t)(B * stride) * es;
  void* h = malloc(bytes);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t j = 0; j < stride; ++j) fh_store(h, dtype, r * stride + j, j < V ? logit_value(&rng, r, j, V) : NAN);
  void* d = to_device(h, bytes);
  const fh_tensor_t th = {h, dtype, B, V, stride}, td = {d, dtype, B, V, stride};
  rows_t rw;
  rows_make(&rw, B, V, &rng);
  fh_decode_options_t oh, od;
  options_of(c, V, &oh);
  options_of(c, V, &od);
  void* keep[32] = {0};
  options_rows(&oh, c, &rw, B, 0, NULL);
  options_rows(&od, c, &rw, B, 1, keep);
  const int64_t n = oh.num_logprobs;
  outs_t ro, dvo, go;
  outs_alloc(&ro, B, n, 0);
  outs_alloc(&dvo, B, n, 1);
  size_t wsb = 0;
  cr_assert_eq(fh_decode_workspace_size(gpu, &od, B, V, 0, dtype, &wsb), FH_SUCCESS, "%s", fh_last_error());
  void* ws = NULL;
  if (wsb) cr_assert_eq(cudaMalloc(&ws, wsb), cudaSuccess);
  const fh_decode_outputs_t oc = outs_view(&ro), og = outs_view(&dvo);
  cr_assert_eq(fh_decode_from_logits(cpu, &oh, &th, &oc, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_decode_from_logits(gpu, &od, &td, &og, ws, wsb), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_check(gpu), FH_SUCCESS, "%s", fh_last_error());
  outs_fetch(&go, &dvo, B, n);
  for (int64_t b = 0; b < B; ++b) {
    cr_assert(go.tok[b] == ro.tok[b] && go.flags[b] == ro.flags[b] && go.rank[b] == ro.rank[b] &&
                  go.cnt[b] == ro.cnt[b],
              "%s dtype=%d B=%lld V=%lld row %lld: CUDA (token %lld, flags %u, rank %lld, |A| %lld) vs CPU (%lld, %u, "
              "%lld, %lld)",
              c->name, (int)dtype, (long long)B, (long long)V, (long long)b, (long long)go.tok[b], go.flags[b],
              (long long)go.rank[b], (long long)go.cnt[b], (long long)ro.tok[b], ro.flags[b], (long long)ro.rank[b],
              (long long)ro.cnt[b]);
    const float lse = ro.lse[b];
    check_float("logprob", go.lp[b], ro.lp[b], lse, c, b);
    check_float("full_logprob", go.flp[b], ro.flp[b], lse, c, b);
    check_float("lse", go.lse[b], ro.lse[b], lse, c, b);
    check_float("entropy", go.ent[b], ro.ent[b], lse, c, b);
    for (int64_t i = 0; i < n; ++i) {
      cr_assert_eq(go.tid[b * n + i], ro.tid[b * n + i], "%s row %lld: top-n id %lld", c->name, (long long)b,
                   (long long)i);
      check_float("topn_logprob", go.tlp[b * n + i], ro.tlp[b * n + i], lse, c, b);
    }
  }
  for (int i = 0; i < 32; ++i) cudaFree(keep[i]);
  cudaFree(ws), cudaFree(d), free(h);
  outs_free(&ro, 0), outs_free(&dvo, 1), outs_free(&go, 0);
  rows_free(&rw);
  fh_context_destroy(gpu), fh_context_destroy(cpu);
}

static void run_grid(const cfg_t* c) {
  static const int64_t Bs[] = {1, 5, 37}, Vs[] = {1, 101, 4099};
  static const fh_dtype_t dts[] = {FH_DTYPE_F32, FH_DTYPE_F16, FH_DTYPE_BF16};
  worst_share = 0.0;
  for (int d = 0; d < 3; ++d)
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) run_case(c, dts[d], Bs[i], Vs[j]);
  cr_log_info("%s: largest share of a float tolerance used %.3f", c->name, worst_share);
}

#define DECODE_TEST(tname, ...)          \
  Test(kernel_decode, tname) {           \
    const cfg_t c = {__VA_ARGS__};        \
    run_grid(&c);                        \
  }

DECODE_TEST(greedy, CFG("greedy", FH_DECODE_STANDARD), .T = 0.0f)
DECODE_TEST(temperature, CFG("temperature", FH_DECODE_STANDARD), .T = 0.7f, .nlp = 5)
DECODE_TEST(temperature_tiny, CFG("temperature_tiny", FH_DECODE_STANDARD), .T = 1e-3f)
DECODE_TEST(temperature_to_zero, CFG("temperature_to_zero", FH_DECODE_STANDARD), .T = 1e-20f, .top_p = 0.5f)
DECODE_TEST(min_p, CFG("min_p", FH_DECODE_STANDARD), .min_p = 0.1f)
DECODE_TEST(top_k1, CFG("top_k1", FH_DECODE_STANDARD), .top_k = 1)
DECODE_TEST(top_k5, CFG("top_k5", FH_DECODE_STANDARD), .top_k = 5, .T = 1.5f)
DECODE_TEST(top_k_V, CFG("top_k_V", FH_DECODE_STANDARD), .top_k = -1, .top_p = 1.0f)
DECODE_TEST(top_p, CFG("top_p", FH_DECODE_STANDARD), .top_p = 0.9f)
DECODE_TEST(chain, CFG("chain", FH_DECODE_STANDARD), .min_p = 0.02f, .top_k = 40, .top_p = 0.8f, .T = 1.3f)
DECODE_TEST(top_n_sigma, CFG("top_n_sigma", FH_DECODE_TOP_N_SIGMA), .nsig = 1.0f, .T = 0.8f)
DECODE_TEST(top_n_sigma_off, CFG("top_n_sigma_off", FH_DECODE_TOP_N_SIGMA), .nsig = 0.0f)
DECODE_TEST(epsilon, CFG("epsilon", FH_DECODE_EPSILON), .eps = 3e-4f)
DECODE_TEST(epsilon_fallback, CFG("epsilon_fallback", FH_DECODE_EPSILON), .eps = 0.6f)
DECODE_TEST(eta, CFG("eta", FH_DECODE_ETA), .eps = 4e-3f)
DECODE_TEST(top_h, CFG("top_h", FH_DECODE_TOP_H))
DECODE_TEST(top_h_alpha1, CFG("top_h_alpha1", FH_DECODE_TOP_H), .h_alpha = 1.0f, .cand = 7)
DECODE_TEST(bregman, CFG("bregman", FH_DECODE_BREGMAN))
DECODE_TEST(bregman_lambda0, CFG("bregman_lambda0", FH_DECODE_BREGMAN), .lambda = 0.0f)
DECODE_TEST(bregman_alpha_half, CFG("bregman_alpha_half", FH_DECODE_BREGMAN), .lambda = 0.02f, .b_alpha = 0.5f)
DECODE_TEST(bregman_alpha2, CFG("bregman_alpha2", FH_DECODE_BREGMAN), .lambda = 0.02f, .b_alpha = 2.0f)
DECODE_TEST(per_row_standard, CFG("per_row_standard", FH_DECODE_STANDARD), .per_row = 1, .lists = 1, .nlp = 4)
DECODE_TEST(per_row_sigma, CFG("per_row_sigma", FH_DECODE_TOP_N_SIGMA), .per_row = 1, .lists = 1)
DECODE_TEST(per_row_eta, CFG("per_row_eta", FH_DECODE_ETA), .per_row = 1, .lists = 1)
DECODE_TEST(per_row_top_h, CFG("per_row_top_h", FH_DECODE_TOP_H), .per_row = 1, .lists = 1)
DECODE_TEST(per_row_bregman, CFG("per_row_bregman", FH_DECODE_BREGMAN), .per_row = 1, .lists = 1, .b_alpha = 0.7f)
DECODE_TEST(lists_only, CFG("lists_only", FH_DECODE_STANDARD), .lists = 1, .top_k = 3)

/* A vocabulary of several scan tiles and more than 2^14 ids (fp32 only). */
Test(kernel_decode, large_vocab) {
  const cfg_t cs[] = {{CFG("large_top_p", FH_DECODE_STANDARD), .top_p = 0.95f, .nlp = 8},
                      {CFG("large_bregman", FH_DECODE_BREGMAN), .lambda = 0.0f}};
  for (int i = 0; i < 2; ++i) run_case(&cs[i], FH_DTYPE_F32, 3, 20011);
}

/* A per-row value out of range is found on the device: the call succeeds (no host sync), the row
 * reports as degenerate, and fh_context_check returns FH_ERR_INVALID_ARGUMENT once. */
Test(kernel_decode, device_checks_per_row_values) {
  fh_context_t* gpu = NULL;
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  const int64_t B = 3, V = 50;
  float z[3 * 50];
  for (int i = 0; i < B * V; ++i) z[i] = (float)(i % 7);
  const float T[3] = {1.0f, -1.0f, 0.5f};
  void *dz = to_device(z, sizeof z), *dT = to_device(T, sizeof T);
  int64_t* dtok = alloc_out(B * 8);
  uint32_t* dfl = alloc_out(B * 4);
  fh_decode_options_t o;
  fh_decode_options_init(&o);
  o.temperature_per_row = dT;
  o.degenerate_token = 7;
  const fh_tensor_t t = {dz, FH_DTYPE_F32, B, V, V};
  fh_decode_outputs_t out = {0};
  out.tokens = dtok, out.flags = dfl;
  size_t wsb = 0;
  cr_assert_eq(fh_decode_workspace_size(gpu, &o, B, V, 0, FH_DTYPE_F32, &wsb), FH_SUCCESS, "%s", fh_last_error());
  void* ws = NULL;
  cr_assert_eq(cudaMalloc(&ws, wsb), cudaSuccess);
  cr_assert_eq(fh_decode_from_logits(gpu, &o, &t, &out, ws, wsb), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_check(gpu), FH_ERR_INVALID_ARGUMENT);
  cr_assert(strstr(fh_last_error(), "decoding per-row parameter") != NULL, "%s", fh_last_error());
  cr_assert_eq(fh_context_check(gpu), FH_SUCCESS, "reported once");
  int64_t* tok = fetch(dtok, B * 8);
  uint32_t* fl = fetch(dfl, B * 4);
  cr_assert_eq(tok[1], 7);
  cr_assert_eq(fl[1], FH_DECODE_FLAG_DEGENERATE);
  cr_assert(tok[0] >= 0 && tok[0] < V && tok[2] >= 0 && tok[2] < V && fl[0] == 0 && fl[2] == 0);
  free(tok), free(fl);
  cudaFree(ws), cudaFree(dz), cudaFree(dT), cudaFree(dtok), cudaFree(dfl);
  fh_context_destroy(gpu);
}

/* Fused decoding has no CUDA kernel yet: it says so by name. */
Test(kernel_decode, fused_unsupported) {
  fh_context_t* gpu = NULL;
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  fh_decode_options_t o;
  fh_decode_options_init(&o);
  size_t wsb = 0;
  cr_assert_eq(fh_decode_workspace_size(gpu, &o, 2, 10, 4, FH_DTYPE_F32, &wsb), FH_ERR_UNSUPPORTED);
  cr_assert(strstr(fh_last_error(), "fused decoding") != NULL, "%s", fh_last_error());
  fh_context_destroy(gpu);
}
