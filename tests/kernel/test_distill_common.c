/* The helpers of test_distill_common.h. */
#include "test_distill_common.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "ref/distill_ref.h"
#include "test_linear_ce_common.h"
#include "test_util.h"

dk_spec_t dk_default(int64_t N, int64_t V, int64_t Ds, int64_t Vt, int64_t Dt, fh_dtype_t dt) {
  dk_spec_t s;
  memset(&s, 0, sizeof s);
  s.N = N, s.V = V, s.Ds = Ds, s.Vt = Vt, s.Dt = Dt, s.dtype = dt;
  s.seed = 1234;
  s.nan_row = -1;
  s.every_ign = 5;
  return s;
}

/* rows x cols N(0, sd) values in dtype, stride cols + pad (NaN in the padding). */
static void* mat(tu_rng_t* r, fh_tensor_t* t, fh_dtype_t dt, int64_t rows, int64_t cols, int pad, double sd) {
  const int64_t ld = cols + pad;
  void* p = malloc((size_t)(rows * ld > 0 ? rows * ld : 1) * fh_dtype_size(dt));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < ld; ++k) fh_store(p, dt, i * ld + k, k < cols ? sd * tu_normal(r) : NAN);
  *t = fh_tensor_2d(p, dt, rows, cols);
  t->row_stride = ld;
  return p;
}

void dk_init(dk_problem_t* P, const dk_spec_t* s) {
  memset(P, 0, sizeof *P);
  P->s = *s;
  tu_rng_t r = {s->seed};
  const fh_dtype_t dt = s->dtype;
  P->Es = mat(&r, &P->tEs, dt, s->N, s->Ds, s->pad, s->e_mul > 0 ? s->e_mul : 1.0);
  P->Cs = mat(&r, &P->tCs, dt, s->V, s->Ds, s->pad, 2.0 / sqrt((double)s->Ds));
  P->bs = mat(&r, &P->tbs, dt, 1, s->V, 0, 0.5);
  P->Et = mat(&r, &P->tEt, dt, s->N, s->Dt, s->pad, s->e_mul > 0 ? s->e_mul : 1.0);
  P->Ct = mat(&r, &P->tCt, dt, s->Vt, s->Dt, s->pad, 2.5 / sqrt((double)s->Dt));
  P->bt = mat(&r, &P->tbt, dt, 1, s->Vt, 0, 0.5);
  if (s->nan_row >= 0 && s->nan_row < s->N)
    for (int64_t k = 0; k < s->Ds; ++k) fh_tensor_set(&P->tEs, s->nan_row, k, NAN);
  if (s->every_ign > 0) {
    P->targets = malloc(sizeof(int64_t) * (size_t)(s->N > 0 ? s->N : 1));
    for (int64_t i = 0; i < s->N; ++i) P->targets[i] = (i % s->every_ign == 1) ? -100 : tu_randint(&r, s->V);
  }
}

/* K distinct random ids per row with the log-probabilities of a random teacher distribution
 * over V (fp64 log-softmax of 2·N(0,1) logits, rounded to fp32), so the remainder is the real
 * tail mass; with_ninf: every third row from 2 has entries k % 3 == 1 at -inf (entry 0 stays
 * finite). */
void dk_sparse_init(dk_problem_t* P, int64_t K, uint64_t seed, int with_ninf) {
  const int64_t N = P->s.N, V = P->s.V;
  tu_rng_t r = {seed};
  P->K = K;
  P->ids = malloc(sizeof(int64_t) * (size_t)(N * K + 1));
  P->lp = malloc(sizeof(float) * (size_t)(N * K + 1));
  double* z = malloc(sizeof(double) * (size_t)V);
  int64_t* perm = malloc(sizeof(int64_t) * (size_t)V);
  for (int64_t i = 0; i < N; ++i) {
    double m = -INFINITY, Z = 0;
    for (int64_t j = 0; j < V; ++j) m = fmax(m, z[j] = 2.0 * tu_normal(&r)), perm[j] = j;
    for (int64_t j = 0; j < V; ++j) Z += exp(z[j] - m);
    for (int64_t j = V - 1; j > 0; --j) {
      const int64_t k = tu_randint(&r, j + 1), t = perm[j];
      perm[j] = perm[k], perm[k] = t;
    }
    for (int64_t k = 0; k < K; ++k) {
      P->ids[i * K + k] = perm[k];
      P->lp[i * K + k] = (with_ninf && i % 3 == 2 && k % 3 == 1) ? -INFINITY : (float)(z[perm[k]] - m - log(Z));
    }
  }
  free(z);
  free(perm);
}

void dk_free(dk_problem_t* P) {
  free(P->Es), free(P->Cs), free(P->bs), free(P->Et), free(P->Ct), free(P->bt), free(P->targets);
  free(P->ids), free(P->lp);
  memset(P, 0, sizeof *P);
}

