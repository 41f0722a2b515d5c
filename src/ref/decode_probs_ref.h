/* Shared pieces of the probability calls' CPU reference (src/ref/decode_probs.c, src/ref/spec.c):
 * the row check and the keyed Gumbel-max over weights (docs/decoding.md, "From probabilities"). */
#ifndef FH_DECODE_PROBS_REF_H
#define FH_DECODE_PROBS_REF_H

#include <stdint.h>

#include "decode_ref.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What is wrong with a probability row (0: valid). */
enum { FH_PROBS_OK = 0, FH_PROBS_NAN, FH_PROBS_INF, FH_PROBS_NEGATIVE, FH_PROBS_ZERO_SUM, FH_PROBS_SUM_OFF };

/* Check p[V]: every entry finite and >= 0 (else the code and the first bad index in *at), the
 * fp64 sum S (ids ascending) > 0 and |S − 1| <= tol. *sum = S (NaN when an entry is bad). */
int fh_ref_probs_row_check(const double* p, int64_t V, double tol, double* sum, int64_t* at);
const char* fh_ref_probs_problem_name(int code);

/* argmax over {v : w_v > 0} of ln w_v + g_v, g the keyed Gumbel noise of (seed, offset, v): words
 * x0, x1 (fh_dm_gumbel) or, with second != 0, x2, x3 (fh_dm_gumbel2). Ids ascending, equal keys to
 * the lowest id; −1 when no weight is positive. */
int64_t fh_ref_keyed_argmax(const double* w, int64_t V, uint64_t seed, uint64_t offset, int second);

#ifdef __cplusplus
}
#endif

#endif
