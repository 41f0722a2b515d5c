/* CPU reference for linear cross-entropy: fp64 accumulation everywhere, O(N + V + D) memory
 * beyond inputs and outputs (it streams over the vocabulary and recomputes logits instead of
 * storing them). Written to be obviously right, not fast; the formulas are in fusedhead.h and
 * docs/linear_ce.md, including the masked-class rule (a raw logit of -inf: p = 0, left out of
 * every sum, zero gradient) of docs/conventions.md. The forward is per-row partials and a
 * finish, so that a vocabulary shard runs the same code (docs/distributed.md). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fh_internal.h"
#include "ref/linear_ce_ref.h"
#include "ref/ref_common.h"

/* Rows per block in the row-major passes: each class row C_j is converted to fp64 once per block. */
#define ROW_BLOCK 16
/* Classes per block in the dC pass. */
#define CLASS_BLOCK 64

static double stat_at(const fh_lce_problem_t* p, const float* a, int64_t i) {
  return fh_ref_stat_get(a, i, p->dtype == FH_DTYPE_F64);
}
static void stat_put(const fh_lce_problem_t* p, float* a, int64_t i, double v) {
  fh_ref_stat_put(a, i, v, p->dtype == FH_DTYPE_F64);
}
static double class_weight(const fh_lce_problem_t* p, int64_t j) {
  return p->class_weights ? stat_at(p, p->class_weights, j) : 1.0;
}
static double token_weight(const fh_lce_problem_t* p, int64_t i) {
  return p->token_weights ? stat_at(p, p->token_weights, i) : 1.0;
}
static int row_valid(const fh_lce_problem_t* p, int64_t i) { return p->targets[i] != p->opt.ignore_index; }

/* Raw logit r = e·c + b (fp64), then the processed logit z (scale, then softcap). */
static double raw_logit(const fh_lce_problem_t* p, const double* e, const double* c, int64_t j) {
  double r = fh_ref_dot(e, c, p->D);
  if (p->bias) r += fh_tensor_get(p->bias, 0, j);
  return r;
}
/* A class whose raw logit is -inf is masked (docs/conventions.md): it is left out of every sum,
 * whatever the softcap would map it to. */
static int masked(double r) { return r == -INFINITY; }
/* a·x where a term with a zero coefficient contributes 0 even when x is infinite (a masked target
 * under a zero weight): no 0·inf. NaN still propagates (a NaN row stays NaN everywhere). */
static double mul0(double a, double x) { return (a == 0.0 && isinf(x)) ? 0.0 : a * x; }
static double process_logit(const fh_lce_problem_t* p, double r) {
  double s = (double)p->opt.logit_scale * r;
  double cap = (double)p->opt.softcap;
  return cap > 0.0 ? cap * tanh(s / cap) : s;
}

/* The mean's denominators D_ce = Σ ω w_y and D_reg = Σ ω over valid rows (or the divisor). */
static void denominators(const fh_lce_problem_t* p, double* d_ce, double* d_reg, int64_t* n_valid) {
  double a = 0, b = 0;
  int64_t n = 0;
  for (int64_t i = 0; i < p->N; ++i) {
    if (!row_valid(p, i)) continue;
    double om = token_weight(p, i);
    a += om * class_weight(p, p->targets[i]);
    b += om;
    ++n;
  }
  if (p->opt.divisor > 0.0f) a = b = (double)p->opt.divisor;
  *d_ce = a;
  *d_reg = b;
  *n_valid = n;
}

/* x / d with the documented rule that a part over a zero denominator is 0. */
static double safe_div(double x, double d) { return d != 0.0 ? x / d : 0.0; }

/* Per-row partial statistics over this problem's classes (the whole vocabulary, or one shard):
 * FH_SHARD_LCE_PARTIAL doubles a row in the layout of fusedhead_shard.h, the sums over the
 * unmasked classes only. Ignored rows get zeros and argmax -1. */
