/* Helpers of the kernel_linear_ce_* suites; see test_linear_ce_common.h. */
#include "test_linear_ce_common.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "ref/linear_ce_ref.h"
#include "test_util.h"

lk_spec_t lk_default(int64_t N, int64_t V, int64_t D, fh_dtype_t dtype) {
  lk_spec_t s;
  memset(&s, 0, sizeof s);
  s.N = N, s.V = V, s.D = D, s.dtype = dtype;
  s.seed = 1000 + (uint64_t)(N * 7 + V * 13 + D * 17 + dtype);
  s.bias = 1;
  s.every_peaked = 5;
  s.every_ignored = 7;
  s.peak = 10.0;
  s.nan_row = -1;
  return s;
}

/* Rounding of an fp32 G to the MMA operand type (fp32 stays fp32: the engine splits it into
 * three bf16 pieces, docs/engine.md "fp32 inputs"). */
static float operand_round(float g, fh_dtype_t dt) {
  if (dt == FH_DTYPE_F32) return g;
  return (float)(dt == FH_DTYPE_F16 ? fh_half_bits_to_double(fh_double_to_half_bits(g))
                                    : fh_bf16_bits_to_double(fh_double_to_bf16_bits(g)));
}
static double out_round(double x, fh_dtype_t dt) {
  if (dt == FH_DTYPE_F32) return (float)x;
  return dt == FH_DTYPE_F16 ? fh_half_bits_to_double(fh_double_to_half_bits(x))
                            : fh_bf16_bits_to_double(fh_double_to_bf16_bits(x));
}

/* rows x cols values stored with row stride ld (NaN in the padding, which must never be read). */
static void* to_dtype(const float* src, int64_t rows, int64_t cols, int64_t ld, fh_dtype_t dt, double** view) {
  const size_t es = fh_dtype_size(dt);
  void* p = malloc((size_t)(rows * ld > 0 ? rows * ld : 1) * es);
  *view = (double*)malloc(sizeof(double) * (size_t)(rows * cols > 0 ? rows * cols : 1));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < ld; ++c) {
      if (c >= cols) {
        fh_store(p, dt, r * ld + c, NAN);
        continue;
      }
      fh_store(p, dt, r * ld + c, (double)src[r * cols + c]);
      (*view)[r * cols + c] = fh_load(p, dt, r * ld + c);
    }
  return p;
}

void lk_init(lk_problem_t* P, const lk_spec_t* s) {
  memset(P, 0, sizeof *P);
  P->s = *s;
  lce_fix_spec_t fs = lce_fix_default_spec(s->seed);
  fs.N = s->N, fs.V = s->V, fs.D = s->D;
  fs.bias = s->bias, fs.class_weights = s->class_weights, fs.token_weights = s->token_weights;
  fs.every_peaked = s->every_peaked, fs.every_ignored = s->every_ignored, fs.peak = s->peak;
  lce_fix_init(&P->f, &fs);
  if (s->e_mul > 0)
    for (int64_t k = 0; k < s->N * s->D; ++k) P->f.E[k] = (float)(P->f.E[k] * s->e_mul);
  if (s->nan_row >= 0 && s->nan_row < s->N)
    for (int64_t k = 0; k < s->D; ++k) P->f.E[s->nan_row * s->D + k] = NAN;
  const int64_t ld = s->D + s->pad;
  P->E = to_dtype(P->f.E, s->N, s->D, ld, s->dtype, &P->e64);
  P->C = to_dtype(P->f.C, s->V, s->D, ld, s->dtype, &P->c64);
  if (s->bias) P->bias = to_dtype(P->f.bias, 1, s->V, s->V, s->dtype, &P->b64);
  P->tE = fh_tensor_2d(P->E, s->dtype, s->N, s->D);
  P->tC = fh_tensor_2d(P->C, s->dtype, s->V, s->D);
  P->tE.row_stride = P->tC.row_stride = ld;
  P->tb = fh_tensor_2d(P->bias, s->dtype, 1, s->V);
}

void lk_free(lk_problem_t* P) {
  lce_fix_free(&P->f);
  free(P->E), free(P->C), free(P->bias), free(P->e64), free(P->c64), free(P->b64);
  memset(P, 0, sizeof *P);
}

