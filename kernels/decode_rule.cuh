/* decode_rule.cuh: the per-row decision of every sampler over a row in (s descending, id
 * ascending) order, for both CUDA decoding paths (docs/decoding.md, "CUDA backend" and "Fused
 * decoding on CUDA"):
 *   - from logits (kernels/decode.cu): the view holds the whole sorted row (`full`), and every
 *     rule is decided;
 *   - fused (kernels/decode_fused.cu): the view holds only a certified prefix of P candidates
 *     (every id not in it comes after all of them in the order) and the row's totals come from
 *     the streaming pass. A rule whose decision needs a position at or past P reports the row
 *     as undecided (the certificate fails) and writes nothing; the caller's exact fallback then
 *     decodes the row from its materialised logits.
 * The semantics are the CPU reference's (src/ref/decode_row.c); the fp64 formulas come from
 * src/decode_math.h. One CTA of DEC_THREADS threads per row; every branch on a decision is
 * block-uniform. */
#ifndef FH_KERNELS_DECODE_RULE_CUH
#define FH_KERNELS_DECODE_RULE_CUH

#include "decode_row.cuh"

namespace fh_dec {

/* only[b] bit of the fused path: the certificate failed, the fallback decodes row b. */
constexpr uint32_t DEC_ROW_FALLBACK = 1u;

/* The fallback's steps (kernels/decode.cu): the from-logits workspace of B x V (its size
 * `total`; z of a flagged row at byte offset zb, as fp64, from element offs[b]; offs [B + 1]
 * int32 at byte offset `offs`, written by the caller with the flagged rows packed), then prep,
 * sort and row kernels over the rows flagged in only[b]. */
fh_status_t fallback_layout(int64_t B, int64_t V, const char* fn, size_t* zb, size_t* offs, size_t* total);
fh_status_t fallback_run(const char* fn, struct CUstream_st* stream, const fh_decode_options_t& o,
                         const fh_decode_outputs_t& out, int64_t B, int64_t V, void* workspace, const uint32_t* only,
                         int* err);

/* The row's statistics over every id (the view may hold fewer). m: max s; Z = Σ e^(s−m),
 * F = Σ e^(s−m)(s−m) and Z2 = Σ (e^(s−m))² (p-less) over the n_fin ids with s > −inf;
 * (zcnt, zmean, zm2, zmax) of the finite z for top-nσ; (gid, gs): the keyed Gumbel-max winner
 * over every finite id and its s (fused rows whose rule keeps every finite id; gid −1 when not
 * computed). */
struct dec_totals {
  double m, Z, F, Z2;
  int64_t n_fin;
  double zcnt, zmean, zm2, zmax;
  int64_t gid;
  double gs;
};

/* Whether the row's rule keeps every id with s > −inf (no truncation): then the token is the
 * keyed Gumbel-max over the whole vocabulary, which the fused pass computes while streaming. */
__device__ __forceinline__ bool dec_keeps_all(const fh_decode_row_params_t& prm, int64_t V) {
  if (prm.temperature == 0.0) return false;
  if (prm.sampler == FH_DECODE_STANDARD)
    return !(prm.min_p > 0.0) && !(prm.top_k > 0 && prm.top_k < V) && !(prm.top_p < 1.0);
  if (prm.sampler == FH_DECODE_TOP_N_SIGMA) return !(prm.top_n_sigma > 0.0) || V <= 1;
  return false;
}

/* FH_DECODE_STANDARD: min-p, top-k (tie-inclusive) and top-p each keep a prefix
 * (src/ref/decode_row.c, fh_ref_decode_rule_standard). Positions >= P are unknown unless
 * `full`; *ok becomes false when the cut is not decided inside the view. Top-p's mass is over
 * the top-k survivors (sequential) or the min-p survivors (joint). */
template <class S>
__device__ int64_t rule_standard(const fh_decode_row_params_t& prm, const S& s, int64_t n_fin, int64_t V, double m,
                                 double Z, int64_t P, bool full, bool* ok, dec_smem& sm) {
  int64_t n = n_fin;
  const int64_t lim = full ? n_fin : P;
  if (prm.min_p > 0.0) {
    const double thr = fh_dm_min_p_threshold(m, prm.min_p);
    if (!full && P < n && s(P - 1) >= thr) return *ok = false, 0;
    n = dec_partition_point(0, n < lim ? n : lim, [&](int64_t i) { return s(i) >= thr; });
  }
  const auto term = [&](int64_t j) { return exp(s(j) - m); };
  /* The survivors' mass: summed over the view when they all lie in it (the reference's order
   * of summation, nearly), else the streaming pass's total (then no cut happened: n = n_fin). */
  const auto mass = [&](int64_t nn) {
    double Zs = Z;
    if (nn <= lim) dec_scan_first(nn, term, [](int64_t, double, double) { return false; }, &Zs, sm);
    return Zs;
  };
  const bool top_p_on = prm.top_p < 1.0;
  const double Zjoint = prm.joint && top_p_on ? mass(n) : 0.0; /* block-uniform */
  if (prm.top_k > 0 && prm.top_k < V && prm.top_k < n) { /* the tie group of the k-th stays whole */
    if (!full && prm.top_k > P) return *ok = false, 0;
    const double sk = s(prm.top_k - 1);
    if (!full && P < n && s(P - 1) >= sk) return *ok = false, 0;
    n = dec_partition_point(0, n < lim ? n : lim, [&](int64_t i) { return s(i) >= sk; });
  }
  if (top_p_on) {
    const double Zs = prm.joint ? Zjoint : mass(n);
    double unused = 0.0;
    const int64_t nv = n < lim ? n : lim;
    /* the first tie group (after the first) whose mass strictly above is not < top_p */
    const int64_t f = dec_scan_first(
        nv, term,
        [&](int64_t j, double above, double) {
          return j > 0 && s(j) != s(j - 1) && !fh_dm_top_p_keeps(above, Zs, prm.top_p);
        },
        &unused, sm);
    if (f == nv && nv < n) return *ok = false, 0;
    n = f;
  }
  return n;
}

/* The outputs of a degenerate row (NaN or +inf in z, every z −inf, or a bad per-row entry). */
__device__ inline void dec_write_degenerate(const fh_decode_options_t& o, const fh_decode_outputs_t& out, int64_t b,
                                            uint32_t info, uint32_t extra_flags) {
  const int64_t n = o.num_logprobs;
  if (threadIdx.x == 0) {
    out.tokens[b] = o.degenerate_token;
    if (out.logprob) out.logprob[b] = NAN;
    if (out.full_logprob) out.full_logprob[b] = NAN;
    if (out.rank) out.rank[b] = 0;
    if (out.lse) out.lse[b] = (info & (INFO_NAN | INFO_BAD)) ? NAN : (info & INFO_PINF) ? INFINITY : -INFINITY;
    if (out.entropy) out.entropy[b] = NAN;
    if (out.allowed_count) out.allowed_count[b] = 0;
    if (out.flags) out.flags[b] = FH_DECODE_FLAG_DEGENERATE | extra_flags;
  }
  for (int64_t i = threadIdx.x; i < n; i += DEC_THREADS) {
    if (out.topn_ids) out.topn_ids[b * n + i] = -1;
    if (out.topn_logprobs) out.topn_logprobs[b * n + i] = NAN;
  }
}

/* Decodes row b of a non-degenerate row from its view: s(i), id(i), z(i) for positions i < P in
 * (s descending, id ascending) order (every position when `full`), and its totals. Returns
 * false (block-uniform, nothing written) when the certificate fails; otherwise writes every
 * requested output. */
template <class S, class Id, class Zf>
__device__ bool decode_row_body(const fh_decode_options_t& o, const fh_decode_outputs_t& out, int64_t b, int64_t V,
                                const S& s, const Id& ids, const Zf& zv, int64_t P, bool full, const dec_totals& tot,
                                uint32_t extra_flags, dec_smem& sm) {
  const int t = threadIdx.x;
  const int64_t nlp = o.num_logprobs, n_fin = tot.n_fin;
  fh_decode_row_params_t prm;
  fh_dm_row_params(&o, b, &prm);
  const bool greedy = prm.temperature == 0.0;
  const double m = tot.m, Z = tot.Z, F = tot.F;
  const double lse = m + log(Z), h = log(Z) - F / Z;
  if (!full && nlp > P) return false; /* top-n reaches past the view (ids of −inf included) */

  uint32_t flags = extra_flags;
  bool ok = true;
  int64_t prefix = -1; /* rules keeping a sorted prefix set it; otherwise a predicate (pred) */
  int pred = 0;        /* 1: top-nσ on z, 2: ε / η on log p */
  bool nsig_off = false;
  double thr = 0.0;
  const bool all = !full && dec_keeps_all(prm, V) && n_fin > P; /* token from the streaming pass */
  if (greedy) {
    prefix = 1;
    flags |= FH_DECODE_FLAG_GREEDY;
  } else if (all) {
    prefix = n_fin;
  } else {
    /* Every sampler needs its own case here: a new one that falls to `default` would decode
     * as A = {argmax} instead of its rule. */
    static_assert(FH_DECODE_SAMPLER_COUNT == 7, "add the new sampler's case to decode_row_body");
    switch (prm.sampler) {
      case FH_DECODE_STANDARD: prefix = rule_standard(prm, s, n_fin, V, m, Z, P, full, &ok, sm); break;
      case FH_DECODE_TOP_N_SIGMA:
        nsig_off = !(prm.top_n_sigma > 0.0) || V <= 1;
        thr = fh_dm_n_sigma_threshold(tot.zmax, prm.top_n_sigma, tot.zm2, tot.zcnt);
        pred = 1;
        break;
      case FH_DECODE_EPSILON:
      case FH_DECODE_ETA:
        thr = fh_dm_eps_eta_threshold(prm.sampler == FH_DECODE_ETA, prm.epsilon, h);
        pred = 2;
        break;
      case FH_DECODE_TOP_H: {
        const int64_t N = prm.top_h_candidates < n_fin ? prm.top_h_candidates : n_fin;
        if (!full && N > P) return false;
        const auto term = [&](int64_t j) { return fh_dm_top_h_term(s(j) - lse); };
        double HN = 0.0, unused = 0.0;
        dec_scan_first(N, term, [](int64_t, double, double) { return false; }, &HN, sm);
        const double tau = prm.top_h_alpha * HN;
        /* H_j is the same computation as HN's prefix, so α = 1 keeps all N */
        const int64_t k = dec_scan_first(N, term, [&](int64_t, double, double H) { return H > tau; }, &unused, sm);
        prefix = k > 1 ? k : 1;
        break;
      }
      case FH_DECODE_P_LESS: {
        /* A threshold on s: decided in the view unless its last position still passes. */
        const double thr_pl = fh_dm_p_less_threshold(m, Z, tot.Z2);
        if (!full && P < n_fin && s(P - 1) >= thr_pl) return false;
        const int64_t lim = full || n_fin < P ? n_fin : P;
        prefix = dec_partition_point(0, lim, [&](int64_t i) { return s(i) >= thr_pl; });
        break;
      }
      default: /* unreachable: the sampler is validated against FH_DECODE_SAMPLER_COUNT */
        prefix = 1;
        break;
      case FH_DECODE_BREGMAN: {
        double unused = 0.0;
        const int64_t n = full || n_fin < P ? n_fin : P;
        /* The stop test at i needs p at i + 1: past the view it is unknown, and the scan stops
         * there to report the row undecided. */
        const auto unknown_next = [&](int64_t i) { return !full && i + 1 < n_fin && i + 1 >= P; };
        const int64_t j = dec_scan_first(
            n, [&](int64_t i) { return exp(s(i) - lse); },
            [&](int64_t i, double, double Pm) {
              if (unknown_next(i)) return true;
              const double pnext = i + 1 < n_fin ? exp(s(i + 1) - lse) : 0.0;
              return fh_dm_bregman_stop(pnext, Pm, prm.bregman_lambda) != 0;
            },
            &unused, sm);
        if ((j < n && unknown_next(j)) || (j == n && n < n_fin)) return false;
        prefix = j < n_fin ? j + 1 : n_fin;
        break;
      }
    }
  }
  if (!ok) return false;
  /* The rule's set before the union with the argmax (position 0). */
  const auto rule = [&](int64_t i) -> bool {
    if (prefix >= 0) return i < prefix;
    if (pred == 1) {
      const double zi = zv(i);
      return isfinite(zi) && (nsig_off || zi >= thr);
    }
    const double lp = s(i) - lse;
    return lp > -INFINITY && lp >= thr;
  };
  const int64_t lim = full ? n_fin : (P < n_fin ? P : n_fin);
  if (prefix < 0 && lim < n_fin) {
    /* Certificate of a predicate: an id past the view has s <= s(P − 1). For ε / η (monotone in
     * s) the last listed position failing settles it; for top-nσ (on z, where equal s can hide
     * different z) a failing position with s strictly above s(P − 1) does. */
    const double sl = s(P - 1);
    int fail = 0;
    if (pred == 2) fail = !rule(P - 1);
    else
      for (int64_t i = t; i < P; i += DEC_THREADS) fail |= s(i) > sl && !rule(i);
    if (!__syncthreads_or(fail)) return false;
  }
  int64_t cnt0 = prefix;
  if (prefix < 0) {
    int64_t c = 0;
    for (int64_t i = t; i < lim; i += DEC_THREADS) c += rule(i);
    cnt0 = dec_block_sum_i(c, sm);
  }
  if (cnt0 == 0) flags |= FH_DECODE_FLAG_ARGMAX_FALLBACK;
  const int64_t count = cnt0 + (rule(0) ? 0 : 1);
  const int64_t n_lim = prefix >= 0 ? (prefix > 1 ? prefix : 1) : lim;
  const auto allowed = [&](int64_t i) { return i == 0 || rule(i); };

  /* α-Bregman renormalisation (α != 1) on the first k* > 1 tokens: bisection on c′. */
  const bool alpha_q = !greedy && !all && prm.sampler == FH_DECODE_BREGMAN && prm.bregman_alpha != 1.0 && prefix > 1;
  const double a = prm.bregman_alpha - 1.0, lp1 = s(0) - lse;
  double c = 0.0, lt = 0.0;
  const auto lq = [&](int64_t i, double cc) { return lp1 + fh_dm_alpha_logratio(a, (s(i) - lse) - lp1, cc); };
  if (alpha_q) {
    double lo, hi;
    fh_dm_alpha_bracket(a, lp1, &lo, &hi);
    for (int it = 0; it < FH_DM_ALPHA_MAX_ITERS; ++it) { /* lo, hi are block-uniform */
      const double mid = 0.5 * (lo + hi);
      if (mid <= lo || mid >= hi) break;
      double ps = 0.0;
      for (int64_t i = t; i < prefix; i += DEC_THREADS) ps += exp(lq(i, mid));
      fh_dm_alpha_step(a, dec_block_sum(ps, sm), mid, &lo, &hi);
    }
    c = fh_dm_alpha_root(a, lo, hi);
    double ps = 0.0;
    for (int64_t i = t; i < prefix; i += DEC_THREADS) ps += exp(lq(i, c));
    lt = log(dec_block_sum(ps, sm));
  }
  double lseA = lse; /* A = every finite id: q = p */
  if (!alpha_q && !all) { /* q = p on A renormalised */
    double zp2 = 0.0;
    for (int64_t i = t; i < n_lim; i += DEC_THREADS)
      if (allowed(i)) zp2 += exp(s(i) - m);
    lseA = m + log(dec_block_sum(zp2, sm));
  }

  /* The keyed Gumbel-max over A; equal keys go to the lower id. Rows keeping every id take the
   * streaming pass's winner, which is the same argmax over the same keys. */
  int64_t tok = ids(0), pos = 0;
  double st = s(0);
  bool st_in_view = true;
  if (all) {
    tok = tot.gid;
    st = tot.gs;
    st_in_view = st > s(P - 1);
  } else if (!greedy) {
    double best = -INFINITY;
    int64_t bid = -1, bpos = -1;
    for (int64_t i = t; i < n_lim; i += DEC_THREADS) {
      if (!allowed(i)) continue;
      const int64_t id = ids(i);
      const double key = (alpha_q ? lq(i, c) - lt : s(i)) + fh_dm_gumbel(prm.seed, prm.offset, (uint64_t)id);
      if (bid < 0 || key > best || (key == best && id < bid)) {
        best = key;
        bid = id;
        bpos = i;
      }
    }
    dec_block_argmax(best, bid, bpos, sm, &tok, &pos);
    st = s(pos);
  }
  /* rank = 1 + #{s > s_token}: inside the view unless the token's s is at or below its end */
  if (out.rank && !st_in_view) return false;
  if (t == 0) {
    out.tokens[b] = tok;
    if (out.logprob) out.logprob[b] = greedy ? 0.0f : (float)(alpha_q ? lq(pos, c) - lt : st - lseA);
    if (out.full_logprob) out.full_logprob[b] = (float)(st - lse);
    if (out.rank) {
      const int64_t hi = full ? (all ? n_fin : pos) : P;
      out.rank[b] = 1 + dec_partition_point(0, hi, [&](int64_t i) { return s(i) > st; });
    }
    if (out.lse) out.lse[b] = (float)lse;
    if (out.entropy) out.entropy[b] = (float)h;
    if (out.allowed_count) out.allowed_count[b] = count;
    if (out.flags) out.flags[b] = flags;
  }
  for (int64_t i = t; i < nlp; i += DEC_THREADS) {
    if (out.topn_ids) out.topn_ids[b * nlp + i] = ids(i);
    if (out.topn_logprobs) out.topn_logprobs[b * nlp + i] = (float)(s(i) - lse);
  }
  return true;
}

} /* namespace fh_dec */

#endif
