/* Fixture of the distillation suites (see test_distill_fixture.h). */
#include "test_distill_fixture.h"

#include "dtype.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float* rand_matrix(tu_rng_t* r, int64_t n, double scale) {
  float* x = (float*)malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
  for (int64_t k = 0; k < n; ++k) x[k] = (float)tu_quantize(scale * tu_normal(r), 12);
  return x;
}

void dfx_init(dfx_t* f, int64_t N, int64_t V, int64_t Ds, int64_t Vt, int64_t Dt, uint64_t seed, int peaked,
              int bias, int n_ignored) {
  memset(f, 0, sizeof *f);
  tu_rng_t r = {seed};
  f->N = N, f->V = V, f->Ds = Ds, f->Vt = Vt, f->Dt = Dt, f->bias = bias;
  f->Es = rand_matrix(&r, N * Ds, 1.0);
  f->Cs = rand_matrix(&r, V * Ds, 0.5);
  f->Et = rand_matrix(&r, N * Dt, 1.0);
  f->Ct = rand_matrix(&r, Vt * Dt, 0.5);
  f->bs = rand_matrix(&r, V, 0.5);
  f->bt = rand_matrix(&r, Vt, 0.5);
  if (peaked) {
    /* Rows 0, 4, 8, ...: class 2i of the student is the row's own embedding (logit |e|² ≈ D_s,
     * far above the others), and class 2i+1 of the teacher likewise: both heads are peaked and
     * disagree about the peak. */
    for (int64_t i = 0; i < N; i += 4) {
      if (2 * i + 1 >= V) break;
      for (int64_t k = 0; k < Ds; ++k) f->Cs[2 * i * Ds + k] = f->Es[i * Ds + k];
      for (int64_t k = 0; k < Dt; ++k) f->Ct[(2 * i + 1) * Dt + k] = f->Et[i * Dt + k];
    }
  }
  f->targets = (int64_t*)malloc(sizeof(int64_t) * (size_t)(N > 0 ? N : 1));
  for (int64_t i = 0; i < N; ++i) f->targets[i] = tu_randint(&r, V);
  for (int64_t k = 0, i = 1; k < n_ignored && i < N; ++k, i += 3) f->targets[i] = -100;
  f->tEs = fh_tensor_2d(f->Es, FH_DTYPE_F32, N, Ds);
  f->tCs = fh_tensor_2d(f->Cs, FH_DTYPE_F32, V, Ds);
  f->tbs = fh_tensor_2d(f->bs, FH_DTYPE_F32, 1, V);
  f->tEt = fh_tensor_2d(f->Et, FH_DTYPE_F32, N, Dt);
  f->tCt = fh_tensor_2d(f->Ct, FH_DTYPE_F32, Vt, Dt);
  f->tbt = fh_tensor_2d(f->bt, FH_DTYPE_F32, 1, Vt);
}

void dfx_free(dfx_t* f) {
  free(f->Es);
  free(f->Cs);
  free(f->bs);
  free(f->Et);
  free(f->Ct);
  free(f->bt);
  free(f->targets);
}

void dfx_problem(const dfx_t* f, const fh_distill_options_t* o, int with_targets, fh_distill_problem_t* p) {
  memset(p, 0, sizeof *p);
  p->fn = "test";
  p->N = f->N, p->V = f->V, p->D_s = f->Ds;
  p->Es = &f->tEs, p->Cs = &f->tCs, p->bs = f->bias ? &f->tbs : NULL;
  p->V_t = f->Vt, p->D_t = f->Dt;
  p->Et = &f->tEt, p->Ct = &f->tCt, p->bt = f->bias ? &f->tbt : NULL;
  p->targets = with_targets ? f->targets : NULL;
  p->opt = *o;
}

void dfx_heads(dfx_t* f, fh_distill_head_t* s, fh_distill_head_t* t) {
  s->E = &f->tEs, s->C = &f->tCs, s->bias = f->bias ? &f->tbs : NULL;
  t->E = &f->tEt, t->C = &f->tCt, t->bias = f->bias ? &f->tbt : NULL;
}

