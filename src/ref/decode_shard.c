/* CPU reference for decoding on a vocabulary shard (fusedhead_shard.h, docs/distributed.md):
 * each rank's statistics, K best candidates and Gumbel winner, and their merge in rank order.
 * The logits, bias, bans, keys and the standard rule are the single-device reference's own
 * (decode.c, decode_row.c), so a token picked here is bitwise the one fh_decode_fused picks. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "decode_ref.h"
#include "fh_internal.h"
#include "philox.h"
#include "ref_common.h"

#define NAN_FLAG 1.0
#define PINF_FLAG 2.0

/* Step 1 for row b: z over the local classes (global id = off + v), packed into q. */
static void candidates_row(const fh_decode_problem_t* p, int64_t off, int64_t K, int64_t b, double* z, double* h,
                           double* c, fh_decode_pair_t* srt, double* q) {
  const int64_t V = p->src.V;
  fh_decode_row_params_t prm;
  fh_ref_decode_row_params(&p->opt, b, &prm);
  fh_ref_decode_logits(&p->src, b, z, h, c);
  fh_ref_decode_bias_bans(&p->opt, b, off, V, z);
  const int greedy = prm.temperature == 0.0;
  const double T = greedy ? 1.0 : prm.temperature;
  fh_ref_softmax_stats_t st;
  fh_ref_stats_init(&st);
  int flags = 0;
  int64_t n_fin = 0, win = -1;
  double best = -INFINITY, s_win = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    const double s = z[v] / T;
    if (isnan(z[v])) flags |= 1;
    if (z[v] == INFINITY) flags |= 2;
    srt[v] = (fh_decode_pair_t){s, off + v};
    if (!(s > -INFINITY) || !isfinite(s)) continue;
    ++n_fin;
    fh_ref_stats_add(&st, s);
    if (!greedy) { /* the keyed race over every finite token: strict >, so the lowest id wins ties */
      const double key = s + fh_gumbel_noise(prm.seed, prm.offset, (uint64_t)(off + v));
      if (win < 0 || key > best) best = key, win = off + v, s_win = s;
    }
  }
  q[0] = st.m, q[1] = st.Z, q[2] = st.F, q[3] = (double)n_fin, q[4] = (double)flags;
  q[5] = best, q[6] = (double)win, q[7] = s_win;
  qsort(srt, (size_t)V, sizeof *srt, fh_ref_decode_pair_cmp);
  const int64_t n = flags ? 0 : (V < K ? V : K); /* −inf entries too: they order the top-n */
  q[8] = (double)n;
  q[9] = (double)V;
  for (int64_t i = 0; i < K; ++i) {
    q[10 + 2 * i] = i < n ? srt[i].s : -INFINITY;
    q[11 + 2 * i] = i < n ? (double)srt[i].id : -1.0;
  }
}

fh_status_t fh_ref_decode_shard_candidates(const fh_decode_problem_t* p, int64_t off, int64_t K, double* partials) {
  const int64_t B = p->src.B, V = p->src.V, W = FH_SHARD_DECODE_WIDTH(K);
  int oom = 0;
#ifdef FH_HAVE_OPENMP
#pragma omp parallel reduction(| : oom)
#endif
  {
    const size_t nv = (size_t)(V > 0 ? V : 1), nd = (size_t)(p->src.D > 0 ? p->src.D : 1);
    double* z = (double*)malloc(sizeof(double) * (nv + 2 * nd));
    fh_decode_pair_t* srt = (fh_decode_pair_t*)malloc(sizeof(fh_decode_pair_t) * nv);
    if (!z || !srt) oom = 1;
#ifdef FH_HAVE_OPENMP
#pragma omp for schedule(dynamic, 16)
#endif
    for (int64_t b = 0; b < B; ++b)
      if (z && srt) candidates_row(p, off, K, b, z, z + nv, z + nv + nd, srt, partials + b * W);
    free(z);
    free(srt);
  }
  if (oom) return fh_set_error(FH_ERR_OUT_OF_MEMORY, p->fn, "cannot allocate reference buffers");
  return FH_SUCCESS;
}

