/* The decoding reference for one row, in fp64 (semantics: fusedhead.h, section Decoding).
 * Obviously correct over fast: the row is held whole (V doubles), sorted once in
 * (s descending, id ascending) order, and every rule is a plain loop over that order. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "decode_math.h"
#include "decode_ref.h"

int fh_ref_decode_pair_cmp(const void* pa, const void* pb) {
  const fh_decode_pair_t* a = (const fh_decode_pair_t*)pa;
  const fh_decode_pair_t* b = (const fh_decode_pair_t*)pb;
  const int na = isnan(a->s), nb = isnan(b->s);
  if (na != nb) return na ? -1 : 1;
  if (!na && a->s != b->s) return a->s > b->s ? -1 : 1;
  return (a->id > b->id) - (a->id < b->id);
}

int fh_ref_decode_scratch_init(fh_decode_scratch_t* w, int64_t V) {
  const size_t n = V > 0 ? (size_t)V : 1;
  w->V = V;
  w->s = (double*)malloc(n * sizeof(double));
  w->logq = (double*)malloc(n * sizeof(double));
  w->allowed = (unsigned char*)malloc(n);
  w->sorted = (fh_decode_pair_t*)malloc(n * sizeof(fh_decode_pair_t));
  return w->s && w->logq && w->allowed && w->sorted;
}

void fh_ref_decode_scratch_free(fh_decode_scratch_t* w) {
  free(w->s);
  free(w->logq);
  free(w->allowed);
  free(w->sorted);
  memset(w, 0, sizeof *w);
}

/* ---- truncation rules: each marks allowed[] and returns |A| before the argmax union ---- */

/* Number of sorted positions whose tie group starts before `limit`: the tie-inclusive prefix
 * {i : #{j : s_j > s_i} < limit} within the first n positions. */
static int64_t tie_inclusive_prefix(const fh_decode_pair_t* srt, int64_t n, int64_t limit) {
  int64_t i = 0, group_start = 0;
  for (; i < n; ++i) {
    if (i > 0 && srt[i].s != srt[i - 1].s) group_start = i;
    if (group_start >= limit) break;
  }
  return i;
}

/* The survivors' mass Σ e^(s−m) (probs: Σ p) over the first n sorted positions, summed in sorted
 * order so the result is reproducible. */
static double prefix_mass(const fh_decode_pair_t* srt, int64_t n, double m, int probs) {
  double Zs = 0.0;
  for (int64_t i = 0; i < n; ++i) Zs += probs ? srt[i].s : exp(srt[i].s - m);
  return Zs;
}

/* min-p → top-k → top-p on the first n_fin sorted positions. Every stage keeps a prefix of the
 * sorted order (its thresholds are monotone in s), so the result is a prefix length. Top-p's
 * mass is renormalised over the top-k survivors (sequential) or over the min-p survivors
 * (joint: then top-p and top-k test the same distribution and the kept prefix is the shorter
 * of the two, which the scan over the top-k prefix gives). With probs != 0 the entries hold
 * probabilities p (m = p_max) instead of log-weights s: min-p compares p ≥ min_p·p_max and
 * top-p sums p itself, so p-space rows (fh_decode_from_probs, docs/decoding.md "From
 * probabilities") follow the same order and tie rules without a log/exp round trip. */
int64_t fh_ref_decode_rule_standard_space(const fh_decode_row_params_t* prm, const fh_decode_pair_t* srt,
                                          int64_t n_fin, int64_t V, double m, int probs) {
  int64_t n = n_fin;
  if (prm->min_p > 0.0) {
    const double thr = probs ? prm->min_p * m : fh_dm_min_p_threshold(m, prm->min_p);
    int64_t i = 0;
    while (i < n && srt[i].s >= thr) ++i;
    n = i;
  }
  const double Zjoint = prm->joint && prm->top_p < 1.0 ? prefix_mass(srt, n, m, probs) : 0.0;
  if (prm->top_k > 0 && prm->top_k < V) n = tie_inclusive_prefix(srt, n, prm->top_k);
  if (prm->top_p < 1.0) {
    /* Keep tie groups whose strictly-larger mass is < top_p of the survivors' mass. */
    const double Zs = prm->joint ? Zjoint : prefix_mass(srt, n, m, probs);
    double above = 0.0, group_mass = 0.0;
    int64_t keep = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (i > 0 && srt[i].s != srt[i - 1].s) { /* a new tie group: its mass above is final */
        above += group_mass;
        group_mass = 0.0;
        if (!fh_dm_top_p_keeps(above, Zs, prm->top_p)) break;
      }
      group_mass += probs ? srt[i].s : exp(srt[i].s - m);
      keep = i + 1;
    }
    n = keep;
  }
  return n;
}

