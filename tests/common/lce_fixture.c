#include "lce_fixture.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dtype.h"
#include "test_util.h"

lce_fix_spec_t lce_fix_default_spec(uint64_t seed) {
  lce_fix_spec_t s;
  memset(&s, 0, sizeof s);
  s.N = 37;
  s.V = 101;
  s.D = 19;
  s.seed = seed;
  s.bias = 1;
  s.every_peaked = 5;
  s.every_ignored = 7;
  s.peak = 10.0;
  s.e_scale = 0.5;
  s.c_scale = 0.3;
  return s;
}

static float* alloc_f(int64_t n) { return (float*)calloc((size_t)(n > 0 ? n : 1), sizeof(float)); }

/* Multiples of 2^-12: every value and its +-2^-10, +-2^-9 perturbations are exact in fp32. */
static float q12(double x) { return (float)tu_quantize(x, 12); }

void lce_fix_init(lce_fix_t* f, const lce_fix_spec_t* s) {
  memset(f, 0, sizeof *f);
  tu_rng_t rng = {s->seed};
  const int64_t N = s->N, V = s->V, D = s->D;
  f->N = N;
  f->V = V;
  f->D = D;
  f->E = alloc_f(N * D);
  f->C = alloc_f(V * D);
  f->targets = (int64_t*)calloc((size_t)(N > 0 ? N : 1), sizeof(int64_t));
  for (int64_t k = 0; k < V * D; ++k) f->C[k] = q12(s->c_scale * tu_normal(&rng));
  for (int64_t i = 0; i < N; ++i) {
    const int64_t y = V > 0 ? tu_randint(&rng, V) : 0;
    f->targets[i] = y;
    for (int64_t k = 0; k < D; ++k) f->E[i * D + k] = q12(s->e_scale * tu_normal(&rng));
    if (s->every_peaked && i % s->every_peaked == 0 && V > 0) {
      /* E_i += peak * C_y / |C_y|^2 raises r_iy by `peak` and leaves the other logits
       * roughly as they were: a row whose target dominates (p_y close to 1). */
      double n2 = 0;
      for (int64_t k = 0; k < D; ++k) n2 += (double)f->C[y * D + k] * f->C[y * D + k];
      if (n2 > 0)
        for (int64_t k = 0; k < D; ++k) f->E[i * D + k] = q12(f->E[i * D + k] + s->peak * f->C[y * D + k] / n2);
    }
    if (s->every_ignored && i % s->every_ignored == 2) f->targets[i] = -100;
  }
  if (s->bias) {
    f->bias = alloc_f(V);
    for (int64_t j = 0; j < V; ++j) f->bias[j] = q12(0.25 * tu_normal(&rng));
  }
  if (s->class_weights) {
    f->cw = alloc_f(V);
    for (int64_t j = 0; j < V; ++j) f->cw[j] = (float)(0.25 + tu_quantize(1.75 * tu_uniform(&rng), 6));
    if (V > 0) f->cw[0] = 0.0f;
  }
  if (s->token_weights) {
    f->tw = alloc_f(N);
    for (int64_t i = 0; i < N; ++i) f->tw[i] = (float)(0.25 + tu_quantize(1.75 * tu_uniform(&rng), 6));
    if (N > 1) f->tw[1] = 0.0f;
  }
  f->tE = fh_tensor_2d(f->E, FH_DTYPE_F32, N, D);
  f->tC = fh_tensor_2d(f->C, FH_DTYPE_F32, V, D);
  f->tb = fh_tensor_2d(f->bias, FH_DTYPE_F32, 1, V);
  fh_linear_ce_options_init(&f->opt);
}

void lce_fix_free(lce_fix_t* f) {
  free(f->E);
  free(f->C);
  free(f->bias);
  free(f->targets);
  free(f->cw);
  free(f->tw);
  memset(f, 0, sizeof *f);
}

fh_lce_problem_t lce_fix_problem(const lce_fix_t* f) {
  fh_lce_problem_t p;
  memset(&p, 0, sizeof p);
  p.N = f->N;
  p.V = f->V;
  p.D = f->D;
  p.dtype = f->tE.dtype;
  p.E = &f->tE;
  p.C = &f->tC;
  p.bias = f->bias ? &f->tb : NULL;
  p.targets = f->targets;
  p.class_weights = f->cw;
  p.token_weights = f->tw;
  p.opt = f->opt;
  return p;
}

