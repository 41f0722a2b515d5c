/* CPU reference for distillation: fp64 accumulation, streaming over the vocabulary (two passes
 * that recompute the logits: softmax statistics, then the divergence), O(V + D) scratch per
 * thread and no N x V buffer; OpenMP over rows (forward, dE) and over class blocks (dC, dbias).
 * Written to be obviously right, not fast; the formulas are in fusedhead.h and
 * docs/distillation.md. A student class whose logit is -inf is masked (docs/conventions.md):
 * it is left out of Σ q a and gets gradient exactly 0. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fh_internal.h"
#include "ref/distill_ref.h"
#include "ref/ref_common.h"

/* Classes per block in the dC pass. */
#define CLASS_BLOCK 64
#define NS FH_DISTILL_ROW_STATE

static int row_valid(const fh_distill_problem_t* p, int64_t i) {
  return !p->targets || p->targets[i] != p->opt.ignore_index;
}
static int want_hard(const fh_distill_problem_t* p) { return p->opt.hard_weight != 0.0f; }
static double kappa(const fh_distill_problem_t* p) {
  const double T = p->opt.temperature;
  return p->opt.scale_by_t_squared ? T * T : 1.0;
}

/* Logit of class j for a row whose E is `e` (fp64), converting C_j into the scratch `c`. */
static double logit(const fh_tensor_t* C, const fh_tensor_t* b, const double* e, double* c, int64_t j) {
  fh_ref_row_to_double(C, j, c);
  double r = fh_ref_dot(e, c, C->cols);
  if (b) r += fh_tensor_get(b, 0, j);
  return r;
}

/* Per-thread scratch: fp64 rows of E and C for both heads, and for the sparse teacher a class
 * mask with the teacher's p at the support (O(V)). */
typedef struct scratch {
  double *es, *cs, *et, *ct, *pval;
  unsigned char* mask;
} scratch_t;

static int scratch_init(const fh_distill_problem_t* p, scratch_t* s) {
  const int64_t Ds = p->D_s, Dt = p->sparse ? 0 : p->D_t, V = p->sparse ? p->V : 0;
  memset(s, 0, sizeof *s); /* every field defined even when an allocation fails */
  s->es = (double*)malloc(sizeof(double) * (size_t)(2 * Ds + 2 * Dt + V + 1));
  s->mask = (unsigned char*)calloc((size_t)V + 1, 1);
  if (!s->es || !s->mask) return 0;
  s->cs = s->es + Ds;
  s->et = s->cs + Ds;
  s->ct = s->et + Dt;
  s->pval = s->ct + Dt;
  return 1;
}
static void scratch_free(scratch_t* s) {
  free(s->es);
  free(s->mask);
}

/* Sparse teacher of row i (docs/distillation.md "Sparse teacher"): the log-normalizer of the
 * support, log Σ_S e^{logp/T} for renormalize, 0 otherwise (remainder and none use logp as
 * given, T = 1). */
static double sparse_lognorm(const fh_distill_problem_t* p, int64_t i) {
  if (p->opt.sparse_mass != FH_DISTILL_SPARSE_RENORMALIZE) return 0.0;
  fh_ref_softmax_stats_t sk;
  fh_ref_stats_init(&sk);
  for (int64_t k = 0; k < p->K; ++k) fh_ref_stats_add(&sk, p->logprobs[i * p->K + k] / (double)p->opt.temperature);
  return fh_ref_stats_lse(&sk);
}

/* Row i's support: for each entry k, X = log q and Y = log p at id_k, the element (term, qa);
 * marks the support in the scratch mask with qa at each id (the backward's on-support q a).
 * Sums Σ term into *D, Σ qa into *S (masked student classes left out) and Σ p into *pi. The
 * row's Es must be in s->es. */
