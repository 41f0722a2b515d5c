/* The validated distillation problem, as the API layer (src/distill.c) hands it to a backend. */
#ifndef FH_DISTILL_H
#define FH_DISTILL_H

#include "fusedhead.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fh_distill_problem {
  const char* fn;           /* public entry point, for error messages */
  int64_t N, V, D_s;
  int sparse;               /* 0: dense teacher head; 1: ids + logprobs */
  const fh_tensor_t* Es;    /* [N x D_s] */
  const fh_tensor_t* Cs;    /* [V x D_s] */
  const fh_tensor_t* bs;    /* [1 x V] or NULL */
  int64_t V_t, D_t;         /* dense teacher */
  const fh_tensor_t* Et;    /* [N x D_t] */
  const fh_tensor_t* Ct;    /* [V_t x D_t], V_t >= V; rows >= V are never read */
  const fh_tensor_t* bt;    /* [1 x V_t] or NULL */
  int64_t K;                /* sparse teacher */
  const int64_t* ids;       /* [N x K] */
  const float* logprobs;    /* [N x K] */
  const int64_t* targets;   /* [N] or NULL (every row valid) */
  fh_distill_options_t opt; /* full-size copy: caller's fields over the defaults */
  int64_t class_offset;     /* vocabulary shard: global id of class 0 of Cs/Ct (0: whole head;
                               docs/distributed.md); targets stay global */
  /* The shard backward only: every rank's gathered forward buffers ([shard_nranks][N][width] of
   * fusedhead_shard.h), from which the global row state is merged in fp64 (NULL otherwise). */
  int64_t shard_nranks;
  const double *shard_stats, *shard_div;
} fh_distill_problem_t;

/* Options over the defaults, validated (o is the full-size copy). */
fh_status_t fh_distill_check_options(const char* fn, const fh_distill_options_t* user, fh_distill_options_t* o);
/* Validation shared with the shard calls (src/shard.c): fills p. Exactly one of dense and
 * sparse is non-NULL; shard NULL or this rank's slice (dense teacher only). */
fh_status_t fh_distill_check_problem(const char* fn, fh_context_t* ctx, const fh_distill_options_t* opts,
                                     const fh_shard_t* shard, const fh_distill_head_t* student,
                                     const fh_distill_head_t* dense, const fh_distill_sparse_teacher_t* sparse,
                                     const int64_t* targets, fh_distill_problem_t* p);
/* The backward (clears the error first), whole head or shard (then nranks and the gathered
 * buffers of its forward give the row state; NULL and 0 for the whole head). */
fh_status_t fh_distill_backward_impl(const char* fn, fh_context_t* ctx, const fh_distill_options_t* opts,
                                     const fh_shard_t* shard, int64_t nranks, const double* gathered_stats,
                                     const double* gathered_div, const fh_distill_head_t* student,
                                     const fh_distill_head_t* dense, const fh_distill_sparse_teacher_t* sparse,
                                     const int64_t* targets, const fh_distill_grad_inputs_t* in,
                                     const fh_distill_grads_t* grads, void* workspace, size_t workspace_bytes);

/* The CPU reference (src/ref/distill.c). */
fh_status_t fh_ref_distill_forward(const fh_distill_problem_t* p, const fh_distill_outputs_t* out);
fh_status_t fh_ref_distill_backward(const fh_distill_problem_t* p, const fh_distill_grad_inputs_t* in,
                                    const fh_distill_grads_t* grads);

#ifdef __cplusplus
}
#endif

#endif