fh_status_t fh_ref_lce_partials(const fh_lce_problem_t* p, double* part) {
  const int64_t N = p->N, V = p->V, D = p->D, off = p->class_offset;
  int oom = 0;

#ifdef FH_HAVE_OPENMP
#pragma omp parallel for schedule(dynamic) reduction(| : oom) if (fh_ref_parallel(N, V, D)) num_threads(fh_ref_threads())
#endif
  for (int64_t i0 = 0; i0 < N; i0 += ROW_BLOCK) {
    const int64_t nb = (N - i0 < ROW_BLOCK) ? N - i0 : ROW_BLOCK;
    double* e = (double*)malloc(sizeof(double) * (size_t)(ROW_BLOCK * D + D + 1));
    if (!e) {
      oom = 1;
      continue;
    }
    double* c = e + ROW_BLOCK * D;
    fh_ref_softmax_stats_t st[ROW_BLOCK];
    double sum_wz[ROW_BLOCK], z_y[ROW_BLOCK], best[ROW_BLOCK], w_un[ROW_BLOCK];
    int64_t arg[ROW_BLOCK], n_un[ROW_BLOCK];
    for (int64_t r = 0; r < nb; ++r) {
      const int64_t y = p->targets[i0 + r];
      fh_ref_row_to_double(p->E, i0 + r, e + r * D);
      fh_ref_stats_init(&st[r]);
      sum_wz[r] = 0;
      w_un[r] = 0;
      n_un[r] = 0;
      /* the owner of the target starts at -inf (it stays there when the target is masked); the
       * other shards report 0, so the merge's sum is the owner's value */
      z_y[r] = (y >= off && y < off + V) ? -INFINITY : 0.0;
      best[r] = -INFINITY;
      arg[r] = -1;
    }
    for (int64_t j = 0; j < V; ++j) {
      fh_ref_row_to_double(p->C, j, c);
      const double wj = class_weight(p, off + j);
      for (int64_t r = 0; r < nb; ++r) {
        if (!row_valid(p, i0 + r)) continue;
        double raw = raw_logit(p, e + r * D, c, j);
        if (!masked(raw)) {
          double z = process_logit(p, raw);
          fh_ref_stats_add(&st[r], z);
          sum_wz[r] += wj * z;
          w_un[r] += wj;
          n_un[r] += 1;
          if (off + j == p->targets[i0 + r]) z_y[r] = z;
        }
        /* argmax over the raw logit (scale and softcap keep the order, and saturating tanh
         * would create ties); NaN counts as the maximum, first occurrence wins. */
        if (arg[r] < 0 || raw > best[r] || (isnan(raw) && !isnan(best[r]))) {
          best[r] = raw;
          arg[r] = off + j;
        }
      }
    }
    for (int64_t r = 0; r < nb; ++r) {
      double* q = part + (i0 + r) * FH_SHARD_LCE_PARTIAL;
      const int v = row_valid(p, i0 + r);
      q[0] = v ? st[r].m : 0.0;
      q[1] = v ? st[r].Z : 0.0;
      q[2] = v ? st[r].F : 0.0;
      q[3] = v ? sum_wz[r] : 0.0;
      q[4] = v ? w_un[r] : 0.0;
      q[5] = v ? (double)n_un[r] : 0.0;
      q[6] = v ? z_y[r] : 0.0;
      q[7] = v ? best[r] : 0.0;
      q[8] = v ? (double)arg[r] : -1.0;
    }
    free(e);
  }
  if (oom) return fh_set_error(FH_ERR_OUT_OF_MEMORY, "fh_linear_ce_forward", "cannot allocate reference buffers");
  return FH_SUCCESS;
}

/* Row i of P ranks' partials (gathered [P][N][FH_SHARD_LCE_PARTIAL]) merged in rank order. The
 * argmax rule is the streaming one applied to each rank's winner, so, shards being contiguous in
 * rank order, it picks the same (first) index as one pass over the whole vocabulary. A row with
 * every class masked gets lse -inf and entropy 0. */