static void sparse_support(const fh_distill_problem_t* p, const fh_div_t* dv, scratch_t* s, int64_t i, double lse_u,
                           double* D, double* S, double* pi) {
  const double T = p->opt.temperature, norm = sparse_lognorm(p, i);
  const int renorm = p->opt.sparse_mass == FH_DISTILL_SPARSE_RENORMALIZE;
  *D = *S = *pi = 0.0;
  for (int64_t k = 0; k < p->K; ++k) {
    const int64_t id = p->ids[i * p->K + k];
    const double lp = p->logprobs[i * p->K + k], Y = renorm ? lp / T - norm : lp;
    const double sj = logit(p->Cs, p->bs, s->es, s->cs, id);
    double term, qa;
    fh_div_eval(dv, sj / T - lse_u, Y, &term, &qa);
    *D += term;
    if (sj == -INFINITY) qa = 0.0; /* a masked student class has zero gradient */
    *S += qa;
    *pi += exp(Y);
    s->mask[id] = 1;
    s->pval[id] = qa;
  }
}
static void sparse_clear(const fh_distill_problem_t* p, scratch_t* s, int64_t i) {
  for (int64_t k = 0; k < p->K; ++k) s->mask[p->ids[i * p->K + k]] = 0;
}

/* The rest bucket of row i (renormalize: teacher mass ρ = 0; remainder: ρ = max(0, 1 − π)) with
 * the student's q_R = Σ_{j∉S} q_j summed in log space over the complement (1 − Σ_S q would
 * cancel when the support holds most of Q). Adds its element to *D, *S and returns
 * a_R = a(ρ/q_R), the off-support gradient's a (0 without a bucket: mode none, K = V, or
 * q_R = 0). Needs the support marked. */
static double sparse_bucket(const fh_distill_problem_t* p, const fh_div_t* dv, scratch_t* s, double lse_u, double pi,
                            double* D, double* S) {
  const double T = p->opt.temperature;
  if (p->opt.sparse_mass == FH_DISTILL_SPARSE_NONE || p->K >= p->V) return 0.0;
  const double rho = p->opt.sparse_mass == FH_DISTILL_SPARSE_REMAINDER && pi < 1.0 ? 1.0 - pi : 0.0;
  fh_ref_softmax_stats_t sc;
  fh_ref_stats_init(&sc);
  for (int64_t j = 0; j < p->V; ++j)
    if (!s->mask[j]) fh_ref_stats_add(&sc, logit(p->Cs, p->bs, s->es, s->cs, j) / T);
  const double log_qR = fh_ref_stats_lse(&sc) - lse_u, log_rho = log(rho);
  double term, qa;
  fh_div_eval(dv, log_qR, log_rho, &term, &qa); /* both −inf: 0, 0 */
  *D += term;
  if (log_qR == -INFINITY) return 0.0; /* no student mass off S: no gradient there */
  *S += qa;
  fh_div_eval(dv, 0.0, log_rho - log_qR, &term, &qa); /* q = 1, p = ρ/q_R: qa = a(ρ/q_R) */
  return qa;
}

/* Pass 1 of row i over the problem's classes: the FH_SHARD_DISTILL_STATS partial statistics
 * (fusedhead_shard.h): (m, Z) of s/T, t/T (dense teacher) and s (hard loss), and s of the
 * target when this problem holds it (else 0). */
static void stats_row(const fh_distill_problem_t* p, scratch_t* s, int64_t i, double* q) {
  const double T = p->opt.temperature;
  const int64_t y = p->targets ? p->targets[i] : -1, off = p->class_offset;
  fh_ref_softmax_stats_t su, sv, ss;
  fh_ref_stats_init(&su);
  fh_ref_stats_init(&sv);
  fh_ref_stats_init(&ss);
  double s_y = 0.0;
  fh_ref_row_to_double(p->Es, i, s->es);
  if (!p->sparse) fh_ref_row_to_double(p->Et, i, s->et);
  for (int64_t j = 0; j < p->V; ++j) {
    const double sj = logit(p->Cs, p->bs, s->es, s->cs, j);
    fh_ref_stats_add(&su, sj / T);
    if (want_hard(p)) fh_ref_stats_add(&ss, sj);
    if (off + j == y) s_y = sj;
    if (!p->sparse) fh_ref_stats_add(&sv, logit(p->Ct, p->bt, s->et, s->ct, j) / T);
  }
  q[0] = su.m, q[1] = su.Z, q[2] = sv.m, q[3] = sv.Z, q[4] = ss.m, q[5] = ss.Z, q[6] = s_y;
}