fh_lce_problem_t lk_ref_problem(const lk_problem_t* P) {
  fh_lce_problem_t p = lce_fix_problem(&P->f);
  p.dtype = P->s.dtype;
  p.E = &P->tE;
  p.C = &P->tC;
  p.bias = P->bias ? &P->tb : NULL;
  return p;
}

void lk_fwd_alloc(lk_fwd_t* o, int64_t N) {
  memset(o, 0, sizeof *o);
  size_t n = (size_t)(N > 0 ? N : 1);
  o->lse = calloc(n, sizeof(double));
  o->entropy = calloc(n, sizeof(double));
  o->loss_rows = calloc(n, sizeof(double));
  o->zloss_rows = calloc(n, sizeof(double));
  o->argmax = calloc(n, sizeof(int64_t));
}
void lk_fwd_free(lk_fwd_t* o) {
  free(o->lse), free(o->entropy), free(o->loss_rows), free(o->zloss_rows), free(o->argmax);
  memset(o, 0, sizeof *o);
}

static int row_valid(const lk_problem_t* P, int64_t i) {
  const int64_t y = P->f.targets[i];
  return y != P->f.opt.ignore_index && y >= 0 && y < P->s.V;
}

static lk_memory_t g_mem; /* all NULL: host memory */

void lk_set_memory(const lk_memory_t* m) {
  if (m)
    g_mem = *m;
  else
    memset(&g_mem, 0, sizeof g_mem);
}

/* The buffer the backend gets for `host` (bytes, plus the guard words after it): host itself,
 * or a device copy. */
void* lk_mirror(const void* host, size_t bytes, int guarded) {
  if (!host || !g_mem.alloc) return (void*)(uintptr_t)host; /* the backend gets the host buffer */
  const size_t total = bytes + (guarded ? TU_GUARD_WORDS * sizeof(uint32_t) : 0);
  void* d = g_mem.alloc(total ? total : 1);
  cr_assert(d != NULL, "device allocation of %zu bytes failed", total);
  cr_assert_eq(g_mem.to_device(d, host, total), 0, "copy to the device failed");
  return d;
}
/* Copy a mirror back over `host` (guards included) and release it. */
void lk_back(void* host, void* mirror, size_t bytes, int guarded) {
  if (!host || !g_mem.alloc) return;
  const size_t total = bytes + (guarded ? TU_GUARD_WORDS * sizeof(uint32_t) : 0);
  cr_assert_eq(g_mem.to_host(host, mirror, total), 0, "copy to the host failed");
  g_mem.release(mirror);
}
void lk_drop(const void* host, const void* mirror) {
  if (host && g_mem.alloc) g_mem.release((void*)(uintptr_t)mirror);
}

/* The problem's inputs as the backend sees them. */
typedef struct lk_inputs {
  fh_tensor_t E, C, b;
  int64_t* targets;
  float *cw, *tw;
} lk_inputs_t;
static void inputs_mirror(const lk_problem_t* P, lk_inputs_t* in) {
  const size_t es = fh_dtype_size(P->s.dtype);
  in->E = P->tE, in->C = P->tC, in->b = P->tb;
  in->E.data = lk_mirror(P->tE.data, es * (size_t)(P->tE.rows * P->tE.row_stride), 0);
  in->C.data = lk_mirror(P->tC.data, es * (size_t)(P->tC.rows * P->tC.row_stride), 0);
  in->b.data = P->bias ? lk_mirror(P->tb.data, es * (size_t)P->s.V, 0) : NULL;
  in->targets = lk_mirror(P->f.targets, sizeof(int64_t) * (size_t)P->s.N, 0);
  in->cw = lk_mirror(P->f.cw, sizeof(float) * (size_t)P->s.V, 0);
  in->tw = lk_mirror(P->f.tw, sizeof(float) * (size_t)P->s.N, 0);
}
static void inputs_drop(const lk_problem_t* P, lk_inputs_t* in) {
  lk_drop(P->tE.data, in->E.data), lk_drop(P->tC.data, in->C.data);
  if (P->bias) lk_drop(P->tb.data, in->b.data);
  lk_drop(P->f.targets, in->targets), lk_drop(P->f.cw, in->cw), lk_drop(P->f.tw, in->tw);
}