fh_distill_problem_t dk_ref_problem(const dk_problem_t* P, const fh_distill_options_t* o) {
  fh_distill_problem_t p;
  memset(&p, 0, sizeof p);
  p.fn = "test";
  p.N = P->s.N, p.V = P->s.V, p.D_s = P->s.Ds, p.V_t = P->s.Vt, p.D_t = P->s.Dt;
  p.Es = &P->tEs, p.Cs = &P->tCs, p.bs = &P->tbs, p.Et = &P->tEt, p.Ct = &P->tCt, p.bt = &P->tbt;
  p.targets = P->targets;
  p.opt = *o;
  if (P->K > 0) {
    p.sparse = 1, p.K = P->K, p.ids = P->ids, p.logprobs = P->lp;
    p.Et = p.Ct = p.bt = NULL, p.V_t = p.D_t = 0;
  }
  return p;
}

void dk_out_alloc(dk_out_t* o, int64_t N) {
  const size_t n = (size_t)(N > 0 ? N : 1);
  memset(o, 0, sizeof *o);
  o->loss = calloc(n, sizeof(double)), o->soft = calloc(n, sizeof(double)), o->hard = calloc(n, sizeof(double));
  o->state = calloc(n * NS, sizeof(double));
}
void dk_out_free(dk_out_t* o) { free(o->loss), free(o->soft), free(o->hard), free(o->state); }

static fh_context_t* cuda_ctx(void) {
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  return ctx;
}

/* The CUDA forward through the public API (guarded outputs). */
/* The inputs as the backend sees them: the host tensors, or device mirrors (lk_mirror). */
typedef struct dk_inputs {
  fh_tensor_t Es, Cs, bs, Et, Ct, bt;
  int64_t* targets;
} dk_inputs_t;
static void mirror_tensor(fh_tensor_t* d, const fh_tensor_t* h) {
  *d = *h;
  d->data = lk_mirror(h->data, fh_dtype_size(h->dtype) * (size_t)(h->rows * h->row_stride), 0);
}
static void inputs_mirror(const dk_problem_t* P, dk_inputs_t* in) {
  mirror_tensor(&in->Es, &P->tEs), mirror_tensor(&in->Cs, &P->tCs), mirror_tensor(&in->bs, &P->tbs);
  mirror_tensor(&in->Et, &P->tEt), mirror_tensor(&in->Ct, &P->tCt), mirror_tensor(&in->bt, &P->tbt);
  in->targets = lk_mirror(P->targets, sizeof(int64_t) * (size_t)P->s.N, 0);
}
static void inputs_drop(const dk_problem_t* P, dk_inputs_t* in) {
  lk_drop(P->tEs.data, in->Es.data), lk_drop(P->tCs.data, in->Cs.data), lk_drop(P->tbs.data, in->bs.data);
  lk_drop(P->tEt.data, in->Et.data), lk_drop(P->tCt.data, in->Ct.data), lk_drop(P->tbt.data, in->bt.data);
  lk_drop(P->targets, in->targets);
}
/* The sparse teacher's arrays as the backend sees them, and the device flag after a call. */
static const fh_distill_sparse_teacher_t* sparse_mirror(const dk_problem_t* P, fh_distill_sparse_teacher_t* sp) {
  const size_t n = (size_t)(P->s.N > 0 ? P->s.N : 1) * (size_t)P->K;
  sp->ids = lk_mirror(P->ids, sizeof(int64_t) * n, 0);
  sp->logprobs = lk_mirror(P->lp, sizeof(float) * n, 0);
  sp->K = P->K;
  return sp;
}
static void sparse_drop(const dk_problem_t* P, fh_distill_sparse_teacher_t* sp) {
  lk_drop(P->ids, sp->ids), lk_drop(P->lp, sp->logprobs);
}
static void check_flag(const dk_problem_t* P, fh_context_t* ctx) {
  const fh_status_t f = fh_context_check(ctx);
  if (P->expect_flag)
    cr_assert(f == FH_ERR_INVALID_ARGUMENT && strstr(fh_last_error(), "sparse teacher row"),
              "the device check did not reject the row: %d %s", (int)f, fh_last_error());
  else
    cr_assert_eq(f, FH_SUCCESS, "%s", fh_last_error());
}

/* A 256-byte aligned workspace of `bytes` filled with garbage (nothing may be read before it is
 * written), or its device mirror. */
static void* ws_alloc(size_t bytes, void** host) {
  *host = bytes ? aligned_alloc(256, (bytes + 255) & ~(size_t)255) : NULL;
  if (*host) memset(*host, 0xA5, bytes);
  return lk_mirror(*host, bytes, 0);
}
static void ws_free(void* host, void* mirror) {
  lk_drop(host, mirror);
  free(host);
}

