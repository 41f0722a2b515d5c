/* Small helpers shared by the CPU reference files: logits in fp64 and online softmax stats. */
#ifndef FH_REF_COMMON_H
#define FH_REF_COMMON_H

#include <math.h>
#include <stdint.h>

#include "dtype.h"

/* Threads of the CPU backend's OpenMP teams for the current call: the context's setting
 * (fh_context_set_num_threads), or OpenMP's default when it is 0. Set per call by
 * fh_check_context, read by every parallel region (docs/architecture.md, "Threads"). */
int fh_ref_threads(void);
void fh_ref_set_threads(int n);

/* Whether a pass of about n·v·d multiply-adds is worth an OpenMP team: below ~2e6 starting
 * the team costs more than the work (the test suites' tiny shapes). Results do not depend on
 * it: rows are independent and every reduction runs in a fixed order. */
static inline int fh_ref_parallel(int64_t n, int64_t v, int64_t d) {
  return (double)n * (double)v * (double)(d > 0 ? d : 1) > 2e6;
}

/* Copy row r of t (cols elements) into dst as doubles: exact. */
static inline void fh_ref_row_to_double(const fh_tensor_t* t, int64_t r, double* dst) {
  if (t->dtype == FH_DTYPE_F32) { /* the common case, kept free of per-element dispatch */
    const float* src = (const float*)t->data + r * t->row_stride;
    for (int64_t k = 0; k < t->cols; ++k) dst[k] = (double)src[k];
    return;
  }
  for (int64_t k = 0; k < t->cols; ++k) dst[k] = fh_tensor_get(t, r, k);
}

/* Dot product with four partial sums: fp64 accumulation, and enough independent chains that
 * the loop is not latency-bound (the reference is slow enough as it is). */
static inline double fh_ref_dot(const double* a, const double* b, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    s0 += a[k] * b[k];
    s1 += a[k + 1] * b[k + 1];
    s2 += a[k + 2] * b[k + 2];
    s3 += a[k + 3] * b[k + 3];
  }
  for (; k < n; ++k) s0 += a[k] * b[k];
  return (s0 + s1) + (s2 + s3);
}

/* The per-row and scalar float arrays of the ops with gradients hold doubles when the inputs
 * are FH_DTYPE_F64 (fusedhead.h); these read and write them either way. */
static inline double fh_ref_stat_get(const float* a, int64_t i, int f64) {
  return f64 ? ((const double*)(const void*)a)[i] : (double)a[i];
}
static inline void fh_ref_stat_put(float* a, int64_t i, double v, int f64) {
  if (f64)
    ((double*)(void*)a)[i] = v;
  else
    a[i] = (float)v;
}

/* Store one fp64 gradient row into a caller tensor, adding the old value when accumulating:
 * the single rounding into the output dtype. */
static inline void fh_ref_store_row(const fh_tensor_t* t, int64_t r, const double* v, int64_t n, int accumulate) {
  for (int64_t k = 0; k < n; ++k) fh_tensor_set(t, r, k, v[k] + (accumulate ? fh_tensor_get(t, r, k) : 0.0));
}

/* The end of a class block [j0, j0 + nb) of a backward: its dC rows (accC, nb x D) and dbias
 * entries (accb) to the fp64 copies and/or the caller's tensors (each may be NULL). */
static inline void fh_ref_store_class_block(int64_t j0, int64_t nb, int64_t D, const double* accC, const double* accb,
                                            double* dC64, const fh_tensor_t* tC, double* db64,
                                            const fh_tensor_t* tb, int accumulate) {
  for (int64_t r = 0; r < nb; ++r) {
    const int64_t j = j0 + r;
    if (dC64)
      for (int64_t k = 0; k < D; ++k) dC64[j * D + k] = accC[r * D + k];
    if (tC) fh_ref_store_row(tC, j, accC + r * D, D, accumulate);
    if (db64) db64[j] = accb[r];
    if (tb) fh_tensor_set(tb, 0, j, accb[r] + (accumulate ? fh_tensor_get(tb, 0, j) : 0.0));
  }
}

/* Online softmax statistics of a stream of logits z: m = max, Z = Σ e^{z−m},
 * F = Σ e^{z−m}(z − m), so that lse = m + ln Z and the entropy h = ln Z − F/Z.
 * NaN propagates through Z; −inf entries contribute nothing. */
typedef struct fh_ref_softmax_stats {
  double m, Z, F;
} fh_ref_softmax_stats_t;

static inline void fh_ref_stats_init(fh_ref_softmax_stats_t* s) {
  s->m = -INFINITY;
  s->Z = 0.0;
  s->F = 0.0;
}

static inline void fh_ref_stats_add(fh_ref_softmax_stats_t* s, double z) {
  if (z > s->m) {
    if (s->Z == 0.0) { /* first finite entry: nothing to rescale (avoids 0 * inf) */
      s->F = 0.0;
      s->Z = 1.0;
    } else {
      double d = s->m - z, sc = exp(d);
      s->F = sc * (s->F + d * s->Z);
      s->Z = s->Z * sc + 1.0;
    }
    s->m = z;
  } else if (z != -INFINITY) {
    double t = exp(z - s->m); /* NaN z lands here and poisons Z */
    s->Z += t;
    s->F += t * (z - s->m);
  }
}

/* Merge the statistics (m, Z, F) of another part of the stream (a vocabulary shard) into s:
 * the online rescaling of docs/distributed.md. An empty part (Z == 0) changes nothing, and the
 * first non-empty part is copied exactly, so one part merged into nothing is that part. */
static inline void fh_ref_stats_merge(fh_ref_softmax_stats_t* s, double m, double Z, double F) {
  if (Z == 0.0) return;
  if (s->Z == 0.0) {
    s->m = m;
    s->Z = Z;
    s->F = F;
  } else if (m > s->m) {
    const double d = s->m - m, sc = exp(d);
    s->F = sc * (s->F + d * s->Z) + F;
    s->Z = s->Z * sc + Z;
    s->m = m;
  } else {
    const double d = m == s->m ? 0.0 : m - s->m, sc = exp(d);
    s->F += sc * (F + d * Z);
    s->Z += sc * Z;
  }
}

static inline double fh_ref_stats_lse(const fh_ref_softmax_stats_t* s) { return s->m + log(s->Z); }
static inline double fh_ref_stats_entropy(const fh_ref_softmax_stats_t* s) { return log(s->Z) - s->F / s->Z; }

#endif
