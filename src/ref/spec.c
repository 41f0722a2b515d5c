/* The CPU reference of chain speculative sampling (semantics: fusedhead_decode.h, fh_spec_accept,
 * and docs/decoding.md, "Speculative sampling"). Per row: check the 2K + 1 probability rows, test
 * the drafts in order with the keyed acceptance uniforms, then draw the correction from
 * max(0, p_t − p_d) or the bonus from p_t with the second keyed Gumbel noise. The probabilities
 * are used as stored (no renormalisation), so every decision is a function of stored values. */
#include <math.h>
#include <stdlib.h>

#include "decode_probs_ref.h"
#include "fh_internal.h"
#include "ref_common.h"

typedef struct spec_buf {
  double* t; /* (K+1) x V target rows */
  double* d; /* K x V draft rows */
  double* r; /* V residual */
} spec_buf_t;

static void spec_row(const fh_spec_problem_t* pb, int64_t b, spec_buf_t* sb, const fh_spec_outputs_t* out) {
  const int64_t K = pb->K, V = pb->V, W = K + 1;
  const fh_spec_options_t* o = &pb->opt;
  const uint64_t seed = o->seed_per_row ? o->seed_per_row[b] : o->seed;
  const uint64_t off = o->offset_per_row ? o->offset_per_row[b] : o->offset;
  int64_t* tok = out->output_tokens + b * W;
  int valid = 1;
  for (int64_t i = 0; i <= K; ++i) {
    double S;
    int64_t at;
    fh_ref_row_to_double(pb->pt, b * W + i, sb->t + i * V);
    valid &= fh_ref_probs_row_check(sb->t + i * V, V, o->sum_tolerance, &S, &at) == FH_PROBS_OK;
    if (i == K) break;
    fh_ref_row_to_double(pb->pd, b * K + i, sb->d + i * V);
    valid &= fh_ref_probs_row_check(sb->d + i * V, V, o->sum_tolerance, &S, &at) == FH_PROBS_OK;
  }
  for (int64_t i = 0; i < W; ++i) tok[i] = -1;
  if (!valid) {
    if (out->accepted) out->accepted[b] = 0;
    if (out->emitted) out->emitted[b] = 0;
    if (out->accepted_independent) out->accepted_independent[b] = 0;
    if (out->flags) out->flags[b] = FH_SPEC_FLAG_DEGENERATE;
    return;
  }
  uint32_t flags = 0;
  int64_t acc = 0, indep = 0, stop = -1;
  for (int64_t i = 0; i < K; ++i) {
    const int64_t d = pb->draft[b * K + i];
    const double t = sb->t[i * V + d], q = sb->d[i * V + d];
    const int ok = fh_dm_spec_accepts(fh_dm_spec_uniform(seed, off, i), t, q);
    indep += ok;
    if (stop >= 0) continue; /* past the chain: only the independent count */
    if (q == 0.0) flags |= FH_SPEC_FLAG_ZERO_DRAFT;
    if (ok) tok[acc++] = d;
    else stop = i;
  }
  int64_t last;
  if (stop < 0) {
    last = fh_ref_keyed_argmax(sb->t + K * V, V, seed, off, 1); /* bonus: p_t at position K */
  } else {
    const double* t = sb->t + stop * V;
    const double* q = sb->d + stop * V;
    for (int64_t v = 0; v < V; ++v) sb->r[v] = t[v] > q[v] ? t[v] - q[v] : 0.0;
    last = fh_ref_keyed_argmax(sb->r, V, seed, off, 1);
    if (last < 0) { /* p_t <= p_d everywhere: the residual is undefined, draw from p_t */
      last = fh_ref_keyed_argmax(t, V, seed, off, 1);
      flags |= FH_SPEC_FLAG_RESIDUAL_FALLBACK;
    }
  }
  tok[acc] = last; /* a valid row has positive mass, so last >= 0 */
  if (out->accepted) out->accepted[b] = acc;
  if (out->emitted) out->emitted[b] = acc + 1;
  if (out->accepted_independent) out->accepted_independent[b] = indep;
  if (out->flags) out->flags[b] = flags;
}

fh_status_t fh_ref_spec_accept(const fh_spec_problem_t* p, const fh_spec_outputs_t* out) {
  int oom = 0;
  const size_t V = (size_t)(p->V > 0 ? p->V : 1);
#ifdef FH_HAVE_OPENMP
#pragma omp parallel reduction(| : oom) num_threads(fh_ref_threads())
#endif
  {
    spec_buf_t sb;
    sb.t = (double*)malloc((size_t)(p->K + 1) * V * sizeof(double));
    sb.d = (double*)malloc((size_t)(p->K > 0 ? p->K : 1) * V * sizeof(double));
    sb.r = (double*)malloc(V * sizeof(double));
    const int ok = sb.t && sb.d && sb.r;
    if (!ok) oom = 1;
#ifdef FH_HAVE_OPENMP
#pragma omp for schedule(dynamic, 16)
#endif
    for (int64_t b = 0; b < p->B; ++b)
      if (ok) spec_row(p, b, &sb, out);
    free(sb.t);
    free(sb.d);
    free(sb.r);
  }
  if (oom) return fh_set_error(FH_ERR_OUT_OF_MEMORY, p->fn, "cannot allocate reference buffers");
  return FH_SUCCESS;
}
