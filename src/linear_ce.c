/* Linear cross-entropy: option defaults, argument validation and backend dispatch. */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "cuda_backend.h"
#include "fh_internal.h"
#include "linear_ce.h"

/* The size of the first published fh_linear_ce_options_t; later fields keep their defaults
 * when an older caller passes a smaller struct. */
#define FH_LCE_OPTIONS_MIN_SIZE (offsetof(fh_linear_ce_options_t, accumulate) + sizeof(int))

void fh_linear_ce_options_init(fh_linear_ce_options_t* o) {
  if (!o) return;
  memset(o, 0, sizeof *o);
  o->struct_size = sizeof *o;
  o->ignore_index = -100;
  o->reduction = FH_REDUCTION_MEAN;
  o->softcap = 0.0f;
  o->label_smoothing = 0.0f;
  o->logit_scale = 1.0f;
  o->z_loss_scale = 0.0f;
  o->entropy_weight = 0.0f;
  o->divisor = 0.0f;
  o->filter_eps = FH_FILTER_EPS_AUTO;
  o->filter_e_grad = 1;
  o->filter_c_grad = 1;
  o->accum_mode = FH_ACCUM_FP32;
  o->accumulate = 0;
}

fh_status_t fh_lce_check_options(const char* fn, const fh_linear_ce_options_t* user, fh_linear_ce_options_t* o) {
  FH_TRY(fh_check_options(fn, "opts", user, user ? user->struct_size : 0, FH_LCE_OPTIONS_MIN_SIZE));
  fh_linear_ce_options_init(o);
  size_t n = user->struct_size < sizeof *o ? user->struct_size : sizeof *o;
  memcpy(o, user, n);
  o->struct_size = sizeof *o;
  FH_TRY(fh_check_enum(fn, "opts->reduction", (int)o->reduction, FH_REDUCTION_COUNT));
  FH_TRY(fh_check_enum(fn, "opts->accum_mode", (int)o->accum_mode, FH_ACCUM_MODE_COUNT));
  if (!(o->softcap >= 0.0f) || isinf(o->softcap))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->softcap is %g (must be finite and >= 0; 0 is off)",
                        (double)o->softcap);
  FH_TRY(fh_check_float_range(fn, "opts->label_smoothing", o->label_smoothing, 0.0, 1.0));
  if (!(o->logit_scale > 0.0f) || isinf(o->logit_scale))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->logit_scale is %g (must be finite and > 0)",
                        (double)o->logit_scale);
  FH_TRY(fh_check_float_range(fn, "opts->z_loss_scale", o->z_loss_scale, 0.0, INFINITY));
  FH_TRY(fh_check_float_range(fn, "opts->entropy_weight", o->entropy_weight, -INFINITY, INFINITY));
  FH_TRY(fh_check_float_range(fn, "opts->divisor", o->divisor, 0.0, INFINITY));
  if (!(o->filter_eps == FH_FILTER_EPS_AUTO || (o->filter_eps >= 0.0f && isfinite(o->filter_eps))))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn,
                        "opts->filter_eps is %g (must be >= 0, or FH_FILTER_EPS_AUTO)", (double)o->filter_eps);
  return FH_SUCCESS;
}

/* Everything both passes check; fills `p`. shard: NULL, or this rank's slice of the
 * vocabulary (C and bias hold its classes; targets and class_weights are global). */