/* What the merge produces for a row, before rounding into the outputs. */
typedef struct merged {
  fh_decode_row_result_t r;
  int64_t n;              /* merged candidates */
  fh_decode_pair_t* cand; /* sorted (s descending, id ascending) */
} merged_t;

static void put_row(const fh_decode_options_t* o, int64_t b, const merged_t* mg, const fh_decode_outputs_t* out) {
  const fh_decode_row_result_t* r = &mg->r;
  const int deg = (r->flags & FH_DECODE_FLAG_DEGENERATE) != 0;
  out->tokens[b] = r->token;
  if (out->logprob) out->logprob[b] = (float)r->logprob;
  if (out->full_logprob) out->full_logprob[b] = (float)r->full_logprob;
  if (out->lse) out->lse[b] = (float)r->lse;
  if (out->entropy) out->entropy[b] = (float)r->entropy;
  if (out->allowed_count) out->allowed_count[b] = r->allowed_count;
  if (out->flags) out->flags[b] = r->flags;
  for (int64_t i = 0; i < o->num_logprobs; ++i) {
    if (out->topn_ids) out->topn_ids[b * o->num_logprobs + i] = deg ? -1 : mg->cand[i].id;
    if (out->topn_logprobs)
      out->topn_logprobs[b * o->num_logprobs + i] = deg ? NAN : (float)(mg->cand[i].s - r->lse);
  }
}

/* Row b's merge. Returns FH_ERR_UNSUPPORTED (with the message) when the candidates cannot prove
 * the allowed set or the row asks for a rule a shard cannot run. */