void fh_ref_distill_merge_stats(const double* gathered, int64_t P, int64_t N, int64_t i, double lse[3],
                                double* s_y) {
  fh_ref_softmax_stats_t st[3];
  *s_y = 0.0;
  for (int k = 0; k < 3; ++k) fh_ref_stats_init(&st[k]);
  for (int64_t r = 0; r < P; ++r) {
    const double* q = gathered + (r * N + i) * FH_SHARD_DISTILL_STATS;
    for (int k = 0; k < 3; ++k) fh_ref_stats_merge(&st[k], q[2 * k], q[2 * k + 1], 0.0);
    *s_y += q[6]; /* one owner; the others add exact zeros */
  }
  for (int k = 0; k < 3; ++k) lse[k] = fh_ref_stats_lse(&st[k]);
}

/* Pass 2 of a dense row: Σ q f(r) and Σ q a over the problem's classes, given the global lse of
 * s/T and t/T. */
static void div_row(const fh_distill_problem_t* p, const fh_div_t* dv, scratch_t* s, int64_t i, double lse_u,
                    double lse_t, double* D_out, double* S_out) {
  const double T = p->opt.temperature;
  double D = 0.0, S = 0.0;
  fh_ref_row_to_double(p->Es, i, s->es);
  fh_ref_row_to_double(p->Et, i, s->et);
  for (int64_t j = 0; j < p->V; ++j) {
    const double sj = logit(p->Cs, p->bs, s->es, s->cs, j);
    const double X = sj / T - lse_u;
    const double Y = logit(p->Ct, p->bt, s->et, s->ct, j) / T - lse_t;
    double term, qa;
    fh_div_eval(dv, X, Y, &term, &qa);
    D += term;
    if (sj != -INFINITY) S += qa; /* a masked student class has zero gradient */
  }
  *D_out = D;
  *S_out = S;
}

/* One row of the forward: fills st[NS], returns soft D and hard CE through the pointers. */
static void forward_row(const fh_distill_problem_t* p, const fh_div_t* dv, scratch_t* s, int64_t i, double* st,
                        double* D_out, double* hard_out) {
  double q[FH_SHARD_DISTILL_STATS], lse[3], s_y;
  /* Pass 1: softmax statistics of s/T, t/T (shared V only) and s, as one rank of a shard. */
  stats_row(p, s, i, q);
  fh_ref_distill_merge_stats(q, 1, 1, 0, lse, &s_y);
  const double lse_u = lse[0];
  double D = 0.0, S = 0.0, t1;
  if (!p->sparse) {
    /* Pass 2: the divergence and Σ q a, one (f, a) element per class. */
    t1 = lse[1];
    div_row(p, dv, s, i, lse_u, t1, &D, &S);
  } else {
    /* The support's elements, then the rest bucket; slot 1 of the state holds a_R. */
    double pi;
    sparse_support(p, dv, s, i, lse_u, &D, &S, &pi);
    t1 = sparse_bucket(p, dv, s, lse_u, pi, &D, &S);
    sparse_clear(p, s, i);
  }
  st[0] = lse_u;
  st[1] = t1;
  st[2] = S;
  st[3] = want_hard(p) ? lse[2] : 0.0;
  *D_out = D;
  *hard_out = want_hard(p) ? st[3] - s_y : 0.0;
}

static double denominator(const fh_distill_problem_t* p, int64_t* n_valid) {
  int64_t n = 0;
  for (int64_t i = 0; i < p->N; ++i) n += row_valid(p, i);
  *n_valid = n;
  return p->opt.divisor > 0.0f ? (double)p->opt.divisor : (double)n;
}

/* Calls fn(p, dv, scratch, i, arg) for every row, rows in parallel (each thread with its own
 * scratch). */
typedef void (*row_fn_t)(const fh_distill_problem_t* p, const fh_div_t* dv, scratch_t* s, int64_t i, void* arg);
static fh_status_t for_rows(const fh_distill_problem_t* p, row_fn_t fn, void* arg) {
  fh_div_t dv;
  fh_div_resolve(&p->opt, &dv);
  int oom = 0;
#ifdef FH_HAVE_OPENMP
#pragma omp parallel reduction(| : oom) if (fh_ref_parallel(p->N, p->V, p->D_s + p->D_t)) num_threads(fh_ref_threads())
#endif
  {
    scratch_t s;
    const int ok = scratch_init(p, &s);
    if (!ok) oom = 1;
#ifdef FH_HAVE_OPENMP
#pragma omp for schedule(dynamic)
#endif
    for (int64_t i = 0; i < p->N; ++i)
      if (ok) fn(p, &dv, &s, i, arg);
    scratch_free(&s);
  }
  if (oom) return fh_set_error(FH_ERR_OUT_OF_MEMORY, p->fn, "cannot allocate reference buffers");
  return FH_SUCCESS;
}

