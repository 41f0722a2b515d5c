/* Chi-square goodness of fit for the probability-call suites (test_decode_probs.c,
 * test_spec_accept.c): counts of n draws against expected probabilities q, cells with an expected
 * count < 5 pooled, compared with the χ² quantile at p = 1e-6 (Wilson–Hilferty, z = 4.753). The
 * seeds are fixed, so each check is deterministic; a correct sampler passes with a wide margin
 * and a wrong distribution fails by orders of magnitude (as tests/ref/test_decode_chi2.c). */
#ifndef FH_TEST_PROBS_UTIL_H
#define FH_TEST_PROBS_UTIL_H

#include <math.h>
#include <stdio.h>

/* Returns 1 when the fit passes; draws where q == 0 always fail it. */
static inline int tp_chi2_ok(const char* name, const long* cnt, const double* q, int64_t V, long n) {
  double chi2 = 0, pool_o = 0, pool_e = 0;
  long outside = 0;
  int cells = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (!(q[v] > 0.0)) {
      outside += cnt[v];
      continue;
    }
    const double e = (double)n * q[v];
    if (e < 5) {
      pool_o += (double)cnt[v];
      pool_e += e;
      continue;
    }
    chi2 += ((double)cnt[v] - e) * ((double)cnt[v] - e) / e;
    ++cells;
  }
  if (pool_e > 0) {
    chi2 += (pool_o - pool_e) * (pool_o - pool_e) / pool_e;
    ++cells;
  }
  const double df = cells > 1 ? cells - 1 : 1, a = 2.0 / (9.0 * df), t = 1.0 - a + 4.753 * sqrt(a);
  const double crit = df * t * t * t;
  printf("chi2 %s: n = %ld, cells %d, chi2 = %.2f, critical(p=1e-6, df=%g) = %.2f, outside support = %ld\n", name, n,
         cells, chi2, df, crit, outside);
  fflush(stdout);
  return outside == 0 && (cells <= 1 || chi2 < crit);
}

#endif