fh_status_t lk_run_forward(fh_context_t* ctx, const lk_problem_t* P, lk_fwd_t* out, float* lse32, float* ent32) {
  const int64_t N = P->s.N;
  const size_t n = (size_t)(N > 0 ? N : 1);
  const int none = P->f.opt.reduction == FH_REDUCTION_NONE;
  float* loss = tu_alloc_guarded(sizeof(float) * (none ? n : 1));
  float* zl = tu_alloc_guarded(sizeof(float) * (none ? n : 1));
  float* lse = tu_alloc_guarded(sizeof(float) * n);
  float* ent = tu_alloc_guarded(sizeof(float) * n);
  float* acc = tu_alloc_guarded(sizeof(float));
  int64_t* am = tu_alloc_guarded(sizeof(int64_t) * n);
  const size_t bl = sizeof(float) * (none ? n : 1);
  fh_linear_ce_outputs_t o = {lk_mirror(loss, bl, 1),         lk_mirror(lse, sizeof(float) * n, 1),
                              lk_mirror(ent, sizeof(float) * n, 1), lk_mirror(zl, bl, 1),
                              lk_mirror(am, sizeof(int64_t) * n, 1), lk_mirror(acc, sizeof(float), 1)};
  size_t wsb = 0;
  fh_status_t st = fh_linear_ce_forward_workspace_size(ctx, &P->f.opt, N, P->s.V, P->s.D, P->s.dtype, &wsb);
  cr_assert_eq(st, FH_SUCCESS, "%s", fh_last_error());
  void* ws = tu_alloc_guarded(wsb);
  memset(ws, 0xff, wsb); /* poison: the kernels must not read what they did not write */
  void* d_ws = lk_mirror(ws, wsb, 1);
  lk_inputs_t in;
  inputs_mirror(P, &in);
  st = fh_linear_ce_forward(ctx, &P->f.opt, &in.E, &in.C, P->bias ? &in.b : NULL, in.targets, in.cw, in.tw, &o, d_ws,
                            wsb);
  inputs_drop(P, &in);
  lk_back(loss, o.loss, bl, 1), lk_back(zl, o.z_loss, bl, 1);
  lk_back(lse, o.lse, sizeof(float) * n, 1), lk_back(ent, o.entropy, sizeof(float) * n, 1);
  lk_back(am, o.argmax, sizeof(int64_t) * n, 1), lk_back(acc, o.accuracy, sizeof(float), 1);
  lk_back(ws, d_ws, wsb, 1);
  if (st == FH_SUCCESS) {
    for (int64_t i = 0; i < N; ++i) {
      out->lse[i] = lse[i], out->entropy[i] = ent[i], out->argmax[i] = am[i];
      out->loss_rows[i] = none ? loss[i] : 0.0, out->zloss_rows[i] = none ? zl[i] : 0.0;
      if (lse32) lse32[i] = lse[i];
      if (ent32) ent32[i] = ent[i];
    }
    out->loss = none ? 0.0 : loss[0];
    out->z_loss = none ? 0.0 : zl[0];
    out->accuracy = acc[0];
  }
  cr_assert(tu_guards_intact(loss, sizeof(float) * (none ? n : 1)) && tu_guards_intact(zl, sizeof(float) * (none ? n : 1)),
            "guard words after loss / z_loss overwritten");
  cr_assert(tu_guards_intact(lse, sizeof(float) * n) && tu_guards_intact(ent, sizeof(float) * n) &&
                tu_guards_intact(am, sizeof(int64_t) * n) && tu_guards_intact(acc, sizeof(float)),
            "guard words after lse / entropy / argmax / accuracy overwritten");
  cr_assert(tu_guards_intact(ws, wsb), "guard words after the workspace overwritten");
  free(loss), free(zl), free(lse), free(ent), free(acc), free(am), free(ws);
  return st;
}

void lk_ref_forward(const lk_problem_t* P, lk_fwd_t* out) {
  fh_lce_problem_t p = lk_ref_problem(P);
  fh_lce_ref_forward_t r;
  memset(&r, 0, sizeof r);
  r.lse = out->lse, r.entropy = out->entropy, r.row_loss = out->loss_rows, r.row_zloss = out->zloss_rows;
  r.argmax = out->argmax;
  cr_assert_eq(fh_ref_lce_forward_f64(&p, &r), FH_SUCCESS, "%s", fh_last_error());
  out->loss = r.loss, out->z_loss = r.z_loss, out->accuracy = r.accuracy;
  if (P->f.opt.reduction == FH_REDUCTION_NONE) out->loss = out->z_loss = 0.0;
}