double dfx_loss(const fh_distill_problem_t* p, const double* grad_loss, double* state) {
  const size_t n = (size_t)(p->N > 0 ? p->N : 1);
  double* buf = (double*)malloc(sizeof(double) * (3 + FH_DISTILL_ROW_STATE) * n);
  fh_distill_ref_fwd_t r;
  memset(&r, 0, sizeof r);
  r.row_loss = buf, r.row_soft = buf + n, r.row_hard = buf + 2 * n, r.state = buf + 3 * n;
  double L = NAN;
  if (fh_ref_distill_forward_f64(p, &r) == FH_SUCCESS) {
    if (p->opt.reduction == FH_REDUCTION_NONE) {
      L = 0;
      for (int64_t i = 0; i < p->N; ++i)
        if (grad_loss[i] != 0) L += grad_loss[i] * r.row_loss[i]; /* 0 weight: the row is not looked at */
    } else {
      L = grad_loss[0] * r.loss;
    }
    if (state) memcpy(state, r.state, sizeof(double) * FH_DISTILL_ROW_STATE * (size_t)p->N);
  }
  free(buf);
  return L;
}

/* TVD is piecewise smooth: its kinks are where p_ij = q_ij. A difference quotient across one
 * measures the jump, not the gradient, so TVD checks skip an entry (or direction) whose stencil
 * changes the sign pattern of Y − X. This signature hashes that pattern (dense teacher). */
static uint64_t sparse_kink_signature(const fh_distill_problem_t* p);
static uint64_t kink_signature(const fh_distill_problem_t* p) {
  if (p->opt.divergence != FH_DISTILL_TVD) return 0;
  if (p->sparse) return sparse_kink_signature(p);
  const double T = p->opt.temperature;
  uint64_t h = 1469598103934665603ull;
  double* x = (double*)malloc(sizeof(double) * 2 * (size_t)p->V);
  for (int64_t i = 0; i < p->N; ++i) {
    if (p->targets && p->targets[i] == p->opt.ignore_index) continue;
    double ms = -INFINITY, mt = -INFINITY, zs = 0, zt = 0;
    for (int64_t j = 0; j < p->V; ++j) {
      double s = p->bs ? fh_tensor_get(p->bs, 0, j) : 0, t = p->bt ? fh_tensor_get(p->bt, 0, j) : 0;
      for (int64_t k = 0; k < p->D_s; ++k) s += fh_tensor_get(p->Es, i, k) * fh_tensor_get(p->Cs, j, k);
      for (int64_t k = 0; k < p->D_t; ++k) t += fh_tensor_get(p->Et, i, k) * fh_tensor_get(p->Ct, j, k);
      x[2 * j] = s / T, x[2 * j + 1] = t / T;
      ms = fmax(ms, s / T), mt = fmax(mt, t / T);
    }
    for (int64_t j = 0; j < p->V; ++j) zs += exp(x[2 * j] - ms), zt += exp(x[2 * j + 1] - mt);
    for (int64_t j = 0; j < p->V; ++j) {
      const double d = (x[2 * j + 1] - mt - log(zt)) - (x[2 * j] - ms - log(zs));
      h = (h ^ (uint64_t)(d > 0 ? 2 : d < 0 ? 1 : 0)) * 1099511628211ull;
    }
  }
  free(x);
  return h;
}