fh_status_t dk_run(const dk_problem_t* P, const fh_distill_options_t* o, dk_out_t* out) {
  const int64_t N = P->s.N;
  const int none = o->reduction == FH_REDUCTION_NONE;
  const size_t bl = sizeof(float) * (size_t)(none ? (N > 0 ? N : 1) : 1), bs = sizeof(float) * (size_t)(N > 0 ? N : 1) * NS;
  fh_context_t* ctx = cuda_ctx();
  fh_distill_shape_t sh = {P->s.N, P->s.V, P->s.Ds, P->s.Vt, P->s.Dt, P->K, P->s.dtype, P->s.dtype};
  size_t ws = 0;
  cr_assert_eq(fh_distill_forward_workspace_size(ctx, o, &sh, &ws), FH_SUCCESS, "%s", fh_last_error());
  void* wh;
  void* w = ws_alloc(ws, &wh);
  float* loss = tu_alloc_guarded(bl);
  float* soft = tu_alloc_guarded(bl);
  float* hard = tu_alloc_guarded(bl);
  float* st = tu_alloc_guarded(bs);
  dk_inputs_t in;
  inputs_mirror(P, &in);
  fh_distill_head_t hs = {&in.Es, &in.Cs, &in.bs}, ht = {&in.Et, &in.Ct, &in.bt};
  fh_distill_outputs_t O = {lk_mirror(loss, bl, 1), lk_mirror(st, bs, 1), lk_mirror(soft, bl, 1),
                            lk_mirror(hard, bl, 1)};
  fh_distill_sparse_teacher_t sp;
  const fh_status_t rc = P->K > 0 ? fh_distill_sparse_forward(ctx, o, &hs, sparse_mirror(P, &sp), in.targets, &O, w, ws)
                                  : fh_distill_forward(ctx, o, &hs, &ht, in.targets, &O, w, ws);
  if (rc == FH_SUCCESS) check_flag(P, ctx);
  if (P->K > 0) sparse_drop(P, &sp);
  inputs_drop(P, &in);
  lk_back(loss, O.loss, bl, 1), lk_back(st, O.row_state, bs, 1), lk_back(soft, O.soft_loss, bl, 1);
  lk_back(hard, O.hard_loss, bl, 1);
  ws_free(wh, w);
  if (rc == FH_SUCCESS) {
    cr_assert(tu_guards_intact(loss, bl) && tu_guards_intact(soft, bl) && tu_guards_intact(hard, bl) &&
                  tu_guards_intact(st, bs),
              "an output guard was overwritten");
    if (none)
      for (int64_t i = 0; i < N; ++i) out->loss[i] = loss[i], out->soft[i] = soft[i], out->hard[i] = hard[i];
    else
      out->rloss = loss[0], out->rsoft = soft[0], out->rhard = hard[0];
    for (int64_t k = 0; k < N * NS; ++k) out->state[k] = st[k];
  }
  free(loss), free(soft), free(hard), free(st);
  fh_context_destroy(ctx);
  return rc;
}

void dk_reference(const dk_problem_t* P, const fh_distill_options_t* o, dk_out_t* out) {
  fh_distill_problem_t p = dk_ref_problem(P, o);
  fh_distill_ref_fwd_t r;
  memset(&r, 0, sizeof r);
  r.row_loss = out->loss, r.row_soft = out->soft, r.row_hard = out->hard, r.state = out->state;
  cr_assert_eq(fh_ref_distill_forward_f64(&p, &r), FH_SUCCESS, "%s", fh_last_error());
  out->rloss = r.loss, out->rsoft = r.soft, out->rhard = r.hard;
}

/* Logits of one head for row i in fp32 (k order) from the tensor-core view, plus the bias. */
static void naive_logits(const fh_tensor_t* E, const fh_tensor_t* C, const fh_tensor_t* b, int64_t i, int64_t V,
                         float* z) {
  for (int64_t j = 0; j < V; ++j) {
    float a = 0.0f;
    for (int64_t k = 0; k < E->cols; ++k) {
      const double e = fh_tensor_get(E, i, k), c = fh_tensor_get(C, j, k);
      a += (float)(e * c);
    }
    z[j] = a + (float)fh_tensor_get(b, 0, j);
  }
}
/* The row's maximum and ln Σ e^(z − m) in fp32: log-softmax is (z − m) − ln Z, as PyTorch's fp32
 * log_softmax forms it (no lse rounding amplified by |lse|). */
static void lsm32(const float* z, int64_t V, float* m_out, float* lnz) {
  float m = -INFINITY, s = 0.0f;
  for (int64_t j = 0; j < V; ++j) m = fmaxf(m, z[j]);
  for (int64_t j = 0; j < V; ++j) s += expf(z[j] - m);
  *m_out = m, *lnz = logf(s);
}