/* Naive logits of row i in fp32 (k order), bias added, z processed. */
static void naive_row(const lk_problem_t* P, int64_t i, float* z, float* raw) {
  const int64_t V = P->s.V, D = P->s.D;
  const fh_linear_ce_options_t* o = &P->f.opt;
  for (int64_t j = 0; j < V; ++j) {
    float a = 0.0f;
    for (int64_t k = 0; k < D; ++k) a += (float)P->e64[i * D + k] * (float)P->c64[j * D + k];
    if (P->bias) a += (float)fh_load(P->bias, P->s.dtype, j);
    if (raw) raw[j] = a;
    float s = o->logit_scale * a;
    z[j] = o->softcap > 0.0f ? o->softcap * tanhf(s / o->softcap) : s;
  }
}

void lk_naive_forward(const lk_problem_t* P, lk_fwd_t* out) {
  const int64_t N = P->s.N, V = P->s.V;
  const fh_linear_ce_options_t* o = &P->f.opt;
  float* z = malloc(sizeof(float) * (size_t)(V > 0 ? V : 1));
  float* raw = malloc(sizeof(float) * (size_t)(V > 0 ? V : 1));
  float W = 0.0f;
  for (int64_t j = 0; j < V; ++j) W += P->f.cw ? P->f.cw[j] : 1.0f;
  const float alpha = o->label_smoothing, eps = V > 0 ? alpha / (float)V : 0.0f;
  float sce = 0, sreg = 0, szl = 0, dce = 0, dreg = 0, nv = 0, corr = 0;
  for (int64_t i = 0; i < N; ++i) {
    out->lse[i] = out->entropy[i] = out->loss_rows[i] = out->zloss_rows[i] = 0.0;
    out->argmax[i] = -1;
    if (!row_valid(P, i)) continue;
    const int64_t y = P->f.targets[i];
    naive_row(P, i, z, raw);
    float m = -INFINITY, Z = 0, F = 0, swz = 0;
    int64_t am = 0;
    for (int64_t j = 0; j < V; ++j) {
      m = fmaxf(m, z[j]);
      if (raw[j] > raw[am] || (isnan(raw[j]) && !isnan(raw[am]))) am = j;
    }
    for (int64_t j = 0; j < V; ++j) {
      const float e = expf(z[j] - m);
      Z += e, F += e * (z[j] - m), swz += (P->f.cw ? P->f.cw[j] : 1.0f) * z[j];
    }
    const float lse = m + logf(Z), h = logf(Z) - F / Z;
    const float om = P->f.tw ? P->f.tw[i] : 1.0f, wy = P->f.cw ? P->f.cw[y] : 1.0f;
    const float ce = om * (wy * (1 - alpha) * (lse - z[y]) + eps * (W * lse - swz));
    const float zl = om * o->z_loss_scale * lse * lse, reg = zl + om * o->entropy_weight * h;
    out->lse[i] = lse, out->entropy[i] = h, out->loss_rows[i] = ce + reg, out->zloss_rows[i] = zl;
    out->argmax[i] = am;
    sce += ce, sreg += reg, szl += zl, dce += om * wy, dreg += om, nv += 1, corr += am == y;
  }
  if (o->divisor > 0) dce = dreg = o->divisor;
  out->accuracy = nv > 0 ? corr / nv : 0;
  if (o->reduction == FH_REDUCTION_MEAN) {
    out->loss = (dce != 0 ? sce / dce : 0) + (dreg != 0 ? sreg / dreg : 0);
    out->z_loss = dreg != 0 ? szl / dreg : 0;
  } else if (o->reduction == FH_REDUCTION_SUM) {
    out->loss = sce + sreg, out->z_loss = szl;
  } else {
    out->loss = out->z_loss = 0;
  }
  free(z), free(raw);
}

void lk_grads_alloc(lk_grads_t* g, const lk_problem_t* P) {
  g->dE = calloc((size_t)(P->s.N * P->s.D + 1), sizeof(double));
  g->dC = calloc((size_t)(P->s.V * P->s.D + 1), sizeof(double));
  g->db = calloc((size_t)(P->s.V + 1), sizeof(double));
}
void lk_grads_free(lk_grads_t* g) {
  free(g->dE), free(g->dC), free(g->db);
  memset(g, 0, sizeof *g);
}

