/* Shared by kernel_distill (tests/kernel/test_distill.c) and gpu_distill (tests/gpu): two random
 * heads in any dtype, the CUDA distillation forward and backward through the public API (host
 * buffers on the emulator, device copies under lk_set_memory's hooks), the fp64 reference, the
 * naive fp32 computation and the comparisons with the tolerance rule of test_linear_ce_common.h
 * (see test_distill.c's header comment for what each side computes). */
#ifndef TEST_DISTILL_COMMON_H
#define TEST_DISTILL_COMMON_H

#include <stdint.h>

#include "distill.h"
#include "fusedhead.h"

#define NS FH_DISTILL_ROW_STATE

typedef struct dk_spec {
  int64_t N, V, Ds, Vt, Dt;
  fh_dtype_t dtype;
  uint64_t seed;
  int pad;         /* > 0: every matrix stored with row_stride = cols + pad (scalar fallback) */
  int nan_row;     /* >= 0: that row of Es is NaN */
  int every_ign;   /* > 0: every every_ign-th row (from 1) ignored; 0: targets NULL */
  double e_mul;    /* > 0: Es and Et drawn with this standard deviation (logit-scale tests) */
} dk_spec_t;

typedef struct dk_problem {
  dk_spec_t s;
  void *Es, *Cs, *bs, *Et, *Ct, *bt;
  fh_tensor_t tEs, tCs, tbs, tEt, tCt, tbt;
  int64_t* targets;
  /* A sparse teacher instead of the head (K > 0; tests/kernel/test_distill_sparse.c): ids and
   * log-probs [N x K]; expect_flag: the device check must reject a row (fh_context_check). */
  int64_t K;
  int64_t* ids;
  float* lp;
  int expect_flag;
} dk_problem_t;

/* Results as doubles: per-row loss/soft/hard (reduction none), the state, the reduced values. */
typedef struct dk_out {
  double *loss, *soft, *hard, *state;
  double rloss, rsoft, rhard;
} dk_out_t;

typedef struct dk_grads {
  double *dE, *dC, *db;
} dk_grads_t;

dk_spec_t dk_default(int64_t N, int64_t V, int64_t Ds, int64_t Vt, int64_t Dt, fh_dtype_t dt);
void dk_init(dk_problem_t* P, const dk_spec_t* s);
void dk_free(dk_problem_t* P);
/* A sparse teacher for P (tests/kernel/test_distill_sparse.c): K distinct ids per row with a
 * random teacher's fp32 log-probs; with_ninf: some -inf entries (never entry 0). */
void dk_sparse_init(dk_problem_t* P, int64_t K, uint64_t seed, int with_ninf);
fh_distill_problem_t dk_ref_problem(const dk_problem_t* P, const fh_distill_options_t* o);
void dk_out_alloc(dk_out_t* o, int64_t N);
void dk_out_free(dk_out_t* o);
/* The CUDA forward (guarded outputs). */
fh_status_t dk_run(const dk_problem_t* P, const fh_distill_options_t* o, dk_out_t* out);
void dk_reference(const dk_problem_t* P, const fh_distill_options_t* o, dk_out_t* out);
void dk_naive(const dk_problem_t* P, const fh_distill_options_t* o, dk_out_t* out);
/* One forward compared in full; kout (may be NULL) receives the kernel's results. */
int dk_check_forward(const char* label, const dk_problem_t* P, const fh_distill_options_t* o, dk_out_t* kout);
/* Options of the tests: divergence d with its parameter, T = 2, hard 0.5, soft 0.75, none. */
fh_distill_options_t dk_opts(fh_distill_divergence_t d, float param);

void dk_grads_alloc(dk_grads_t* g, const dk_problem_t* P);
void dk_grads_free(dk_grads_t* g);
double dk_round_to(fh_dtype_t dt, double x);
double* dk_make_gl(const dk_problem_t* P, const fh_distill_options_t* o);
/* The CUDA backward from the fp32 `state`; init (may be NULL) preloads the gradients. */
fh_status_t dk_run_backward(const dk_problem_t* P, const fh_distill_options_t* o, const double* state,
                            const double* gl, const dk_grads_t* init, dk_grads_t* out);
void dk_naive_backward(const dk_problem_t* P, const fh_distill_options_t* o, const double* state,
                       const double* gl, dk_grads_t* out);
extern const char* const DK_MODE_NAME[3];
int dk_check_backward(const char* label, const dk_problem_t* P, const fh_distill_options_t* o,
                      const dk_grads_t* init);

#endif