/* The sparse teacher of row i in fp32 from the student's tempered logits u, their max mu and
 * ln Z lu (the naive form of kernels/distill_sparse.cu): D, S, a_R, and qa at each id in qa[]
 * (NaN off S). */
static void naive_sparse_row(const dk_problem_t* P, const fh_distill_options_t* o, const fh_div_t* dv, int64_t i,
                             const float* u, float mu, float lu, float* qa_v, float* D, float* S, float* aR) {
  const int64_t K = P->K, V = P->s.V;
  const float invT = 1.0f / o->temperature;
  const int renorm = o->sparse_mass == FH_DISTILL_SPARSE_RENORMALIZE, rem = o->sparse_mass == FH_DISTILL_SPARSE_REMAINDER;
  float* l = malloc(sizeof(float) * (size_t)K);
  for (int64_t k = 0; k < K; ++k) l[k] = renorm ? P->lp[i * K + k] * invT : P->lp[i * K + k];
  float nm = 0.0f, nz = 0.0f;
  if (renorm) lsm32(l, K, &nm, &nz);
  const float norm = nm + nz;
  float pi = 0.0f, sq = 0.0f;
  *D = *S = *aR = 0.0f;
  for (int64_t j = 0; j < V; ++j) qa_v[j] = NAN;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t id = P->ids[i * K + k];
    const float X = (u[id] - mu) - lu, Y = l[k] - norm;
    double term, qa;
    fh_div_eval(dv, X, Y, &term, &qa);
    *D += (float)term, *S += (float)qa, pi += expf(Y), sq += expf(X);
    qa_v[id] = (float)qa;
  }
  if (o->sparse_mass != FH_DISTILL_SPARSE_NONE && K < V) {
    const float qR = sq < 1.0f ? 1.0f - sq : 0.0f, rho = rem && pi < 1.0f ? 1.0f - pi : 0.0f;
    double term, qa;
    if (qR > 0.0f || rho > 0.0f) {
      fh_div_eval(dv, logf(qR), logf(rho), &term, &qa);
      *D += (float)term;
    }
    if (qR > 0.0f) {
      *S += (float)qa;
      fh_div_eval(dv, 0.0, (double)(logf(rho) - logf(qR)), &term, &qa);
      *aR = (float)qa;
    }
  }
  free(l);
}

void dk_naive(const dk_problem_t* P, const fh_distill_options_t* o, dk_out_t* out) {
  const int64_t N = P->s.N, V = P->s.V;
  fh_div_t dv;
  fh_div_resolve(o, &dv);
  const float invT = 1.0f / o->temperature, kap = o->scale_by_t_squared ? o->temperature * o->temperature : 1.0f;
  float *s = malloc(sizeof(float) * (size_t)V), *t = malloc(sizeof(float) * (size_t)V);
  float *u = malloc(sizeof(float) * (size_t)V), *v = malloc(sizeof(float) * (size_t)V);
  double l = 0, so = 0, ha = 0, nv = 0;
  for (int64_t i = 0; i < N; ++i) {
    double* st = out->state + i * NS;
    out->loss[i] = out->soft[i] = out->hard[i] = 0;
    for (int q = 0; q < NS; ++q) st[q] = 0;
    if (P->targets && P->targets[i] == o->ignore_index) continue;
    naive_logits(&P->tEs, &P->tCs, &P->tbs, i, V, s);
    if (P->K == 0) naive_logits(&P->tEt, &P->tCt, &P->tbt, i, V, t);
    for (int64_t j = 0; j < V; ++j) u[j] = s[j] * invT, v[j] = t[j] * invT;
    float mu, lu, mv = 0.0f, lv = 0.0f, ms = 0.0f, ls = 0.0f;
    lsm32(u, V, &mu, &lu);
    if (P->K == 0) lsm32(v, V, &mv, &lv);
    float D = 0.0f, S = 0.0f;
    if (P->K > 0) naive_sparse_row(P, o, &dv, i, u, mu, lu, v, &D, &S, &mv); /* mv: a_R, the state's slot 1 */
    for (int64_t j = 0; j < V && P->K == 0; ++j) {
      double term, qa;
      fh_div_eval(&dv, (double)((u[j] - mu) - lu), (double)((v[j] - mv) - lv), &term, &qa);
      D += (float)term, S += (float)qa;
    }
    const int hard = o->hard_weight != 0.0f;
    if (hard) lsm32(s, V, &ms, &ls);
    const float h = hard ? (ms - s[P->targets[i]]) + ls : 0.0f;
    st[0] = mu + lu, st[1] = mv + lv, st[2] = S, st[3] = ms + ls;
    out->soft[i] = (double)kap * D;
    out->hard[i] = h;
    out->loss[i] = (double)o->hard_weight * h + (double)o->soft_weight * out->soft[i];
    l += out->loss[i], so += out->soft[i], ha += out->hard[i], nv += 1;
  }
  const double den = o->divisor > 0 ? o->divisor : nv, inv = o->reduction != FH_REDUCTION_MEAN ? 1.0 : den > 0 ? 1.0 / den : 0.0;
  out->rloss = l * inv, out->rsoft = so * inv, out->rhard = ha * inv;
  free(s), free(t), free(u), free(v);
}

