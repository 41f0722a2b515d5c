/* The decoding comparisons shared by the kernel suite (tests/kernel/test_decode_cuda.c, on the
 * emulator) and the GPU suite (tests/gpu/test_gpu_decode.c, on a real device): inputs, options,
 * per-row arrays, device outputs with guard words, and the comparison with the CPU backend whose
 * rules and tolerances are stated in test_decode_cuda.c. Header-only (static inline), so each
 * suite compiles what it uses. */
#ifndef FH_TEST_DECODE_COMMON_H
#define FH_TEST_DECODE_COMMON_H

#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "fusedhead.h"
#include "test_dev_util.h"
#include "test_util.h"
#include "ref/decode_ref.h"

typedef struct cfg {
  const char* name;
  fh_decode_sampler_t sampler;
  float T, top_p, min_p, nsig, eps, h_alpha, lambda, b_alpha;
  int64_t top_k, cand; /* top_k -1: V (off by k >= V) */
  int per_row, lists;
  int64_t nlp;
  fh_decode_top_k_top_p_order_t order; /* 0: FH_DECODE_TOP_K_FIRST */
} cfg_t;

/* Defaults of fh_decode_options_init, so a cfg names only what it changes (designated
 * initializers after CFG override its fields on purpose). */
#pragma GCC diagnostic ignored "-Woverride-init"
#define CFG(nm, smp) .name = nm, .sampler = smp, .T = 1.0f, .top_p = 1.0f, .min_p = 0.0f, .nsig = 1.0f, \
  .eps = 3e-4f, .h_alpha = 0.4f, .lambda = 0.1f, .b_alpha = 1.0f, .top_k = 0, .cand = 100, .nlp = 3

static inline double logit_value(tu_rng_t* rng, int64_t r, int64_t j, int64_t V) {
  if (r % 9 == 4 && j == V / 2) return NAN;
  if (r % 11 == 7 && j == V / 3) return INFINITY;
  if (r % 13 == 6) return -INFINITY;
  if (r % 3 == 1) return j % 5 == 0 && j != V / 4 ? -INFINITY : (double)(tu_randint(rng, 7) - 3);
  if (r % 3 == 2) return 2.0 * tu_normal(rng) + (j == (r * 7919) % V ? 12.0 : 0.0);
  return 3.0 * tu_normal(rng);
}