int64_t fh_ref_decode_rule_standard(const fh_decode_row_params_t* prm, const fh_decode_pair_t* srt, int64_t n_fin,
                                    int64_t V, double m) {
  return fh_ref_decode_rule_standard_space(prm, srt, n_fin, V, m, 0);
}

/* p-less: the sorted prefix with s ≥ m + ln Z₂ − ln Z (p_v ≥ Σ p²). */
static int64_t rule_p_less(const fh_decode_pair_t* srt, int64_t n_fin, double m, double Z, double Z2) {
  const double thr = fh_dm_p_less_threshold(m, Z, Z2);
  int64_t i = 0;
  while (i < n_fin && srt[i].s >= thr) ++i;
  return i;
}

/* top-nσ on z (before temperature): z_v ≥ max z − n·σ, σ the population std of finite z. */
static void rule_top_n_sigma(const fh_decode_row_params_t* prm, const double* z, int64_t V, unsigned char* allowed) {
  const int off = !(prm->top_n_sigma > 0.0) || V <= 1;
  double zmax = -INFINITY, mean = 0.0, m2 = 0.0;
  int64_t cnt = 0;
  for (int64_t v = 0; v < V; ++v)
    if (isfinite(z[v])) {
      ++cnt;
      mean += z[v];
      if (z[v] > zmax) zmax = z[v];
    }
  mean /= (double)cnt; /* cnt >= 1: the row is not degenerate */
  for (int64_t v = 0; v < V; ++v)
    if (isfinite(z[v])) m2 += (z[v] - mean) * (z[v] - mean);
  const double thr = fh_dm_n_sigma_threshold(zmax, prm->top_n_sigma, m2, (double)cnt);
  for (int64_t v = 0; v < V; ++v) allowed[v] = isfinite(z[v]) && (off || z[v] >= thr);
}

/* ε / η: keep log p_v ≥ ln ε (ln η); ε = 0 keeps every finite token. */
static void rule_eps_eta(const fh_decode_row_params_t* prm, const double* logp, int64_t V, double h,
                         unsigned char* allowed) {
  const double thr = fh_dm_eps_eta_threshold(prm->sampler == FH_DECODE_ETA, prm->epsilon, h);
  for (int64_t v = 0; v < V; ++v) allowed[v] = logp[v] > -INFINITY && logp[v] >= thr;
}

/* top-H: the first k of the top N, k = max(1, max{j ≤ N : H_j ≤ α·H_N}). */
static int64_t rule_top_h(const fh_decode_row_params_t* prm, const fh_decode_pair_t* srt, int64_t n_fin,
                          double lse) {
  const int64_t N = prm->top_h_candidates < n_fin ? prm->top_h_candidates : n_fin;
  double HN = 0.0;
  for (int64_t i = 0; i < N; ++i) HN += fh_dm_top_h_term(srt[i].s - lse);
  const double tau = prm->top_h_alpha * HN;
  double H = 0.0;
  int64_t k = 0;
  for (int64_t j = 1; j <= N; ++j) { /* H_j is non-decreasing: stop at the first excess */
    H += fh_dm_top_h_term(srt[j - 1].s - lse);
    if (H <= tau) k = j;
    else break;
  }
  return k > 1 ? k : 1;
}

/* Bregman adaptive k: k* = min{k ≥ 1 : ln(1 + p_(k+1)/P_k) ≤ λ}, p_(n_fin+1) = 0. */
static int64_t bregman_k(double lambda, const fh_decode_pair_t* srt, int64_t n_fin, double lse) {
  double P = 0.0;
  for (int64_t k = 1; k <= n_fin; ++k) {
    P += exp(srt[k - 1].s - lse);
    const double pnext = k < n_fin ? exp(srt[k].s - lse) : 0.0;
    if (fh_dm_bregman_stop(pnext, P, lambda)) return k;
  }
  return n_fin;
}