/* One forward compared in full: per-row outputs (none) or the reduced ones, and the state. */
int dk_check_forward(const char* label, const dk_problem_t* P, const fh_distill_options_t* o, dk_out_t* kout) {
  const int64_t N = P->s.N;
  dk_out_t k, r, n;
  dk_out_alloc(&k, N), dk_out_alloc(&r, N), dk_out_alloc(&n, N);
  cr_assert_eq(dk_run(P, o, &k), FH_SUCCESS, "%s: %s", label, fh_last_error());
  dk_reference(P, o, &r);
  dk_naive(P, o, &n);
  const double terms = (double)(P->s.Ds + P->s.Dt + P->s.V);
  char nm[200];
  int ok = 1;
  if (o->reduction == FH_REDUCTION_NONE) {
    snprintf(nm, sizeof nm, "%s loss[i]", label);
    ok &= lk_compare(nm, k.loss, r.loss, n.loss, N, 2.0, terms, NULL);
    snprintf(nm, sizeof nm, "%s soft[i]", label);
    ok &= lk_compare(nm, k.soft, r.soft, n.soft, N, 2.0, terms, NULL);
    snprintf(nm, sizeof nm, "%s hard[i]", label);
    ok &= lk_compare(nm, k.hard, r.hard, n.hard, N, 2.0, terms, NULL);
  } else {
    snprintf(nm, sizeof nm, "%s loss", label);
    ok &= lk_compare(nm, &k.rloss, &r.rloss, &n.rloss, 1, 2.0, terms + (double)N, NULL);
    snprintf(nm, sizeof nm, "%s soft", label);
    ok &= lk_compare(nm, &k.rsoft, &r.rsoft, &n.rsoft, 1, 2.0, terms + (double)N, NULL);
    snprintf(nm, sizeof nm, "%s hard", label);
    ok &= lk_compare(nm, &k.rhard, &r.rhard, &n.rhard, 1, 2.0, terms + (double)N, NULL);
  }
  /* The state's columns one at a time (different scales). */
  double *kc = malloc(sizeof(double) * (size_t)(N + 1)), *rc = malloc(sizeof(double) * (size_t)(N + 1)),
         *nc = malloc(sizeof(double) * (size_t)(N + 1));
  static const char* const SN[NS] = {"lse(u)", "lse(v)", "sum qa", "lse(s)"};
  for (int q = 0; q < NS; ++q) {
    for (int64_t i = 0; i < N; ++i) kc[i] = k.state[i * NS + q], rc[i] = r.state[i * NS + q], nc[i] = n.state[i * NS + q];
    snprintf(nm, sizeof nm, "%s state %s", label, SN[q]);
    ok &= lk_compare(nm, kc, rc, nc, N, 2.0, terms, NULL);
  }
  free(kc), free(rc), free(nc);
  if (kout) {
    const size_t n1 = (size_t)(N > 0 ? N : 1);
    memcpy(kout->loss, k.loss, n1 * sizeof(double)), memcpy(kout->soft, k.soft, n1 * sizeof(double));
    memcpy(kout->hard, k.hard, n1 * sizeof(double)), memcpy(kout->state, k.state, n1 * NS * sizeof(double));
    kout->rloss = k.rloss, kout->rsoft = k.rsoft, kout->rhard = k.rhard;
  }
  dk_out_free(&k), dk_out_free(&r), dk_out_free(&n);
  return ok;
}

fh_distill_options_t dk_opts(fh_distill_divergence_t d, float param) {
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.divergence = d;
  o.temperature = 2.0f;
  o.hard_weight = 0.5f;
  o.soft_weight = 0.75f;
  o.reduction = FH_REDUCTION_NONE;
  if (d == FH_DISTILL_JSD || d == FH_DISTILL_JSD_SCALED) o.beta = param;
  if (d == FH_DISTILL_SKEW_FORWARD_KL || d == FH_DISTILL_SKEW_REVERSE_KL) o.skew = param;
  if (d == FH_DISTILL_ALPHA) o.alpha = param;
  return o;
}

/* Every divergence (and the resolved special cases: JSD endpoints both ways, the α limits) in
 * every dtype, on the tile-crossing shape with a padded teacher vocabulary. */
/* ---- backward ---- */