void fh_ref_lce_combine_row(const double* gathered, int64_t P, int64_t N, int64_t i, fh_lce_row_stats_t* rs) {
  fh_ref_softmax_stats_t st;
  fh_ref_stats_init(&st);
  double sum_wz = 0.0, w_un = 0.0, n_un = 0.0, z_y = 0.0, best = -INFINITY;
  int64_t arg = -1;
  for (int64_t r = 0; r < P; ++r) {
    const double* q = gathered + (r * N + i) * FH_SHARD_LCE_PARTIAL;
    fh_ref_stats_merge(&st, q[0], q[1], q[2]);
    sum_wz += q[3];
    w_un += q[4];
    n_un += q[5];
    z_y += q[6]; /* one owner (its z, or -inf when masked); the others add exact zeros */
    const int64_t a = (int64_t)q[8];
    if (a >= 0 && (arg < 0 || q[7] > best || (isnan(q[7]) && !isnan(best)))) {
      best = q[7];
      arg = a;
    }
  }
  rs->lse = fh_ref_stats_lse(&st);
  rs->h = n_un > 0 ? fh_ref_stats_entropy(&st) : 0.0;
  rs->sum_wz = sum_wz;
  rs->W = w_un;
  rs->n = n_un;
  rs->z_y = z_y;
  rs->arg = arg;
}

fh_status_t fh_ref_lce_finish(const fh_lce_problem_t* p, const double* gathered, int64_t P, fh_lce_ref_forward_t* out) {
  const int64_t N = p->N;
  const double alpha = p->opt.label_smoothing;
  const double lambda = p->opt.z_loss_scale, eta = p->opt.entropy_weight;
  for (int64_t i = 0; i < N; ++i) {
    if (!row_valid(p, i)) {
      out->lse[i] = 0;
      out->entropy[i] = 0;
      out->row_loss[i] = 0;
      out->row_zloss[i] = 0;
      out->argmax[i] = -1;
      continue;
    }
    fh_lce_row_stats_t rs;
    fh_ref_lce_combine_row(gathered, P, N, i, &rs);
    /* Every class masked: lse -inf, entropy 0 (no class carries mass), loss +inf. */
    const double lse = rs.lse, h = rs.h;
    const double om = token_weight(p, i), wy = class_weight(p, p->targets[i]);
    /* a masked target has p = 0: nll = +inf, as PyTorch */
    const double nll = rs.z_y == -INFINITY ? INFINITY : lse - rs.z_y;
    /* smoothing over the row's unmasked classes: α/V_i · Σ_unmasked w_j (lse − z_j) */
    const double smooth = (alpha != 0.0 && rs.n > 0) ? alpha / rs.n * (rs.W * lse - rs.sum_wz) : 0.0;
    const double ce = mul0(om * wy * (1.0 - alpha), nll) + om * smooth;
    const double zl = mul0(om * lambda, lse * lse);
    out->lse[i] = lse;
    out->entropy[i] = h;
    out->row_loss[i] = ce + (zl + mul0(om * eta, h));
    out->row_zloss[i] = zl;
    out->argmax[i] = rs.arg;
  }

  double d_ce, d_reg;
  int64_t n_valid;
  denominators(p, &d_ce, &d_reg, &n_valid);
  /* Reductions in row order (deterministic). ce_i = row_loss − zl − ω η h. */
  double sum_ce = 0, sum_reg = 0, sum_zl = 0;
  int64_t correct = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (!row_valid(p, i)) continue;
    const double reg = out->row_zloss[i] + mul0(token_weight(p, i) * eta, out->entropy[i]);
    sum_ce += out->row_loss[i] - reg;
    sum_reg += reg;
    sum_zl += out->row_zloss[i];
    correct += out->argmax[i] == p->targets[i];
  }
  out->n_valid = n_valid;
  out->denom_ce = d_ce;
  out->denom_reg = d_reg;
  out->accuracy = n_valid ? (double)correct / (double)n_valid : 0.0;
  if (p->opt.reduction == FH_REDUCTION_MEAN) {
    out->loss = safe_div(sum_ce, d_ce) + safe_div(sum_reg, d_reg);
    out->z_loss = safe_div(sum_zl, d_reg);
  } else {
    out->loss = sum_ce + sum_reg;
    out->z_loss = sum_zl;
  }
  return FH_SUCCESS;
}

