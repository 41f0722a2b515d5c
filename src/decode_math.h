/* The fp64 formulas of the decoding rules, shared by the CPU reference (src/ref/decode_row.c) and
 * the CUDA kernels (kernels/decode_row.cuh), so that both evaluate the very same expressions
 * (docs/decoding.md, "CUDA backend"). Header-only: static inline in C, __host__ __device__ under
 * nvcc; the SIMT emulator compiles the kernels as host C++, where these are host functions
 * calling the host libm, exactly as the reference does. Only the order of the sums that feed
 * them differs between the backends. */
#ifndef FH_DECODE_MATH_H
#define FH_DECODE_MATH_H

#include <math.h>
#include <stdint.h>

#include "philox.h"

#define FH_DM FH_PHILOX_HD

/* Gumbel noise g = −ln(−ln u) of token `token` under (seed, offset): finite for every keyed
 * uniform, u ∈ [2^-53, 1 − 2^-53] gives g ∈ [−3.61, 36.7]. */
FH_DM double fh_dm_gumbel(uint64_t seed, uint64_t offset, uint64_t token) {
  const double u = fh_philox_token_uniform(seed, offset, token);
  return -log(-log(u));
}

/* The second Gumbel noise of token `token` (Philox words x2, x3 of the same counter): the
 * speculative correction and bonus draws (docs/decoding.md, "Speculative sampling"), independent
 * of fh_dm_gumbel under the same key. */
FH_DM double fh_dm_gumbel2(uint64_t seed, uint64_t offset, uint64_t token) {
  const fh_philox4x32_t w = fh_philox_token_words(seed, offset, token);
  return -log(-log(fh_philox_u52(w.v[2], w.v[3])));
}

/* The acceptance uniform of draft position i: the counter of "token" 2^64 − 1 − i, which no real
 * token id (< 2^62) reaches, so it never shares a counter with a token's noise. */
FH_DM double fh_dm_spec_uniform(uint64_t seed, uint64_t offset, int64_t i) {
  return fh_philox_token_uniform(seed, offset, UINT64_MAX - (uint64_t)i);
}

/* Speculative acceptance of a draft token with target probability t and draft probability q
 * under uniform a: a < t/q; q = 0 accepts iff t > 0 (the limit of min(1, t/q)). */
FH_DM int fh_dm_spec_accepts(double a, double t, double q) { return q > 0.0 ? a < t / q : t > 0.0; }

/* min-p: keep s ≥ m + ln(min_p) (min_p > 0). */
FH_DM double fh_dm_min_p_threshold(double m, double min_p) { return m + log(min_p); }

/* top-p: a tie group with `above` of the survivors' mass Zs strictly above it is kept. */
FH_DM int fh_dm_top_p_keeps(double above, double Zs, double top_p) { return above / Zs < top_p; }

/* p-less: keep s ≥ m + ln Z₂ − ln Z (p_v ≥ Σ p²), Z = Σ e^(s−m), Z₂ = Σ (e^(s−m))². Z₂ ≤ Z, so
 * the threshold is at most m (docs/decoding.md, "Truncation rules"). */
FH_DM double fh_dm_p_less_threshold(double m, double Z, double Z2) { return m + (log(Z2) - log(Z)); }

/* top-nσ: keep z ≥ zmax − n·σ, σ = √(M2 / count) (population standard deviation). */
FH_DM double fh_dm_n_sigma_threshold(double zmax, double n, double m2, double count) {
  return zmax - n * sqrt(m2 / count);
}

/* ε / η: keep log p ≥ the returned threshold; ε = 0 keeps every finite token. η = min(ε,
 * √ε·e^{−h}) in log space: ln η = min(ln ε, ½ ln ε − h). */
FH_DM double fh_dm_eps_eta_threshold(int eta, double epsilon, double h) {
  if (!(epsilon > 0.0)) return -INFINITY;
  const double thr = log(epsilon);
  return eta ? fmin(thr, 0.5 * thr - h) : thr;
}

/* top-H: the entropy term −p ln p of a token with log-probability lp (0 where p underflows). */
FH_DM double fh_dm_top_h_term(double lp) {
  const double pv = exp(lp);
  return pv > 0.0 ? -pv * lp : 0.0;
}

/* Bregman adaptive k: stop at k when ln(1 + p_(k+1)/P_k) ≤ λ. */
FH_DM int fh_dm_bregman_stop(double pnext, double P, double lambda) { return log1p(pnext / P) <= lambda; }

/* α-renormalisation: log(q_(i)/p_(1)) = log1p(expm1(a·lr_i) + c)/a, lr_i = ln(p_(i)/p_(1)),
 * a = α − 1 (docs/decoding.md, "Bregman decoding and adaptive k"). */
FH_DM double fh_dm_alpha_logratio(double a, double lr, double c) { return log1p(expm1(a * lr) + c) / a; }

/* The bisection bracket of the shifted constant c′: [0, p_(1)^(−a) − 1] for a > 0, (−1, 0] for
 * a < 0 (lp1 = ln p_(1)). */
FH_DM void fh_dm_alpha_bracket(double a, double lp1, double* lo, double* hi) {
  *lo = a > 0 ? 0.0 : -1.0;
  *hi = a > 0 ? expm1(-a * lp1) : 0.0;
}
/* One bisection step given Σ q at mid: Σ q − 1 increases with c′ for a > 0, decreases for a < 0. */
FH_DM void fh_dm_alpha_step(double a, double sum, double mid, double* lo, double* hi) {
  if ((a > 0) == (sum > 1.0)) *hi = mid;
  else *lo = mid;
}
/* The end of the final bracket where Σ q ≥ 1. */
FH_DM double fh_dm_alpha_root(double a, double lo, double hi) { return a > 0 ? hi : lo; }
/* The bisection's iteration cap (it ends earlier, at adjacent doubles). */
#define FH_DM_ALPHA_MAX_ITERS 4000

#endif
