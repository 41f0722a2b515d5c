/* CPU reference for distillation on a vocabulary shard, step 3 (docs/distributed.md): the
 * forward's results from every rank's statistics and divergence sums, merged in rank order.
 * Steps 1 and 2 are the reference's own passes over the shard's classes (src/ref/distill.c),
 * and the backward is the reference backward with the shard's class offset. */
#include <stdlib.h>

#include "fh_internal.h"
#include "ref/distill_ref.h"

typedef struct gathered {
  int64_t P;
  const double *stats, *div;
} gathered_t;

static int row_valid(const fh_distill_problem_t* p, int64_t i) {
  return !p->targets || p->targets[i] != p->opt.ignore_index;
}

/* Fills the fp64 forward results of every row from the gathered partials. */
static fh_status_t combine(const fh_distill_problem_t* p, fh_distill_ref_fwd_t* out, const void* arg) {
  const gathered_t* g = (const gathered_t*)arg;
  const int hard = p->opt.hard_weight != 0.0f;
  for (int64_t i = 0; i < p->N; ++i) {
    double* st = out->state + i * FH_DISTILL_ROW_STATE;
    out->row_loss[i] = out->row_soft[i] = out->row_hard[i] = 0.0;
    for (int k = 0; k < FH_DISTILL_ROW_STATE; ++k) st[k] = 0.0;
    if (!row_valid(p, i)) continue;
    double lse[3], s_y, D = 0.0, S = 0.0;
    fh_ref_distill_merge_stats(g->stats, g->P, p->N, i, lse, &s_y);
    for (int64_t r = 0; r < g->P; ++r) { /* rank order */
      const double* q = g->div + (r * p->N + i) * FH_SHARD_DISTILL_DIV;
      D += q[0];
      S += q[1];
    }
    st[0] = lse[0];
    st[1] = lse[1];
    st[2] = S;
    st[3] = hard ? lse[2] : 0.0;
    fh_ref_distill_put_row(p, out, i, D, hard ? st[3] - s_y : 0.0);
  }
  fh_ref_distill_reduce(p, out);
  return FH_SUCCESS;
}

fh_status_t fh_ref_distill_shard_f64(const fh_distill_problem_t* p, int64_t P, const double* gathered_stats,
                                     const double* gathered_div, fh_distill_ref_fwd_t* out) {
  gathered_t g = {P, gathered_stats, gathered_div};
  return combine(p, out, &g);
}

fh_status_t fh_ref_distill_shard_combine(const fh_distill_problem_t* p, int64_t P, const double* gathered_stats,
                                         const double* gathered_div, const fh_distill_outputs_t* o) {
  gathered_t g = {P, gathered_stats, gathered_div};
  return fh_ref_distill_forward_out(p, combine, &g, o);
}