fh_status_t fh_lce_check_problem(const char* fn, fh_context_t* ctx, const fh_linear_ce_options_t* opts,
                                 const fh_shard_t* shard, const fh_tensor_t* E, const fh_tensor_t* C,
                                 const fh_tensor_t* bias, const int64_t* targets, const float* class_weights,
                                 const float* token_weights, fh_lce_problem_t* p) {
  memset(p, 0, sizeof *p);
  FH_TRY(fh_check_context(fn, ctx));
  FH_TRY(fh_lce_check_options(fn, opts, &p->opt));
  FH_TRY(fh_check_tensor(fn, "E", E, -1, -1, FH_DTYPE_COUNT));
  FH_TRY(fh_check_tensor(fn, "C", C, -1, E->cols, E->dtype));
  if (bias) FH_TRY(fh_check_tensor(fn, "bias", bias, 1, C->rows, E->dtype));
  FH_TRY(fh_check_backend_dtype(fn, "E->dtype", ctx, E->dtype));
  p->N = E->rows;
  p->V = C->rows;
  p->D = E->cols;
  p->dtype = E->dtype;
  if (shard) FH_TRY(fh_check_shard(fn, shard, p->V));
  p->class_offset = shard ? shard->class_start : 0;
  p->V_total = shard ? shard->V_global : p->V;
  if (p->V_total == 0 && p->N > 0) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "C->rows (V) is 0 with N > 0");
  FH_TRY(fh_check_ptr(fn, "targets", targets, p->N));
  p->E = E;
  p->C = C;
  p->bias = bias;
  p->targets = targets;
  p->class_weights = class_weights;
  p->token_weights = token_weights;
  if (ctx->backend == FH_BACKEND_CPU) {
    FH_TRY(fh_check_targets_host(fn, targets, p->N, p->V_total, p->opt.ignore_index));
    const int f64 = p->dtype == FH_DTYPE_F64;
    FH_TRY(fh_check_weights_host_any(fn, "class_weights", class_weights, p->V_total, f64));
    FH_TRY(fh_check_weights_host_any(fn, "token_weights", token_weights, p->N, f64));
  }
  return FH_SUCCESS;
}

/* The workspace a backend needs (the CPU reference needs none). */
static fh_status_t workspace_need(const fh_context_t* ctx, const fh_linear_ce_options_t* o, int backward, int64_t N,
                                  int64_t V, int64_t D, fh_dtype_t dtype, size_t* bytes) {
  *bytes = 0;
#ifdef FH_HAVE_CUDA
  if (ctx->backend == FH_BACKEND_CUDA)
    return backward ? fh_cuda_linear_ce_backward_workspace(ctx->cuda, o, N, V, D, dtype, bytes)
                    : fh_cuda_linear_ce_forward_workspace(ctx->cuda, o, N, V, D, dtype, bytes);
#else
  (void)ctx, (void)o, (void)backward, (void)N, (void)V, (void)D, (void)dtype;
#endif
  return FH_SUCCESS;
}

/* Both workspace queries: validate the shape and ask the backend. */
static fh_status_t workspace_query(const char* fn, fh_context_t* ctx, const fh_linear_ce_options_t* opts,
                                   int backward, int64_t N, int64_t V, int64_t D, fh_dtype_t dtype,
                                   size_t* bytes) {
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  fh_linear_ce_options_t o;
  FH_TRY(fh_lce_check_options(fn, opts, &o));
  if (N < 0 || V < 0 || D < 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "N, V, D are %lld, %lld, %lld (must be >= 0)",
                        (long long)N, (long long)V, (long long)D);
  FH_TRY(fh_check_enum(fn, "dtype", (int)dtype, FH_DTYPE_COUNT));
  FH_TRY(fh_check_backend_dtype(fn, "dtype", ctx, dtype));
  if (!bytes) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "bytes is NULL");
  return workspace_need(ctx, &o, backward, N, V, D, dtype, bytes);
}

fh_status_t fh_linear_ce_forward_workspace_size(fh_context_t* ctx, const fh_linear_ce_options_t* opts,
                                                int64_t N, int64_t V, int64_t D, fh_dtype_t dtype,
                                                size_t* bytes) {
  return workspace_query("fh_linear_ce_forward_workspace_size", ctx, opts, 0, N, V, D, dtype, bytes);
}

fh_status_t fh_linear_ce_backward_workspace_size(fh_context_t* ctx, const fh_linear_ce_options_t* opts,
                                                 int64_t N, int64_t V, int64_t D, fh_dtype_t dtype,
                                                 size_t* bytes) {
  return workspace_query("fh_linear_ce_backward_workspace_size", ctx, opts, 1, N, V, D, dtype, bytes);
}