static inline void* fetch(const void* d, size_t bytes) {
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

static inline void outs_alloc(outs_t* o, int64_t B, int64_t n, int dev) {
  const size_t b8 = (size_t)B * 8, b4 = (size_t)B * 4, n8 = (size_t)(B * n) * 8, n4 = (size_t)(B * n) * 4;
  void* (*al)(size_t) = dev ? alloc_out : tu_alloc_guarded;
  o->tok = al(b8), o->rank = al(b8), o->cnt = al(b8), o->tid = al(n8);
  o->lp = al(b4), o->flp = al(b4), o->lse = al(b4), o->ent = al(b4), o->tlp = al(n4);
  o->flags = al(b4);
}
static inline fh_decode_outputs_t outs_view(const outs_t* o) {
  fh_decode_outputs_t r = {o->tok, o->lp, o->flp, o->rank, o->lse, o->ent, o->cnt, o->tid, o->tlp, o->flags};
  return r;
}
static inline void outs_fetch(outs_t* h, const outs_t* d, int64_t B, int64_t n) {
  const size_t b8 = (size_t)B * 8, b4 = (size_t)B * 4, n8 = (size_t)(B * n) * 8, n4 = (size_t)(B * n) * 4;
  h->tok = fetch(d->tok, b8), h->rank = fetch(d->rank, b8), h->cnt = fetch(d->cnt, b8), h->tid = fetch(d->tid, n8);
  h->lp = fetch(d->lp, b4), h->flp = fetch(d->flp, b4), h->lse = fetch(d->lse, b4), h->ent = fetch(d->ent, b4);
  h->tlp = fetch(d->tlp, n4), h->flags = fetch(d->flags, b4);
}
static inline void outs_free(outs_t* o, int dev) {
  void* p[10] = {o->tok, o->rank, o->cnt, o->tid, o->lp, o->flp, o->lse, o->ent, o->tlp, o->flags};
  for (int i = 0; i < 10; ++i) dev ? (void)cudaFree(p[i]) : free(p[i]);
}

static double worst_share; /* the largest share of a float tolerance used, for the log */

static inline void check_float(const char* what, float got, float ref, float lse, const cfg_t* c, int64_t b) {
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

static inline void rows_make(rows_t* r, int64_t B, int64_t V, tu_rng_t* rng) {
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
static inline void rows_free(rows_t* r) {
  void* p[15] = {r->T, r->top_p, r->min_p, r->nsig, r->eps, r->h_alpha, r->lambda, r->top_k, r->seed, r->offset,
                 r->bias_ids, r->bias_values, r->bias_count, r->ban_ids, r->ban_count};
  for (int i = 0; i < 15; ++i) free(p[i]);
}

static inline void options_of(const cfg_t* c, int64_t V, fh_decode_options_t* o) {
  fh_decode_options_init(o);
  o->sampler = c->sampler, o->temperature = c->T, o->top_p = c->top_p, o->min_p = c->min_p;
  o->top_n_sigma = c->nsig, o->epsilon = c->eps, o->top_h_alpha = c->h_alpha, o->bregman_lambda = c->lambda;
  o->bregman_alpha = c->b_alpha, o->top_h_candidates = c->cand, o->top_k_top_p_order = c->order;
  o->top_k = c->top_k < 0 ? V : c->top_k;
  o->seed = 0x9E3779B97F4A7C15ull, o->offset = 42;
  o->num_logprobs = c->nlp < V ? c->nlp : V;
  o->degenerate_token = V > 1 ? 1 : -1;
}

/* Sets the per-row arrays (and lists) of o to r's pointers, device copies when dev. */
static inline void options_rows(fh_decode_options_t* o, const cfg_t* c, const rows_t* r, int64_t B, int dev, void** keep) {
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

/* On real hardware the noise −ln(−ln u) goes through CUDA's fp64 libm (docs/decoding.md, "CUDA
 * backend"), so a token may differ from the CPU's when the two best keys of the row are nearly
 * equal. Returns 1 when `got` is the reference's runner-up and the best two keys
 * (log q_v + g_v, the reference's own scratch) are within 1e-13 relative; the caller counts it. */
static inline int near_tie(const fh_tensor_t* th, const fh_decode_options_t* oh, int64_t b, int64_t got) {
  const int64_t V = th->cols;
  double* z = malloc((size_t)V * sizeof(double));
  for (int64_t v = 0; v < V; ++v) z[v] = fh_load(th->data, th->dtype, b * th->row_stride + v);
  fh_ref_decode_bias_bans(oh, b, 0, V, z);
  fh_decode_row_params_t prm;
  fh_ref_decode_row_params(oh, b, &prm);
  fh_decode_scratch_t w;
  cr_assert(fh_ref_decode_scratch_init(&w, V));
  fh_decode_row_result_t r;
  fh_ref_decode_row(z, V, &prm, oh->degenerate_token, &w, &r);
  double k1 = -INFINITY, k2 = -INFINITY;
  int64_t i1 = -1, i2 = -1;
  for (int64_t v = 0; v < V; ++v) {
    if (!w.allowed[v]) continue;
    const double key = w.logq[v] + fh_gumbel_noise(prm.seed, prm.offset, (uint64_t)v);
    if (i1 < 0 || key > k1) k2 = k1, i2 = i1, k1 = key, i1 = v;
    else if (i2 < 0 || key > k2) k2 = key, i2 = v;
  }
  const int ok = !(r.flags & FH_DECODE_FLAG_GREEDY) && i1 == r.token && i2 == got && k1 - k2 <= 1e-13 * fmax(1.0, fabs(k1));
  fh_ref_decode_scratch_free(&w);
  free(z);
  return ok;
}

static int near_ties_seen; /* tokens accepted by near_tie, for the log */

/* Compares the CUDA outputs go with the CPU's ro row by row (rules in test_decode_cuda.c); flag
 * bits in `ignore` are masked from the CUDA flags. With th, a token that is the CPU's runner-up
 * at a near tie is accepted and counted (near_tie). Returns the rows whose CUDA flags carried
 * FH_DECODE_FLAG_SECOND_PASS. */
static inline int64_t compare_outs(const cfg_t* c, const outs_t* gp, const outs_t* rp, int64_t B, int64_t V, int64_t n,
                                   fh_dtype_t dtype, const fh_tensor_t* th, const fh_decode_options_t* oh,
                                   uint32_t ignore) {
  const outs_t go = *gp, ro = *rp;
  int64_t second = 0;
  for (int64_t b = 0; b < B; ++b) {
    second += (go.flags[b] & FH_DECODE_FLAG_SECOND_PASS) != 0;
    const uint32_t gf = go.flags[b] & ~ignore;
    if (th && go.tok[b] != ro.tok[b] && near_tie(th, oh, b, go.tok[b])) {
      ++near_ties_seen;
      continue;
    }
    cr_assert(go.tok[b] == ro.tok[b] && gf == ro.flags[b] && go.rank[b] == ro.rank[b] && go.cnt[b] == ro.cnt[b],
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
  return second;
}

/* What every CUDA-against-CPU decode comparison sets up: the per-row arrays and lists (rows_make),
 * host (oh) and device (od) options, host and device outputs, and the CUDA workspace for D
 * (0: from logits). */
typedef struct dec_setup {
  rows_t rw;
  fh_decode_options_t oh, od;
  void* keep[32];
  int64_t n;
  outs_t ro, dvo, go;
  fh_decode_outputs_t oc, og;
  void* ws;
  size_t wsb;
} dec_setup_t;

static inline void setup_begin(dec_setup_t* u, fh_context_t* gpu, const cfg_t* c, int64_t B, int64_t V, int64_t D,
                               fh_dtype_t dtype, tu_rng_t* rng) {
  memset(u, 0, sizeof *u);
  rows_make(&u->rw, B, V, rng);
  options_of(c, V, &u->oh);
  options_of(c, V, &u->od);
  options_rows(&u->oh, c, &u->rw, B, 0, NULL);
  options_rows(&u->od, c, &u->rw, B, 1, u->keep);
  u->n = u->oh.num_logprobs;
  outs_alloc(&u->ro, B, u->n, 0);
  outs_alloc(&u->dvo, B, u->n, 1);
  cr_assert_eq(fh_decode_workspace_size(gpu, &u->od, B, V, D, dtype, &u->wsb), FH_SUCCESS, "%s", fh_last_error());
  if (u->wsb) cr_assert_eq(cudaMalloc(&u->ws, u->wsb), cudaSuccess);
  u->oc = outs_view(&u->ro);
  u->og = outs_view(&u->dvo);
}

/* Frees what setup_begin allocated and the fetched outputs u->go. */
static inline void setup_end(dec_setup_t* u) {
  for (int i = 0; i < 32; ++i) cudaFree(u->keep[i]);
  cudaFree(u->ws);
  outs_free(&u->ro, 0), outs_free(&u->dvo, 1), outs_free(&u->go, 0);
  rows_free(&u->rw);
}

static inline void run_case(const cfg_t* c, fh_dtype_t dtype, int64_t B, int64_t V, int allow_near_ties) {
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
  dec_setup_t u;
  setup_begin(&u, gpu, c, B, V, 0, dtype, &rng);
  cr_assert_eq(fh_decode_from_logits(cpu, &u.oh, &th, &u.oc, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_decode_from_logits(gpu, &u.od, &td, &u.og, u.ws, u.wsb), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_check(gpu), FH_SUCCESS, "%s", fh_last_error());
  outs_fetch(&u.go, &u.dvo, B, u.n);
  compare_outs(c, &u.go, &u.ro, B, V, u.n, dtype, allow_near_ties ? &th : NULL, &u.oh, 0u);
  setup_end(&u);
  cudaFree(d), free(h);
  fh_context_destroy(gpu), fh_context_destroy(cpu);
}

/* The fused comparison (kernels/decode_fused.cu) on exact inputs: H and C hold multiples of 1/2
 * in [-1, 1] (rows r % 5 == 1 scaled by 4: peaked), the bias multiples of 1/4 with −inf at
 * v % 97 == 13, rows r % 7 == 3 of H zero (every logit equals the bias: ties across the
 * vocabulary) and a NaN in rows r % 9 == 5 (degenerate), so every fp32 tensor-core logit equals
 * the reference's fp64 dot product. */
static inline double fused_h_value(tu_rng_t* rng, int64_t r, int64_t j) {
  if (r % 7 == 3) return 0.0;
  if (r % 9 == 5 && j == 3) return NAN;
  const double x = 0.5 * (double)(tu_randint(rng, 5) - 2);
  return r % 5 == 1 ? 4.0 * x : x;
}

/* Optional probe of the bytes of C a fused call reads (the emulator's watched range): `watch`
 * before the call, `read` after it. */
typedef struct fused_probe {
  void (*watch)(const void* base, uint64_t bytes);
  uint64_t (*read)(void);
} fused_probe_t;

/* Runs one fused case on both backends and compares them (compare_outs); with allow_near_ties the
 * host logits (exact in fp32) back the near-tie allowance of real hardware. With a probe, C must
 * be read once per row block of 128 rows, plus once per row block holding a fallback row (the
 * 16-byte path: rows here are 16-byte aligned). Returns the rows decoded by the fallback. */
static inline int64_t run_fused(const cfg_t* c, fh_dtype_t dtype, int64_t B, int64_t V, int64_t D, int with_bias,
                                int allow_near_ties, const fused_probe_t* probe) {
  fh_context_t *gpu = NULL, *cpu = NULL;
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_create(&cpu, FH_BACKEND_CPU, 0), FH_SUCCESS);
  tu_rng_t rng = {(uint64_t)(B * 1000003 + V * 7919 + dtype * 31 + 29) ^ (uint64_t)strlen(c->name) << 40};
  const size_t es = fh_dtype_size(dtype);
  void* hh = malloc((size_t)(B * D) * es + 1);
  void* hc = malloc((size_t)(V * D) * es + 1);
  void* hb = malloc((size_t)V * es + 1);
  float* hz = malloc((size_t)(B * V) * sizeof(float) + 1);
  cr_assert(hh && hc && hb && hz);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t j = 0; j < D; ++j) fh_store(hh, dtype, r * D + j, fused_h_value(&rng, r, j));
  for (int64_t v = 0; v < V; ++v)
    for (int64_t j = 0; j < D; ++j) fh_store(hc, dtype, v * D + j, 0.5 * (double)(tu_randint(&rng, 5) - 2));
  for (int64_t v = 0; v < V; ++v)
    fh_store(hb, dtype, v, v % 97 == 13 && V > 1 ? -INFINITY : 0.25 * (double)(tu_randint(&rng, 9) - 4));
  for (int64_t r = 0; r < B; ++r)
    for (int64_t v = 0; v < V; ++v) {
      double z = with_bias ? fh_load(hb, dtype, v) : 0.0;
      for (int64_t j = 0; j < D; ++j) z += fh_load(hh, dtype, r * D + j) * fh_load(hc, dtype, v * D + j);
      hz[r * V + v] = (float)z;
    }
  void *dh = to_device(hh, (size_t)(B * D) * es), *dc = to_device(hc, (size_t)(V * D) * es);
  void* db = to_device(hb, (size_t)V * es);
  const fh_tensor_t tH = {hh, dtype, B, D, D}, tC = {hc, dtype, V, D, D}, tb = {hb, dtype, 1, V, V};
  const fh_tensor_t dH = {dh, dtype, B, D, D}, dC = {dc, dtype, V, D, D}, dbt = {db, dtype, 1, V, V};
  const fh_tensor_t tz = {hz, FH_DTYPE_F32, B, V, V};
  dec_setup_t u;
  setup_begin(&u, gpu, c, B, V, D, dtype, &rng);
  cr_assert_eq(fh_decode_fused(cpu, &u.oh, &tH, &tC, with_bias ? &tb : NULL, &u.oc, NULL, 0), FH_SUCCESS, "%s",
               fh_last_error());
  if (probe) probe->watch(dc, (uint64_t)(V * D) * es);
  cr_assert_eq(fh_decode_fused(gpu, &u.od, &dH, &dC, with_bias ? &dbt : NULL, &u.og, u.ws, u.wsb), FH_SUCCESS, "%s",
               fh_last_error());
  const uint64_t c_read = probe ? probe->read() : 0;
  cr_assert_eq(fh_context_check(gpu), FH_SUCCESS, "%s", fh_last_error());
  outs_fetch(&u.go, &u.dvo, B, u.n);
  if (probe) {
    int64_t passes = 0;
    for (int64_t r0 = 0; r0 < B; r0 += 128) {
      int again = 0;
      for (int64_t b = r0; b < B && b < r0 + 128; ++b) again |= (u.go.flags[b] & FH_DECODE_FLAG_SECOND_PASS) != 0;
      passes += 1 + again;
    }
    cr_assert_eq(c_read, (uint64_t)passes * (uint64_t)(V * D) * es,
                 "%s dtype=%d B=%lld V=%lld: %llu bytes of C read, expected %lld pass(es) of %lld", c->name,
                 (int)dtype, (long long)B, (long long)V, (unsigned long long)c_read, (long long)passes,
                 (long long)(V * D) * (long long)es);
  }
  const int64_t second = compare_outs(c, &u.go, &u.ro, B, V, u.n, dtype, allow_near_ties ? &tz : NULL, &u.oh,
                                      FH_DECODE_FLAG_SECOND_PASS);
  setup_end(&u);
  cudaFree(dh), cudaFree(dc), cudaFree(db), free(hh), free(hc), free(hb), free(hz);
  fh_context_destroy(gpu), fh_context_destroy(cpu);
  return second;
}

static inline void run_grid(const cfg_t* c) {
  static const int64_t Bs[] = {1, 5, 37}, Vs[] = {1, 101, 4099};
  static const fh_dtype_t dts[] = {FH_DTYPE_F32, FH_DTYPE_F16, FH_DTYPE_BF16};
  worst_share = 0.0;
  for (int d = 0; d < 3; ++d)
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) run_case(c, dts[d], Bs[i], Vs[j], 0);
  cr_log_info("%s: largest share of a float tolerance used %.3f", c->name, worst_share);
}

#endif
