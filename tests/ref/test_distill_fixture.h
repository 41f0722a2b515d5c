/* Shared fixture of the distillation suites: two random heads (fp32 storage, entries quantized
 * to multiples of 2^-12 so a ±2^-10 or ±2^-9 perturbation is exact in fp32), optional peaked
 * rows, targets with some ignored rows, and the problem struct the fp64 core takes. */
#ifndef TEST_DISTILL_FIXTURE_H
#define TEST_DISTILL_FIXTURE_H

#include <stdint.h>

#include "distill.h"
#include "ref/distill_ref.h"
#include "test_util.h"

typedef struct dfx {
  int64_t N, V, Ds, Vt, Dt;
  float *Es, *Cs, *bs, *Et, *Ct, *bt;
  fh_tensor_t tEs, tCs, tbs, tEt, tCt, tbt;
  int64_t* targets;
  int bias;
} dfx_t;

/* Random heads. peaked: some rows get a dominant class in the student and (another) in the
 * teacher. bias: both heads get a bias. n_ignored rows (every third from row 1) get
 * ignore_index -100 as target. */
void dfx_init(dfx_t* f, int64_t N, int64_t V, int64_t Ds, int64_t Vt, int64_t Dt, uint64_t seed, int peaked,
              int bias, int n_ignored);
void dfx_free(dfx_t* f);
/* The validated-problem struct for the fp64 core (targets used when `with_targets`). */
void dfx_problem(const dfx_t* f, const fh_distill_options_t* o, int with_targets, fh_distill_problem_t* p);
/* Public-API heads. */
void dfx_heads(dfx_t* f, fh_distill_head_t* student, fh_distill_head_t* teacher);

/* fp64 forward: the reduced loss (none: Σ_i w_i loss_i with w = grad_loss). state/rows may be
 * NULL. Returns NAN on failure. */
double dfx_loss(const fh_distill_problem_t* p, const double* grad_loss, double* state);

/* Checks the fp64 core's dEs, dCs, dbs against Richardson-extrapolated central differences of
 * the fp64 loss, on random single entries and random directions. Returns 1 when all agree. */
int dfx_check_fd(dfx_t* f, const fh_distill_problem_t* p, const char* name, uint64_t seed);

#endif
