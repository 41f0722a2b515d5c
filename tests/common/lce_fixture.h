/* A linear cross-entropy problem builder for the ref/ and api/ suites: random fp32 E, C, bias
 * quantized to multiples of 2^-12 (so +-2^-10 perturbations and bf16/fp32 stores are exact),
 * peaked rows (the target logit raised by about `peak` above the rest), ignored rows, optional
 * class and token weights. Also a holder for the fp64 core's forward results. */
#ifndef FH_LCE_FIXTURE_H
#define FH_LCE_FIXTURE_H

#include <stdint.h>

#include "fusedhead.h"
#include "linear_ce.h"
#include "ref/linear_ce_ref.h"

typedef struct lce_fix_spec {
  int64_t N, V, D;
  uint64_t seed;
  int bias;              /* 1: a bias [1 x V] */
  int class_weights;     /* 1: class weights in [1/4, 2], class 0 gets weight 0 */
  int token_weights;     /* 1: token weights in [1/4, 2], row 1 gets weight 0 */
  int every_peaked;      /* every k-th row is peaked (0: none) */
  int every_ignored;     /* every k-th row (offset 2) is ignored (0: none) */
  double peak;           /* how far the target logit is raised in peaked rows (about) */
  double e_scale, c_scale; /* standard deviations of E and C entries */
} lce_fix_spec_t;

/* The spec the FD suite uses: N=37, D=19, V=101, every 5th row peaked by 10, every 7th ignored. */
lce_fix_spec_t lce_fix_default_spec(uint64_t seed);

typedef struct lce_fix {
  int64_t N, V, D;
  float *E, *C, *bias;  /* dense fp32 */
  int64_t* targets;
  float *cw, *tw;       /* class / token weights or NULL */
  fh_tensor_t tE, tC, tb;
  fh_linear_ce_options_t opt;
  int owns_weights;     /* lce_fix_convert to fp64: cw, tw are converted copies */
} lce_fix_t;

void lce_fix_init(lce_fix_t* f, const lce_fix_spec_t* s);
/* Run the reference on one thread in this (test) process. The FD suite makes ~25k forward
 * calls on a 37 x 101 x 19 problem; an OpenMP team per call costs more than the work, and on a
 * loaded 2-core machine spinning teams made the suite 25x slower (44 s vs 1.6 s). Results do
 * not depend on the thread count (rows are independent, reductions run in row order). */
void lce_fix_serial(void);
void lce_fix_free(lce_fix_t* f);
/* The problem the fp64 core takes (points into f; f->opt is copied). */
fh_lce_problem_t lce_fix_problem(const lce_fix_t* f);

/* fp64 forward results with their arrays allocated for N rows. */
typedef struct lce_fwd64 {
  fh_lce_ref_forward_t r;
  int64_t n;
} lce_fwd64_t;
void lce_fwd64_alloc(lce_fwd64_t* o, int64_t N);
void lce_fwd64_free(lce_fwd64_t* o);
/* Run the fp64 core forward on f (asserting success is the caller's job: returns the status). */
fh_status_t lce_fix_forward64(const lce_fix_t* f, lce_fwd64_t* o);

/* The public calls on the fixture's inputs (bias when the fixture has one). */
fh_status_t lce_fix_api_forward(fh_context_t* ctx, const lce_fix_t* f, const fh_linear_ce_outputs_t* out);
fh_status_t lce_fix_api_backward(fh_context_t* ctx, const lce_fix_t* f, const fh_linear_ce_grad_inputs_t* in,
                                 const fh_linear_ce_grads_t* grads);

/* Round every E, C and bias value to the nearest bf16 value (each is then exact in bf16, fp16
 * and fp32, since the fixture's values stay within fp16's normal range or are 0). */
void lce_fix_round_to_bf16(lce_fix_t* f);
/* A copy of f's E, C, bias converted to `dtype` (dense); f2 shares targets and weights, and
 * owns only the converted buffers (free with lce_fix_free_converted). For FH_DTYPE_F64 the
 * weights become double arrays too (the header's rule for fp64 inputs), also owned by f2. */
void lce_fix_convert(const lce_fix_t* f, fh_dtype_t dtype, lce_fix_t* f2);
void lce_fix_free_converted(lce_fix_t* f2);

#endif