void lk_bwd_in_make(lk_bwd_in_t* b, const lk_problem_t* P, int with_glse, uint64_t seed) {
  tu_rng_t rng = {seed};
  const int64_t N = P->s.N;
  const int none = P->f.opt.reduction == FH_REDUCTION_NONE;
  b->gl = calloc((size_t)(N + 1), sizeof(double));
  b->glse = with_glse ? calloc((size_t)(N + 1), sizeof(double)) : NULL;
  if (none)
    for (int64_t i = 0; i < N; ++i) b->gl[i] = tu_quantize(0.5 + tu_uniform(&rng), 8);
  else
    b->gl[0] = 1.25;
  if (b->glse)
    for (int64_t i = 0; i < N; ++i) b->glse[i] = tu_quantize(tu_uniform(&rng) - 0.5, 8);
}
void lk_bwd_in_free(lk_bwd_in_t* b) {
  free(b->gl), free(b->glse);
  memset(b, 0, sizeof *b);
}

fh_status_t lk_run_backward(fh_context_t* ctx, const lk_problem_t* P, const lk_bwd_in_t* in, const float* lse32,
                            const float* ent32, int want, const lk_grads_t* init, lk_grads_t* out) {
  const int64_t N = P->s.N, V = P->s.V, D = P->s.D;
  const fh_dtype_t dt = P->s.dtype;
  const size_t es = fh_dtype_size(dt);
  const int none = P->f.opt.reduction == FH_REDUCTION_NONE;
  float* gl = malloc(sizeof(float) * (size_t)(N + 1));
  float* glse = in->glse ? malloc(sizeof(float) * (size_t)(N + 1)) : NULL;
  for (int64_t i = 0; i < (none ? N : 1); ++i) gl[i] = (float)in->gl[i];
  for (int64_t i = 0; glse && i < N; ++i) glse[i] = (float)in->glse[i];
  const int64_t ld = D + P->s.pad;
  const size_t bE = es * (size_t)(N * ld), bC = es * (size_t)(V * ld), bb = es * (size_t)V;
  void* dE = tu_alloc_guarded(bE);
  void* dC = tu_alloc_guarded(bC);
  void* db = tu_alloc_guarded(bb);
  for (int64_t q = 0; q < N * ld; ++q) /* poison: NaN where nothing may be written */
    fh_store(dE, dt, q, init && q % ld < D ? init->dE[q / ld * D + q % ld] : NAN);
  for (int64_t q = 0; q < V * ld; ++q) fh_store(dC, dt, q, init && q % ld < D ? init->dC[q / ld * D + q % ld] : NAN);
  for (int64_t k = 0; k < V; ++k) fh_store(db, dt, k, init ? init->db[k] : NAN);
  fh_tensor_t tE = fh_tensor_2d(dE, dt, N, D), tC = fh_tensor_2d(dC, dt, V, D), tb = fh_tensor_2d(db, dt, 1, V);
  tE.row_stride = tC.row_stride = ld;
  tE.data = lk_mirror(dE, bE, 1), tC.data = lk_mirror(dC, bC, 1), tb.data = lk_mirror(db, bb, 1);
  fh_linear_ce_grads_t g = {(want & 1) ? &tE : NULL, (want & 2) ? &tC : NULL, (want & 4) && P->bias ? &tb : NULL};
  const size_t bgl = sizeof(float) * (size_t)(none ? N : 1), bn = sizeof(float) * (size_t)N;
  fh_linear_ce_grad_inputs_t gi = {lk_mirror(lse32, bn, 0), lk_mirror(ent32, bn, 0), lk_mirror(gl, bgl, 0),
                                   lk_mirror(glse, bn, 0)};
  size_t wsb = 0;
  fh_status_t st = fh_linear_ce_backward_workspace_size(ctx, &P->f.opt, N, V, D, dt, &wsb);
  cr_assert_eq(st, FH_SUCCESS, "%s", fh_last_error());
  void* ws = tu_alloc_guarded(wsb);
  memset(ws, 0xff, wsb);
  void* d_ws = lk_mirror(ws, wsb, 1);
  lk_inputs_t inp;
  inputs_mirror(P, &inp);
  st = fh_linear_ce_backward(ctx, &P->f.opt, &inp.E, &inp.C, P->bias ? &inp.b : NULL, inp.targets, inp.cw, inp.tw,
                             &gi, &g, d_ws, wsb);
  inputs_drop(P, &inp);
  lk_drop(lse32, gi.lse), lk_drop(ent32, gi.entropy), lk_drop(gl, gi.grad_loss), lk_drop(glse, gi.grad_lse);
  lk_back(dE, tE.data, bE, 1), lk_back(dC, tC.data, bC, 1), lk_back(db, tb.data, bb, 1);
  lk_back(ws, d_ws, wsb, 1);
  int pad_ok = 1;
  for (int64_t q = 0; q < N * ld; ++q)
    if (q % ld < D) out->dE[q / ld * D + q % ld] = fh_load(dE, dt, q);
    else pad_ok &= isnan(fh_load(dE, dt, q));
  for (int64_t q = 0; q < V * ld; ++q)
    if (q % ld < D) out->dC[q / ld * D + q % ld] = fh_load(dC, dt, q);
    else pad_ok &= isnan(fh_load(dC, dt, q));
  cr_assert(pad_ok, "the padding between gradient rows was written");
  for (int64_t k = 0; k < V; ++k) out->db[k] = fh_load(db, dt, k);
  cr_assert(tu_guards_intact(dE, bE) && tu_guards_intact(dC, bC) && tu_guards_intact(db, bb),
            "guard words after a gradient overwritten");
  cr_assert(tu_guards_intact(ws, wsb), "guard words after the workspace overwritten");
  free(gl), free(glse), free(dE), free(dC), free(db), free(ws);
  return st;
}