void dk_grads_alloc(dk_grads_t* g, const dk_problem_t* P) {
  g->dE = calloc((size_t)(P->s.N * P->s.Ds + 1), sizeof(double));
  g->dC = calloc((size_t)(P->s.V * P->s.Ds + 1), sizeof(double));
  g->db = calloc((size_t)(P->s.V + 1), sizeof(double));
}
void dk_grads_free(dk_grads_t* g) { free(g->dE), free(g->dC), free(g->db); }

double dk_round_to(fh_dtype_t dt, double x) {
  unsigned char b[8];
  fh_store(b, dt, 0, x);
  return fh_load(b, dt, 0);
}

/* Upstream gradients: [N] random for reduction none, else one value. */
double* dk_make_gl(const dk_problem_t* P, const fh_distill_options_t* o) {
  const int64_t n = o->reduction == FH_REDUCTION_NONE ? (P->s.N > 0 ? P->s.N : 1) : 1;
  double* gl = malloc(sizeof(double) * (size_t)n);
  tu_rng_t r = {99};
  for (int64_t i = 0; i < n; ++i) gl[i] = o->reduction == FH_REDUCTION_NONE ? 0.5 + tu_uniform(&r) : 1.3;
  return gl;
}

/* The CUDA backward through the public API from the fp32 `state`; init (may be NULL) preloads
 * the gradient buffers (accumulate). Gradient buffers in the student dtype with the inputs'
 * row strides, NaN in the padding. */
fh_status_t dk_run_backward(const dk_problem_t* P, const fh_distill_options_t* o, const double* state,
                            const double* gl, const dk_grads_t* init, dk_grads_t* out) {
  const int64_t N = P->s.N, V = P->s.V, D = P->s.Ds, ld = D + P->s.pad;
  const fh_dtype_t dt = P->s.dtype;
  const size_t es = fh_dtype_size(dt);
  fh_context_t* ctx = cuda_ctx();
  fh_distill_shape_t sh = {N, V, D, P->s.Vt, P->s.Dt, P->K, dt, dt};
  size_t ws = 0;
  cr_assert_eq(fh_distill_backward_workspace_size(ctx, o, &sh, &ws), FH_SUCCESS, "%s", fh_last_error());
  void* wh;
  void* w = ws_alloc(ws, &wh);
  const size_t bE = (size_t)(N * ld + 1) * es, bC = (size_t)(V * ld + 1) * es, bb = (size_t)(V + 1) * es;
  void* dE = tu_alloc_guarded(bE);
  void* dC = tu_alloc_guarded(bC);
  void* db = tu_alloc_guarded(bb);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t k = 0; k < ld; ++k) fh_store(dE, dt, i * ld + k, k < D ? (init ? init->dE[i * D + k] : NAN) : NAN);
  for (int64_t j = 0; j < V; ++j)
    for (int64_t k = 0; k < ld; ++k) fh_store(dC, dt, j * ld + k, k < D ? (init ? init->dC[j * D + k] : NAN) : NAN);
  for (int64_t j = 0; j < V; ++j) fh_store(db, dt, j, init ? init->db[j] : NAN);
  fh_tensor_t tE = fh_tensor_2d(lk_mirror(dE, bE, 1), dt, N, D), tC = fh_tensor_2d(lk_mirror(dC, bC, 1), dt, V, D);
  fh_tensor_t tb = fh_tensor_2d(lk_mirror(db, bb, 1), dt, 1, V);
  tE.row_stride = tC.row_stride = ld;
  const size_t nst = (size_t)(N > 0 ? N : 1) * NS;
  float* st = malloc(sizeof(float) * nst);
  for (int64_t k = 0; k < N * NS; ++k) st[k] = (float)state[k];
  const int64_t ng = o->reduction == FH_REDUCTION_NONE ? (N > 0 ? N : 1) : 1;
  float* g32 = malloc(sizeof(float) * (size_t)ng);
  for (int64_t k = 0; k < ng; ++k) g32[k] = (float)gl[k];
  float* d_st = lk_mirror(st, sizeof(float) * nst, 0);
  float* d_g = lk_mirror(g32, sizeof(float) * (size_t)ng, 0);
  dk_inputs_t inp;
  inputs_mirror(P, &inp);
  fh_distill_head_t hs = {&inp.Es, &inp.Cs, &inp.bs}, ht = {&inp.Et, &inp.Ct, &inp.bt};
  fh_distill_grad_inputs_t in = {d_st, d_g};
  fh_distill_grads_t G = {&tE, &tC, &tb};
  fh_distill_sparse_teacher_t sp;
  const fh_status_t rc = P->K > 0
                             ? fh_distill_sparse_backward(ctx, o, &hs, sparse_mirror(P, &sp), inp.targets, &in, &G, w, ws)
                             : fh_distill_backward(ctx, o, &hs, &ht, inp.targets, &in, &G, w, ws);
  if (rc == FH_SUCCESS) check_flag(P, ctx);
  if (P->K > 0) sparse_drop(P, &sp);
  inputs_drop(P, &inp);
  lk_drop(st, d_st), lk_drop(g32, d_g);
  lk_back(dE, tE.data, bE, 1), lk_back(dC, tC.data, bC, 1), lk_back(db, tb.data, bb, 1);
  ws_free(wh, w);
  if (rc == FH_SUCCESS) {
    cr_assert(tu_guards_intact(dE, bE) && tu_guards_intact(dC, bC) && tu_guards_intact(db, bb),
              "a gradient guard was overwritten");
    for (int64_t i = 0; i < N; ++i)
      for (int64_t k = 0; k < ld; ++k) {
        const double v = fh_load(dE, dt, i * ld + k);
        if (k < D) out->dE[i * D + k] = v;
        else cr_assert(isnan(v), "dE padding written");
      }
    for (int64_t j = 0; j < V; ++j)
      for (int64_t k = 0; k < ld; ++k) {
        const double v = fh_load(dC, dt, j * ld + k);
        if (k < D) out->dC[j * D + k] = v;
        else cr_assert(isnan(v), "dC padding written");
      }
    for (int64_t j = 0; j < V; ++j) out->db[j] = fh_load(db, dt, j);
  }
  free(dE), free(dC), free(db), free(st), free(g32);
  fh_context_destroy(ctx);
  return rc;
}

