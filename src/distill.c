/* Distillation: option defaults, argument validation and backend dispatch (dense and sparse
 * teacher). The math is documented in fusedhead.h; the CPU reference is src/ref/distill.c. */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_backend.h"
#include "distill.h"
#include "fh_internal.h"
#include "ref/distill_ref.h"

/* The size of the first published fh_distill_options_t; later fields keep their defaults when
 * an older caller passes a smaller struct. */
#define FH_DISTILL_OPTIONS_MIN_SIZE (offsetof(fh_distill_options_t, accumulate) + sizeof(int))

/* Σ_S exp(logprobs) may exceed 1 by this much in remainder mode: engines round log-probs. */
#define FH_DISTILL_MASS_SLACK 1e-3

void fh_distill_options_init(fh_distill_options_t* o) {
  if (!o) return;
  memset(o, 0, sizeof *o);
  o->struct_size = sizeof *o;
  o->divergence = FH_DISTILL_FORWARD_KL;
  o->beta = 0.5f;
  o->jsd_endpoints = FH_DISTILL_JSD_ENDPOINTS_KL;
  o->skew = 0.1f;
  o->alpha = 0.5f;
  o->temperature = 1.0f;
  o->scale_by_t_squared = 1;
  o->soft_weight = 1.0f;
  o->hard_weight = 0.0f;
  o->ignore_index = -100;
  o->reduction = FH_REDUCTION_MEAN;
  o->divisor = 0.0f;
  o->sparse_mass = FH_DISTILL_SPARSE_RENORMALIZE;
  o->accum_mode = FH_ACCUM_FP32;
  o->accumulate = 0;
}

fh_status_t fh_distill_check_options(const char* fn, const fh_distill_options_t* user, fh_distill_options_t* o) {
  FH_TRY(fh_check_options(fn, "opts", user, user ? user->struct_size : 0, FH_DISTILL_OPTIONS_MIN_SIZE));
  fh_distill_options_init(o);
  memcpy(o, user, user->struct_size < sizeof *o ? user->struct_size : sizeof *o);
  o->struct_size = sizeof *o;
  FH_TRY(fh_check_enum(fn, "opts->divergence", (int)o->divergence, FH_DISTILL_DIVERGENCE_COUNT));
  FH_TRY(fh_check_enum(fn, "opts->jsd_endpoints", (int)o->jsd_endpoints, FH_DISTILL_JSD_ENDPOINTS_COUNT));
  FH_TRY(fh_check_enum(fn, "opts->reduction", (int)o->reduction, FH_REDUCTION_COUNT));
  FH_TRY(fh_check_enum(fn, "opts->sparse_mass", (int)o->sparse_mass, FH_DISTILL_SPARSE_MASS_COUNT));
  FH_TRY(fh_check_enum(fn, "opts->accum_mode", (int)o->accum_mode, FH_ACCUM_MODE_COUNT));
  FH_TRY(fh_check_float_range(fn, "opts->beta", o->beta, 0.0, 1.0));
  FH_TRY(fh_check_float_range(fn, "opts->skew", o->skew, 0.0, 1.0));
  FH_TRY(fh_check_float_range(fn, "opts->alpha", o->alpha, -INFINITY, INFINITY));
  if (!(o->temperature > 0.0f) || isinf(o->temperature))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->temperature is %g (must be finite and > 0)",
                        (double)o->temperature);
  FH_TRY(fh_check_float_range(fn, "opts->soft_weight", o->soft_weight, -INFINITY, INFINITY));
  FH_TRY(fh_check_float_range(fn, "opts->hard_weight", o->hard_weight, -INFINITY, INFINITY));
  FH_TRY(fh_check_float_range(fn, "opts->divisor", o->divisor, 0.0, INFINITY));
  return FH_SUCCESS;
}

/* One head's tensors: E [N x D] (N = -1: any), C [V x D] (V = -1: any), bias [1 x C->rows]. */
static fh_status_t check_head(const char* fn, const char* who, const fh_distill_head_t* h, int64_t N, int64_t V) {
  char nE[32], nC[32], nb[32];
  snprintf(nE, sizeof nE, "%s->E", who);
  snprintf(nC, sizeof nC, "%s->C", who);
  snprintf(nb, sizeof nb, "%s->bias", who);
  if (!h) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s is NULL", who);
  FH_TRY(fh_check_tensor(fn, nE, h->E, N, -1, FH_DTYPE_COUNT));
  FH_TRY(fh_check_tensor(fn, nC, h->C, V, h->E->cols, h->E->dtype));
  if (h->bias) FH_TRY(fh_check_tensor(fn, nb, h->bias, 1, h->C->rows, h->E->dtype));
  return FH_SUCCESS;
}