void fh_ref_distill_put_row(const fh_distill_problem_t* p, fh_distill_ref_fwd_t* out, int64_t i, double D,
                            double hard) {
  const double k2 = kappa(p);
  out->row_soft[i] = k2 * D;
  out->row_hard[i] = hard;
  out->row_loss[i] = p->opt.hard_weight * hard + p->opt.soft_weight * k2 * D;
}

static void forward_fn(const fh_distill_problem_t* p, const fh_div_t* dv, scratch_t* s, int64_t i, void* arg) {
  fh_distill_ref_fwd_t* out = (fh_distill_ref_fwd_t*)arg;
  double* st = out->state + i * NS;
  out->row_loss[i] = out->row_soft[i] = out->row_hard[i] = 0.0;
  for (int k = 0; k < NS; ++k) st[k] = 0.0;
  if (!row_valid(p, i)) return;
  double D, hard;
  forward_row(p, dv, s, i, st, &D, &hard);
  fh_ref_distill_put_row(p, out, i, D, hard);
}

static void stats_fn(const fh_distill_problem_t* p, const fh_div_t* dv, scratch_t* s, int64_t i, void* arg) {
  double* q = (double*)arg + i * FH_SHARD_DISTILL_STATS;
  (void)dv;
  for (int k = 0; k < FH_SHARD_DISTILL_STATS; ++k) q[k] = 0.0;
  if (row_valid(p, i)) stats_row(p, s, i, q);
}

fh_status_t fh_ref_distill_shard_stats(const fh_distill_problem_t* p, double* stats) {
  return for_rows(p, stats_fn, stats);
}

typedef struct div_arg {
  int64_t P;
  const double* gathered;
  double* div;
} div_arg_t;

static void div_fn(const fh_distill_problem_t* p, const fh_div_t* dv, scratch_t* s, int64_t i, void* arg) {
  const div_arg_t* a = (const div_arg_t*)arg;
  double* q = a->div + i * FH_SHARD_DISTILL_DIV;
  q[0] = q[1] = 0.0;
  if (!row_valid(p, i)) return;
  double lse[3], s_y;
  fh_ref_distill_merge_stats(a->gathered, a->P, p->N, i, lse, &s_y);
  div_row(p, dv, s, i, lse[0], lse[1], &q[0], &q[1]);
}

fh_status_t fh_ref_distill_shard_div(const fh_distill_problem_t* p, int64_t P, const double* gathered, double* div) {
  div_arg_t a = {P, gathered, div};
  return for_rows(p, div_fn, &a);
}

void fh_ref_distill_reduce(const fh_distill_problem_t* p, fh_distill_ref_fwd_t* out) {
  /* Reductions in row order (deterministic). */
  double loss = 0, soft = 0, hard = 0;
  for (int64_t i = 0; i < p->N; ++i) {
    loss += out->row_loss[i];
    soft += out->row_soft[i];
    hard += out->row_hard[i];
  }
  out->denom = denominator(p, &out->n_valid);
  if (p->opt.reduction == FH_REDUCTION_MEAN) {
    /* A zero denominator (every row ignored) gives 0, not NaN: documented in fusedhead.h. */
    const double inv = out->denom > 0.0 ? 1.0 / out->denom : 0.0;
    loss *= inv;
    soft *= inv;
    hard *= inv;
  }
  out->loss = loss;
  out->soft = soft;
  out->hard = hard;
}

fh_status_t fh_ref_distill_forward_f64(const fh_distill_problem_t* p, fh_distill_ref_fwd_t* out) {
  FH_TRY(for_rows(p, forward_fn, out));
  fh_ref_distill_reduce(p, out);
  return FH_SUCCESS;
}

/* Per-row data of the backward. */
typedef struct row_coef {
  const double* st; /* the forward's state */
  double coef;      /* upstream factor: grad_loss / denominator, grad_loss or grad_loss[i] */
  int64_t y;
} row_coef_t;