static int64_t count_valid(const dk_problem_t* P, const fh_distill_options_t* o) {
  int64_t n = 0;
  for (int64_t i = 0; i < P->s.N; ++i) n += !P->targets || P->targets[i] != o->ignore_index;
  return n;
}
static double upstream(const dk_problem_t* P, const fh_distill_options_t* o, const double* gl, int64_t i) {
  if (o->reduction == FH_REDUCTION_NONE) return gl[i];
  if (o->reduction == FH_REDUCTION_SUM) return gl[0];
  const double den = o->divisor > 0 ? o->divisor : (double)count_valid(P, o);
  return den > 0 ? gl[0] / den : 0.0;
}

/* The naive backward from the naive fp32 state (see the file comment). */
void dk_naive_backward(const dk_problem_t* P, const fh_distill_options_t* o, const double* state,
                              const double* gl, dk_grads_t* out) {
  const int64_t N = P->s.N, V = P->s.V, D = P->s.Ds;
  const fh_dtype_t dt = P->s.dtype;
  const int f32 = dt == FH_DTYPE_F32;
  fh_div_t dv;
  fh_div_resolve(o, &dv);
  const float invT = 1.0f / o->temperature;
  const double T = o->temperature, kap = o->scale_by_t_squared ? T * T : 1.0;
  float *s = malloc(sizeof(float) * (size_t)V), *t = malloc(sizeof(float) * (size_t)V);
  float* aE = malloc(sizeof(float) * (size_t)(D + 1));
  float* tmp = malloc(sizeof(float) * (size_t)(V + 1));
  float* aC = calloc((size_t)(V * D + 1), sizeof(float));
  float* ab = calloc((size_t)(V + 1), sizeof(float));
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t k = 0; k < D; ++k) aE[k] = 0.0f;
    const int valid = !P->targets || P->targets[i] != o->ignore_index;
    if (valid) {
      const double* st = state + i * NS;
      const double a = upstream(P, o, gl, i);
      const float cs = (float)(a * o->soft_weight * kap / T), ch = (float)(a * o->hard_weight);
      naive_logits(&P->tEs, &P->tCs, &P->tbs, i, V, s);
      if (P->K == 0) naive_logits(&P->tEt, &P->tCt, &P->tbt, i, V, t);
      /* fp32: the log-softmaxes recomputed as PyTorch forms them (what the fp32 backward must
       * meet); 16-bit: from the state's fp32 lse, as their backward does. A sparse teacher's
       * slot 1 is its a_R. */
      float mu = (float)st[0], lu = 0.0f, mv = (float)st[1], lv = 0.0f, ms = (float)st[3], ls = 0.0f;
      if (f32) {
        for (int64_t j = 0; j < V; ++j) tmp[j] = s[j] * invT;
        lsm32(tmp, V, &mu, &lu);
        if (P->K == 0) {
          for (int64_t j = 0; j < V; ++j) tmp[j] = t[j] * invT;
          lsm32(tmp, V, &mv, &lv);
        }
        lsm32(s, V, &ms, &ls);
      }
      if (P->K > 0) { /* t[j]: qa at the support, NaN off it (then q a_R) */
        float d0, d1, d2;
        for (int64_t j = 0; j < V; ++j) tmp[j] = s[j] * invT;
        naive_sparse_row(P, o, &dv, i, tmp, mu, lu, t, &d0, &d1, &d2);
      }
      for (int64_t j = 0; j < V; ++j) {
        const float X = (s[j] * invT - mu) - lu, Y = (t[j] * invT - mv) - lv;
        double term, qa;
        if (P->K > 0) qa = isnan(t[j]) ? (double)(expf(X) * (float)st[1]) : (double)t[j];
        else fh_div_eval(&dv, X, Y, &term, &qa);
        float g = cs * ((float)qa - expf(X) * (float)st[2]);
        if (o->hard_weight != 0.0f) {
          const float d = (s[j] - ms) - ls;
          g += ch * (j == P->targets[i] ? expm1f(d) : expf(d));
        }
        const float gop = (float)(f32 ? g : dk_round_to(dt, g));
        ab[j] += g;
        for (int64_t k = 0; k < D; ++k) {
          const double c = fh_tensor_get(&P->tCs, j, k), e = fh_tensor_get(&P->tEs, i, k);
          aE[k] += gop * (float)c;
          aC[j * D + k] += gop * (float)e;
        }
      }
    }
    for (int64_t k = 0; k < D; ++k) out->dE[i * D + k] = dk_round_to(dt, out->dE[i * D + k] + aE[k]);
  }
  for (int64_t q = 0; q < V * D; ++q) out->dC[q] = dk_round_to(dt, out->dC[q] + aC[q]);
  for (int64_t j = 0; j < V; ++j) out->db[j] = dk_round_to(dt, out->db[j] + ab[j]);
  free(s), free(t), free(tmp), free(aE), free(aC), free(ab);
}