/* α-renormalisation on the first k sorted tokens, whose .s holds ln p (the full softmax): writes
 * logq of those ids. With a = α − 1, lr_i = ln(p_(i)/p_(1)) ≤ 0 and the shifted constant
 * c′ = c·p_(1)^(−a), q_i = p_(1)·(e^{a·lr_i} + c′)^(1/a). Σ q(c′) − 1 is monotone in c′
 * (increasing for a > 0, decreasing for a < 0) and changes sign on [0, p_(1)^(−a) − 1] (a > 0:
 * Σ q(0) = P_k ≤ 1 and q_1 = 1 at the top) or on (−1, 0] (a < 0: q_1 → ∞ as c′ → −1), so
 * bisection down to adjacent doubles finds c′. */
static void bregman_alpha_renorm(double alpha, const fh_decode_pair_t* srt, int64_t k, double* logq) {
  const double a = alpha - 1.0, lp1 = srt[0].s;
  double lo, hi;
  fh_dm_alpha_bracket(a, lp1, &lo, &hi);
  for (int it = 0; it < FH_DM_ALPHA_MAX_ITERS; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (mid <= lo || mid >= hi) break;
    double sum = 0.0;
    for (int64_t i = 0; i < k; ++i) sum += exp(lp1 + fh_dm_alpha_logratio(a, srt[i].s - lp1, mid));
    fh_dm_alpha_step(a, sum, mid, &lo, &hi);
  }
  /* The end where Σ q >= 1; for a < 0 that is lo, which has moved off −1 (k >= 2). */
  const double c = fh_dm_alpha_root(a, lo, hi);
  double tot = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    logq[srt[i].id] = lp1 + fh_dm_alpha_logratio(a, srt[i].s - lp1, c);
    tot += exp(logq[srt[i].id]);
  }
  const double lt = log(tot); /* the last bisection step's residual: afterwards Σ q = 1 to rounding */
  for (int64_t i = 0; i < k; ++i) logq[srt[i].id] -= lt;
}

/* ---- the row ---- */

static void degenerate_row(const double* z, int64_t V, int64_t degenerate_token, fh_decode_scratch_t* w,
                           fh_decode_row_result_t* r) {
  int nan = 0, pinf = 0;
  for (int64_t v = 0; v < V; ++v) {
    nan |= isnan(z[v]);
    pinf |= z[v] == INFINITY;
    w->allowed[v] = 0;
    w->logq[v] = -INFINITY;
    w->s[v] = z[v];
  }
  r->token = degenerate_token;
  r->rank = 0;
  r->allowed_count = 0;
  r->logprob = r->full_logprob = r->entropy = NAN;
  r->lse = nan ? NAN : pinf ? INFINITY : -INFINITY; /* as fh_rows_logsumexp */
  r->flags = FH_DECODE_FLAG_DEGENERATE;
}

int fh_ref_decode_row_is_degenerate(const double* z, int64_t V) {
  int bad = 1;
  for (int64_t v = 0; v < V; ++v) {
    if (isnan(z[v]) || z[v] == INFINITY) return 1;
    if (z[v] > -INFINITY) bad = 0;
  }
  return bad;
}

