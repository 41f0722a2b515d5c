/* The validated linear cross-entropy problem, as the API layer hands it to a backend. */
#ifndef FH_LINEAR_CE_H
#define FH_LINEAR_CE_H

#include "fusedhead.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fh_lce_problem {
  int64_t N, V, D;
  fh_dtype_t dtype;
  const fh_tensor_t* E;       /* [N x D] */
  const fh_tensor_t* C;       /* [V x D] */
  const fh_tensor_t* bias;    /* [1 x V] or NULL */
  const int64_t* targets;     /* [N] */
  const float* class_weights; /* [V] or NULL */
  const float* token_weights; /* [N] or NULL */
  fh_linear_ce_options_t opt; /* full-size copy: caller's fields over the defaults */
  /* Vocabulary shard (docs/distributed.md): C and bias hold the global classes
   * [class_offset, class_offset + V); targets and class_weights are global ([V_total]).
   * Both 0 (memset) mean the whole vocabulary: offset 0, V_total = V. */
  int64_t class_offset;
  int64_t V_total;
  /* The shard backward only: every rank's forward partials [shard_nranks][N][FH_SHARD_LCE_PARTIAL],
   * from which it takes each row's global lse, entropy, V_i and W_i in fp64 (NULL otherwise). */
  int64_t shard_nranks;
  const double* shard_gathered;
} fh_lce_problem_t;

/* The global vocabulary size of a problem (V when it is not a shard). */
static inline int64_t fh_lce_vtotal(const fh_lce_problem_t* p) { return p->V_total > 0 ? p->V_total : p->V; }

/* Options over the defaults, validated (o is the full-size copy). */
fh_status_t fh_lce_check_options(const char* fn, const fh_linear_ce_options_t* user, fh_linear_ce_options_t* o);
/* Validation shared with the shard calls (src/shard.c): fills p; shard may be NULL. */
fh_status_t fh_lce_check_problem(const char* fn, fh_context_t* ctx, const fh_linear_ce_options_t* opts,
                                 const fh_shard_t* shard, const fh_tensor_t* E, const fh_tensor_t* C,
                                 const fh_tensor_t* bias, const int64_t* targets, const float* class_weights,
                                 const float* token_weights, fh_lce_problem_t* p);
/* The backward after fh_clear_error(), for the whole head (shard NULL; nranks, gathered unused)
 * or a shard (gathered: every rank's forward partials, [nranks][N][FH_SHARD_LCE_PARTIAL]). */
fh_status_t fh_lce_backward_impl(const char* fn, fh_context_t* ctx, const fh_linear_ce_options_t* opts,
                                 const fh_shard_t* shard, int64_t nranks, const double* gathered,
                                 const fh_tensor_t* E, const fh_tensor_t* C,
                                 const fh_tensor_t* bias, const int64_t* targets, const float* class_weights,
                                 const float* token_weights, const fh_linear_ce_grad_inputs_t* in,
                                 const fh_linear_ce_grads_t* grads, void* workspace, size_t workspace_bytes);

/* The CPU reference (src/ref/linear_ce.c). */
fh_status_t fh_ref_linear_ce_forward(const fh_lce_problem_t* p, const fh_linear_ce_outputs_t* out);
fh_status_t fh_ref_linear_ce_backward(const fh_lce_problem_t* p, const fh_linear_ce_grad_inputs_t* in,
                                      const fh_linear_ce_grads_t* grads);

#ifdef __cplusplus
}
#endif

#endif