fh_status_t fh_linear_ce_forward(fh_context_t* ctx, const fh_linear_ce_options_t* opts, const fh_tensor_t* E,
                                 const fh_tensor_t* C, const fh_tensor_t* bias, const int64_t* targets,
                                 const float* class_weights, const float* token_weights,
                                 const fh_linear_ce_outputs_t* out, void* workspace, size_t workspace_bytes) {
  static const char fn[] = "fh_linear_ce_forward";
  fh_clear_error();
  fh_lce_problem_t p;
  FH_TRY(fh_lce_check_problem(fn, ctx, opts, NULL, E, C, bias, targets, class_weights, token_weights, &p));
  if (!out) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "out is NULL");
  FH_TRY(fh_check_reduced_ptr(fn, "out->loss", out->loss, p.opt.reduction, p.N));
  size_t need;
  FH_TRY(workspace_need(ctx, &p.opt, 0, p.N, p.V, p.D, p.dtype, &need));
  FH_TRY(fh_check_workspace(fn, workspace, workspace_bytes, need));
#ifdef FH_HAVE_CUDA
  if (ctx->backend == FH_BACKEND_CUDA)
    return fh_cuda_linear_ce_forward(ctx->cuda, ctx->stream, &p, out, workspace, workspace_bytes);
#endif
  return fh_ref_linear_ce_forward(&p, out);
}

fh_status_t fh_linear_ce_backward(fh_context_t* ctx, const fh_linear_ce_options_t* opts, const fh_tensor_t* E,
                                  const fh_tensor_t* C, const fh_tensor_t* bias, const int64_t* targets,
                                  const float* class_weights, const float* token_weights,
                                  const fh_linear_ce_grad_inputs_t* in, const fh_linear_ce_grads_t* grads,
                                  void* workspace, size_t workspace_bytes) {
  fh_clear_error();
  return fh_lce_backward_impl("fh_linear_ce_backward", ctx, opts, NULL, 0, NULL, E, C, bias, targets,
                              class_weights, token_weights, in, grads, workspace, workspace_bytes);
}

fh_status_t fh_lce_backward_impl(const char* fn, fh_context_t* ctx, const fh_linear_ce_options_t* opts,
                                 const fh_shard_t* shard, int64_t nranks, const double* gathered,
                                 const fh_tensor_t* E, const fh_tensor_t* C,
                                 const fh_tensor_t* bias, const int64_t* targets, const float* class_weights,
                                 const float* token_weights, const fh_linear_ce_grad_inputs_t* in,
                                 const fh_linear_ce_grads_t* grads, void* workspace, size_t workspace_bytes) {
  fh_lce_problem_t p;
  FH_TRY(fh_lce_check_problem(fn, ctx, opts, shard, E, C, bias, targets, class_weights, token_weights, &p));
  if (!in) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "in is NULL");
  if (!grads) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "grads is NULL");
  if (shard) {
    /* A shard reads the row statistics from every rank's forward partials, not in->lse. */
    if (nranks < 1)
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "nranks is %lld (must be >= 1)", (long long)nranks);
    FH_TRY(fh_check_ptr(fn, "gathered", gathered, p.N));
    p.shard_nranks = nranks;
    p.shard_gathered = gathered;
  } else {
    FH_TRY(fh_check_ptr(fn, "in->lse", in->lse, p.N));
    if (p.opt.entropy_weight != 0.0f)
      FH_TRY(fh_check_ptr(fn, "in->entropy (entropy_weight != 0)", in->entropy, p.N));
  }
  FH_TRY(fh_check_reduced_ptr(fn, "in->grad_loss", in->grad_loss, p.opt.reduction, p.N));
  const fh_tensor_t* inputs[3] = {E, C, bias};
  FH_TRY(fh_check_grad_tensor(fn, "dE", grads->dE, E, inputs, 3));
  FH_TRY(fh_check_grad_tensor(fn, "dC", grads->dC, C, inputs, 3));
  FH_TRY(fh_check_grad_tensor(fn, "dbias", grads->dbias, bias, inputs, 3));
  size_t need;
  FH_TRY(workspace_need(ctx, &p.opt, 1, p.N, p.V, p.D, p.dtype, &need));
  FH_TRY(fh_check_workspace(fn, workspace, workspace_bytes, need));
  if (shard && ctx->backend != FH_BACKEND_CPU) return fh_shard_unsupported(fn);
#ifdef FH_HAVE_CUDA
  if (ctx->backend == FH_BACKEND_CUDA)
    return fh_cuda_linear_ce_backward(ctx->cuda, ctx->stream, &p, in, grads, workspace, workspace_bytes);
#endif
  return fh_ref_linear_ce_backward(&p, in, grads);
}