/* ∂loss/∂s_ij from the student logit s and q a of the divergence element. */
static double grad_entry(const fh_distill_problem_t* p, const row_coef_t* rc, int64_t j, double s, double qa) {
  const double T = p->opt.temperature;
  const double q = exp(s / T - rc->st[0]);
  double g = (double)p->opt.soft_weight * kappa(p) / T * (qa - q * rc->st[2]);
  if (want_hard(p)) g += (double)p->opt.hard_weight * (exp(s - rc->st[3]) - (p->class_offset + j == rc->y ? 1.0 : 0.0));
  return rc->coef * g;
}

/* q a of class j for a row: dense from the teacher logit t; sparse from the scratch mask
 * (support: the element's qa) or q_j a_R off the support. */
static double elem_qa(const fh_distill_problem_t* p, const fh_div_t* dv, const row_coef_t* rc, double s, double t,
                      int on_support, double qa_sup) {
  const double T = p->opt.temperature, X = s / T - rc->st[0];
  if (!p->sparse) {
    double term, qa;
    fh_div_eval(dv, X, t / T - rc->st[1], &term, &qa);
    return qa;
  }
  return on_support ? qa_sup : exp(X) * rc->st[1];
}

static int wanted(const fh_tensor_t* t) { return t && t->data; }