void lk_ref_backward(const lk_problem_t* P, const lk_bwd_in_t* in, const lk_fwd_t* rf, lk_grads_t* out) {
  fh_lce_problem_t p = lk_ref_problem(P);
  cr_assert_eq(fh_ref_lce_backward_f64(&p, rf->lse, rf->entropy, in->gl, in->glse, out->dE, out->dC, out->db, NULL),
               FH_SUCCESS, "%s", fh_last_error());
}

void lk_naive_backward(const lk_problem_t* P, const lk_bwd_in_t* in, const lk_fwd_t* nf, lk_grads_t* out,
                       double filter_eps, lk_grads_t* skip) {
  const int64_t N = P->s.N, V = P->s.V, D = P->s.D;
  const fh_dtype_t dt = P->s.dtype;
  const fh_linear_ce_options_t* o = &P->f.opt;
  float* z = malloc(sizeof(float) * (size_t)(V + 1));
  float* accE = calloc((size_t)(N * D + 1), sizeof(float));
  float* accC = calloc((size_t)(V * D + 1), sizeof(float));
  float* accb = calloc((size_t)(V + 1), sizeof(float));
  if (skip) {
    memset(skip->dE, 0, sizeof(double) * (size_t)(N * D));
    memset(skip->dC, 0, sizeof(double) * (size_t)(V * D));
    memset(skip->db, 0, sizeof(double) * (size_t)V);
  }
  float W = 0, dce = 0, dreg = 0;
  for (int64_t j = 0; j < V; ++j) W += P->f.cw ? P->f.cw[j] : 1.0f;
  for (int64_t i = 0; i < N; ++i) {
    if (!row_valid(P, i)) continue;
    const float om = P->f.tw ? P->f.tw[i] : 1.0f;
    dce += om * (P->f.cw ? P->f.cw[P->f.targets[i]] : 1.0f), dreg += om;
  }
  if (o->divisor > 0) dce = dreg = o->divisor;
  const float alpha = o->label_smoothing, eps = alpha / (float)V;
  for (int64_t i = 0; i < N; ++i) { /* rows in order, classes in order: fp32 sums */
    if (!row_valid(P, i)) continue;
    const int64_t y = P->f.targets[i];
    const float om = P->f.tw ? P->f.tw[i] : 1.0f, wy = P->f.cw ? P->f.cw[y] : 1.0f;
    const float g0 = o->reduction == FH_REDUCTION_NONE ? (float)in->gl[i] : (float)in->gl[0];
    float a = om * g0, b = om * g0;
    if (o->reduction == FH_REDUCTION_MEAN) a = dce != 0 ? a / dce : 0, b = dreg != 0 ? b / dreg : 0;
    const float lse = (float)nf->lse[i], h = (float)nf->entropy[i], glse = in->glse ? (float)in->glse[i] : 0.0f;
    naive_row(P, i, z, NULL);
    /* fp32 inputs: log p as PyTorch's fp32 log_softmax forms it, (z − m) − ln Σ e^(z − m), no
     * lse rounding amplified by |lse| (the yardstick the fp32 backward must meet at any logit
     * scale, docs/linear_ce.md "Precision"). 16-bit inputs: z − lse from the forward's fp32 lse,
     * the documented algorithm of their backward (its rounding is far below theirs). */
    float m = lse, lnz = 0.0f;
    if (dt == FH_DTYPE_F32) {
      float Zs = 0.0f;
      m = -INFINITY;
      for (int64_t j = 0; j < V; ++j) m = z[j] > m ? z[j] : m;
      for (int64_t j = 0; j < V; ++j) Zs += expf(z[j] - m);
      lnz = logf(Zs);
    }
    for (int64_t j = 0; j < V; ++j) {
      const float logp = (z[j] - m) - lnz, p = expf(logp), wj = P->f.cw ? P->f.cw[j] : 1.0f;
      const float pm = p - (j == y ? 1.0f : 0.0f);
      float g = a * (wy * (1 - alpha) * pm + eps * (W * p - wj)) + b * (2 * o->z_loss_scale * lse * p) + glse * p;
      if (o->entropy_weight != 0 && p != 0) g -= b * o->entropy_weight * p * (logp + h);
      if (o->softcap > 0) g *= 1.0f - (z[j] / o->softcap) * (z[j] / o->softcap);
      g *= o->logit_scale;
      accb[j] += g;
      const float gq = operand_round(g, dt);
      for (int64_t k = 0; k < D; ++k) {
        accE[i * D + k] += gq * (float)P->c64[j * D + k];
        accC[j * D + k] += gq * (float)P->e64[i * D + k];
      }
      if (skip && fabsf(pm) < filter_eps) {
        for (int64_t k = 0; k < D; ++k) {
          skip->dE[i * D + k] += fabs(g * P->c64[j * D + k]);
          skip->dC[j * D + k] += fabs(g * P->e64[i * D + k]);
        }
        skip->db[j] += fabs(g);
      }
    }
  }
  for (int64_t k = 0; k < N * D; ++k) out->dE[k] = out_round(accE[k], dt);
  for (int64_t k = 0; k < V * D; ++k) out->dC[k] = out_round(accC[k], dt);
  for (int64_t k = 0; k < V; ++k) out->db[k] = out_round(accb[k], dt);
  free(z), free(accE), free(accC), free(accb);
}