/* Host-side checks of a sparse teacher (CPU backend): ids in [0, V) without duplicates and
 * usable log-probs, in valid rows only (ignored rows are never read). */
static fh_status_t check_sparse_host(const char* fn, const fh_distill_problem_t* p) {
  unsigned char* seen = (unsigned char*)calloc((size_t)p->V + 1, 1);
  if (!seen) return fh_set_error(FH_ERR_OUT_OF_MEMORY, fn, "cannot allocate the id check buffer");
  fh_status_t st = FH_SUCCESS;
  const int remainder = p->opt.sparse_mass == FH_DISTILL_SPARSE_REMAINDER;
  for (int64_t i = 0; i < p->N && st == FH_SUCCESS; ++i) {
    if (p->targets && p->targets[i] == p->opt.ignore_index) continue;
    int64_t k = 0, n_finite = 0;
    double mass = 0.0;
    for (; k < p->K && st == FH_SUCCESS; ++k) {
      const int64_t id = p->ids[i * p->K + k];
      const float lp = p->logprobs[i * p->K + k];
      if (id < 0 || id >= p->V)
        st = fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "teacher->ids[%lld][%lld] is %lld (must be in [0, %lld))",
                          (long long)i, (long long)k, (long long)id, (long long)p->V);
      else if (seen[id])
        st = fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "teacher->ids[%lld] holds id %lld twice", (long long)i,
                          (long long)id);
      else if (isnan(lp) || lp == INFINITY)
        st = fh_set_error(FH_ERR_INVALID_ARGUMENT, fn,
                          "teacher->logprobs[%lld][%lld] is %g (must be finite or -inf)", (long long)i,
                          (long long)k, (double)lp);
      else {
        seen[id] = 1;
        n_finite += isfinite(lp) != 0;
        mass += exp((double)lp);
      }
    }
    for (int64_t k2 = 0; k2 < k; ++k2) {
      const int64_t id = p->ids[i * p->K + k2];
      if (id >= 0 && id < p->V) seen[id] = 0;
    }
    if (st != FH_SUCCESS) break;
    if (n_finite == 0)
      st = fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "teacher->logprobs[%lld] is all -inf (no teacher mass)",
                        (long long)i);
    else if (remainder && mass > 1.0 + FH_DISTILL_MASS_SLACK)
      st = fh_set_error(FH_ERR_INVALID_ARGUMENT, fn,
                        "teacher->logprobs[%lld] has total probability %.6g (more than 1 + %g; remainder mode "
                        "needs log-probabilities of one distribution)",
                        (long long)i, mass, FH_DISTILL_MASS_SLACK);
  }
  free(seen);
  return st;
}

/* Which divergences each sparse mode defines (fusedhead.h, docs/distillation.md "Sparse
 * teacher"), and its temperature. */
static fh_status_t check_sparse_mode(const char* fn, const fh_distill_options_t* o) {
  const fh_distill_sparse_mass_t m = o->sparse_mass;
  if (m == FH_DISTILL_SPARSE_NONE && o->divergence != FH_DISTILL_FORWARD_KL)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn,
                        "opts->divergence is %d; FH_DISTILL_SPARSE_NONE supports only FH_DISTILL_FORWARD_KL (the "
                        "teacher's entries as given are not one distribution, only the cross-entropy form is defined)",
                        (int)o->divergence);
  if (m == FH_DISTILL_SPARSE_RENORMALIZE) {
    /* Off the support p = 0, and each class there adds q_j f(0): +inf for every student with
     * mass off S when f(0) is (reverse KL and the divergences that resolve to it). */
    fh_div_t dv;
    double f0, a0;
    fh_div_resolve(o, &dv);
    fh_div_eval(&dv, 0.0, -INFINITY, &f0, &a0);
    if (!isfinite(f0))
      return fh_set_error(FH_ERR_UNSUPPORTED, fn,
                          "opts->divergence is %d with these parameters; with FH_DISTILL_SPARSE_RENORMALIZE it is "
                          "+inf whenever the student has mass off the teacher's support (f(0) = +inf); use "
                          "FH_DISTILL_SPARSE_REMAINDER",
                          (int)o->divergence);
  }
  if (m != FH_DISTILL_SPARSE_RENORMALIZE && o->temperature != 1.0f)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn,
                        "opts->temperature is %g; FH_DISTILL_SPARSE_%s needs 1 (the tempered mass of the support "
                        "depends on the unknown tail)",
                        (double)o->temperature, m == FH_DISTILL_SPARSE_NONE ? "NONE" : "REMAINDER");
  return FH_SUCCESS;
}

