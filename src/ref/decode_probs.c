/* The CPU reference of the probability calls (semantics: fusedhead_decode.h, "Sampling from
 * probabilities", and docs/decoding.md, "From probabilities"): row checks, the p-space filter
 * (the sampler's min-p → top-k → top-p code, src/ref/decode_row.c), the keyed Gumbel-max over
 * ln p, the renormalised output, and the logit mask (the sampler's rule at T = 1). fp64
 * throughout; one row of V doubles and V sort pairs per thread. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "decode_probs_ref.h"
#include "fh_internal.h"
#include "ref_common.h"

const char* fh_ref_probs_problem_name(int code) {
  switch (code) {
    case FH_PROBS_NAN: return "is NaN";
    case FH_PROBS_INF: return "is infinite";
    case FH_PROBS_NEGATIVE: return "is negative";
    case FH_PROBS_ZERO_SUM: return "sums to 0";
    case FH_PROBS_SUM_OFF: return "sums too far from 1";
    default: return "is valid";
  }
}

int fh_ref_probs_row_check(const double* p, int64_t V, double tol, double* sum, int64_t* at) {
  double S = 0.0;
  *at = -1;
  for (int64_t v = 0; v < V; ++v) {
    const int code = isnan(p[v]) ? FH_PROBS_NAN : isinf(p[v]) ? FH_PROBS_INF : p[v] < 0.0 ? FH_PROBS_NEGATIVE : 0;
    if (code) {
      *at = v;
      *sum = NAN;
      return code;
    }
    S += p[v];
  }
  *sum = S;
  if (!(S > 0.0)) return FH_PROBS_ZERO_SUM;
  if (!(fabs(S - 1.0) <= tol)) return FH_PROBS_SUM_OFF; /* tol = +inf accepts every S > 0 */
  return FH_PROBS_OK;
}

fh_status_t fh_ref_probs_strict(const char* fn, const char* name, const fh_tensor_t* t, int64_t n,
                                const fh_filter_options_t* o, double tol) {
  double* p = (double*)malloc((size_t)(t->cols > 0 ? t->cols : 1) * sizeof(double));
  if (!p) return fh_set_error(FH_ERR_OUT_OF_MEMORY, fn, "cannot allocate reference buffers");
  fh_status_t st = FH_SUCCESS;
  for (int64_t i = 0; i < n && st == FH_SUCCESS; ++i) {
    const int64_t r = o ? fh_filter_input_row(o, i) : i;
    fh_ref_row_to_double(t, r, p);
    double S;
    int64_t at;
    const int code = fh_ref_probs_row_check(p, t->cols, tol, &S, &at);
    if (code == FH_PROBS_SUM_OFF)
      st = fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s row %lld sums to %.9g (must be 1 within sum_tolerance %g)",
                        name, (long long)r, S, tol);
    else if (code == FH_PROBS_ZERO_SUM)
      st = fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s row %lld sums to 0 (no probability mass)", name, (long long)r);
    else if (code)
      st = fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s[%lld, %lld] %s (probabilities must be finite and >= 0)",
                        name, (long long)r, (long long)at, fh_ref_probs_problem_name(code));
  }
  free(p);
  return st;
}

int64_t fh_ref_keyed_argmax(const double* w, int64_t V, uint64_t seed, uint64_t offset, int second) {
  double best = -INFINITY;
  int64_t tok = -1;
  for (int64_t v = 0; v < V; ++v) {
    if (!(w[v] > 0.0)) continue;
    const double g = second ? fh_dm_gumbel2(seed, offset, (uint64_t)v) : fh_dm_gumbel(seed, offset, (uint64_t)v);
    const double key = log(w[v]) + g;
    if (tok < 0 || key > best) { /* strict: the lowest id among equal keys */
      best = key;
      tok = v;
    }
  }
  return tok;
}

/* Row i's filter parameters: the standard rule's fields, per-row arrays over the scalars. */
static void filter_params(const fh_filter_options_t* o, int64_t i, fh_decode_row_params_t* prm) {
  fh_decode_options_t d;
  fh_decode_options_init(&d);
  fh_ref_decode_row_params(&d, 0, prm);
  prm->top_k = o->top_k_per_row ? o->top_k_per_row[i] : o->top_k;
  prm->top_p = o->top_p_per_row ? o->top_p_per_row[i] : o->top_p;
  prm->min_p = o->min_p_per_row ? o->min_p_per_row[i] : o->min_p;
  prm->seed = o->seed_per_row ? o->seed_per_row[i] : o->seed;
  prm->offset = o->offset_per_row ? o->offset_per_row[i] : o->offset;
}

/* One probability row: p (fp64 copy), validity, S, the sorted (p, id) order, |P| and |A|; A is
 * the first `kept` sorted ids. */