int lk_compare(const char* name, const double* x, const double* ref, const double* naive, int64_t n, double factor,
               double atol_terms, const double* extra) {
  double scale = 0, err_n = 0, err_x = 0;
  for (int64_t k = 0; k < n; ++k) {
    if (isfinite(ref[k]) && fabs(ref[k]) > scale) scale = fabs(ref[k]);
    if (isfinite(ref[k]) && isfinite(naive[k]) && fabs(naive[k] - ref[k]) > err_n) err_n = fabs(naive[k] - ref[k]);
  }
  const double atol = 0x1p-24 * atol_terms * scale;
  const double base = factor * err_n + atol;
  double worst = 0;
  int64_t bad = -1;
  for (int64_t k = 0; k < n; ++k) {
    int ok;
    double share;
    if (isnan(ref[k])) {
      ok = isnan(x[k]), share = ok ? 0 : INFINITY;
    } else {
      const double e = fabs(x[k] - ref[k]), tol = base + (extra ? extra[k] : 0.0);
      if (isfinite(e) && e > err_x) err_x = e;
      ok = e <= tol; /* false for NaN */
      share = tol > 0 ? e / tol : (e == 0 ? 0 : INFINITY);
      if (!(share == share)) share = INFINITY;
    }
    if (share > worst) worst = share;
    if (!ok && bad < 0) bad = k;
  }
  printf("%s: n=%lld max|ref|=%.3e kernel_err=%.3e naive_err=%.3e budget=%.0fx naive + %.2e%s => %.1f%% used",
         name, (long long)n, scale, err_x, err_n, factor, atol, extra ? " + skip bound" : "", 100.0 * worst);
  if (bad >= 0) printf("  FIRST FAILURE at %lld: got %.9g want %.9g naive %.9g", (long long)bad, x[bad], ref[bad], naive[bad]);
  printf("\n");
  fflush(stdout);
  return bad < 0;
}