/* Everything both passes of either teacher kind check; fills `p`. Exactly one of dense and
 * sparse is non-NULL. */
fh_status_t fh_distill_check_problem(const char* fn, fh_context_t* ctx, const fh_distill_options_t* opts,
                                     const fh_shard_t* shard, const fh_distill_head_t* student,
                                     const fh_distill_head_t* dense, const fh_distill_sparse_teacher_t* sparse,
                                     const int64_t* targets, fh_distill_problem_t* p) {
  memset(p, 0, sizeof *p);
  p->fn = fn;
  FH_TRY(fh_check_context(fn, ctx));
  FH_TRY(fh_distill_check_options(fn, opts, &p->opt));
  FH_TRY(check_head(fn, "student", student, -1, -1));
  p->N = student->E->rows;
  p->V = student->C->rows;
  p->D_s = student->E->cols;
  p->Es = student->E;
  p->Cs = student->C;
  p->bs = student->bias;
  int64_t V_all = p->V; /* the range of targets: the whole head's V */
  if (shard) {
    FH_TRY(fh_check_shard(fn, shard, p->V));
    if (sparse) return fh_set_error(FH_ERR_UNSUPPORTED, fn, "a sparse teacher is not supported on a shard");
    p->class_offset = shard->class_start;
    V_all = shard->V_global;
  }
  if (V_all == 0 && p->N > 0) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "student->C->rows (V) is 0 with N > 0");
  if (sparse) {
    p->sparse = 1;
    FH_TRY(check_sparse_mode(fn, &p->opt));
    if (sparse->K < 1)
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "teacher->K is %lld (must be >= 1)", (long long)sparse->K);
    if (sparse->K > p->V && p->N > 0)
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "teacher->K is %lld (more than V = %lld)",
                          (long long)sparse->K, (long long)p->V);
    FH_TRY(fh_check_ptr(fn, "teacher->ids", sparse->ids, p->N));
    FH_TRY(fh_check_ptr(fn, "teacher->logprobs", sparse->logprobs, p->N));
    p->K = sparse->K;
    p->ids = sparse->ids;
    p->logprobs = sparse->logprobs;
  } else {
    FH_TRY(check_head(fn, "teacher", dense, p->N, -1));
    p->V_t = dense->C->rows;
    p->D_t = dense->E->cols;
    if (p->V_t < p->V)
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "teacher->C->rows (V_t) is %lld (must be >= V = %lld)",
                          (long long)p->V_t, (long long)p->V);
    p->Et = dense->E;
    p->Ct = dense->C;
    p->bt = dense->bias;
  }
  if (p->opt.hard_weight != 0.0f && !targets && p->N > 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "targets is NULL but opts->hard_weight is %g (needs targets)",
                        (double)p->opt.hard_weight);
  p->targets = targets;
  if (ctx->backend == FH_BACKEND_CPU) {
    if (targets) FH_TRY(fh_check_targets_host(fn, targets, p->N, V_all, p->opt.ignore_index));
    if (p->sparse) FH_TRY(check_sparse_host(fn, p));
  }
  return FH_SUCCESS;
}

#ifndef FH_HAVE_CUDA
static fh_status_t cuda_unavailable(const char* fn, const char* what) {
  return fh_set_error(FH_ERR_UNSUPPORTED, fn, "%s has no CUDA kernels in fusedhead %s; use FH_BACKEND_CPU", what,
                      fh_version());
}
#endif

/* Workspace of the CUDA kernels (docs/distillation_cuda.md): the forward's, or the backward's for
 * every gradient in the student's dtype under accum_mode; a sparse teacher (K > 0) adds its
 * per-entry area. */
static fh_status_t cuda_need(const char* fn, fh_context_t* ctx, const fh_distill_options_t* o, int backward,
                             int64_t K, int64_t N, int64_t V, int64_t D_s, fh_dtype_t dtype, size_t* need) {
  *need = 0;
  if (ctx->backend != FH_BACKEND_CUDA) return FH_SUCCESS;
#ifdef FH_HAVE_CUDA
  size_t extra = 0;
  (void)fn;
  if (K > 0) FH_TRY(fh_cuda_distill_sparse_workspace(N, K, backward, &extra));
  if (backward) FH_TRY(fh_cuda_distill_backward_workspace(N, V, D_s, dtype, o->accum_mode, need));
  else FH_TRY(fh_cuda_distill_forward_workspace(N, V, need));
  *need += extra;
  return FH_SUCCESS;
#else
  (void)o, (void)backward, (void)K, (void)N, (void)V, (void)D_s, (void)dtype;
  return cuda_unavailable(fn, "distillation");
#endif
}