static fh_status_t merge_row(const char* fn, const fh_decode_options_t* o, int64_t b, int64_t Vg, int64_t P, int64_t K,
                             const double* gathered, int64_t B, merged_t* mg) {
  const int64_t W = FH_SHARD_DECODE_WIDTH(K);
  fh_decode_row_result_t* r = &mg->r;
  fh_decode_row_params_t prm;
  fh_ref_decode_row_params(o, b, &prm);
  fh_ref_softmax_stats_t st;
  fh_ref_stats_init(&st);
  int flags = 0;
  int64_t n_fin = 0, win = -1;
  double best = -INFINITY, s_win = 0.0, tau = -INFINITY; /* every unlisted token has s <= tau */
  mg->n = 0;
  for (int64_t k = 0; k < P; ++k) {
    const double* q = gathered + (k * B + b) * W;
    fh_ref_stats_merge(&st, q[0], q[1], q[2]);
    n_fin += (int64_t)q[3];
    flags |= (int)q[4];
    const int64_t id = (int64_t)q[6], n = (int64_t)q[8];
    if (id >= 0 && (win < 0 || q[5] > best || (q[5] == best && id < win))) best = q[5], win = id, s_win = q[7];
    for (int64_t i = 0; i < n; ++i) mg->cand[mg->n++] = (fh_decode_pair_t){q[10 + 2 * i], (int64_t)q[11 + 2 * i]};
    if ((int64_t)q[9] > n && n > 0 && q[10 + 2 * (n - 1)] > tau) tau = q[10 + 2 * (n - 1)];
  }
  memset(r, 0, sizeof *r);
  if (flags || n_fin == 0) { /* degenerate, as the single-device row */
    r->token = o->degenerate_token;
    r->logprob = r->full_logprob = r->entropy = NAN;
    r->lse = (flags & 1) ? NAN : (flags & 2) ? INFINITY : -INFINITY;
    r->flags = FH_DECODE_FLAG_DEGENERATE;
    return FH_SUCCESS;
  }
  qsort(mg->cand, (size_t)mg->n, sizeof *mg->cand, fh_ref_decode_pair_cmp);
  const double m = st.m, lse = fh_ref_stats_lse(&st);
  r->lse = lse;
  r->entropy = fh_ref_stats_entropy(&st);
  const int64_t amax = mg->cand[0].id;
  const int topk_on = prm.top_k > 0 && prm.top_k < Vg, minp_on = prm.min_p > 0.0;
  if (prm.temperature == 0.0) {
    r->token = amax, r->allowed_count = 1, r->logprob = 0.0, r->flags = FH_DECODE_FLAG_GREEDY;
    r->full_logprob = mg->cand[0].s - lse;
    return FH_SUCCESS;
  }
  if (o->sampler != FH_DECODE_STANDARD || (prm.top_p < 1.0 && !topk_on && !minp_on))
    return fh_set_error(FH_ERR_UNSUPPORTED, fn,
                        "row %lld: on a shard only FH_DECODE_STANDARD runs, and top-p only after top-k or min-p "
                        "(alone it needs the mass of tokens no rank listed)", (long long)b);
  if (!topk_on && !minp_on) { /* plain sampling: the ranks' winners race */
    r->token = win, r->allowed_count = n_fin;
    r->full_logprob = r->logprob = s_win - lse;
    return FH_SUCCESS;
  }
  int64_t nf = 0; /* finite candidates lead the sorted list */
  while (nf < mg->n && mg->cand[nf].s > -INFINITY) ++nf;
  fh_decode_row_params_t pre = prm; /* the survivors of min-p and top-k */
  pre.top_p = 1.0;
  const int64_t surv = fh_ref_decode_rule_standard(&pre, mg->cand, nf, Vg, m);
  const double cut = mg->cand[surv - 1].s, next = surv < nf ? mg->cand[surv].s : -INFINITY;
  const double thr = minp_on ? m + log(prm.min_p) : -INFINITY;
  /* The survivors are exact when every one lies above tau (so its count of larger tokens is
   * exact) and the group after them is excluded in truth: it is listed (above tau), or top-k has
   * already kept k, or min-p excludes everything at or below tau (tau = −inf: nothing finite is
   * unlisted). Then top-p, which sums over the survivors in sorted order, sees exactly the
   * single-device sums. */
  if (tau > -INFINITY && !(cut > tau && (next > tau || (topk_on && surv >= prm.top_k) || tau < thr)))
    return fh_set_error(FH_ERR_UNSUPPORTED, fn,
                        "row %lld: %lld candidates per rank cannot prove the allowed set (a rank's K-th candidate "
                        "ties or passes the rule); run again with a larger K", (long long)b, (long long)K);
  /* Joint top-p sums over every min-p survivor, not only the top-k ones: they must all be listed. */
  if (prm.joint && prm.top_p < 1.0 && tau > -INFINITY && !(tau < thr))
    return fh_set_error(FH_ERR_UNSUPPORTED, fn,
                        "row %lld: joint top-k/top-p needs the mass of every min-p survivor, and %lld candidates "
                        "per rank do not list them all (set min_p, or run with a larger K)",
                        (long long)b, (long long)K);
  const int64_t keep = prm.top_p < 1.0 ? fh_ref_decode_rule_standard(&prm, mg->cand, nf, Vg, m) : surv;
  double ZA = 0.0;
  win = -1;
  for (int64_t i = 0; i < keep; ++i) {
    const fh_decode_pair_t* e = &mg->cand[i];
    ZA += exp(e->s - m);
    const double key = e->s + fh_gumbel_noise(prm.seed, prm.offset, (uint64_t)e->id);
    if (win < 0 || key > best || (key == best && e->id < win)) best = key, win = e->id, s_win = e->s;
  }
  r->token = win, r->allowed_count = keep;
  r->logprob = s_win - (m + log(ZA));
  r->full_logprob = s_win - lse;
  return FH_SUCCESS;
}

fh_status_t fh_ref_decode_shard_combine(const char* fn, const fh_decode_options_t* o, int64_t B, int64_t Vg, int64_t P,
                                        int64_t K, const double* gathered, const fh_decode_outputs_t* out) {
  merged_t mg;
  mg.cand = (fh_decode_pair_t*)malloc(sizeof(fh_decode_pair_t) * (size_t)(P * K));
  if (!mg.cand) return fh_set_error(FH_ERR_OUT_OF_MEMORY, fn, "cannot allocate reference buffers");
  fh_status_t st = FH_SUCCESS;
  for (int64_t b = 0; b < B && st == FH_SUCCESS; ++b) {
    st = merge_row(fn, o, b, Vg, P, K, gathered, B, &mg);
    if (st == FH_SUCCESS) put_row(o, b, &mg, out);
  }
  free(mg.cand);
  return st;
}