/* The same for a sparse teacher: the signs of Y − X on the support and of log ρ − log q_R. */
static uint64_t sparse_kink_signature(const fh_distill_problem_t* p) {
  const double T = p->opt.temperature;
  const int renorm = p->opt.sparse_mass == FH_DISTILL_SPARSE_RENORMALIZE;
  uint64_t h = 1469598103934665603ull;
  double* x = (double*)malloc(sizeof(double) * (size_t)p->V);
  unsigned char* in = (unsigned char*)malloc((size_t)p->V);
  for (int64_t i = 0; i < p->N; ++i) {
    if (p->targets && p->targets[i] == p->opt.ignore_index) continue;
    double ms = -INFINITY, zs = 0, mt = -INFINITY, zt = 0, pi = 0, qR = 0;
    for (int64_t j = 0; j < p->V; ++j) {
      double s = p->bs ? fh_tensor_get(p->bs, 0, j) : 0;
      for (int64_t k = 0; k < p->D_s; ++k) s += fh_tensor_get(p->Es, i, k) * fh_tensor_get(p->Cs, j, k);
      x[j] = s / T, in[j] = 0;
      ms = fmax(ms, x[j]);
    }
    for (int64_t j = 0; j < p->V; ++j) zs += exp(x[j] - ms);
    for (int64_t k = 0; k < p->K; ++k) mt = fmax(mt, p->logprobs[i * p->K + k] / T);
    for (int64_t k = 0; k < p->K; ++k) zt += exp(p->logprobs[i * p->K + k] / T - mt);
    for (int64_t k = 0; k < p->K; ++k) {
      const int64_t id = p->ids[i * p->K + k];
      const double lp = p->logprobs[i * p->K + k], Y = renorm ? lp / T - mt - log(zt) : lp;
      const double d = Y - (x[id] - ms - log(zs));
      in[id] = 1, pi += exp(Y);
      h = (h ^ (uint64_t)(d > 0 ? 2 : d < 0 ? 1 : 0)) * 1099511628211ull;
    }
    for (int64_t j = 0; j < p->V; ++j) qR += in[j] ? 0.0 : exp(x[j] - ms) / zs;
    const double rho = p->opt.sparse_mass == FH_DISTILL_SPARSE_REMAINDER && pi < 1 ? 1 - pi : 0;
    h = (h ^ (uint64_t)(rho > qR ? 2 : rho < qR ? 1 : 0)) * 1099511628211ull;
  }
  free(x);
  free(in);
  return h;
}

/* Richardson extrapolation of central differences with h and 2h: the h² error term cancels.
 * NAN when the stencil crosses a TVD kink. */
#define FD_H 0x1p-10
static double fd_entry(const fh_distill_problem_t* p, const double* gl, float* x) {
  const float v = *x;
  double L[4];
  const double steps[4] = {FD_H, -FD_H, 2 * FD_H, -2 * FD_H};
  const uint64_t sig = kink_signature(p);
  int kink = 0;
  for (int k = 0; k < 4; ++k) {
    *x = (float)(v + steps[k]); /* exact: v is a multiple of 2^-12 below 2^8 */
    L[k] = dfx_loss(p, gl, NULL);
    kink |= kink_signature(p) != sig;
  }
  *x = v;
  if (kink) return NAN;
  const double d1 = (L[0] - L[1]) / (2 * FD_H), d2 = (L[2] - L[3]) / (4 * FD_H);
  return (4 * d1 - d2) / 3;
}