int lk_same_bits(const double* a, const double* b, int64_t n) {
  for (int64_t k = 0; k < n; ++k)
    if (memcmp(&a[k], &b[k], sizeof(double)) != 0 && !(isnan(a[k]) && isnan(b[k]))) return 0;
  return 1;
}

int lk_engine_sm90(fh_dtype_t dtype, int64_t D) {
  const char* e = getenv("FH_ENGINE");
  return dtype != FH_DTYPE_F32 && (D * 2) % 16 == 0 && !(e && strcmp(e, "sm80") == 0);
}

int lk_multicast_on(void) {
  const char* e = getenv("FH_MULTICAST");
  const char* c = getenv("FH_EMU_MAX_CLUSTERS");
  return !(e && strcmp(e, "0") == 0) && !(c && strcmp(c, "0") == 0);
}

int lk_fwd_engine(int64_t N, fh_dtype_t dtype, int64_t D) {
  /* clusters when the launch has two row blocks or more: its grid covers N rows, not the valid ones */
  return lk_engine_sm90(dtype, D) ? (lk_multicast_on() && N > 128 ? 2 : 1) : 0;
}

int64_t lk_fwd_c_reads(int64_t N, int64_t nv, fh_dtype_t dtype, int64_t D) {
  const int64_t rb = (nv + 127) / 128;
  return lk_fwd_engine(N, dtype, D) == 2 ? (rb + 1) / 2 : rb;
}

uint64_t lk_engine_gemm_flops(int64_t N, int64_t nv, int64_t V, int64_t D, fh_dtype_t dtype) {
  return lk_tile_gemm_flops(nv, V, D, dtype, lk_fwd_engine(N, dtype, D));
}

uint64_t lk_tile_gemm_flops(int64_t nv, int64_t V, int64_t D, fh_dtype_t dtype, int sm90) {
  if (sm90) {
    /* the sm_90a mainloop (docs/hopper.md): per 128 x 128 tile, both warpgroups issue m64n128k16
     * per 16 of K, K in blocks of 64, whatever the valid rows and classes; in clusters of 2
     * (sm90 == 2) an odd count of valid row blocks leaves a CTA without rows beside the last,
     * which multiplies zeros */
    const int64_t kpad = (D + 63) / 64 * 64;
    int64_t rb = (nv + 127) / 128;
    if (sm90 == 2) rb += rb & 1;
    return (uint64_t)(rb * ((V + 127) / 128)) * (uint64_t)(2 * 128 * 128 * kpad);
  }
  /* 16-bit: two k16 mma per 64-byte stage; fp32: one k16 step per stage of six bf16 mma (the
   * three-piece split, docs/engine.md "fp32 inputs"). */
  const int64_t esize = dtype == FH_DTYPE_F32 ? 4 : 2, kstep = 16;
  const int64_t ksteps = (dtype == FH_DTYPE_F32 ? 6 : 2) * ((D * esize + 63) / 64);
  uint64_t f = 0;
  for (int64_t r0 = 0; r0 < nv; r0 += 128)
    for (int64_t v0 = 0; v0 < V; v0 += 128) {
      const int64_t nr = nv - r0 < 128 ? nv - r0 : 128, nc = V - v0 < 128 ? V - v0 : 128;
      for (int wm = 0; wm < 2; ++wm)
        for (int wn = 0; wn < 4; ++wn) {
          int64_t li = (nr - wm * 64 + 15) / 16, lj = (nc - wn * 32 + 7) / 8;
          li = li < 0 ? 0 : (li > 4 ? 4 : li);
          lj = lj < 0 ? 0 : (lj > 4 ? 4 : lj);
          f += (uint64_t)(li * lj * ksteps) * (uint64_t)(2 * 16 * 8 * kstep);
        }
    }
  return f;
}