typedef struct prow {
  double* p;
  fh_decode_pair_t* srt;
  double S;
  int64_t n_pos, kept;
  int valid;
} prow_t;

static int prow_init(prow_t* r, int64_t V) {
  const size_t n = (size_t)(V > 0 ? V : 1);
  r->p = (double*)malloc(n * sizeof(double));
  r->srt = (fh_decode_pair_t*)malloc(n * sizeof(fh_decode_pair_t));
  return r->p && r->srt;
}
static void prow_free(prow_t* r) {
  free(r->p);
  free(r->srt);
}

static void prow_filter(const fh_filter_problem_t* pb, int64_t i, prow_t* r, fh_decode_row_params_t* prm) {
  const int64_t V = pb->V;
  filter_params(&pb->opt, i, prm);
  fh_ref_row_to_double(pb->in, fh_filter_input_row(&pb->opt, i), r->p);
  int64_t at;
  r->valid = fh_ref_probs_row_check(r->p, V, pb->opt.sum_tolerance, &r->S, &at) == FH_PROBS_OK;
  if (!r->valid) return;
  for (int64_t v = 0; v < V; ++v) r->srt[v] = (fh_decode_pair_t){r->p[v], v};
  qsort(r->srt, (size_t)V, sizeof *r->srt, fh_ref_decode_pair_cmp);
  r->n_pos = 0;
  while (r->n_pos < V && r->srt[r->n_pos].s > 0.0) ++r->n_pos;
  /* n_pos >= 1 (S > 0); every stage keeps the first tie group, so kept >= 1. */
  r->kept = fh_ref_decode_rule_standard_space(prm, r->srt, r->n_pos, V, r->srt[0].s, 1);
}

/* Σ_A p in sorted order, then w = p on A, 0 elsewhere (the sampling weights). */
static double prow_kept_mass(const prow_t* r, int64_t V, double* w) {
  double ZA = 0.0;
  if (w) memset(w, 0, (size_t)V * sizeof *w);
  for (int64_t j = 0; j < r->kept; ++j) {
    ZA += r->srt[j].s;
    if (w) w[r->srt[j].id] = r->srt[j].s;
  }
  return ZA;
}

static void write_degenerate(const fh_filter_problem_t* pb, int64_t i, const fh_decode_outputs_t* out,
                             int32_t* tok32) {
  const int64_t n = pb->opt.num_logprobs, t = pb->opt.degenerate_token;
  if (out->tokens) out->tokens[i] = t;
  if (tok32) tok32[i] = (int32_t)t;
  if (out->logprob) out->logprob[i] = NAN;
  if (out->full_logprob) out->full_logprob[i] = NAN;
  if (out->rank) out->rank[i] = 0;
  if (out->lse) out->lse[i] = NAN;
  if (out->entropy) out->entropy[i] = NAN;
  if (out->allowed_count) out->allowed_count[i] = 0;
  if (out->flags) out->flags[i] = FH_DECODE_FLAG_DEGENERATE | FH_DECODE_FLAG_INVALID_PROBS;
  for (int64_t j = 0; j < n; ++j) {
    if (out->topn_ids) out->topn_ids[i * n + j] = -1;
    if (out->topn_logprobs) out->topn_logprobs[i * n + j] = NAN;
  }
}

static void sample_row(const fh_filter_problem_t* pb, int64_t i, prow_t* r, double* w, const fh_decode_outputs_t* out,
                       int32_t* tok32) {
  const int64_t V = pb->V, n = pb->opt.num_logprobs;
  fh_decode_row_params_t prm;
  prow_filter(pb, i, r, &prm);
  if (!r->valid) {
    write_degenerate(pb, i, out, tok32);
    return;
  }
  const double ZA = prow_kept_mass(r, V, w);
  const int64_t tok = fh_ref_keyed_argmax(w, V, prm.seed, prm.offset, 0);
  const double pt = r->p[tok], lS = log(r->S);
  double plogp = 0.0;
  int64_t above = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (r->p[v] > 0.0) plogp += r->p[v] * log(r->p[v]);
    above += r->p[v] > pt;
  }
  if (out->tokens) out->tokens[i] = tok;
  if (tok32) tok32[i] = (int32_t)tok;
  if (out->logprob) out->logprob[i] = (float)(log(pt) - log(ZA));
  if (out->full_logprob) out->full_logprob[i] = (float)(log(pt) - lS);
  if (out->rank) out->rank[i] = 1 + above;
  if (out->lse) out->lse[i] = (float)lS;
  if (out->entropy) out->entropy[i] = (float)(lS - plogp / r->S); /* −Σ (p/S) ln(p/S) */
  if (out->allowed_count) out->allowed_count[i] = r->kept;
  if (out->flags) out->flags[i] = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (out->topn_ids) out->topn_ids[i * n + j] = r->srt[j].id;
    if (out->topn_logprobs) out->topn_logprobs[i * n + j] = (float)(log(r->srt[j].s) - lS);
  }
}