fh_status_t fh_ref_lce_forward_f64(const fh_lce_problem_t* p, fh_lce_ref_forward_t* out) {
  double* part = (double*)malloc(sizeof(double) * FH_SHARD_LCE_PARTIAL * (size_t)(p->N > 0 ? p->N : 1));
  if (!part) return fh_set_error(FH_ERR_OUT_OF_MEMORY, "fh_linear_ce_forward", "cannot allocate reference buffers");
  fh_status_t st = fh_ref_lce_partials(p, part);
  if (st == FH_SUCCESS) st = fh_ref_lce_finish(p, part, 1, out);
  free(part);
  return st;
}

fh_status_t fh_ref_linear_ce_forward(const fh_lce_problem_t* p, const fh_linear_ce_outputs_t* o) {
  return fh_ref_lce_forward_out(p, 0, NULL, o);
}

fh_status_t fh_ref_lce_forward_out(const fh_lce_problem_t* p, int64_t P, const double* gathered,
                                   const fh_linear_ce_outputs_t* o) {
  const int64_t N = p->N;
  fh_lce_ref_forward_t r;
  memset(&r, 0, sizeof r);
  size_t n = (size_t)(N > 0 ? N : 1);
  double* buf = (double*)malloc(sizeof(double) * 4 * n);
  int64_t* arg = (int64_t*)malloc(sizeof(int64_t) * n);
  if (!buf || !arg) {
    free(buf);
    free(arg);
    return fh_set_error(FH_ERR_OUT_OF_MEMORY, "fh_linear_ce_forward", "cannot allocate reference buffers");
  }
  r.lse = buf;
  r.entropy = buf + n;
  r.row_loss = buf + 2 * n;
  r.row_zloss = buf + 3 * n;
  r.argmax = arg;
  fh_status_t st = gathered ? fh_ref_lce_finish(p, gathered, P, &r) : fh_ref_lce_forward_f64(p, &r);
  if (st == FH_SUCCESS) {
    const int none = p->opt.reduction == FH_REDUCTION_NONE;
    for (int64_t i = 0; i < N; ++i) {
      if (none) stat_put(p, o->loss, i, r.row_loss[i]);
      if (none && o->z_loss) stat_put(p, o->z_loss, i, r.row_zloss[i]);
      if (o->lse) stat_put(p, o->lse, i, r.lse[i]);
      if (o->entropy) stat_put(p, o->entropy, i, r.entropy[i]);
      if (o->argmax) o->argmax[i] = r.argmax[i];
    }
    if (!none) {
      stat_put(p, o->loss, 0, r.loss);
      if (o->z_loss) stat_put(p, o->z_loss, 0, r.z_loss);
    }
    if (o->accuracy) stat_put(p, o->accuracy, 0, r.accuracy);
  }
  free(buf);
  free(arg);
  return st;
}

/* Per-row factors of the backward: a_i (target-dependent part), b_i (regularizers), g_i (lse). */
typedef struct row_coef {
  double a, b, glse, lse, h;
  double eps, W; /* α / V_i and Σ w_j over the row's unmasked classes */
  int valid;
} row_coef_t;

/* ∂loss/∂r_ij for one unmasked entry, from the processed logit z (see fusedhead.h); j is the
 * global id; masked entries have gradient 0 and are skipped by the callers. */
static double grad_entry(const fh_lce_problem_t* p, const row_coef_t* rc, int64_t y, int64_t j, double z) {
  const double alpha = p->opt.label_smoothing;
  const double lambda = p->opt.z_loss_scale, eta = p->opt.entropy_weight;
  const double logp = z - rc->lse, pj = exp(logp);
  const double wy = class_weight(p, y), wj = class_weight(p, j);
  double g = rc->a * (wy * (1.0 - alpha) * (pj - (j == y ? 1.0 : 0.0)) + rc->eps * (rc->W * pj - wj));
  g += rc->b * (2.0 * lambda * rc->lse * pj - eta * pj * (logp + rc->h));
  g += rc->glse * pj;
  if (p->opt.softcap > 0.0f) {
    const double t = z / (double)p->opt.softcap; /* tanh(s / cap) */
    g *= 1.0 - t * t;
  }
  return g * (double)p->opt.logit_scale;
}


