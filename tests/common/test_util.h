/* Helpers shared by every test suite: a seeded RNG, input builders, comparisons that print
 * their error budget, and guard words. Nothing here hides a failure: comparisons return a
 * verdict the test asserts on, after printing max abs/rel error and the share of tolerance. */
#ifndef FH_TEST_UTIL_H
#define FH_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include "fusedhead.h"

/* splitmix64: tiny, seedable, the same on every platform. */
typedef struct tu_rng {
  uint64_t s;
} tu_rng_t;
uint64_t tu_next(tu_rng_t* r);
double tu_uniform(tu_rng_t* r);             /* [0, 1) */
double tu_normal(tu_rng_t* r);              /* N(0, 1), Box-Muller */
int64_t tu_randint(tu_rng_t* r, int64_t n); /* [0, n) */

/* A value rounded to a multiple of 2^-q (so small perturbations of it stay exact in fp32). */
double tu_quantize(double x, int q);

/* Allocate n elements of dtype, followed by `TU_GUARD_WORDS` guard words. */
#define TU_GUARD_WORDS 16
#define TU_GUARD_VALUE 0xA5A5A5A5u
void* tu_alloc_guarded(size_t bytes);
int tu_guards_intact(const void* p, size_t bytes); /* 1 if the guard words after `bytes` are intact */

/* |x - ref| <= atol + rtol*|ref| for n doubles; prints "name: max abs err, max rel err, share of
 * tolerance used" and the first failing index. NaN matches NaN only where ref is NaN. */
int tu_check_close(const char* name, const double* x, const double* ref, int64_t n, double atol, double rtol);
int tu_check_close_f(const char* name, const float* x, const double* ref, int64_t n, double atol, double rtol);

/* Pearson's χ² of observed counts against expected counts e[i] (cells with e[i] <= 0 are
 * skipped; cells with e[i] < 5 are pooled into one); *cells gets the number of cells used. */
double tu_chi2_pooled(const long* observed, const double* expected, int n, int* cells);
/* The χ² quantile at p = 1e-6 for df degrees of freedom (Wilson–Hilferty, z = 4.753): a fixed-seed
 * sampler test passes it with a wide margin when correct, and fails by orders of magnitude when
 * its distribution is wrong. */
double tu_chi2_crit(double df);

#endif