void fh_ref_decode_row(const double* z, int64_t V, const fh_decode_row_params_t* prm, int64_t degenerate_token,
                       fh_decode_scratch_t* w, fh_decode_row_result_t* r) {
  if (fh_ref_decode_row_is_degenerate(z, V)) {
    degenerate_row(z, V, degenerate_token, w, r);
    return;
  }
  const int greedy = prm->temperature == 0.0;
  const double T = greedy ? 1.0 : prm->temperature;
  double* s = w->s;
  double m = -INFINITY;
  int64_t amax = -1;
  for (int64_t v = 0; v < V; ++v) {
    s[v] = z[v] / T;
    if (s[v] > m) { /* strict: the lowest id among maximal s */
      m = s[v];
      amax = v;
    }
  }
  double Z = 0.0, F = 0.0, Z2 = 0.0;
  for (int64_t v = 0; v < V; ++v)
    if (s[v] > -INFINITY) {
      const double e = exp(s[v] - m);
      Z += e;
      F += e * (s[v] - m);
      Z2 += e * e;
    }
  const double lse = m + log(Z), h = log(Z) - F / Z;
  for (int64_t v = 0; v < V; ++v) w->sorted[v] = (fh_decode_pair_t){s[v], v};
  qsort(w->sorted, (size_t)V, sizeof *w->sorted, fh_ref_decode_pair_cmp);
  int64_t n_fin = 0;
  while (n_fin < V && w->sorted[n_fin].s > -INFINITY) ++n_fin;

  unsigned char* A = w->allowed;
  double* logq = w->logq;
  memset(A, 0, (size_t)V);
  r->flags = 0;
  int alpha_q = 0; /* q not proportional to p (α-Bregman, α != 1) */
  if (greedy) {
    A[amax] = 1;
    r->flags |= FH_DECODE_FLAG_GREEDY;
  } else {
    int64_t prefix = -1; /* rules that keep a sorted prefix set this */
    switch (prm->sampler) {
      case FH_DECODE_STANDARD: prefix = fh_ref_decode_rule_standard(prm, w->sorted, n_fin, V, m); break;
      case FH_DECODE_TOP_N_SIGMA: rule_top_n_sigma(prm, z, V, A); break;
      case FH_DECODE_EPSILON:
      case FH_DECODE_ETA:
        for (int64_t v = 0; v < V; ++v) logq[v] = s[v] - lse; /* log p, reused as scratch */
        rule_eps_eta(prm, logq, V, h, A);
        break;
      case FH_DECODE_TOP_H: prefix = rule_top_h(prm, w->sorted, n_fin, lse); break;
      case FH_DECODE_BREGMAN: prefix = bregman_k(prm->bregman_lambda, w->sorted, n_fin, lse); break;
      case FH_DECODE_P_LESS: prefix = rule_p_less(w->sorted, n_fin, m, Z, Z2); break;
      default: prefix = 1; break; /* unreachable: the sampler is validated against FH_DECODE_SAMPLER_COUNT */
    }
    if (prefix >= 0)
      for (int64_t i = 0; i < prefix; ++i) A[w->sorted[i].id] = 1;
    int64_t cnt = 0;
    for (int64_t v = 0; v < V; ++v) cnt += A[v];
    if (cnt == 0) r->flags |= FH_DECODE_FLAG_ARGMAX_FALLBACK;
    A[amax] = 1;
    if (prm->sampler == FH_DECODE_BREGMAN && prm->bregman_alpha != 1.0 && prefix > 1) {
      /* The α-family needs ln p of the kept tokens: pass (ln p, id) pairs in sorted order. */
      for (int64_t i = 0; i < prefix; ++i) w->sorted[i].s -= lse;
      for (int64_t v = 0; v < V; ++v) logq[v] = -INFINITY;
      bregman_alpha_renorm(prm->bregman_alpha, w->sorted, prefix, logq);
      for (int64_t i = 0; i < prefix; ++i) w->sorted[i].s += lse;
      alpha_q = 1;
    }
  }
  if (!alpha_q) { /* q = p restricted to A, renormalised: log q = s − log Σ_A e^s */
    double ZA = 0.0;
    for (int64_t v = 0; v < V; ++v)
      if (A[v]) ZA += exp(s[v] - m);
    const double lseA = m + log(ZA);
    for (int64_t v = 0; v < V; ++v) logq[v] = A[v] ? s[v] - lseA : -INFINITY;
  }
  int64_t tok = amax;
  if (!greedy) {
    /* Keyed Gumbel-max; the key of token v depends on (seed, offset, v) only. For q ∝ p the key
     * s_v + g_v has the same argmax as log q_v + g_v (a constant shift). */
    double best = -INFINITY;
    tok = -1;
    for (int64_t v = 0; v < V; ++v) {
      if (!A[v]) continue;
      const double key = (alpha_q ? logq[v] : s[v]) + fh_dm_gumbel(prm->seed, prm->offset, (uint64_t)v);
      if (tok < 0 || key > best) {
        best = key;
        tok = v;
      }
    }
  }
  int64_t cnt = 0, above = 0;
  for (int64_t v = 0; v < V; ++v) {
    cnt += A[v];
    above += s[v] > s[tok];
  }
  r->token = tok;
  r->rank = 1 + above;
  r->allowed_count = cnt;
  r->logprob = greedy ? 0.0 : logq[tok];
  r->full_logprob = s[tok] - lse;
  r->lse = lse;
  r->entropy = h;
}