fh_status_t fh_ref_distill_backward_f64(const fh_distill_problem_t* p, const double* state,
                                        const double* grad_loss, double* dE64, double* dC64, double* db64,
                                        const fh_distill_grads_t* grads) {
  const int64_t N = p->N, V = p->V, D = p->D_s;
  const fh_tensor_t* tE = grads && wanted(grads->dE) ? grads->dE : NULL;
  const fh_tensor_t* tC = grads && wanted(grads->dC) ? grads->dC : NULL;
  const fh_tensor_t* tb = grads && wanted(grads->dbias) && p->bs ? grads->dbias : NULL;
  const int acc = p->opt.accumulate, want_E = dE64 || tE, want_C = dC64 || tC, want_b = db64 || tb;
  fh_div_t dv;
  fh_div_resolve(&p->opt, &dv);
  int64_t n_valid;
  const double denom = denominator(p, &n_valid);
  row_coef_t* rc = (row_coef_t*)malloc(sizeof(row_coef_t) * (size_t)(N > 0 ? N : 1));
  if (!rc) return fh_set_error(FH_ERR_OUT_OF_MEMORY, p->fn, "cannot allocate reference buffers");
  for (int64_t i = 0; i < N; ++i) {
    rc[i].st = state + i * NS;
    rc[i].y = p->targets ? p->targets[i] : -1;
    rc[i].coef = 0.0;
    if (!row_valid(p, i)) continue;
    if (p->opt.reduction == FH_REDUCTION_NONE) rc[i].coef = grad_loss[i];
    else if (p->opt.reduction == FH_REDUCTION_SUM) rc[i].coef = grad_loss[0];
    else rc[i].coef = denom > 0.0 ? grad_loss[0] / denom : 0.0;
  }
  int oom = 0;
  /* dE_i = Σ_j G_ij Cs_j, rows in parallel. */
  if (want_E) {
#ifdef FH_HAVE_OPENMP
#pragma omp parallel reduction(| : oom) if (fh_ref_parallel(p->N, p->V, p->D_s + p->D_t)) num_threads(fh_ref_threads())
#endif
    {
      scratch_t s;
      const int ok = scratch_init(p, &s);
      double* accE = (double*)malloc(sizeof(double) * (size_t)(D + 1));
      if (!ok || !accE) oom = 1;
#ifdef FH_HAVE_OPENMP
#pragma omp for schedule(dynamic)
#endif
      for (int64_t i = 0; i < N; ++i) {
        if (!ok || !accE) continue;
        memset(accE, 0, sizeof(double) * (size_t)D);
        if (row_valid(p, i)) {
          fh_ref_row_to_double(p->Es, i, s.es);
          double d0, d1, d2;
          if (!p->sparse) fh_ref_row_to_double(p->Et, i, s.et);
          else sparse_support(p, &dv, &s, i, rc[i].st[0], &d0, &d1, &d2);
          for (int64_t j = 0; j < V; ++j) {
            const double sj = logit(p->Cs, p->bs, s.es, s.cs, j);
            if (sj == -INFINITY) continue; /* masked: zero gradient, and no 0 · inf from Cs_j */
            const double tj = p->sparse ? 0.0 : logit(p->Ct, p->bt, s.et, s.ct, j);
            const double qa = elem_qa(p, &dv, &rc[i], sj, tj, p->sparse && s.mask[j], p->sparse ? s.pval[j] : 0.0);
            const double g = grad_entry(p, &rc[i], j, sj, qa);
            for (int64_t k = 0; k < D; ++k) accE[k] += g * s.cs[k];
          }
          if (p->sparse) sparse_clear(p, &s, i);
        }
        if (dE64) memcpy(dE64 + i * D, accE, sizeof(double) * (size_t)D);
        if (tE) fh_ref_store_row(tE, i, accE, D, acc);
      }
      free(accE);
      scratch_free(&s);
    }
  }
  /* dC_j = Σ_i G_ij Es_i and dbias_j = Σ_i G_ij, class blocks in parallel (each thread owns its
   * classes, so no atomics), rows in order inside a block (deterministic). */
  if ((want_C || want_b) && !oom) {
#ifdef FH_HAVE_OPENMP
#pragma omp parallel reduction(| : oom) if (fh_ref_parallel(p->N, p->V, p->D_s + p->D_t)) num_threads(fh_ref_threads())
#endif
    {
      scratch_t s;
      const int ok = scratch_init(p, &s);
      double* accC = (double*)malloc(sizeof(double) * (size_t)(CLASS_BLOCK * D + CLASS_BLOCK + 1));
      if (!ok || !accC) oom = 1;
#ifdef FH_HAVE_OPENMP
#pragma omp for schedule(dynamic)
#endif
      for (int64_t j0 = 0; j0 < V; j0 += CLASS_BLOCK) {
        if (!ok || !accC) continue;
        const int64_t nb = (V - j0 < CLASS_BLOCK) ? V - j0 : CLASS_BLOCK;
        double* accb = accC + CLASS_BLOCK * D;
        memset(accC, 0, sizeof(double) * (size_t)(CLASS_BLOCK * D + CLASS_BLOCK));
        for (int64_t i = 0; i < N; ++i) {
          if (!row_valid(p, i)) continue;
          fh_ref_row_to_double(p->Es, i, s.es);
          double d0, d1, d2;
          if (!p->sparse) fh_ref_row_to_double(p->Et, i, s.et);
          else sparse_support(p, &dv, &s, i, rc[i].st[0], &d0, &d1, &d2);
          for (int64_t r = 0; r < nb; ++r) {
            const int64_t j = j0 + r;
            const double sj = logit(p->Cs, p->bs, s.es, s.cs, j);
            if (sj == -INFINITY) continue; /* masked: zero gradient, and no 0 · inf from Cs_j */
            const double tj = p->sparse ? 0.0 : logit(p->Ct, p->bt, s.et, s.ct, j);
            const double qa = elem_qa(p, &dv, &rc[i], sj, tj, p->sparse && s.mask[j], p->sparse ? s.pval[j] : 0.0);
            const double g = grad_entry(p, &rc[i], j, sj, qa);
            accb[r] += g;
            for (int64_t k = 0; k < D; ++k) accC[r * D + k] += g * s.es[k];
          }
          if (p->sparse) sparse_clear(p, &s, i);
        }
        fh_ref_store_class_block(j0, nb, D, accC, accb, dC64, tC, db64, tb, acc);
      }
      free(accC);
      scratch_free(&s);
    }
  }
  free(rc);
  if (oom) return fh_set_error(FH_ERR_OUT_OF_MEMORY, p->fn, "cannot allocate reference buffers");
  return FH_SUCCESS;
}

/* ---- public wrappers: fp64 core, rounded once to fp32 ---- */

fh_status_t fh_ref_distill_forward(const fh_distill_problem_t* p, const fh_distill_outputs_t* o) {
  return fh_ref_distill_forward_out(p, NULL, NULL, o);
}