static fh_status_t workspace_size(const char* fn, fh_context_t* ctx, const fh_distill_options_t* opts,
                                  const fh_distill_shape_t* sh, int backward, size_t* bytes) {
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  fh_distill_options_t o;
  FH_TRY(fh_distill_check_options(fn, opts, &o));
  if (!sh) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "shape is NULL");
  if (sh->N < 0 || sh->V < 0 || sh->D_s < 0 || sh->V_t < 0 || sh->D_t < 0 || sh->K < 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn,
                        "shape has a negative size (N %lld, V %lld, D_s %lld, V_t %lld, D_t %lld, K %lld)",
                        (long long)sh->N, (long long)sh->V, (long long)sh->D_s, (long long)sh->V_t,
                        (long long)sh->D_t, (long long)sh->K);
  FH_TRY(fh_check_enum(fn, "shape->dtype_s", (int)sh->dtype_s, FH_DTYPE_COUNT));
  if (sh->K == 0) {
    FH_TRY(fh_check_enum(fn, "shape->dtype_t", (int)sh->dtype_t, FH_DTYPE_COUNT));
    if (sh->V_t < sh->V)
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "shape->V_t is %lld (must be >= V = %lld)",
                          (long long)sh->V_t, (long long)sh->V);
  }
  if (!bytes) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "bytes is NULL");
  *bytes = 0;
  return cuda_need(fn, ctx, &o, backward, sh->K, sh->N, sh->V, sh->D_s, sh->dtype_s, bytes);
}

fh_status_t fh_distill_forward_workspace_size(fh_context_t* ctx, const fh_distill_options_t* opts,
                                              const fh_distill_shape_t* shape, size_t* bytes) {
  return workspace_size("fh_distill_forward_workspace_size", ctx, opts, shape, 0, bytes);
}

fh_status_t fh_distill_backward_workspace_size(fh_context_t* ctx, const fh_distill_options_t* opts,
                                               const fh_distill_shape_t* shape, size_t* bytes) {
  return workspace_size("fh_distill_backward_workspace_size", ctx, opts, shape, 1, bytes);
}

static fh_status_t forward(const char* fn, fh_context_t* ctx, const fh_distill_options_t* opts,
                           const fh_distill_head_t* student, const fh_distill_head_t* dense,
                           const fh_distill_sparse_teacher_t* sparse, const int64_t* targets,
                           const fh_distill_outputs_t* out, void* workspace, size_t workspace_bytes) {
  fh_clear_error();
  fh_distill_problem_t p;
  FH_TRY(fh_distill_check_problem(fn, ctx, opts, NULL, student, dense, sparse, targets, &p));
  if (!out) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "out is NULL");
  FH_TRY(fh_check_reduced_ptr(fn, "out->loss", out->loss, p.opt.reduction, p.N));
  size_t need;
  FH_TRY(cuda_need(fn, ctx, &p.opt, 0, p.sparse ? p.K : 0, p.N, p.V, p.D_s, p.Es->dtype, &need));
  FH_TRY(fh_check_workspace(fn, workspace, workspace_bytes, need));
#ifdef FH_HAVE_CUDA
  if (ctx->backend == FH_BACKEND_CUDA) return fh_cuda_distill_forward(ctx->cuda, ctx->stream, &p, out, workspace);
#endif
  return fh_ref_distill_forward(&p, out);
}

