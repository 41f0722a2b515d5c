/* The fp64 core of the distillation reference. The public fh_distill_* calls on the CPU backend
 * wrap it (rounding to fp32 once); tests call it directly to compare gradients with finite
 * differences of the fp64 loss, and the divergence elements to check them in isolation. */
#ifndef FH_DISTILL_REF_H
#define FH_DISTILL_REF_H

#include "distill.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A divergence with its options resolved (endpoints, named alpha cases) into one of a few
 * element formulas. */
typedef enum fh_div_kind {
  FH_DIV_ZERO = 0, /* identically 0 (plain JSD at β ∈ {0, 1}) */
  FH_DIV_FKL,
  FH_DIV_RKL,
  FH_DIV_JSD, /* scale · JSD(beta), beta in (0, 1) */
  FH_DIV_TVD,
  FH_DIV_SKEW_FKL,
  FH_DIV_SKEW_RKL,
  FH_DIV_ALPHA
} fh_div_kind_t;

typedef struct fh_div {
  fh_div_kind_t kind;
  double beta, scale, lambda, alpha;
} fh_div_t;

void fh_div_resolve(const fh_distill_options_t* o, fh_div_t* d);

/* One class of one row: X = log q, Y = log p. Writes term = q f(p/q) (the row's divergence is
 * the sum of terms) and qa = q a(p/q) (the gradient w.r.t. u = s/T is qa − q Σ qa). */
void fh_div_eval(const fh_div_t* d, double X, double Y, double* term, double* qa);

/* log((1 − w) + w e^z) for w in [0, 1], accurate when the result is near 0 and when it is not. */
double fh_div_log_mix(double w, double z);

/* Forward results in fp64; per-row arrays have N entries, state N x FH_DISTILL_ROW_STATE. */
typedef struct fh_distill_ref_fwd {
  double* row_loss; /* hard_weight·hard_i + soft_weight·soft_i, 0 at ignored rows */
  double* row_soft; /* κ D_i */
  double* row_hard; /* lse(s_i) − s_{i,y}; 0 when hard_weight == 0 */
  double* state;
  double loss, soft, hard; /* reduced (for none: the sums) */
  double denom;            /* the mean's denominator (N_valid or divisor) */
  int64_t n_valid;
} fh_distill_ref_fwd_t;

fh_status_t fh_ref_distill_forward_f64(const fh_distill_problem_t* p, fh_distill_ref_fwd_t* out);

/* The pieces of the forward that a vocabulary shard runs (docs/distributed.md; layouts in
 * fusedhead_shard.h). Dense teacher only. */
/* Step 1: per-row statistics [N x FH_SHARD_DISTILL_STATS] over the problem's classes. */
fh_status_t fh_ref_distill_shard_stats(const fh_distill_problem_t* p, double* stats);
/* Merge row i of P ranks' statistics in rank order: lse of s/T, t/T and s, and the target's s. */
void fh_ref_distill_merge_stats(const double* gathered, int64_t P, int64_t N, int64_t i, double lse[3],
                                double* s_y);
/* Step 2: per-row Σ q f and Σ q a [N x FH_SHARD_DISTILL_DIV] given P ranks' statistics. */
fh_status_t fh_ref_distill_shard_div(const fh_distill_problem_t* p, int64_t P, const double* gathered, double* div);
/* Row i's loss parts from its divergence D and hard CE; then the reductions over the rows. */
void fh_ref_distill_put_row(const fh_distill_problem_t* p, fh_distill_ref_fwd_t* out, int64_t i, double D,
                            double hard);
void fh_ref_distill_reduce(const fh_distill_problem_t* p, fh_distill_ref_fwd_t* out);
/* The public forward's outputs (rounded once) from the fp64 results that run(p, r, arg) fills
 * (NULL: fh_ref_distill_forward_f64). */
typedef fh_status_t (*fh_ref_distill_fwd_fn_t)(const fh_distill_problem_t* p, fh_distill_ref_fwd_t* r,
                                               const void* arg);
fh_status_t fh_ref_distill_forward_out(const fh_distill_problem_t* p, fh_ref_distill_fwd_fn_t run, const void* arg,
                                       const fh_distill_outputs_t* o);
/* Step 3 of a shard (src/ref/distill_shard.c): the fp64 results (rows, state, reductions), then
 * the rounded outputs, from P ranks' gathered statistics and divergence sums. */
fh_status_t fh_ref_distill_shard_f64(const fh_distill_problem_t* p, int64_t P, const double* gathered_stats,
                                     const double* gathered_div, fh_distill_ref_fwd_t* out);
fh_status_t fh_ref_distill_shard_combine(const fh_distill_problem_t* p, int64_t P, const double* gathered_stats,
                                         const double* gathered_div, const fh_distill_outputs_t* o);

/* Backward in fp64 from an fp64 state. grad_loss [1] or [N] (none). dE64 [N x D_s],
 * dC64 [V x D_s], db64 [V] (each may be NULL) receive fp64 results; grads (may be NULL) are the
 * caller's tensors, written or accumulated once. A gradient is computed when either wants it. */
fh_status_t fh_ref_distill_backward_f64(const fh_distill_problem_t* p, const double* state,
                                        const double* grad_loss, double* dE64, double* dC64, double* db64,
                                        const fh_distill_grads_t* grads);

#ifdef __cplusplus
}
#endif

#endif