void lce_fwd64_alloc(lce_fwd64_t* o, int64_t N) {
  memset(o, 0, sizeof *o);
  size_t n = (size_t)(N > 0 ? N : 1);
  o->n = N;
  o->r.lse = (double*)calloc(n, sizeof(double));
  o->r.entropy = (double*)calloc(n, sizeof(double));
  o->r.row_loss = (double*)calloc(n, sizeof(double));
  o->r.row_zloss = (double*)calloc(n, sizeof(double));
  o->r.argmax = (int64_t*)calloc(n, sizeof(int64_t));
}

void lce_fwd64_free(lce_fwd64_t* o) {
  free(o->r.lse);
  free(o->r.entropy);
  free(o->r.row_loss);
  free(o->r.row_zloss);
  free(o->r.argmax);
  memset(o, 0, sizeof *o);
}

fh_status_t lce_fix_forward64(const lce_fix_t* f, lce_fwd64_t* o) {
  fh_lce_problem_t p = lce_fix_problem(f);
  return fh_ref_lce_forward_f64(&p, &o->r);
}

fh_status_t lce_fix_api_forward(fh_context_t* ctx, const lce_fix_t* f, const fh_linear_ce_outputs_t* out) {
  return fh_linear_ce_forward(ctx, &f->opt, &f->tE, &f->tC, f->bias ? &f->tb : NULL, f->targets, f->cw, f->tw, out,
                              NULL, 0);
}

fh_status_t lce_fix_api_backward(fh_context_t* ctx, const lce_fix_t* f, const fh_linear_ce_grad_inputs_t* in,
                                 const fh_linear_ce_grads_t* grads) {
  return fh_linear_ce_backward(ctx, &f->opt, &f->tE, &f->tC, f->bias ? &f->tb : NULL, f->targets, f->cw, f->tw, in,
                               grads, NULL, 0);
}

static float to_bf16(float x) { return (float)fh_bf16_bits_to_double(fh_double_to_bf16_bits((double)x)); }

void lce_fix_round_to_bf16(lce_fix_t* f) {
  for (int64_t k = 0; k < f->N * f->D; ++k) f->E[k] = to_bf16(f->E[k]);
  for (int64_t k = 0; k < f->V * f->D; ++k) f->C[k] = to_bf16(f->C[k]);
  if (f->bias)
    for (int64_t j = 0; j < f->V; ++j) f->bias[j] = to_bf16(f->bias[j]);
}

static void* convert(const float* x, int64_t n, fh_dtype_t dtype) {
  void* y = calloc((size_t)(n > 0 ? n : 1), fh_dtype_size(dtype));
  for (int64_t k = 0; k < n; ++k) fh_store(y, dtype, k, (double)x[k]);
  return y;
}

void lce_fix_convert(const lce_fix_t* f, fh_dtype_t dtype, lce_fix_t* f2) {
  *f2 = *f;
  f2->E = (float*)convert(f->E, f->N * f->D, dtype);
  f2->C = (float*)convert(f->C, f->V * f->D, dtype);
  f2->bias = f->bias ? (float*)convert(f->bias, f->V, dtype) : NULL;
  f2->tE = fh_tensor_2d(f2->E, dtype, f->N, f->D);
  f2->tC = fh_tensor_2d(f2->C, dtype, f->V, f->D);
  f2->tb = fh_tensor_2d(f2->bias, dtype, 1, f->V);
  f2->cw = f->cw && dtype == FH_DTYPE_F64 ? (float*)convert(f->cw, f->V, dtype) : NULL;
  f2->tw = f->tw && dtype == FH_DTYPE_F64 ? (float*)convert(f->tw, f->N, dtype) : NULL;
  f2->owns_weights = dtype == FH_DTYPE_F64;
  if (!f2->owns_weights) {
    f2->cw = f->cw;
    f2->tw = f->tw;
  }
}

void lce_fix_free_converted(lce_fix_t* f2) {
  if (f2->owns_weights) {
    free(f2->cw);
    free(f2->tw);
  }
  free(f2->E);
  free(f2->C);
  free(f2->bias);
  memset(f2, 0, sizeof *f2);
}

void lce_fix_serial(void) {
#ifdef _OPENMP
  omp_set_num_threads(1);
#endif
}