/* Per valid row, one fp64 pass over the classes: lse and entropy (when `stats`, so that the
 * backward never sees the fp32-rounded lse, whose error exp(z − lse) would amplify by |lse|:
 * docs/linear_ce.md, "Precision") and, for label smoothing, α / V_i and W_i over the row's
 * unmasked classes. */
static int row_pass(const fh_lce_problem_t* p, row_coef_t* rc, int stats) {
  const int64_t N = p->N, V = p->V, D = p->D;
  int oom = 0;
#ifdef FH_HAVE_OPENMP
#pragma omp parallel for schedule(dynamic) reduction(| : oom) if (fh_ref_parallel(N, V, D)) num_threads(fh_ref_threads())
#endif
  for (int64_t i0 = 0; i0 < N; i0 += ROW_BLOCK) {
    const int64_t nb = (N - i0 < ROW_BLOCK) ? N - i0 : ROW_BLOCK;
    double* e = (double*)malloc(sizeof(double) * (size_t)(ROW_BLOCK * D + D + 1));
    if (!e) {
      oom = 1;
      continue;
    }
    double* c = e + ROW_BLOCK * D;
    fh_ref_softmax_stats_t st[ROW_BLOCK];
    double w_un[ROW_BLOCK];
    int64_t n_un[ROW_BLOCK];
    for (int64_t r = 0; r < nb; ++r) {
      fh_ref_row_to_double(p->E, i0 + r, e + r * D);
      fh_ref_stats_init(&st[r]);
      w_un[r] = 0;
      n_un[r] = 0;
    }
    for (int64_t j = 0; j < V; ++j) {
      fh_ref_row_to_double(p->C, j, c);
      const double wj = class_weight(p, p->class_offset + j);
      for (int64_t r = 0; r < nb; ++r) {
        if (!rc[i0 + r].valid) continue;
        const double raw = raw_logit(p, e + r * D, c, j);
        if (masked(raw)) continue;
        fh_ref_stats_add(&st[r], process_logit(p, raw));
        w_un[r] += wj;
        n_un[r] += 1;
      }
    }
    for (int64_t r = 0; r < nb; ++r) {
      row_coef_t* k = &rc[i0 + r];
      if (!k->valid) continue;
      k->eps = n_un[r] > 0 ? p->opt.label_smoothing / (double)n_un[r] : 0.0;
      k->W = w_un[r];
      if (stats) {
        k->lse = fh_ref_stats_lse(&st[r]);
        k->h = n_un[r] > 0 ? fh_ref_stats_entropy(&st[r]) : 0.0;
      }
    }
    free(e);
  }
  return !oom;
}

static int wanted(const fh_tensor_t* t) { return t && t->data; }