static void renorm_row(const fh_filter_problem_t* pb, int64_t i, prow_t* r, double* w, const fh_tensor_t* out,
                       uint32_t* flags) {
  fh_decode_row_params_t prm;
  prow_filter(pb, i, r, &prm);
  float* o = (float*)out->data + i * out->row_stride;
  if (flags) flags[i] = r->valid ? 0u : FH_DECODE_FLAG_DEGENERATE | FH_DECODE_FLAG_INVALID_PROBS;
  if (!r->valid) {
    for (int64_t v = 0; v < pb->V; ++v) o[v] = NAN;
    return;
  }
  const double ZA = prow_kept_mass(r, pb->V, w);
  for (int64_t v = 0; v < pb->V; ++v) o[v] = (float)(w[v] / ZA);
}

static void mask_row(const fh_filter_problem_t* pb, int64_t i, prow_t* r, const fh_tensor_t* out, uint32_t* flags) {
  const int64_t V = pb->V;
  fh_decode_row_params_t prm;
  filter_params(&pb->opt, i, &prm);
  fh_ref_row_to_double(pb->in, fh_filter_input_row(&pb->opt, i), r->p);
  float* o = (float*)out->data + i * out->row_stride;
  const int bad = fh_ref_decode_row_is_degenerate(r->p, V); /* as fh_decode_from_logits */
  if (flags) flags[i] = bad ? FH_DECODE_FLAG_DEGENERATE : 0u;
  if (bad) {
    for (int64_t v = 0; v < V; ++v) o[v] = NAN;
    return;
  }
  for (int64_t v = 0; v < V; ++v) r->srt[v] = (fh_decode_pair_t){r->p[v], v};
  qsort(r->srt, (size_t)V, sizeof *r->srt, fh_ref_decode_pair_cmp);
  int64_t n_fin = 0;
  while (n_fin < V && r->srt[n_fin].s > -INFINITY) ++n_fin;
  const int64_t kept = fh_ref_decode_rule_standard(&prm, r->srt, n_fin, V, r->srt[0].s);
  for (int64_t v = 0; v < V; ++v) o[v] = -INFINITY;
  for (int64_t j = 0; j < kept; ++j) o[r->srt[j].id] = (float)r->srt[j].s; /* exact: the input's value */
}

/* Run `op` over the B output rows, one row buffer (and weights w) per thread. */
enum { OP_SAMPLE, OP_RENORM, OP_MASK };
static fh_status_t run_rows(const fh_filter_problem_t* pb, int op, const fh_decode_outputs_t* out, int32_t* tok32,
                            const fh_tensor_t* tout, uint32_t* flags) {
  int oom = 0;
#ifdef FH_HAVE_OPENMP
#pragma omp parallel reduction(| : oom) num_threads(fh_ref_threads())
#endif
  {
    prow_t r;
    double* w = (double*)malloc((size_t)(pb->V > 0 ? pb->V : 1) * sizeof(double));
    const int ok = prow_init(&r, pb->V) && w;
    if (!ok) oom = 1;
#ifdef FH_HAVE_OPENMP
#pragma omp for schedule(dynamic, 16)
#endif
    for (int64_t i = 0; i < pb->B; ++i) {
      if (!ok) continue;
      if (op == OP_SAMPLE) sample_row(pb, i, &r, w, out, tok32);
      else if (op == OP_RENORM) renorm_row(pb, i, &r, w, tout, flags);
      else mask_row(pb, i, &r, tout, flags);
    }
    prow_free(&r);
    free(w);
  }
  if (oom) return fh_set_error(FH_ERR_OUT_OF_MEMORY, pb->fn, "cannot allocate reference buffers");
  return FH_SUCCESS;
}

fh_status_t fh_ref_from_probs(const fh_filter_problem_t* p, const fh_decode_outputs_t* out, int32_t* tokens_i32) {
  return run_rows(p, OP_SAMPLE, out, tokens_i32, NULL, NULL);
}

fh_status_t fh_ref_renorm_probs(const fh_filter_problem_t* p, const fh_tensor_t* out, uint32_t* flags) {
  return run_rows(p, OP_RENORM, NULL, NULL, out, flags);
}

fh_status_t fh_ref_mask_logits(const fh_filter_problem_t* p, const fh_tensor_t* out, uint32_t* flags) {
  return run_rows(p, OP_MASK, NULL, NULL, out, flags);
}
