#include "test_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

uint64_t tu_next(tu_rng_t* r) {
  uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double tu_uniform(tu_rng_t* r) { return (double)(tu_next(r) >> 11) * 0x1.0p-53; }

double tu_normal(tu_rng_t* r) {
  double u1 = tu_uniform(r), u2 = tu_uniform(r);
  if (u1 < 1e-300) u1 = 1e-300;
  return sqrt(-2.0 * log(u1)) * cos(2.0 * 3.14159265358979323846 * u2);
}

int64_t tu_randint(tu_rng_t* r, int64_t n) { return n > 0 ? (int64_t)(tu_next(r) % (uint64_t)n) : 0; }

double tu_quantize(double x, int q) { return ldexp(nearbyint(ldexp(x, q)), -q); }

void* tu_alloc_guarded(size_t bytes) {
  unsigned char* p = (unsigned char*)malloc(bytes + TU_GUARD_WORDS * sizeof(uint32_t));
  if (!p) return NULL;
  memset(p, 0, bytes);
  uint32_t g = TU_GUARD_VALUE;
  for (int k = 0; k < TU_GUARD_WORDS; ++k) memcpy(p + bytes + k * sizeof g, &g, sizeof g);
  return p;
}

int tu_guards_intact(const void* p, size_t bytes) {
  const unsigned char* q = (const unsigned char*)p;
  for (int k = 0; k < TU_GUARD_WORDS; ++k) {
    uint32_t g;
    memcpy(&g, q + bytes + k * sizeof g, sizeof g);
    if (g != TU_GUARD_VALUE) return 0;
  }
  return 1;
}

static int check_one(double x, double r, double atol, double rtol, double* share) {
  if (isnan(r)) {
    *share = isnan(x) ? 0.0 : INFINITY;
    return isnan(x);
  }
  if (isinf(r)) {
    *share = (x == r) ? 0.0 : INFINITY;
    return x == r;
  }
  double tol = atol + rtol * fabs(r);
  double err = fabs(x - r);
  *share = tol > 0 ? err / tol : (err == 0 ? 0.0 : INFINITY);
  return err <= tol; /* false for NaN x */
}

static int report(const char* name, int64_t n, double max_abs, double max_rel, double max_share, int64_t bad,
                  double bx, double br) {
  printf("%s: n=%lld max_abs_err=%.3e max_rel_err=%.3e tolerance_used=%.1f%%", name, (long long)n, max_abs, max_rel,
         100.0 * max_share);
  if (bad >= 0) printf("  FIRST FAILURE at %lld: got %.17g want %.17g", (long long)bad, bx, br);
  printf("\n");
  fflush(stdout);
  return bad < 0;
}

#define TU_CHECK_BODY(x_at)                                              \
  double max_abs = 0, max_rel = 0, max_share = 0, bx = 0, br = 0;        \
  int64_t bad = -1;                                                      \
  for (int64_t i = 0; i < n; ++i) {                                      \
    double xv = (x_at), rv = ref[i], share;                              \
    int ok = check_one(xv, rv, atol, rtol, &share);                      \
    if (isfinite(xv) && isfinite(rv)) {                                  \
      double e = fabs(xv - rv);                                          \
      if (e > max_abs) max_abs = e;                                      \
      if (rv != 0 && e / fabs(rv) > max_rel) max_rel = e / fabs(rv);     \
    }                                                                    \
    if (share > max_share) max_share = share;                            \
    if (!ok && bad < 0) {                                                \
      bad = i;                                                           \
      bx = xv;                                                           \
      br = rv;                                                           \
    }                                                                    \
  }                                                                      \
  return report(name, n, max_abs, max_rel, max_share, bad, bx, br);

int tu_check_close(const char* name, const double* x, const double* ref, int64_t n, double atol, double rtol) {
  TU_CHECK_BODY(x[i])
}

int tu_check_close_f(const char* name, const float* x, const double* ref, int64_t n, double atol, double rtol) {
  TU_CHECK_BODY((double)x[i])
}

double tu_chi2_pooled(const long* observed, const double* expected, int n, int* cells) {
  double chi2 = 0.0, pool_o = 0.0, pool_e = 0.0;
  int k = 0;
  for (int i = 0; i < n; ++i) {
    const double e = expected[i];
    if (!(e > 0.0)) continue;
    if (e < 5.0) {
      pool_o += (double)observed[i];
      pool_e += e;
      continue;
    }
    chi2 += ((double)observed[i] - e) * ((double)observed[i] - e) / e;
    ++k;
  }
  if (pool_e > 0.0) {
    chi2 += (pool_o - pool_e) * (pool_o - pool_e) / pool_e;
    ++k;
  }
  *cells = k;
  return chi2;
}

double tu_chi2_crit(double df) {
  const double zq = 4.753, a = 2.0 / (9.0 * df);
  const double t = 1.0 - a + zq * sqrt(a);
  return df * t * t * t;
}