fh_status_t fh_ref_lce_backward_f64(const fh_lce_problem_t* p, const double* lse, const double* entropy,
                                    const double* grad_loss, const double* grad_lse, double* dE64,
                                    double* dC64, double* db64, const fh_linear_ce_grads_t* grads) {
  static const char fn[] = "fh_linear_ce_backward";
  const int64_t N = p->N, V = p->V, D = p->D;
  const fh_tensor_t* tE = grads && wanted(grads->dE) ? grads->dE : NULL;
  const fh_tensor_t* tC = grads && wanted(grads->dC) ? grads->dC : NULL;
  const fh_tensor_t* tb = grads && wanted(grads->dbias) && p->bias ? grads->dbias : NULL;
  const int acc = p->opt.accumulate;
  const int want_E = dE64 || tE, want_C = dC64 || tC, want_b = db64 || tb;

  double d_ce, d_reg;
  int64_t n_valid;
  denominators(p, &d_ce, &d_reg, &n_valid);
  row_coef_t* rc = (row_coef_t*)malloc(sizeof(row_coef_t) * (size_t)(N > 0 ? N : 1));
  if (!rc) return fh_set_error(FH_ERR_OUT_OF_MEMORY, fn, "cannot allocate reference buffers");
  for (int64_t i = 0; i < N; ++i) {
    row_coef_t* c = &rc[i];
    c->valid = row_valid(p, i);
    if (!c->valid) continue;
    const double om = token_weight(p, i);
    double g = p->opt.reduction == FH_REDUCTION_NONE ? grad_loss[i] : grad_loss[0];
    if (p->opt.reduction == FH_REDUCTION_MEAN) {
      c->a = safe_div(om * g, d_ce);
      c->b = safe_div(om * g, d_reg);
    } else {
      c->a = c->b = om * g;
    }
    c->glse = grad_lse ? grad_lse[i] : 0.0;
    c->lse = lse ? lse[i] : 0.0;
    c->h = entropy ? entropy[i] : 0.0;
    c->eps = c->W = 0.0; /* set by row_pass when label smoothing is on */
  }
  if (p->shard_gathered) {
    /* A vocabulary shard: the row's global lse, entropy, V_i and W_i from every rank's forward
     * partials, merged in fp64 as by the forward (docs/distributed.md); nothing from `lse`. */
    for (int64_t i = 0; i < N; ++i) {
      if (!rc[i].valid) continue;
      fh_lce_row_stats_t rs;
      fh_ref_lce_combine_row(p->shard_gathered, p->shard_nranks, N, i, &rs);
      rc[i].lse = rs.lse;
      rc[i].h = rs.h;
      rc[i].eps = rs.n > 0 ? p->opt.label_smoothing / rs.n : 0.0;
      rc[i].W = rs.W;
    }
  } else if ((!lse || p->opt.label_smoothing != 0.0f) && !row_pass(p, rc, !lse)) {
    /* lse NULL: recompute lse and entropy in fp64. Label smoothing: per-row α / V_i and W_i. */
    free(rc);
    return fh_set_error(FH_ERR_OUT_OF_MEMORY, fn, "cannot allocate reference buffers");
  }

  int oom = 0;
  /* dE: rows in blocks; each C_j is converted once per block. dE_i = Σ_j G_ij C_j. */
  if (want_E) {
#ifdef FH_HAVE_OPENMP
#pragma omp parallel for schedule(dynamic) reduction(| : oom) if (fh_ref_parallel(N, V, D)) num_threads(fh_ref_threads())
#endif
    for (int64_t i0 = 0; i0 < N; i0 += ROW_BLOCK) {
      const int64_t nb = (N - i0 < ROW_BLOCK) ? N - i0 : ROW_BLOCK;
      double* e = (double*)malloc(sizeof(double) * (size_t)(2 * ROW_BLOCK * D + D + 1));
      if (!e) {
        oom = 1;
        continue;
      }
      double* accE = e + ROW_BLOCK * D;
      double* c = accE + ROW_BLOCK * D;
      memset(accE, 0, sizeof(double) * (size_t)(ROW_BLOCK * D));
      for (int64_t r = 0; r < nb; ++r) fh_ref_row_to_double(p->E, i0 + r, e + r * D);
      for (int64_t j = 0; j < V; ++j) {
        fh_ref_row_to_double(p->C, j, c);
        for (int64_t r = 0; r < nb; ++r) {
          const int64_t i = i0 + r;
          if (!rc[i].valid) continue;
          const double raw = raw_logit(p, e + r * D, c, j);
          if (masked(raw)) continue; /* zero gradient; skipping also avoids 0 · inf from C_j */
          const double g = grad_entry(p, &rc[i], p->targets[i], p->class_offset + j, process_logit(p, raw));
          double* a = accE + r * D;
          for (int64_t k = 0; k < D; ++k) a[k] += g * c[k];
        }
      }
      for (int64_t r = 0; r < nb; ++r) {
        if (dE64) memcpy(dE64 + (i0 + r) * D, accE + r * D, sizeof(double) * (size_t)D);
        if (tE) fh_ref_store_row(tE, i0 + r, accE + r * D, D, acc);
      }
      free(e);
    }
  }
  /* dC and dbias: classes in blocks; each valid E_i is converted once per block. */
  if ((want_C || want_b) && !oom) {
#ifdef FH_HAVE_OPENMP
#pragma omp parallel for schedule(dynamic) reduction(| : oom) if (fh_ref_parallel(N, V, D)) num_threads(fh_ref_threads())
#endif
    for (int64_t j0 = 0; j0 < V; j0 += CLASS_BLOCK) {
      const int64_t nb = (V - j0 < CLASS_BLOCK) ? V - j0 : CLASS_BLOCK;
      double* c = (double*)malloc(sizeof(double) * (size_t)(2 * CLASS_BLOCK * D + D + CLASS_BLOCK + 1));
      if (!c) {
        oom = 1;
        continue;
      }
      double* accC = c + CLASS_BLOCK * D;
      double* e = accC + CLASS_BLOCK * D;
      double* accb = e + D;
      memset(accC, 0, sizeof(double) * (size_t)(CLASS_BLOCK * D));
      memset(accb, 0, sizeof(double) * (size_t)CLASS_BLOCK);
      for (int64_t r = 0; r < nb; ++r) fh_ref_row_to_double(p->C, j0 + r, c + r * D);
      for (int64_t i = 0; i < N; ++i) {
        if (!rc[i].valid) continue;
        fh_ref_row_to_double(p->E, i, e);
        for (int64_t r = 0; r < nb; ++r) {
          const int64_t j = j0 + r;
          const double raw = raw_logit(p, e, c + r * D, j);
          if (masked(raw)) continue;
          const double g = grad_entry(p, &rc[i], p->targets[i], p->class_offset + j, process_logit(p, raw));
          accb[r] += g;
          if (want_C) {
            double* a = accC + r * D;
            for (int64_t k = 0; k < D; ++k) a[k] += g * e[k];
          }
        }
      }
      fh_ref_store_class_block(j0, nb, D, accC, accb, dC64, tC, db64, tb, acc);
      free(c);
    }
  }
  free(rc);
  if (oom) return fh_set_error(FH_ERR_OUT_OF_MEMORY, fn, "cannot allocate reference buffers");
  return FH_SUCCESS;
}