int dfx_check_fd(dfx_t* f, const fh_distill_problem_t* p, const char* name, uint64_t seed) {
  tu_rng_t r = {seed};
  const int64_t N = p->N, V = p->V, Ds = p->D_s;
  double* gl = (double*)malloc(sizeof(double) * (size_t)(N + 1));
  for (int64_t i = 0; i <= N; ++i) gl[i] = tu_quantize(0.5 + tu_uniform(&r), 6);
  double* state = (double*)malloc(sizeof(double) * FH_DISTILL_ROW_STATE * (size_t)(N + 1));
  double* dE = (double*)calloc((size_t)(N * Ds + 1), sizeof(double));
  double* dC = (double*)calloc((size_t)(V * Ds + 1), sizeof(double));
  double* db = (double*)calloc((size_t)(V + 1), sizeof(double));
  int ok = isfinite(dfx_loss(p, gl, state));
  ok = ok && fh_ref_distill_backward_f64(p, state, gl, dE, dC, p->bs ? db : NULL, NULL) == FH_SUCCESS;
  struct {
    float* x;
    double* g;
    int64_t n;
    const char* what;
  } t[3] = {{f->Es, dE, N * Ds, "dEs"}, {f->Cs, dC, V * Ds, "dCs"}, {f->bs, db, p->bs ? V : 0, "dbs"}};
  /* Tolerance: after Richardson the truncation error is O(h⁴ L⁽⁵⁾) ≈ 1e-12 |L⁽⁵⁾| and the fp64
   * rounding of L divided by h is ≈ 1e-12, so 1e-7 of the largest gradient entry (plus 1e-6
   * relative) leaves a margin of about 10⁴, while a dropped or wrong term moves entries by a
   * visible fraction of the largest one. */
  double gmax = 0;
  for (int k = 0; k < 3; ++k)
    for (int64_t e = 0; e < t[k].n; ++e) gmax = fmax(gmax, fabs(t[k].g[e]));
  const double atol = 1e-7 * gmax + 1e-13, rtol = 1e-6;
  char label[160];
  for (int k = 0; k < 3 && ok; ++k) {
    if (t[k].n == 0) continue;
    enum { M = 8, TRIES = 60 };
    double fd[M], an[M];
    int m = 0, skipped = 0;
    for (int tries = 0; m < M && tries < TRIES; ++tries) {
      const int64_t e = tu_randint(&r, t[k].n);
      fd[m] = fd_entry(p, gl, t[k].x + e);
      an[m] = t[k].g[e];
      if (isnan(fd[m])) ++skipped;
      else ++m;
    }
    snprintf(label, sizeof label, "%s %s entries (gmax %.3g, %d skipped at TVD kinks)", name, t[k].what, gmax,
             skipped);
    ok = tu_check_close(label, an, fd, m, atol, rtol) && ok;
    if (m < 4) {
      printf("%s: only %d entries away from kinks\n", label, m);
      ok = 0;
    }
  }
  /* Two random directions through every student entry at once: the whole gradient, not a sample. */
  for (int dir = 0; dir < 2 && ok; ++dir) {
    double an = 0;
    float* save[3];
    signed char* sg[3];
    for (int k = 0; k < 3; ++k) {
      save[k] = (float*)malloc(sizeof(float) * (size_t)(t[k].n + 1));
      sg[k] = (signed char*)malloc((size_t)(t[k].n + 1));
      memcpy(save[k], t[k].x, sizeof(float) * (size_t)t[k].n);
      for (int64_t e = 0; e < t[k].n; ++e) {
        sg[k][e] = (signed char)(tu_randint(&r, 3) - 1);
        an += sg[k][e] * t[k].g[e];
      }
    }
    double L[4];
    const double steps[4] = {FD_H, -FD_H, 2 * FD_H, -2 * FD_H};
    const uint64_t sig = kink_signature(p);
    int kink = 0;
    for (int s = 0; s < 4; ++s) {
      for (int k = 0; k < 3; ++k)
        for (int64_t e = 0; e < t[k].n; ++e) t[k].x[e] = (float)(save[k][e] + steps[s] * sg[k][e]);
      L[s] = dfx_loss(p, gl, NULL);
      kink |= kink_signature(p) != sig;
    }
    for (int k = 0; k < 3; ++k) {
      memcpy(t[k].x, save[k], sizeof(float) * (size_t)t[k].n);
      free(save[k]);
      free(sg[k]);
    }
    const double d1 = (L[0] - L[1]) / (2 * FD_H), d2 = (L[2] - L[3]) / (4 * FD_H), fd = (4 * d1 - d2) / 3;
    snprintf(label, sizeof label, "%s direction %d", name, dir);
    if (kink) { /* every entry moves at once: a TVD stencil almost surely crosses a kink */
      printf("%s: skipped (crosses a TVD kink)\n", label);
      continue;
    }
    /* A direction sums ~(N + V) D_s entries: scale atol by the count's square root. */
    ok = tu_check_close(label, &an, &fd, 1, atol * sqrt((double)(N * Ds + V * Ds + V)), rtol) && ok;
  }
  free(gl);
  free(state);
  free(dE);
  free(dC);
  free(db);
  return ok;
}