fh_status_t fh_ref_distill_forward_out(const fh_distill_problem_t* p, fh_ref_distill_fwd_fn_t run, const void* arg,
                                       const fh_distill_outputs_t* o) {
  const int64_t N = p->N;
  const size_t n = (size_t)(N > 0 ? N : 1);
  double* buf = (double*)malloc(sizeof(double) * (3 + NS) * n);
  if (!buf) return fh_set_error(FH_ERR_OUT_OF_MEMORY, p->fn, "cannot allocate reference buffers");
  fh_distill_ref_fwd_t r;
  memset(&r, 0, sizeof r);
  r.row_loss = buf;
  r.row_soft = buf + n;
  r.row_hard = buf + 2 * n;
  r.state = buf + 3 * n;
  const fh_status_t st = run ? run(p, &r, arg) : fh_ref_distill_forward_f64(p, &r);
  const int f64 = p->Es->dtype == FH_DTYPE_F64;
  if (st == FH_SUCCESS) {
    if (p->opt.reduction == FH_REDUCTION_NONE) {
      for (int64_t i = 0; i < N; ++i) {
        fh_ref_stat_put(o->loss, i, r.row_loss[i], f64);
        if (o->soft_loss) fh_ref_stat_put(o->soft_loss, i, r.row_soft[i], f64);
        if (o->hard_loss) fh_ref_stat_put(o->hard_loss, i, r.row_hard[i], f64);
      }
    } else {
      fh_ref_stat_put(o->loss, 0, r.loss, f64);
      if (o->soft_loss) fh_ref_stat_put(o->soft_loss, 0, r.soft, f64);
      if (o->hard_loss) fh_ref_stat_put(o->hard_loss, 0, r.hard, f64);
    }
    if (o->row_state)
      for (int64_t k = 0; k < N * NS; ++k) fh_ref_stat_put(o->row_state, k, r.state[k], f64);
  }
  free(buf);
  return st;
}

fh_status_t fh_ref_distill_backward(const fh_distill_problem_t* p, const fh_distill_grad_inputs_t* in,
                                    const fh_distill_grads_t* grads) {
  const int64_t N = p->N;
  const size_t n = (size_t)(N > 0 ? N : 1);
  double* buf = (double*)malloc(sizeof(double) * (1 + NS) * n);
  if (!buf) return fh_set_error(FH_ERR_OUT_OF_MEMORY, p->fn, "cannot allocate reference buffers");
  double *gl = buf, *state = buf + n;
  const int f64 = p->Es->dtype == FH_DTYPE_F64;
  fh_status_t st = FH_SUCCESS;
  if (f64 && !p->shard_stats) {
    for (int64_t k = 0; k < N * NS; ++k) state[k] = fh_ref_stat_get(in->row_state, k, f64);
  } else {
    /* The fp32 row state (two lse's and Σ q a) loses what exp(X) amplifies on saturated rows
     * (logits ~1e4): recompute it in fp64 instead (docs/distillation.md, "Precision"). */
    double* fb = (double*)malloc(sizeof(double) * 3 * n);
    fh_distill_ref_fwd_t r;
    memset(&r, 0, sizeof r);
    r.row_loss = fb;
    r.row_soft = fb ? fb + n : NULL;
    r.row_hard = fb ? fb + 2 * n : NULL;
    r.state = state;
    /* On a shard the state is global: merged in fp64 from every rank's gathered statistics and
     * divergence sums (docs/distributed.md), never read from the rounded in->row_state. */
    if (!fb)
      st = fh_set_error(FH_ERR_OUT_OF_MEMORY, p->fn, "cannot allocate reference buffers");
    else if (p->shard_stats)
      st = fh_ref_distill_shard_f64(p, p->shard_nranks, p->shard_stats, p->shard_div, &r);
    else
      st = fh_ref_distill_forward_f64(p, &r);
    free(fb);
    if (st != FH_SUCCESS) {
      free(buf);
      return st;
    }
  }
  if (p->opt.reduction == FH_REDUCTION_NONE)
    for (int64_t i = 0; i < N; ++i) gl[i] = fh_ref_stat_get(in->grad_loss, i, f64);
  else
    gl[0] = fh_ref_stat_get(in->grad_loss, 0, f64);
  st = fh_ref_distill_backward_f64(p, state, gl, NULL, NULL, NULL, grads);
  free(buf);
  return st;
}