fh_status_t fh_ref_linear_ce_backward(const fh_lce_problem_t* p, const fh_linear_ce_grad_inputs_t* in,
                                      const fh_linear_ce_grads_t* grads) {
  const int64_t N = p->N;
  const size_t n = (size_t)(N > 0 ? N : 1);
  const int none = p->opt.reduction == FH_REDUCTION_NONE;
  double* buf = (double*)malloc(sizeof(double) * 4 * n);
  if (!buf) return fh_set_error(FH_ERR_OUT_OF_MEMORY, "fh_linear_ce_backward", "cannot allocate reference buffers");
  double *lse = buf, *h = buf + n, *gl = buf + 2 * n, *glse = buf + 3 * n;
  for (int64_t i = 0; i < N; ++i) {
    lse[i] = in->lse ? stat_at(p, in->lse, i) : 0.0; /* a shard reads none (shard_gathered) */
    h[i] = in->entropy ? stat_at(p, in->entropy, i) : 0.0;
    if (none) gl[i] = stat_at(p, in->grad_loss, i);
    glse[i] = in->grad_lse ? stat_at(p, in->grad_lse, i) : 0.0;
  }
  if (!none) gl[0] = stat_at(p, in->grad_loss, 0);
  /* fp64 inputs: the given lse is exact enough. Otherwise the lse and entropy are recomputed in
   * fp64 (NULL), so fp32 gradients stay as accurate as PyTorch's at any logit scale. */
  const int f64 = p->dtype == FH_DTYPE_F64 && !p->shard_gathered;
  fh_status_t st = fh_ref_lce_backward_f64(p, f64 ? lse : NULL, f64 ? h : NULL, gl, in->grad_lse ? glse : NULL, NULL,
                                           NULL, NULL, grads);
  free(buf);
  return st;
}