const char* const DK_MODE_NAME[3] = {"fp32", "output_dtype", "deterministic"};

/* Forward (kernel, naive, reference), then the three backwards compared. init (may be NULL):
 * the accumulate flag's starting gradients. */
int dk_check_backward(const char* label, const dk_problem_t* P, const fh_distill_options_t* o,
                          const dk_grads_t* init) {
  const int64_t N = P->s.N, V = P->s.V, D = P->s.Ds;
  dk_out_t kf, nf, rf;
  dk_out_alloc(&kf, N), dk_out_alloc(&nf, N), dk_out_alloc(&rf, N);
  cr_assert_eq(dk_run(P, o, &kf), FH_SUCCESS, "%s: %s", label, fh_last_error());
  dk_naive(P, o, &nf);
  dk_reference(P, o, &rf);
  double* gl = dk_make_gl(P, o);
  dk_grads_t k, n, r;
  dk_grads_alloc(&k, P), dk_grads_alloc(&n, P), dk_grads_alloc(&r, P);
  if (init) {
    memcpy(n.dE, init->dE, sizeof(double) * (size_t)(N * D)), memcpy(n.dC, init->dC, sizeof(double) * (size_t)(V * D));
    memcpy(n.db, init->db, sizeof(double) * (size_t)V);
  }
  cr_assert_eq(dk_run_backward(P, o, kf.state, gl, init, &k), FH_SUCCESS, "%s: %s", label, fh_last_error());
  dk_naive_backward(P, o, nf.state, gl, &n);
  fh_distill_problem_t p = dk_ref_problem(P, o);
  cr_assert_eq(fh_ref_distill_backward_f64(&p, rf.state, gl, r.dE, r.dC, r.db, NULL), FH_SUCCESS, "%s",
               fh_last_error());
  if (init) {
    for (int64_t q = 0; q < N * D; ++q) r.dE[q] += init->dE[q];
    for (int64_t q = 0; q < V * D; ++q) r.dC[q] += init->dC[q];
    for (int64_t q = 0; q < V; ++q) r.db[q] += init->db[q];
  }
  const int lowp = o->accum_mode == FH_ACCUM_OUTPUT_DTYPE && P->s.dtype != FH_DTYPE_F32;
  const double fE = lowp ? 2.0 * (double)((V + 127) / 128) : 2.0;
  const double fC = lowp ? 2.0 * (double)((count_valid(P, o) + 127) / 128) : 2.0;
  char nm[200];
  int ok = 1;
  snprintf(nm, sizeof nm, "%s %s dE", label, DK_MODE_NAME[o->accum_mode]);
  ok &= lk_compare(nm, k.dE, r.dE, n.dE, N * D, fE, (double)(D + V), NULL);
  snprintf(nm, sizeof nm, "%s %s dC", label, DK_MODE_NAME[o->accum_mode]);
  ok &= lk_compare(nm, k.dC, r.dC, n.dC, V * D, fC, (double)(D + V + N), NULL);
  snprintf(nm, sizeof nm, "%s %s dbias", label, DK_MODE_NAME[o->accum_mode]);
  ok &= lk_compare(nm, k.db, r.db, n.db, V, 2.0, (double)(V + N), NULL);
  dk_grads_free(&k), dk_grads_free(&n), dk_grads_free(&r);
  dk_out_free(&kf), dk_out_free(&nf), dk_out_free(&rf);
  free(gl);
  return ok;
}