fh_status_t fh_distill_backward_impl(const char* fn, fh_context_t* ctx, const fh_distill_options_t* opts,
                                     const fh_shard_t* shard, int64_t nranks, const double* gathered_stats,
                                     const double* gathered_div, const fh_distill_head_t* student,
                                     const fh_distill_head_t* dense, const fh_distill_sparse_teacher_t* sparse,
                                     const int64_t* targets, const fh_distill_grad_inputs_t* in,
                                     const fh_distill_grads_t* grads, void* workspace, size_t workspace_bytes) {
  fh_clear_error();
  fh_distill_problem_t p;
  FH_TRY(fh_distill_check_problem(fn, ctx, opts, shard, student, dense, sparse, targets, &p));
  if (!in) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "in is NULL");
  if (!grads) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "grads is NULL");
  if (shard) {
    /* A shard merges the row state from its forward's gathered buffers, not in->row_state. */
    if (nranks < 1)
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "nranks is %lld (must be >= 1)", (long long)nranks);
    FH_TRY(fh_check_ptr(fn, "gathered_stats", gathered_stats, p.N));
    FH_TRY(fh_check_ptr(fn, "gathered_div", gathered_div, p.N));
    p.shard_nranks = nranks;
    p.shard_stats = gathered_stats;
    p.shard_div = gathered_div;
  } else {
    FH_TRY(fh_check_ptr(fn, "in->row_state", in->row_state, p.N));
  }
  FH_TRY(fh_check_reduced_ptr(fn, "in->grad_loss", in->grad_loss, p.opt.reduction, p.N));
  const fh_tensor_t* inputs[6] = {p.Es, p.Cs, p.bs, p.Et, p.Ct, p.bt};
  FH_TRY(fh_check_grad_tensor(fn, "dE", grads->dE, p.Es, inputs, 6));
  FH_TRY(fh_check_grad_tensor(fn, "dC", grads->dC, p.Cs, inputs, 6));
  FH_TRY(fh_check_grad_tensor(fn, "dbias", grads->dbias, p.bs, inputs, 6));
  size_t need;
  FH_TRY(cuda_need(fn, ctx, &p.opt, 1, p.sparse ? p.K : 0, p.N, p.V, p.D_s, p.Es->dtype, &need));
  FH_TRY(fh_check_workspace(fn, workspace, workspace_bytes, need));
#ifdef FH_HAVE_CUDA
  if (ctx->backend == FH_BACKEND_CUDA) return fh_cuda_distill_backward(ctx->cuda, ctx->stream, &p, in, grads, workspace);
#endif
  return fh_ref_distill_backward(&p, in, grads);
}

fh_status_t fh_distill_forward(fh_context_t* ctx, const fh_distill_options_t* opts, const fh_distill_head_t* student,
                               const fh_distill_head_t* teacher, const int64_t* targets,
                               const fh_distill_outputs_t* out, void* workspace, size_t workspace_bytes) {
  static const char fn[] = "fh_distill_forward";
  if (!teacher) {
    fh_clear_error();
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "teacher is NULL");
  }
  return forward(fn, ctx, opts, student, teacher, NULL, targets, out, workspace, workspace_bytes);
}

fh_status_t fh_distill_backward(fh_context_t* ctx, const fh_distill_options_t* opts, const fh_distill_head_t* student,
                                const fh_distill_head_t* teacher, const int64_t* targets,
                                const fh_distill_grad_inputs_t* in, const fh_distill_grads_t* grads, void* workspace,
                                size_t workspace_bytes) {
  static const char fn[] = "fh_distill_backward";
  if (!teacher) {
    fh_clear_error();
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "teacher is NULL");
  }
  return fh_distill_backward_impl(fn, ctx, opts, NULL, 0, NULL, NULL, student, teacher, NULL, targets, in, grads, workspace,
                                  workspace_bytes);
}

fh_status_t fh_distill_sparse_forward(fh_context_t* ctx, const fh_distill_options_t* opts,
                                      const fh_distill_head_t* student, const fh_distill_sparse_teacher_t* teacher,
                                      const int64_t* targets, const fh_distill_outputs_t* out, void* workspace,
                                      size_t workspace_bytes) {
  static const char fn[] = "fh_distill_sparse_forward";
  if (!teacher) {
    fh_clear_error();
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "teacher is NULL");
  }
  return forward(fn, ctx, opts, student, NULL, teacher, targets, out, workspace, workspace_bytes);
}

fh_status_t fh_distill_sparse_backward(fh_context_t* ctx, const fh_distill_options_t* opts,
                                       const fh_distill_head_t* student, const fh_distill_sparse_teacher_t* teacher,
                                       const int64_t* targets, const fh_distill_grad_inputs_t* in,
                                       const fh_distill_grads_t* grads, void* workspace, size_t workspace_bytes) {
  static const char fn[] = "fh_distill_sparse_backward";
  if (!teacher) {
    fh_clear_error();
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "teacher is NULL");
  }
  return fh_distill_backward_impl(fn, ctx, opts, NULL, 0, NULL, NULL, student, NULL, teacher, targets, in, grads, workspace,
                                  workspace_bytes);
}
