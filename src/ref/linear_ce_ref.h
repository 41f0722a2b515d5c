/* The fp64 core of the linear cross-entropy reference. The public fh_linear_ce_* calls on the
 * CPU backend wrap it; tests call it directly to check gradients against finite differences of
 * the fp64 loss, before anything is rounded to fp32. */
#ifndef FH_LINEAR_CE_REF_H
#define FH_LINEAR_CE_REF_H

#include "linear_ce.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Forward results in fp64. Per-row arrays have N entries and must be provided (not NULL). */
typedef struct fh_lce_ref_forward {
  double* lse;      /* 0 at ignored rows */
  double* entropy;  /* 0 at ignored rows */
  double* row_loss; /* ce_i + reg_i, 0 at ignored rows */
  double* row_zloss;/* ω_i λ lse_i², 0 at ignored rows */
  int64_t* argmax;  /* -1 at ignored rows */
  /* reduced scalars (mean/sum per the options; for none: the sums) */
  double loss, z_loss, accuracy;
  double denom_ce, denom_reg; /* the mean's denominators actually used (after divisor) */
  int64_t n_valid;
} fh_lce_ref_forward_t;

fh_status_t fh_ref_lce_forward_f64(const fh_lce_problem_t* p, fh_lce_ref_forward_t* out);

/* The forward in two halves (docs/distributed.md), which fh_ref_lce_forward_f64 chains with one
 * rank: per-row partials over the problem's classes ([N x FH_SHARD_LCE_PARTIAL]), then the
 * results from P ranks' gathered partials ([P][N][FH_SHARD_LCE_PARTIAL], merged in rank
 * order). For the second half p needs N, V_total, dtype, targets, weights and options only. */
typedef struct fh_lce_row_stats {
  double lse, h, sum_wz; /* lse -inf and h 0 when every class is masked */
  double W, n;           /* Σ w_j and the count V_i over the row's unmasked classes */
  double z_y;            /* -inf: the target is masked */
  int64_t arg;
} fh_lce_row_stats_t;
fh_status_t fh_ref_lce_partials(const fh_lce_problem_t* p, double* part);
void fh_ref_lce_combine_row(const double* gathered, int64_t P, int64_t N, int64_t i, fh_lce_row_stats_t* rs);
fh_status_t fh_ref_lce_finish(const fh_lce_problem_t* p, const double* gathered, int64_t P, fh_lce_ref_forward_t* out);
/* The public forward's outputs (rounded once): from P ranks' gathered partials, or, with
 * gathered NULL, from the problem itself (fh_ref_linear_ce_forward). */
fh_status_t fh_ref_lce_forward_out(const fh_lce_problem_t* p, int64_t P, const double* gathered,
                                   const fh_linear_ce_outputs_t* o);

/* Backward in fp64. lse/entropy as from the forward (entropy may be NULL when
 * entropy_weight == 0; lse NULL: both recomputed in fp64; on a shard, p->shard_gathered, they
 * and the smoothing's V_i, W_i come from the merged partials instead), grad_loss [1] or [N]
 * (none), grad_lse [N] or NULL.
 * dE64 [N x D], dC64 [V x D], db64 [V]: fp64 results (each may be NULL).
 * grads (may be NULL): the caller's tensors, written (or accumulated into) once, rounded from
 * fp64. A gradient is computed when either destination asks for it. */
fh_status_t fh_ref_lce_backward_f64(const fh_lce_problem_t* p, const double* lse, const double* entropy,
                                    const double* grad_loss, const double* grad_lse, double* dE64,
                                    double* dC64, double* db64, const fh_linear_ce_grads_t* grads);

#ifdef __cplusplus
}
#endif

#endif
