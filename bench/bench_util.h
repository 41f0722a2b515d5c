/* bench_util.h: what the benchmark programs of bench/ share: a monotonic clock in milliseconds,
 * the comparison qsort needs for medians, the commit the output names. */
#ifndef FH_BENCH_UTIL_H
#define FH_BENCH_UTIL_H

#include <time.h>

/* The commit the output belongs to: set by CMake at configure time. */
#ifndef FH_GIT_COMMIT
#define FH_GIT_COMMIT "unknown"
#endif

static inline double bu_now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec * 1e3 + (double)t.tv_nsec * 1e-6;
}

static inline int bu_cmp_double(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

#endif
