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
} fh_lce_problem_t;

/* The CPU reference (src/ref/linear_ce.c). */
fh_status_t fh_ref_linear_ce_forward(const fh_lce_problem_t* p, const fh_linear_ce_outputs_t* out);
fh_status_t fh_ref_linear_ce_backward(const fh_lce_problem_t* p, const fh_linear_ce_grad_inputs_t* in,
                                      const fh_linear_ce_grads_t* grads);

#ifdef __cplusplus
}
#endif

#endif
